// Ownership (404), after the body check and before the proxy: a team sees only the conversations and responses it
// created. Any other client gets 404 on every id route of one it does not own, exactly as if it did not exist, and
// the upstream is never asked to act on it (only the gateway's own lookup goes there). A response may only be
// created in a conversation, or after a previous response, that the client owns. `admin` clients act on every
// object (they still need the operation's own scope). The owner lives in the upstream object's metadata
// (ownership/owners.ts); this plugin writes it on create, keeps it on update, and takes it out of every object a
// client receives, streamed events included.
import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { then, whenAnswered, type Answer } from '../answer.js'
import { MAX_TIMER_MS, type ClientConfig } from '../config.js'
import {
  ConversationNotFoundError, ConversationNotOwnedError, CredentialsInBodyError, cutShort, InvalidListTypeError, InvalidMetadataError, InvalidRequestError, ItemContainerNotAllowedError, ItemNotFoundError,
  ItemNotOwnedError, ItemReferenceNotOwnedError, ItemReferenceOutsideConversationError, MetadataLimitError, TooManyItemReferencesError,
  PreviousResponseNotFoundError, PreviousResponseNotOwnedError, RateLimitStoreUnavailableError, ReservedMetadataKeyError, ResponseNotFoundError,
  ResponseNotOwnedError, StoreUnavailableNotOwnedError, UnknownParameterError, UpstreamAuthError, UpstreamRateLimitedError, UpstreamRefusedError, UpstreamTimeoutError, UpstreamUnavailableError, type GatewayError
} from '../errors.js'
import { holdsKey } from '../keys.js'
import { loggedError } from '../logging.js'
import { whenClosed } from '../http/response.js'
import { ID_PATTERN, MAX_ID_LENGTH, queryParam, type Action } from '../operations.js'
import {
  conversationParam, createBody, folded, isObject, metadataProblem, OWNER_KEY, otherCaseKey, OwnerCache, ownerIn, ownerOf, updateBody, withoutOwner, type MetadataProblem,
  type Owned, type Owner
} from '../ownership/owners.js'
import { listedContainersIn, outputIdsIn, type Issued, type IssuedItems } from '../ownership/issued.js'
import { MAX_WHOLE_BYTES, retryHeaders, UpstreamFailure, type Upstream } from '../upstream/client.js'
import { decodedBody, TokenScrubber } from '../upstream/scrub.js'
import type { UpstreamProgress } from '../types.js'
import { serializeBody } from './body.js'
import { CHECKED_KEYS as RESPONSE_CHECKED_KEYS, ENVIRONMENT_KEYS } from './responses.js'
import {
  addAnswerRewrite, addEventRewrite, clientGone, clientScoped, clientWaitMs, gatewayHeaders, observeAnswer, retryHints, upstreamRateLimitHeaders
} from './proxy.js'

export interface OwnershipOptions {
  upstream: Upstream
  apiKey: () => string
  unowned: () => 'deny' | 'allow'
  cache: OwnerCache
  issued: IssuedItems
}

/**
 * Actions whose answer is an owned object, which must reach the client without the owner key (the creates' answers
 * too: prepareCreate).
 */
const ANSWERS_AN_OWNED_OBJECT = new Set<Action>([
  'conversation.retrieve', 'conversation.update', 'item.delete', 'response.retrieve', 'response.cancel'
])

/** Calls answered with items of an owned object, which its owner may pass back as they came (check, below). */
const LISTS_OWNED_ITEMS = new Set<Action>(['item.list', 'item.retrieve', 'response.input_items'])

/** Lookup answers that mean no such object: not found, and an id the upstream refuses (400, 422). */
const MISSING_STATUSES = new Set([400, 404, 422])

/** Most items one create may name by id: each costs the gateway a check upstream. */
const MAX_REFERENCES = 32

/**
 * Item types whose stored content the upstream fills in by the item's id when the item comes without it, and the
 * key that carries that content: OpenAI's "using image ID" multi-turn editing sends `{ type:
 * "image_generation_call", id }` for the stored image; a reasoning item without `encrypted_content` is read from
 * storage by its id ("Item with id 'rs_...' not found. Items are not persisted when `store` is set to false").
 * Without that key such an item is a reference like any other. (Any reference is served when the gateway handed
 * that item to the same client, in its response's output: ownership/issued.ts.)
 */
const FILLED_IN_BY_ID: Record<string, string> = { image_generation_call: 'result', reasoning: 'encrypted_content' }

/**
 * The ids of the items a create body's list names by reference: OpenAI's item_reference, `{ id, type:
 * "item_reference" }`, whose type may be left out: an item with an id, no type, and not both a role and content
 * (half a message is no message to a reader that needs both, and a loose reader, trying each kind of item in
 * turn and ignoring keys it does not know, takes it for the reference it also fits); and an item of a type the
 * upstream fills in by id (FILLED_IN_BY_ID) that comes without its content.
 */
export function referencedItems (list: unknown): unknown[] {
  if (!Array.isArray(list)) return []
  const ids: unknown[] = []
  for (const item of list) {
    if (item === null || typeof item !== 'object') continue
    const fields = item as Record<string, unknown>
    const { type, id, role, content } = fields
    // (null is no value: a reader that takes null for absent sees a reference in { id, role: null, content: null }.)
    if (type === 'item_reference' || (type == null && id !== undefined && (role == null || content == null))) {
      ids.push(id)
    } else if (typeof type === 'string' && Object.hasOwn(FILLED_IN_BY_ID, type) && id != null) {
      const stored = fields[FILLED_IN_BY_ID[type]!]
      if (typeof stored !== 'string' || stored === '') ids.push(id)
    }
  }
  return ids
}

/**
 * The containers the items of a create's list name, with where: a code interpreter call's `container_id`, a shell
 * call's `environment` (a `container_reference`, or any `container_id`). A tool whose container is `auto` reuses one
 * in the response's context, and an item puts one there: so that no team runs code among another's files by passing
 * back a made-up item, each must be one the gateway handed to the caller in an output item of its own (issued.ts
 * notes them with the items); admin clients are not checked. Any other shape (a number, an object) is refused too.
 */
export function itemContainers (list: unknown, listParam: string): NamedContainer[] {
  if (!Array.isArray(list)) return []
  const named: NamedContainer[] = []
  for (const [i, item] of list.entries()) {
    if (!isObject(item)) continue
    if (item.container_id != null) named.push([item.container_id, `${listParam}[${i}].container_id`, item.id])
    const environment = item.environment
    if (isObject(environment) && (environment.type === 'container_reference' || environment.container_id != null)) {
      named.push([environment.container_id, `${listParam}[${i}].environment`, item.id])
    }
  }
  return named
}

/** A container an item names, where, and that item's id (which may vouch for it: checkContainers). */
type NamedContainer = [id: unknown, param: string, itemId: unknown]

/**
 * `err`, for a refusal of items a body named by id, unless Redis could not say whether they went out to the caller
 * (`unanswered`, issued.ts): then 503 rate_limit_store_unavailable, which the SDKs retry, for every client alike.
 * Refused as another team's, an item of the caller's that another replica handed out would break its loop for as
 * long as Redis does not answer, with a 400 the SDKs do not retry. A refusal of an item known to be `another`
 * team's gets the same 503 (audited `denied`): refused at once, it would tell the stranger the item exists.
 */
function unsure (err: GatewayError, unanswered: boolean, another = false): GatewayError {
  if (!unanswered) return err
  return another ? new StoreUnavailableNotOwnedError() : new RateLimitStoreUnavailableError()
}

/**
 * The answers for an item named by id that the gateway knows nothing of, and for one it handed to another client:
 * the same to the client, not to the audit.
 */
const ITEM_REFUSALS: Record<'outside' | 'missing', (id: string, another: boolean) => GatewayError> = {
  outside: (_id, another) => another ? new ItemReferenceNotOwnedError() : new ItemReferenceOutsideConversationError(),
  missing: (id, another) => another ? new ItemNotOwnedError(id) : new ItemNotFoundError(id)
}

/** What the gateway knows of the items a body named by id that it did not hand to the caller (IssuedItems.issuedTo). */
type Found = Pick<Issued, 'others' | 'unanswered'>

/**
 * The refusal (see unsure) of a call naming the item `id` in its body's `param` (`outside` any conversation of the
 * caller's, or `missing` from the one it is on): the audit record names that item (audit query --item), and the
 * client it was handed to, if another (then `denied`, as another team's conversation is).
 */
function refusedItem (request: FastifyRequest, id: unknown, refusal: keyof typeof ITEM_REFUSALS, param: string, found: Found): GatewayError {
  const owner = typeof id === 'string' ? found.others.get(id) : undefined
  const err = withParam(ITEM_REFUSALS[refusal](cutShort(String(id), MAX_ID_LENGTH), owner !== undefined), param)
  if ((!found.unanswered || owner !== undefined) && typeof id === 'string') {
    request.refusedItemId = id
    if (owner !== undefined) request.ownerId = owner
  }
  return unsure(err, found.unanswered, owner !== undefined)
}

/** The items a create's list names by reference that the gateway must check (cheap: most lists name none). */
function references (list: unknown, client: ClientConfig): unknown[] {
  return client.scopes.includes('admin') ? [] : referencedItems(list)
}

function withParam (err: GatewayError, param: string | null): GatewayError {
  err.param = param
  return err
}

type NotFound = new (id: string) => GatewayError

/** The answers for an object that does not exist and for someone else's: the same to the client, not to the audit. */
const REFUSALS: Record<'conversation' | 'response' | 'previous_response', [missing: NotFound, notYours: NotFound]> = {
  conversation: [ConversationNotFoundError, ConversationNotOwnedError],
  response: [ResponseNotFoundError, ResponseNotOwnedError],
  previous_response: [PreviousResponseNotFoundError, PreviousResponseNotOwnedError]
}

function refuseMetadata (problem: MetadataProblem | null): void {
  if (problem === null) return
  if (problem.kind === 'reserved') throw new ReservedMetadataKeyError(problem.key)
  if (problem.kind === 'limit') throw new MetadataLimitError()
  throw withParam(new InvalidMetadataError(), problem.param)
}

/**
 * `previous_response_id` as given, undefined when left out (or null); any other shape is refused (400), as the
 * gateway could not check whose it is.
 */
function previousResponseParam (body: unknown): string | undefined {
  const value = (body as { previous_response_id?: unknown } | undefined)?.previous_response_id
  if (value === undefined || value === null || typeof value === 'string') return value ?? undefined
  throw withParam(new InvalidRequestError('previous_response_id must be a response id.'), 'previous_response_id')
}

/** The conversation as conversationParam reads it; any other shape than it takes is refused (400). */
function checkedConversationParam (body: unknown): string | undefined {
  const value = (body as { conversation?: unknown } | undefined)?.conversation
  const id = conversationParam(body)
  if (id === undefined && value !== undefined && value !== null) {
    throw withParam(new InvalidRequestError('conversation must be a conversation id, or an object with its "id".'), 'conversation')
  }
  return id
}

/**
 * Names a response create gives that the upstream keeps across the one account every team shares: the end user it
 * is made for (OpenAI's `safety_identifier`, and `user`, which it replaces), by which OpenAI watches for abuse and
 * blocks; and the `prompt_cache_key` it routes by to machines holding a prompt's cached prefix. Sent as the client gave
 * them, team B could have team A's users blocked by sending abuse under their names (a guessable `user_123`, the
 * hash of an email both teams know), and could send A's cache key with a guessed prompt to learn from its own
 * `cached_tokens` whether A sent that prompt; two teams' `user_1` would be one user upstream. Each goes as the
 * client's own (clientScoped).
 */
const ACCOUNT_WIDE_NAMES = ['safety_identifier', 'user', 'prompt_cache_key'] as const

/** Makes each of those names in `body`, a create body of the call's own (createBody's copy), the client's own. */
function scopeNames (body: Record<string, unknown>, clientId: string): void {
  for (const key of ACCOUNT_WIDE_NAMES) {
    const value = body[key]
    // (Anything but a name is the upstream's to refuse, as it came; an empty one names nothing.)
    if (typeof value === 'string' && value !== '') body[key] = clientScoped(clientId, value)
  }
}

/** The keys of a create's body that the checks here read, by action; and those of each item in its list. */
export const CHECKED_KEYS: Partial<Record<Action, readonly string[]>> = {
  'conversation.create': ['items'],
  'item.create': ['items'],
  'response.create': ['conversation', 'previous_response_id', 'input', ...ACCOUNT_WIDE_NAMES]
}
const ITEM_KEYS = ['type', 'id', 'role', 'content', 'container_id', 'environment', ...Object.values(FILLED_IN_BY_ID)]

/**
 * A key the checks read by its exact name, given in another case (`Conversation`, an item's `Type`), is refused
 * (400 unknown_parameter, as OpenAI answers a key it does not know): to an upstream that matches keys without
 * regard to case it would name a conversation, response, item or container the gateway never checked.
 */
function refuseOtherCases (action: Action, body: unknown): void {
  const keys = CHECKED_KEYS[action]
  if (keys === undefined) return
  let found = otherCaseKey(body, keys)
  const object = body as Record<string, unknown> | undefined
  if (found === null && action === 'response.create') found = otherCaseKey(object?.conversation, ['id'], 'conversation.')
  const list = action === 'response.create' ? 'input' : 'items'
  const items = object?.[list]
  if (Array.isArray(items)) {
    // (and a shell call's environment, as a tool's: itemContainers reads its type and container_id)
    for (let i = 0; found === null && i < items.length; i++) {
      found = otherCaseKey(items[i], ITEM_KEYS, `${list}[${i}].`) ??
        otherCaseKey((items[i] as { environment?: unknown } | null)?.environment, ENVIRONMENT_KEYS, `${list}[${i}].environment.`)
    }
  }
  if (found !== null) throw withParam(new UnknownParameterError(cutShort(found, 200)), cutShort(found, 200))
}

/** The lists of a create's body that the checks here (and plugins/responses.ts, tools) read items from, by action. */
const CHECKED_LISTS: Partial<Record<Action, ReadonlyArray<{ param: string, expected: string }>>> = {
  'conversation.create': [{ param: 'items', expected: 'an array of items' }],
  'item.create': [{ param: 'items', expected: 'an array of items' }],
  'response.create': [{ param: 'input', expected: 'a string or an array of input items' }, { param: 'tools', expected: 'an array of tools' }]
}

/**
 * One of those lists given as anything but a list (`input` may also be a string; null is as absent) is refused
 * (400 invalid_type), as OpenAI refuses it, before anything goes upstream: the references and containers in it are
 * read from lists only, and a relay that wraps one item into a list, or PHP's json_decode($body, true) that makes
 * `{"0": item}` an array its json_encode writes back as the list `[item]`, would pass on what no check read.
 */
function refuseListsOfOtherTypes (action: Action, body: unknown): void {
  if (!isObject(body)) return
  for (const { param, expected } of CHECKED_LISTS[action] ?? []) {
    const list = body[param]
    if (list === undefined || list === null || Array.isArray(list) || (param === 'input' && typeof list === 'string')) continue
    throw withParam(new InvalidListTypeError(param, expected), param)
  }
}

/**
 * A gateway key given where the body names an object by id (arguments swapped: `conversation: key`) is refused
 * (400 credentials_in_body), as one in the URL is (plugins/router.ts): the gateway looks such an id up upstream, in
 * a URL of its own (`GET /v1/conversations/<id>`), which would take the key to the upstream as it came.
 */
function refuseKeysAsIds (action: Action, body: unknown): void {
  if (CHECKED_KEYS[action] === undefined) return
  const object = body as { previous_response_id?: unknown, items?: unknown, input?: unknown } | undefined
  const named: Array<[unknown, string]> = action === 'response.create'
    ? [[conversationParam(body), 'conversation'], [object?.previous_response_id, 'previous_response_id'],
        ...referencedItems(object?.input).map((id): [unknown, string] => [id, 'input'])]
    : referencedItems(object?.items).map(id => [id, 'items'])
  for (const [id, param] of named) {
    if (typeof id === 'string' && holdsKey(id)) throw withParam(new CredentialsInBodyError(), param)
  }
}

/**
 * Body keys the gateway's checks read (here and in plugins/responses.ts), and the key it keeps the owner in. No
 * POST route of the API takes any of them in the query string, but an upstream framework that merges the query
 * into the body it reads (PHP's, Rails') would take `POST /v1/responses?conversation=conv_x` for a conversation
 * the gateway never checked: such a parameter is refused (400 unknown_parameter), read as loosely as such
 * frameworks read it (`metadata[gateway_owner]`, `conversation.id`, any case).
 */
const CHECKED_BODY_KEYS = new Set<string>([
  ...Object.values(CHECKED_KEYS).flat(), 'metadata', OWNER_KEY, ...RESPONSE_CHECKED_KEYS
])

function refuseCheckedKeysInQuery (query: URLSearchParams | null): void {
  const found = queryParam(query, name => CHECKED_BODY_KEYS.has(folded(name.split('.', 1)[0]!)))
  if (found !== null) throw withParam(new UnknownParameterError(found), found)
}

/**
 * What a lookup that failed upstream tried, by the error its callers get (the audit record's attempts: a call that
 * ended at its owner lookup went upstream all the same, and its time waiting there was the upstream's).
 */
const triedUpstream = new WeakMap<Error, UpstreamProgress>()

/** `err`, noted as what ends a call whose ask of the upstream made `tried`'s attempts. */
function wentUpstream (err: Error, tried: UpstreamProgress): Error {
  triedUpstream.set(err, tried)
  return err
}

/** The longest message, type or code of an upstream's refusal a lookup passes on. */
const MAX_REFUSAL_TEXT = 1000

/**
 * What a call ended at the gateway's own ask of the upstream (an owner lookup, an item's check) says of it: the
 * attempts the ask has made when read, its first at least, and no line nor request of the call's own sent.
 */
function triedSoFar (attempts: () => number): UpstreamProgress {
  return { line: null, host: null, get attempts () { return Math.max(1, attempts()) }, sent: false }
}

export default fp<OwnershipOptions>(async function ownership (app, opts) {
  const { cache, issued, upstream } = opts
  /**
   * The attempts of each owner lookup under way, by the cache's key (one lookup per key at a time, shared by its
   * callers): what a caller cut at its own wait is audited with.
   */
  const lookupsUnderWay = new Map<string, { attempts: number, sent: boolean }>()
  const scrub = new TokenScrubber(opts.apiKey)

  /** A lookup's 429: the upstream's retry hints and rate-limit headers (searched for the token), as proxy.ts passes them. */
  function upstreamRateLimited (headers: IncomingHttpHeaders): GatewayError {
    const err = new UpstreamRateLimitedError()
    err.headers = { ...retryHints(headers, scrub), ...upstreamRateLimitHeaders(headers, scrub) }
    return err
  }
  /**
   * What a lookup the upstream answered with an error (not one of those read above) is to the client, as the call
   * passed on would have been answered: a proxy's timeout (504, Cloudflare's 524) the gateway's 504; any other 4xx
   * (402 of the shared balance spent, 403 of a region refused) its status with the upstream's error, searched for the
   * token (an account-wide refusal: the lookup's object is not the call's own yet, so no more of the answer is
   * given); anything else, or an answer that is none of these, 502.
   */
  function answeredError (err: unknown): GatewayError {
    const { status, body, encoding } = err as { status?: unknown, body?: unknown, encoding?: string | string[] }
    if (status === 504 || status === 524) return new UpstreamTimeoutError()
    if (typeof status !== 'number' || status < 400 || status >= 500 || !Buffer.isBuffer(body)) return new UpstreamUnavailableError()
    let said: { message?: unknown, type?: unknown, code?: unknown } = {}
    try {
      said = (JSON.parse(decodedBody(body, encoding, MAX_WHOLE_BYTES).toString('utf8')) as { error?: typeof said } | null)?.error ?? {}
    } catch {} // (an answer that is no OpenAI error: the status alone)
    if (!isObject(said)) said = {}
    const text = (value: unknown, fallback: string) => typeof value === 'string' && value !== '' ? cutShort(scrub.text(value), MAX_REFUSAL_TEXT) : fallback
    return Object.assign(new UpstreamRefusedError(text(said.message, `The upstream API refused the call (HTTP ${status}).`)), {
      statusCode: status,
      type: text(said.type, 'invalid_request_error'),
      code: text(said.code, 'upstream_refused')
    })
  }
  app.decorateRequest('ownerId', null)
  app.decorateRequest('createdId', null)
  app.decorateRequest('refusedItemId', null)

  /**
   * The owner of `id`: at once from the cache (no promise on the common path), else from the upstream. A cached
   * owner that `client` may not act on is looked up anyway, unless refused lately (OwnerCache.refusedLately): a
   * stranger's 404 costs the round trip a missing id's does.
   */
  function lookup (kind: Owned, id: string, client: ClientConfig, request: FastifyRequest, reply: FastifyReply): Answer<Owner> {
    if (!ID_PATTERN.test(id)) return 'missing' // nothing with such an id can exist, or be asked about
    const cached = cache.get(kind, id)
    if (cached !== undefined && (cached === 'missing' || mayAct(cached, client) || cache.refusedLately(kind, id))) return cached
    // A client gone while earlier checks were answered: no lookup for it (its call ends here, audited already).
    if (reply.raw.destroyed) throw new UpstreamUnavailableError()
    const callerGone = clientGone(reply)
    // A client that says it waits less than the lookup may take (its SDK would then give up, and send the call
    // again) stops waiting in time for its 504, as one gone stops: nothing of its call went upstream.
    const waitMs = clientWaitMs(request.headers, reply.elapsedTime)
    let deadline: NodeJS.Timeout | undefined
    // The lookup may be shared with other callers of the same object: it is stopped only once all have gone, and
    // a caller that goes gets a 502 of its own (its call is over, audited as aborted).
    const owner = cache.lookUp(kind, id, whenAbandoned => lookUpstream(kind, id, request, whenAbandoned), leave => {
      callerGone(() => { leave(new UpstreamUnavailableError()) })
      // (a lookup may take timeoutMs for its headers and as long again for its body, readWhole: a wait longer than
      // timeoutMs may still be outlived; twice that, or one longer than a timer counts, cannot be)
      if (waitMs !== undefined && waitMs < 2 * upstream.timeoutMs && waitMs <= MAX_TIMER_MS) {
        deadline = setTimeout(() => {
          const err = new UpstreamTimeoutError()
          triedUpstream.set(err, { ...triedSoFar(lookupAttempts(kind, id)) }) // (as they are now)
          leave(err)
        }, waitMs)
      }
    })
    if (deadline !== undefined) {
      const stop = (): void => { clearTimeout(deadline) }
      owner.then(stop, stop)
    }
    return whileAsking(request, triedSoFar(lookupAttempts(kind, id)), owner)
  }

  /**
   * The attempts the lookup of `kind` `id` under way (the one a caller has just begun or joined) has made, read
   * when asked: after it has ended too, as it ended.
   */
  function lookupAttempts (kind: Owned, id: string): () => number {
    const progress = lookupsUnderWay.get(`${kind}:${id}`)
    return () => progress?.attempts ?? 1
  }

  /**
   * A client that hangs up while the gateway's own ask (an owner lookup, an item's check) is at the upstream is
   * audited as its response closes, before the ask is left: until the ask has answered, the call's record reads
   * the attempts it made (`tried`, read then). An answer leaves them there, as they ended: a call it ends (the 404
   * of a missing id or another team's) made them, and one it lets on says its own once it goes upstream. A failure
   * says what the record holds (triedUpstream).
   */
  function whileAsking<T> (request: FastifyRequest, tried: UpstreamProgress, asking: Promise<T>): Promise<T> {
    request.upstreamCall = tried
    const answered = (): void => { if (request.upstreamCall === tried) request.upstreamCall = { ...tried } }
    const failed = (): void => { if (request.upstreamCall === tried) request.upstreamCall = null }
    asking.then(answered, failed)
    return asking
  }

  /**
   * The owner the cache knows of the object a call is on (its path's response or conversation, a create's
   * conversation), if any: peeked, for the record of a call refused before its check.
   */
  function cachedOwner (request: FastifyRequest): string | null {
    const op = request.operation
    if (op === null) return null
    const [kind, id]: [Owned, string | null | undefined] = op.responseId !== null
      ? ['response', op.responseId]
      : ['conversation', op.action === 'response.create' ? conversationParam(request.parsedBody) : op.conversationId]
    const found = typeof id === 'string' ? cache.peek(kind, id) : undefined
    return found === undefined || found === 'missing' ? null : found.owner
  }

  /** The owner of `id` as the upstream object says; a bad or missing answer fails closed (502/504). */
  async function lookUpstream (kind: Owned, id: string, request: FastifyRequest,
    whenAbandoned: (abort: () => void) => void): Promise<Owner> {
    const key = `${kind}:${id}`
    const progress = { attempts: 0, sent: false }
    lookupsUnderWay.set(key, progress)
    try {
      const found = await askUpstream(`/v1/${kind}s/${id}`, { [`${kind}Id`]: id }, request, whenAbandoned,
        answer => ownerOf(answer, id, kind), undefined, progress)
      return found === 'missing' ? 'missing' : found
    } finally {
      // (an abandoned lookup may end after the next one for the same key has begun)
      if (lookupsUnderWay.get(key) === progress) lookupsUnderWay.delete(key)
    }
  }

  /**
   * The gateway's own GET of `path` (an owner's lookup, an item's check): the answer as `read` takes it, or
   * 'missing' for a 404 or an id the upstream refuses (OpenAI answers 400 to one not of the form it gives out,
   * which is then the same 404 to the client, not a 502 an SDK would retry). Anything else fails closed: the
   * shared account's 429 is the client's 429 with the upstream's retry hints, a refused token the operators'
   * 502, any other status or an answer `read` refuses 502, no answer in time 504.
   */
  async function askUpstream<T> (path: string, about: Record<string, string>, request: FastifyRequest,
    whenGone: (abort: () => void) => void, read: (answer: unknown) => T,
    clientWait: () => number | undefined = () => undefined, progress?: { attempts: number, sent: boolean }): Promise<T | 'missing'> {
    let answeredAfter = 0 // the attempts of an answer the ask got, which it may yet refuse
    // An answer's own retry hints (a 503's retry-after), which the 502 it becomes passes on, as an answer passed on
    // carries them: else the SDKs send the call again within a second to an upstream that asked for longer.
    let hints: Record<string, string | string[]> | undefined
    try {
      const answer = await upstream.call({
        method: 'GET',
        path,
        headers: gatewayHeaders(request, opts.apiKey(), { accept: 'application/json' }),
        body: null,
        whenClientGone: whenGone,
        clientWaitMs: clientWait(),
        progress
      })
      answeredAfter = answer.attempts
      // (As large as an answer the gateway reads whole to pass on: a response object holds its whole output, an
      // image generation's base64, and refusing it here would refuse its owner what the gateway passes on.)
      const body = await upstream.readWhole(answer.body, false, clientWait()).catch((err: unknown) => {
        // (readWhole knows nothing of the call: its timeout would say no line was tried, UpstreamFailure.untried)
        throw err instanceof UpstreamFailure ? new UpstreamFailure(err.kind, err.message, answer.attempts, answer.line, undefined, true) : err
      })
      if (MISSING_STATUSES.has(answer.statusCode)) return 'missing'
      if (answer.statusCode === 429) throw upstreamRateLimited(answer.headers)
      if (answer.statusCode === 401) throw new UpstreamAuthError()
      if (answer.statusCode !== 200) {
        hints = retryHints(answer.headers, scrub)
        throw Object.assign(new Error(`the lookup was answered ${answer.statusCode}`), { status: answer.statusCode, body, encoding: answer.headers['content-encoding'] })
      }
      // Compressed all the same (the gateway asks for no encoding): decoded, as the object passed on is.
      return read(JSON.parse(decodedBody(body, answer.headers['content-encoding'], MAX_WHOLE_BYTES).toString('utf8')))
    } catch (err) {
      // (sent: false, whether the ask was or not: the call itself never went upstream, and the token budget charges
      // only a call the upstream may have taken on)
      const tried = { line: null, host: null, attempts: err instanceof UpstreamFailure ? err.attempts : answeredAfter, sent: false }
      if (err instanceof UpstreamRateLimitedError) throw wentUpstream(err, tried)
      if (err instanceof UpstreamAuthError) {
        upstream.refusedToken.refused(request.log, opts.apiKey())
        throw wentUpstream(err, tried)
      }
      // Every caller gone is not a failed lookup worth a line; their calls are over and audited anyway. Nor is
      // a lookup no line was tried for (every one skipped, UpstreamFailure.untried).
      if (!(err instanceof UpstreamFailure && (err.kind === 'aborted' || err.untried))) {
        // (JSON.parse's message quotes the start of the text, an upstream answer that may quote the token.)
        request.log.warn({ err: loggedError(err, err instanceof SyntaxError ? 'the answer is not JSON' : undefined), ...about }, 'ownership lookup failed')
      }
      const answer = err instanceof UpstreamFailure && err.kind === 'timeout' ? new UpstreamTimeoutError() : answeredError(err)
      if (err instanceof UpstreamFailure) answer.headers = retryHeaders(err) // every line down: when one is tried again
      else if (hints !== undefined && Object.keys(hints).length > 0) answer.headers = hints
      throw err instanceof UpstreamFailure || answeredAfter > 0 ? wentUpstream(answer, tried) : answer
    }
  }

  /**
   * Items a create names by id (item_reference) are resolved by the upstream across the whole account every team
   * shares: each must be an item of the conversation the call names, which the client owns (checked before), else
   * it could pull another team's item into its own context. A reference with no such conversation (a new
   * conversation's items, a response outside any conversation) is refused; admin clients are not checked. An
   * item the gateway handed to this very client (an output item of its response) needs no check.
   */
  async function checkReferences (param: string, list: unknown, conversation: string | undefined,
    client: ClientConfig, request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const { ids, ...known } = await notHandedOut(references(list, client), client)
    if (ids.length === 0) return
    if (conversation === undefined) throw refusedItem(request, ids[0], 'outside', param, known)
    if (ids.length > MAX_REFERENCES) throw unsure(withParam(new TooManyItemReferencesError(param, String(MAX_REFERENCES)), param), known.unanswered)
    const whenGone = clientGone(reply)
    // (each check within what the client still waits, when it says: its 504 comes before its SDK gives up)
    const clientWait = () => clientWaitMs(request.headers, reply.elapsedTime)
    for (const id of ids) {
      const progress = { attempts: 0, sent: false }
      const found = typeof id === 'string' && ID_PATTERN.test(id)
        ? await whileAsking(request, triedSoFar(() => progress.attempts), askUpstream(`/v1/conversations/${conversation}/items/${id}`, { conversationId: conversation, itemId: id },
          request, whenGone, answer => {
            if ((answer as { id?: unknown } | null)?.id !== id) throw new Error('the item check answer is not the item asked for')
            return true
          }, clientWait, progress))
        : 'missing'
      if (found === 'missing') {
        throw refusedItem(request, id, 'missing', param, known)
      }
    }
  }

  /**
   * The ids among `ids` that the gateway did not hand to `client` (ownership/issued.ts), those of them it handed to
   * another client (`others`), and whether Redis could not say for some of them (`unanswered`): one of those may be
   * the client's, handed out by another replica.
   */
  async function notHandedOut (ids: unknown[], client: ClientConfig): Promise<Found & { ids: unknown[] }> {
    const strings = ids.filter((id): id is string => typeof id === 'string' && ID_PATTERN.test(id))
    if (strings.length === 0) return { ids, others: new Map(), unanswered: false }
    const { handedOut, ...found } = await issued.issuedTo(strings, client.id)
    return { ids: ids.filter(id => !handedOut.has(id as string)), ...found }
  }

  /**
   * Every output item a response's answer (or a streamed event) holds is noted as its owner's, who may then name
   * it by id anywhere: the client that creates it, or the owner of one retrieved or cancelled (an admin's retrieve hands
   * nothing to the admin; an unowned response's items stay no one's).
   */
  function noteHandedOut (request: FastifyRequest, owner: () => string | null = () => request.ownerId): void {
    const note = noteAsOwners(owner, outputIdsIn)
    addAnswerRewrite(request, note)
    addEventRewrite(request, note)
  }

  /**
   * Notes the ids `idsIn` finds in an answer as `owner`'s: by default the owner of the object the call was on, as
   * the call's checks found it (request.ownerId, read when the answer comes).
   */
  function noteAsOwners (owner: () => string | null, idsIn: (object: unknown) => string[]) {
    return (object: unknown) => {
      const to = owner()
      const ids = to === null ? [] : idsIn(object)
      if (ids.length > 0) issued.note(ids, to!)
      return object
    }
  }

  /**
   * The containers a create's items name (itemContainers) must each be one the gateway handed to `client`, or, in a
   * call on a conversation of the client's own (`ownConversation`), one an item of that conversation ran in: the item
   * that names it is looked up there by its id (as an item reference is), and the container noted as the client's, as
   * a listing of the conversation would have (a gateway restarted with the in-memory store knows nothing of the
   * containers its items ran in before). Only for a container the gateway does not know as the client's: a call
   * naming none, or only known ones, looks nothing up.
   */
  async function checkContainers (named: NamedContainer[], client: ClientConfig, request: FastifyRequest,
    ownConversation?: { id: string, reply: FastifyReply }): Promise<void> {
    if (named.length === 0) return
    const { ids, ...found } = await notHandedOut(named.map(([id]) => id), client)
    let unknown = named.filter(([id]) => ids.includes(id))
    // (Code interpreter runs a session's calls in the one container it reuses: many items may name each container.)
    if (unknown.length > 0 && ownConversation !== undefined && new Set(unknown.map(([id]) => id)).size <= MAX_REFERENCES) {
      unknown = await notInConversation(unknown, ownConversation.id, client, request, ownConversation.reply)
    }
    const refused = unknown[0]
    if (refused === undefined) return
    const [id, param] = refused
    const owner = typeof id === 'string' ? found.others.get(id) : undefined
    if (owner !== undefined) request.ownerId = owner
    throw unsure(withParam(new ItemContainerNotAllowedError(), param), found.unanswered, owner !== undefined)
  }

  /**
   * Those of `named` that no item of the client's conversation `conversation` ran in: each container is looked up there
   * by the id of an item naming it, the next item naming it only if that one is not there; one found naming the same
   * container vouches for it, and for every item naming it, and it is noted as the client's. At most MAX_REFERENCES
   * lookups a call.
   */
  async function notInConversation (named: NamedContainer[], conversation: string, client: ClientConfig,
    request: FastifyRequest, reply: FastifyReply): Promise<NamedContainer[]> {
    const whenGone = clientGone(reply)
    const clientWait = () => clientWaitMs(request.headers, reply.elapsedTime)
    const vouched = new Set<unknown>()
    let lookups = 0
    for (const [container, , itemId] of named) {
      if (vouched.has(container) || lookups === MAX_REFERENCES) continue
      if (typeof container !== 'string' || typeof itemId !== 'string' || !ID_PATTERN.test(itemId)) continue
      lookups++
      const ran = await askUpstream(`/v1/conversations/${conversation}/items/${itemId}`, { conversationId: conversation, itemId },
        request, whenGone, answer => {
          if ((answer as { id?: unknown } | null)?.id !== itemId) throw new Error('the item check answer is not the item asked for')
          return listedContainersIn(answer)
        }, clientWait)
      if (ran !== 'missing' && ran.includes(container)) {
        issued.note([container], client.id)
        vouched.add(container)
      }
    }
    return named.filter(([container]) => !vouched.has(container))
  }

  /**
   * Looks `id` up and lets the call on only if `client` may act on it (else throws); gives its owner. A refusal
   * names `param`, the field the id came in, where it is not the one the refusal names (the path's).
   */
  function authorize (kind: Owned, refusal: keyof typeof REFUSALS, id: string, client: ClientConfig,
    request: FastifyRequest, reply: FastifyReply, param?: string): Answer<string | null> {
    const named = (err: GatewayError): GatewayError => param === undefined ? err : withParam(err, param)
    const decide = (found: Owner): string | null => {
      const [Missing, NotYours] = REFUSALS[refusal]
      // (An id from the body may be anything the body limit allows: the answer quotes it cut short, as it does a path.)
      if (found === 'missing') throw named(new Missing(id.length > MAX_ID_LENGTH ? `${cutShort(id, MAX_ID_LENGTH)}…` : id))
      request.ownerId = found.owner // the audit names whom a refused call was after
      if (!mayAct(found, client)) {
        cache.noteRefused(kind, id)
        throw named(new NotYours(id))
      }
      return found.owner
    }
    return then(lookup(kind, id, client, request, reply), decide)
  }

  function mayAct (found: { owner: string | null }, client: ClientConfig): boolean {
    return client.scopes.includes('admin') || found.owner === client.id || (found.owner === null && opts.unowned() === 'allow')
  }

  /** `read` runs on the answer's object, and on the response each streamed event carries. */
  function readObjects (request: FastifyRequest, read: (object: unknown) => void): void {
    addAnswerRewrite(request, object => { read(object); return object })
    addEventRewrite(request, event => {
      const response = (event as { response?: unknown } | null)?.response
      if (response !== undefined) read(response)
      return event
    })
  }

  /**
   * The answer to a call on an object the client may act on (a retrieve, an update, a cancel...) must be such an
   * object: one naming an owner the client may not act on (an upstream, or a relay, that mixed answers up) is another
   * team's, and is not passed on (502, as a lookup or a create answered with something else than asked for).
   */
  function refuseAnothersAnswer (request: FastifyRequest, client: ClientConfig): void {
    readObjects(request, object => {
      const owner = ownerIn(object)
      if (typeof owner === 'string' && owner !== '' && !mayAct({ owner }, client)) {
        throw new Error('the answer names an owner the client may not act on')
      }
    })
  }

  /** Every object in the answer (and each streamed event) reaches the client without the owner key. */
  function hideOwner (request: FastifyRequest): void {
    addAnswerRewrite(request, withoutOwner)
    addEventRewrite(request, withoutOwner)
  }

  /**
   * The created object's id is remembered as the client's, before the client sees it without the owner key. An
   * answer whose object names another owner is not the client's creation (an upstream that replays answers by
   * Idempotency-Key across the account, say): it is neither remembered nor passed on.
   */
  function rememberCreated (kind: Owned, request: FastifyRequest, client: ClientConfig) {
    return (object: unknown): void => {
      const id = (object as { id?: unknown } | null)?.id
      if (typeof id === 'string' && request.createdId === null) {
        const owner = ownerIn(object)
        if (owner !== undefined && owner !== client.id) throw new Error(`the created ${kind} names another owner`)
        request.createdId = id
        // The object's metadata is what every replica (and this one, once its cache forgets) reads the owner from.
        // An upstream that did not keep it made an unowned object: remembering it as the client's here would serve
        // it on this replica only, for up to cacheTtlMs, and then not; a lookup reads what the upstream holds.
        if (owner === undefined) {
          request.log.warn({ [`${kind}Id`]: id, clientId: client.id },
            `the upstream did not keep the owner in the created ${kind}'s metadata: it is unowned`)
          return
        }
        cache.set(kind, id, client.id)
      }
    }
  }

  /**
   * A delete forgets the object's owner when it is authorized, and again once the upstream has deleted it (its 2xx
   * answer): a lookup by another call in between read the object before the delete, and would otherwise keep its
   * owner cached for cacheTtlMs (the owner's calls then passed upstream for its 404, a stranger's refused as
   * another team's object in the audit).
   */
  function forgetDeleted (reply: FastifyReply, kind: Owned, id: string): void {
    cache.delete(kind, id)
    // (The answer itself is passed on unread. Watched on deletes alone: no hook of every call's.)
    const res = reply.raw
    whenClosed(res, () => { if (res.headersSent && res.statusCode >= 200 && res.statusCode < 300) cache.delete(kind, id) })
  }

  /** A create: its owner goes into the body's metadata, and the new object's id into the cache. */
  function prepareCreate (kind: Owned, request: FastifyRequest, client: ClientConfig): void {
    request.ownerId = client.id
    const body = createBody(request.parsedBody, client.id)
    if (kind === 'response') scopeNames(body, client.id)
    request.upstreamBody = serializeBody(body, request.parsedBody)
    // (Added before the owner key is taken out: remember reads it, and so does the check of every later object of
    // the answer, a streamed create's events after the first, which must name the client too.)
    readObjects(request, rememberCreated(kind, request, client))
    refuseAnothersAnswer(request, client)
    hideOwner(request)
  }

  /** The check for one call: done at once when every owner it needs is cached, else a promise. */
  function check (request: FastifyRequest, reply: FastifyReply): Answer<void> {
    const op = request.operation
    const client = request.client
    if (op === null || client === null) return
    const body = request.parsedBody as { items?: unknown, input?: unknown } | undefined
    if (request.method === 'POST') refuseCheckedKeysInQuery(op.query)
    refuseOtherCases(op.action, request.parsedBody)
    refuseListsOfOtherTypes(op.action, request.parsedBody)
    refuseKeysAsIds(op.action, request.parsedBody)
    const list = op.action === 'response.create' ? 'input' : 'items'
    const containers = CHECKED_KEYS[op.action] === undefined || client.scopes.includes('admin') ? [] : itemContainers(body?.[list], list)
    if (op.action === 'conversation.create') {
      refuseMetadata(metadataProblem(request.parsedBody))
      // (A new conversation holds no item to name: any reference is refused, before anything goes upstream.)
      const named = references(body?.items, client)
      if (named.length === 0 && containers.length === 0) {
        prepareCreate('conversation', request, client)
        return
      }
      return (async () => {
        const { ids: [first], ...found } = await notHandedOut(named, client)
        if (first !== undefined) throw refusedItem(request, first, 'outside', 'items', found)
        await checkContainers(containers, client, request)
        prepareCreate('conversation', request, client)
      })()
    }
    if (op.action === 'response.create') {
      refuseMetadata(metadataProblem(request.parsedBody))
      const conversation = checkedConversationParam(request.parsedBody)
      const previous = previousResponseParam(request.parsedBody)
      return (async () => {
        const owner = conversation === undefined ? null : await authorize('conversation', 'conversation', conversation, client, request, reply, 'conversation')
        if (previous !== undefined) await authorize('response', 'previous_response', previous, client, request, reply)
        await checkReferences('input', body?.input, conversation, client, request, reply)
        await checkContainers(containers, client, request, owner === client.id ? { id: conversation!, reply } : undefined)
        prepareCreate('response', request, client)
        // The call is on the conversation it writes into: the audit names that conversation's owner, as for an
        // items create there (an admin's generation in a team's conversation is found by --owner with the team's).
        // The new response, and the output items handed out, are the client's own.
        if (conversation !== undefined) request.ownerId = owner
        noteHandedOut(request, () => client.id)
      })()
    }
    if (ANSWERS_AN_OWNED_OBJECT.has(op.action)) {
      refuseAnothersAnswer(request, client) // (before the owner key is taken out)
      hideOwner(request)
    }
    // (A cancel answers with the output made so far, as a retrieve does: a background response's client may see it first there.)
    if (op.action === 'response.retrieve' || op.action === 'response.cancel') noteHandedOut(request)
    // The items of an owned conversation (or a response's input items) are its owner's to pass back as they came,
    // the containers they ran in included, whoever made them and whenever (before a restart, in the background):
    // those containers are noted as the owner's.
    // (Read as the answer passes: a listing streams on as it came, however long.)
    if (LISTS_OWNED_ITEMS.has(op.action)) observeAnswer(request, { mentions: '"container_id"', read: noteAsOwners(() => request.ownerId, listedContainersIn) })

    if (op.responseId !== null) {
      const responseId = op.responseId
      return then(authorize('response', 'response', responseId, client, request, reply), () => {
        if (op.action === 'response.delete') forgetDeleted(reply, 'response', responseId)
      })
    }

    const id = op.conversationId!
    if (op.action === 'conversation.update') refuseMetadata(metadataProblem(request.parsedBody))
    // (An items create has no metadata, but its body is a create's all the same: one that is not an object is refused
    // here as on the other creates, rather than passed on for the upstream to answer.)
    if (op.action === 'item.create' && request.parsedBody !== undefined && !isObject(request.parsedBody)) throw withParam(new InvalidMetadataError(), null)
    // The upstream reads what was checked: new items go up as the gateway read them, not as the client's bytes,
    // where a key given twice (`"type":"item_reference", ... "type":"message"`) reads as its first value to a
    // parser that keeps the first, and would name an item the gateway never saw. (Creates and updates are written
    // anew already.)
    if (op.action === 'item.create' && request.parsedBody !== undefined && !client.scopes.includes('admin')) {
      request.upstreamBody = serializeBody(request.parsedBody, request.parsedBody)
    }
    const authorized = authorize('conversation', 'conversation', id, client, request, reply)
    if (op.action === 'item.create' && (containers.length > 0 || references(body?.items, client).length > 0)) {
      return (async () => {
        const owner = await authorized
        await checkReferences('items', body?.items, id, client, request, reply)
        await checkContainers(containers, client, request, owner === client.id ? { id, reply } : undefined)
      })()
    }
    return then(authorized, owner => {
      if (op.action === 'conversation.update') {
        // Written anew even with nothing to merge (an unowned conversation): the client's bytes may give
        // `metadata` twice, and a parser that keeps the first would read an owner key the gateway never saw.
        const merged = updateBody(request.parsedBody, owner)
        if (merged !== null) request.upstreamBody = serializeBody(merged, request.parsedBody)
        else if (request.parsedBody !== undefined) request.upstreamBody = serializeBody(request.parsedBody, request.parsedBody)
      } else if (op.action === 'conversation.delete') {
        forgetDeleted(reply, 'conversation', id)
      }
    })
  }

  // A call refused before its check (the client's rate limit, the concurrency cap, a missing scope) names in its
  // record the owner the cache knows of the object it was on, as a call refused by the check does: never looked up
  // for a call refused already. (Not one refused its key: it has no client.)
  app.addHook('onError', (request, _reply, _err, done) => {
    if (request.ownerId === null && request.client !== null) request.ownerId = cachedOwner(request)
    done()
  })

  // Callback style: with the owner cached (nearly every call), no promise is made.
  app.addHook('preHandler', (request, reply, done) => {
    whenAnswered(() => check(request, reply), () => { done() }, err => {
      // A lookup that went upstream and got no answer it could use ended the call: its record says it went upstream,
      // and how many attempts it made (the error is shared by every caller of a shared lookup: each record says so).
      request.upstreamCall ??= triedUpstream.get(err as Error) ?? null
      done(err as Error)
    })
  })
}, { name: 'ownership', dependencies: ['body'] })
