// Per-client token bucket (429), right after the key: every authenticated call takes a token, denied and invalid
// ones included, so a client over its limit cannot keep the gateway busy with calls it knows will fail. Every answer to an authenticated
// client carries OpenAI's x-ratelimit-*-requests headers, set in onSend so that nothing set earlier (an upstream
// header of the same name included) can stand in their place. A store that cannot answer (Redis down with
// store.onFailure: closed) refuses the call with 503; its answer then carries no x-ratelimit-* headers.
import type { FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { RateLimitExceededError, RateLimitStoreUnavailableError } from '../errors.js'
import { StoreUnavailableError, type RateLimitResult, type RateLimitStore } from '../stores/rate-limit-store.js'

export interface RateLimitOptions {
  store: RateLimitStore
}

/** OpenAI's duration format for x-ratelimit-reset-*: "20ms", "1s", "6m0s", "1h2m3s". */
export function formatDuration (ms: number): string {
  if (ms < 1000) return `${Math.max(0, Math.ceil(ms))}ms`
  const totalSeconds = Math.ceil(ms / 1000)
  const h = Math.floor(totalSeconds / 3600)
  const m = Math.floor((totalSeconds % 3600) / 60)
  const s = totalSeconds % 60
  if (h > 0) return `${h}h${m}m${s}s`
  if (m > 0) return `${m}m${s}s`
  return `${s}s`
}

function headers (result: RateLimitResult): Record<string, string> {
  return {
    'x-ratelimit-limit-requests': String(result.limit),
    'x-ratelimit-remaining-requests': String(result.remaining),
    'x-ratelimit-reset-requests': formatDuration(result.resetMs)
  }
}

const storeFailed = new WeakSet<FastifyRequest>()

export default fp<RateLimitOptions>(async function rateLimit (app, { store }) {
  app.decorateRequest('rateLimit', null)

  app.addHook('onRequest', async (request) => {
    const client = request.client
    if (client === null) return
    let result: RateLimitResult
    try {
      result = await store.take(client.id, client.rateLimit)
    } catch (err) {
      if (!(err instanceof StoreUnavailableError)) throw err
      // no second wait on the store for this call's headers
      storeFailed.add(request)
      throw new RateLimitStoreUnavailableError()
    }
    request.rateLimit = result
    if (!result.allowed) {
      const err = new RateLimitExceededError(client.id, formatDuration(result.retryAfterMs))
      err.headers = {
        'retry-after': String(Math.max(1, Math.ceil(result.retryAfterMs / 1000))),
        'retry-after-ms': String(result.retryAfterMs)
      }
      throw err
    }
  })

  app.addHook('onSend', async (request, reply) => {
    const client = request.client
    if (client === null || storeFailed.has(request)) return
    if (request.upstream?.status === 429) return // the upstream's own limit and headers (plugins/proxy.ts)
    const result = request.rateLimit ?? await store.peek(client.id, client.rateLimit).catch(() => null)
    if (result !== null) reply.headers(headers(result))
  })

  app.addHook('onClose', async () => { await store.close() })
}, { name: 'rate-limit', dependencies: ['auth'] })
