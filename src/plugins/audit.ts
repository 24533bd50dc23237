// One JSON line per API call, written when the response closes: that event comes exactly once for every
// response, finished or not, so denied, failed and aborted calls are recorded as surely as served ones
// (Fastify's onResponse is skipped for a client that hangs up mid-stream; onRequestAbort only fires before the
// response). The record holds the fields listed in the README and nothing else: no keys, tokens or bodies.
import type { ServerResponse } from 'node:http'
import { performance } from 'node:perf_hooks'
import { Readable } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { AuditWriter } from '../audit/writer.js'
import { AuditUnavailableError, type ErrorOutcome } from '../errors.js'
import { withoutKeys } from '../keys.js'
import { ID_PATTERN, MAX_ID_LENGTH, matchOperation, rawPath, streamsRetrieve, type Action, type Operation } from '../operations.js'
import { conversationParam } from '../ownership/owners.js'
import { isCounting, whenClosed } from '../http/response.js'
import { outputTokens, failureOutcome } from '../responses/usage.js'
import { clientIp } from '../http/address.js'

/**
 * Every outcome a record can have, as the README's record table lists them: a gateway-made answer's (ErrorOutcome),
 * or the upstream answered (`ok`, its own 429, its 5xx), or the client left. `audit query --outcome` takes only these.
 * (An ErrorOutcome missing here fails to compile where a refusal's outcome becomes the record's.)
 */
export const OUTCOMES = ['ok', 'upstream_rate_limited', 'upstream_error', 'denied', 'rate_limited', 'invalid', 'unavailable', 'aborted', 'error'] as const
export type Outcome = (typeof OUTCOMES)[number]

/** The status recorded for a call whose client hung up before any status was sent (nginx's convention). */
export const CLIENT_CLOSED_REQUEST = 499

export interface AuditRecord {
  time: string
  requestId: string
  clientId: string | null
  /** which of the client's keys was presented (null for the single-key form) */
  keyId: string | null
  action: Action | 'unknown'
  method: string
  path: string
  conversationId: string | null
  /** the client that owns the conversation, when known */
  ownerId: string | null
  itemId: string | null
  /** Responses calls: the response, the model, whether it streamed, and the tokens its answer reported */
  responseId: string | null
  /** response.create: the previous response it continues (for a refused call: the one it was refused) */
  previousResponseId: string | null
  model: string | null
  stream: boolean | null
  inputTokens: number | null
  outputTokens: number | null
  status: number
  outcome: Outcome
  durationMs: number
  upstreamMs: number | null
  upstreamRequestId: string | null
  /** host (and port) of the line that answered */
  upstreamHost: string | null
  /** index in upstream.baseUrls of the line that answered */
  upstreamLine: number | null
  /** upstream attempts the call took (0 when it never went upstream) */
  attempts: number
  bytesIn: number
  bytesOut: number
  ip: string
  userAgent: string | null
  /** the chain's fields: undefined until the writer seals the record (see buildRecord) */
  seq: number | undefined
  prevHash: string | undefined
}

export interface AuditOptions {
  writer: AuditWriter
  /** what API calls get while the writer is unavailable: 503 audit_unavailable ("closed") or served ("open") */
  onFailure: 'closed' | 'open'
}

/** Sees each record as it is handed to the writer (metrics): called once per audited call, never throws. */
export type AuditObserver = (record: AuditRecord) => void

export interface ResponseWatch {
  start: number
  /** the client's address, read while its connection is open (a record made after a hang-up could not) */
  ip: string
  upstreamStreamFailed: boolean
}

/**
 * Node found the request malformed after it was handed over (a bad chunk in the body): the gateway answered
 * on the socket itself, so the response never finishes through Fastify.
 */
export function markMalformed (res: ServerResponse, status: number, bodyBytes: number): void {
  if (!isCounting(res)) return
  res.rawStatus = status
  res.bodyBytes = bodyBytes
}

function rawStatus (res: ServerResponse): number {
  return isCounting(res) ? res.rawStatus : 0
}

function outcomeOf (request: FastifyRequest, reply: FastifyReply, watch: ResponseWatch): Outcome {
  if (rawStatus(reply.raw) !== 0) return 'invalid'
  // (A response cut off for a client that stopped reading may have been ended, and look finished: its last bytes were
  // written, not taken.)
  if (!reply.raw.writableFinished || (isCounting(reply.raw) && reply.raw.cutOff)) return watch.upstreamStreamFailed ? 'upstream_error' : 'aborted'
  if (request.refusal !== null) return request.refusal.outcome
  if (request.upstream !== null) {
    if (request.upstream.status === 429) return 'upstream_rate_limited' // the shared account's limit, not the client's
    if (request.upstream.status >= 500) return 'upstream_error'
    // An answer 200 that says the call failed: a stream the upstream ended with its own error event, or a failed response.
    const facts = request.responseFacts
    return (facts !== null && failureOutcome(facts, request.operation?.action === 'response.create')) || 'ok'
  }
  return 'error'
}

/** Whether any of the response reached the client's connection (not one still waiting behind a pipelined one). */
function reachedClient (res: ServerResponse): boolean {
  return res.headersSent && !(isCounting(res) && res.queued)
}

/** The status the client actually received: none sent is 499, as nginx logs a client that closed first. */
function statusSent (reply: FastifyReply): number {
  return rawStatus(reply.raw) || (reachedClient(reply.raw) ? reply.statusCode : CLIENT_CLOSED_REQUEST)
}

/**
 * The operation of a call whose record is made before the router saw it (a call over before it started: read
 * after an answer that closed its connection). Null for an unknown route, as the router would have it.
 */
function routedLate (request: FastifyRequest): Operation | null {
  if (request.routeOptions.config.internal === true) return null
  const match = matchOperation(request.method, request.originalUrl)
  return match.kind === 'operation' ? match.operation : null
}

/** Body bytes that went to the client: none to a HEAD, nor with a 204 or 304 (Node sends no body with them). */
function bodyBytesSent (request: FastifyRequest, reply: FastifyReply): number {
  const res = reply.raw
  if (!isCounting(res) || res.queued || request.method === 'HEAD' || res.statusCode === 204 || res.statusCode === 304) return 0
  return res.bodyBytes
}

/**
 * The conversation a call acted on: the one its path names, the one it created, or the one a response was
 * created in (its body's `conversation`, kept only when it is a well-formed id, which the ownership check refused
 * otherwise); `audit query --conversation` finds all three.
 */
function conversationOf (request: FastifyRequest, op: Operation | null): string | null {
  if (op === null) return null
  if (op.action === 'conversation.create') return request.createdId
  if (op.action === 'response.create') {
    const id = conversationParam(request.parsedBody)
    return id !== undefined && ID_PATTERN.test(id) ? id : null
  }
  return op.conversationId
}

/**
 * The response a create continues: its body's `previous_response_id`, kept only when it is a well-formed id (the
 * ownership check refused it otherwise); `audit query --response` finds it, a refused one of another team's too.
 */
function previousResponseOf (request: FastifyRequest, op: Operation | null): string | null {
  if (op?.action !== 'response.create') return null
  const id = (request.parsedBody as { previous_response_id?: unknown } | undefined)?.previous_response_id
  return typeof id === 'string' && ID_PATTERN.test(id) ? id : null
}

/**
 * Whether a Responses call asked for a stream: as its checks read it, or, for a call refused before them (a wrong
 * key, a missing scope, the rate limit, a bad query), as its request line says (a retrieve's `stream=true`); null
 * for a create refused before its body was read, and on other routes.
 */
function streamOf (request: FastifyRequest, op: Operation | null): boolean | null {
  const facts = request.responseFacts
  if (facts !== null) return facts.stream
  if (op === null || !op.action.startsWith('response.')) return null
  return op.action === 'response.create' ? null : streamsRetrieve(op)
}

/**
 * An id as the record keeps it: cut at the longest the gateway takes, and never a key (a client that passed its key
 * as an id, refused with credentials_in_url).
 */
function idOf (id: string | null | undefined): string | null {
  return id === null || id === undefined ? null : withoutKeys(id).slice(0, MAX_ID_LENGTH)
}

/**
 * The call's record. Its keys are written in sorted order, with the chain's seq and prevHash in their places (left
 * undefined here, set when the record is sealed): the sealed line is then JSON.stringify's plain output
 * (audit/chain.ts), the cheapest way to write the record's canonical JSON, once per call.
 */
function buildRecord (request: FastifyRequest, reply: FastifyReply, watch: ResponseWatch): AuditRecord {
  const op = request.operation ?? routedLate(request)
  const facts = request.responseFacts
  const upstream = request.upstream
  const call = request.upstreamCall
  const userAgent = request.headers['user-agent']
  return {
    action: op?.action ?? 'unknown',
    attempts: call?.attempts ?? 0,
    bytesIn: request.bodyBytes,
    bytesOut: bodyBytesSent(request, reply),
    clientId: request.client?.id ?? request.expiredKey?.clientId ?? null,
    // (Ids cut at the longest the gateway takes: one from a path refused as no id, 400 or a 401 before ids are
    // checked, may be as long as Node lets a request line be, about 16 KB; one from an answer is the upstream's.)
    conversationId: idOf(conversationOf(request, op)),
    durationMs: Math.round(performance.now() - watch.start),
    inputTokens: facts?.inputTokens ?? null,
    ip: watch.ip,
    itemId: idOf(op?.itemId ?? request.refusedItemId),
    keyId: request.keyId ?? request.expiredKey?.keyId ?? null,
    method: request.method,
    // (the client's string, up to the body limit: a model id is a few dozen characters)
    model: facts?.model === null || facts?.model === undefined ? null : withoutKeys(facts.model).slice(0, 256),
    outcome: outcomeOf(request, reply, watch),
    outputTokens: facts === null ? null : outputTokens(facts),
    ownerId: request.ownerId,
    path: withoutKeys(rawPath(request.originalUrl)).slice(0, 2048),
    prevHash: undefined,
    previousResponseId: idOf(previousResponseOf(request, op)),
    requestId: request.id,
    // (the id in the path of a call refused before its checks made the facts: audit query --response finds it)
    responseId: idOf(facts?.responseId ?? op?.responseId),
    seq: undefined,
    status: statusSent(reply),
    stream: streamOf(request, op),
    time: new Date().toISOString(),
    upstreamHost: call?.host ?? null,
    upstreamLine: call?.line ?? null,
    upstreamMs: upstream?.ms ?? null,
    upstreamRequestId: upstream?.requestId ?? null,
    userAgent: typeof userAgent === 'string' ? withoutKeys(userAgent).slice(0, 512) : null
  }
}

export default fp<AuditOptions>(async function audit (app, { writer, onFailure }) {
  const observers: AuditObserver[] = []
  app.decorate('onAuditRecord', (observer: AuditObserver) => { observers.push(observer) })
  app.decorate('auditState', () => writer.available ? 'ok' : 'unavailable')
  app.decorate('auditLost', () => writer.stats().lost)
  app.decorate('auditReopen', () => { writer.reopen() })
  app.decorate('auditRefuses', () => onFailure === 'closed' && !writer.available)
  app.decorateRequest('auditWatch', null)

  // Callback-style hooks: they run on every call, and a promise per hook per call costs.
  app.addHook('onRequest', (request, reply, done) => {
    if (request.routeOptions.config.internal !== true) {
      // Body bytes are counted by the response itself (http/response.ts).
      const watch: ResponseWatch = { start: performance.now(), ip: clientIp(request), upstreamStreamFailed: false }
      request.auditWatch = watch
      // 'close' comes exactly once for every response, finished or not; the record is built on it. (on, not once:
      // with one 'close' per response, once's wrapper would be one more object per call for nothing; the same
      // holds for the other per-call 'close' listeners.)
      whenClosed(reply.raw, () => {
        const record = buildRecord(request, reply, watch)
        writer.write(record)
        for (const observe of observers) observe(record)
      })
    }
    done()
  })

  // A streamed answer that fails on the upstream's side (a reset mid-body) is told apart from a client leaving:
  // the client's leaving closes the response first, and the record is written then.
  app.addHook('onSend', (request, _reply, payload, done) => {
    const watch = request.auditWatch
    if (watch !== null && payload instanceof Readable) {
      payload.once('error', () => { watch.upstreamStreamFailed = true })
    }
    done(null, payload)
  })

  app.addHook('onClose', async () => { await writer.close() })
}, { name: 'audit' })

/**
 * With audit.onFailure "closed", an API call made while the audit cannot be written gets 503 audit_unavailable
 * right after its route is matched, before its key, body or the upstream: no call goes unrecorded. Its own
 * record (outcome `unavailable`) waits in the writer's buffer, or is counted as lost.
 */
export const auditGate = fp(async function auditGate (app) {
  app.addHook('onRequest', (request, _reply, done) => {
    if (request.operation !== null && app.auditRefuses()) {
      done(new AuditUnavailableError())
      return
    }
    done()
  })
}, { name: 'audit-gate', dependencies: ['audit', 'router'] })
