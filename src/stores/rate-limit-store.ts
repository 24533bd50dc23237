// A per-client token bucket: `burst` tokens of capacity, refilled at `requestsPerMinute`. A store keeps the
// buckets behind one interface: the in-memory one (memory.ts) is the default, the Redis one (redis.ts) shares
// them between replicas. Both do the same arithmetic, below (redis.ts repeats it in its Lua script).
import type { Answer } from '../answer.js'

export interface BucketRule {
  requestsPerMinute: number
  burst: number
}

export interface RateLimitResult {
  allowed: boolean
  limit: number
  /** whole tokens left (0 while the bucket is in debt after a charge) */
  remaining: number
  /** ms until the bucket is full again */
  resetMs: number
  /** ms until `cost` tokens are available (0 when allowed) */
  retryAfterMs: number
}

// A store answers at once (in memory: no promise per call on the hot path) or later (Redis); callers handle both
// (`await` does, and plugins/rate-limit.ts goes on at once when there is no promise).

export interface RateLimitStore {
  /**
   * Takes `cost` tokens if the bucket holds at least that many, else takes nothing and refuses. Check and take
   * are one step, so concurrent calls cannot overdraw. A cost above the rule's burst is never granted.
   */
  take (key: string, rule: BucketRule, cost?: number): Answer<RateLimitResult>
  /**
   * Subtracts `amount` tokens and never refuses: the bucket may go below zero (debt), and takes are refused
   * until refill brings it back to their cost. For usage known only after the answer (tokens per minute).
   */
  charge (key: string, rule: BucketRule, amount: number): Answer<RateLimitResult>
  /** The bucket's state without taking a token. */
  peek (key: string, rule: BucketRule): Answer<RateLimitResult>
  /**
   * Writes the bucket again under `rule`, taking nothing: after a reload changed its limits (plugins/rate-limit.ts,
   * reapplyLimits). Fails when a shared store could not take it, whatever store.onFailure says: a call can be served
   * from a local bucket meanwhile, but the shared one still refills at its old limits.
   */
  rewrite (key: string, rule: BucketRule): Answer<void>
  /** Whether the store can answer now (Redis: connected); the in-memory one always can. For /healthz and /readyz. */
  available (): boolean
  close (): Promise<void>
}

/** A store that cannot answer right now (Redis down or slow): the caller decides what a refusal means. */
export class StoreUnavailableError extends Error {
  constructor (reason: string) {
    super(`rate-limit store unavailable: ${reason}`)
    this.name = 'StoreUnavailableError'
  }
}

export interface Bucket {
  tokens: number
  at: number
  /** the limits it was last written under, which the time since refills at */
  rule: BucketRule
}

export function checkCost (cost: number, what = 'cost'): void {
  if (!Number.isFinite(cost) || cost < 0) throw new RangeError(`${what} must be a finite number ≥ 0, got ${cost}`)
}

/**
 * Tokens are fractions summed step by step, so a bucket refilled in two steps can miss a whole token by a
 * rounding error (0.999 + 0.001 < 1 in floating point). Anything this close counts as there.
 */
export const TOKEN_EPSILON = 1e-9

/** Whether `tokens` cover `cost`, forgiving the rounding of refills. */
export function covers (tokens: number, cost: number): boolean {
  return tokens + TOKEN_EPSILON >= cost
}

/**
 * Refills `bucket` up to `now` under the limits it was last written with, then caps it at `rule`'s burst, and
 * gives it `rule` from now on: the time before a reload changed the limits refills at the old rate, the time after
 * at the new one, whichever call comes first after it. A clock that went backwards refills nothing and never
 * empties it.
 */
export function refill (bucket: Bucket | undefined, rule: BucketRule, now: number): Bucket {
  if (bucket === undefined) return { tokens: rule.burst, at: now, rule }
  const was = bucket.rule
  const elapsed = Math.max(0, now - bucket.at)
  const tokens = Math.min(rule.burst, was.burst, bucket.tokens + elapsed * was.requestsPerMinute / 60_000)
  return { tokens, at: Math.max(now, bucket.at), rule }
}

export function describe (tokens: number, rule: BucketRule, allowed: boolean, cost = 1): RateLimitResult {
  const perMs = rule.requestsPerMinute / 60_000
  return {
    allowed,
    limit: rule.requestsPerMinute,
    remaining: Math.max(0, Math.floor(tokens + TOKEN_EPSILON)),
    resetMs: Math.ceil((rule.burst - tokens) / perMs),
    retryAfterMs: allowed ? 0 : Math.ceil((cost - tokens) / perMs)
  }
}
