// Who a presented key belongs to. Keys are looked up by their sha256 digest, so the gateway holds no key, and
// every unknown, expired or malformed key takes the same path to the same answer. A bounded cache remembers keys
// already found valid, so a client's key is hashed once, not on every call; unknown keys are never remembered, so
// any number of wrong keys leaves memory as it was. `update` swaps the whole directory (config reload).
import { LRUCache } from 'lru-cache'
import type { ClientConfig } from './config.js'
import { keyDigest } from './keys.js'

export interface KeyHolder {
  client: ClientConfig
  /** the key's id in `keys`; null for the single-key form (keySha256) */
  keyId: string | null
  /** ms since the epoch after which the key is refused; null: never */
  expiresAt: number | null
}

function holders (clients: readonly ClientConfig[]): Map<string, KeyHolder> {
  const byDigest = new Map<string, KeyHolder>()
  for (const client of clients) {
    if (client.keySha256 !== undefined) byDigest.set(client.keySha256, { client, keyId: null, expiresAt: null })
    for (const key of client.keys ?? []) {
      byDigest.set(key.sha256, { client, keyId: key.id, expiresAt: key.expiresAt === undefined ? null : Date.parse(key.expiresAt) })
    }
  }
  return byDigest
}

export class ClientDirectory {
  #byDigest: Map<string, KeyHolder>
  #byId: Map<string, ClientConfig>
  #valid: LRUCache<string, KeyHolder>
  readonly #now: () => number

  constructor (clients: readonly ClientConfig[], now: () => number = Date.now) {
    this.#now = now
    this.#byDigest = holders(clients)
    this.#byId = new Map(clients.map(c => [c.id, c]))
    this.#valid = new LRUCache({ max: Math.max(1, this.#byDigest.size) })
  }

  /** Whether `id` is a configured client (now). */
  hasClient (id: string): boolean {
    return this.#byId.has(id)
  }

  /** The client `id` as configured now (a reload may have changed it since a call was admitted), if it still is. */
  client (id: string): ClientConfig | undefined {
    return this.#byId.get(id)
  }

  /** The holder of `key`, or null when the key is unknown or expired. */
  find (key: string): KeyHolder | null {
    const holder = this.#valid.get(key) ?? this.#byDigest.get(keyDigest(key))
    if (holder === undefined) return null
    if (holder.expiresAt !== null && this.#now() >= holder.expiresAt) {
      this.#valid.delete(key)
      return null
    }
    this.#valid.set(key, holder)
    return holder
  }

  /**
   * The holder of `key` when it is a key that has expired, else null. For the audit only (who still sends an old
   * key): the call is refused as any unknown key is. Runs on the refusal path alone.
   */
  expired (key: string): KeyHolder | null {
    const holder = this.#byDigest.get(keyDigest(key))
    return holder !== undefined && holder.expiresAt !== null && this.#now() >= holder.expiresAt ? holder : null
  }

  update (clients: readonly ClientConfig[]): void {
    this.#byDigest = holders(clients)
    this.#byId = new Map(clients.map(c => [c.id, c]))
    this.#valid = new LRUCache({ max: Math.max(1, this.#byDigest.size) })
  }
}
