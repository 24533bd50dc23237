// Per-client request bucket (429), right after the key: every authenticated call takes a token, denied and invalid
// ones included, so a client over its limit cannot keep the gateway busy with calls it knows will fail. A client
// with rateLimit.tokensPerMinute also has a token budget for POST /v1/responses (429, type `tokens`), charged from
// each answer's usage when the call ends. Every answer to an authenticated client carries OpenAI's
// x-ratelimit-*-requests headers (and -tokens ones where a budget was checked), set in onSend so that nothing set
// earlier (an upstream header of the same name included) can stand in their place. A store that cannot answer
// (Redis down with store.onFailure: closed) refuses the call with 503; its answer then carries no x-ratelimit-*.
import type { FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { ClientConfig } from '../config.js'
import { RateLimitExceededError, RateLimitStoreUnavailableError, TokensRateLimitError } from '../errors.js'
import { tokensUsed } from '../responses/usage.js'
import {
  StoreUnavailableError, type BucketRule, type RateLimitResult, type RateLimitStore
} from '../stores/rate-limit-store.js'

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

function retryHeaders (retryAfterMs: number): Record<string, string> {
  return { 'retry-after': String(Math.max(1, Math.ceil(retryAfterMs / 1000))), 'retry-after-ms': String(retryAfterMs) }
}

function tokenHeaders (result: RateLimitResult): Record<string, string> {
  return {
    'x-ratelimit-limit-tokens': String(result.limit),
    'x-ratelimit-remaining-tokens': String(result.remaining),
    'x-ratelimit-reset-tokens': formatDuration(result.resetMs)
  }
}

/** A client's token budget: `tokensPerMinute` of capacity, refilled at that rate, in its own bucket. */
function tokenRule (client: ClientConfig): BucketRule | null {
  const perMinute = client.rateLimit.tokensPerMinute
  return perMinute === undefined ? null : { requestsPerMinute: perMinute, burst: perMinute }
}

const tokenKey = (client: ClientConfig) => `tokens:${client.id}`

export default fp<RateLimitOptions>(async function rateLimit (app, { store }) {
  app.decorateRequest('rateLimit', null)
  app.decorateRequest('tokenBudget', null)

  async function takeOrRefuse<T> (request: FastifyRequest, step: () => Promise<T>): Promise<T> {
    try {
      return await step()
    } catch (err) {
      if (!(err instanceof StoreUnavailableError)) throw err
      // no second wait on the store for this call's headers
      storeFailed.add(request)
      throw new RateLimitStoreUnavailableError()
    }
  }

  app.addHook('onRequest', async (request, reply) => {
    const client = request.client
    if (client === null) return
    const result = await takeOrRefuse(request, async () => await store.take(client.id, client.rateLimit))
    request.rateLimit = result
    if (!result.allowed) {
      const err = new RateLimitExceededError(client.id, formatDuration(result.retryAfterMs))
      err.headers = retryHeaders(result.retryAfterMs)
      throw err
    }

    // Token budgets: a client whose answers have used up its tokens per minute gets 429 on its next generation,
    // until refill; what a call uses is known only from its answer, and charged when the call ends.
    const rule = tokenRule(client)
    if (rule === null || request.operation?.action !== 'response.create') return
    const budget = await takeOrRefuse(request, async () => await store.peek(tokenKey(client), rule))
    request.tokenBudget = budget
    if (!budget.allowed) {
      const err = new TokensRateLimitError(client.id, String(rule.requestsPerMinute), formatDuration(budget.retryAfterMs))
      err.headers = retryHeaders(budget.retryAfterMs)
      throw err
    }
    reply.raw.once('close', () => {
      const used = request.responseFacts === null ? 0 : tokensUsed(request.responseFacts)
      if (used <= 0) return
      store.charge(tokenKey(client), rule, used).catch((err: unknown) => {
        request.log.warn({ err: { message: (err as Error).message }, clientId: client.id, tokens: used }, 'token budget could not be charged')
      })
    })
  })

  app.addHook('onSend', async (request, reply) => {
    const client = request.client
    if (client === null || storeFailed.has(request)) return
    if (request.upstream?.status === 429) return // the upstream's own limit and headers (plugins/proxy.ts)
    if (request.rateLimit !== null) reply.headers(headers(request.rateLimit))
    if (request.tokenBudget !== null) reply.headers(tokenHeaders(request.tokenBudget))
  })

  app.addHook('onClose', async () => { await store.close() })
}, { name: 'rate-limit', dependencies: ['auth'] })
