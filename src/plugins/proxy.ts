// The proxy: the eight operations' routes (and nothing else) on @fastify/http-proxy, one registration per path
// shape, all sharing one undici Agent. Headers are rebuilt from allow-lists both ways; the upstream token is set
// last, on a fresh object, so no client header can remove or replace it. reply-from's unsafe defaults are
// overridden on purpose: verified TLS, no 503 retries, our own error mapping.
import { readFileSync } from 'node:fs'
import { performance } from 'node:perf_hooks'
import { rootCertificates } from 'node:tls'
import type { IncomingHttpHeaders } from 'node:http'
import type { Readable } from 'node:stream'
import httpProxy from '@fastify/http-proxy'
import type { FastifyHttpProxyOptions } from '@fastify/http-proxy'
import type { FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { Agent } from 'undici'
import { UpstreamTimeoutError, UpstreamUnavailableError } from '../errors.js'
import { API_PREFIX, RESOURCES } from '../operations.js'

export interface ProxyOptions {
  baseUrl: string
  apiKey: string
  timeoutMs: number
  /** PEM bundle of a private CA that signs the upstream's certificate, trusted in addition to the system's */
  caFile?: string
}

/** Client headers the upstream gets; everything else (keys, cookies, x-forwarded-*, hop-by-hop) stays here. */
const FORWARDED_REQUEST_HEADERS = ['accept', 'user-agent', 'idempotency-key'] as const

/** Upstream headers the client gets: the body's description, the upstream's request id and retry hints. */
const RETURNED_RESPONSE_HEADERS = new Set([
  'content-type', 'content-length', 'content-encoding', 'cache-control', 'etag', 'last-modified',
  'retry-after', 'retry-after-ms', 'x-request-id', 'openai-processing-ms', 'openai-version'
])

interface UpstreamResponse {
  statusCode: number
  headers: IncomingHttpHeaders
  stream: Readable
}

const startedAt = new WeakMap<FastifyRequest, number>()

export function upstreamRequestHeaders (
  request: FastifyRequest, headers: IncomingHttpHeaders, apiKey: string
): Record<string, string> {
  const out: Record<string, string> = {}
  if (typeof headers.host === 'string') out.host = headers.host
  for (const name of FORWARDED_REQUEST_HEADERS) {
    const value = headers[name]
    if (typeof value === 'string') out[name] = value
  }
  if (request.body !== undefined) {
    // body.ts checked it is JSON whatever the client called it; say so plainly.
    out['content-type'] = 'application/json'
    out['content-length'] = String(request.bodyBytes)
  }
  out['x-client-request-id'] = request.id
  out.authorization = `Bearer ${apiKey}`
  return out
}

export function clientResponseHeaders (headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const out: IncomingHttpHeaders = {}
  for (const [name, value] of Object.entries(headers)) {
    if (RETURNED_RESPONSE_HEADERS.has(name)) out[name] = value
  }
  return out
}

export function upstreamRateLimitHeaders (headers: IncomingHttpHeaders): Record<string, string> {
  const out: Record<string, string> = {}
  for (const [name, value] of Object.entries(headers)) {
    if (name.startsWith('x-ratelimit-') && typeof value === 'string') out[name] = value
  }
  return out
}

export default fp<ProxyOptions>(async function proxy (app, opts) {
  app.decorateRequest('upstream', null)
  const base = new URL(opts.baseUrl)
  // Certificates are always verified: reply-from would build its own agent with rejectUnauthorized: false.
  const agent = new Agent({
    headersTimeout: opts.timeoutMs,
    bodyTimeout: opts.timeoutMs,
    connections: 128,
    connect: {
      rejectUnauthorized: true,
      ...(opts.caFile === undefined ? {} : { ca: [...rootCertificates, readFileSync(opts.caFile, 'utf8')] })
    }
  })

  // reply-from's hook types are wider than our server (HTTP/2 too); this gateway serves HTTP/1.1 only.
  const replyOptions: NonNullable<FastifyHttpProxyOptions['replyOptions']> = {
    rewriteRequestHeaders (request, headers) {
      startedAt.set(request as FastifyRequest, performance.now())
      return upstreamRequestHeaders(request as FastifyRequest, headers as IncomingHttpHeaders, opts.apiKey)
    },
    rewriteHeaders (headers) {
      return clientResponseHeaders(headers as IncomingHttpHeaders)
    },
    onResponse (req, rep, raw) {
      const request = req as FastifyRequest
      const res = raw as unknown as UpstreamResponse
      const requestId = res.headers['x-request-id']
      request.upstream = {
        status: res.statusCode,
        ms: Math.round(performance.now() - (startedAt.get(request) ?? performance.now())),
        requestId: typeof requestId === 'string' ? requestId : null
      }
      // reply-from calls this even after it answered 502 for an invalid upstream status.
      if (rep.sent) {
        res.stream.destroy()
        return
      }
      // The shared account's limit: the client gets the upstream's own rate-limit headers, which say when to
      // retry, and not ours (plugins/rate-limit.ts leaves this answer alone).
      if (res.statusCode === 429) rep.headers(upstreamRateLimitHeaders(res.headers))
      rep.send(res.stream)
    },
    onError (reply, { error }) {
      // reply-from has logged the failure already ("response errored"): once is enough.
      const err = error as Error & { statusCode?: number }
      reply.send(err.statusCode === 504 ? new UpstreamTimeoutError() : new UpstreamUnavailableError())
    },
    // reply-from retries a GET that got a 503 ten times by default (maxRetriesOn503: 0 does not turn it off)
    // and would read Retry-After seconds as milliseconds. Retries across lines will be ours, deliberately.
    retryDelay: () => null
  }

  for (const resource of RESOURCES) {
    await app.register(httpProxy, {
      upstream: base.origin,
      prefix: API_PREFIX,
      rewritePrefix: base.pathname.replace(/\/$/, '') + API_PREFIX,
      routes: [resource.route],
      httpMethods: Object.keys(resource.methods),
      proxyPayloads: false,
      websocket: false,
      undici: agent,
      disableRequestLogging: true,
      replyOptions
    })
  }

  // After the server has stopped and in-flight calls have finished.
  app.addHook('onClose', async () => { await agent.close() })
}, { name: 'proxy', dependencies: ['body'] })
