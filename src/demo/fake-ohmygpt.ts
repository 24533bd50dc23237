// A small in-memory stand-in for OhMyGPT's Conversations and Responses APIs, for `npm run demo` and the tests: it
// checks the upstream token, keeps conversations, items and responses in memory, and answers in OpenAI's shapes and
// error envelope (the Responses half is fake-responses.ts).
import { randomBytes } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { createResponsesHandler, type ResponsesOptions } from './fake-responses.js'

interface Item { id: string, type: string, [k: string]: unknown }
interface Conversation { id: string, object: 'conversation', created_at: number, metadata: Record<string, string>, items: Item[] }

export interface FakeOhMyGPTOptions {
  apiKey: string
  /** extra response headers on every answer (the tests use it to send headers the gateway must drop) */
  extraHeaders?: Record<string, string | string[]>
  responses?: ResponsesOptions
}

function id (prefix: string): string {
  return `${prefix}_${randomBytes(12).toString('hex')}`
}

function send (res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

function notFound (res: ServerResponse, what: string): void {
  send(res, 404, { error: { message: `${what} not found.`, type: 'invalid_request_error', param: null, code: null } })
}

function publicConversation ({ items: _items, ...conversation }: Conversation) {
  return conversation
}

function list (items: Item[], hasMore = false) {
  return { object: 'list', data: items, first_id: items[0]?.id ?? null, last_id: items.at(-1)?.id ?? null, has_more: hasMore }
}

function invalidParam (res: ServerResponse, param: string, message: string): void {
  send(res, 400, { error: { message, type: 'invalid_request_error', param, code: 'invalid_value' } })
}

/**
 * GET .../items as OpenAI pages it: `order` (asc or desc by creation, default desc), `after` (an item id: the page
 * starts after it, in that order), `limit` (1 to 100, default 20), `has_more` when items are left after the page.
 * An unknown cursor is refused rather than read as "from the start", so a client that pages wrongly sees it.
 */
function listItems (res: ServerResponse, items: Item[], query: URLSearchParams): void {
  const order = query.get('order') ?? 'desc'
  if (order !== 'asc' && order !== 'desc') return invalidParam(res, 'order', `Invalid 'order': expected 'asc' or 'desc', got '${order}'.`)
  const limitText = query.get('limit') ?? '20'
  const limit = Number(limitText)
  if (!/^\d+$/.test(limitText) || limit < 1 || limit > 100) {
    return invalidParam(res, 'limit', `Invalid 'limit': expected an integer from 1 to 100, got '${limitText}'.`)
  }
  const ordered = order === 'asc' ? items : [...items].reverse()
  const after = query.get('after')
  let start = 0
  if (after !== null) {
    const at = ordered.findIndex(i => i.id === after)
    if (at === -1) return invalidParam(res, 'after', `Invalid 'after': no item with id '${after}' in this conversation.`)
    start = at + 1
  }
  const page = ordered.slice(start, start + limit)
  send(res, 200, list(page, start + limit < ordered.length))
}

function isObject (value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value)
}

function toItem (input: Record<string, unknown>): Item {
  return { id: id('msg'), status: 'completed', ...input, type: typeof input.type === 'string' ? input.type : 'message' }
}

/** Handles one request that has been read in full; exported so the test fixture can wrap it. */
export function createConversationsHandler (opts: FakeOhMyGPTOptions) {
  const conversations = new Map<string, Conversation>()
  const handleResponses = createResponsesHandler({
    has: id => conversations.has(id),
    append: (id, items) => { conversations.get(id)?.items.push(...items) }
  }, send, notFound, opts.responses)

  return function handle (req: IncomingMessage, res: ServerResponse, body: Buffer): void {
    res.setHeader('x-request-id', id('req'))
    res.setHeader('openai-processing-ms', '3')
    for (const [name, value] of Object.entries(opts.extraHeaders ?? {})) res.setHeader(name, value)

    if (req.headers.authorization !== `Bearer ${opts.apiKey}`) {
      send(res, 401, { error: { message: 'Incorrect API key provided.', type: 'invalid_request_error', param: null, code: 'invalid_api_key' } })
      return
    }
    const parsed = (body.length > 0 ? JSON.parse(body.toString('utf8')) : {}) as unknown
    // As OpenAI answers a body, or an item, that is JSON but no object (`null`, `[]`): read on, it would throw,
    // and the demo runs this fake in the gateway's own process.
    const items = (parsed as { items?: unknown } | null)?.items
    if (!isObject(parsed) || (Array.isArray(items) && !items.every(isObject))) {
      send(res, 400, { error: { message: 'The request body and its items must be JSON objects.', type: 'invalid_request_error', param: null, code: null } })
      return
    }
    const input = parsed
    const [path, queryText] = (req.url ?? '/').split('?')
    const parts = path!.split('/').slice(3) // after /v1/conversations or /v1/responses
    const method = req.method ?? 'GET'
    if (path!.startsWith('/v1/responses')) {
      handleResponses(req, res, input, parts)
      return
    }

    if (parts.length === 0 && method === 'POST') {
      const conversation: Conversation = {
        id: id('conv'), object: 'conversation', created_at: Math.floor(Date.now() / 1000),
        metadata: (input.metadata as Record<string, string>) ?? {},
        items: Array.isArray(input.items) ? input.items.map(toItem) : []
      }
      conversations.set(conversation.id, conversation)
      send(res, 200, publicConversation(conversation))
      return
    }
    const conversation = conversations.get(parts[0] ?? '')
    if (conversation === undefined) {
      notFound(res, `Conversation with id '${parts[0]}'`)
      return
    }
    const route = `${method} ${parts.length === 1 ? ':id' : parts.length === 2 ? ':id/items' : ':id/items/:item'}`
    const item = conversation.items.find(i => i.id === parts[2])
    switch (route) {
      case 'GET :id': return send(res, 200, publicConversation(conversation))
      case 'POST :id':
        conversation.metadata = (input.metadata as Record<string, string>) ?? conversation.metadata
        return send(res, 200, publicConversation(conversation))
      case 'DELETE :id':
        conversations.delete(conversation.id)
        return send(res, 200, { id: conversation.id, object: 'conversation.deleted', deleted: true })
      case 'POST :id/items': {
        const added = (Array.isArray(input.items) ? input.items : []).map(toItem)
        conversation.items.push(...added)
        return send(res, 200, list(added))
      }
      case 'GET :id/items': return listItems(res, conversation.items, new URLSearchParams(queryText))
      case 'GET :id/items/:item':
        return item ? send(res, 200, item) : notFound(res, `Item with id '${parts[2]}'`)
      case 'DELETE :id/items/:item':
        if (!item) return notFound(res, `Item with id '${parts[2]}'`)
        conversation.items = conversation.items.filter(i => i !== item)
        return send(res, 200, publicConversation(conversation))
      default:
        return notFound(res, `Route ${method} ${path}`)
    }
  }
}

export function readBody (req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    req.on('data', (c: Buffer) => chunks.push(c))
    req.on('end', () => resolve(Buffer.concat(chunks)))
    req.on('error', reject)
  })
}

/** Starts the fake on host:port (0 = any free port) and returns the server and its base URL. */
export async function startFakeOhMyGPT (opts: FakeOhMyGPTOptions & { host?: string, port?: number }): Promise<{ server: Server, url: string }> {
  const handle = createConversationsHandler(opts)
  const server = createServer((req, res) => {
    readBody(req).then(body => handle(req, res, body), () => res.destroy())
      // A request this fake did not foresee is its 500, never the end of the demo's process.
      .catch(() => { if (res.headersSent) res.destroy(); else send(res, 500, { error: { message: 'The fake OhMyGPT failed.', type: 'server_error', param: null, code: null } }) })
  })
  const host = opts.host ?? '127.0.0.1'
  await new Promise<void>(resolve => server.listen(opts.port ?? 0, host, resolve))
  return { server, url: `http://${host}:${(server.address() as AddressInfo).port}` }
}
