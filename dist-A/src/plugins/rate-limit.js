import fp from 'fastify-plugin';
import { RateLimitExceededError, RateLimitStoreUnavailableError, TokensRateLimitError } from '../errors.js';
import { whenClosed } from '../http/response.js';
import { tokensUsed } from '../responses/usage.js';
import { whenAnswered } from '../answer.js';
import { StoreUnavailableError } from '../stores/rate-limit-store.js';
/** OpenAI's duration format for x-ratelimit-reset-*: "20ms", "1s", "6m0s", "1h2m3s". */
export function formatDuration(ms) {
    if (ms < 1000)
        return `${Math.max(0, Math.ceil(ms))}ms`;
    const totalSeconds = Math.ceil(ms / 1000);
    const h = Math.floor(totalSeconds / 3600);
    const m = Math.floor((totalSeconds % 3600) / 60);
    const s = totalSeconds % 60;
    if (h > 0)
        return `${h}h${m}m${s}s`;
    if (m > 0)
        return `${m}m${s}s`;
    return `${s}s`;
}
function headers(result) {
    return {
        'x-ratelimit-limit-requests': String(result.limit),
        'x-ratelimit-remaining-requests': String(result.remaining),
        'x-ratelimit-reset-requests': formatDuration(result.resetMs)
    };
}
const storeFailed = new WeakSet();
function retryHeaders(retryAfterMs) {
    return { 'retry-after': String(Math.max(1, Math.ceil(retryAfterMs / 1000))), 'retry-after-ms': String(retryAfterMs) };
}
function tokenHeaders(result) {
    return {
        'x-ratelimit-limit-tokens': String(result.limit),
        'x-ratelimit-remaining-tokens': String(result.remaining),
        'x-ratelimit-reset-tokens': formatDuration(result.resetMs)
    };
}
/** A client's token budget: `tokensPerMinute` of capacity, refilled at that rate, in its own bucket. */
function tokenRule(client) {
    const perMinute = client.rateLimit.tokensPerMinute;
    return perMinute === undefined ? null : { requestsPerMinute: perMinute, burst: perMinute };
}
const tokenKey = (client) => `tokens:${client.id}`;
export default fp(async function rateLimit(app, { store }) {
    app.decorateRequest('rateLimit', null);
    app.decorateRequest('tokenBudget', null);
    /** A store that cannot answer becomes the call's 503; no second wait on it for this call's headers. */
    function storeError(request, err) {
        if (!(err instanceof StoreUnavailableError))
            return err;
        storeFailed.add(request);
        return new RateLimitStoreUnavailableError();
    }
    /** Token budgets: a client whose answers have used up its tokens per minute gets 429 on its next generation,
     * until refill; what a call uses is known only from its answer, and charged when the call ends. */
    function checkBudget(request, reply, client, rule, done) {
        whenAnswered(() => store.peek(tokenKey(client), rule), budget => {
            request.tokenBudget = budget;
            if (!budget.allowed) {
                const err = new TokensRateLimitError(client.id, String(rule.requestsPerMinute), formatDuration(budget.retryAfterMs));
                err.headers = retryHeaders(budget.retryAfterMs);
                done(err);
                return;
            }
            whenClosed(reply.raw, () => {
                const used = request.responseFacts === null ? 0 : tokensUsed(request.responseFacts);
                if (used > 0)
                    chargeTokens(request, client, rule, used);
            });
            done();
        }, err => { done(storeError(request, err)); });
    }
    function chargeTokens(request, client, rule, used) {
        whenAnswered(() => store.charge(tokenKey(client), rule, used), () => { }, (err) => {
            request.log.warn({ err: { message: err.message }, clientId: client.id, tokens: used }, 'token budget could not be charged');
        });
    }
    // Callback style: the memory store answers at once, and this runs on every call.
    app.addHook('onRequest', (request, reply, done) => {
        const client = request.client;
        if (client === null) {
            done();
            return;
        }
        whenAnswered(() => store.take(client.id, client.rateLimit), result => {
            request.rateLimit = result;
            if (!result.allowed) {
                const err = new RateLimitExceededError(client.id, formatDuration(result.retryAfterMs));
                err.headers = retryHeaders(result.retryAfterMs);
                done(err);
                return;
            }
            const rule = tokenRule(client);
            if (rule === null || request.operation?.action !== 'response.create')
                done();
            else
                checkBudget(request, reply, client, rule, done);
        }, err => { done(storeError(request, err)); });
    });
    app.addHook('onSend', (request, reply, payload, done) => {
        const client = request.client;
        // An upstream 429 carries the upstream's own limit and headers (plugins/proxy.ts).
        if (client !== null && !storeFailed.has(request) && request.upstream?.status !== 429) {
            if (request.rateLimit !== null)
                reply.headers(headers(request.rateLimit));
            if (request.tokenBudget !== null)
                reply.headers(tokenHeaders(request.tokenBudget));
        }
        done(null, payload);
    });
    app.addHook('onClose', async () => { await store.close(); });
}, { name: 'rate-limit', dependencies: ['auth'] });
//# sourceMappingURL=rate-limit.js.map