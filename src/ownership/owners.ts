// Who owns a conversation or a response, and the metadata rules that carry the answer. The upstream object itself
// holds its owner in its metadata under the reserved key `gateway_owner`, written by the gateway on create and kept
// on update, so the owner survives restarts and holds across replicas with no store of our own; a bounded cache
// (id → owner, TTL) saves the lookup on every call but the first. Clients never see or set the key.
import { LRUCache } from 'lru-cache'
import { LosslessNumber } from 'lossless-json'
import { withoutKeys } from '../keys.js'

export const OWNER_KEY = 'gateway_owner'
/** OpenAI allows 16 metadata keys; the gateway needs one of them. */
export const MAX_METADATA_KEYS = 16

/** A conversation's owner: a client id, null for one not created through the gateway, or no such conversation. */
export type Owner = { owner: string | null } | 'missing'

/** OpenAI's metadata: keys of at most 64 characters, values strings of at most 512. */
export const MAX_METADATA_KEY_LENGTH = 64
export const MAX_METADATA_VALUE_LENGTH = 512

export type MetadataProblem =
  /** `key`: the reserved key named (`gateway_owner`, in whatever case it came, or `__proto__`) */
  | { kind: 'reserved', key: string }
  | { kind: 'limit' }
  /** `param` names what is wrong: `metadata`, or `metadata.<key>` for a key's value; null for the body itself */
  | { kind: 'not_object', param: string | null }

type Json = Record<string, unknown>

/**
 * A JSON object: not null, not an array, and not a number read exactly (http/json.ts keeps a number JSON.parse
 * would round as a LosslessNumber, an object of its own: a metadata of `12345678901234567890` is no map).
 */
export function isObject (value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof LosslessNumber)
}

/** What is wrong with the `metadata` a client sends on create or update, if anything. */
export function metadataProblem (body: unknown): MetadataProblem | null {
  const notObject = { kind: 'not_object', param: 'metadata' } as const
  if (body === undefined) return null
  // (A body that is not an object has no parameter to name: OpenAI's param is null for the body itself.)
  if (!isObject(body)) return { kind: 'not_object', param: null }
  // A key spelled like metadata in another case would be metadata to an upstream whose JSON reader matches keys
  // without regard to case (Go's does), and it would go as the client sent it: refused, as the API knows none.
  if (otherCaseKey(body, ['metadata']) !== null) return notObject
  const metadata = body.metadata
  if (metadata === undefined || metadata === null) return null
  if (!isObject(metadata)) return notObject
  if (Object.hasOwn(metadata, OWNER_KEY)) return { kind: 'reserved', key: OWNER_KEY }
  const reserved = otherCaseKey(metadata, [OWNER_KEY])
  if (reserved !== null) return { kind: 'reserved', key: reserved === PROTOTYPE_KEY ? PROTOTYPE_KEY : OWNER_KEY }
  if (Object.keys(metadata).length >= MAX_METADATA_KEYS) return { kind: 'limit' }
  // What OpenAI refuses, the gateway does not pass on as if it were a map of strings: the upstream would refuse
  // it, or keep a value no SDK's type (a map of strings) describes.
  for (const key in metadata) {
    if (longerThan(key, MAX_METADATA_KEY_LENGTH)) return notObject
  }
  for (const key in metadata) {
    const value = metadata[key]
    if (typeof value !== 'string' || longerThan(value, MAX_METADATA_VALUE_LENGTH)) {
      return { kind: 'not_object', param: `metadata.${withoutKeys(key)}` }
    }
  }
  return null
}

/** Whether `text` has more than `max` characters as OpenAI counts them (code points: an emoji is one). */
function longerThan (text: string, max: number): boolean {
  // (Each code point is one or two UTF-16 units: only a text between max and twice max units needs counting.)
  if (text.length <= max || text.length > 2 * max) return text.length > max
  let count = 0
  for (const _ of text) count++
  return count > max
}

/**
 * A key as a JSON reader blind to case matches it. Go's folds each rune to ToUpper(ToLower(r)), by Unicode's simple
 * mappings, and four runes outside ASCII fold to an ASCII letter that way: ſ (s), the Kelvin sign K (k), and the
 * Turkish ı and İ (i). JavaScript's toLowerCase takes K to k but leaves ſ and ı alone and makes İ two characters,
 * so those three are replaced first.
 */
export function folded (key: string): string {
  return key.replace(/\u017f/g, 's').replace(/[\u0130\u0131]/g, 'i').toLowerCase()
}

/**
 * A key that stands for every key in a JavaScript reader: JSON.parse makes `"__proto__"` an own key, but a copy made
 * by assignment (`Object.assign({}, body)`, a `for...in` copy) makes its value the copy's prototype, and each key
 * of it then reads as the copy's own where the copy has none (`body.previous_response_id`).
 */
const PROTOTYPE_KEY = '__proto__'

/**
 * The first key of `object` that a reader blind to case would take for one of `keys` without being it
 * (`Conversation`, `ID`, `previouſ_response_id`, `Metadata`, `GATEWAY_OWNER`), or `__proto__`, which a JavaScript
 * reader may take for any (PROTOTYPE_KEY), with its path from `at`, or null. Such a key is nothing to OpenAI, but an
 * upstream whose JSON reader matches keys without regard to case (Go's does) reads it as the key the gateway
 * checked under its exact name, and the later of the two wins there.
 */
export function otherCaseKey (object: unknown, keys: readonly string[], at = ''): string | null {
  if (!isObject(object)) return null
  for (const k in object) {
    if (k === PROTOTYPE_KEY || (!keys.includes(k) && keys.includes(folded(k)))) return at + k
  }
  return null
}

/** The create body with the owner added to its metadata. */
export function createBody (body: unknown, owner: string): Json {
  const object = isObject(body) ? body : {}
  const metadata = isObject(object.metadata) ? object.metadata : {}
  return { ...object, metadata: { ...metadata, [OWNER_KEY]: owner } }
}

/**
 * The update body with the owner merged back: a client's `metadata` replaces the whole map upstream (null
 * included), so without this an update would erase the owner. Null when the body can go as it is.
 */
export function updateBody (body: unknown, owner: string | null): Json | null {
  if (owner === null || !isObject(body) || !Object.hasOwn(body, 'metadata')) return null
  const metadata = isObject(body.metadata) ? body.metadata : {}
  return { ...body, metadata: { ...metadata, [OWNER_KEY]: owner } }
}

/**
 * An answer or a streamed event as a client may see it: every `metadata` map in it, at any depth (the object
 * itself, a response in an event, an item that repeats it), without the owner key. The same value when there is
 * none, so an answer with nothing to take out goes out as the upstream's bytes.
 */
export function withoutOwner<T> (value: T): T {
  if (Array.isArray(value)) {
    let copy: unknown[] | null = null
    value.forEach((v: unknown, i) => {
      const w = withoutOwner(v)
      if (w !== v) (copy ??= [...value])[i] = w
    })
    return (copy ?? value) as T
  }
  if (!isObject(value)) return value
  let copy: Json | null = null
  for (const key in value) {
    const v = value[key]
    let w: unknown
    if (key === 'metadata' && isObject(v) && Object.hasOwn(v, OWNER_KEY)) {
      const { [OWNER_KEY]: _owner, ...rest } = v
      w = withoutOwner(rest)
    } else {
      w = withoutOwner(v)
    }
    if (w !== v) (copy ??= { ...value })[key] = w
  }
  return (copy ?? value) as T
}

/** What the gateway owns: conversations and responses, each an upstream object with metadata. */
export type Owned = 'conversation' | 'response'

/** The conversation a response is to be created in: `conversation` as a string id or `{ id }`. */
export function conversationParam (body: unknown): string | undefined {
  const value = (body as { conversation?: unknown } | undefined)?.conversation
  if (typeof value === 'string') return value
  const id = (value as { id?: unknown } | null | undefined)?.id
  return typeof id === 'string' ? id : undefined
}

/** The owner key's value in an object's metadata, or undefined when it has none. */
export function ownerIn (object: unknown): unknown {
  const metadata = isObject(object) ? object.metadata : undefined
  return isObject(metadata) ? metadata[OWNER_KEY] : undefined
}

/** The owner recorded in an upstream object; throws when the answer is not the object asked for. */
export function ownerOf (answer: unknown, id: string, kind: Owned): { owner: string | null } {
  if (!isObject(answer) || answer.object !== kind || answer.id !== id) {
    throw new Error(`the lookup answer is not the ${kind} asked for`)
  }
  const metadata = answer.metadata
  if (metadata !== undefined && metadata !== null && !isObject(metadata)) throw new Error('the conversation metadata is not an object')
  const owner = isObject(metadata) ? metadata[OWNER_KEY] : undefined
  return { owner: typeof owner === 'string' && owner !== '' ? owner : null }
}

export interface OwnerCacheOptions {
  max: number
  ttlMs: number
  /** how long "no such conversation" is remembered */
  missingTtlMs: number
}

/** One upstream lookup that callers of the same object wait on together. */
interface Lookup {
  owner: Promise<Owner>
  /** callers still waiting on it */
  waiting: number
  /** stops the upstream call (every caller has gone) */
  abandon: () => void
}

/**
 * (kind, id) → owner, bounded in count and age. Concurrent lookups of one object share one upstream call, which
 * belongs to no one caller: a caller that goes away stops waiting, and the call is stopped only once every caller
 * has gone. An owner never changes (an object keeps the id of the client that created it), so a cached owner is
 * only ever stale for an object deleted since: the upstream answers that call with its own 404. Keys carry the
 * kind: ids are checked by shape only, and "no such response" said of a conversation's id must not hide the
 * conversation.
 */
export class OwnerCache {
  readonly #cache: LRUCache<string, Owner>
  readonly #inFlight = new Map<string, Lookup>()
  readonly #missingTtlMs: number
  /** Objects refused to a stranger lately, remembered as long as a missing one is (refusedLately). */
  readonly #refused: LRUCache<string, true> | null

  constructor (opts: OwnerCacheOptions) {
    this.#cache = new LRUCache<string, Owner>({ max: opts.max, ttl: opts.ttlMs })
    this.#missingTtlMs = opts.missingTtlMs
    this.#refused = opts.missingTtlMs > 0 ? new LRUCache<string, true>({ max: opts.max, ttl: opts.missingTtlMs }) : null
  }

  /**
   * Whether a `kind` with `id` was refused to a client that may not act on it within the last missingTtlMs. A
   * refusal is answered as a missing id is: after a lookup upstream, then at once while this remembers it, so
   * that how soon a stranger is answered does not tell an object in use (its owner cached) from none.
   */
  refusedLately (kind: Owned, id: string): boolean {
    return this.#refused?.get(`${kind}:${id}`) === true
  }

  /**
   * Remembers a refusal for missingTtlMs from the lookup it followed. One answered from the remembered refusal does
   * not remember it again: a missing id is remembered for missingTtlMs from its lookup, however often it is asked
   * for, so a stranger asking more often than that would otherwise be answered at once for ever for an object,
   * and after a lookup now and then for none.
   */
  noteRefused (kind: Owned, id: string): void {
    const key = `${kind}:${id}`
    if (this.#refused?.has(key) === false) this.#refused.set(key, true)
  }

  /** The cached owner of a `kind` with `id`, if any: the common case, answered with no promise. */
  get (kind: Owned, id: string): Owner | undefined {
    return this.#cache.get(`${kind}:${id}`)
  }

  /** The cached owner, as get gives it, without making it more recently used: for a record, not for a call. */
  peek (kind: Owned, id: string): Owner | undefined {
    return this.#cache.peek(`${kind}:${id}`)
  }

  /**
   * The owner from `fetch` (which is given where to register what stops its call), joined with a lookup of the
   * same object under way if there is one. `whenCallerGone` registers what to run when this caller goes away:
   * its answer then fails with the reason given.
   */
  lookUp (kind: Owned, id: string, fetch: (whenAbandoned: (abort: () => void) => void) => Promise<Owner>,
    whenCallerGone: (leave: (reason: Error) => void) => void): Promise<Owner> {
    const key = `${kind}:${id}`
    const lookup = this.#inFlight.get(key) ?? this.#start(key, fetch)
    return this.#wait(key, lookup, whenCallerGone)
  }

  #start (key: string, fetch: (whenAbandoned: (abort: () => void) => void) => Promise<Owner>): Lookup {
    let abort = (): void => {}
    const lookup: Lookup = {
      owner: fetch(stop => { abort = stop }).then(owner => {
        // A lookup forgotten by a delete under way read the object as it was before: its owner is not kept.
        if (this.#inFlight.get(key) !== lookup) return owner
        if (owner !== 'missing') this.#cache.set(key, owner)
        else if (this.#missingTtlMs > 0) this.#cache.set(key, owner, { ttl: this.#missingTtlMs })
        return owner
      }).finally(() => { this.#forget(key, lookup) }),
      waiting: 0,
      abandon: () => { abort() }
    }
    this.#inFlight.set(key, lookup)
    return lookup
  }

  #wait (key: string, lookup: Lookup, whenCallerGone: (leave: (reason: Error) => void) => void): Promise<Owner> {
    lookup.waiting++
    return new Promise<Owner>((resolve, reject) => {
      let settled = false
      lookup.owner.then(owner => { settled = true; resolve(owner) }, (err: unknown) => { settled = true; reject(err) })
      whenCallerGone(reason => {
        if (settled) return
        settled = true
        reject(reason)
        if (--lookup.waiting > 0) return
        // No one waits any more: a caller that comes now starts a call of its own rather than join a stopped one.
        this.#forget(key, lookup)
        lookup.abandon()
      })
    })
  }

  #forget (key: string, lookup: Lookup): void {
    if (this.#inFlight.get(key) === lookup) this.#inFlight.delete(key)
  }

  set (kind: Owned, id: string, owner: string): void {
    this.#cache.set(`${kind}:${id}`, { owner })
  }

  /**
   * Forgets the owner of an object being deleted, and any lookup of it under way: called when the delete is
   * authorized and again when the upstream has answered it, so that a lookup answered in between (the object not yet
   * deleted) does not keep the owner of an object that no longer exists. (Its callers still get what it found.)
   */
  delete (kind: Owned, id: string): void {
    const key = `${kind}:${id}`
    this.#cache.delete(key)
    this.#inFlight.delete(key)
  }
}
