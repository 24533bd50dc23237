// One JSON line per API call, written when the response closes: that event comes exactly once for every
// response, finished or not, so denied, failed and aborted calls are recorded as surely as served ones
// (Fastify's onResponse is skipped for a client that hangs up mid-stream; onRequestAbort only fires before the
// response). The record holds the fields listed in the README and nothing else: no keys, tokens or bodies.
import type { ServerResponse } from 'node:http'
import { performance } from 'node:perf_hooks'
import { Transform, pipeline, type Readable } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { AuditWriter } from '../audit/writer.js'
import { AuditUnavailableError } from '../errors.js'
import { rawPath, type Action } from '../operations.js'

export type Outcome = 'ok' | 'upstream_error' | 'denied' | 'rate_limited' | 'invalid' | 'aborted' | 'error' | 'unavailable'

export interface AuditRecord {
  time: string
  requestId: string
  clientId: string | null
  action: Action | 'unknown'
  method: string
  path: string
  conversationId: string | null
  itemId: string | null
  status: number
  outcome: Outcome
  durationMs: number
  upstreamMs: number | null
  upstreamRequestId: string | null
  bytesIn: number
  bytesOut: number
  ip: string
  userAgent: string | null
}

export interface AuditOptions {
  writer: AuditWriter
  /** what API calls get while the writer is unavailable: 503 audit_unavailable ("closed") or served ("open") */
  onFailure: 'closed' | 'open'
}

/** Sees each record as it is handed to the writer (metrics): called once per audited call, never throws. */
export type AuditObserver = (record: AuditRecord) => void

/** Calls refused because the audit could not be written: their own record says `unavailable`. */
const refusedUnavailable = new WeakSet<FastifyRequest>()

/** Largest create answer searched for the new conversation's id; the answer itself streams unchanged. */
const CREATE_ID_SCAN_BYTES = 64 * 1024

interface ResponseWatch {
  start: number
  bytesOut: number
  upstreamStreamFailed: boolean
  createdId: string | null
}

const watches = new WeakMap<FastifyRequest, ResponseWatch>()

const malformed = new WeakSet<ServerResponse>()

/**
 * Node found the request malformed after it was handed over (a bad chunk in the body): the gateway answered
 * 400 on the socket itself, so the response never finishes through Fastify.
 */
export function markMalformed (res: ServerResponse): void {
  res.statusCode = 400
  malformed.add(res)
}

function outcomeOf (request: FastifyRequest, reply: FastifyReply, watch: ResponseWatch): Outcome {
  const status = reply.statusCode
  if (malformed.has(reply.raw)) return 'invalid'
  if (!reply.raw.writableFinished) return watch.upstreamStreamFailed ? 'upstream_error' : 'aborted'
  if (request.upstream !== null) return request.upstream.status >= 500 ? 'upstream_error' : 'ok'
  if (status === 401 || status === 403) return 'denied'
  if (status === 429) return 'rate_limited'
  if (status === 502 || status === 504) return 'upstream_error'
  if (status >= 400 && status < 500) return 'invalid'
  return 'error'
}

/** The id of a 2xx conversation.create answer, read from at most CREATE_ID_SCAN_BYTES of it. */
function createdIdFrom (chunks: Buffer[]): string | null {
  try {
    const id = (JSON.parse(Buffer.concat(chunks).toString('utf8')) as { id?: unknown }).id
    return typeof id === 'string' ? id : null
  } catch {
    return null
  }
}

function countingStream (request: FastifyRequest, reply: FastifyReply, payload: Readable, watch: ResponseWatch) {
  const scanForId = request.operation?.action === 'conversation.create' &&
    reply.statusCode >= 200 && reply.statusCode < 300
  const chunks: Buffer[] = []
  let scanned = 0
  const counter = new Transform({
    transform (chunk: Buffer, _enc, done) {
      watch.bytesOut += chunk.length
      if (scanForId && scanned < CREATE_ID_SCAN_BYTES) {
        chunks.push(chunk)
        scanned += chunk.length
      }
      done(null, chunk)
    },
    flush (done) {
      if (scanForId) watch.createdId = createdIdFrom(chunks)
      done()
    }
  })
  pipeline(payload, counter, (err) => {
    // A client that hangs up shows here as a premature close; anything else failed on the upstream's side.
    if (err && (err as NodeJS.ErrnoException).code !== 'ERR_STREAM_PREMATURE_CLOSE') watch.upstreamStreamFailed = true
  })
  return counter
}

function buildRecord (request: FastifyRequest, reply: FastifyReply, watch: ResponseWatch): AuditRecord {
  const op = request.operation
  const status = reply.statusCode
  const userAgent = request.headers['user-agent']
  return {
    time: new Date().toISOString(),
    requestId: request.id,
    clientId: request.client?.id ?? null,
    action: op?.action ?? 'unknown',
    method: request.method,
    path: rawPath(request.originalUrl).slice(0, 2048),
    conversationId: op?.action === 'conversation.create' ? watch.createdId : op?.conversationId ?? null,
    itemId: op?.itemId ?? null,
    status,
    outcome: outcomeOf(request, reply, watch),
    durationMs: Math.round(performance.now() - watch.start),
    upstreamMs: request.upstream?.ms ?? null,
    upstreamRequestId: request.upstream?.requestId ?? null,
    bytesIn: request.bodyBytes,
    bytesOut: watch.bytesOut,
    ip: request.ip,
    userAgent: typeof userAgent === 'string' ? userAgent.slice(0, 512) : null
  }
}

export default fp<AuditOptions>(async function audit (app, { writer, onFailure }) {
  const observers: AuditObserver[] = []
  app.decorate('onAuditRecord', (observer: AuditObserver) => { observers.push(observer) })
  app.decorate('auditState', () => writer.available ? 'ok' : 'unavailable')
  app.decorate('auditReopen', () => { writer.reopen() })
  app.decorate('auditRefuses', () => onFailure === 'closed' && !writer.available)

  app.addHook('onRequest', async (request, reply) => {
    if (request.routeOptions.config.internal === true) return
    const watch: ResponseWatch = { start: performance.now(), bytesOut: 0, upstreamStreamFailed: false, createdId: null }
    watches.set(request, watch)
    reply.raw.once('close', () => {
      const record = buildRecord(request, reply, watch)
      if (refusedUnavailable.has(request)) record.outcome = 'unavailable'
      writer.write(record)
      for (const observe of observers) observe(record)
    })
  })

  app.addHook('onSend', async (request, reply, payload) => {
    const watch = watches.get(request)
    if (watch === undefined || payload === null || payload === undefined) return payload
    if (typeof payload === 'string' || Buffer.isBuffer(payload)) {
      watch.bytesOut += Buffer.byteLength(payload)
      return payload
    }
    return countingStream(request, reply, payload as Readable, watch)
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
      refusedUnavailable.add(request)
      done(new AuditUnavailableError())
      return
    }
    done()
  })
}, { name: 'audit-gate', dependencies: ['audit', 'router'] })
