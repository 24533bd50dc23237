// What the bench sends and to whom: its clients (deterministic keys, so a list of 10,000 costs nothing to make),
// the four requests of the mix, and the gateway's config with every feature on.
import { keyDigest } from '../src/keys.js';
import { ITEM_ID, OWNER_PREFIX } from './upstream.js';
/** A high enough rate limit never answers 429 during a bench, and still runs its check on every call. */
const NEVER_LIMITED = { requestsPerMinute: 1_000_000_000, burst: 1_000_000_000 };
/** Client number k: a key as long as a real one (`ogw_` + 43 characters). */
export function benchClient(k) {
    return { id: `bench-${String(k).padStart(5, '0')}`, key: `ogw_bench${String(k).padStart(38, '0')}` };
}
/** A key the gateway does not know, the k-th of its kind. */
export function wrongKey(k) {
    return `ogw_wrong${String(k).padStart(38, '0')}`;
}
const ITEMS_BODY = JSON.stringify({
    items: [{ type: 'message', role: 'user', content: [{ type: 'input_text', text: 'Hello from the bench' }] }]
});
/** The mix, on the conversation the client owns: get it, list its items, add items, delete an item. */
export function mixRequests(authorization, client) {
    const conversation = `/v1/conversations/${OWNER_PREFIX}${client.id}`;
    return [
        { method: 'GET', path: conversation, authorization, body: '' },
        { method: 'GET', path: `${conversation}/items`, authorization, body: '' },
        { method: 'POST', path: `${conversation}/items`, authorization, body: ITEMS_BODY },
        { method: 'DELETE', path: `${conversation}/items/${ITEM_ID}`, authorization, body: '' }
    ];
}
/**
 * The gateway's config: every feature it has is on (keys, scopes, rate limits, body checks, the audit file
 * with its default durability). When a feature lands that is off by default, turn it on here.
 */
export function gatewayConfig(upstreamUrl, token, clients, auditFile) {
    return {
        listen: { host: '127.0.0.1', port: 0 },
        log: { level: 'warn' },
        upstream: { baseUrls: [upstreamUrl], apiKey: token },
        clients: clients.map(c => ({
            id: c.id, keySha256: keyDigest(c.key), scopes: ['read', 'write', 'delete'], rateLimit: NEVER_LIMITED
        })),
        audit: { file: auditFile }
    };
}
//# sourceMappingURL=clients.js.map