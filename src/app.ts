// buildApp(config): the gateway as a Fastify instance, with no process concerns, so tests build it directly.
// Plugins are registered in request order, and their onRequest hooks run in that order:
// request id → route (404/405) → audit writable (503, with audit.onFailure "closed") → key (401) → ids (400)
// → scope (403) → rate limit (429) → body (415/413/400) → proxy → one audit record when the response closes.
import Fastify, { type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { GatewayConfig } from './config.js'
import {
  envelope, HeadersTooLargeError, InternalError, InvalidRequestError, isGatewayError, RequestTimeoutError,
  RequestTooLargeError, type GatewayError
} from './errors.js'
import { openAuditWriter, type AuditWriter } from './audit/writer.js'
import { appLoggerOptions } from './logging.js'
import audit, { auditGate, markMalformed } from './plugins/audit.js'
import auth from './plugins/auth.js'
import body from './plugins/body.js'
import health from './plugins/health.js'
import metrics, { metricsEnabled } from './plugins/metrics.js'
import proxy from './plugins/proxy.js'
import rateLimit from './plugins/rate-limit.js'
import requestId, { newRequestId, REQUEST_ID_HEADER } from './plugins/request-id.js'
import router from './plugins/router.js'
import { rawPath } from './operations.js'
import { MemoryStore } from './stores/memory.js'
import type { RateLimitStore } from './stores/rate-limit-store.js'
import './types.js'

export interface AppDependencies {
  /** operational log; default: pino to stdout at config.log.level */
  logger?: FastifyBaseLogger
  /** audit writer; default: one opened on config.audit */
  auditWriter?: AuditWriter
  /** HMAC key for the audit chain (AUDIT_HMAC_KEY, read by the process); plain sha256 without it */
  auditHmacKey?: string
  rateLimitStore?: RateLimitStore
}

/** Stands in for a target the router cannot percent-decode; the original stays in request.originalUrl. */
const UNDECODABLE_TARGET = '/.undecodable'

/**
 * find-my-way decodes the whole path before routing and Fastify answers a malformed escape (`%zz`) itself,
 * before any hook: no request id, no audit record, and no key check first. Route such a target to nowhere
 * instead; the gateway's hooks then judge the original, where a `%` can never pass the id rule.
 */
function routableUrl (req: IncomingMessage): string {
  const url = req.url ?? '/'
  if (!url.includes('%')) return url // nothing to decode: the common case costs one scan
  try {
    decodeURIComponent(rawPath(url))
    return url
  } catch {
    return UNDECODABLE_TARGET
  }
}

/**
 * Malformed HTTP that Node's parser refuses: answered in OpenAI's envelope like every other gateway error.
 * When the request had already been handed over (a bad chunk in its body), its audit record says so.
 */
function clientErrorHandler (err: NodeJS.ErrnoException, socket: Socket) {
  if (err.code === 'ECONNRESET' || socket.destroyed) return
  const inFlight = (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage
  if (inFlight && !inFlight.headersSent) markMalformed(inFlight)
  if (socket.writable && !inFlight?.headersSent) {
    const error = err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
      ? new RequestTimeoutError()
      : err.code === 'HPE_HEADER_OVERFLOW' ? new HeadersTooLargeError() : new InvalidRequestError('malformed HTTP.')
    const body = JSON.stringify(envelope(error))
    socket.write(`HTTP/1.1 ${error.statusCode} ${STATUS_CODES[error.statusCode]}\r\n` +
      `${REQUEST_ID_HEADER}: ${newRequestId()}\r\nContent-Type: application/json; charset=utf-8\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
  }
  socket.destroy(err)
}

/** How long a client that is still sending an over-limit body may keep the connection after its 413. */
const DISCARD_BODY_MS = 5_000

export async function buildApp (config: GatewayConfig, deps: AppDependencies = {}): Promise<FastifyInstance> {
  const app = Fastify({
    ...(deps.logger ? { loggerInstance: deps.logger } : { logger: appLoggerOptions(config.log.level) }),
    genReqId: newRequestId,
    requestIdHeader: false,
    bodyLimit: config.limits.bodyBytes,
    exposeHeadRoutes: false,
    trustProxy: false,
    // Ids are checked by our own rule (operations.ts), which must decide before the router could answer
    // 414 for a param over find-my-way's default 100 characters. 16 KiB is Node's whole header limit.
    routerOptions: { maxParamLength: 16_384 },
    rewriteUrl: routableUrl,
    clientErrorHandler
  })

  app.setErrorHandler(errorHandler(config))

  await app.register(requestId)
  const auditWriter = deps.auditWriter ?? await openAuditWriter({
    ...config.audit, hmacKey: deps.auditHmacKey, log: app.log
  })
  await app.register(audit, { writer: auditWriter, onFailure: config.audit.onFailure })
  if (metricsEnabled(config.metrics)) {
    await app.register(metrics, { ...config.metrics, clientIds: config.clients.map(c => c.id), writer: auditWriter })
  }
  await app.register(health)
  await app.register(router)
  await app.register(auditGate)
  await app.register(auth, { clients: config.clients })
  await app.register(rateLimit, { store: deps.rateLimitStore ?? new MemoryStore() })
  await app.register(body, { bodyBytes: config.limits.bodyBytes })
  await app.register(proxy, {
    baseUrl: config.upstream.baseUrls[0]!,
    apiKey: config.upstream.apiKey,
    timeoutMs: config.upstream.timeoutMs,
    caFile: config.upstream.caFile
  })
  return app
}

/** The one place any error becomes OpenAI's envelope. Unknown errors are logged and answered generically. */
function errorHandler (config: GatewayConfig) {
  return function handle (error: FastifyError, request: FastifyRequest, reply: FastifyReply) {
    const err = toGatewayError(error, config)
    if (err.statusCode >= 500 && !isGatewayError(error)) {
      request.log.error({ err: error }, 'unhandled error')
    }
    if (err.statusCode === 413) keepConnectionForTheAnswer(request, reply)
    if (err.headers) reply.headers(err.headers)
    reply.code(err.statusCode).type('application/json; charset=utf-8').send(envelope(err))
  }
}

function toGatewayError (error: FastifyError, config: GatewayConfig): GatewayError {
  if (isGatewayError(error)) return error
  switch (error.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new RequestTooLargeError(String(config.limits.bodyBytes))
  }
  const status = error.statusCode ?? 500
  if (status >= 400 && status < 500) return new InvalidRequestError('malformed request.')
  return new InternalError()
}

/**
 * Fastify asks to close the connection on a body error, but closing while the client still uploads makes it
 * see a reset instead of the 413. Keep the connection, let Node discard the rest of the body, and cut off a
 * client that is still sending after a bounded time.
 */
function keepConnectionForTheAnswer (request: FastifyRequest, reply: FastifyReply) {
  reply.removeHeader('connection')
  reply.raw.once('finish', () => {
    if (request.raw.complete) return
    const timer = setTimeout(() => request.raw.socket?.destroy(), DISCARD_BODY_MS).unref()
    request.raw.once('end', () => clearTimeout(timer))
  })
}
