// Per-client token bucket (429), the last check before the body is read. Every answer to an authenticated
// client carries OpenAI's x-ratelimit-*-requests headers, set in onSend so that nothing set earlier (an upstream
// header of the same name included) can stand in their place.
import fp from 'fastify-plugin'
import { RateLimitExceededError } from '../errors.js'
import type { RateLimitResult, RateLimitStore } from '../stores/rate-limit-store.js'

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

export default fp<RateLimitOptions>(async function rateLimit (app, { store }) {
  app.decorateRequest('rateLimit', null)

  app.addHook('onRequest', async (request) => {
    const client = request.client
    if (client === null) return
    const result = await store.take(client.id, client.rateLimit)
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
    if (client === null) return
    if (request.upstream?.status === 429) return // the upstream's own limit and headers (plugins/proxy.ts)
    reply.headers(headers(request.rateLimit ?? await store.peek(client.id, client.rateLimit)))
  })

  app.addHook('onClose', async () => { await store.close() })
}, { name: 'rate-limit', dependencies: ['auth'] })
