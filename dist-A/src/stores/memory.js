// In-process buckets in a bounded LRU. Node runs one request's check-and-take without interleaving another's,
// so the take is atomic, and it answers synchronously: no promise per call. A monotonic clock: wall-clock jumps
// neither grant a burst nor lock a client out.
import { performance } from 'node:perf_hooks';
import { LRUCache } from 'lru-cache';
import { checkCost, covers, describe, refill } from './rate-limit-store.js';
export class MemoryStore {
    #buckets;
    #now;
    constructor({ max = 10_000, now = () => performance.now() } = {}) {
        this.#buckets = new LRUCache({ max });
        this.#now = now;
    }
    take(key, rule, cost = 1) {
        checkCost(cost);
        const bucket = refill(this.#buckets.get(key), rule, this.#now());
        const allowed = covers(bucket.tokens, cost);
        if (allowed)
            bucket.tokens -= cost;
        this.#buckets.set(key, bucket);
        return describe(bucket.tokens, rule, allowed, cost);
    }
    charge(key, rule, amount) {
        checkCost(amount, 'amount');
        const bucket = refill(this.#buckets.get(key), rule, this.#now());
        bucket.tokens -= amount;
        this.#buckets.set(key, bucket);
        return describe(bucket.tokens, rule, true);
    }
    peek(key, rule) {
        const bucket = refill(this.#buckets.peek(key), rule, this.#now());
        return describe(bucket.tokens, rule, covers(bucket.tokens, 1));
    }
    async close() {
        this.#buckets.clear();
    }
}
//# sourceMappingURL=memory.js.map