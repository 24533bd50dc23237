// Who a presented key belongs to. Keys are looked up by their sha256 digest, so the gateway holds no key, and
// every unknown, expired or malformed key takes the same path to the same answer. A bounded cache remembers keys
// already found valid, so a client's key is hashed once, not on every call; unknown keys are never remembered, so
// any number of wrong keys leaves memory as it was. `update` swaps the whole directory (config reload).
import { LRUCache } from 'lru-cache';
import { keyDigest } from './keys.js';
function holders(clients) {
    const byDigest = new Map();
    for (const client of clients) {
        if (client.keySha256 !== undefined)
            byDigest.set(client.keySha256, { client, keyId: null, expiresAt: null });
        for (const key of client.keys ?? []) {
            byDigest.set(key.sha256, { client, keyId: key.id, expiresAt: key.expiresAt === undefined ? null : Date.parse(key.expiresAt) });
        }
    }
    return byDigest;
}
export class ClientDirectory {
    #byDigest;
    #ids;
    #valid;
    #now;
    constructor(clients, now = Date.now) {
        this.#now = now;
        this.#byDigest = holders(clients);
        this.#ids = new Set(clients.map(c => c.id));
        this.#valid = new LRUCache({ max: Math.max(1, this.#byDigest.size) });
    }
    /** Whether `id` is a configured client (now). */
    hasClient(id) {
        return this.#ids.has(id);
    }
    /** The holder of `key`, or null when the key is unknown or expired. */
    find(key) {
        const holder = this.#valid.get(key) ?? this.#byDigest.get(keyDigest(key));
        if (holder === undefined)
            return null;
        if (holder.expiresAt !== null && this.#now() >= holder.expiresAt) {
            this.#valid.delete(key);
            return null;
        }
        this.#valid.set(key, holder);
        return holder;
    }
    update(clients) {
        this.#byDigest = holders(clients);
        this.#ids = new Set(clients.map(c => c.id));
        this.#valid = new LRUCache({ max: Math.max(1, this.#byDigest.size) });
    }
}
//# sourceMappingURL=clients.js.map