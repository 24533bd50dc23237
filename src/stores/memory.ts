// In-process buckets in a bounded LRU. Node runs one request's check-and-take without interleaving another's,
// so the take is atomic, and it answers synchronously: no promise per call. A monotonic clock: wall-clock jumps
// neither grant a burst nor lock a client out.
import { performance } from 'node:perf_hooks'
import { LRUCache } from 'lru-cache'
import {
  checkCost, covers, describe, refill, type Bucket, type BucketRule, type RateLimitResult, type RateLimitStore
} from './rate-limit-store.js'

/**
 * Buckets kept by default: two per client (its requests, its token budget) for 50,000 clients. Keys are only ever
 * configured clients' (an unknown key has no bucket), so this bounds a config far larger than any real one; a
 * bucket dropped comes back full, a fresh burst for a client drained on a slow limit, which a bound of the size of
 * a large config (issue 13's 10,000 clients with budgets: 20,000 buckets) would hand out just by rotation.
 */
export const DEFAULT_MAX_BUCKETS = 100_000

export interface MemoryStoreOptions {
  /** buckets kept; the least recently used is dropped past this (it comes back full) */
  max?: number
  now?: () => number
}

export class MemoryStore implements RateLimitStore {
  readonly #buckets: LRUCache<string, Bucket>
  readonly #now: () => number

  constructor ({ max = DEFAULT_MAX_BUCKETS, now = () => performance.now() }: MemoryStoreOptions = {}) {
    this.#buckets = new LRUCache({ max })
    this.#now = now
  }

  take (key: string, rule: BucketRule, cost = 1): RateLimitResult {
    checkCost(cost)
    const bucket = refill(this.#buckets.get(key), rule, this.#now())
    const allowed = covers(bucket.tokens, cost)
    if (allowed) bucket.tokens -= cost
    this.#buckets.set(key, bucket)
    return describe(bucket.tokens, rule, allowed, cost)
  }

  charge (key: string, rule: BucketRule, amount: number): RateLimitResult {
    checkCost(amount, 'amount')
    const bucket = refill(this.#buckets.get(key), rule, this.#now())
    bucket.tokens -= amount
    this.#buckets.set(key, bucket)
    return describe(bucket.tokens, rule, true)
  }

  rewrite (key: string, rule: BucketRule): void {
    this.charge(key, rule, 0)
  }

  peek (key: string, rule: BucketRule): RateLimitResult {
    const bucket = refill(this.#buckets.peek(key), rule, this.#now())
    return describe(bucket.tokens, rule, covers(bucket.tokens, 1))
  }

  available (): boolean {
    return true
  }

  async close (): Promise<void> {
    this.#buckets.clear()
  }
}
