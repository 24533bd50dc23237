// In-process buckets in a bounded LRU. Node runs one request's check-and-take without interleaving another's,
// so the take is atomic, and it answers synchronously: no promise per call. A monotonic clock: wall-clock jumps
// neither grant a burst nor lock a client out.
import { performance } from 'node:perf_hooks'
import { LRUCache } from 'lru-cache'
import {
  checkCost, covers, describe, refill, type Bucket, type BucketRule, type RateLimitResult, type RateLimitStore
} from './rate-limit-store.js'

export interface MemoryStoreOptions {
  /** buckets kept; the least recently used is dropped past this (it comes back full) */
  max?: number
  now?: () => number
}

export class MemoryStore implements RateLimitStore {
  readonly #buckets: LRUCache<string, Bucket>
  readonly #now: () => number

  constructor ({ max = 10_000, now = () => performance.now() }: MemoryStoreOptions = {}) {
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
