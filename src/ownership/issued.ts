// Items a response's answer hands a client, which it may name by id later, outside any conversation: a reasoning
// item without its `encrypted_content` (`{ "type": "reasoning", "id": "rs_..." }`), which the upstream fills in from
// storage by its id, and any output item named by an `item_reference` (as the Vercel AI SDK sends earlier turns
// with `store: true`). Clients pass a response's output back as it came (`input: [...input, ...response.output]`,
// OpenAI's function-calling loop): there is no object with an owner to ask, only the answer the gateway passed on.
// So the gateway notes each output item's id it hands a client (id → client id), and a client may name one by id
// only when it was handed to that client. The note lives as long as OpenAI keeps a stored response (30 days): in
// memory (bounded, least recently used go first), and in Redis too when the rate-limit store is Redis, so that
// every replica knows what any replica handed out.
import { LRUCache } from 'lru-cache'
import type { StoreLogger } from '../stores/redis.js'

/** How long an issued id is remembered: OpenAI keeps a stored response, and its items, for 30 days. */
export const ISSUED_TTL_MS = 30 * 24 * 60 * 60 * 1000

/** The Redis side (stores/redis.ts): a string per key, with a TTL. */
export interface SharedNotes {
  /** Writes `value` under `key` for `ttlMs`; rejects when Redis does not take it. */
  note (key: string, value: string, ttlMs: number): Promise<void>
  /** The values under `keys` (null where none); rejects when Redis cannot answer. */
  recall (keys: readonly string[]): Promise<Array<string | null>>
  /**
   * Whether Redis takes writes now. While it refuses them (full under `noeviction`, a node a failover turned
   * read-only) it may still answer reads, but the notes other replicas hand out meanwhile are not in it: a key
   * without one then says nothing.
   */
  takingNotes (): boolean
  /**
   * Calls `listener` each time a connection to Redis is made again after the first and Redis has lost what it held
   * (restarted without persistence, flushed): its notes gone with it.
   */
  onEmptied (listener: () => void): void
}

/** What IssuedItems.issuedTo knows of some ids: which went out to the caller, which to whom else. */
export interface Issued {
  handedOut: Set<string>
  /** id → the client it went out to, for ids that went out to another client than the caller */
  others: Map<string, string>
  /** Redis could not say for some id this process does not know as the caller's */
  unanswered: boolean
}

export interface IssuedItemsOptions {
  /** ids remembered in this process at most */
  max: number
  shared?: SharedNotes | null
  log: StoreLogger
}

const KEY = (id: string) => `issued:${id}`
const WARN_INTERVAL_MS = 10_000
/** Notes Redis did not take are tried again this often, calls or none, until it has taken them all. */
const RETRY_MS = 1_000
/** Notes written again together, in one round trip (#shareMissed). */
const SHARE_BATCH = 100
const UNANSWERED = 'did not answer; calls naming by id items this replica did not hand out get 503 rate_limit_store_unavailable'
const NOT_TAKING = 'takes no notes; calls naming by id items this replica did not hand out, and Redis has no note of, get 503 rate_limit_store_unavailable'
const NOT_NOTED = 'could not note; until it is written again, the other replicas check those items as any other reference'

export class IssuedItems {
  readonly #local: LRUCache<string, string>
  /**
   * The notes Redis did not take (down, its connection lost for a moment, a write refused), by id: lost, each
   * would leave its item unknown to every other replica for good, and the client's loop refused there on every
   * later call. They are written again at the next note or recall, and every RETRY_MS until they are (a replica the
   * load balancer sends only reads makes neither), at most `max` of them, for as long as each note lasts.
   */
  readonly #unshared: LRUCache<string, string>
  readonly #shared: SharedNotes | null
  readonly #log: StoreLogger
  #lastWarning = -Infinity
  #sharing = false
  /** Tries the notes Redis did not take again while there are any (see #unshared). */
  #retry: NodeJS.Timeout | null = null

  constructor ({ max, shared = null, log }: IssuedItemsOptions) {
    this.#local = new LRUCache<string, string>({ max, ttl: ISSUED_TTL_MS })
    this.#unshared = new LRUCache<string, string>({ max, ttl: ISSUED_TTL_MS })
    this.#shared = shared
    this.#log = log
    shared?.onEmptied(() => { this.#shareAgain() })
  }

  /**
   * Redis is connected again, and has lost what it held (restarted without persistence): every note this process knows is written again, for what
   * is left of it, as those Redis did not take are (a note Redis still has stays as it is: the first writer keeps it).
   * Else an item handed out before a restart of Redis would be refused, for the rest of its 30 days, on every replica
   * but the one that knows it.
   */
  #shareAgain (): void {
    for (const [id, owner] of this.#local.entries()) {
      this.#unshared.set(id, owner, { ttl: Math.max(1, Math.ceil(this.#local.getRemainingTTL(id))) })
    }
    if (this.#unshared.size === 0) return
    this.#retry ??= setInterval(() => { void this.#shareMissed() }, RETRY_MS).unref()
    void this.#shareMissed()
  }

  /** `ids` went out to `owner` in an answer. The first owner noted for an id keeps it, here and in Redis. */
  note (ids: readonly string[], owner: string): void {
    void this.#shareMissed()
    for (const id of ids) {
      if (this.#local.has(id)) continue // (an answer retrieved again, or a stream's later event: no second write)
      this.#local.set(id, owner)
      // Not waited for: a note the other replicas lack makes them check that id as any other reference, until
      // it is written again.
      this.#shared?.note(KEY(id), owner, ISSUED_TTL_MS).catch((err: unknown) => {
        this.#unshared.set(id, owner)
        this.#retry ??= setInterval(() => { void this.#shareMissed() }, RETRY_MS).unref()
        this.#warn(err, NOT_NOTED)
      })
    }
  }

  /**
   * Writes the notes Redis did not take, SHARE_BATCH at a time (sent together, one round trip), until it refuses one
   * again (then at the next chance). Each batch is taken from the cache as it is written: no copy of all of them,
   * which may be every note this process knows (#shareAgain), made each second while Redis stays down.
   */
  async #shareMissed (): Promise<void> {
    if (this.#unshared.size === 0) this.close() // (all written, or expired: nothing to try again)
    if (this.#sharing || this.#unshared.size === 0 || this.#shared === null) return
    const shared = this.#shared
    this.#sharing = true
    try {
      for (;;) {
        // (An expired note is not listed; one about to expire is written for what is left of it, at least 1 ms.)
        const batch: Array<[string, string, number]> = []
        for (const [id, owner] of this.#unshared.entries()) {
          batch.push([id, owner, Math.max(1, Math.ceil(this.#unshared.getRemainingTTL(id)))])
          if (batch.length === SHARE_BATCH) break
        }
        if (batch.length === 0) break
        await Promise.all(batch.map(async ([id, owner, ttl]) => {
          await shared.note(KEY(id), owner, ttl)
          this.#unshared.delete(id)
        }))
      }
    } catch (err) {
      this.#warn(err, NOT_NOTED)
    } finally {
      this.#sharing = false
    }
  }

  /** Stops trying the notes Redis did not take again (the app closes, or none is left). */
  close (): void {
    clearInterval(this.#retry ?? undefined)
    this.#retry = null
  }

  #warn (err: unknown, what: string): void {
    const now = Date.now()
    if (now - this.#lastWarning < WARN_INTERVAL_MS) return
    this.#lastWarning = now
    this.#log.warn({ reason: err instanceof Error ? err.message : String(err) }, `issued items: Redis ${what}`)
  }

  /**
   * The ids among `ids` that went out to `owner`; those known to have gone out to another client, with whom (for
   * the audit: the client's answer is the same as for an unknown id); and whether Redis could not say for an id
   * this process does not know as the owner's (`unanswered`): one it does not know at all may be the owner's all
   * the same, handed out by another replica, so the caller must not refuse it as another team's (ownership.ts
   * answers 503), and one it knows as another's gets the same answer, which must not tell the two apart.
   */
  async issuedTo (ids: readonly string[], owner: string): Promise<Issued> {
    void this.#shareMissed()
    const found: Issued = { handedOut: new Set<string>(), others: new Map<string, string>(), unanswered: false }
    const sort = (id: string, to: string) => {
      if (to === owner) found.handedOut.add(id)
      else found.others.set(id, to)
    }
    // Redis is asked of every id not known here as the caller's, those known as another client's too: refused at
    // once while an id known to no one waits on Redis (and gets its 503 when Redis does not answer), they would
    // tell a stranger which ids went out to another team.
    const asked: string[] = []
    for (const id of ids) {
      const known = this.#local.get(id)
      if (known !== undefined) sort(id, known)
      if (known !== owner) asked.push(id)
    }
    if (asked.length === 0 || this.#shared === null) return found
    try {
      const owners = await this.#shared.recall(asked.map(KEY))
      // An id with no note, while Redis refuses writes, may have gone to the caller through another replica whose
      // note Redis did not take: as unsure as an id Redis did not answer for. So is one noted as another client's
      // then (the same 503 for every id not the caller's, as when Redis does not answer at all): refused at once,
      // beside a 503 for an id with no note, it would tell a stranger which ids went out to another team.
      const unsure = !this.#shared.takingNotes()
      asked.forEach((id, i) => {
        const shared = owners[i]
        if (unsure && shared !== owner) found.unanswered = true
        if (typeof shared !== 'string' || found.others.has(id)) return // (what this replica handed out stands)
        this.#local.set(id, shared)
        sort(id, shared)
      })
      if (found.unanswered) this.#warn(new Error('it refuses writes'), NOT_TAKING)
      return found
    } catch (err) {
      this.#warn(err, UNANSWERED)
      return { ...found, unanswered: true }
    }
  }
}

/** The container an item ran in (a code interpreter call's `container_id`, a shell call's `environment.container_id`). */
function containersOf (item: unknown): string[] {
  const { container_id: container, environment } = (item ?? {}) as { container_id?: unknown, environment?: unknown }
  const inEnvironment = (environment as { container_id?: unknown } | null | undefined)?.container_id
  return [container, inEnvironment].filter((value): value is string => typeof value === 'string')
}

/** An item's id, and the container it ran in. */
function itemIds (item: unknown): string[] {
  const id = (item as { id?: unknown } | null | undefined)?.id
  return typeof id === 'string' ? [id, ...containersOf(item)] : containersOf(item)
}

/**
 * The ids of the output items an answer or a streamed event hands out: each item with an id in a response's
 * `output` (an answer, or `response` in an event) or an event's `item`; and the containers those items ran in (a
 * code interpreter call's `container_id`, a shell call's `environment.container_id`), which a client passing the
 * items back names too (plugins/ownership.ts, itemContainers). (Container and item ids never look alike: `cntr_`.)
 */
export function outputIdsIn (object: unknown): string[] {
  const ids: string[] = []
  const outputOf = (value: unknown) => {
    const output = (value as { output?: unknown } | null)?.output
    if (Array.isArray(output)) output.forEach(item => ids.push(...itemIds(item)))
  }
  if (object === null || typeof object !== 'object') return ids
  outputOf(object)
  const { response, item } = object as { response?: unknown, item?: unknown }
  outputOf(response)
  if (item !== null && typeof item === 'object') ids.push(...itemIds(item))
  return ids
}

/**
 * The containers the items of a listing of an owned object's items ran in (a conversation's items, a response's
 * input items: `data`), or an item retrieved alone: a client forking a conversation passes them back as they came.
 * (Not the items' ids: an item's id in a conversation is what its creator gave, and says nothing of who it went to.)
 */
export function listedContainersIn (object: unknown): string[] {
  if (object === null || typeof object !== 'object') return []
  const { object: kind, data } = object as { object?: unknown, data?: unknown }
  if (kind === 'list') return Array.isArray(data) ? data.flatMap(containersOf) : []
  return containersOf(object)
}
