// The operational log: pino, redacted, to stdout, without ever blocking the gateway. It says what is exceptional;
// per-request lines belong to the audit trail (src/audit/writer.ts), and appear here only at debug.
import type { Server } from 'node:net'
import type { Writable } from 'node:stream'
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify'
import { LogController } from 'fastify'
import { LRUCache } from 'lru-cache'
import { pino, type Bindings, type ChildLoggerOptions, type LogFn, type Logger, type LoggerOptions } from 'pino'
import { cutShort } from './errors.js'
import { withoutKeys } from './keys.js'
import { credentialParam, queryOf, rawPath } from './operations.js'
import { clientIp } from './http/address.js'

/** Anything that could carry key material, wherever it turns up in a log object. */
export const REDACT_PATHS = [
  'req.headers.authorization', 'req.headers["x-api-key"]', 'req.headers["api-key"]', 'req.headers.cookie',
  'headers.authorization', 'headers["x-api-key"]', 'headers["api-key"]', 'headers.cookie',
  'res.headers["set-cookie"]', 'apiKey', '*.apiKey', 'upstream.apiKey', 'key', '*.key',
  // undici's parser errors carry the bytes it could not parse (an upstream answer, which may quote the token)
  'err.data', 'err.cause.data'
]

/** Longest string of client-controlled text (a URL, a Host) written to the operational log. */
const LOGGED_TEXT_CHARS = 256

export function cut (text: unknown): string | undefined {
  if (typeof text !== 'string') return undefined
  return text.length > LOGGED_TEXT_CHARS ? `${cutShort(text, LOGGED_TEXT_CHARS)}… (${text.length} chars)` : text
}

/** What a warning says of a failure, under `err` (loggedError). */
export interface LoggedError { type: string, code?: string, status?: number, message: string }

/**
 * A failure as a warning logs it, under `err`: its type (its class), its code and status where it has them, and
 * `message`, its own unless the caller gives another (one that could quote an upstream answer, which may hold the
 * token). Not its stack (where the gateway noticed it, which says nothing to an operator) nor its other fields (an
 * undici error's `data` holds the bytes it could not parse).
 */
export function loggedError (err: unknown, message?: string): LoggedError {
  const e = (typeof err === 'object' && err !== null ? err : {}) as
    { name?: unknown, code?: unknown, cause?: { code?: unknown }, kind?: unknown, statusCode?: unknown, status?: unknown, message?: unknown }
  const logged: LoggedError = { type: typeof e.name === 'string' ? e.name : typeof err, message: message ?? String(e.message ?? err) }
  // (an upstream failure's kind, UpstreamFailure, is its code)
  const code = e.code ?? e.cause?.code ?? e.kind
  if (typeof code === 'string') logged.code = code
  const status = e.statusCode ?? e.status
  if (typeof status === 'number') logged.status = status
  return logged
}

export function appLoggerOptions (level: string): LoggerOptions {
  return {
    level,
    redact: { paths: REDACT_PATHS, censor: '[redacted]' },
    serializers: {
      // A failure loggedError shaped is written as it is: pino's error serializer would call it an "Object" with an
      // empty stack. An Error is written as pino writes one.
      err (err: unknown) {
        return typeof err === 'object' && err !== null && Object.getPrototypeOf(err) === Object.prototype ? err : pino.stdSerializers.err(err as Error)
      },
      req (req: FastifyRequest) {
        // As the client sent it (a target the router cannot take is routed to a stand-in: app.ts routableUrl). A
        // query holding a credential (refused by the router) is left out whole.
        const sent = req.originalUrl ?? req.url
        const url = credentialParam(queryOf(sent)) === null ? sent : `${rawPath(sent)}?[withheld: it names a credential]`
        return { method: req.method, url: cut(withoutKeys(url)), host: cut(withoutKeys(req.host)), remoteAddress: clientIp(req) }
      }
    }
  }
}

export function createAppLogger (level: string, out: Writable = process.stdout): Logger {
  return pino(appLoggerOptions(level), nonBlockingLines(out))
}

/**
 * A request's logger (Fastify's request.log), made only when it writes a line. Fastify makes one per call, and
 * pino's child() serializes its bindings (the request id) at once: on the hot path that is work for nothing, as
 * nearly every call writes no operational line (the audit record is written elsewhere). Lines, levels and the
 * request id come out exactly as from pino's own child. Its level is its parent's (a reload's new level applies)
 * until the child exists or a level is set on it.
 */
export class LazyChildLogger implements FastifyBaseLogger {
  #child: FastifyBaseLogger | null = null
  readonly #parent: FastifyBaseLogger
  readonly #bindings: Bindings
  readonly #options: ChildLoggerOptions | undefined

  constructor (parent: FastifyBaseLogger, bindings: Bindings, options?: ChildLoggerOptions) {
    this.#parent = parent
    this.#bindings = bindings
    this.#options = options
  }

  #made (): FastifyBaseLogger {
    this.#child ??= this.#parent.child(this.#bindings, this.#options)
    return this.#child
  }

  get level (): string { return this.#child?.level ?? this.#options?.level ?? this.#parent.level }
  set level (level: string) { this.#made().level = level }

  fatal (...args: Parameters<LogFn>): void { this.#made().fatal(...args) }
  error (...args: Parameters<LogFn>): void { this.#made().error(...args) }
  warn (...args: Parameters<LogFn>): void { this.#made().warn(...args) }
  info (...args: Parameters<LogFn>): void { this.#made().info(...args) }
  debug (...args: Parameters<LogFn>): void { this.#made().debug(...args) }
  trace (...args: Parameters<LogFn>): void { this.#made().trace(...args) }
  silent (...args: Parameters<LogFn>): void { this.#made().silent(...args) }

  child (bindings: Bindings, options?: ChildLoggerOptions): FastifyBaseLogger {
    return this.#made().child(bindings, options)
  }
}

/** Fastify's childLoggerFactory: each request's logger is a LazyChildLogger. */
export function lazyChildLogger (logger: FastifyBaseLogger, bindings: Bindings, options: ChildLoggerOptions): FastifyBaseLogger {
  return new LazyChildLogger(logger, bindings, options)
}

/** Fastify's "incoming request" / "request completed" lines, at debug instead of info: the audit says it all. */
function debugOn (log: FastifyBaseLogger): boolean {
  return log.level === 'debug' || log.level === 'trace'
}

export class DebugRequestLogController extends LogController {
  override incomingRequest (request: FastifyRequest): void {
    if (debugOn(request.log)) request.log.debug({ req: request }, 'incoming request')
  }

  override requestCompleted (error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    if (error) reply.log.error({ res: reply, err: error }, 'request errored')
    else if (debugOn(reply.log)) reply.log.debug({ res: reply, responseTime: reply.elapsedTime }, 'request completed')
  }

  /**
   * A streamed answer the client left part-way (an SDK's `break` out of a stream, an abort) is routine, and its
   * audit record says `aborted`: at debug, with the per-request lines (Fastify writes it at info). Any other error
   * of a stream under way stays a warning.
   */
  override streamError (error: Error & { code?: string }, request: FastifyRequest, reply: FastifyReply): void {
    if (error.code !== 'ERR_STREAM_PREMATURE_CLOSE') super.streamError(error, request, reply)
    else if (debugOn(reply.log)) reply.log.debug({ res: reply }, 'stream closed prematurely')
  }
}

/**
 * A warning that can come with every call (or signal) for as long as its cause lasts: its first line at once, then
 * at most one per `intervalMs`, each saying how many were held back since the line before (the upstream refusing
 * the token, an ignored signal).
 */
export class EveryInterval {
  readonly #intervalMs: number
  readonly #now: () => number
  #lastLine = -Infinity
  #held = 0

  constructor (intervalMs: number, now: () => number) {
    this.#intervalMs = intervalMs
    this.#now = now
  }

  /** One more: null when its line is held back, else how many were held back before it, and whether it is the first. */
  admit (): { held: number, first: boolean } | null {
    const at = this.#now()
    if (at - this.#lastLine < this.#intervalMs) {
      this.#held++
      return null
    }
    const line = { held: this.#held, first: this.#lastLine === -Infinity }
    this.#lastLine = at
    this.#held = 0
    return line
  }
}

/** At most one line per this long about connections a listener could not accept. */
const ACCEPT_LOG_INTERVAL_MS = 10_000

/**
 * After listen, a server's 'error' is an accept that failed for a reason other than a lack of descriptors (libuv
 * rides those out): ENOBUFS or ENOMEM under memory pressure, or a network error pending on the new connection, which
 * Linux's accept(2) hands over as its own (Node's net.js emits each on the server). Unlistened, Node throws it, and
 * the process ends for one connection it could not take: its calls in flight, its drain and its audit lock with it.
 * Logged instead (the first at once, then one line per ACCEPT_LOG_INTERVAL_MS saying how many were held back), and
 * the listener serves on.
 */
export function keepAccepting (server: Server, log: FastifyBaseLogger, listener: string, now: () => number = Date.now): void {
  const lines = new EveryInterval(ACCEPT_LOG_INTERVAL_MS, now)
  server.on('error', (err: NodeJS.ErrnoException) => {
    const line = lines.admit()
    if (line !== null) {
      log.error({ err: loggedError(err), ...(line.held > 0 ? { heldBack: line.held } : {}) },
        `${listener} could not accept a connection; serving on`)
    }
  })
}

/**
 * At most `perSecond` lines a second for each peer address, for warnings a client can trigger at will (malformed
 * HTTP, slowloris): each is worth a line, a flood of them is not. A line after a quiet spell says how many were
 * held back. Bounded: the least recently seen addresses are forgotten.
 */
export class PeerLogThrottle {
  readonly #windows = new LRUCache<string, { start: number, count: number, held: number }>({ max: 10_000 })
  readonly #perSecond: number
  readonly #now: () => number

  constructor (perSecond = 3, now: () => number = Date.now) {
    this.#perSecond = perSecond
    this.#now = now
  }

  /** How many lines were held back before this one, or null when this one is to be held back too. */
  admit (peer: string): number | null {
    const now = this.#now()
    let w = this.#windows.get(peer)
    if (w === undefined || now - w.start >= 1000) {
      const held = w?.held ?? 0
      w = { start: now, count: 0, held: 0 }
      this.#windows.set(peer, w)
      w.count++
      return held
    }
    if (w.count >= this.#perSecond) {
      w.held++
      return null
    }
    w.count++
    return 0
  }
}

/** Log bytes allowed to wait for a stdout that nobody reads before new lines are dropped. */
const MAX_WAITING_LOG_BYTES = 1024 * 1024

/**
 * Lines to stdout through Node's own stream: asynchronous for a pipe, so a full pipe (a log shipper that stopped
 * reading) cannot freeze the event loop the way pino's synchronous destination would, bounded so that it cannot
 * fill memory either, and with no synchronous flush at exit that could hang on that pipe.
 */
export function nonBlockingLines (out: Writable, limit = MAX_WAITING_LOG_BYTES): { write (line: string): void } {
  let gone = false
  // A reader that is gone (a log shipper that died: Node ignores SIGPIPE, the write fails with EPIPE) is an 'error'
  // event, which unlistened would end the process at its next line, its drain and audit lock with it. The log is
  // dropped from then on, said once on stderr (itself perhaps the same pipe: its failure is ignored too); the
  // gateway serves on, every call still audited.
  out.on('error', (err: NodeJS.ErrnoException) => {
    if (gone) return
    gone = true
    process.stderr.on('error', () => {})
    process.stderr.write(`ohmygpt-gateway: the log's output failed (${err.code ?? err.message}): log lines are dropped from now on\n`)
  })
  return {
    write (line) {
      if (!gone && out.writableLength <= limit) out.write(line)
    }
  }
}
