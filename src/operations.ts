// The eight Conversations operations the gateway re-exposes, and the one function that decides which of them a
// request is. Matching is done on the raw request target (before any percent-decoding), so that an encoded
// prefix, an encoded slash or a dot segment can never be read as something else than what reaches the upstream.
import type { Scope } from './config.js'

export const API_PREFIX = '/v1/conversations'
export const ID_PATTERN = /^[A-Za-z0-9_-]{1,200}$/

export type Action =
  | 'conversation.create' | 'conversation.retrieve' | 'conversation.update' | 'conversation.delete'
  | 'item.create' | 'item.list' | 'item.retrieve' | 'item.delete'

export type Method = 'GET' | 'POST' | 'DELETE'

/** A path shape below /v1/conversations: the Fastify route it is served on and the operation per method. */
interface Resource {
  route: string
  segments: number
  methods: Partial<Record<Method, { action: Action, scope: Scope }>>
}

const SCOPE_OF: Record<Method, Scope> = { GET: 'read', POST: 'write', DELETE: 'delete' }

function resource (route: string, segments: number, actions: Partial<Record<Method, Action>>): Resource {
  const methods: Resource['methods'] = {}
  for (const [method, action] of Object.entries(actions) as [Method, Action][]) {
    methods[method] = { action, scope: SCOPE_OF[method] }
  }
  return { route, segments, methods }
}

export const RESOURCES: readonly Resource[] = [
  resource('/', 0, { POST: 'conversation.create' }),
  resource('/:conversation_id', 1,
    { GET: 'conversation.retrieve', POST: 'conversation.update', DELETE: 'conversation.delete' }),
  resource('/:conversation_id/items', 2, { GET: 'item.list', POST: 'item.create' }),
  resource('/:conversation_id/items/:item_id', 3, { GET: 'item.retrieve', DELETE: 'item.delete' })
]

/** Every action the gateway can record, in table order (audit query, metrics labels). */
export const ACTIONS: readonly Action[] = RESOURCES.flatMap(r => Object.values(r.methods).map(m => m.action))

export interface Operation {
  action: Action
  scope: Scope
  /** Raw (still percent-encoded) path segments; validated later, after the key check. */
  conversationId: string | null
  itemId: string | null
}

export type Match =
  | { kind: 'operation', operation: Operation }
  | { kind: 'method_not_allowed', allow: string }
  | { kind: 'unknown' }

/** The path part of a request target, as sent. */
export function rawPath (url: string): string {
  const q = url.indexOf('?')
  return q === -1 ? url : url.slice(0, q)
}

export function matchOperation (method: string, url: string): Match {
  const path = rawPath(url)
  if (path !== API_PREFIX && !path.startsWith(API_PREFIX + '/')) return { kind: 'unknown' }
  const rest = path === API_PREFIX ? [] : path.slice(API_PREFIX.length + 1).split('/')
  // One rule for every empty segment (a trailing slash, `//`): such a path is none of the routes.
  if (rest.includes('')) return { kind: 'unknown' }
  if (rest.length >= 2 && rest[1] !== 'items') return { kind: 'unknown' }
  const found = RESOURCES.find(r => r.segments === rest.length)
  if (found === undefined) return { kind: 'unknown' }
  const op = found.methods[method as Method]
  if (op === undefined) return { kind: 'method_not_allowed', allow: Object.keys(found.methods).join(', ') }
  return {
    kind: 'operation',
    operation: { ...op, conversationId: rest[0] ?? null, itemId: rest[2] ?? null }
  }
}

/** The first id of the operation that is not acceptable, with the parameter name OpenAI uses for it. */
export function invalidId (op: Operation): 'conversation_id' | 'item_id' | null {
  if (op.conversationId !== null && !ID_PATTERN.test(op.conversationId)) return 'conversation_id'
  if (op.itemId !== null && !ID_PATTERN.test(op.itemId)) return 'item_id'
  return null
}
