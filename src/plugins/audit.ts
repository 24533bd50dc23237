// One JSON line per API call, written when the response closes: that event comes exactly once for every
// response, finished or not, so denied, failed and aborted calls are recorded as surely as served ones
// (Fastify's onResponse is skipped for a client that hangs up mid-stream; onRequestAbort only fires before the
// response). The record holds the fields listed in the README and nothing else: no keys, tokens or bodies.
import type { ServerResponse } from 'node:http'
import { performance } from 'node:perf_hooks'
import { Transform, pipeline, type Readable } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { ErrorOutcome } from '../errors.js'
import type { AuditWriter } from '../logging.js'
import { rawPath, type Action } from '../operations.js'

/** A gateway-made answer's outcome, or: the upstream answered (`ok`, its own 429, its 5xx), or the client left. */
export type Outcome = ErrorOutcome | 'ok' | 'upstream_rate_limited' | 'aborted'

/** The status recorded for a call whose client hung up before any status was sent (nginx's convention). */
export const CLIENT_CLOSED_REQUEST = 499

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
}

/** Largest create answer searched for the new conversation's id; the answer itself streams unchanged. */
const CREATE_ID_SCAN_BYTES = 64 * 1024

interface ResponseWatch {
  start: number
  bytesOut: number
  upstreamStreamFailed: boolean
  createdId: string | null
}

const watches = new WeakMap<FastifyRequest, ResponseWatch>()

/** Answers the gateway wrote on the socket itself, outside Fastify: their status and body bytes. */
const malformed = new WeakMap<ServerResponse, { status: number, bodyBytes: number }>()

/**
 * Node found the request malformed after it was handed over (a bad chunk in the body): the gateway answered
 * on the socket itself, so the response never finishes through Fastify.
 */
export function markMalformed (res: ServerResponse, status: number, bodyBytes: number): void {
  malformed.set(res, { status, bodyBytes })
}

function outcomeOf (request: FastifyRequest, reply: FastifyReply, watch: ResponseWatch): Outcome {
  if (malformed.has(reply.raw)) return 'invalid'
  if (!reply.raw.writableFinished) return watch.upstreamStreamFailed ? 'upstream_error' : 'aborted'
  if (request.refusal !== null) return request.refusal.outcome
  if (request.upstream !== null) {
    if (request.upstream.status === 429) return 'upstream_rate_limited' // the shared account's limit, not the client's
    return request.upstream.status >= 500 ? 'upstream_error' : 'ok'
  }
  return 'error'
}

/** The status the client actually received: none sent is 499, as nginx logs a client that closed first. */
function statusSent (reply: FastifyReply): number {
  return malformed.get(reply.raw)?.status ?? (reply.raw.headersSent ? reply.statusCode : CLIENT_CLOSED_REQUEST)
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
    status: statusSent(reply),
    outcome: outcomeOf(request, reply, watch),
    durationMs: Math.round(performance.now() - watch.start),
    upstreamMs: request.upstream?.ms ?? null,
    upstreamRequestId: request.upstream?.requestId ?? null,
    bytesIn: request.bodyBytes,
    bytesOut: malformed.get(reply.raw)?.bodyBytes ?? watch.bytesOut,
    ip: request.ip,
    userAgent: typeof userAgent === 'string' ? userAgent.slice(0, 512) : null
  }
}

export default fp<AuditOptions>(async function audit (app, { writer }) {
  app.addHook('onRequest', async (request, reply) => {
    if (request.routeOptions.config.internal === true) return
    const watch: ResponseWatch = { start: performance.now(), bytesOut: 0, upstreamStreamFailed: false, createdId: null }
    watches.set(request, watch)
    reply.raw.once('close', () => { writer.write(buildRecord(request, reply, watch)) })
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

  app.addHook('onClose', async () => { writer.close() })
}, { name: 'audit' })
