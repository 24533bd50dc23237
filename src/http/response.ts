// The gateway's ServerResponse, given to Node as http.createServer's `ServerResponse` class: it counts the body
// bytes it writes (for the audit's bytesOut) and cuts off a client that stops reading its answer. Beside it, how
// every concern sees a response end (whenClosed), and the 'close' Node leaves out for pipelined responses. The counting
// lives on the class, with its fields declared up front, so every response has the same shape: patching write and
// end on each response (as an earlier version did) gave every response a shape of its own, and Node's own code on
// responses slowed down with it.
import { ServerResponse, type IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'

export interface CountingResponse extends ServerResponse {
  /** body bytes written to the client so far */
  bodyBytes: number
  /** set when the gateway answered on the socket itself (malformed framing): that answer's status */
  rawStatus: number
  /** waiting behind a pipelined response, with no socket yet: nothing of it has reached the client */
  queued: boolean
  /** the id of the call it answers (plugins/request-id.ts), for an answer written on the socket itself */
  requestId: string | null
  /** cut off for a client that took none of it for listen.sendTimeoutMs (ended, it may look finished all the same) */
  cutOff: boolean
}

export function isCounting (res: ServerResponse): res is CountingResponse {
  return typeof (res as Partial<CountingResponse>).bodyBytes === 'number'
}

function byteLength (chunk: unknown, encoding: unknown): number {
  if (chunk === undefined || chunk === null || typeof chunk === 'function') return 0
  if (typeof chunk === 'string') return Buffer.byteLength(chunk, typeof encoding === 'string' ? encoding as BufferEncoding : 'utf8')
  return (chunk as Uint8Array).byteLength ?? 0
}

/**
 * The class for one server: once a write has to wait for the client, the client has `sendTimeoutMs` to take some of
 * it, and again for each part until it is taken ('drain'), or its connection is destroyed. Streams piped into the
 * response wait on the same 'drain'.
 */
export function countingResponseClass (sendTimeoutMs: number): typeof ServerResponse {
  class GatewayResponse<Request extends IncomingMessage = IncomingMessage> extends ServerResponse<Request> implements CountingResponse {
    bodyBytes = 0
    rawStatus = 0
    queued = false
    requestId: string | null = null
    cutOff = false
    #stalled: NodeJS.Timeout | null = null

    constructor (...args: ConstructorParameters<typeof ServerResponse<Request>>) {
      super(...args)
      // Each concern that must see the response end listens for its 'close' (audit, limits, metrics, the upstream
      // call, Fastify's own): more than EventEmitter's default of 10 is expected, not a leak.
      this.setMaxListeners(32)
    }

    override write (chunk: unknown, ...rest: any[]): boolean { // eslint-disable-line @typescript-eslint/no-explicit-any
      this.bodyBytes += byteLength(chunk, rest[0])
      const flowing = (super.write as (...args: unknown[]) => boolean)(chunk, ...rest)
      // A response waiting behind a pipelined one (no socket yet) is not a client that stopped reading.
      if (!flowing && this.#stalled === null && this.socket !== null) this.#watchStall()
      return flowing
    }

    override end (chunk?: unknown, ...rest: any[]): this { // eslint-disable-line @typescript-eslint/no-explicit-any
      const bytes = byteLength(chunk, rest[0])
      this.bodyBytes += bytes
      ;(super.end as (...args: unknown[]) => this)(chunk, ...rest)
      // An answer ended with its body in one piece (Fastify sends a Buffer so: an answer the gateway read whole, its
      // own errors) gets no 'drain' to wait on. One the connection's buffers do not take at once waits in the gateway
      // for the client (megabytes, the call's place in limits.maxInFlight, its audit record): the client gets
      // sendTimeoutMs for each part of it it takes. That is so of a small one too (no write of it asks to wait)
      // written behind answers the client has not read (pipelined calls), or of a streamed answer's last part. One
      // waiting behind a pipelined response is watched once it is written, when it has its socket.
      if (this.#stalled === null) {
        if (this.socket !== null) this.#watchWritten()
        else this.once('socket', () => { setImmediate(() => { this.#watchWritten() }) })
      }
      return this
    }

    #cutOff (): void {
      this.cutOff = true
      // What the gateway still held is dropped with the connection, never sent: bytesOut counts what went out.
      if (this.socket !== null) this.bodyBytes = Math.max(0, this.bodyBytes - unsent(this.socket))
      // Reset, not closed: a close would leave the unsent answer (megabytes) in the kernel's send buffer, held
      // for as long as the client keeps its window shut.
      this.socket?.resetAndDestroy()
      this.destroy()
    }

    #watchWritten (): void {
      const socket = this.socket
      if (socket === null || this.#stalled !== null || this.destroyed || unsent(socket) === 0) return
      this.#watch(socket, 'finish')
    }

    #watchStall (): void {
      this.#watch(this.socket!, 'drain')
    }

    /**
     * Until `over` (what had to wait has gone to the kernel: a write's 'drain', an answer ended whole's 'finish'),
     * the client has sendTimeoutMs to take some of what the connection holds, again and again: a client that reads
     * slowly but on is not cut off however large a write it has to take (a streamed event of megabytes, which goes
     * out in one write and drains only once the kernel has taken all of it).
     */
    #watch (socket: Socket, over: 'drain' | 'finish'): void {
      let was = taken(socket)
      const clear = () => {
        if (this.#stalled !== null) clearTimeout(this.#stalled)
        this.#stalled = null
        this.off(over, clear)
        this.off('close', clear)
      }
      const check = () => {
        const now = taken(socket)
        if (now > was) { // the client took some of it
          was = now
          this.#stalled = setTimeout(check, sendTimeoutMs)
          return
        }
        clear()
        this.#cutOff()
      }
      this.#stalled = setTimeout(check, sendTimeoutMs)
      this.once(over, clear)
      this.once('close', clear)
    }
  }
  return GatewayResponse as unknown as typeof ServerResponse
}

/**
 * Bytes written to a connection and not yet taken by the kernel: those still in the stream's buffer, less the write
 * being done (the stream counts it whole until it is done), and, of that one, what libuv has still to write (which
 * shrinks as the client reads: the stream's count of one large write does not).
 */
function unsent (socket: Socket): number {
  const { _handle: handle, _writableState: state } = socket as Socket & {
    _handle?: { writeQueueSize?: unknown } | null
    _writableState?: { writelen?: unknown }
  }
  const writing = typeof state?.writelen === 'number' ? state.writelen : 0
  return socket.writableLength - writing + (typeof handle?.writeQueueSize === 'number' ? handle.writeQueueSize : 0)
}

/** Bytes of a connection the kernel has taken so far: those handed to it, less what libuv has still to write. */
function taken (socket: Socket): number {
  return socket.bytesWritten - unsent(socket)
}

/** Per connection: responses to pipelined requests waiting, without a socket, behind the one holding it, in order. */
const waiting = new WeakMap<Socket, ServerResponse[]>()

/** The response now holding a connection (Node's own record of it), null between calls. */
export function responseHolding (socket: Socket): ServerResponse | null {
  return (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage ?? null
}

/** The answers due on `socket`, in order: the response holding it, then those waiting behind it. */
export function answersDue (socket: Socket): ServerResponse[] {
  const holding = responseHolding(socket)
  return [...holding === null ? [] : [holding], ...waiting.get(socket) ?? []]
}

/** The last answer due on `socket`; null between calls. */
export function lastAnswerDue (socket: Socket): ServerResponse | null {
  return answersDue(socket).at(-1) ?? null
}

/** Connections whose answer now going out closes them: a call read on one after that can get no answer. */
const closing = new WeakSet<Socket>()

/**
 * The answer `res` closes its connection (Connection: close): calls pipelined after it go no further, those read
 * already included (their answers could never be sent: nothing of them goes upstream, and each is audited aborted).
 */
export function closesConnection (res: ServerResponse, socket: Socket | null): void {
  if (socket === null) return
  closing.add(socket)
  const queue = waiting.get(socket)
  if (queue !== undefined) for (const behind of queue.slice(queue.indexOf(res) + 1)) behind.destroy()
}

/** Whether responses to later pipelined requests on `socket` (the request's) wait behind `res`. */
export function hasWaitingBehind (res: ServerResponse, socket: Socket | null): boolean {
  const queue = socket === null ? undefined : waiting.get(socket)
  if (queue === undefined) return false
  const at = queue.indexOf(res)
  return at === -1 ? queue.length > 0 : at < queue.length - 1
}

/**
 * A pipelined request's response waits, without a socket, for the responses before it. When the connection closes
 * meanwhile, Node 20 emits 'close' for the response that held the socket but never for those waiting (Node 24
 * does, on the next tick): emit it for those still without one, so that 'close' comes exactly once for every response. The audit record is
 * written on it, and the upstream call stopped. Waiting responses are also kept in order per connection
 * (hasWaitingBehind). Nothing is done for a response that has its socket at once: the usual one call at a time.
 */
export function closeWithConnection (res: ServerResponse, socket: Socket | null): void {
  if (socket === null) return
  // Read after an answer that closes the connection: it could never be answered, so it is over before it starts
  // (nothing goes upstream for it; it is audited aborted). Also when that answer is written already, and the
  // connection still reads the rest of a body it had (an Upgrade request with one).
  if (closing.has(socket)) res.destroy()
  if (res.socket !== null) return
  const queue = waiting.get(socket)
  if (queue === undefined) {
    waiting.set(socket, [res])
    // One listener per connection, not one per waiting response: a client pipelining dozens of calls would
    // otherwise set off Node's listener-leak warning.
    socket.once('close', () => { closeWaiting(socket) })
  } else {
    queue.push(res)
  }
  if (isCounting(res)) res.queued = true
  // Whether 'close' has come, told by the event itself: a waiting response can be destroyed (a broken upstream
  // answer, a stalled write) without it, and still needs its 'close'.
  res.once('close', () => { closeEmitted.add(res) })
  res.once('socket', () => {
    const queue = waiting.get(socket)
    const at = queue?.indexOf(res) ?? -1
    if (at !== -1) queue!.splice(at, 1)
    if (isCounting(res)) res.queued = false
  })
}

/** Responses whose 'close' has come. */
const closeEmitted = new WeakSet<ServerResponse>()

/** The connection closed: every response still waiting on it gets the 'close' Node 20 leaves out, in order. */
function closeWaiting (socket: Socket): void {
  // After Node's own: Node 24 destroys each waiting response when the connection closes, and emits its 'close' on
  // the next tick, after this listener has run. Emitted here as well, it came twice (two audit records, the
  // in-flight count and the maxInFlight slot given back twice).
  setImmediate(() => {
    for (const res of [...waiting.get(socket) ?? []]) {
      if (closeEmitted.has(res)) continue
      res.destroyed = true
      res.emit('close')
    }
  })
}

/**
 * Runs `fn` once the response has closed, finished or not: now, when it has already (Node marks a closed response
 * destroyed before it emits 'close'). A hook that runs after an asynchronous one (a rate limit asked of Redis) can
 * come after a client that hung up at once: a 'close' listener added then would never run.
 */
export function whenClosed (res: ServerResponse, fn: () => void): void {
  if (res.destroyed) fn()
  else res.on('close', fn)
}
