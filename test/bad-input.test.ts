// Bad input (T01–T12), every case over a real socket: the raw bytes go through Node's HTTP parser and the
// gateway's own checks exactly as an attacker would send them. What each case must show: the right status and
// OpenAI envelope from the gateway, one audit record, and nothing at the upstream. The order of checks is
// route (404/405) → key (401) → ids (400) → scope (403) → rate limit (429) → body (415/413/400) → upstream.
import { createConnection } from 'node:net'
import t, { type Test } from 'tap'
import type { AuditRecord, Outcome } from '../src/plugins/audit.js'
import { KEYS, startGateway, withoutOwnership, type TestGateway } from './fixtures/gateway.js'
import { buildRequest, chunk, sendRaw, type RawExchange, type RawResponse, type SendOptions } from './fixtures/raw-http.js'
import { startUpstream, UPSTREAM_TOKEN, type FakeUpstream, type RecordedRequest } from './fixtures/upstream.js'

type Header = [string, string]

const BODY_LIMIT = 1024
const bearer = (key: string): Header => ['Authorization', `Bearer ${key}`]
const FULL = bearer(KEYS.full)
const JSON_TYPE: Header = ['Content-Type', 'application/json']
const REQUEST_ID = /^gw_[0-9a-f]{32}$/
/** Anything that would betray the gateway's insides in an error body. */
const LEAK = /\n\s+at |node:internal|node_modules|\/src\/|\.[jt]s:\d+|"stack"/

interface Harness {
  upstream: FakeUpstream
  gw: TestGateway
  /** a conversation that exists upstream, for routes whose answer must be a 200 */
  conversationId: string
  /** requests the gateway itself handled (and so must have audited), counted as they are sent */
  handled: number
}

async function setup (t: Test): Promise<Harness> {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // Ownership is ownership.test.ts's concern: here every call that passes the checks under test goes upstream.
  const gw = await startGateway(t, ...withoutOwnership(upstream.url, { limits: { bodyBytes: BODY_LIMIT, authFailuresPerMinute: 100_000 } }))
  const created = await fetch(`${upstream.url}/v1/conversations`, {
    method: 'POST', headers: { authorization: `Bearer ${UPSTREAM_TOKEN}` }, body: '{}'
  })
  const { id } = await created.json() as { id: string }
  upstream.requests.length = 0 // only what the gateway sends counts
  return { upstream, gw, handled: 0, conversationId: id }
}

/** The last step of each group: every request the gateway handled left exactly one audit line. */
async function oneAuditLineEach (t: Test, h: Harness) {
  await t.test('every request handled left exactly one audit line', async t => {
    const records = await auditSettled(h.gw, h.handled)
    t.equal(records.length, h.handled, `${h.handled} requests, ${records.length} audit lines`)
    t.equal(new Set(records.map(r => r.requestId)).size, records.length, 'no request audited twice')
  })
}

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms))

/** The audit record is written when the response closes, which can be a moment after the client has it. */
async function auditOf (gw: TestGateway, requestId: string): Promise<AuditRecord[]> {
  for (let i = 0; i < 50; i++) {
    const found = gw.audit().filter(r => r.requestId === requestId)
    if (found.length > 0) return found
    await sleep(10)
  }
  return []
}

/** Writes `request` (not half-closed: the gateway is to close) and reads until the gateway closes, or 3 s pass. */
function readToClose (url: string, request: Buffer): Promise<{ text: string, closed: boolean }> {
  const { hostname, port } = new URL(url)
  return new Promise((resolve, reject) => {
    const socket = createConnection({ host: hostname, port: Number(port) })
    let text = ''
    const timer = setTimeout(() => { socket.destroy(); resolve({ text, closed: false }) }, 3000)
    socket.on('data', (d: Buffer) => { text += d.toString('latin1') })
    socket.on('close', () => { clearTimeout(timer); resolve({ text, closed: true }) })
    socket.on('error', reject)
    socket.write(request)
  })
}

async function auditSettled (gw: TestGateway, atLeast: number): Promise<AuditRecord[]> {
  for (let i = 0; i < 50 && gw.audit().length < atLeast; i++) await sleep(10)
  await sleep(20) // a duplicate line would show up now
  return gw.audit()
}

function methodOf (request: Buffer): string {
  return request.subarray(0, request.indexOf(' ')).toString('latin1')
}

function headerOf (res: RawResponse, name: string): string | undefined {
  const v = res.headers[name]
  return Array.isArray(v) ? v.join(', ') : v
}

/** The envelope's code, for refusals whose exact code the contract leaves open (only a 4xx is required). */
function codeOf (res: RawResponse): string {
  try {
    return String((JSON.parse(res.body) as { error?: { code?: unknown } }).error?.code)
  } catch {
    return 'not an envelope'
  }
}

interface Rejection {
  status: number
  code: string
  type?: string
  param?: string | null
  outcome: Outcome
  /** the exact Allow header of a 405 */
  allow?: string
}

/** The gateway's own error: OpenAI's envelope and nothing else, our request id, no internals. */
function assertGatewayError (t: Test, res: RawResponse, want: Rejection, method: string) {
  t.equal(res.status, want.status, `status ${want.status}`)
  t.match(headerOf(res, 'x-gateway-request-id'), REQUEST_ID, 'carries x-gateway-request-id')
  if (want.allow !== undefined) t.equal(headerOf(res, 'allow'), want.allow, `Allow: ${want.allow}`)
  if (method === 'HEAD') return // no body to a HEAD, by HTTP
  t.match(headerOf(res, 'content-type'), /^application\/json/, 'a JSON body')
  t.notMatch(res.body, LEAK, 'no stack trace or source path in the body')
  let parsed: { error?: Record<string, unknown> } = {}
  try {
    parsed = JSON.parse(res.body) as typeof parsed
  } catch {
    t.fail(`the body is not JSON: ${res.body.slice(0, 200)}`)
    return
  }
  if (!t.same(Object.keys(parsed), ['error'], 'the body is {"error": ...}')) return
  t.same(Object.keys(parsed.error ?? {}).sort(), ['code', 'message', 'param', 'type'], 'exactly message, type, param, code')
  t.same({ ...parsed.error, message: undefined }, {
    message: undefined, type: want.type ?? 'invalid_request_error', param: want.param ?? null, code: want.code
  }, `type ${want.type ?? 'invalid_request_error'}, code ${want.code}, param ${want.param ?? null}`)
  t.ok(typeof parsed.error?.message === 'string' && parsed.error.message.length > 0, 'a message')
}

async function assertAuditedOnce (t: Test, h: Harness, res: RawResponse, status: number, outcome: Outcome) {
  const id = headerOf(res, 'x-gateway-request-id')
  if (id === undefined) return // already failed above
  const records = await auditOf(h.gw, id)
  t.equal(records.length, 1, 'one audit line for the request')
  t.match(records[0], { status, outcome }, `audited as ${status} ${outcome}`)
}

/** Sends a request the gateway must refuse itself, and checks the refusal from every side. */
async function expectRejected (
  t: Test, h: Harness, request: Buffer, want: Rejection, opts: SendOptions = {}
): Promise<RawExchange> {
  const before = h.upstream.requests.length
  h.handled++
  const ex = await sendRaw(h.gw.url, request, opts)
  t.equal(h.upstream.requests.length, before, 'the upstream received nothing')
  t.notOk(ex.reset, 'answered, not reset')
  if (ex.response === null) {
    t.fail(`no response; the connection closed after ${JSON.stringify(ex.received.toString('latin1'))}`)
    return ex
  }
  assertGatewayError(t, ex.response, want, methodOf(request))
  await assertAuditedOnce(t, h, ex.response, want.status, want.outcome)
  return ex
}

/** Sends a request that must reach the upstream exactly once; returns what the upstream received. */
async function expectForwarded (t: Test, h: Harness, request: Buffer): Promise<{ res: RawResponse | null, seen: RecordedRequest | undefined }> {
  const before = h.upstream.requests.length
  h.handled++
  const ex = await sendRaw(h.gw.url, request)
  t.equal(h.upstream.requests.length, before + 1, 'the upstream received the request once')
  t.ok(ex.response !== null && ex.response.status < 500, `answered (status ${ex.response?.status})`)
  return { res: ex.response, seen: h.upstream.requests[before] }
}

const get = (target: string, headers: Header[] = [FULL]) => buildRequest('GET', target, headers)
const post = (target: string, body: string | Buffer = '{}', headers: Header[] = [FULL, JSON_TYPE]) =>
  buildRequest('POST', target, headers, body)
const del = (target: string, headers: Header[] = [FULL]) => buildRequest('DELETE', target, headers)

// Raw path segments (as sent, still percent-encoded) that the id pattern must refuse.
const BAD_IDS: Array<[label: string, segment: string]> = [
  ['an encoded slash (%2F)', 'conv%2Fx'],
  ['a dot-dot segment', '..'],
  ['a single dot', '.'],
  ['an encoded dot-dot (%2e%2e)', '%2e%2e'],
  ['a half-encoded dot-dot (.%2e)', '.%2e'],
  ['a double-encoded dot-dot (%252e%252e)', '%252e%252e'],
  ['an encoded backslash (..%5c)', '..%5c'],
  ['a raw backslash traversal (\\..\\models)', '\\..\\models'],
  ['an encoded space (%20)', 'conv%20x'],
  ['an encoded NUL (%00)', 'conv%00x'],
  ['encoded CRLF (%0d%0a)', 'conv%0d%0aX-Injected:%20y'],
  ['percent-encoded unicode (conv_é)', 'conv_%C3%A9'],
  ['a shell metacharacter (conv_x;rm)', 'conv_x;rm'],
  ['an encoded question mark (%3F)', 'conv%3Fx'],
  ['an encoded hash (%23)', 'conv%23x'],
  ['a dot (conv.x)', 'conv.x'],
  ['a 201-character id', 'c'.repeat(201)],
  ['a 1 KB id', 'c'.repeat(1024)],
  ['a malformed percent escape (%zz)', 'conv%zz'],
  ['a truncated UTF-8 escape (%E0%A4%A)', 'conv_%E0%A4%A']
]

t.test('ids outside ^[A-Za-z0-9_-]{1,200}$ get 400 invalid_id and are never sent upstream', async t => {
  const h = await setup(t)
  const asConversation = { status: 400, code: 'invalid_id', param: 'conversation_id', outcome: 'invalid' } as const
  const asItem = { ...asConversation, param: 'item_id' } as const

  for (const [label, seg] of BAD_IDS) {
    await t.test(`${label} in a conversation id gets 400 invalid_id (param conversation_id) and the upstream sees nothing`, async t => {
      await expectRejected(t, h, get(`/v1/conversations/${seg}`), asConversation)
      await expectRejected(t, h, post(`/v1/conversations/${seg}/items`, '{"items":[]}'), asConversation)
    })
    await t.test(`${label} in an item id gets 400 invalid_id (param item_id) and the upstream sees nothing`, async t => {
      await expectRejected(t, h, del(`/v1/conversations/conv_ok/items/${seg}`), asItem)
    })
  }

  await t.test('a path with an empty segment (trailing slash or //) is no route: 404 unknown_route, whatever the method', async t => {
    const unknown = { status: 404, code: 'unknown_route', outcome: 'invalid' } as const
    await expectRejected(t, h, get('/v1/conversations/'), unknown)
    await expectRejected(t, h, post('/v1/conversations/'), unknown)
    await expectRejected(t, h, get('/v1/conversations//items'), unknown)
    await expectRejected(t, h, get('/v1/conversations/conv_ok/'), unknown)
    await expectRejected(t, h, post('/v1/conversations/conv_ok/'), unknown)
    await expectRejected(t, h, get('/v1/conversations/conv_ok/items/'), unknown)
    await expectRejected(t, h, del('/v1/conversations/conv_ok/items/msg_1/'), unknown)
  })

  await t.test('with both ids bad, the conversation id is the one reported', async t => {
    await expectRejected(t, h, get('/v1/conversations/a%2Fb/items/c%2Fd'), asConversation)
  })

  await t.test('an id far past 200 characters is cut at 200 in the audit record, with or without a key: a client cannot write 16 KB records', async t => {
    const [c, i, r] = ['c'.repeat(9000), 'i'.repeat(3000), 'r'.repeat(12000)]
    const cases: Array<[Buffer, Rejection]> = [
      [get(`/v1/conversations/${c}/items/${i}`), asConversation],
      [get(`/v1/conversations/${c}/items/${i}`, []), { status: 401, code: 'invalid_api_key', outcome: 'denied' }],
      [get(`/v1/responses/${r}`), { ...asConversation, param: 'response_id' }]
    ]
    for (const [request, want] of cases) {
      const { response } = await expectRejected(t, h, request, want)
      const [record] = await auditOf(h.gw, headerOf(response!, 'x-gateway-request-id')!)
      t.ok(record !== undefined, 'audited')
      t.ok(JSON.stringify(record).length < 3000, `the record is ${JSON.stringify(record).length} characters`)
      for (const field of ['conversationId', 'itemId', 'responseId'] as const) {
        const value = record![field]
        if (value !== null) t.equal(value, value[0]!.repeat(200), `${field}: its first 200 characters`)
      }
    }
  })
  await oneAuditLineEach(t, h)
})

t.test('a bad id from a client without a valid key gets 401, not 400: the key is checked first', async t => {
  const h = await setup(t)
  const denied = { status: 401, code: 'invalid_api_key', outcome: 'denied' } as const
  for (const [label, seg] of BAD_IDS) {
    await t.test(`${label}, with no key or a wrong key, gets 401 invalid_api_key`, async t => {
      await expectRejected(t, h, get(`/v1/conversations/${seg}`, []), denied)
      await expectRejected(t, h, get(`/v1/conversations/conv_ok/items/${seg}`, [bearer('gw_wrong_key')]), denied)
    })
  }
  await t.test('an empty segment with no key is 404 unknown_route: the route is checked before the key', async t => {
    await expectRejected(t, h, get('/v1/conversations/', []), { status: 404, code: 'unknown_route', outcome: 'invalid' })
  })
  await oneAuditLineEach(t, h)
})

t.test('a missing or malformed Authorization gets the same 401 as a wrong key: Basic, no scheme, two keys, two headers', async t => {
  const h = await setup(t)
  const denied = { status: 401, code: 'invalid_api_key', outcome: 'denied' } as const
  const cases: Array<[string, Header[]]> = [
    ['Basic', [['Authorization', `Basic ${Buffer.from(`x:${KEYS.full}`).toString('base64')}`]]],
    ['the key with no scheme', [['Authorization', KEYS.full]]],
    ['two keys in one header', [['Authorization', `Bearer ${KEYS.full} ${KEYS.other}`]]],
    // Node keeps the first Authorization header and drops the second: which key the call is made with would be a
    // guess (and a proxy in front may read the other one).
    ['two headers, a valid key first', [FULL, bearer(KEYS.other)]],
    ['two headers, the same key twice', [FULL, FULL]],
    ['two headers, a valid key second', [['authorization', 'Bearer ogw_wrong'], FULL]]
  ]
  for (const [label, headers] of cases) {
    await t.test(label, async t => { await expectRejected(t, h, get(`/v1/conversations/${h.conversationId}`, headers), denied) })
  }
  await oneAuditLineEach(t, h)
})

t.test('ids at the edges of the pattern reach the upstream byte for byte', async t => {
  const h = await setup(t)
  for (const id of ['a', 'Z', '0', '-', '_', 'conv_AZaz09-_', 'c'.repeat(100), 'c'.repeat(101), 'c'.repeat(200)]) {
    await t.test(`a ${id.length}-character id ${id.length < 20 ? `"${id}" ` : ''}is forwarded unchanged`, async t => {
      const conv = await expectForwarded(t, h, get(`/v1/conversations/${id}`))
      t.equal(conv.seen?.url, `/v1/conversations/${id}`)
      const item = await expectForwarded(t, h, get(`/v1/conversations/conv_ok/items/${id}`))
      t.equal(item.seen?.url, `/v1/conversations/conv_ok/items/${id}`)
    })
  }
  await oneAuditLineEach(t, h)
})

// Targets outside the eight operations, as sent on the request line.
const UNKNOWN_TARGETS: Array<[method: string, target: string]> = [
  ['GET', '/v1/models'],
  ['POST', '/v1/chat/completions'],
  ['GET', '/'],
  ['GET', '/v1'],
  ['GET', '/v1/conversations/a/items/b/c'],
  ['GET', '/v1/conversations/a/itemz'],
  ['GET', '/v1/conversationsX'],
  ['GET', '/V1/CONVERSATIONS/conv_x'],
  ['POST', '/v1/%63onversations'],
  ['GET', '/v1/%63onversations/conv_x'],
  ['GET', '/v1/conversations%2Fconv_x'],
  ['GET', '/v1/conversations/x/../../models'],
  ['GET', '/v1/conversations/../models'],
  ['GET', '/v1/conversations/%2e%2e/'],
  ['GET', '/v1/conversations/.%2e/models'],
  ['GET', '/v1/conversations/conv_x/../../files'],
  ['POST', '//v1/conversations'],
  ['GET', '/v1//conversations/conv_x'],
  ['GET', 'http://evil.example/v1/conversations/x'],
  ['POST', 'http://evil.example/v1/conversations'],
  // absolute-form targets find-my-way answers itself (FST_ERR_BAD_URL): a fragment, no host, a host it cannot parse
  ['GET', 'http://evil.example/v1/conversations/x#frag'],
  ['POST', 'http://evil.example/v1/conversations?a=1#'],
  ['GET', 'http:///v1/conversations/x'],
  ['GET', 'http://[evil/v1/conversations/x'],
  ['OPTIONS', '*'],
  // OpenAI's own routes whose names stand where a response id goes: not routed here, so not a 405 either
  ['POST', '/v1/responses/input_tokens'],
  ['POST', '/v1/responses/compact']
]

t.test('any path outside the Conversations routes gets 404 unknown_route and nothing reaches the upstream', async t => {
  const h = await setup(t)
  const unknown = { status: 404, code: 'unknown_route', outcome: 'invalid' } as const
  for (const [method, target] of UNKNOWN_TARGETS) {
    const body = method === 'POST' ? '{}' : undefined
    await t.test(`${method} ${target} gets 404 unknown_route, with or without a key`, async t => {
      await expectRejected(t, h, buildRequest(method, target, [FULL, ...(body ? [JSON_TYPE] : [])], body), unknown)
      await expectRejected(t, h, buildRequest(method, target, [], body), unknown)
    })
  }
  await oneAuditLineEach(t, h)
})

t.test('the log names a target the router cannot take (absolute-form, a malformed escape) as the client sent it', async t => {
  const h = await setup(t)
  for (const target of ['http://evil.example/v1/conversations/x#frag', '/v1/conversations/%zz']) {
    await sendRaw(h.gw.url, buildRequest('GET', target, [FULL]))
    t.ok(h.gw.logs.some(line => line.includes(`"url":${JSON.stringify(target)}`)), target)
  }
  t.notOk(h.gw.logs.some(line => line.includes('"url":"/.unroutable"')), 'never the stand-in the router is given')
})

// The four path shapes, the Allow header the gateway sends for each, and methods outside it.
const SHAPES: Array<[path: string, allow: string, others: string[]]> = [
  ['/v1/conversations', 'POST', ['GET', 'DELETE']],
  ['/v1/conversations/conv_x', 'GET, POST, DELETE', []],
  ['/v1/conversations/conv_x/items', 'GET, POST', ['DELETE']],
  ['/v1/conversations/conv_x/items/msg_y', 'GET, DELETE', ['POST']]
]

t.test('a known path with another method gets 405 method_not_allowed with an exact Allow header', async t => {
  const h = await setup(t)
  for (const [path, allow, others] of SHAPES) {
    for (const method of ['PUT', 'PATCH', 'HEAD', 'OPTIONS', 'TRACE', ...others]) {
      await t.test(`${method} ${path} gets 405 with Allow: ${allow}, with or without a key`, async t => {
        const want = { status: 405, code: 'method_not_allowed', outcome: 'invalid', allow } as const
        const body = method === 'PUT' || method === 'PATCH' || method === 'POST' ? '{}' : undefined
        await expectRejected(t, h, buildRequest(method, path, [FULL, ...(body ? [JSON_TYPE] : [])], body), want)
        await expectRejected(t, h, buildRequest(method, path, [], body), want)
      })
    }
  }
  await oneAuditLineEach(t, h)
})

const INVALID_JSON: Array<[label: string, body: string | Buffer]> = [
  ['an unterminated object', '{'],
  ['plain text', 'not json'],
  ['trailing garbage', '{"metadata":{}}x'],
  ['single quotes', "{'metadata':{}}"],
  ['a trailing comma', '{"metadata":{},}'],
  ['NaN', 'NaN'],
  ['a byte order mark', '\uFEFF{}'],
  ['two documents', '{}{}'],
  ['whitespace only', '   ']
]

t.test('a body that is not JSON gets 400 invalid_json and is not forwarded', async t => {
  const h = await setup(t)
  const invalid = { status: 400, code: 'invalid_json', outcome: 'invalid' } as const
  for (const [label, body] of INVALID_JSON) {
    await t.test(`${label} gets 400 invalid_json on each route that takes a body`, async t => {
      await expectRejected(t, h, post('/v1/conversations', body), invalid)
      await expectRejected(t, h, post('/v1/conversations/conv_x', body), invalid)
      await expectRejected(t, h, post('/v1/conversations/conv_x/items', body), invalid)
    })
  }

  await t.test('a body behind a byte order mark is refused saying so: the JSON after it is valid', async t => {
    const ex = await expectRejected(t, h, post('/v1/conversations', '\uFEFF{"metadata":{}}'), invalid)
    t.match(JSON.parse(ex.response!.body), { error: { message: /byte order mark/, param: null } }, 'the message names the BOM')
    const plain = await expectRejected(t, h, post('/v1/conversations', 'not json'), invalid)
    t.notMatch(JSON.parse(plain.response!.body), { error: { message: /byte order mark/ } }, 'and only for one')
  })

  await t.test('a body refused once read whole keeps its connection: a call pipelined behind it is answered, not dropped', async t => {
    // Fastify asks to close the connection on any body error; after a body read to its end there is nothing left
    // to discard, and closing drops a call already read behind it (or loses its answer, if it went upstream first).
    const before = h.upstream.requests.length
    const both = Buffer.concat([post('/v1/conversations', '{"metadata":'), post('/v1/conversations', '{}')])
    const { hostname, port } = new URL(h.gw.url)
    const received = await new Promise<string>((resolve, reject) => {
      const socket = createConnection({ host: hostname, port: Number(port) })
      let text = ''
      const done = () => { socket.destroy(); resolve(text) }
      const timer = setTimeout(done, 3000)
      socket.on('data', (d: Buffer) => {
        text += d.toString('latin1')
        if ((text.match(/HTTP\/1\.1 /g) ?? []).length === 2 && /\r\n\r\n\{"id":[^]*\}$/.test(text)) { clearTimeout(timer); done() }
      })
      socket.on('close', () => { clearTimeout(timer); resolve(text) })
      socket.on('error', reject)
      socket.write(both) // not end(): Node drops answers still to come to a client that half-closed
    })
    h.handled += 2
    const statuses = [...received.matchAll(/HTTP\/1\.1 (\d{3})/g)].map(m => m[1])
    t.same(statuses, ['400', '200'], 'the refusal, then the pipelined call\'s answer')
    t.notMatch(received.split('\r\n\r\n')[0] ?? '', /connection: close/i, 'the refusal does not close the connection')
    t.equal(h.upstream.requests.length - before, 1, 'the upstream got the valid call once, and only it')
  })

  await t.test('a chunked body that is not JSON gets 400 invalid_json', async t => {
    const head = buildRequest('POST', '/v1/conversations', [FULL, JSON_TYPE, ['Transfer-Encoding', 'chunked']])
    await expectRejected(t, h, Buffer.concat([head, chunk('{"metadata":'), chunk('')]), invalid)
  })

  await t.test('a body nesting arrays and objects more than 256 levels gets 400 invalid_json; 256 levels are forwarded', async t => {
    // {"items": then 255 arrays: 256 levels, the deepest accepted (the object itself is the first).
    const nested = (levels: number) => `{"items":${'['.repeat(levels - 1)}${']'.repeat(levels - 1)}}`
    const deep = await expectRejected(t, h, post('/v1/conversations', nested(257)), invalid)
    t.match(deep.response?.body, /more than 256 levels deep/, 'the message says why')
    // Objects count as arrays do: 1 + 128 × (an object holding an array) = 257 levels.
    await expectRejected(t, h, post('/v1/conversations', `{"a":${'{"":['.repeat(128)}${']}'.repeat(128)}}`), invalid)
    const { seen } = await expectForwarded(t, h, post(`/v1/conversations/${h.conversationId}/items`, nested(256)))
    t.equal(seen?.body.toString(), nested(256), 'forwarded byte for byte')
  })

  await t.test('a body with invalid UTF-8 inside a string gets 400 invalid_json (JSON must be UTF-8)', async t => {
    const body = Buffer.concat([Buffer.from('{"metadata":{"a":"'), Buffer.from([0xff, 0xfe]), Buffer.from('"}}')])
    await expectRejected(t, h, post('/v1/conversations', body), invalid)
  })
  await oneAuditLineEach(t, h)
})

/** A JSON body of exactly `size` bytes. */
function jsonOfSize (size: number): string {
  const frame = '{"metadata":{"a":""}}'
  return `{"metadata":{"a":"${'x'.repeat(size - frame.length)}"}}`
}

t.test('bodies over limits.bodyBytes get 413 request_too_large, readable by a client still uploading', async t => {
  const h = await setup(t)
  const tooLarge = { status: 413, code: 'request_too_large', outcome: 'invalid' } as const

  await t.test('a body of exactly limits.bodyBytes is forwarded unchanged', async t => {
    const body = jsonOfSize(BODY_LIMIT)
    const { seen } = await expectForwarded(t, h, post(`/v1/conversations/${h.conversationId}/items`, body))
    t.equal(seen?.body.toString(), body)
  })

  await t.test('one byte over limits.bodyBytes (with Content-Length) gets 413 and the upstream sees nothing', async t => {
    await expectRejected(t, h, post('/v1/conversations', jsonOfSize(BODY_LIMIT + 1)), tooLarge)
  })

  await t.test('a declared 10 KB body gets 413 while the client is still sending it, not a reset', async t => {
    const head = buildRequest('POST', '/v1/conversations', [FULL, JSON_TYPE, ['Content-Length', '10240']])
    const ex = await expectRejected(t, h, Buffer.concat([head, Buffer.alloc(2048, 0x20)]), tooLarge)
    t.ok(ex.response?.complete, 'the whole 413 body arrived')
  })

  await t.test('a chunked body with no length gets 413 once it passes the limit, while still being sent', async t => {
    const head = buildRequest('POST', '/v1/conversations', [FULL, JSON_TYPE, ['Transfer-Encoding', 'chunked']])
    const ex = await expectRejected(t, h, Buffer.concat([head, chunk('{"metadata":{"a":"'), chunk('x'.repeat(2048))]), tooLarge)
    t.ok(ex.response?.complete, 'the whole 413 body arrived')
  })

  // Like curl or an SDK: the whole upload goes out before the answer is read. Closing on such a client resets
  // the connection and throws the 413 away with it.
  await t.test('a client that uploads 16 MB before reading still gets the 413, not a reset', async t => {
    await expectRejected(t, h, post('/v1/conversations', Buffer.alloc(16 * 1024 * 1024, 0x20)), tooLarge, { readAfterWriteMs: 100 })
  })

  await t.test('a client that uploads a 16 MB chunked body before reading still gets the 413, not a reset', async t => {
    const head = buildRequest('POST', '/v1/conversations', [FULL, JSON_TYPE, ['Transfer-Encoding', 'chunked']])
    const chunks = Array.from({ length: 2048 }, () => chunk(Buffer.alloc(8192, 0x20)))
    await expectRejected(t, h, Buffer.concat([head, ...chunks, chunk('')]), tooLarge, { readAfterWriteMs: 100 })
  })
  await oneAuditLineEach(t, h)
})

/**
 * A request with a body of `size` bytes, uploaded as fast as the gateway takes it, then a GET pipelined behind it: the
 * statuses answered, and whether the gateway closed the connection before the upload was done.
 */
async function uploadThenAsk (h: Harness, headers: Header[], size: number): Promise<{ statuses: string[], cutOff: boolean }> {
  const { hostname, port } = new URL(h.gw.url)
  const socket = createConnection({ host: hostname, port: Number(port) })
  const received: Buffer[] = []
  let closed = false
  socket.on('data', (c: Buffer) => { received.push(c) })
  socket.on('error', () => {})
  socket.on('close', () => { closed = true })
  socket.write(buildRequest('POST', `/v1/conversations/${h.conversationId}/items`, [...headers, ['Content-Length', String(size)]]))
  const piece = Buffer.alloc(1024 * 1024, 0x20)
  for (let sent = 0; sent < size && !closed;) {
    const part = piece.subarray(0, Math.min(piece.length, size - sent))
    sent += part.length
    // (each wait takes its listeners off again: 80 of them left on the socket would be a leak warning in the log)
    if (!socket.write(part)) {
      await new Promise<void>(resolve => {
        const go = () => { socket.off('drain', go).off('close', go); resolve() }
        socket.on('drain', go).on('close', go)
      })
    }
  }
  const cutOff = closed
  if (!closed) {
    socket.write(buildRequest('GET', `/v1/conversations/${h.conversationId}`, [FULL, ['Connection', 'close']]))
    await Promise.race([new Promise(resolve => socket.once('close', resolve)), sleep(4000)])
  }
  socket.destroy()
  return { statuses: [...Buffer.concat(received).toString('latin1').matchAll(/HTTP\/1\.1 (\d{3}) /g)].map(m => m[1]!), cutOff }
}

t.test('after an early refusal, a body still coming is thrown away up to 64 MiB, then the connection is closed: also when the refusal came before a byte of it was read (Node then drops what follows unseen)', async t => {
  const h = await setup(t)
  const MiB = 1024 * 1024
  const refusals: Array<[string, Header[], string]> = [
    ['a declared size over limits.bodyBytes', [FULL, JSON_TYPE], '413'],
    ['a wrong key', [bearer('ogw_wrong'), JSON_TYPE], '401']
  ]
  for (const [label, headers, status] of refusals) {
    const within = await uploadThenAsk(h, headers, 60 * MiB)
    t.same(within, { statuses: [status, '200'], cutOff: false }, `${label}, 60 MiB: answered, the rest thrown away, and the call behind it served`)
    const past = await uploadThenAsk(h, headers, 80 * MiB)
    t.same(past, { statuses: [status], cutOff: true }, `${label}, 80 MiB: answered, then the connection closed past 64 MiB, the upload not done`)
  }
})

t.test('Content-Type: application/json in any case or spacing, or none, is checked as JSON and forwarded as application/json', async t => {
  const h = await setup(t)
  const variants: Array<[label: string, headers: Header[]]> = [
    ['a leading space', [['Content-Type', ' application/json']]],
    ['a trailing tab', [['Content-Type', 'application/json\t']]],
    ['upper case with a parameter', [['Content-Type', 'APPLICATION/JSON;x=1']]],
    ['a charset', [['Content-Type', 'application/json; charset=utf-8']]],
    ['mixed case with space before the parameter', [['Content-Type', 'Application/Json ; charset=UTF-8']]],
    ['no Content-Type at all', []]
  ]
  for (const [label, headers] of variants) {
    await t.test(`${label}: a valid body reaches the upstream as application/json`, async t => {
      const body = '{"items":[{"type":"message","role":"user","content":"ct"}]}'
      const { res, seen } = await expectForwarded(t, h, post(`/v1/conversations/${h.conversationId}/items`, body, [FULL, ...headers]))
      t.equal(res?.status, 200)
      const types = (seen?.rawHeaders ?? []).filter((_, i, all) => i % 2 === 0 && /^content-type$/i.test(all[i]!))
      t.equal(types.length, 1, 'one content-type header upstream')
      t.equal(seen?.headers['content-type'], 'application/json')
      t.equal(seen?.body.toString(), body, 'the body bytes unchanged')
    })
    await t.test(`${label}: an invalid body gets 400 invalid_json`, async t => {
      await expectRejected(t, h, post('/v1/conversations', '{"metadata":', [FULL, ...headers]),
        { status: 400, code: 'invalid_json', outcome: 'invalid' })
    })
  }
  await oneAuditLineEach(t, h)
})

t.test('a body with a non-JSON media type gets 415 unsupported_media_type and is not forwarded', async t => {
  const h = await setup(t)
  const types = [
    'text/plain', 'application/x-www-form-urlencoded', 'application/json garbage', 'application/jsonx',
    'multipart/form-data; boundary=x', 'text/json', 'application/xml'
  ]
  for (const type of types) {
    await t.test(`Content-Type: ${type} with a valid JSON body gets 415`, async t => {
      await expectRejected(t, h, post('/v1/conversations', '{}', [FULL, ['Content-Type', type]]),
        { status: 415, code: 'unsupported_media_type', outcome: 'invalid' })
      await expectRejected(t, h, post('/v1/conversations/conv_x/items', '{"items":[]}', [FULL, ['Content-Type', type]]),
        { status: 415, code: 'unsupported_media_type', outcome: 'invalid' })
    })
  }
  await oneAuditLineEach(t, h)
})

t.test('checks run in the contract order: route, key, rate limit, ids, scope, body', async t => {
  const h = await setup(t)
  const reader = bearer(KEYS.reader)
  const limited = bearer(KEYS.limited)

  await t.test('an unknown route is 404 before the key is looked at', async t => {
    await expectRejected(t, h, get('/v1/models', [bearer('gw_wrong')]), { status: 404, code: 'unknown_route', outcome: 'invalid' })
  })
  await t.test('a bad id is 400 before the scope is checked', async t => {
    await expectRejected(t, h, del('/v1/conversations/conv%2Fx', [reader]),
      { status: 400, code: 'invalid_id', param: 'conversation_id', outcome: 'invalid' })
  })
  await t.test('a bad id is 400 before the body is read', async t => {
    await expectRejected(t, h, post('/v1/conversations/conv%2Fx', 'not json', [FULL, ['Content-Type', 'text/plain']]),
      { status: 400, code: 'invalid_id', param: 'conversation_id', outcome: 'invalid' })
  })
  await t.test('a missing scope is 403 before the body is read', async t => {
    await expectRejected(t, h, post('/v1/conversations', 'not json', [reader, JSON_TYPE]),
      { status: 403, code: 'insufficient_scope', type: 'permission_error', outcome: 'denied' })
    await expectRejected(t, h, post('/v1/conversations', jsonOfSize(BODY_LIMIT + 1), [reader, JSON_TYPE]),
      { status: 403, code: 'insufficient_scope', type: 'permission_error', outcome: 'denied' })
  })
  await t.test('a non-JSON media type is 415 before the body size is looked at', async t => {
    await expectRejected(t, h, post('/v1/conversations', 'x'.repeat(BODY_LIMIT + 1), [FULL, ['Content-Type', 'text/plain']]),
      { status: 415, code: 'unsupported_media_type', outcome: 'invalid' })
  })
  await t.test('every authenticated call takes a token, invalid and out-of-scope ones included: the rate limit comes right after the key', async t => {
    // team-limited: burst 3
    await expectRejected(t, h, get('/v1/conversations/..', [limited]),
      { status: 400, code: 'invalid_id', param: 'conversation_id', outcome: 'invalid' })
    await expectRejected(t, h, post('/v1/conversations', '{', [limited, JSON_TYPE]), { status: 400, code: 'invalid_json', outcome: 'invalid' })
    await expectRejected(t, h, get('/v1/conversations/..', [limited]),
      { status: 400, code: 'invalid_id', param: 'conversation_id', outcome: 'invalid' })
    for (const request of [get('/v1/conversations/..', [limited]), post('/v1/conversations', '{', [limited, JSON_TYPE])]) {
      await expectRejected(t, h, request, { status: 429, code: 'rate_limit_exceeded', type: 'requests', outcome: 'rate_limited' })
    }
  })
  await t.test('out-of-scope calls take tokens too, until the client is rate limited', async t => {
    const statuses: number[] = []
    while (statuses.length < 200 && statuses.at(-1) !== 429) {
      h.handled++
      statuses.push((await sendRaw(h.gw.url, del('/v1/conversations/conv_x', [reader]))).response?.status ?? 0)
    }
    t.equal(statuses.at(-1), 429, `429 after ${statuses.length - 1} out-of-scope calls (burst 60)`)
    t.ok(statuses.length >= 50 && statuses.slice(0, -1).every(s => s === 403), 'every call before it was a 403 (a few tokens went to earlier tests)')
  })
  await oneAuditLineEach(t, h)
})

t.test('protocol switches are refused at the gateway', async t => {
  const h = await setup(t)
  const created = await expectForwarded(t, h, post('/v1/conversations'))
  const id = (JSON.parse(created.res?.body ?? '{}') as { id?: string }).id ?? 'conv_missing'
  const websocket: Header[] = [
    ['Connection', 'Upgrade'], ['Upgrade', 'websocket'],
    ['Sec-WebSocket-Key', 'dGhlIHNhbXBsZSBub25jZQ=='], ['Sec-WebSocket-Version', '13']
  ]

  for (const [label, request] of [
    [`GET /v1/conversations/${id}`, get(`/v1/conversations/${id}`, [FULL, ...websocket])],
    ['GET /v1/conversations/{id}/items', get(`/v1/conversations/${id}/items`, [FULL, ...websocket])],
    ['POST /v1/conversations', post('/v1/conversations', '{}', [FULL, JSON_TYPE, ...websocket])]
  ] as const) {
    await t.test(`Upgrade: websocket on ${label} gets a 4xx and never reaches the upstream`, async t => {
      const before = h.upstream.requests.length
      h.handled++
      const ex = await sendRaw(h.gw.url, request)
      t.equal(h.upstream.requests.length, before, 'the upstream received nothing')
      t.ok(ex.response !== null && ex.response.status >= 400 && ex.response.status < 500,
        `a 4xx answer (got ${ex.response?.status ?? 'a closed connection'})`)
      t.notMatch(ex.received.toString('latin1'), /^HTTP\/1\.1 101/m, 'no 101 Switching Protocols')
      if (ex.response !== null && ex.response.status >= 400 && ex.response.status < 500) {
        assertGatewayError(t, ex.response, { status: ex.response.status, code: codeOf(ex.response), outcome: 'invalid' }, 'GET')
        await assertAuditedOnce(t, h, ex.response, ex.response.status, 'invalid')
      }
    })
  }

  await t.test('an h2c offer (curl --http2, Java\'s HttpClient on http://) is ignored: the call is served over HTTP/1.1, its body read, and the connection closed after it', async t => {
    const h2c: Header[] = [['Connection', 'Upgrade, HTTP2-Settings'], ['Upgrade', 'h2c'], ['HTTP2-Settings', 'AAMAAABkAAQCAAAAAAIAAAAA']]
    const { res, seen } = await expectForwarded(t, h, post('/v1/conversations', '{"metadata":{"via":"h2c"}}', [FULL, JSON_TYPE, ...h2c]))
    t.equal(res?.status, 200)
    t.notMatch(res?.headers.connection ?? '', /upgrade/i, 'no switch')
    t.equal(res?.headers.connection, 'close', 'the connection closes after it')
    t.match(seen?.body.toString(), '"via":"h2c"', 'the body went upstream')
    t.equal(seen?.headers.upgrade, undefined, 'and no Upgrade with it')
    const read = await expectForwarded(t, h, get(`/v1/conversations/${id}`, [FULL, ...h2c]))
    t.equal(read.res?.status, 200)
  })

  await t.test('a create pipelined behind an Upgrade request (refused, or an h2c offer served) is not served: it never reaches the upstream', async t => {
    // The answer to the Upgrade request closes the connection; Node reads on after it all the same. The create
    // behind it went upstream, and its answer was lost with the connection: a client retrying what was not
    // answered (RFC 9112 §9.3.2) made it twice.
    const create = post('/v1/conversations', '{"metadata":{"n":"pipelined"}}', [FULL, JSON_TYPE])
    // (Without `Connection: Upgrade` Node reads the create as a call, audited aborted; with it, never.)
    const read = (upgrade: Header[]) => get(`/v1/conversations/${id}`, [FULL, ...upgrade])
    for (const [label, first, status, upstream, calls] of [
      ['Upgrade: websocket', read([['Upgrade', 'websocket']]), 400, [], 2],
      ['Connection: Upgrade, Upgrade: websocket', read(websocket), 400, [], 1],
      ['Upgrade: h2c', read([['Upgrade', 'h2c']]), 200, [`GET /v1/conversations/${id}`], 2],
      ['Connection: Upgrade, Upgrade: h2c', read([['Connection', 'Upgrade, HTTP2-Settings'], ['Upgrade', 'h2c'], ['HTTP2-Settings', 'AAMAAABkAAQCAAAAAAIAAAAA']]),
        200, [`GET /v1/conversations/${id}`], 1],
      // (refused before its body is read: the create comes while the connection still reads that body)
      ['Upgrade: websocket on a POST with a body', post(`/v1/conversations/${id}`, '{"metadata":{}}', [FULL, JSON_TYPE, ['Upgrade', 'websocket']]), 400, [], 2]
    ] as Array<[string, Buffer, number, string[], number]>) {
      const before = h.upstream.requests.length
      const received = await readToClose(h.gw.url, Buffer.concat([first, create]))
      await sleep(50)
      t.match(received.text, new RegExp(`^HTTP/1\\.1 ${status} `), `${label}: the call is answered ${status}`)
      t.equal(received.text.match(/^HTTP\/1\.[01] \d{3}/gm)?.length, 1, `${label}: the create behind it is not`)
      t.ok(received.closed, `${label}: the connection is closed`)
      t.same(h.upstream.requests.slice(before).map(r => `${r.method} ${r.url}`), upstream, `${label}: the create never reached the upstream`)
      h.handled += calls
    }
  })

  await t.test('a create pipelined behind a body-less call that asks for 100 Continue is not served: it never reaches the upstream', async t => {
    // Nothing is to come, so no 100 goes out, and Node closes a connection whose Expect it answered without one:
    // the create behind it went upstream, and its answer was lost with the connection (the fuzzer, 2-4 in 3,000).
    const create = post('/v1/conversations', '{"metadata":{"n":"behind-expect"}}', [FULL, JSON_TYPE])
    for (const [label, first, status, upstream] of [
      ['GET', get(`/v1/conversations/${id}`, [FULL, ['Expect', '100-continue']]), 200, [`GET /v1/conversations/${id}`]],
      ['DELETE of an unknown route', buildRequest('DELETE', '/v1/nothing', [FULL, ['Expect', '100-continue']]), 404, []]
    ] as Array<[string, Buffer, number, string[]]>) {
      const before = h.upstream.requests.length
      const received = await readToClose(h.gw.url, Buffer.concat([first, create]))
      await sleep(50)
      t.match(received.text, new RegExp(`^HTTP/1\\.1 ${status} `), `${label}: the call is answered ${status}`)
      t.match(received.text, /\r\nconnection: close\r\n/i, `${label}: its answer says the connection closes`)
      t.equal(received.text.match(/^HTTP\/1\.[01] \d{3}/gm)?.length, 1, `${label}: the create behind it is not answered`)
      t.ok(received.closed, `${label}: the connection is closed`)
      t.same(h.upstream.requests.slice(before).map(r => `${r.method} ${r.url}`), upstream, `${label}: the create never reached the upstream`)
      h.handled += 2
    }
  })

  await t.test('CONNECT host:443 gets a 4xx answer, not a silent close, and nothing reaches the upstream', async t => {
    const before = h.upstream.requests.length
    h.handled++
    const ex = await sendRaw(h.gw.url, 'CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n')
    t.equal(h.upstream.requests.length, before, 'the upstream received nothing')
    t.ok(ex.response !== null && ex.response.status >= 400 && ex.response.status < 500,
      `a 4xx answer (got ${ex.response?.status ?? 'a closed connection'})`)
    t.notMatch(ex.received.toString('latin1'), /^HTTP\/1\.1 200/m, 'no tunnel established')
    if (ex.response !== null && ex.response.status >= 400 && ex.response.status < 500) {
      assertGatewayError(t, ex.response, { status: ex.response.status, code: codeOf(ex.response), outcome: 'invalid' }, 'CONNECT')
      await assertAuditedOnce(t, h, ex.response, ex.response.status, 'invalid')
      const [record] = await auditOf(h.gw, headerOf(ex.response, 'x-gateway-request-id')!)
      t.equal(record?.bytesOut, Buffer.byteLength(ex.response.body), 'its record counts the body the client got (bytesOut)')
    }
  })

  await t.test('a CONNECT pipelined behind a call still being answered gets its 404 after that call\'s answer, and the gateway lives on', async t => {
    // Node hands a CONNECT over even while an answer holds the connection: given the socket at once, the answer
    // threw (ERR_HTTP_SOCKET_ASSIGNED) out of Node's parser, and the process ended, whoever sent it (no key needed).
    const connect = 'CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n'
    for (const [label, first, status, calls] of [
      ['behind a call at the upstream', get(`/v1/conversations/${id}`), 200, 2],
      ['behind /healthz', get('/healthz', []), 200, 1]
    ] as Array<[string, Buffer, number, number]>) {
      const received = await readToClose(h.gw.url, Buffer.concat([first, Buffer.from(connect)]))
      // (the second answer follows the first's body on the same line)
      t.same(received.text.match(/HTTP\/1\.[01] \d{3}/g), [`HTTP/1.1 ${status}`, 'HTTP/1.1 404'], `${label}: that call's answer, then the CONNECT's 404`)
      t.ok(received.closed, `${label}: the connection is closed after it`)
      h.handled += calls
    }
    const { res } = await expectForwarded(t, h, get(`/v1/conversations/${id}`))
    t.equal(res?.status, 200, 'the gateway still serves')
  })

  await t.test('a CONNECT pipelined behind a call whose client hangs up before its answer is audited all the same', async t => {
    // Its answer waits for the call ahead; the connection gone first, it never gets one: a call the client
    // abandoned, audited as such, not one left without a record.
    let arrived = 0
    h.upstream.respond = () => { arrived++ } // held: never answered (the gateway aborts it when the client goes)
    t.teardown(() => { h.upstream.respond = null })
    const before = h.gw.audit().length
    const { hostname, port } = new URL(h.gw.url)
    const socket = createConnection({ host: hostname, port: Number(port) })
    socket.on('error', () => {})
    socket.write(Buffer.concat([get(`/v1/conversations/${id}`), Buffer.from('CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n')]))
    for (let i = 0; i < 200 && arrived === 0; i++) await sleep(10)
    t.equal(arrived, 1, 'the call ahead is at the upstream')
    await sleep(50) // the CONNECT read and waiting behind it
    socket.destroy()
    h.handled += 2
    const records = (await auditSettled(h.gw, before + 2)).slice(before)
    t.equal(records.length, 2, 'both calls audited')
    t.same(records.map(r => r.outcome).sort(), ['aborted', 'aborted'], 'both as calls their client abandoned')
  })
  await oneAuditLineEach(t, h)
})

// Requests Node's HTTP parser must refuse (or the connection must close); each carries a valid key and a valid
// route, so any of them that slipped through would show at the upstream.
const key = `Authorization: Bearer ${KEYS.full}\r\n`
const SMUGGLED = 'GET /v1/conversations/conv_smuggled HTTP/1.1\r\nHost: x\r\n' + key + '\r\n'
const MALFORMED: Array<[label: string, raw: string | Buffer]> = [
  ['two Content-Length headers with different values',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: ${2 + SMUGGLED.length}\r\n\r\n{}${SMUGGLED}`],
  ['Content-Length together with Transfer-Encoding: chunked',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n${SMUGGLED}`],
  ['Transfer-Encoding that does not end in chunked',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nTransfer-Encoding: chunked, identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n`],
  ['a negative Content-Length',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nContent-Length: -1\r\n\r\n{}`],
  ['an obs-fold (folded) header line',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{}`],
  ['a bare CR inside a header value (CRLF injection)',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nX-Inject: a\rContent-Length: 40\r\nContent-Length: 2\r\n\r\n{}`],
  ['a bare LF inside a header value (CRLF injection)',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nX-Inject: a\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}`],
  ['a NUL byte in a header value',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\n{}`],
  ['whitespace between a header name and its colon',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Length : 2\r\nContent-Type: application/json\r\n\r\n{}`],
  ['a 64 KB header',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}X-Big: ${'a'.repeat(64 * 1024)}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`],
  ['a raw space inside the target',
    `GET /v1/conversations/conv_a b HTTP/1.1\r\nHost: x\r\n${key}\r\n`],
  ['raw UTF-8 bytes in the target',
    Buffer.concat([Buffer.from('GET /v1/conversations/conv_'), Buffer.from('é', 'utf8'), Buffer.from(` HTTP/1.1\r\nHost: x\r\n${key}\r\n`)])],
  ['an invalid chunk size',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n`],
  ['a chunk longer than its declared size',
    `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${key}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX\r\n0\r\n\r\n${SMUGGLED}`]
]

t.test('a client that resets its connection right after its request: no crash, no unhandled error', async t => {
  // Node takes its 'error' listener off a socket it hands to 'connect': the answer's write to a client gone threw
  // (ECONNRESET, EPIPE) as an uncaught error, and the gateway died, whoever sent it (no key needed). And a reset that
  // reached the kernel before anything read the client's address leaves Node none (remoteAddress undefined): the
  // audit's hook threw on it ("unhandled error", a 500 for no one), and the debug log's request line, outside any
  // hook, ended the process.
  const h = await setup(t)
  const { hostname, port } = new URL(h.gw.url)
  const requests = [
    Buffer.from('CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n'),
    get(`/v1/conversations/${h.conversationId}`)
  ]
  for (const request of requests) {
    for (let i = 0; i < 100; i++) {
      await new Promise<void>(resolve => {
        const socket = createConnection({ host: hostname, port: Number(port) }, () => {
          socket.write(request, () => { setImmediate(() => { socket.resetAndDestroy(); resolve() }) })
        })
        socket.on('error', () => { resolve() })
      })
    }
  }
  await sleep(200)
  const { res } = await expectForwarded(t, h, get(`/v1/conversations/${h.conversationId}`))
  t.equal(res?.status, 200, 'the gateway still serves')
  t.notOk(h.upstream.requests.some(r => r.method === 'CONNECT'), 'no CONNECT reached the upstream')
  t.same(h.gw.logs.filter(line => line.includes('unhandled error')), [], 'no unhandled error')
  t.ok(h.gw.audit().every(r => typeof r.ip === 'string' && r.ip !== ''), 'every record names an address (or says it is unknown)')
})

t.test('malformed HTTP is refused by the parser and never reaches the upstream', async t => {
  const h = await setup(t)
  for (const [label, raw] of MALFORMED) {
    await t.test(`${label} gets 400/431 or a closed connection, and the upstream sees nothing`, async t => {
      const audited = h.gw.audit().length
      const ex = await sendRaw(h.gw.url, raw)
      await sleep(20) // a request that slipped through would be at the upstream by now
      t.same(h.upstream.requests.map(r => `${r.method} ${r.url}`), [], 'the upstream received nothing')
      t.notMatch(ex.received.toString('latin1'), LEAK, 'no stack trace or source path in the answer')
      if (ex.response !== null) t.ok([400, 431].includes(ex.response.status), `400 or 431 (got ${ex.response.status})`)
      else t.ok(ex.closedByServer, 'the connection was closed')
      t.equal(ex.received.toString('latin1').match(/^HTTP\/1\.[01] \d{3}/gm)?.length ?? 0, ex.response === null ? 0 : 1,
        'no answer to a smuggled second request')
      // Headers-level errors never become a request; a framing error found in the body does, after the fact.
      // Its audit line, if any, must say what the client got, not the 200 that was never sent.
      const records = h.gw.audit().slice(audited)
      h.handled += records.length
      t.ok(records.length <= 1, 'at most one audit line')
      for (const r of records) t.match(r, { status: ex.response?.status ?? r.status, outcome: 'invalid' }, 'audited as the refusal it was')
    })
  }
  await t.test('after all of that, the gateway still serves a valid request', async t => {
    const { res } = await expectForwarded(t, h, post('/v1/conversations'))
    t.equal(res?.status, 200)
  })
  await oneAuditLineEach(t, h)
})

t.test('a body whose framing breaks after a pause is refused before its call goes upstream, on every method', async t => {
  // Fastify reads no body for a GET: its call went upstream at once, and its bad chunk, arriving a moment later,
  // got the client a 400 "malformed HTTP" for a call the upstream had served. A refused call must not have gone.
  const h = await setup(t)
  const { hostname, port } = new URL(h.gw.url)
  const chunked: Header[] = [FULL, JSON_TYPE, ['Transfer-Encoding', 'chunked']]
  const cases: Array<[method: string, target: string]> = [
    ['GET', `/v1/conversations/${h.conversationId}`],
    ['GET', `/v1/conversations/${h.conversationId}/items`],
    ['DELETE', `/v1/conversations/${h.conversationId}`],
    ['POST', `/v1/conversations/${h.conversationId}`]
  ]
  for (const [method, target] of cases) {
    await t.test(`${method} ${target.replace(h.conversationId, '{id}')}`, async t => {
      const before = h.upstream.requests.length
      const received = await new Promise<string>((resolve, reject) => {
        const socket = createConnection({ host: hostname, port: Number(port) })
        let text = ''
        const timer = setTimeout(() => { socket.destroy(); resolve(text) }, 3000)
        socket.on('data', (d: Buffer) => { text += d.toString('latin1') })
        socket.on('close', () => { clearTimeout(timer); resolve(text) })
        socket.on('error', reject)
        socket.write(Buffer.concat([buildRequest(method, target, chunked), chunk('{"a":')]))
        // long enough for a call that does not wait for its body to be at the upstream
        setTimeout(() => socket.write('zz\r\n'), 300)
      })
      await sleep(50)
      t.same(h.upstream.requests.slice(before).map(r => `${r.method} ${r.url}`), [], 'the upstream received nothing')
      t.match(received, /^HTTP\/1\.1 400 /, 'the client gets 400')
      t.equal(received.match(/^HTTP\/1\.[01] \d{3}/gm)?.length, 1, 'one answer')
      h.handled++
      const [record, ...more] = await auditOf(h.gw, /x-gateway-request-id: (\S+)/i.exec(received)?.[1] ?? 'none')
      t.match(record, { status: 400, outcome: 'invalid', method }, 'audited as the 400 it got')
      t.same(more, [], 'once')
    })
  }
  await t.test('a GET whose body ends well after the pause is served once that body is whole, and none of it goes upstream', async t => {
    const before = h.upstream.requests.length
    const socket = createConnection({ host: hostname, port: Number(port) })
    t.teardown(() => socket.destroy())
    let text = ''
    socket.on('data', (d: Buffer) => { text += d.toString('latin1') })
    socket.write(Buffer.concat([buildRequest('GET', `/v1/conversations/${h.conversationId}`, chunked), chunk('{"a":')]))
    await sleep(300)
    t.equal(h.upstream.requests.length, before, 'nothing went upstream before the body ended')
    socket.write(Buffer.concat([chunk('1}'), chunk('')]))
    for (let i = 0; i < 100 && !text.includes('"object":"conversation"'); i++) await sleep(10)
    t.match(text, /^HTTP\/1\.1 200 /, 'served')
    const seen = h.upstream.requests.slice(before)
    t.same(seen.map(r => `${r.method} ${r.url}`), [`GET /v1/conversations/${h.conversationId}`], 'once')
    t.equal(seen[0]?.body.length, 0, 'without the body')
    h.handled++
    const [record] = await auditOf(h.gw, /x-gateway-request-id: (\S+)/i.exec(text)?.[1] ?? 'none')
    t.match(record, { status: 200, bytesIn: 7 }, 'its body read counted in bytesIn, as a delete\'s is')
  })
  await t.test('a GET whose chunked body passes limits.bodyBytes gets 413, as one that declares its length does, and nothing goes upstream', async t => {
    const before = h.upstream.requests.length
    const ex = await sendRaw(h.gw.url, Buffer.concat([buildRequest('GET', `/v1/conversations/${h.conversationId}`, chunked),
      chunk('"' + 'a'.repeat(BODY_LIMIT) + '"'), chunk('')]))
    t.equal(ex.response?.status, 413)
    t.equal(h.upstream.requests.length, before, 'the upstream received nothing')
    h.handled++
  })
  await oneAuditLineEach(t, h)
})

t.test('bytes after a call that asked to close: that call is answered and audited as served, nothing after it is', async t => {
  // RFC 9112 §9.6: a server answers the request that carried `close`, processes none after it, and closes. Node's
  // parser refuses what follows (HPE_CLOSED_CONNECTION) while the call is at the upstream: cut then, a create done
  // upstream was lost to its client and audited as a client that hung up (499 aborted).
  const h = await setup(t)
  const create = (version: string, headers: Header[]) => Buffer.from(
    `POST /v1/conversations HTTP/${version}\r\nHost: x\r\n${headers.map(([n, v]) => `${n}: ${v}\r\n`).join('')}` +
    `Authorization: Bearer ${KEYS.full}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}`)
  const cases: Array<[label: string, request: Buffer]> = [
    ['Connection: close', create('1.1', [['Connection', 'close']])],
    ['HTTP/1.0', create('1.0', [])]
  ]
  for (const [label, request] of cases) {
    await t.test(label, async t => {
      const before = h.upstream.requests.length
      // The whole exchange, until the gateway closes the connection.
      const received = await readToClose(h.gw.url, Buffer.concat([request, Buffer.from(SMUGGLED)]))
      await sleep(50) // a second call that slipped through would be at the upstream by now
      const [head = '', body = ''] = received.text.split('\r\n\r\n')
      t.match(head, /^HTTP\/1\.1 200 /, 'the create is answered')
      t.match(body, /^\{"id":"conv_/, 'with the conversation made')
      t.same(h.upstream.requests.slice(before).map(r => `${r.method} ${r.url}`), ['POST /v1/conversations'], 'only it went upstream')
      t.equal(received.text.match(/^HTTP\/1\.[01] \d{3}/gm)?.length, 1, 'no answer to what came after it')
      t.ok(received.closed, 'the connection is closed after the answer')
      h.handled++
      const [record, ...more] = await auditOf(h.gw, /x-gateway-request-id: (\S+)/i.exec(head)?.[1] ?? 'none')
      t.match(record, { status: 200, outcome: 'ok', action: 'conversation.create', bytesOut: Buffer.byteLength(body) }, 'audited as served')
      t.same(more, [], 'once')
    })
  }
  await oneAuditLineEach(t, h)
})

t.test('bytes the parser refuses after a call read whole (in the same packet): that call is answered and audited as sent, then the connection closes', async t => {
  // They belong to no call (a request Node cannot parse pipelined behind it, or what a Content-Length too short, a
  // count of characters rather than bytes, left of the body). The connection was cut at once: a create done
  // upstream lost its answer (audited 499), and a refusal already on its way was audited as sent (400, its bytes).
  const h = await setup(t)
  const create = (body: string, length = Buffer.byteLength(body)) => `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n` +
    `Authorization: Bearer ${KEYS.full}\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n${body}`
  const cases: Array<[label: string, request: string, status: number, outcome: Outcome, upstream: string[]]> = [
    ['a request line that is not HTTP', create('{}') + 'NOT HTTP AT ALL\r\n\r\n', 200, 'ok', ['POST /v1/conversations']],
    ['a pipelined call with a folded header (obs-fold)', create('{}') + 'GET /v1/conversations/conv_x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n',
      200, 'ok', ['POST /v1/conversations']],
    ['a Content-Length that counts characters, not bytes', create('{"metadata":{"k":"é"}}', '{"metadata":{"k":"é"}}'.length), 400, 'invalid', []]
  ]
  for (const [label, request, status, outcome, upstream] of cases) {
    await t.test(label, async t => {
      const before = h.upstream.requests.length
      const received = await readToClose(h.gw.url, Buffer.from(request))
      await sleep(50)
      const [head = '', body = ''] = received.text.split('\r\n\r\n')
      t.match(head, new RegExp(`^HTTP/1\\.1 ${status} `), `the call is answered ${status}`)
      t.match(head, /\r\nconnection: close(\r\n|$)/i, 'saying the connection closes')
      t.equal(received.text.match(/^HTTP\/1\.[01] \d{3}/gm)?.length, 1, 'no answer to what came after it')
      t.ok(received.closed, 'the connection is closed after the answer')
      t.same(h.upstream.requests.slice(before).map(r => `${r.method} ${r.url}`), upstream, 'only the call went upstream, if it passed')
      h.handled++
      const [record, ...more] = await auditOf(h.gw, /x-gateway-request-id: (\S+)/i.exec(head)?.[1] ?? 'none')
      t.match(record, { status, outcome, action: 'conversation.create', bytesOut: Buffer.byteLength(body) }, 'audited as what the client got')
      t.same(more, [], 'once')
    })
  }
  await oneAuditLineEach(t, h)
})

t.test('an answer to a request whose Transfer-Encoding Node cannot read says the connection closes, which it does', async t => {
  // Node's parser refuses such a body once the headers are read (RFC 9112 §6.3: 400 and close); the refusal
  // written before that said keep-alive, and a client sending its next call on the connection lost it.
  const h = await setup(t)
  const probe = `GET /v1/conversations/${h.conversationId} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n\r\n`
  const cases: Array<[label: string, request: string, status: number]> = []
  for (const coding of ['identity', 'gzip']) {
    const te = `Transfer-Encoding: ${coding}\r\n`
    cases.push(
      [`${coding}, no key`, `POST /v1/conversations HTTP/1.1\r\nHost: x\r\n${te}\r\n`, 401],
      [`${coding}, a method no route has`, `PROPFIND /v1/conversations HTTP/1.1\r\nHost: x\r\n${te}\r\n`, 405],
      [`${coding}, with a key`, `POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n${te}\r\n`, 501])
  }
  for (const [label, request, status] of cases) {
    await t.test(label, async t => {
      const received = await readToClose(h.gw.url, Buffer.from(request + probe))
      const [head = ''] = received.text.split('\r\n\r\n')
      t.match(head, new RegExp(`^HTTP/1\\.1 ${status} `), `answered ${status}`)
      t.match(head, /\r\nconnection: close(\r\n|$)/i, 'saying the connection closes')
      t.notMatch(head, /keep-alive/i, 'not that it stays open')
      t.equal(received.text.match(/^HTTP\/1\.[01] \d{3}/gm)?.length, 1, 'the call after it is not read')
      t.ok(received.closed, 'the connection is closed')
      h.handled++
    })
  }
  t.same(h.upstream.requests, [], 'nothing went upstream')
  await oneAuditLineEach(t, h)
})

t.test('hop-by-hop tricks cannot strip or replace the upstream token, nor leak the client key', async t => {
  const h = await setup(t)
  const cases: Array<[label: string, headers: Header[]]> = [
    ['Connection: authorization, x-api-key', [['Connection', 'authorization, x-api-key'], ['X-Api-Key', KEYS.full]]],
    ['Connection: close, keep-alive', [['Connection', 'close, keep-alive']]],
    ['Connection: Authorization with Keep-Alive and Proxy-Authorization', [
      ['Connection', 'Authorization, Keep-Alive, Proxy-Authorization'], ['Keep-Alive', 'timeout=5'],
      ['Proxy-Authorization', `Bearer ${KEYS.full}`]
    ]]
  ]
  for (const [label, extra] of cases) {
    await t.test(`${label}: the upstream gets exactly one authorization, our bearer token, and never the client key`, async t => {
      const { res, seen } = await expectForwarded(t, h, post('/v1/conversations', '{}', [FULL, JSON_TYPE, ...extra]))
      t.equal(res?.status, 200)
      const raw = seen?.rawHeaders ?? []
      const auth = raw.filter((_, i) => i % 2 === 1 && /^authorization$/i.test(raw[i - 1]!))
      t.same(auth, [`Bearer ${UPSTREAM_TOKEN}`], 'one authorization header, with the upstream token')
      t.notOk(raw.some((v, i) => i % 2 === 0 && /^(x-api-key|proxy-authorization|keep-alive)$/i.test(v)), 'no client credentials or hop-by-hop headers')
      t.notOk(h.upstream.everything().includes(KEYS.full), 'the client key never reached the upstream')
    })
  }
  await oneAuditLineEach(t, h)
})
