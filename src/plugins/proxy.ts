// The proxy: the routed operations (and nothing else, operations.ts) on @fastify/http-proxy, one registration per
// path shape.
// reply-from builds the request and streams the answer back; the call itself goes through upstream/client.ts
// (lines, failover, deadlines), handed to reply-from as its undici dispatcher. Headers are rebuilt from
// allow-lists both ways; the upstream token is set last, on a fresh object, so no client header can remove or
// replace it. reply-from's unsafe defaults are overridden on purpose: verified TLS (our pools), no 503 retries of
// its own, our own error mapping.
import { createHash } from 'node:crypto'
import type { IncomingHttpHeaders } from 'node:http'
import { PassThrough, pipeline, Readable, type Transform } from 'node:stream'
import httpProxy from '@fastify/http-proxy'
import type { FastifyHttpProxyOptions } from '@fastify/http-proxy'
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { MAX_TIMER_MS } from '../config.js'
import {
  cutShort, GatewayShuttingDownError, NOT_STREAMED_OTHER, NOT_STREAMED_RESPONSE, NOT_STREAMED_RETRIEVED, SDK_RETRY_WAIT_MS, UpstreamAuthError, UpstreamNotStreamedError,
  UpstreamTimeoutError, UpstreamUnavailableError
} from '../errors.js'
import { API_PREFIX, RESOURCES, type Action, type Operation } from '../operations.js'
import { SseRewriter } from '../responses/sse.js'
import { parseExact, stringifyExact } from '../http/json.js'
import { whenClosed } from '../http/response.js'
import { withoutKeys } from '../keys.js'
import { loggedError } from '../logging.js'
import {
  answeredWhole, HeldBytes, isRedirect, MAX_HELD_WHOLE_BYTES, MAX_WHOLE_BYTES, ORIGIN_MAY_HAVE_IT, readBody, retryHeaders, SPENT_WAIT_MS,
  UpstreamFailure, type Upstream
} from '../upstream/client.js'
import type { UpstreamProgress } from '../types.js'
import { decodedBody, FOREIGN_CHARSET, hasForeignCharset, isWideText, REDACTED, TokenScrubber, WIDE_TEXT } from '../upstream/scrub.js'

export interface ProxyOptions {
  upstream: Upstream
  /** the OhMyGPT token, read per call so that a reload can rotate it */
  apiKey: () => string
}

/**
 * The largest streamed event held until its end, as large as an answer read whole (upstream.readWhole): past it
 * the stream is ended with an error event.
 */
const MAX_EVENT_BYTES = MAX_WHOLE_BYTES

/** A reader of an answer passed on unchanged (observeAnswer), and the text the answer must hold for it to care. */
export interface AnswerReader {
  /** read only an answer whose bytes hold this (as the upstream writes it, unescaped): most hold nothing of interest */
  mentions: string
  read: (body: unknown) => void
}

/**
 * Adds a reader of a 2xx JSON answer the gateway passes on unchanged (a conversation's items listed): unlike a
 * rewrite, it does not make the gateway read the answer whole before passing it on. It sees the answer once whole,
 * before the client has its last bytes, if the answer mentions what it looks for (parsed only then: the hot path's
 * listings mention nothing); one longer than MAX_OBSERVED_BYTES, or that is not JSON, it does not see.
 */
export function observeAnswer (request: FastifyRequest, reader: AnswerReader): void {
  (request.observeAnswer ??= []).push(reader)
}

/** The readers of `request`'s answer that its bytes (or its text) concern. */
function readersOf (request: FastifyRequest, answer: Buffer | string): AnswerReader[] {
  return request.observeAnswer?.filter(reader => answer.includes(reader.mentions)) ?? []
}

/**
 * The most of an answer streamed past that is kept aside for its readers (observeAnswer), and of all such answers
 * at once: past either, the answer goes on unread by them (it is not held back for them).
 */
const MAX_OBSERVED_BYTES = 4 * 1024 * 1024
const MAX_OBSERVED_HELD = 4 * MAX_OBSERVED_BYTES
let observedHeld = 0

/** `bytes` to the answer's readers it concerns, when they are JSON. */
function observed (request: FastifyRequest, bytes: Buffer): void {
  if (request.observeAnswer === null) return
  const readers = readersOf(request, bytes)
  if (readers.length === 0) return
  let body: unknown
  try {
    body = JSON.parse(bytes.toString('utf8'))
  } catch {
    return
  }
  for (const reader of readers) reader.read(body)
}

/** The answer `stream` (being passed on) to its readers once it has ended, unless it went past MAX_OBSERVED_BYTES. */
function observeStreamed (request: FastifyRequest, stream: Readable): void {
  if (request.observeAnswer === null) return
  let chunks: Buffer[] | null = []
  let size = 0
  const release = () => {
    observedHeld -= size
    size = 0
    chunks = null
  }
  stream.on('data', (chunk: Buffer) => {
    if (chunks === null) return
    if (size + chunk.length > MAX_OBSERVED_BYTES || observedHeld + chunk.length > MAX_OBSERVED_HELD) {
      release()
      return
    }
    size += chunk.length
    observedHeld += chunk.length
    chunks.push(chunk)
  })
  stream.once('end', () => {
    const whole = chunks
    release()
    if (whole !== null) observed(request, Buffer.concat(whole))
  })
  stream.once('close', release)
}

/**
 * An upstream error answer is read whole, to take the token out of it (upstream/scrub.ts), within these bounds;
 * past either it could not be searched, and the client gets 502. Error answers are a few hundred bytes, sent at once.
 */
const MAX_ERROR_BYTES = 1024 * 1024
const ERROR_READ_MS = 5_000
/**
 * A 2xx answer the gateway passes on unchanged is still searched for the token. One of up to this many bytes (its
 * content-length; nearly every answer) is read whole and searched at once, and keeps its framing; a longer one,
 * or one of unknown length, is searched as it streams through (upstream/scrub.ts), and goes on chunked.
 */
const MAX_SEARCHED_WHOLE_BYTES = 64 * 1024

/**
 * The headers in which the official SDKs say how long they wait for an answer: the Node SDK its timeout in whole
 * seconds (rounded down), the Python SDK its read timeout in seconds (the wait for an answer's first byte).
 */
const CLIENT_TIMEOUT_HEADERS = ['x-stainless-timeout', 'x-stainless-read-timeout'] as const
/** The most the gateway's answer is sent ahead of the client's timeout, for what it cannot see of the client's wait. */
const CLIENT_MARGIN_MS = 1000

/**
 * How much longer (ms) the client will wait for its answer, `elapsedMs` after its call arrived, when it says so.
 * Both SDKs retry a call that outlives their timeout, a POST included: a generation would be started upstream again,
 * twice. Answered first by the gateway (504, x-should-retry: false for a POST), the SDK raises that and sends
 * nothing again. The answer goes a tenth of the timeout (at most CLIENT_MARGIN_MS) ahead of it: the client's clock
 * started before its call reached the gateway.
 */
export function clientWaitMs (headers: IncomingHttpHeaders, elapsedMs: number): number | undefined {
  let seconds = Infinity
  for (const name of CLIENT_TIMEOUT_HEADERS) {
    const value = headers[name]
    if (typeof value === 'string' && /^\d{1,9}(?:\.\d{1,20})?$/.test(value) && Number(value) > 0) seconds = Math.min(seconds, Number(value))
  }
  if (seconds === Infinity) return undefined
  const ms = seconds * 1000
  return Math.max(SPENT_WAIT_MS, ms - Math.min(CLIENT_MARGIN_MS, ms / 10) - elapsedMs)
}

/** OpenAI's error event, with the envelope of upstream_unavailable: how a Responses stream the gateway ends ends. */
function streamErrorEvent (message: string, code = 'upstream_unavailable'): Buffer {
  const error = { message, type: 'server_error', param: null, code }
  return Buffer.from(`event: error\ndata: ${JSON.stringify({ type: 'error', code: error.code, message, param: null, error })}\n\n`)
}
/** The upstream broke the stream off. */
const STREAM_BROKEN_EVENT = streamErrorEvent('The upstream API broke off the stream before the response was complete.')
/** An event the gateway does not pass on (a created response naming another owner): the stream ends there. */
const STREAM_REFUSED_EVENT = streamErrorEvent('The upstream API sent an event the gateway could not check; the stream was ended.')
/** The end of a shutdown's grace came before the stream's (app.abortInFlight). */
const STREAM_SHUTDOWN_EVENT = streamErrorEvent('The gateway is shutting down and its grace for calls in flight is over: the stream was ended before the response was complete.', 'gateway_shutting_down')

/**
 * Client headers the upstream gets; everything else (keys, cookies, x-forwarded-*, hop-by-hop) stays here. A gateway
 * key in one (an app that tags its calls with its credentials) is withheld: keys never leave the gateway.
 */
const FORWARDED_REQUEST_HEADERS = ['accept', 'user-agent', 'idempotency-key'] as const

/**
 * Upstream headers the client gets: the body's description, the upstream's request id and retry hints. Both SDKs
 * obey `x-should-retry` before anything else: without it they would send again a POST the upstream said not to.
 * Not `cache-control`: every answer is one client's, and an upstream's `public` or `s-maxage` would let a shared
 * cache in front of the gateway keep it and serve it to anyone asking for the same URL, past the key and
 * ownership checks (RFC 9111 §3.5). Without it, a shared cache does not store an answer to a call with Authorization.
 */
const RETURNED_RESPONSE_HEADERS = new Set([
  'content-type', 'content-length', 'content-encoding', 'etag', 'last-modified',
  'retry-after', 'retry-after-ms', 'x-should-retry', 'x-request-id', 'openai-processing-ms', 'openai-version'
])

/** The undici request options reply-from hands its dispatcher. */
interface DispatchOptions {
  method: string
  path: string
  headers: Record<string, string | undefined>
}

interface DispatchResult {
  statusCode: number
  headers: IncomingHttpHeaders
  body: Readable
}

interface UpstreamResponse {
  statusCode: number
  headers: IncomingHttpHeaders
  stream: Readable
}

/** Headers for any call the gateway makes upstream on behalf of `request`: `headers`, ours, then the token, last. */
export function gatewayHeaders (request: FastifyRequest, apiKey: string, headers: Record<string, string> = {}): Record<string, string> {
  headers['x-client-request-id'] = request.id
  headers.authorization = `Bearer ${apiKey}`
  return headers
}

/**
 * A name a client gives that the upstream keeps across its one account (an Idempotency-Key, an end user's
 * safety_identifier), made the client's own: a digest of the client id and the name, 64 hex characters (OpenAI's
 * most for an identifier). Two teams' same name is two names upstream; one team's is the same each time.
 */
export function clientScoped (clientId: string, name: string): string {
  return createHash('sha256').update(`${clientId}\n${name}`).digest('hex')
}

export function upstreamRequestHeaders (
  request: FastifyRequest, headers: IncomingHttpHeaders, apiKey: string
): Record<string, string> {
  const out: Record<string, string> = {}
  for (const name of FORWARDED_REQUEST_HEADERS) {
    const value = headers[name]
    if (typeof value === 'string') out[name] = withoutKeys(value)
  }
  const idempotencyKey = out['idempotency-key']
  // Made the client's own, a key never gets one team the answer an upstream replays of another's call; a client's own
  // retries still carry one key.
  if (idempotencyKey !== undefined) out['idempotency-key'] = clientScoped(request.client?.id ?? '', idempotencyKey)
  if (request.upstreamBody !== null) {
    // body.ts checked it is JSON whatever the client called it; say so plainly.
    out['content-type'] = 'application/json'
    out['content-length'] = String(request.upstreamBody.length)
  }
  return gatewayHeaders(request, apiKey, out)
}

/**
 * The headers an answer's Connection header names (beyond its own options, keep-alive and close): they are for the
 * hop between the upstream and the gateway, and an intermediary removes them before it passes the answer on
 * (RFC 9110 7.6.1). Null when it names none, as nearly every answer's does.
 */
function connectionListed (headers: IncomingHttpHeaders): Set<string> | null {
  const connection = headers.connection
  if (connection === undefined || connection === 'keep-alive' || connection === 'close') return null
  return new Set(String(connection).toLowerCase().split(',').map(name => name.trim()))
}

/**
 * The longest upstream header value passed on to the client (OpenAI's are a few dozen characters): past Node's and
 * undici's 16 KiB for a whole header block, the SDKs see a connection error and send the call again, a generation
 * made twice. A longer one is not passed on (of a request id, the client still has the gateway's own:
 * `x-gateway-request-id`, and `x-request-id` on an answer of the gateway's own).
 */
const MAX_RETURNED_HEADER_CHARS = 1024

// for...in over these header objects (undici's and Node's, plain objects of own keys): unlike Object.entries, it
// makes no array per header, and these run on every call.
export function clientResponseHeaders (headers: IncomingHttpHeaders, scrub: TokenScrubber): IncomingHttpHeaders {
  const out: IncomingHttpHeaders = {}
  const listed = connectionListed(headers)
  for (const name in headers) {
    const value = headers[name]
    if (value === undefined || !RETURNED_RESPONSE_HEADERS.has(name) || listed?.has(name) === true) continue
    const clean = scrub.header(value)
    // (a header the upstream wrote twice comes as a list, which goes out as its lines)
    if (clean !== undefined && (typeof clean === 'string' ? clean.length : clean.join(', ').length) <= MAX_RETURNED_HEADER_CHARS) out[name] = clean
  }
  // A wait over a minute (a 503 retry-after of an hour, a quota reset in an hour) is not to be slept through: the SDKs
  // would, as through the gateway's own (errors.ts, retryAfter). As the hints are passed on: one the Connection header
  // names is not, nor read.
  if ((out['retry-after'] !== undefined || out['retry-after-ms'] !== undefined) && (askedWaitMs(out) ?? 0) > SDK_RETRY_WAIT_MS) {
    out['x-should-retry'] = 'false'
  }
  return out
}

const RETRY_HINTS = ['retry-after', 'retry-after-ms', 'x-should-retry'] as const

/**
 * The retry hints of an upstream answer the gateway answers for itself (an owner lookup's 429), exactly as an answer
 * passed on carries them (clientResponseHeaders): a header written twice kept as its lines, searched for the token.
 */
export function retryHints (headers: IncomingHttpHeaders, scrub: TokenScrubber): Record<string, string | string[]> {
  const passedOn = clientResponseHeaders(headers, scrub)
  const out: Record<string, string | string[]> = {}
  for (const name of RETRY_HINTS) {
    const value = passedOn[name]
    if (value !== undefined) out[name] = value
  }
  return out
}

/** An upstream 429's rate-limit headers (its retry hints are passed on with the others, clientResponseHeaders). */
export function upstreamRateLimitHeaders (headers: IncomingHttpHeaders, scrub: TokenScrubber): Record<string, string> {
  const out: Record<string, string> = {}
  const listed = connectionListed(headers)
  for (const name in headers) {
    const value = headers[name]
    if (name.startsWith('x-ratelimit-') && typeof value === 'string' && value.length <= MAX_RETURNED_HEADER_CHARS && listed?.has(name) !== true) out[name] = scrub.header(value)
  }
  return out
}

/**
 * The wait an answer asks, as the Node SDK reads it: `retry-after-ms`, else `retry-after` in seconds or as a date.
 * A `retry-after-ms` of 0 it passes over for `retry-after`, as one that is no number; a header written twice it
 * reads as fetch gives it, its lines joined (`3600, 3600`: an hour).
 */
function askedWaitMs (headers: IncomingHttpHeaders): number | null {
  const ms = joined(headers['retry-after-ms'])
  const after = joined(headers['retry-after'])
  const millis = typeof ms === 'string' ? parseFloat(ms) : Number.NaN
  if (!Number.isNaN(millis) && millis !== 0) return millis
  if (typeof after !== 'string') return null
  const seconds = parseFloat(after)
  if (!Number.isNaN(seconds)) return seconds * 1000
  const date = Date.parse(after)
  return Number.isNaN(date) ? null : date - Date.now()
}

function joined (value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(', ') : value
}

function noop (): void {}

/**
 * How long an upstream's body is read past its stream's last event for its own end, and how much of it (a relay's
 * `data: [DONE]`), thrown away: the body ended, its connection goes back to the pool for the next call. OpenAI ends
 * right after the last event, but its end (the last chunk of the chunked body) often comes in a later read: destroyed
 * at the event, every streamed call would open a new connection (and TLS handshake) upstream. One held open longer
 * is let go of.
 */
const AFTER_LAST_EVENT_MS = 1000
const MAX_AFTER_LAST_EVENT_BYTES = 64 * 1024

/** `body` drained (see above) while in `draining`, which a closing gateway lets go of at once. */
function drainAfterLastEvent (body: Readable, draining: Set<Readable>): void {
  if (body.destroyed) return
  const release = () => { body.destroy() }
  const timer = setTimeout(release, AFTER_LAST_EVENT_MS).unref()
  draining.add(body)
  body.once('close', () => {
    clearTimeout(timer)
    draining.delete(body)
  })
  let bytes = 0
  body.on('error', noop).on('data', (chunk: Buffer) => {
    bytes += chunk.length
    if (bytes > MAX_AFTER_LAST_EVENT_BYTES) release()
  })
  // (unpiped, the body is paused: a 'data' listener alone would not start it)
  body.resume()
}

/** An answer's bytes read whole, with what the upstream said of them and nothing more. */
function sendBytes (reply: FastifyReply, status: number, body: Buffer): void {
  if (status !== 204 && status !== 304) reply.header('content-length', body.length)
  // Fastify labels a Buffer without a content-type application/octet-stream; a stream it leaves unlabelled.
  reply.send(reply.hasHeader('content-type') ? body : Readable.from([body]))
}

/** Whether an upstream error answer is OpenAI's envelope, `{"error": {...}}`, which the SDKs read. */
function isErrorEnvelope (value: unknown): boolean {
  const error = (value as { error?: unknown } | null | undefined)?.error
  return typeof error === 'object' && error !== null && !Array.isArray(error)
}

/** The envelope for an upstream error answer that was not one, with its status. */
function upstreamErrorEnvelope (status: number, said: string | null): Buffer {
  return Buffer.from(JSON.stringify({
    error: {
      message: said === null
        ? `The upstream API answered ${status} without an error the gateway could pass on.`
        : `The upstream API answered ${status}: ${said}`,
      type: status >= 500 ? 'server_error' : 'invalid_request_error',
      param: null,
      code: 'upstream_error'
    }
  }))
}

/**
 * What an error answer in another JSON shape than OpenAI's says, when it says it in a string (`{"error": "..."}`,
 * `{"message": "..."}`, `{"detail": "..."}`, as other OpenAI-compatible services answer): at most 500 characters.
 */
function errorText (value: unknown): string | null {
  if (value === null || typeof value !== 'object') return null
  const { error, message, detail } = value as Record<string, unknown>
  const text = [error, message, detail].find(v => typeof v === 'string' && v.trim() !== '') as string | undefined
  return text === undefined ? null : cutShort(text, 500)
}

/**
 * What a stream asked for and answered whole held, for its 502: the response a create made (to retrieve), the one a
 * retrieve read (to retrieve without stream), or none (an error body: the id of a retrieve's URL was not answered).
 */
function notStreamed (action: string | undefined, answer: unknown): string {
  const held = answer as { object?: unknown, id?: unknown } | null
  if (held?.object !== 'response' || typeof held.id !== 'string') return NOT_STREAMED_OTHER
  const id = cutShort(held.id, 200)
  return action === 'response.create' ? NOT_STREAMED_RESPONSE(id) : NOT_STREAMED_RETRIEVED(id)
}

/**
 * A POST the upstream has, and may have done (a generation, a conversation created, items added): it answered and
 * the gateway does not pass the answer on (broken off, unreadable, not what was expected), or it was sent and its
 * answer did not come in time or the connection broke. The client's 502 or 504 tells the SDKs, which retry every
 * 5xx, not to send it again (unless sending it again does no more: REPEATABLE_POSTS).
 */
function mayBeDoneUpstream (request: CalledFor, reply: { header: (name: string, value: string) => unknown }): void {
  if (request.method === 'POST' && !(request.operation !== null && REPEATABLE_POSTS.has(request.operation.action))) {
    reply.header('x-should-retry', 'false')
  }
}

/** What mayBeDoneUpstream reads of a request. */
interface CalledFor { method: string, operation: Operation | null }

/**
 * The POSTs that do no more sent twice than once: an update sets the metadata it is given. Their 502 or 504 is a
 * transient the SDKs retry, as they would one of OpenAI's.
 */
const REPEATABLE_POSTS: ReadonlySet<Action> = new Set<Action>(['conversation.update'])

/** The client went away before its answer was complete (its upstream call is aborted: clientGone). */
function clientLeft (reply: FastifyReply): boolean {
  return reply.raw.destroyed && !reply.raw.writableFinished
}

/**
 * What the client gets for an upstream answer that could not be read whole, or passed on before any of it went out:
 * 504 when it was too slow (past its deadline, or silent past bodyTimeoutMs: undici's own error for an answer
 * passed on as it streams), else 502.
 */
function readFailure (err: unknown): Error {
  const timedOut = (err instanceof UpstreamFailure && err.kind === 'timeout') || (err as { code?: unknown }).code === 'UND_ERR_BODY_TIMEOUT'
  return timedOut ? new UpstreamTimeoutError() : new UpstreamUnavailableError()
}

/** The shortest time between two of the gateway's keep-alive comments (waitWithTheClient). */
const KEEP_ALIVE_MIN_MS = 250

/**
 * A stream's headers go out to the client with its first bytes, and a client that says how long it waits
 * (clientWaitMs: the Node SDK for the headers, the Python SDK for each read) gives up after that and sends the call
 * again (both SDKs retry a timeout, a POST included): a model that thinks longer than that before its first event would
 * run upstream three times, where OpenAI, which answers at once, serves it. Until the upstream's first event has gone
 * out, the client gets a comment line (SseRewriter.keepAlive: its headers with the first) halfway through each of its
 * stated waits. It says nothing of the line; the stream's own deadline (generationTimeoutMs) still holds.
 */
function waitWithTheClient (request: FastifyRequest, reply: FastifyReply, events: SseRewriter): void {
  const waitMs = clientWaitMs(request.headers, reply.elapsedTime)
  if (waitMs === undefined) return
  // (at half of it: the comment costs nothing, and on a loaded machine one sent at its end came after it; a wait
  // longer than Node's timers count, which they would take for 1 ms, at their longest: a comment each millisecond;
  // and one of a few ms, which no generation can meet, at KEEP_ALIVE_MIN_MS at the shortest after the first: a comment
  // every few ms, up to generationTimeoutMs, would be some 1.8 MB and a write each 5 ms for one call)
  const period = Math.min(MAX_TIMER_MS, Math.max(KEEP_ALIVE_MIN_MS, clientWaitMs(request.headers, 0)! / 2))
  let timer: NodeJS.Timeout | null = null
  const tick = () => {
    if (!events.keepAlive()) return
    timer = setTimeout(tick, period)
  }
  timer = setTimeout(tick, Math.min(MAX_TIMER_MS, waitMs / 2))
  events.once('close', () => { if (timer !== null) clearTimeout(timer) })
}

/**
 * An upstream answer the gateway had to read whole and could not is not passed on: `answer` instead, logged, and
 * marked not to be sent again for a POST the upstream may have done. Nothing when the client has left: no one to
 * answer, and no fault of the upstream (its call is audited aborted).
 */
function notPassedOn (request: FastifyRequest, reply: FastifyReply, err: unknown, message: string, answer: Error): void {
  if (clientLeft(reply) || reply.sent) return
  request.log.warn({ err: loggedError(err) }, message)
  mayBeDoneUpstream(request, reply)
  reply.send(answer)
}

/**
 * An answer read whole came after its call was answered meanwhile, by a shutdown's grace ending (tellCallsInFlight):
 * it is not the client's any more, and no second answer is sent.
 */
function answeredMeanwhile (reply: FastifyReply): boolean {
  return reply.sent
}

/** The gateway's answer to an upstream call that failed (reply-from's onError, or the dispatcher's own). */
function answerFailure (reply: {
  header: (name: string, value: string) => unknown
  send: (answer: Error) => unknown
  request: CalledFor & { upstream: unknown }
}, error: unknown): void {
  const err = error as Error & { statusCode?: number, cause?: unknown }
  const failure = err.cause instanceof UpstreamFailure ? err.cause : err instanceof UpstreamFailure ? err : null
  const timedOut = failure?.kind === 'timeout' || err.statusCode === 504
  // Timed out or broken off after it was sent, or answered with what reply-from refuses (an invalid status): the
  // upstream may be doing it. One that every line refused, or that timed out still waiting for a pooled
  // connection (nothing sent either way), is safe to try again.
  const sent = failure !== null ? failure.sent : timedOut
  if (sent || reply.request.upstream !== null) mayBeDoneUpstream(reply.request, reply)
  const answer = timedOut ? new UpstreamTimeoutError() : new UpstreamUnavailableError()
  if (failure !== null) answer.headers = retryHeaders(failure) // every line down: when one is tried again
  reply.send(answer)
}

/** For an upstream call: `abort` runs when the client goes away before its answer is complete. */
export function clientGone (reply: FastifyReply): (abort: () => void) => void {
  return abort => { whenClosed(reply.raw, () => { if (!reply.raw.writableFinished) abort() }) }
}

/** Whether an answer's bytes are in a content-encoding (gzip, br...), not as they read. */
function isEncoded (headers: IncomingHttpHeaders): boolean {
  const coding = headers['content-encoding']
  return coding !== undefined && String(coding).split(',').some(c => !/^\s*(?:identity)?\s*$/i.test(c))
}

function isEventStream (headers: IncomingHttpHeaders): boolean {
  return /^text\/event-stream\b/i.test(String(headers['content-type'] ?? ''))
}

/**
 * Adds a step to how a 2xx JSON answer is rewritten before the client sees it (steps run in the order added). A
 * step returns the same object when it changes nothing, so an unchanged answer goes out as the upstream's bytes.
 */
export function addAnswerRewrite (request: FastifyRequest, step: (body: unknown) => unknown): void {
  const before = request.rewriteAnswer
  request.rewriteAnswer = before === null ? step : body => step(before(body))
}

/** The same for each event of a 2xx Server-Sent Events answer, checked one event at a time as the stream passes. */
export function addEventRewrite (request: FastifyRequest, step: (data: unknown) => unknown): void {
  const before = request.rewriteEvent
  request.rewriteEvent = before === null ? step : data => step(before(data))
}

/**
 * Answers sent whole smaller than this are not counted (most calls: a conversation object is a few hundred bytes, so
 * no map and no listener per call for them): limits.maxInFlight of them (1024 by default) hold 64 MiB at most.
 */
const UNCOUNTED_WHOLE_BYTES = 64 * 1024

/**
 * Answers sent whole (read whole to be rewritten or searched) stay in memory until their client has taken them: one
 * that reads slowly, or not at all for up to listen.sendTimeoutMs and for ever a little at a time, holds each of its
 * answers that long, after the bound on answers being read (upstream/client.ts HeldBytes) has let them go. Held so,
 * they count against their client's own bound, MAX_HELD_WHOLE_BYTES, until their response closes: past it, the
 * client's next such answer is not passed on. A client cannot run the gateway out of memory with answers it does not
 * read (before, each of its retrieves left unread was held, up to limits.maxInFlight of them: sixteen of 15 MiB took
 * the gateway to 565 MiB), nor make other clients' answers wait on its own.
 */
class WaitingForClients {
  readonly #held = new Map<string, HeldBytes>()

  /** Counts `bytes` against `clientId` until `response` closes; false (nothing counted) past its bound. */
  take (clientId: string, response: FastifyReply['raw'], bytes: number): boolean {
    let held = this.#held.get(clientId)
    if (held === undefined) {
      held = new HeldBytes(MAX_HELD_WHOLE_BYTES)
      this.#held.set(clientId, held)
    }
    if (!held.take(bytes)) return false
    const taken = held
    whenClosed(response, () => {
      taken.give(bytes)
      if (taken.held === 0 && this.#held.get(clientId) === taken) this.#held.delete(clientId)
    })
    return true
  }
}

export default fp<ProxyOptions>(async function proxy (app, opts) {
  const { upstream } = opts
  const waiting = new WaitingForClients()
  /**
   * `body`, an answer sent whole, counted against its client's bound until the client has it (WaitingForClients);
   * false, with the client answered 502, when that bound is spent.
   */
  const heldForClient = (request: FastifyRequest, reply: FastifyReply, body: Buffer): boolean => {
    if (body.length < UNCOUNTED_WHOLE_BYTES || waiting.take(request.client?.id ?? '', reply.raw, body.length)) return true
    notPassedOn(request, reply, new Error(`answers waiting for this client to take them over ${MAX_HELD_WHOLE_BYTES} bytes`),
      'upstream answer not passed on: the client has not taken the answers it was sent', new UpstreamUnavailableError())
    return false
  }
  const scrub = new TokenScrubber(opts.apiKey)
  /** An upstream header's value as the log may keep it: the upstream's text, which may quote the token, cut short. */
  const loggedHeader = (value: string | string[] | undefined): string | null => {
    if (value === undefined) return null
    const clean = scrub.header(value)
    return clean === undefined ? REDACTED : String(clean).slice(0, 256)
  }
  // The event streams being passed on: at the end of a shutdown's grace each is ended with an error event that
  // says why (the SDKs raise it as an APIError, not a bare "terminated"), before its connection is closed
  // (app.abortInFlight). One a slow client has not read up to yet goes with what is unread before it.
  const liveStreams = new Set<SseRewriter>()
  /** upstream bodies read on past their stream's last event: a closing gateway does not wait on them */
  const draining = new Set<Readable>()
  app.addHook('preClose', done => {
    for (const body of draining) body.destroy()
    done()
  })
  // The POSTs at the upstream, until their answer goes out (an event stream's: until it is passed on, liveStreams) or
  // their client leaves: at the end of a shutdown's grace, one among them that went out and whose answer has not
  // begun to reach its client (not come, or being read whole) is answered (GatewayShuttingDownError, not to be sent
  // again) before its connection is closed.
  // Cut without a word, it is a connection error to the SDKs, which send it again (to another replica): a generation
  // made twice. A GET cut so is safe to send again, as it is (none is kept here: no listener per call for it).
  const atUpstream = new Set<FastifyReply>()
  app.decorate('tellCallsInFlight', () => {
    let told = false
    for (const events of liveStreams) told = events.cut(STREAM_SHUTDOWN_EVENT) || told
    liveStreams.clear()
    for (const reply of atUpstream) {
      if (reply.request.upstreamCall?.sent !== true || reply.raw.headersSent) continue
      mayBeDoneUpstream(reply.request, reply)
      reply.send(new GatewayShuttingDownError())
      told = true
    }
    atUpstream.clear()
    return told
  })
  app.decorateRequest('upstream', null)
  app.decorateRequest('upstreamCall', null)
  app.decorateRequest('rewriteAnswer', null)
  app.decorateRequest('rewriteEvent', null)
  app.decorateRequest('observeAnswer', null)

  // Our route handler hands the call to reply.from, which calls its dispatcher in the same tick: the request
  // travels from one to the other under its own id, which also goes upstream as x-client-request-id.
  const pending = new Map<string, FastifyReply>()
  const dispatcher = {
    request (options: DispatchOptions, callback: (err: Error | null, res?: DispatchResult) => void): void {
      const id = options.headers['x-client-request-id'] ?? ''
      const reply = pending.get(id)
      pending.delete(id)
      if (reply === undefined) {
        callback(new Error('proxy: no request for this upstream call'))
        return
      }
      const request = reply.request
      // The client left while earlier checks were being answered: nothing to ask the upstream, no one to answer
      // (its audit record was written when it left, with no attempt of its own: an owner lookup's, if one answered).
      if (reply.raw.destroyed) return
      const headers: Record<string, string> = {}
      for (const name in options.headers) {
        const value = options.headers[name]
        if (value !== undefined) headers[name] = value
      }
      // Set before the call, and counted as it goes: a call cut short (the client gone) is audited with the
      // attempts it made.
      const progress: UpstreamProgress = { line: null, host: null, attempts: 0, sent: false }
      request.upstreamCall = progress
      if (request.method === 'POST') {
        atUpstream.add(reply)
        whenClosed(reply.raw, () => { atUpstream.delete(reply) })
      }
      upstream.call({
        method: options.method,
        path: options.path,
        headers,
        body: request.upstreamBody,
        whenClientGone: clientGone(reply),
        progress,
        clientWaitMs: clientWaitMs(request.headers, reply.elapsedTime),
        streamsModel: request.responseFacts?.stream === true && request.operation?.action === 'response.retrieve'
      }).then(answer => {
        progress.line = answer.line
        progress.host = answer.host
        // reply-from destroys the answer of a request aborted meanwhile without listening for its error.
        answer.body.on('error', noop)
        request.upstream = {
          status: answer.statusCode,
          ms: answer.ms,
          // (cut short for the audit record: an upstream's id is a few dozen characters, a hostile one 16 KiB)
          requestId: typeof answer.headers['x-request-id'] === 'string' ? scrub.header(answer.headers['x-request-id']).slice(0, 256) : null
        }
        callback(null, { statusCode: answer.statusCode, headers: answer.headers, body: answer.body })
      }, (err: unknown) => {
        if (err instanceof UpstreamFailure) {
          progress.attempts = err.attempts
          // The client is gone: nothing is left to answer, and a hang-up is not an upstream failure to log
          // (reply-from would log every error it is given). Its audit record was written when it left.
          if (err.kind === 'aborted') return
          // Answered as reply-from would, without the line it writes for every error it is given.
          if (err.untried) {
            answerFailure(reply, err)
            return
          }
        }
        callback(err as Error)
      })
    }
  }

  async function sendRewritten (request: FastifyRequest, reply: FastifyReply, res: UpstreamResponse,
    rewrite: (body: unknown) => unknown): Promise<void> {
    let raw: Buffer
    try {
      raw = await upstream.readWhole(res.stream, request.operation?.action === 'response.create', clientWaitMs(request.headers, reply.elapsedTime))
    } catch (err) {
      notPassedOn(request, reply, err, 'upstream answer could not be read', readFailure(err))
      return
    }
    if (answeredMeanwhile(reply)) return
    const came = raw
    let parsed: unknown
    let rewritten: unknown
    try {
      // Compressed all the same (the gateway asks for no encoding): decoded, as an answer passed on is, to be read.
      if (isEncoded(res.headers)) raw = decodedBody(raw, res.headers['content-encoding'], MAX_WHOLE_BYTES)
      raw = scrub.bytes(raw)
      parsed = parseExact(raw.toString('utf8'))
      rewritten = rewrite(parsed)
      if (request.observeAnswer !== null) for (const reader of readersOf(request, raw)) reader.read(rewritten)
    } catch (err) {
      // An answer the gateway cannot check is not passed on: fail closed.
      request.log.warn({ err: loggedError(err) }, 'upstream answer is not what was expected')
      mayBeDoneUpstream(request, reply)
      reply.send(new UpstreamUnavailableError())
      return
    }
    // Nothing to take out: the upstream's bytes, as they came. Otherwise its numbers as they came (http/json.ts).
    // Written anew, it is sent as one Buffer (a string would be measured for its length, then encoded again as it
    // is written: about 30 ms of a 15 MiB answer), in UTF-8, which its type says.
    const body = rewritten === parsed ? raw : Buffer.from(stringifyExact(rewritten, parsed))
    // A stream asked for and answered whole: read for its usage and owner as any answer, but not passed on as JSON,
    // which the SDKs would take for a stream without events, the generation lost without a word. Any such stream: a
    // background generation's (its client would not even learn the id of the response it started), a retrieve's.
    const facts = request.responseFacts
    if (facts?.stream === true) {
      request.log.warn({ responseId: facts.responseId }, 'the upstream answered a streamed request whole, not as events')
      reply.send(new UpstreamNotStreamedError(notStreamed(request.operation?.action, parsed)))
      return
    }
    if (!heldForClient(request, reply, body)) return
    reply.removeHeader('content-encoding')
    if (body !== came) reply.removeHeader('etag') // it named the upstream's bytes, not these
    reply.header('content-length', body.length).type(body === raw ? 'application/json' : 'application/json; charset=utf-8').send(body)
  }

  /**
   * An answer passed on as it streams, searched for the token (`searched`). Its headers go to the client with its
   * first bytes: one that fails before any went out (the upstream broke off, or its text cannot be searched) is
   * answered as an answer read whole is (notPassedOn: 502, not sent again for a POST the upstream has done), not
   * with the 500 Fastify gives a stream that fails; one that fails later is broken off. Either side failing or
   * closing ends the other: the client leaving releases the upstream.
   */
  function sendStreamed (request: FastifyRequest, reply: FastifyReply, res: UpstreamResponse, searched: Transform): void {
    // (Fastify answers the error the stream it sends fails with: that one is the gateway's, not the upstream's.)
    const out = new PassThrough()
    pipeline(res.stream, searched, (err) => {
      if (err == null) return
      if (reply.raw.headersSent || clientLeft(reply)) {
        out.destroy(err)
        return
      }
      request.log.warn({ err: loggedError(err) }, 'upstream answer could not be read')
      mayBeDoneUpstream(request, reply)
      out.destroy(readFailure(err))
    })
    // (what the client gets, the token taken out: an id noted for it is one it can pass back; piped already: no
    // chunk goes past unread)
    observeStreamed(request, searched)
    searched.pipe(out)
    out.once('close', () => { searched.destroy() })
    reply.send(out)
  }

  /** A 2xx answer passed on as the upstream's bytes, but for the upstream token (upstream/scrub.ts). */
  async function sendSearched (request: FastifyRequest, reply: FastifyReply, res: UpstreamResponse): Promise<void> {
    const length = Number(res.headers['content-length'] ?? NaN)
    const encoded = isEncoded(res.headers)
    if (res.statusCode === 204) {
      reply.send(res.stream) // no body
      return
    }
    // A POST's answer (items added) is read whole however long: one the upstream breaks off after its status is then
    // a 502 that says not to send the call again. Passed on, it would break under the client, and the Python SDK
    // sends again a call whose answer broke mid-body, as it does one that lost its connection.
    const whole = encoded || request.method === 'POST'
    if (!whole && !(length <= MAX_SEARCHED_WHOLE_BYTES)) {
      const searched = scrub.stream()
      if (searched === null) {
        reply.send(res.stream)
        return
      }
      reply.removeHeader('content-length')
      sendStreamed(request, reply, res, searched)
      return
    }
    let raw: Buffer
    let decoded: Buffer
    try {
      // Compressed all the same (the gateway asks for no encoding): it can only be searched once decoded, whole.
      raw = whole ? await upstream.readWhole(res.stream) : await readBody(res.stream, MAX_SEARCHED_WHOLE_BYTES, upstream.timeoutMs)
      decoded = encoded ? decodedBody(raw, res.headers['content-encoding'], MAX_WHOLE_BYTES) : raw
      if (isWideText(decoded)) throw new Error(WIDE_TEXT)
    } catch (err) {
      // An answer that cannot be searched is not passed on: fail closed.
      notPassedOn(request, reply, err, 'upstream answer could not be read', readFailure(err))
      return
    }
    if (answeredMeanwhile(reply)) return
    // Searched as bytes, with any JSON escapes in the token's place (scrub.ts): not parsed, however long or deep.
    const scrubbed = scrub.bytes(decoded)
    observed(request, scrubbed) // (what the client gets, as for one streamed)
    // Nothing to take out: the upstream's bytes, as they came.
    if (scrubbed === decoded) {
      if (heldForClient(request, reply, raw)) reply.send(raw)
      return
    }
    if (!heldForClient(request, reply, scrubbed)) return
    reply.removeHeader('content-encoding')
    reply.removeHeader('etag') // it named the upstream's bytes, not these
    reply.header('content-length', scrubbed.length).send(scrubbed)
  }

  /** An error answer, read whole so that the upstream token can be taken out of it (upstream/scrub.ts). */
  async function sendError (request: FastifyRequest, reply: FastifyReply, res: UpstreamResponse): Promise<void> {
    let raw: Buffer
    let decoded: Buffer
    try {
      raw = await readBody(res.stream, MAX_ERROR_BYTES, ERROR_READ_MS)
      decoded = decodedBody(raw, res.headers['content-encoding'], MAX_ERROR_BYTES)
    } catch (err) {
      // An answer that cannot be searched is not passed on: fail closed.
      notPassedOn(request, reply, err, 'upstream error answer could not be read', new UpstreamUnavailableError())
      return
    }
    if (answeredMeanwhile(reply)) return
    // The SDKs raise this error with its x-request-id as the request id: the upstream's when it gave one, else
    // the gateway's, which the audit record holds (as for every error of the gateway's own, app.ts).
    if (!reply.hasHeader('x-request-id')) reply.header('x-request-id', request.id)
    const scrubbed = scrub.bytes(decoded)
    let parsed: unknown
    try {
      parsed = JSON.parse(scrubbed.toString('utf8'))
    } catch {
      parsed = undefined
    }
    // Its bytes were searched, and read, as UTF-8: labelled another charset (UTF-7), the Python SDK, which decodes
    // an error's text by it, could read the token in them. The gateway's envelope says it in UTF-8.
    const foreign = hasForeignCharset(res.headers['content-type'])
    if (foreign || !isErrorEnvelope(parsed)) {
      // A CDN's HTML page, an empty body: the SDKs would make the page their error's message, with no error
      // object. The client gets OpenAI's envelope with the upstream's status, the operators the facts.
      request.log.warn({ upstreamStatus: res.statusCode, contentType: loggedHeader(res.headers['content-type']), bytes: decoded.length },
        foreign ? 'upstream error answer names a charset other than UTF-8; answered with the gateway\'s envelope' : 'upstream error answer is not OpenAI\'s error envelope; answered with the gateway\'s')
      reply.removeHeader('content-encoding')
      reply.type('application/json; charset=utf-8')
      const said = errorText(parsed)
      sendBytes(reply, res.statusCode, upstreamErrorEnvelope(res.statusCode, said === null ? null : scrub.text(said)))
      return
    }
    // Nothing to take out: the upstream's bytes, as they came.
    if (scrubbed === decoded) {
      sendBytes(reply, res.statusCode, raw)
      return
    }
    reply.removeHeader('content-encoding')
    sendBytes(reply, res.statusCode, scrubbed)
  }

  /**
   * Content-Type is a single field: an answer with two different ones could be either (JSON or an HTML page), and
   * Fastify would label its bytes application/octet-stream, which no SDK reads. Not passed on (fail closed, as an
   * answer that cannot be read): false when it was refused. The same type twice is passed on, once.
   */
  function oneContentType (request: FastifyRequest, reply: FastifyReply, res: UpstreamResponse): boolean {
    const types = res.headers['content-type']
    if (!Array.isArray(types)) return true
    if (new Set(types.map(type => type.trim().toLowerCase())).size === 1) {
      // (the upstream's line, which may quote the token, as every header passed on)
      reply.header('content-type', scrub.header(types[0]!))
      return true
    }
    res.stream.on('error', noop).destroy()
    request.log.warn({ upstreamStatus: res.statusCode, contentTypes: loggedHeader(types) },
      'upstream answer has more than one content-type: not passed on')
    mayBeDoneUpstream(request, reply)
    reply.send(new UpstreamUnavailableError())
    return false
  }

  // reply-from's hook types are wider than our server (HTTP/2 too); this gateway serves HTTP/1.1 only.
  const replyOptions: NonNullable<FastifyHttpProxyOptions['replyOptions']> = {
    rewriteRequestHeaders (req, headers) {
      return upstreamRequestHeaders(req as FastifyRequest, headers as IncomingHttpHeaders, scrub.token())
    },
    rewriteHeaders (headers) {
      return clientResponseHeaders(headers as IncomingHttpHeaders, scrub)
    },
    onResponse (req, rep, raw) {
      const request = req as FastifyRequest
      const reply = rep as FastifyReply
      const res = raw as unknown as UpstreamResponse
      // reply-from calls this even after it answered 502 for an invalid upstream status.
      if (reply.sent) {
        res.stream.on('error', () => {}).destroy() // thrown away: its abort is no one's error
        return
      }
      if (!oneContentType(request, reply, res)) return
      // The shared account's limit: the client gets the upstream's own rate-limit headers, which say when to
      // retry, and not ours (plugins/rate-limit.ts leaves this answer alone).
      if (res.statusCode === 429) reply.headers(upstreamRateLimitHeaders(res.headers, scrub))
      const ok = res.statusCode >= 200 && res.statusCode < 300
      // Its bytes are searched as UTF-8: in another charset (UTF-7), a client could read the token in them. (A 204
      // has none: refused, a deletion the upstream did would look failed.)
      if (ok && res.statusCode !== 204 && hasForeignCharset(res.headers['content-type'])) {
        res.stream.on('error', noop).destroy()
        notPassedOn(request, reply, new Error(FOREIGN_CHARSET), 'upstream answer could not be read', new UpstreamUnavailableError())
        return
      }
      const rewriteEvent = request.rewriteEvent
      if (ok && rewriteEvent !== null && isEventStream(res.headers)) {
        // Events are read as they come, as text: compressed (the gateway asks for no encoding; an upstream may
        // compress all the same), none would be found, and every byte would pass unchecked. Fail closed, as an
        // answer read whole does.
        if (isEncoded(res.headers)) {
          res.stream.on('error', noop).destroy()
          request.log.warn({ contentEncoding: loggedHeader(res.headers['content-encoding']) }, 'upstream event stream is compressed: not passed on unchecked')
          mayBeDoneUpstream(request, reply)
          reply.send(new UpstreamUnavailableError())
          return
        }
        reply.removeHeader('content-length')
        /** the stream's last event has passed: the upstream's body is drained for its own end, not destroyed */
        let afterLast = false
        const events = new SseRewriter((data, text) => {
          try {
            // Searched string by string only when its text may hold the token: as written, or spelled with escapes
            // (every event of a burst is checked here: a walk of each costs more than its parse).
            return rewriteEvent(text.includes('\\') || scrub.text(text) !== text ? scrub.json(data) : data)
          } catch (err) {
            // As for an answer read whole: an event the gateway cannot check is not passed on (fail closed).
            request.log.warn({ err: loggedError(err) }, 'upstream event is not what was expected')
            throw err
          }
        }, STREAM_REFUSED_EVENT, MAX_EVENT_BYTES, upstream.timeoutMs,
        // Lines a JSON rewrite does not reach (a comment, an event's name or id, data in plain text or not an
        // object) can quote the token too.
        event => scrub.bytes(event),
        // A generation's stream that the upstream ends, cleanly, before its last event (a relay that lost its own
        // upstream and returned): told as a break, or the SDKs would take the text so far for the whole answer.
        () => request.responseFacts?.mustEnd === true && !request.responseFacts.ended ? STREAM_BROKEN_EVENT : null,
        // A connection that breaks once the last event has passed (a relay dropping it when the answer seems done)
        // took nothing from the client.
        () => request.responseFacts?.ended === true,
        // Once that last event has passed, the answer is whole: the client's stream ends there, as OpenAI's does,
        // and the upstream is let go of, whether or not it holds its connection open after it (the SDKs would
        // wait on it, up to generationTimeoutMs, before handing the client a response it already has).
        () => {
          res.stream.unpipe(events)
          answeredWhole(res.stream)
          afterLast = true
          drainAfterLastEvent(res.stream, draining)
          events.end()
        })
        // An upstream that breaks off mid-stream: the client is told in its own stream, by an error event that
        // the SDKs raise as their APIError (a bare "terminated" otherwise), written at an event boundary (the
        // rewriter passes whole events only), after the events that came before the break; then its answer is
        // broken off too, never ended cleanly as if whole.
        res.stream.once('error', (err: Error) => {
          // Its last event passed already: the line gave the whole answer (a break still queued behind a slow
          // client is told by the rewriter alone).
          if (request.responseFacts?.ended === true) answeredWhole(res.stream)
          // Nothing of it has gone out (its headers go with its first bytes): answered as any answer that fails
          // before any of it went out is, 504 for a silence past its deadline, else 502, not as a 200 whose only
          // event is the error (Fastify answers the error the stream it sends fails with).
          if (!reply.raw.headersSent && events.readableLength === 0 && !clientLeft(reply)) {
            request.log.warn({ err: loggedError(err) }, 'upstream answer could not be read')
            mayBeDoneUpstream(request, reply)
            events.destroy(readFailure(err))
            return
          }
          // What the upstream sent before the break and the gateway had not passed on yet (its reads outran its passing
          // on: a slice of events at a time, or a client slower than the burst) waits in the upstream's stream, which
          // its client (undici) destroys with the break: read here, it goes out before the event saying why.
          if (!events.writableEnded) {
            res.stream.unpipe(events)
            // (until the rewriter ends: the last event may be among them)
            for (let held = res.stream.read() as Buffer | null; held !== null && !events.writableEnded; held = res.stream.read() as Buffer | null) events.write(held)
          }
          events.breakOff(STREAM_BROKEN_EVENT, err)
        })
        waitWithTheClient(request, reply, events)
        // A client that leaves (or an event that cannot be passed on) releases the upstream.
        events.once('close', () => {
          liveStreams.delete(events)
          // (past its last event, the upstream's body is let go of by drainAfterLastEvent)
          if (!afterLast) res.stream.destroy()
        })
        liveStreams.add(events)
        atUpstream.delete(reply) // (told by its stream's error event from now on)
        res.stream.pipe(events)
        reply.send(events)
        return
      }
      // The upstream refused the gateway's token: not the client's key, whatever the upstream's answer says (an
      // AuthenticationError in the SDK would blame the team's own key; OpenAI's message quotes part of the token).
      if (res.statusCode === 401) {
        res.stream.on('error', noop).destroy()
        upstream.refusedToken.refused(request.log, opts.apiKey())
        reply.send(new UpstreamAuthError())
        return
      }
      // (unless the upstream said otherwise itself)
      if (ORIGIN_MAY_HAVE_IT.has(res.statusCode) && !reply.hasHeader('x-should-retry')) mayBeDoneUpstream(request, reply)
      // A line that redirects (retried on another line already, when there was one): the client cannot follow it
      // (its location names the upstream, and would get the client's key), nor would the gateway (the token).
      if (isRedirect(res.statusCode)) {
        res.stream.on('error', noop).destroy()
        const location = typeof res.headers.location === 'string' ? loggedHeader(res.headers.location) : null
        request.log.warn({ upstreamStatus: res.statusCode, location }, 'the upstream answered with a redirect: check upstream.baseUrls')
        reply.send(new UpstreamUnavailableError())
        return
      }
      if (!ok) {
        void sendError(request, reply, res)
        return
      }
      // Whatever its content-type says: an answer that must be rewritten is read as JSON or not passed on.
      const rewrite = request.rewriteAnswer
      if (rewrite !== null) {
        void sendRewritten(request, reply, res, rewrite)
        return
      }
      void sendSearched(request, reply, res)
    },
    onError (reply, { error }) {
      // (answered already: a POST at the end of a shutdown's grace, tellCallsInFlight, whose upstream call is then cut)
      if ((reply as FastifyReply).sent) return
      // reply-from has logged the failure already ("response errored"): once is enough.
      answerFailure(reply, error)
    },
    // reply-from retries a GET that got a 503 ten times by default (maxRetriesOn503: 0 does not turn it off)
    // and would read Retry-After seconds as milliseconds. Retries across lines are upstream/client.ts's.
    retryDelay: () => null
  }

  for (const resource of RESOURCES) {
    await app.register(httpProxy, {
      // reply-from wants an origin to build URLs with; the dispatcher picks the line and its path prefix.
      upstream: 'http://upstream.invalid',
      prefix: API_PREFIX,
      rewritePrefix: API_PREFIX,
      routes: [resource.route],
      httpMethods: Object.keys(resource.methods),
      proxyPayloads: false,
      websocket: false,
      undici: dispatcher as unknown as FastifyHttpProxyOptions['undici'],
      disableRequestLogging: true,
      replyOptions,
      handler (request, reply, dest, options) {
        pending.set(request.id, reply)
        try {
          return reply.from(dest, options)
        } finally {
          pending.delete(request.id) // taken by the dispatcher already, unless reply.from failed before it
        }
      }
    })
  }
}, { name: 'proxy', dependencies: ['body', 'ownership'] })
