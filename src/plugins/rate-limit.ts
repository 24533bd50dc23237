// Per-client request bucket (429), right after the key: every authenticated call takes a token, denied and invalid
// ones included, so a client over its limit cannot keep the gateway busy with calls it knows will fail. A client
// with rateLimit.tokensPerMinute also has a token budget for POST /v1/responses (429, type `tokens`), charged from
// each answer's usage when the call ends. Every answer to an authenticated client carries OpenAI's
// x-ratelimit-*-requests headers (and -tokens ones where a budget was checked), set in onSend so that nothing set
// earlier (an upstream header of the same name included) can stand in their place. A store that cannot answer
// (Redis down with store.onFailure: closed) refuses the call with 503; its answer then carries no x-ratelimit-*.
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import type { ClientConfig } from '../config.js'
import { RateLimitExceededError, RateLimitStoreUnavailableError, retryAfter, TokensRateLimitError } from '../errors.js'
import { loggedError } from '../logging.js'
import { whenClosed } from '../http/response.js'
import { tokensUsed } from '../responses/usage.js'
import { whenAnswered, type Answer } from '../answer.js'
import {
  StoreUnavailableError, type BucketRule, type RateLimitResult, type RateLimitStore
} from '../stores/rate-limit-store.js'
import { WARN_INTERVAL_MS } from '../stores/redis.js'

export interface RateLimitOptions {
  store: RateLimitStore
  /** the client `id` as configured now: a call charged when it ends is charged under the limits then in force */
  currentClient: (id: string) => ClientConfig | undefined
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

/**
 * When a token is back. A wait longer than the SDKs are left to retry after (errors.ts, retryAfter) also says not to
 * retry: a token budget hours in debt would otherwise hold the caller's call for hours. A request bucket never waits
 * that long (one token comes back within 60000 / requestsPerMinute ms).
 */
function retryHeaders (retryAfterMs: number): Record<string, string> {
  return { ...retryAfter(retryAfterMs), 'retry-after-ms': String(retryAfterMs) }
}

function tokenHeaders (result: RateLimitResult): Record<string, string> {
  return {
    'x-ratelimit-limit-tokens': String(result.limit),
    'x-ratelimit-remaining-tokens': String(result.remaining),
    'x-ratelimit-reset-tokens': formatDuration(result.resetMs)
  }
}

/** A client's token budget: `tokensPerMinute` of capacity, refilled at that rate, in its own bucket. */
function tokenRule (limits: Pick<ClientConfig['rateLimit'], 'tokensPerMinute'>): BucketRule | null {
  const perMinute = limits.tokensPerMinute
  return perMinute === undefined ? null : { requestsPerMinute: perMinute, burst: perMinute }
}

const tokenKey = (client: ClientConfig) => `tokens:${client.id}`

/** Asks now, for an answer read later (or never: a call refused first leaves a failed answer unread). */
function askedNow<T> (ask: () => Answer<T>): () => Answer<T> {
  let answer: Answer<T>
  try {
    answer = ask()
  } catch (err) {
    return () => { throw err }
  }
  if (answer instanceof Promise) answer.catch(() => {})
  return () => answer
}

interface WarnLog { warn (obj: object, msg: string): void }

/**
 * Usage the store could not take (Redis down with store.onFailure closed: the generations under way when an outage
 * starts end in it, up to limits.maxInFlight of them). One warning per WARN_INTERVAL_MS, with the calls and tokens
 * left uncharged since the last one, as the store logs the outage itself: not a line per call. Those left after a
 * warning are told when the interval is over, or when the gateway stops (close), whether or not any call fails then:
 * the outage may be over, and nothing would tell them.
 */
class Uncharged {
  #lastWarning = -Infinity
  #calls = 0
  #tokens = 0
  /** the latest call left uncharged, as the next warning names it */
  #latest: { log: WarnLog, clientId: string, tokens: number, err: unknown } | null = null
  #pending: NodeJS.Timeout | null = null
  /** charges asked and not answered yet, and what waits for the last of them (close) */
  #asked = 0
  #allAnswered: (() => void) | null = null
  #closed = false

  asked (): void {
    this.#asked++
  }

  answered (): void {
    if (--this.#asked === 0) this.#allAnswered?.()
  }

  add (log: WarnLog, clientId: string, tokens: number, err: unknown): void {
    this.#calls++
    this.#tokens += tokens
    this.#latest = { log, clientId, tokens, err }
    const wait = this.#lastWarning + WARN_INTERVAL_MS - Date.now()
    if (wait <= 0 || this.#closed) this.flush()
    else this.#pending ??= setTimeout(() => { this.flush() }, wait).unref()
  }

  /**
   * The gateway stops: once the charges asked have their answers (each within store.timeoutMs: the generations
   * aborted at the end of the grace charge as they close, on a Redis that may be slow), tells what is left uncharged.
   * The pending warning's timer does not hold the process, and the store is closed after this.
   */
  async close (): Promise<void> {
    if (this.#asked > 0) await new Promise<void>(resolve => { this.#allAnswered = resolve })
    this.#closed = true
    this.flush()
  }

  /** Tells what is left uncharged since the last warning, if anything. */
  flush (): void {
    clearTimeout(this.#pending ?? undefined)
    this.#pending = null
    if (this.#latest === null) return
    const { log, clientId, tokens, err } = this.#latest
    this.#lastWarning = Date.now()
    log.warn({ err: loggedError(err), clientId, tokens, since: { calls: this.#calls, tokens: this.#tokens } },
      'token budget could not be charged')
    this.#latest = null
    this.#calls = 0
    this.#tokens = 0
  }
}

/** Charges `amount` to a client's bucket; what the store cannot take is told to `uncharged` (nothing waits on the answer). */
function charge (store: RateLimitStore, uncharged: Uncharged, log: WarnLog, clientId: string, key: string, rule: BucketRule,
  amount: number): void {
  uncharged.asked()
  whenAnswered(() => store.charge(key, rule, amount), () => { uncharged.answered() }, (err: unknown) => {
    uncharged.add(log, clientId, amount, err)
    uncharged.answered()
  })
}

/** At most this many bucket names in the one warning of a reload whose buckets could not be rewritten. */
const REAPPLY_NAMED = 10

/**
 * After a reload, the buckets of each client whose limits changed are written again under its new limits (a charge
 * of nothing: the time since the bucket was last written refills at the limits it was written with, then it is kept,
 * capped at the new burst: stores/rate-limit-store.ts, refill). A Redis bucket expires when the limits it was last
 * written with would have it full; left alone, one drained before a reload that lowers the rate or raises the burst
 * would expire on the old schedule and come back full, a fresh burst for a client that pauses past it. Replicas
 * reloaded in turn each write it again: the second finds it written under the new limits by the first, and refills
 * nothing at the old rate. A store that cannot take them (Redis down, with store.onFailure open too: the local
 * buckets calls fall back to are written, the shared ones are not) gets one warning for the whole reload, not one
 * per bucket: a reload that changes a default limit touches every client, thousands of lines for one outage.
 */
export function reapplyLimits (store: RateLimitStore, before: readonly ClientConfig[], after: readonly ClientConfig[], log: WarnLog): void {
  const old = new Map(before.map(client => [client.id, client.rateLimit]))
  const failed: string[] = []
  let firstError: unknown = null
  let pending = 1 // (the loop's own, so that answers given at once do not end it early)
  const settled = () => {
    if (--pending > 0 || failed.length === 0) return
    log.warn({
      err: loggedError(firstError),
      buckets: failed.length,
      named: failed.slice(0, REAPPLY_NAMED)
    }, `rate limits: ${failed.length} bucket(s) could not be kept under their new limits (they refill on the old ones)`)
  }
  const rewrite = (key: string, rule: BucketRule) => {
    pending++
    whenAnswered(() => store.rewrite(key, rule), settled, (err: unknown) => {
      if (failed.length === 0) firstError = err
      failed.push(key)
      settled()
    })
  }
  for (const client of after) {
    const was = old.get(client.id)
    if (was === undefined) continue
    const now = client.rateLimit
    if (was.requestsPerMinute !== now.requestsPerMinute || was.burst !== now.burst) rewrite(client.id, now)
    const tokens = tokenRule(now)
    if (tokens !== null && was.tokensPerMinute !== now.tokensPerMinute) rewrite(tokenKey(client), tokens)
  }
  settled()
}

export default fp<RateLimitOptions>(async function rateLimit (app, { store, currentClient }) {
  const uncharged = new Uncharged()
  app.decorateRequest('rateLimit', null)
  app.decorateRequest('tokenBudget', null)

  /** A store that cannot answer becomes the call's 503; no second wait on it for this call's headers. */
  function storeError (request: FastifyRequest, err: unknown): unknown {
    if (!(err instanceof StoreUnavailableError)) return err
    storeFailed.add(request)
    return new RateLimitStoreUnavailableError()
  }

  /**
   * What a generation used, charged when it ends under the budget in force then: a reload since the call began
   * rewrote the bucket under its new limits, and a charge under the old ones would refill the time since at the old
   * rate (a lowered budget's debt paid back at the old speed). A budget the reload removed is not charged; one it
   * gave a client with none is, as every generation ending under it is.
   */
  function chargeWhenDone (request: FastifyRequest, reply: FastifyReply, client: ClientConfig): void {
    whenClosed(reply.raw, () => {
      const facts = request.responseFacts
      if (facts === null) return
      const now = tokenRule(currentClient(client.id)?.rateLimit ?? {})
      if (now === null) return
      const upstream = request.upstream
      const takenOn = upstream === null ? request.upstreamCall?.sent === true : upstream.status >= 200 && upstream.status < 300
      const used = tokensUsed(facts, takenOn, request.upstreamBody?.length ?? 0)
      if (used > 0) charge(store, uncharged, request.log, client.id, tokenKey(client), now, used)
    })
  }

  /** Token budgets: a client whose answers have used up its tokens per minute gets 429 on its next generation,
   * until refill; what a call uses is known only from its answer, and charged when the call ends. `peek` is the
   * budget's answer, asked together with the request bucket's. */
  function checkBudget (request: FastifyRequest, reply: FastifyReply, client: ClientConfig, rule: BucketRule,
    peek: () => Answer<RateLimitResult>, done: (err?: Error) => void): void {
    whenAnswered(peek, budget => {
      request.tokenBudget = budget
      if (!budget.allowed) {
        const err = new TokensRateLimitError(client.id, String(rule.requestsPerMinute), formatDuration(budget.retryAfterMs))
        err.headers = retryHeaders(budget.retryAfterMs)
        done(err)
        return
      }
      chargeWhenDone(request, reply, client)
      done()
    }, err => { done(storeError(request, err) as Error) })
  }

  // Callback style: the memory store answers at once, and this runs on every call.
  app.addHook('onRequest', (request, reply, done) => {
    const client = request.client
    if (client === null) {
      done()
      return
    }
    const generation = request.operation?.action === 'response.create'
    const rule = generation ? tokenRule(client.rateLimit) : null
    // A generation's budget is asked at once with its request bucket, not after it: on a slow Redis the call
    // waits one store.timeoutMs, not two.
    const budget = rule === null ? null : askedNow(() => store.peek(tokenKey(client), rule))
    whenAnswered(() => store.take(client.id, client.rateLimit), result => {
      request.rateLimit = result
      if (!result.allowed) {
        const err = new RateLimitExceededError(client.id, formatDuration(result.retryAfterMs))
        err.headers = retryHeaders(result.retryAfterMs)
        done(err)
        return
      }
      if (rule !== null && budget !== null) {
        checkBudget(request, reply, client, rule, budget, done)
        return
      }
      // No budget to check, but a reload may give the client one before this generation ends.
      if (generation) chargeWhenDone(request, reply, client)
      done()
    }, err => { done(storeError(request, err) as Error) })
  })

  app.addHook('onSend', (request, reply, payload, done) => {
    const client = request.client
    // An upstream 429 carries the upstream's own limit and headers (plugins/proxy.ts), one met by an ownership
    // lookup too (plugins/ownership.ts).
    const upstreamLimited = request.upstream?.status === 429 || request.refusal?.outcome === 'upstream_rate_limited'
    if (client !== null && !storeFailed.has(request) && !upstreamLimited) {
      if (request.rateLimit !== null) reply.headers(headers(request.rateLimit))
      if (request.tokenBudget !== null) reply.headers(tokenHeaders(request.tokenBudget))
    }
    done(null, payload)
  })

  app.addHook('onClose', async () => {
    await uncharged.close()
    await store.close()
  })
}, { name: 'rate-limit', dependencies: ['auth'] })
