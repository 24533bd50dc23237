// The one table of what the gateway routes (the Conversations and Responses operations it re-exposes), and the one
// function that decides which of them a request is. Matching is done on the raw request target (before any
// percent-decoding), so that an encoded prefix, an encoded slash or a dot segment can never be read as something
// else than what reaches the upstream.
import type { Scope } from './config.js'
import { cutShort } from './errors.js'
import { withoutKeys } from './keys.js'

export const API_PREFIX = '/v1'
/** The longest id the gateway takes; an id quoted or recorded from elsewhere (a body, a refused path) is cut at it. */
export const MAX_ID_LENGTH = 200
export const ID_PATTERN = new RegExp(`^[A-Za-z0-9_-]{1,${MAX_ID_LENGTH}}$`)

export type Action =
  | 'conversation.create' | 'conversation.retrieve' | 'conversation.update' | 'conversation.delete'
  | 'item.create' | 'item.list' | 'item.retrieve' | 'item.delete'
  | 'response.create' | 'response.retrieve' | 'response.delete' | 'response.cancel' | 'response.input_items'

export type Method = 'GET' | 'POST' | 'DELETE'

/** The ids a path can carry, by the parameter name OpenAI uses for them. */
export type IdParam = 'conversation_id' | 'item_id' | 'response_id'

/**
 * A path shape below /v1, as segments: a literal, or `:param` for an id. `route` is the Fastify route it is
 * served on; `methods` the operation per method.
 */
interface Resource {
  route: string
  segments: readonly string[]
  methods: Partial<Record<Method, { action: Action, scope: Scope }>>
}

const SCOPE_OF: Record<Method, Scope> = { GET: 'read', POST: 'write', DELETE: 'delete' }

function resource (route: string, actions: Partial<Record<Method, Action>>): Resource {
  const methods: Resource['methods'] = {}
  for (const [method, action] of Object.entries(actions) as [Method, Action][]) {
    methods[method] = { action, scope: SCOPE_OF[method] }
  }
  return { route, segments: route.slice(1).split('/'), methods }
}

export const RESOURCES: readonly Resource[] = [
  resource('/conversations', { POST: 'conversation.create' }),
  resource('/conversations/:conversation_id',
    { GET: 'conversation.retrieve', POST: 'conversation.update', DELETE: 'conversation.delete' }),
  resource('/conversations/:conversation_id/items', { GET: 'item.list', POST: 'item.create' }),
  resource('/conversations/:conversation_id/items/:item_id', { GET: 'item.retrieve', DELETE: 'item.delete' }),
  resource('/responses', { POST: 'response.create' }),
  resource('/responses/:response_id', { GET: 'response.retrieve', DELETE: 'response.delete' }),
  resource('/responses/:response_id/cancel', { POST: 'response.cancel' }),
  resource('/responses/:response_id/input_items', { GET: 'response.input_items' })
]

/** Every action the gateway can record, in table order (audit query, metrics labels). */
export const ACTIONS: readonly Action[] = RESOURCES.flatMap(r => Object.values(r.methods).map(m => m.action))

export interface Operation {
  action: Action
  scope: Scope
  /** Raw (still percent-encoded) path segments; validated later, after the key check. */
  conversationId: string | null
  itemId: string | null
  responseId: string | null
  /**
   * The request target's query, decoded and split at `;` too (which some servers take for `&`), read once here for
   * every check of it (credentials, the route's parameters, `stream`); null without one.
   */
  query: URLSearchParams | null
}

export type Match =
  | { kind: 'operation', operation: Operation }
  | { kind: 'method_not_allowed', allow: string }
  | { kind: 'unknown' }

/**
 * OpenAI routes under /v1/responses/ whose last segment stands where a response id goes (counting input tokens,
 * compacting): not routed by the gateway, they are unknown routes (404), not a response id's 405.
 */
const UNROUTED_RESPONSE_PATHS = new Set(['input_tokens', 'compact'])

/**
 * Query parameters that name a credential (`?api_key=`, `?key=`, `?access_token=`, as some clients send keys): no
 * route of the API takes one, and the query goes upstream as it came, so such a call is refused before the key
 * check (plugins/router.ts). Its value is never logged (logging.ts) or audited (the record's path has no query).
 */
const CREDENTIAL_PARAM = /^(?:api[-_]?key|key|access[-_]?token|token|auth|authorization|bearer|password|secret)$/i

/**
 * A parameter name as the loosest readers take it: brackets and dots before it skipped and cut at the next bracket
 * (PHP's and Rails' `api_key[]`; Rack before 3.0, under Rails 6 and 7.0, reads `[api_key]` and `api_key]` as
 * `api_key` too; qs with allowDots, under Express and NestJS, reads `.api_key` as `api_key`), or at a NUL (C string
 * handling), trimmed.
 */
function looseName (name: string): string {
  const rest = name.replace(/^[[\].]+/, '')
  const cut = rest.search(/[[\]\0]/)
  return (cut === -1 ? rest : rest.slice(0, cut)).trim()
}

/** The first query parameter that names a credential (its name, decoded, cut short), or null. */
export function credentialParam (query: URLSearchParams | null): string | null {
  return queryParam(query, name => CREDENTIAL_PARAM.test(name))
}

/**
 * A parameter's name as PHP takes it (main/php_variables.c), cut at a NUL: leading spaces dropped, a dot or a space
 * before any `[` made `_`, and a `[` never closed made `_` too, so `previous.response.id` and `previous[response_id`
 * are `previous_response_id` to it; a name with a closed `[` is the array named by what comes before it.
 */
function phpName (name: string): string {
  const trimmed = name.split('\0', 1)[0]!.replace(/^ +/, '')
  const open = trimmed.indexOf('[')
  const base = (open === -1 ? trimmed : trimmed.slice(0, open)).replace(/[. ]/g, '_')
  return open === -1 || trimmed.includes(']', open) ? base : `${base}_${trimmed.slice(open + 1)}`
}

/** A parameter's name (or a body's key) as sent, and as the loosest readers (looseName) and PHP (phpName) take it. */
interface ReadName { name: string, loose: string, php: string }

function read (name: string): ReadName {
  return { name, loose: looseName(name), php: phpName(name) }
}

/**
 * The names of a query (Operation.query), each read once for every check a call makes of them (a credential, the
 * method, a path's id, a create's checked keys), in their order.
 */
const readQueries = new WeakMap<URLSearchParams, readonly ReadName[]>()
function namesOf (query: URLSearchParams | null): readonly ReadName[] {
  if (query === null) return []
  let names = readQueries.get(query)
  if (names === undefined) {
    names = Array.from(query.keys(), read)
    readQueries.set(query, names)
  }
  return names
}

/**
 * The first parameter of a query (Operation.query) whose name, as the loosest readers take it (looseName, and as
 * PHP does: phpName), `matches`: its name, decoded, a key in it withheld, cut short; or null.
 */
export function queryParam (query: URLSearchParams | null, matches: (name: string) => boolean): string | null {
  for (const { name, loose, php } of namesOf(query)) {
    if (matches(loose) || matches(php)) return shownName(name)
  }
  return null
}

/** The query of `url`, decoded, split at `;` too (which some servers take for `&`); null without one. */
export function queryOf (url: string): URLSearchParams | null {
  const q = url.indexOf('?')
  return q === -1 ? null : new URLSearchParams(url.slice(q + 1).replaceAll(';', '&'))
}

/** A parameter's name (or a body's key) as an error names it: a key in it withheld, cut short. */
export function shownName (name: string): string {
  return cutShort(withoutKeys(name), 40)
}

/**
 * The query parameters OpenAI documents for each GET operation: no other goes upstream (the upstream may read one
 * that OpenAI does not). `include` is a list, sent as `include[]=` (the SDKs), repeated (curl, the docs) or
 * `include[0]=` (PHP's http_build_query); any other parameter comes at most once, as the SDKs send it: the gateway
 * reads `stream`, and of two, another reader could take the other one.
 */
const GET_QUERY: Partial<Record<Action, ReadonlySet<string>>> = {
  'conversation.retrieve': new Set(),
  'item.list': new Set(['after', 'include', 'limit', 'order']),
  'item.retrieve': new Set(['include']),
  'response.retrieve': new Set(['include', 'include_obfuscation', 'starting_after', 'stream']),
  'response.input_items': new Set(['after', 'include', 'limit', 'order'])
}
const LIST_PARAM = /^include(?:\[\d*\])?$/

/**
 * Whether a query parameter (or a JSON body's key) is one some server frameworks take for the call's method:
 * Symfony's (and so Laravel's, where it is on by default) reads `_method` from a POST's body (its JSON, in Laravel)
 * or query, the query as PHP names parameters (phpName: `.method`, `[method` and `_method%00x` are `_method` to it).
 * To such an upstream `POST /v1/conversations/{id}?_method=DELETE` is a delete, made with a key that may lack the
 * delete scope. No route of the API takes it.
 */
function overridesMethod ({ php }: ReadName): boolean {
  return php.toLowerCase() === '_method'
}

/** The ids a path carries, by the names OpenAI gives them (IdParam). */
const ID_PARAMS: ReadonlySet<string> = new Set<IdParam>(['conversation_id', 'item_id', 'response_id'])

/**
 * Whether a query parameter (or a JSON body's key) names one of the ids a path carries (`conversation_id`, `item_id`,
 * `response_id`; in any case, read as loosely as queryParam reads names): Laravel's `$request->conversation_id` reads
 * the body and the query before the route's own parameter, so to such an upstream
 * `DELETE /v1/conversations/<B's>?conversation_id=<A's>` is a delete of A's conversation, which the gateway never
 * checked. No route of the API takes one there.
 */
function namesPathId ({ loose, php }: ReadName): boolean {
  return ID_PARAMS.has(loose.toLowerCase()) || ID_PARAMS.has(php.toLowerCase())
}

/**
 * The names frameworks give a path's id parameter besides OpenAI's (ID_PARAMS), lower-cased: Laravel's resource routes
 * name it for the resource (`{conversation}`, `{item}`, `{response}`), others `{id}` or in camelCase
 * (`{conversationId}`).
 */
const ROUTE_PARAMS: ReadonlySet<string> = new Set(['id', 'conversation', 'item', 'response', 'conversationid', 'itemid', 'responseid'])

/**
 * On a route with an id in its path, whether a query parameter (or a JSON body's key) is a name a framework reads as
 * that id (ROUTE_PARAMS, read as namesPathId reads names): Laravel's `$request->conversation` reads the input before the
 * route's parameter, so to such an upstream `POST /v1/conversations/<B's>` with `"conversation": "<A's>"` updates A's.
 * No such route takes one (a create, with no id in its path, takes a `conversation`).
 */
function namesRouteParam (op: Operation | null, { loose, php }: ReadName): boolean {
  return op !== null && (op.conversationId !== null || op.responseId !== null) &&
    (ROUTE_PARAMS.has(loose.toLowerCase()) || ROUTE_PARAMS.has(php.toLowerCase()))
}

function takenForRoute (op: Operation | null, name: ReadName): boolean {
  return overridesMethod(name) || namesPathId(name) || namesRouteParam(op, name)
}

/**
 * Whether a query parameter (or a JSON body's key) is one an upstream framework would read in place of what the route
 * (`op`'s) says: the call's method (overridesMethod) or an id the path carries (namesPathId, namesRouteParam). No
 * route of the API takes one.
 */
export function overridesRoute (op: Operation | null, name: string): boolean {
  return takenForRoute(op, read(name))
}

export type QueryProblem =
  | { kind: 'fragment' }
  /** a name the route does not take; one given twice; a `stream` neither `true` nor `false` */
  | { kind: 'unknown' | 'repeated' | 'invalid', param: string }

/** What is wrong with the request target (`url`)'s query for this operation, or null. */
export function queryProblem (op: Operation, url: string): QueryProblem | null {
  // A fragment is the client's own (RFC 3986 §3.5) and never sent: one that is would go upstream as it came.
  if (url.includes('#')) return { kind: 'fragment' }
  const query = op.query
  for (const name of namesOf(query)) {
    if (takenForRoute(op, name)) return { kind: 'unknown', param: shownName(name.name) }
  }
  const allowed = GET_QUERY[op.action]
  if (allowed === undefined || query === null) return null
  const seen = new Set<string>()
  for (const [name, value] of query) {
    if (LIST_PARAM.test(name) && allowed.has('include')) continue
    if (!allowed.has(name)) return { kind: 'unknown', param: shownName(name) }
    if (seen.has(name)) return { kind: 'repeated', param: name }
    seen.add(name)
    if (name === 'stream' && value !== 'true' && value !== 'false') return { kind: 'invalid', param: name }
  }
  return null
}

/** Whether a retrieve's query asks for its events streamed (`?stream=true`), read as queryProblem reads it. */
export function streamsRetrieve (op: Operation): boolean {
  return op.action === 'response.retrieve' && op.query?.get('stream') === 'true'
}

/** The path part of a request target, as sent. */
export function rawPath (url: string): string {
  const q = url.indexOf('?')
  return q === -1 ? url : url.slice(0, q)
}

/** The resource whose shape these segments have (literals equal, any segment where an id goes). */
function shapeOf (rest: readonly string[]): Resource | null {
  outer: for (const resource of RESOURCES) {
    const segments = resource.segments
    if (segments.length !== rest.length) continue
    for (let i = 0; i < segments.length; i++) {
      const segment = segments[i]!
      if (segment.charCodeAt(0) !== 0x3a /* : */ && segment !== rest[i]) continue outer
    }
    return resource
  }
  return null
}

/** The id in the segment where `:param` goes, if the resource has one. */
function idAt (resource: Resource, rest: readonly string[], param: string): string | null {
  const at = resource.segments.indexOf(param)
  return at === -1 ? null : rest[at]!
}

export function matchOperation (method: string, url: string): Match {
  const path = rawPath(url)
  if (!path.startsWith(API_PREFIX + '/')) return { kind: 'unknown' }
  const rest = path.slice(API_PREFIX.length + 1).split('/')
  // One rule for every empty segment (a trailing slash, `//`): such a path is none of the routes.
  if (rest.includes('')) return { kind: 'unknown' }
  const resource = shapeOf(rest)
  if (resource === null || (rest.length === 2 && rest[0] === 'responses' && UNROUTED_RESPONSE_PATHS.has(rest[1]!))) {
    return { kind: 'unknown' }
  }
  const op = resource.methods[method as Method]
  if (op === undefined) return { kind: 'method_not_allowed', allow: Object.keys(resource.methods).join(', ') }
  return {
    kind: 'operation',
    operation: {
      action: op.action,
      scope: op.scope,
      conversationId: idAt(resource, rest, ':conversation_id'),
      itemId: idAt(resource, rest, ':item_id'),
      responseId: idAt(resource, rest, ':response_id'),
      query: queryOf(url)
    }
  }
}

/** The first id of the operation that is not acceptable, with the parameter name OpenAI uses for it. */
export function invalidId (op: Operation): IdParam | null {
  if (op.conversationId !== null && !ID_PATTERN.test(op.conversationId)) return 'conversation_id'
  if (op.itemId !== null && !ID_PATTERN.test(op.itemId)) return 'item_id'
  if (op.responseId !== null && !ID_PATTERN.test(op.responseId)) return 'response_id'
  return null
}
