// The API listener's client connections, least recently used first, and listen.maxConnections kept over them.
// Node's own server.maxConnections refuses every connection past the limit, however many of those open are only
// kept alive between calls: a client that makes one call (a /healthz, a 401) per connection and keeps it open for
// the keep-alive timeout could fill the table and lock every other client out. Here a connection past the limit
// closes the least recently used connection that is idle between calls instead, as nginx reuses its kept-alive
// connections when it runs short; it is refused only when none is. A connection that has not sent a byte yet, or
// is reading a request or sending an answer, is never closed for another (the headers and request timeouts bound
// the first).
import type { IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import { hasBody } from '../plugins/body.js'
import { responseHolding } from './response.js'

export class Connections implements Iterable<Socket> {
  /** open connections, least recently used first (a call moves its connection to the end) */
  readonly #sockets = new Set<Socket>()
  /**
   * bytes each connection had read when its last request had been read to its end: any byte since is the next
   * call being sent (by a pipelining client, perhaps before the one before it is answered)
   */
  readonly #readThrough = new WeakMap<Socket, number>()
  readonly #max: number

  constructor (max: number) {
    this.#max = max
  }

  [Symbol.iterator] (): Iterator<Socket> {
    return this.#sockets.values()
  }

  /** A connection accepted: kept, at the cost of an idle one when the table is full, or else closed. */
  opened (socket: Socket): void {
    this.#sockets.add(socket)
    socket.once('close', () => { this.#sockets.delete(socket) })
    if (this.#sockets.size <= this.#max) return
    for (const other of this.#sockets) {
      if (other !== socket && this.#isIdle(other)) {
        other.destroy()
        return
      }
    }
    socket.destroy()
  }

  /** A call came on `req.socket`: its connection is the most recently used, and idle again once the call is over. */
  used (req: IncomingMessage): void {
    const socket = req.socket
    this.#sockets.delete(socket)
    this.#sockets.add(socket)
    // Over once its answer has gone out (responseHolding) and its request has been read to its end: a request
    // without a body now, in the read that brought its headers; else once its body is in (after an early refusal,
    // a body can still be coming: it is read and thrown away, see discardTheRestOfTheBody in app.ts). Not when the
    // answer goes out: by then a pipelining client may have sent part of its next request.
    const readThrough = () => { this.#readThrough.set(socket, socket.bytesRead) }
    if (hasBody(req.headers)) req.once('end', readThrough)
    else readThrough()
  }

  /**
   * Kept alive between calls: it has been answered, holds no call now nor unsent bytes, and has sent nothing since
   * (a request part-way through its headers is a call Node has not handed on yet).
   */
  #isIdle (socket: Socket): boolean {
    return !socket.destroyed && responseHolding(socket) === null && socket.writableLength === 0 &&
      this.#readThrough.get(socket) === socket.bytesRead
  }
}

/**
 * How often Node checks a listener's headers and request timeouts (30 s by default, far coarser than they are):
 * a quarter of the headers timeout, within 50 ms to 1 s. For the API listener and the metrics listener alike.
 */
export function timeoutCheckIntervalMs (headersTimeoutMs: number): number {
  return Math.max(50, Math.min(1000, Math.floor(headersTimeoutMs / 4)))
}
