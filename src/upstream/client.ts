// Calls to OhMyGPT across its lines: which line, how long, and whether a failed attempt may be sent again.
// - One undici Pool per line (verified TLS, `connectTimeoutMs`, `maxConnections`, `bodyTimeoutMs` between chunks).
// - A call's deadline for response headers (`timeoutMs`) runs from the moment it is handed over: the wait for a
//   pooled connection and every retry count inside it.
// - Retries never duplicate work: GET and DELETE may go to the next line after a connection failure, a connect
//   timeout or a 502/503; a POST only when its connection failed before any byte of it was sent. At most
//   `retries` extra attempts, each on another line. A 429 is never retried, and with one line, or once the
//   retries are spent, the upstream's answer passes through as it is.
// - A client that hangs up aborts the call at once (its `signal`), closing the upstream connection.
// Both the proxy (as reply-from's undici dispatcher) and the ownership lookups call through here.
import { readFileSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import type { Readable } from 'node:stream'
import { rootCertificates } from 'node:tls'
import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyBaseLogger } from 'fastify'
import { Pool } from 'undici'
import { LineHealth, type LineStatus } from './lines.js'

export interface UpstreamSettings {
  baseUrls: readonly string[]
  connectTimeoutMs: number
  timeoutMs: number
  bodyTimeoutMs: number
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
  /** aborted when the client hangs up */
  signal?: AbortSignal | undefined
}

export interface UpstreamAnswer {
  statusCode: number
  headers: IncomingHttpHeaders
  body: Readable
  /** index of the line that answered */
  line: number
  attempts: number
  /** from the call's start to the answer's headers */
  ms: number
}

export type FailureKind = 'unavailable' | 'timeout' | 'aborted'

/** A call that got no answer to pass on. The message is for the operational log, never for a client. */
export class UpstreamFailure extends Error {
  constructor (
    readonly kind: FailureKind, message: string, readonly attempts: number, readonly line: number | null
  ) {
    super(message)
    this.name = 'UpstreamFailure'
    this.stack = `${this.name}: ${message}` // where in the gateway it was noticed says nothing; the message does
  }
}

/** Connection failures that happen before any byte of the request is written: safe to send elsewhere. */
const NOTHING_SENT = new Set([
  'ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'UND_ERR_CONNECT_TIMEOUT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'CERT_HAS_EXPIRED',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'ERR_TLS_CERT_ALTNAME_INVALID', 'CERT_NOT_YET_VALID', 'ERR_SSL_WRONG_VERSION_NUMBER'
])
const RESETS = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET', 'UND_ERR_CLOSED'])

const DESCRIPTIONS: Record<string, string> = {
  ECONNREFUSED: 'connection refused',
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

function classify (code: string): AttemptFailure {
  if (code === 'UND_ERR_HEADERS_TIMEOUT') return 'timeout'
  if (NOTHING_SENT.has(code)) return 'nothing-sent'
  if (RESETS.has(code)) return 'reset'
  return 'other'
}

const IDEMPOTENT = new Set(['GET', 'HEAD', 'DELETE'])

interface Line {
  url: string
  pool: Pool
  /** the line's path prefix, without a trailing slash ('' for none) */
  prefix: string
}

export class Upstream {
  readonly #settings: UpstreamSettings
  readonly #lines: Line[]
  readonly #health: LineHealth
  readonly #log: FastifyBaseLogger

  constructor (settings: UpstreamSettings, log: FastifyBaseLogger) {
    this.#settings = settings
    this.#log = log
    const ca = settings.caFile === undefined ? undefined : [...rootCertificates, readFileSync(settings.caFile, 'utf8')]
    this.#lines = settings.baseUrls.map(url => {
      const base = new URL(url)
      return {
        url,
        prefix: base.pathname.replace(/\/+$/, ''),
        // Certificates are always verified: reply-from would build its own agent with rejectUnauthorized: false.
        pool: new Pool(base.origin, {
          connections: settings.maxConnections,
          headersTimeout: settings.timeoutMs,
          bodyTimeout: settings.bodyTimeoutMs,
          connect: { timeout: settings.connectTimeoutMs, rejectUnauthorized: true, ...(ca === undefined ? {} : { ca }) }
        })
      }
    })
    this.#health = new LineHealth(settings.baseUrls, {
      failureThreshold: settings.failureThreshold,
      cooldownMs: settings.cooldownMs,
      onChange: (status, previous) => { this.#logChange(status, previous) }
    })
  }

  statuses (): LineStatus[] {
    return this.#health.statuses()
  }

  /** At least one line is up, or due for its trial call. */
  get available (): boolean {
    return this.#health.statuses().some(s => s.state === 'up' || (s.state === 'down' && s.retryInMs === 0))
  }

  async call (call: UpstreamCall): Promise<UpstreamAnswer> {
    const started = performance.now()
    const deadline = new AbortController()
    const timer = setTimeout(() => { deadline.abort() }, this.#settings.timeoutMs)
    const signal = call.signal === undefined ? deadline.signal : AbortSignal.any([deadline.signal, call.signal])
    const tried = new Set<number>()
    let index = this.#health.pick(tried)
    try {
      if (index === null) throw new UpstreamFailure('unavailable', 'every upstream line is down; not trying', 0, null)
      for (;;) {
        tried.add(index)
        const line = this.#lines[index]!
        let answer: UpstreamAnswer
        try {
          const res = await line.pool.request({
            path: line.prefix + call.path, method: call.method as 'GET', headers: call.headers, body: call.body, signal
          })
          answer = { statusCode: res.statusCode, headers: res.headers, body: res.body, line: index, attempts: tried.size, ms: 0 }
        } catch (err) {
          const failure = this.#attemptFailed(call, index, tried.size, err, deadline.signal.aborted)
          const next = failure === null ? null : this.#retryLine(call, tried, failure)
          if (failure === null || next === null) throw this.#finalFailure(call, index, tried.size, err, deadline.signal.aborted)
          this.#log.warn({ line: index, code: codeOf(err), retryOn: next }, `upstream line ${index} failed (${describe(err)}); retrying on line ${next}`)
          index = next
          continue
        }
        if (answer.statusCode === 502 || answer.statusCode === 503) {
          this.#health.failed(index)
          const next = IDEMPOTENT.has(call.method) ? this.#retryLine(call, tried, 'reset') : null
          if (next !== null) {
            answer.body.on('error', () => {}).destroy() // thrown away: its abort is no one's error
            this.#log.warn({ line: index, status: answer.statusCode, retryOn: next }, `upstream line ${index} answered ${answer.statusCode}; retrying on line ${next}`)
            index = next
            continue
          }
        } else {
          this.#health.succeeded(index)
        }
        answer.ms = Math.round(performance.now() - started)
        return answer
      }
    } finally {
      clearTimeout(timer)
    }
  }

  /**
   * Books a failed attempt against its line; null when the failure says nothing of the line (the client left, or
   * the call's own deadline passed).
   */
  #attemptFailed (call: UpstreamCall, index: number, attempts: number, err: unknown, deadlinePassed: boolean): AttemptFailure | null {
    if (call.signal?.aborted === true) {
      this.#health.released(index)
      return null
    }
    this.#health.failed(index)
    if (deadlinePassed) return null
    void attempts
    return classify(codeOf(err))
  }

  /** The next line for a retry, or null when this failure may not be retried or nothing is left to try. */
  #retryLine (call: UpstreamCall, tried: Set<number>, failure: AttemptFailure): number | null {
    if (tried.size > this.#settings.retries) return null
    const safe = failure === 'nothing-sent' || (IDEMPOTENT.has(call.method) && failure === 'reset')
    return safe ? this.#health.pick(tried) : null
  }

  #finalFailure (call: UpstreamCall, index: number, attempts: number, err: unknown, deadlinePassed: boolean): UpstreamFailure {
    const where = `upstream line ${index}`
    if (call.signal?.aborted === true) return new UpstreamFailure('aborted', `${where}: the client hung up`, attempts, index)
    if (deadlinePassed || codeOf(err) === 'UND_ERR_HEADERS_TIMEOUT') {
      return new UpstreamFailure('timeout', `${where}: no response headers within ${this.#settings.timeoutMs} ms`, attempts, index)
    }
    return new UpstreamFailure('unavailable', `${where}: ${describe(err)}`, attempts, index)
  }

  #logChange (status: LineStatus, previous: LineState): void {
    const fields = { line: status.index, url: status.url, state: status.state, previous }
    if (status.state === 'down') {
      this.#log.warn({ ...fields, failures: status.failures, retryInMs: status.retryInMs }, `upstream line ${status.index} skipped for ${status.retryInMs} ms after ${status.failures} failures in a row`)
    } else if (status.state === 'up') {
      this.#log.info(fields, `upstream line ${status.index} restored`)
    } else {
      this.#log.info(fields, `upstream line ${status.index} on trial`)
    }
  }

  /** Closes every pool once its in-flight calls are done. */
  async close (): Promise<void> {
    await Promise.all(this.#lines.map(l => l.pool.close()))
  }

  /** Aborts whatever is still in flight and closes every pool. */
  async destroy (): Promise<void> {
    await Promise.all(this.#lines.map(l => l.pool.destroy()))
  }
}

type LineState = LineStatus['state']

function describe (err: unknown): string {
  const code = codeOf(err)
  return `${DESCRIPTIONS[code] ?? (err as Error).message ?? 'error'} (${code})`
}

/** Reads a whole answer body, up to `maxBytes`; a longer one is an error. */
export async function readBody (body: Readable, maxBytes: number): Promise<Buffer> {
  const chunks: Buffer[] = []
  let size = 0
  for await (const chunk of body) {
    size += (chunk as Buffer).length
    if (size > maxBytes) {
      body.destroy()
      throw new Error(`upstream answer over ${maxBytes} bytes`)
    }
    chunks.push(chunk as Buffer)
  }
  return Buffer.concat(chunks)
}
