// A per-client token bucket: `burst` tokens of capacity, refilled at `requestsPerMinute`. A store keeps the
// buckets; the in-memory one (memory.ts) is the default, a shared one can stand behind the same interface.
export interface BucketRule {
  requestsPerMinute: number
  burst: number
}

export interface RateLimitResult {
  allowed: boolean
  limit: number
  remaining: number
  /** ms until the bucket is full again */
  resetMs: number
  /** ms until one token is available (0 when allowed) */
  retryAfterMs: number
}

export interface RateLimitStore {
  /** Takes one token if there is one. Check and take are one step, so concurrent calls cannot overdraw. */
  take (key: string, rule: BucketRule): Promise<RateLimitResult>
  /** The bucket's state without taking a token. */
  peek (key: string, rule: BucketRule): Promise<RateLimitResult>
  close (): Promise<void>
}

export interface Bucket {
  tokens: number
  at: number
}

/** Refills `bucket` up to `now`; a clock that went backwards refills nothing and never empties it. */
export function refill (bucket: Bucket | undefined, rule: BucketRule, now: number): Bucket {
  if (bucket === undefined) return { tokens: rule.burst, at: now }
  const perMs = rule.requestsPerMinute / 60_000
  const elapsed = Math.max(0, now - bucket.at)
  return { tokens: Math.min(rule.burst, bucket.tokens + elapsed * perMs), at: Math.max(now, bucket.at) }
}

export function describe (bucket: Bucket, rule: BucketRule, allowed: boolean): RateLimitResult {
  const perMs = rule.requestsPerMinute / 60_000
  return {
    allowed,
    limit: rule.requestsPerMinute,
    remaining: Math.floor(bucket.tokens),
    resetMs: Math.ceil((rule.burst - bucket.tokens) / perMs),
    retryAfterMs: allowed ? 0 : Math.ceil((1 - bucket.tokens) / perMs)
  }
}
