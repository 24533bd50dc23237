/** A store that cannot answer right now (Redis down or slow): the caller decides what a refusal means. */
export class StoreUnavailableError extends Error {
    constructor(reason) {
        super(`rate-limit store unavailable: ${reason}`);
        this.name = 'StoreUnavailableError';
    }
}
export function checkCost(cost, what = 'cost') {
    if (!Number.isFinite(cost) || cost < 0)
        throw new RangeError(`${what} must be a finite number ≥ 0, got ${cost}`);
}
/**
 * Tokens are fractions summed step by step, so a bucket refilled in two steps can miss a whole token by a
 * rounding error (0.999 + 0.001 < 1 in floating point). Anything this close counts as there.
 */
export const TOKEN_EPSILON = 1e-9;
/** Whether `tokens` cover `cost`, forgiving the rounding of refills. */
export function covers(tokens, cost) {
    return tokens + TOKEN_EPSILON >= cost;
}
/** Refills `bucket` up to `now`; a clock that went backwards refills nothing and never empties it. */
export function refill(bucket, rule, now) {
    if (bucket === undefined)
        return { tokens: rule.burst, at: now };
    const perMs = rule.requestsPerMinute / 60_000;
    const elapsed = Math.max(0, now - bucket.at);
    return { tokens: Math.min(rule.burst, bucket.tokens + elapsed * perMs), at: Math.max(now, bucket.at) };
}
export function describe(tokens, rule, allowed, cost = 1) {
    const perMs = rule.requestsPerMinute / 60_000;
    return {
        allowed,
        limit: rule.requestsPerMinute,
        remaining: Math.max(0, Math.floor(tokens + TOKEN_EPSILON)),
        resetMs: Math.ceil((rule.burst - tokens) / perMs),
        retryAfterMs: allowed ? 0 : Math.ceil((cost - tokens) / perMs)
    };
}
//# sourceMappingURL=rate-limit-store.js.map