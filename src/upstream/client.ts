// Calls to OhMyGPT across its lines: which line, how long, and whether a failed attempt may be sent again.
// - One undici Pool per line (verified TLS, `connectTimeoutMs`, `maxConnections`, `bodyTimeoutMs` between chunks).
// - A call's deadline for response headers (`timeoutMs`) runs from the moment it is handed over: the wait for a
//   pooled connection and every retry count inside it, and it ends a call still waiting for a connection at once
//   (untilStopped). Waiting for a connection says nothing of the line (LinePool tells whether a request got one).
// - What counts against a line: connect failures and timeouts, resets (before the headers or mid-body), 502/503,
//   a fronting proxy's (Cloudflare's) 52x and 530, any redirect (the line is not where the config points), and a
//   quick call with no response headers by its deadline (or a proxy's 504/524), or whose answer goes silent after
//   them (bookTheBody); not a generation that outlives its deadline (see attemptFailed, lineFault).
// - Retries never duplicate work: GET and DELETE may go to the next line after a connection failure, a connect
//   timeout, an answer that is no HTTP or any of those statuses; a POST only when its connection failed before any byte of it was sent, or
//   the line's proxy says it never reached the origin (521, 522, 523, 525, 526, 530). At most
//   `retries` extra attempts, each on another line. A 429 is never retried, and with one line, or once the
//   retries are spent, the upstream's answer passes through as it is. Retries end at an answer's headers: a body the
//   line breaks off after them is the proxy's to answer (502), never sent to another line.
// - A client that hangs up aborts the call at once (`whenClientGone`), closing the upstream connection.
// - A reload hands new settings to `update`: calls under way finish where they started (see Lines below), and
//   `destroy` aborts every call still in flight (the end of a shutdown's grace).
// Both the proxy (as reply-from's undici dispatcher) and the ownership lookups call through here.
import { EventEmitter } from 'node:events'
import { isIP } from 'node:net'
import { performance } from 'node:perf_hooks'
import type { Duplex, Readable } from 'node:stream'
import { rootCertificates } from 'node:tls'
import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyBaseLogger } from 'fastify'
import { Pool, type Dispatcher } from 'undici'
import { readRegularFile } from '../config.js'
import { retryAfter } from '../errors.js'
import { LineHealth, type LineStatus, type Ticket } from './lines.js'
import { RefusedTokenLog } from './refused-token.js'

export interface UpstreamSettings {
  baseUrls: readonly string[]
  connectTimeoutMs: number
  timeoutMs: number
  bodyTimeoutMs: number
  /** a generation's timeoutMs and bodyTimeoutMs (it waits on the model) */
  generationTimeoutMs: number
  failureThreshold: number
  cooldownMs: number
  retries: number
  maxConnections: number
  caFile?: string | undefined
}

export interface UpstreamCall {
  method: string
  /** path and query below the line's base URL, as sent by the client: /v1/conversations/conv_1/items?limit=2 */
  path: string
  headers: Record<string, string>
  body: Buffer | null
  /** registers what to do when the client hangs up: the call is aborted at once */
  whenClientGone?: ((abort: () => void) => void) | undefined
  /**
   * kept up to date as attempts reach their line and get a connection, for whoever needs to know of a call cut
   * short how many attempts it made and whether the last one's request was sent (the token budget charges what the
   * upstream may have taken on)
   */
  progress?: { attempts: number, sent: boolean } | undefined
  /**
   * how much longer the client will wait for its answer, when it says so (plugins/proxy.ts clientWaitMs): a
   * deadline shorter than the call's own replaces it; SPENT_WAIT_MS or less, the call is not sent
   */
  clientWaitMs?: number | undefined
  /**
   * a streamed retrieve (`GET /v1/responses/{id}?stream=true`, as plugins/responses.ts read it): its events come
   * as the model goes on with the response, and may pause as long as a generation's
   */
  streamsModel?: boolean | undefined
}

export interface UpstreamAnswer {
  statusCode: number
  headers: IncomingHttpHeaders
  body: Readable
  /** index of the line that answered */
  line: number
  /** its host (and port), as in upstream.baseUrls */
  host: string
  attempts: number
  /** from the call's start to the answer's headers */
  ms: number
}

export type FailureKind = 'unavailable' | 'timeout' | 'aborted'

/**
 * What is left of a client's stated wait once it is spent (its body, the gateway's checks or an owner lookup took
 * it): nothing could be answered in it.
 */
export const SPENT_WAIT_MS = 1

/** A call that got no answer to pass on. The message is for the operational log, never for a client. */
export class UpstreamFailure extends Error {
  constructor (
    readonly kind: FailureKind, message: string, readonly attempts: number, readonly line: number | null,
    /** every line was down: when the first gets its trial call again */
    readonly retryAfterMs?: number,
    /** the last attempt's request had a connection: the upstream may have it, and be working on it */
    readonly sent = false
  ) {
    super(message)
    this.name = 'UpstreamFailure'
    this.stack = `${this.name}: ${message}` // where in the gateway it was noticed says nothing; the message does
  }

  /**
   * No line was tried: every one is being skipped (the log said when each was, and will say when one is restored:
   * a line per call refused so would flood it for as long as the outage lasts), or the client's stated wait was
   * spent before the call could be sent (SPENT_WAIT_MS). Nothing failed upstream for this call. (Not a call given a
   * line that waited for a free pooled connection there until its deadline: no attempt either, but its log line
   * says no connection was free.)
   */
  get untried (): boolean {
    return this.attempts === 0 && this.line === null && (this.kind === 'unavailable' || this.kind === 'timeout')
  }
}

/**
 * An answer not whole within the line's own deadline after its headers (readBody): the line took the call and did
 * not answer it, as one silent past bodyTimeoutMs (bookTheBody).
 */
class AnswerTooSlow extends UpstreamFailure {}

/**
 * For the client of a call that failed because every line is down: when to try again (whole seconds, ≥ 1), and not
 * to let the SDK wait that long itself when it is longer than a minute (a cooldownMs of minutes).
 */
export function retryHeaders (failure: UpstreamFailure): Record<string, string> | undefined {
  if (failure.retryAfterMs === undefined) return undefined
  return retryAfter(failure.retryAfterMs)
}

/** localhost, 127.0.0.0/8 and ::1 (a URL's hostname, IPv6 in brackets): traffic that never leaves the machine. */
function isLoopback (hostname: string): boolean {
  const host = hostname.replace(/^\[|\]$/g, '').toLowerCase()
  if (host === 'localhost' || host.endsWith('.localhost') || host === '::1') return true
  return isIP(host) === 4 && host.startsWith('127.')
}

/** Connection failures that happen before any byte of the request is written: safe to send elsewhere. */
const NOTHING_SENT = new Set([
  'ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'UND_ERR_CONNECT_TIMEOUT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'CERT_HAS_EXPIRED',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'ERR_TLS_CERT_ALTNAME_INVALID', 'CERT_NOT_YET_VALID', 'ERR_SSL_WRONG_VERSION_NUMBER'
])
const RESETS = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET', 'UND_ERR_CLOSED'])
/** This process (EMFILE) or the machine (ENFILE) out of file descriptors: a connect or a name lookup fails, whatever the line. */
const OUT_OF_DESCRIPTORS = new Set(['EMFILE', 'ENFILE'])
/**
 * This host out of ephemeral ports to connect from (a burst of short connections left in TIME_WAIT): its own
 * shortage too, but Linux keeps ports by destination, so another line may still be connected to.
 */
const OUT_OF_PORTS = 'EADDRNOTAVAIL'

const DESCRIPTIONS: Record<string, string> = {
  ECONNREFUSED: 'connection refused',
  EADDRNOTAVAIL: 'no local port free to connect from',
  ENOTFOUND: 'host not found',
  EAI_AGAIN: 'host not found',
  UND_ERR_CONNECT_TIMEOUT: 'connect timeout',
  UND_ERR_HEADERS_TIMEOUT: 'no response headers in time',
  ECONNRESET: 'connection reset',
  UND_ERR_SOCKET: 'connection closed by the upstream'
}

type AttemptFailure = 'nothing-sent' | 'reset' | 'timeout' | 'other'

function codeOf (err: unknown): string {
  const e = err as { code?: unknown, cause?: { code?: unknown } }
  return String(e.code ?? e.cause?.code ?? 'error')
}

function classify (err: unknown): AttemptFailure {
  const code = codeOf(err)
  if (code === 'UND_ERR_HEADERS_TIMEOUT') return 'timeout'
  if (NOTHING_SENT.has(code)) return 'nothing-sent'
  if (RESETS.has(code) || isNotHttp(err, code)) return 'reset'
  return 'other'
}

/**
 * What came back is no HTTP answer (undici's parser refused it: a line pointed at a TLS port, or another protocol's):
 * the request went out and nothing usable came of it, as when the connection is reset under it. So is a header
 * block no client may read: more than undici takes, or one the parser refused while it held a Content-Length (two
 * different ones, one beside chunked), which undici reports as a length mismatch. (Before the headers, as here:
 * the same mismatch in a body is its own, and breaks that body.)
 */
function isNotHttp (err: unknown, code: string): boolean {
  return code.startsWith('HPE_') || (err as Error | null)?.name === 'HTTPParserError' || UNREADABLE_HEAD.has(code)
}
const UNREADABLE_HEAD = new Set(['UND_ERR_HEADERS_OVERFLOW', 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH'])

const IDEMPOTENT = new Set(['GET', 'HEAD', 'DELETE'])

/**
 * Statuses that speak against the line rather than the call, and whether the call may have been done: a proxy in
 * front of the API (Cloudflare, or another CDN in front of a line) saying it could not get an answer. Cloudflare's
 * 521/522/523/525/526/530 say it never reached the origin (refused, connect timeout, unreachable, TLS, DNS): as a
 * connection refused, nothing was sent. 502/503/520 (an unusable answer from the origin) may come after the origin
 * got the call; 504/524 (the origin too slow) count only for a call that is not a generation, as our own deadline.
 */
const LINE_FAULT_STATUSES = new Map<number, 'nothing-sent' | 'reset' | 'timeout'>([
  [502, 'reset'], [503, 'reset'], [520, 'reset'],
  [521, 'nothing-sent'], [522, 'nothing-sent'], [523, 'nothing-sent'], [525, 'nothing-sent'], [526, 'nothing-sent'], [530, 'nothing-sent'],
  [504, 'timeout'], [524, 'timeout']
])

/**
 * Of those, the statuses that say the origin got the call and may be doing it still (504/524: too slow; 520: its
 * answer unusable), and a redirect that may point at a call's result (303, lineFault). Passed on for a POST with
 * `x-should-retry: false` (plugins/proxy.ts): the SDKs retry every 5xx, and would send a generation the origin is
 * running again, twice. (502/503 are left to them: an origin's own mostly says it did not take the call.)
 */
export const ORIGIN_MAY_HAVE_IT = new Set([303, 504, 520, 524])

/**
 * A redirect says the line is not where the config points (http:// sent on to https://, a moved host): an API
 * answers none of its calls so, and the gateway follows none (the token would go wherever it points). A line
 * fault, then, as a refusal is: a 3xx asks for the call to be made elsewhere, so nothing was done, but for 303
 * (See Other), which may point at the result of a call done.
 */
function lineFault (status: number): 'nothing-sent' | 'reset' | 'timeout' | undefined {
  if (isRedirect(status)) return status === 303 ? 'reset' : 'nothing-sent'
  return LINE_FAULT_STATUSES.get(status)
}

/** A 3xx: never passed on (plugins/proxy.ts answers 502), and a fault of the line (lineFault). */
export function isRedirect (status: number): boolean {
  return status >= 300 && status < 400
}

/**
 * undici takes an EventEmitter with an `aborted` flag as a request's signal, as well as an AbortSignal; this one
 * costs a fraction of an AbortController, and there is one per upstream call.
 */
class CallSignal extends EventEmitter {
  aborted = false
  abort (): void {
    if (this.aborted) return
    this.aborted = true
    this.emit('abort')
  }
}

/**
 * One attempt of a call, handed to undici as the request's `opaque`: whether the request got a connection and was
 * being written, or was still waiting for one (the pool's connections all taken, or its own being opened).
 */
class Attempt {
  sent = false
  /** `ordinal`: which attempt of its call this is, counted in the call's progress once it reaches its line */
  constructor (
    private readonly progress: UpstreamCall['progress'],
    private readonly ordinal: number,
    private readonly onSent?: () => void
  ) {}
  markSent (): void {
    this.sent = true
    if (this.progress !== undefined) {
      this.progress.sent = true
      this.progress.attempts = this.ordinal
    }
    this.onSent?.()
  }
}

/**
 * A line's pool, which marks each attempt's request as sent when undici puts it on a connection. undici's
 * request() hands its dispatch a handler of the callback interface (onConnect ... onComplete); with another shape
 * the moment cannot be seen, and the request counts as sent from the start: an unsent request taken for a sent one
 * is only not retried, a sent one taken for unsent would be sent again.
 */
class LinePool extends Pool {
  /**
   * The line's connections open now. undici's `stats.connected` says so too, but builds all six of its figures, each
   * a walk over every connection of the pool: read on every call, that was work growing with the connections held.
   */
  connected = 0

  constructor (origin: string, options: Pool.Options) {
    super(origin, options)
    this.on('connect', () => { this.connected++ }).on('disconnect', () => { this.connected-- })
  }

  override dispatch (opts: Dispatcher.DispatchOptions, handler: Dispatcher.DispatchHandler): boolean {
    const attempt = (opts as { opaque?: unknown }).opaque
    if (!(attempt instanceof Attempt)) return super.dispatch(opts, handler)
    if (handler.onConnect === undefined) {
      attempt.markSent()
      return super.dispatch(opts, handler)
    }
    return super.dispatch(opts, new MarksSent(handler, attempt))
  }
}

class MarksSent implements Dispatcher.DispatchHandler {
  readonly #handler: Dispatcher.DispatchHandler
  readonly #attempt: Attempt
  constructor (handler: Dispatcher.DispatchHandler, attempt: Attempt) {
    this.#handler = handler
    this.#attempt = attempt
  }

  onConnect (abort: (err?: Error) => void): void {
    this.#attempt.markSent()
    this.#handler.onConnect!(abort)
  }

  onResponseStarted (): void { this.#handler.onResponseStarted?.() }
  onHeaders (statusCode: number, headers: Buffer[], resume: () => void, statusText: string): boolean {
    return this.#handler.onHeaders!(statusCode, headers, resume, statusText)
  }

  onData (chunk: Buffer): boolean { return this.#handler.onData!(chunk) }
  onUpgrade (statusCode: number, headers: Buffer[] | string[] | null, socket: Duplex): void {
    this.#handler.onUpgrade?.(statusCode, headers, socket)
  }

  onComplete (trailers: string[] | null): void { this.#handler.onComplete!(trailers) }
  onError (err: Error): void { this.#handler.onError!(err) }
}

/** The transfer-codings HTTP registers (and the content-codings in use), which a message may name. */
const NAMED_CODINGS = new Set(['gzip', 'x-gzip', 'deflate', 'compress', 'x-compress', 'br', 'zstd', 'trailers'])

/**
 * A transfer-coding other than chunked (`Transfer-Encoding: gzip, chunked`): undici takes the chunks apart and
 * hands on the rest as it came, compressed bytes that no Content-Encoding names. Every check of an answer (the
 * token taken out, the owner key, each event of a stream, the usage charged) would read them as they are, and the
 * client would get them to gunzip: such an answer is not passed on, as one in a content-encoding the gateway
 * cannot decode is not (a line that answers so fails every call).
 */
class TransferCodingError extends Error {
  readonly code = 'ERR_UPSTREAM_TRANSFER_CODING'
  constructor (codings: string[]) {
    // (Only the codings HTTP registers are named: any other is the upstream's text, which may quote the token, and
    // this message is logged.)
    super(`an answer in transfer-coding ${codings.map(c => NAMED_CODINGS.has(c) ? c : '(another)').join(', ')} cannot be read`)
  }
}

/** The transfer-codings of an answer other than chunked (and identity), or null when it has none. */
function transferCodings (headers: IncomingHttpHeaders): string[] | null {
  const te = headers['transfer-encoding']
  if (te === undefined) return null
  const codings = String(te).split(',').map(c => c.trim().toLowerCase()).filter(c => c !== '' && c !== 'chunked' && c !== 'identity')
  return codings.length === 0 ? null : codings
}

/** The call was stopped (deadline, client gone) before its attempt had an answer. */
class Stopped extends Error {
  override name = 'Stopped'
}

function noop (): void {}

/**
 * The attempt's answer, or a rejection the moment the call is stopped. undici acts on an abort at once only for a
 * request on a connection; one still queued for a pooled connection (all taken by long streams, say) only has the
 * abort noted, and is ended when it gets a connection, before any byte of it is written (undici then closes that
 * connection). So the call does not wait for that: it ends here, and the request, once undici gets to it, is
 * swallowed; an answer that comes all the same is thrown away.
 */
function untilStopped (attempt: Promise<Dispatcher.ResponseData<Attempt>>, signal: CallSignal): Promise<Dispatcher.ResponseData<Attempt>> {
  return new Promise((resolve, reject) => {
    const stop = () => { reject(new Stopped('the call was stopped')) }
    if (signal.aborted) stop()
    else signal.once('abort', stop)
    attempt.then(res => {
      signal.off('abort', stop)
      if (signal.aborted) res.body.on('error', noop).destroy()
      else resolve(res)
    }, (err: unknown) => {
      signal.off('abort', stop)
      reject(err)
    })
  })
}

interface Line {
  url: string
  /** the URL's host (and port) */
  host: string
  pool: LinePool
  /** the line's path prefix, without a trailing slash ('' for none) */
  prefix: string
}

/**
 * The pools of one set of lines. A reload that changes what they are built from makes new ones; the old ones are
 * retired: they take no new call, and close once the calls that started on them are done (their retries
 * included), then once their answers' bodies are read.
 */
interface Pools {
  lines: Line[]
  /** the text of upstream.caFile they trust, as read when they were built (undefined: none) */
  ca: string | undefined
  /** call()s under way on these pools, until each has its answer's headers or has failed */
  calls: number
  retired: boolean
}

/** What a call works with, taken once at its start: a reload never changes a call half-way. */
interface Settled {
  settings: UpstreamSettings
  health: LineHealth
  pools: Pools
}

/** What the pools are built from: a change in any of these needs new pools. */
const POOL_SETTINGS = ['baseUrls', 'connectTimeoutMs', 'timeoutMs', 'bodyTimeoutMs', 'maxConnections', 'caFile'] as const
/** What the lines' health is built from: with these unchanged, a reload keeps it as it is (else see LineHealth.takeOver). */
const HEALTH_SETTINGS = ['baseUrls', 'failureThreshold', 'cooldownMs'] as const

function sameSettings (a: UpstreamSettings, b: UpstreamSettings, keys: ReadonlyArray<keyof UpstreamSettings>): boolean {
  return keys.every(k => JSON.stringify(a[k]) === JSON.stringify(b[k]))
}

/** The CA file's text now (its path alone says nothing of a certificate renewed in place, as a mounted secret is). */
function readCa (settings: UpstreamSettings): string | undefined {
  return settings.caFile === undefined ? undefined : readRegularFile(settings.caFile).toString('utf8')
}

function newPools (settings: UpstreamSettings, caText = readCa(settings)): Pools {
  return { lines: buildLines(settings, caText), calls: 0, retired: false, ca: caText }
}

function buildLines (settings: UpstreamSettings, caText: string | undefined): Line[] {
  const ca = caText === undefined ? undefined : [...rootCertificates, caText]
  return settings.baseUrls.map(url => {
    const base = new URL(url)
    return {
      url,
      host: base.host,
      prefix: base.pathname.replace(/\/+$/, ''),
      // Certificates are always verified: reply-from would build its own agent with rejectUnauthorized: false.
      pool: new LinePool(base.origin, {
        connections: settings.maxConnections,
        headersTimeout: settings.timeoutMs,
        bodyTimeout: settings.bodyTimeoutMs,
        connect: { timeout: settings.connectTimeoutMs, rejectUnauthorized: true, ...(ca === undefined ? {} : { ca }) }
      })
    }
  })
}

export class Upstream {
  #current: Settled
  /** retired pools not closed yet */
  readonly #retired = new Set<Pools>()
  readonly #log: FastifyBaseLogger
  /** bytes of the answers being read whole (readWhole), all calls together */
  readonly #held = new HeldBytes(MAX_HELD_WHOLE_BYTES)
  /** the one log of the upstream refusing the token, for the proxy's calls and the ownership lookups alike */
  readonly refusedToken = new RefusedTokenLog()
  #destroyed = false

  constructor (settings: UpstreamSettings, log: FastifyBaseLogger) {
    this.#log = log
    this.#current = { settings, health: this.#health(settings), pools: newPools(settings) }
    this.#warnCleartext(settings)
  }

  /**
   * Plain http:// is allowed (a fake or sidecar upstream on this machine, a TLS-terminating proxy beside the
   * gateway), but beyond loopback the token would cross the network in clear: most likely a typo for https.
   */
  #warnCleartext (settings: UpstreamSettings): void {
    settings.baseUrls.forEach((url, line) => {
      const { protocol, host, hostname } = new URL(url)
      if (protocol !== 'http:' || isLoopback(hostname)) return
      this.#log.warn({ line, url: `http://${host}` },
        `upstream line ${line} (http://${host}) is plain HTTP: the OhMyGPT token is sent unencrypted on every call (use https://)`)
    })
  }

  /** The lines' health under `settings`, keeping what `previous` knew of each line still there (LineHealth.takeOver). */
  #health (settings: UpstreamSettings, previous?: LineHealth): LineHealth {
    const health = new LineHealth(settings.baseUrls, {
      failureThreshold: settings.failureThreshold,
      cooldownMs: settings.cooldownMs,
      onChange: (status, previous) => { this.#logChange(status, previous) }
    })
    if (previous !== undefined) health.takeOver(previous)
    return health
  }

  /**
   * New settings (a config reload), for the calls that start from now on. Calls under way finish on the lines
   * they started on: nothing in flight fails. New pools are built only when what they are built from changed
   * (lines, timeouts, pool size, CA file or its contents); each line still there keeps its health (which lines are
   * skipped, their failures), wherever it now is in the list. Throws (and changes nothing) when the new pools cannot
   * be built (an unreadable caFile).
   */
  update (settings: UpstreamSettings): void {
    const old = this.#current
    const caText = readCa(settings)
    const health = sameSettings(old.settings, settings, HEALTH_SETTINGS) ? old.health : this.#health(settings, old.health)
    if (sameSettings(old.settings, settings, POOL_SETTINGS) && caText === old.pools.ca) {
      this.#current = { settings, health, pools: old.pools }
      return
    }
    this.#current = { settings, health, pools: newPools(settings, caText) }
    if (!sameSettings(old.settings, settings, ['baseUrls'])) this.#warnCleartext(settings)
    old.pools.retired = true
    this.#retired.add(old.pools)
    if (old.pools.calls === 0) void this.#closeRetired(old.pools)
  }

  async #closeRetired (pools: Pools): Promise<void> {
    try {
      await Promise.all(pools.lines.map(l => l.pool.close()))
    } catch (err) {
      if (!this.#destroyed) this.#log.warn({ err }, 'closing the previous upstream connections failed')
    } finally {
      this.#retired.delete(pools)
    }
  }

  /** Whether the CA file of `settings` no longer holds what the pools in use were built to trust. */
  caChanged (settings: UpstreamSettings): boolean {
    return settings.caFile !== undefined && settings.caFile === this.#current.settings.caFile &&
      readCa(settings) !== this.#current.pools.ca
  }

  statuses (): LineStatus[] {
    return this.#current.health.statuses()
  }

  /** upstream.timeoutMs now in force: also how long an answer read whole may take after its headers (readWhole). */
  get timeoutMs (): number {
    return this.#current.settings.timeoutMs
  }

  /**
   * An answer's whole body: at most MAX_WHOLE_BYTES, whole within timeoutMs of its headers (generationTimeoutMs for
   * a generation's: an upstream may send its headers before the model is done), and counted against one bound
   * shared by every answer being read whole (readBody).
   */
  readWhole (body: Readable, generation = false, clientWaitMs = Infinity): Promise<Buffer> {
    const settings = this.#current.settings
    const ownMs = generation ? settings.generationTimeoutMs : settings.timeoutMs
    return readBody(body, MAX_WHOLE_BYTES, Math.min(ownMs, clientWaitMs), this.#held, clientWaitMs >= ownMs)
  }

  /** At least one line is up, or due for its trial call. */
  get available (): boolean {
    return this.#current.health.statuses().some(s => s.state === 'up' || (s.state === 'down' && s.retryInMs === 0))
  }

  async call (call: UpstreamCall): Promise<UpstreamAnswer> {
    const settled = this.#current
    const pools = settled.pools
    pools.calls++
    try {
      return await this.#call(settled, call)
    } finally {
      if (--pools.calls === 0 && pools.retired) void this.#closeRetired(pools)
    }
  }

  async #call ({ settings, health, pools }: Settled, call: UpstreamCall): Promise<UpstreamAnswer> {
    const started = performance.now()
    // One signal per call, raised by whichever comes first: the deadline or the client leaving.
    const signal = new CallSignal()
    let stoppedBy: 'deadline' | 'client' | null = null
    // A generation waits on the model (a non-streamed one gets its headers only when the model is done, a streamed
    // one may go quiet while it reasons): its own deadline, for the headers and for each silence in the body.
    const generation = waitsOnTheModel(call)
    const ownMs = generation ? settings.generationTimeoutMs : settings.timeoutMs
    // A client that will give up sooner (and whose SDK would then send the call again) gets the 504 before it does.
    const clientCut = call.clientWaitMs !== undefined && call.clientWaitMs < ownMs
    const deadlineMs = clientCut ? call.clientWaitMs! : ownMs
    // A client whose wait is already spent gets its 504 without the call being sent: sent, it would only be cut at
    // once, and a generation would run upstream, billed, for no one (and its 504 would tell the SDK not to retry).
    if (clientCut && deadlineMs <= SPENT_WAIT_MS) {
      throw new UpstreamFailure('timeout', 'the client\'s stated wait was spent before the call could be sent', 0, null)
    }
    // (A streamed retrieve of a response the model is still working on gets its headers at once, then may go
    // quiet as long as a streamed create.)
    const modelStream = generation || call.streamsModel === true
    const timer = setTimeout(() => { stoppedBy ??= 'deadline'; signal.abort() }, deadlineMs)
    call.whenClientGone?.(() => { stoppedBy ??= 'client'; signal.abort() })
    const tried = new Set<number>()
    let index = health.pick(tried, IDEMPOTENT.has(call.method))
    try {
      if (index === null) throw new UpstreamFailure('unavailable', 'every upstream line is down; not trying', 0, null, health.soonestRetryMs())
      for (;;) {
        tried.add(index)
        const line = pools.lines[index]!
        if (call.progress !== undefined) {
          // Counted as finalFailure counts it, for a record written before the call settles (its client gone): once
          // its request gets a connection (markSent), or at once when the line has none, which is opened for it; not
          // while it waits for a pooled connection another call holds, which the line never sees.
          call.progress.attempts = line.pool.connected === 0 ? tried.size : tried.size - 1
          call.progress.sent = false
        }
        let answer: UpstreamAnswer
        // (index was picked in this tick: a line on trial has this call as its trial, and the ticket is this call's)
        const onLine = index
        const ticket = health.ticket(index)
        const attempt = new Attempt(call.progress, tried.size, generation && health.onTrial(index) ? () => { health.trialConnected(onLine, ticket) } : undefined)
        const request = line.pool.request({
          path: line.prefix + call.path, method: call.method as 'GET', headers: call.headers, body: call.body, signal, opaque: attempt,
          ...(modelStream ? { headersTimeout: deadlineMs, bodyTimeout: settings.generationTimeoutMs } : {})
        })
        try {
          const res = await untilStopped(request, signal)
          answer = { statusCode: res.statusCode, headers: res.headers, body: res.body, line: index, host: line.host, attempts: tried.size, ms: 0 }
          const codings = transferCodings(res.headers)
          if (codings !== null) {
            res.body.on('error', noop).destroy()
            throw new TransferCodingError(codings)
          }
        } catch (err) {
          const stopped = stoppedBy === 'client' ? 'the client hung up' : this.#destroyed ? 'aborted at the end of the shutdown grace' : null
          const end: AttemptEnd = {
            stopped, deadlinePassed: stoppedBy === 'deadline', clientDeadline: clientCut, sent: attempt.sent,
            // (read now: the pool is still trying to open the connection this attempt waited for)
            unconnected: !attempt.sent && line.pool.connected === 0
          }
          const failure = attemptFailed(health, call, index, ticket, err, end)
          // Stopped while its line's connection was being opened (the client gone, or its shorter wait over): how that
          // connection attempt ends still speaks of the line, once it does (refused, or past connectTimeoutMs). Else
          // a line that takes no connections, called only by clients with short waits, would never be skipped.
          if (err instanceof Stopped && !attempt.sent && !this.#destroyed && !(end.unconnected && end.deadlinePassed && !end.clientDeadline)) {
            request.catch((late: unknown) => { if (!attempt.sent && NOTHING_SENT.has(codeOf(late))) health.failed(onLine, ticket) })
          }
          const next = failure === null ? null : retryLine(settings, health, call, tried, failure)
          if (failure === null || next === null) throw finalFailure(settings, deadlineMs, index, tried.size, err, end)
          this.#log.warn({ line: index, code: codeOf(err), retryOn: next }, `upstream line ${index} failed (${describe(err)}); retrying on line ${next}`)
          index = next
          continue
        }
        const fault = lineFault(answer.statusCode)
        if (fault === 'timeout' && generation) {
          // A generation that outlived a proxy's deadline says nothing of the line, as one that outlives ours: no
          // failure, and no answer that would restore a skipped line or clear its count (attemptFailed).
          health.released(index, ticket)
        } else if (fault !== undefined) {
          health.failed(index, ticket)
          const next = retryLine(settings, health, call, tried, fault === 'timeout' ? 'reset' : fault)
          if (next !== null) {
            answer.body.on('error', () => {}).destroy() // thrown away: its abort is no one's error
            this.#log.warn({ line: index, status: answer.statusCode, retryOn: next }, `upstream line ${index} answered ${answer.statusCode}; retrying on line ${next}`)
            index = next
            continue
          }
        } else {
          health.answered(index, ticket)
          bookTheBody(health, index, ticket, answer.body, !modelStream)
        }
        answer.ms = Math.round(performance.now() - started)
        return answer
      }
    } finally {
      clearTimeout(timer)
    }
  }

  #logChange (status: LineStatus, previous: LineState): void {
    const fields = { line: status.index, url: status.url, state: status.state, previous }
    if (status.state === 'down' && previous === 'half-open' && status.retryInMs === 0) {
      // (LineHealth.released: the trial's client left, or its wait was cut short; the line is not skipped again)
      this.#log.info(fields, `upstream line ${status.index} trial call ended without a verdict; the next call is its trial`)
    } else if (status.state === 'down') {
      this.#log.warn({ ...fields, failures: status.failures, retryInMs: status.retryInMs }, `upstream line ${status.index} skipped for ${status.retryInMs} ms after ${status.failures} failures in a row`)
    } else if (status.state === 'up') {
      this.#log.info(fields, `upstream line ${status.index} restored`)
    } else {
      this.#log.info(fields, `upstream line ${status.index} on trial`)
    }
  }

  #pools (): Pool[] {
    return [this.#current.pools, ...this.#retired].flatMap(p => p.lines.map(line => line.pool))
  }

  /** Closes every pool once its in-flight calls are done (and does nothing after destroy()). */
  async close (): Promise<void> {
    if (this.#destroyed) return
    await Promise.all(this.#pools().map(p => p.close()))
  }

  /** Aborts whatever is still in flight, on current and retired lines alike, and closes every pool. */
  async destroy (): Promise<void> {
    if (this.#destroyed) return
    this.#destroyed = true
    await Promise.all(this.#pools().map(p => p.destroy()))
  }
}

/**
 * A call whose time to its response headers is the model's, not the line's: creating a response (`POST
 * /v1/responses`) answers once the generation is done, or, streamed, once it starts. Every other routed call
 * (reads, deletes, items, cancel, ownership lookups) is answered in moments by a line that works.
 */
function waitsOnTheModel (call: UpstreamCall): boolean {
  return call.method === 'POST' && GENERATION.test(call.path)
}
const GENERATION = /^\/v1\/responses(?:\?|$)/

/** How an attempt without an answer ended. */
interface AttemptEnd {
  /** why the call was stopped (the client left, the gateway aborted it), or null */
  stopped: string | null
  /** the call's own deadline passed */
  deadlinePassed: boolean
  /** that deadline was the client's (shorter than the line is given) */
  clientDeadline: boolean
  /** the request had a connection (see Attempt) */
  sent: boolean
  /** it had none, and the line had no connection at all: its wait was on one being opened, not on a busy pool */
  unconnected: boolean
}

/**
 * Books a failed attempt against its line, and says whether it may be retried (null: not). A call stopped by the
 * client or the gateway says nothing of the line, nor does one whose deadline passed while it waited for a
 * connection: a pool taken by long streams is the gateway's load, not the line failing (but a line with no
 * connection at all, its own being opened, is failing to take one). Nor does a generation
 * that outlives its deadline: a slow model is not a failing line, and counting it would let one long answer (and
 * its SDK's retries) take the line down for everyone. A quick call sent and given no response headers in time
 * does count: that is how a line that takes connections and never answers is found, but not against a deadline
 * the client set shorter. No timeout is retried: the upstream may be working on the call. Nor does a connection
 * this process could not open for want of file descriptors (a flood of client connections): counted, it would skip
 * the line for cooldownMs after the shortage is over (one line: every call 502, /readyz 503, with the line healthy);
 * no other line is tried either, which the same shortage refuses. A connect this host had no local port for
 * (EADDRNOTAVAIL) says nothing of the line either, for the same reason; nothing was sent, so another line is tried.
 */
function attemptFailed (health: LineHealth, call: UpstreamCall, index: number, ticket: Ticket, err: unknown, end: AttemptEnd): AttemptFailure | null {
  if (end.stopped !== null || OUT_OF_DESCRIPTORS.has(codeOf(err))) {
    health.released(index, ticket)
    return null
  }
  if (codeOf(err) === OUT_OF_PORTS) {
    health.released(index, ticket)
    return 'nothing-sent'
  }
  // A request that never had a connection (see Attempt) had nothing of it written, however its connection failed
  // (refused, or reset or closed during the TLS handshake): as safe to send elsewhere as a refusal.
  const failure = end.deadlinePassed ? 'timeout' : end.sent ? classify(err) : 'nothing-sent'
  // A line that could not be connected to within the call's own deadline (shorter than connectTimeoutMs: the
  // connection attempt never got to fail) is one that refuses connections, or it would never be skipped.
  if (failure === 'timeout' && end.unconnected && !end.clientDeadline) health.failed(index, ticket)
  else if (failure === 'timeout' && (!end.sent || waitsOnTheModel(call) || end.clientDeadline)) health.released(index, ticket)
  else health.failed(index, ticket)
  return failure === 'timeout' ? null : failure
}

/** Bodies whose reader had all of the answer before the line broke them off (answeredWhole). */
const wholeAnswers = new WeakSet<Readable>()

/**
 * Said by the reader of an answer's body that had all of the answer (a stream past its last event) when the body
 * broke: the line answered (a relay that drops each connection once the answer is done is not a failing line).
 * Said before the body's 'close' (in its 'error' listener), as bookTheBody decides then.
 */
export function answeredWhole (body: Readable): void {
  wholeAnswers.add(body)
}

/**
 * An answer's body decides for the line too: read to its end (or to the end of the answer: answeredWhole), the
 * line answered well; broken off by the line (a reset mid-body) it failed, as a reset before the headers would
 * have (else a line that cuts every answer short would never be skipped). So did a quick call's answer that went
 * silent past bodyTimeoutMs (undici's timer runs only while the gateway reads, never while a slow client holds it
 * back) or was not whole within the line's own deadline: a line that sends headers and then nothing is found as
 * one that sends no headers is (attemptFailed). A model's stream may pause as long as the model thinks, and says
 * nothing so. A body given up on by the gateway or its client says nothing of the line.
 */
function bookTheBody (health: LineHealth, index: number, ticket: Ticket, body: Readable, quick: boolean): void {
  body.once('close', () => {
    if (body.readableEnded || wholeAnswers.has(body)) {
      health.succeeded(index, ticket)
      return
    }
    const code = codeOf(body.errored)
    if (RESETS.has(code) || (quick && (code === 'UND_ERR_BODY_TIMEOUT' || body.errored instanceof AnswerTooSlow))) health.failed(index, ticket)
  })
}

/** The next line for a retry, or null when this failure may not be retried or nothing is left to try. */
function retryLine (settings: UpstreamSettings, health: LineHealth, call: UpstreamCall, tried: Set<number>, failure: AttemptFailure): number | null {
  if (tried.size > settings.retries) return null
  const safe = failure === 'nothing-sent' || (IDEMPOTENT.has(call.method) && failure === 'reset')
  return safe ? health.pick(tried, IDEMPOTENT.has(call.method)) : null
}

function finalFailure (settings: UpstreamSettings, deadlineMs: number, index: number, tried: number, err: unknown, end: AttemptEnd): UpstreamFailure {
  const where = `upstream line ${index}`
  // A last attempt stopped (its deadline, or its client gone) while it waited for a free pooled connection never went
  // upstream: the line did not see it (the pool is busy with the gateway's own load), and the audit's `attempts`
  // does not count it. One whose line had no connection at all was an attempt to reach that line, as a refused or
  // reset connection is.
  const waitedForPool = (end.deadlinePassed || end.stopped !== null) && !end.sent && !end.unconnected
  const attempts = waitedForPool ? tried - 1 : tried
  // aborted: there is no one to answer (plugins/proxy.ts sends nothing); the call is audited as aborted
  if (end.stopped !== null) return new UpstreamFailure('aborted', `${where}: ${end.stopped}`, attempts, index)
  if (end.deadlinePassed && end.unconnected) {
    return new UpstreamFailure('timeout', `${where}: no connection to it could be opened within ${deadlineMs} ms`, attempts, index)
  }
  if (end.deadlinePassed && !end.sent) {
    return new UpstreamFailure('timeout', `${where}: no connection free within ${deadlineMs} ms (all ${settings.maxConnections} of upstream.maxConnections busy, or one being opened)`, attempts, index)
  }
  if (end.deadlinePassed || codeOf(err) === 'UND_ERR_HEADERS_TIMEOUT') {
    return new UpstreamFailure('timeout', `${where}: no response headers within ${deadlineMs} ms`, attempts, index, undefined, end.sent)
  }
  return new UpstreamFailure('unavailable', `${where}: ${describe(err)}`, attempts, index, undefined, end.sent)
}

type LineState = LineStatus['state']

function describe (err: unknown): string {
  const code = codeOf(err)
  return `${DESCRIPTIONS[code] ?? (err as Error).message ?? 'error'} (${code})`
}

/**
 * Largest answer read whole (one the gateway rewrites before passing it on, an owner lookup); larger is an error.
 */
export const MAX_WHOLE_BYTES = 16 * 1024 * 1024
/**
 * Answers read whole, all calls together (rewrites and lookups): past this a call gets 502 rather than the heap
 * running out (eight 15 MiB answers at once took the gateway past 1.3 GiB). Four answers of the largest size; a
 * conversation object is a few hundred bytes, a response object rarely a few MiB.
 */
export const MAX_HELD_WHOLE_BYTES = 4 * MAX_WHOLE_BYTES

/**
 * Bytes of answers being read whole, across calls: each answer has its own bound (readBody's maxBytes), and this
 * bounds how many of them are held at once, which the number of calls in flight (maxInFlight) does not.
 */
export class HeldBytes {
  #held = 0
  constructor (readonly max: number) {}
  /** Takes `n` bytes more; false (nothing taken) when that would go past `max`. */
  take (n: number): boolean {
    if (this.#held + n > this.max) return false
    this.#held += n
    return true
  }

  give (n: number): void { this.#held -= n }
  get held (): number { return this.#held }
}

/**
 * Reads a whole answer body, up to `maxBytes`; a longer one is an error. With `deadlineMs`, so is one not whole
 * within it (an UpstreamFailure of kind 'timeout'; the body is then destroyed, with it when the deadline is the
 * line's own rather than a client's shorter wait: the line is then held to it, bookTheBody). bodyTimeoutMs bounds only the
 * silence between chunks: an answer that drips in would otherwise be read for hours, its client seeing nothing.
 * With `shared`, the bytes count against it while they are read, and an answer that would take it past its bound
 * is an error too.
 */
export function readBody (body: Readable, maxBytes: number, deadlineMs?: number, shared?: HeldBytes, linesDeadline = true): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let size = 0
    const timer = deadlineMs === undefined
      ? undefined
      : setTimeout(() => {
        const message = `upstream answer not whole within ${deadlineMs} ms of its headers`
        fail(linesDeadline ? new AnswerTooSlow('timeout', message, 0, null) : new UpstreamFailure('timeout', message, 0, null))
      }, deadlineMs)
    let settled = false
    const settle = () => {
      settled = true
      clearTimeout(timer)
      shared?.give(size)
    }
    const fail = (err: Error) => {
      if (settled) return // (undici's body, destroyed here, then emits an error of its own)
      settle()
      body.destroy(err instanceof AnswerTooSlow ? err : undefined)
      reject(err)
    }
    body.on('data', (chunk: Buffer) => {
      if (settled) return
      if (size + chunk.length > maxBytes) {
        fail(new Error(`upstream answer over ${maxBytes} bytes`))
        return
      }
      if (shared !== undefined && !shared.take(chunk.length)) {
        fail(new Error(`answers read whole at once over ${shared.max} bytes`))
        return
      }
      size += chunk.length
      chunks.push(chunk)
    })
    body.once('end', () => {
      if (settled) return // (given up on already: its bytes were given back then)
      settle()
      resolve(Buffer.concat(chunks, size))
    })
    body.once('error', (err: Error) => {
      // (a silence past bodyTimeoutMs is a timeout too, for a client that has seen nothing of the answer: 504)
      fail(codeOf(err) === 'UND_ERR_BODY_TIMEOUT' ? new UpstreamFailure('timeout', 'upstream answer silent for longer than bodyTimeoutMs', 0, null) : err)
    })
  })
}
