// Teams and isolation: a team sees only the conversations it created, although all share one OhMyGPT account.
// The official SDK against a listening gateway and the fake upstream, which records every call it receives.
import { gzipSync } from 'node:zlib'
import t, { type Test } from 'tap'
import OpenAI from 'openai'
import { KEYS, METRICS_TOKEN, startGateway, testConfig, type TestGateway } from './fixtures/gateway.js'
import { until } from './fixtures/client.js'
import { createConversationsHandler } from '../src/demo/fake-ohmygpt.js'
import { exactJson, stringifyExact } from '../src/http/json.js'
import { faults, startUpstream, UPSTREAM_TOKEN, type FakeUpstream, type RecordedRequest, type Responder } from './fixtures/upstream.js'

interface Setup {
  upstream: FakeUpstream
  gw: TestGateway
  sdk: (key: string) => OpenAI
}

async function gateway (t: Test, upstream: FakeUpstream, overrides: Record<string, unknown> = {}): Promise<Setup> {
  const gw = await startGateway(t, testConfig(upstream.url, overrides))
  return { upstream, gw, sdk: (key: string) => new OpenAI({ apiKey: key, baseURL: `${gw.url}/v1`, maxRetries: 0 }) }
}

async function setup (t: Test, overrides: Record<string, unknown> = {}): Promise<Setup> {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  return await gateway(t, upstream, overrides)
}

/** A conversation made straight at the upstream, as if by someone holding the OhMyGPT token. */
async function createUpstream (upstream: FakeUpstream, metadata: Record<string, string> = {}): Promise<string> {
  const res = await fetch(`${upstream.url}/v1/conversations`, {
    method: 'POST', headers: { authorization: `Bearer ${UPSTREAM_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ metadata, items: [{ type: 'message', role: 'user', content: 'outside' }] })
  })
  return (await res.json() as { id: string }).id
}

const rejection = (p: Promise<unknown>) => p.then(() => { throw new Error('expected a rejection') }, (e: unknown) => e)

/** The seven id routes of a conversation, as a client calls them with the SDK. */
function sevenRoutes (client: OpenAI, conversationId: string, itemId: string): Array<[string, () => Promise<unknown>]> {
  return [
    ['conversation.retrieve', () => client.conversations.retrieve(conversationId)],
    ['conversation.update', () => client.conversations.update(conversationId, { metadata: { topic: 'mine now' } })],
    ['item.create', () => client.conversations.items.create(conversationId, { items: [{ type: 'message', role: 'user', content: 'hi' }] })],
    ['item.list', () => client.conversations.items.list(conversationId)],
    ['item.retrieve', () => client.conversations.items.retrieve(itemId, { conversation_id: conversationId })],
    ['item.delete', () => client.conversations.items.delete(itemId, { conversation_id: conversationId })],
    ['conversation.delete', () => client.conversations.delete(conversationId)]
  ]
}

/** What the gateway sent upstream with the gateway's own lookup (a GET of the conversation) set apart. */
function calls (requests: RecordedRequest[]): string[] {
  return requests.map(r => `${r.method} ${r.url}`)
}

async function assertNotFound (t: Test, e: unknown, label: string, conversationId: string) {
  t.type(e, OpenAI.NotFoundError, `${label}: the SDK's NotFoundError`)
  const err = e as InstanceType<typeof OpenAI.NotFoundError>
  t.match(err, { status: 404, code: 'conversation_not_found', type: 'invalid_request_error', param: 'conversation_id' }, label)
  t.equal(err.message, `404 Conversation with id '${conversationId}' not found.`, `${label}: OpenAI's words`)
}

t.test('another team gets 404 conversation_not_found on all seven id routes, exactly as if it did not exist', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const conv = await a.conversations.create({ metadata: { topic: 'team a' }, items: [{ type: 'message', role: 'user', content: 'secret' }] })
  const [item] = (await a.conversations.items.list(conv.id)).data as Array<{ id: string }>
  const missing = 'conv_doesnotexist000000000000000'

  const beforeB = upstream.requests.length
  for (const [action, call] of sevenRoutes(b, conv.id, item!.id)) {
    await assertNotFound(t, await rejection(call()), action, conv.id)
  }
  t.same(calls(upstream.requests.slice(beforeB)), [`GET /v1/conversations/${conv.id}`],
    'nothing of B reached the upstream but one lookup, as a missing id costs (then the refusal is remembered)')

  // A conversation that really does not exist gives B the very same answer (one lookup, then remembered).
  for (const [action, call] of sevenRoutes(b, missing, 'msg_x')) {
    await assertNotFound(t, await rejection(call()), `${action} on a missing conversation`, missing)
  }
  const forged = await fetch(`${gw.url}/v1/conversations/${conv.id}`, { headers: { authorization: `Bearer ${KEYS.other}` } })
  const real = await fetch(`${gw.url}/v1/conversations/${missing}`, { headers: { authorization: `Bearer ${KEYS.other}` } })
  const headerNames = (r: Response) => [...r.headers.keys()].filter(h => !['date', 'x-gateway-request-id', 'x-ratelimit-remaining-requests', 'x-ratelimit-reset-requests'].includes(h)).sort()
  t.same(headerNames(forged), headerNames(real), 'the same headers for someone else\'s and for a missing conversation')
  t.equal((await forged.text()).replace(conv.id, 'X'), (await real.text()).replace(missing, 'X'), 'the same body')
  t.same(calls(upstream.requests.slice(beforeB)), [`GET /v1/conversations/${conv.id}`, `GET /v1/conversations/${missing}`],
    'only the gateway\'s lookups went upstream, once for each id')

  const intact = await a.conversations.retrieve(conv.id)
  t.same(intact.metadata, { topic: 'team a' }, 'A\'s conversation is untouched')
  t.same((await a.conversations.items.list(conv.id)).data.map(i => i.id), [item!.id], 'and so are its items')

  const denied = gw.audit().filter(r => r.clientId === 'team-other')
  t.equal(denied.length, 16)
  t.ok(denied.slice(0, 7).every(r => r.status === 404 && r.outcome === 'denied' && r.ownerId === 'team-full' && r.conversationId === conv.id),
    'B\'s calls on A\'s conversation are audited denied, with A as owner')
  t.ok(denied.slice(7, 14).every(r => r.status === 404 && r.outcome === 'invalid' && r.ownerId === null),
    'calls on a missing conversation are audited invalid, with no owner')
  t.ok(gw.audit().filter(r => r.clientId === 'team-full').every(r => r.ownerId === 'team-full'), 'A\'s records name A as owner')
})

t.test('an admin client acts on every conversation, and still needs the operation\'s scope', async t => {
  const { upstream, gw, sdk } = await setup(t, {})
  const a = sdk(KEYS.full)
  const conv = await a.conversations.create({ metadata: { topic: 'a' }, items: [{ type: 'message', role: 'user', content: 'x' }] })
  const admin = sdk(KEYS.admin)
  t.same((await admin.conversations.retrieve(conv.id)).metadata, { topic: 'a' }, 'admin reads A\'s conversation')
  const updated = await admin.conversations.update(conv.id, { metadata: { topic: 'reviewed' } })
  t.same(updated.metadata, { topic: 'reviewed' }, 'admin updates it')
  t.same((await a.conversations.retrieve(conv.id)).metadata, { topic: 'reviewed' }, 'and A still owns it after the admin\'s update')
  const upstreamMeta = JSON.parse(upstream.requests.at(-2)!.body.toString() || '{}') as { metadata?: Record<string, string> }
  t.same(upstreamMeta.metadata, { topic: 'reviewed', gateway_owner: 'team-full' }, 'the admin\'s update went up with A as owner')
  const record = gw.audit().find(r => r.clientId === 'ops-admin' && r.action === 'conversation.update')
  t.match(record, { status: 200, outcome: 'ok', ownerId: 'team-full' }, 'the audit names the owner the admin acted for')

  // admin bypasses ownership only: the operation's own scope is still checked.
  const adminReadOnly = await setup(t, {
    clients: [{ id: 'ops-readonly', keySha256: (await import('../src/keys.js')).keyDigest(KEYS.admin), scopes: ['read', 'admin'] }]
  })
  const e = await rejection(adminReadOnly.sdk(KEYS.admin).conversations.delete('conv_anything'))
  t.type(e, OpenAI.PermissionDeniedError, 'admin without delete cannot delete')
})

t.test('no client can take a conversation over, or hide its owner, through metadata', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)

  const forged = await rejection(b.conversations.create({ metadata: { gateway_owner: 'team-full' } }))
  t.type(forged, OpenAI.BadRequestError)
  t.match(forged, { status: 400, code: 'reserved_metadata_key', param: 'metadata' }, 'create naming gateway_owner: 400')
  t.match(forged, { message: /"gateway_owner" is reserved/ }, 'the message names the key')
  // A "__proto__" key (an own key to JSON.parse) is refused too, and the message says so, not gateway_owner.
  const proto = await fetch(`${gw.url}/v1/conversations`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }, body: '{"metadata":{"__proto__":"x"}}'
  })
  t.equal(proto.status, 400, 'create with a "__proto__" metadata key: 400')
  t.match(await proto.json(), { error: { code: 'reserved_metadata_key', param: 'metadata', message: 'The metadata key "__proto__" is reserved by the gateway.' } },
    'the message names "__proto__"')

  const conv = await a.conversations.create({ metadata: { topic: 'a' } })
  for (const metadata of [{ gateway_owner: 'team-other' }, { gateway_owner: '' }]) {
    const e = await rejection(a.conversations.update(conv.id, { metadata }))
    t.match(e, { status: 400, code: 'reserved_metadata_key', param: 'metadata' }, `update with ${JSON.stringify(metadata)}: 400`)
  }
  const e = await rejection(b.conversations.update(conv.id, { metadata: { gateway_owner: 'team-other' } }))
  t.match(e, { status: 400, code: 'reserved_metadata_key' }, 'B\'s attempt is refused as a bad body first (body checks come before ownership)')
  // An upstream whose JSON reader matches keys whatever their case (Go's) would read these as metadata and the
  // owner key; the API knows no such keys, so they are refused rather than passed on as sent.
  const forgeries: Array<[string, unknown, string]> = [
    ['Metadata', { Metadata: { gateway_owner: 'team-other' } }, 'invalid_metadata'],
    ['METADATA beside metadata', { metadata: { x: '1' }, METADATA: { gateway_owner: 'team-other' } }, 'invalid_metadata'],
    ['Gateway_Owner', { metadata: { Gateway_Owner: 'team-other' } }, 'reserved_metadata_key']
  ]
  const sent = upstream.requests.length
  for (const [label, body, code] of forgeries) {
    const res = await fetch(`${gw.url}/v1/conversations/${conv.id}`, {
      method: 'POST', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }, body: JSON.stringify(body)
    })
    t.equal(res.status, 400, `${label}: 400`)
    t.match(await res.json(), { error: { code, param: 'metadata' } }, `${label}: ${code}`)
  }
  t.equal(upstream.requests.length, sent, 'none of them went upstream')

  const before = upstream.requests.length
  const cleared = await a.conversations.update(conv.id, { metadata: null })
  t.same(cleared.metadata, {}, 'A clears its metadata and sees it empty')
  t.same(JSON.parse(upstream.requests[before]!.body.toString()).metadata, { gateway_owner: 'team-full' },
    'metadata: null went upstream with the owner merged back')
  const replaced = await a.conversations.update(conv.id, { metadata: { x: '1' } })
  t.same(replaced.metadata, { x: '1' })
  await assertNotFound(t, await rejection(b.conversations.retrieve(conv.id)), 'B after A\'s updates', conv.id)

  // A fresh gateway (restart, empty cache) still finds A as the owner upstream.
  const restarted = await gateway(t, upstream)
  await assertNotFound(t, await rejection(restarted.sdk(KEYS.other).conversations.retrieve(conv.id)), 'B after a restart', conv.id)
  t.same((await restarted.sdk(KEYS.full).conversations.retrieve(conv.id)).metadata, { x: '1' }, 'A after a restart')
})

t.test('a metadata that is a number is refused as not an object, however many digits it has', async t => {
  // A number JSON.parse would round is kept as the client wrote it (http/json.ts), as an object of its own: it is
  // no metadata map for all that, and the owner cannot be added to it.
  const { upstream, gw, sdk } = await setup(t)
  const conv = await sdk(KEYS.full).conversations.create({})
  const sent = upstream.requests.length
  const targets: Array<[string, string]> = [['/v1/conversations', ''], [`/v1/conversations/${conv.id}`, ''], ['/v1/responses', '"model":"gpt-4o-mini","input":"hi",']]
  for (const [path, rest] of targets) {
    for (const metadata of ['5', '12345678901234567890', '1e400', '0.12345678901234567']) {
      const res = await fetch(`${gw.url}${path}`, {
        method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: `{${rest}"metadata":${metadata}}`
      })
      t.equal(res.status, 400, `POST ${path} metadata ${metadata}: 400`)
      t.match(await res.json(), { error: { code: 'invalid_metadata', param: 'metadata' } }, `POST ${path} metadata ${metadata}: invalid_metadata`)
    }
  }
  t.same(upstream.requests.slice(sent).map(r => r.body.toString()), [], 'none of them went upstream')
})

t.test('metadata OpenAI refuses (a value that is not a string, a key over 64 characters, a value over 512) is refused on every route that takes it, before the upstream', async t => {
  // OpenAI's metadata: at most 16 key-value pairs, keys strings of at most 64 characters, values strings of at most
  // 512. The gateway's message says "an object of strings"; what it lets through, the upstream would refuse or keep.
  const { upstream, gw, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const conv = await a.conversations.create({})
  const routes: Array<[string, (metadata: unknown) => Promise<unknown>]> = [
    ['conversation.create', metadata => a.conversations.create({ metadata } as never)],
    ['conversation.update', metadata => a.conversations.update(conv.id, { metadata } as never)],
    ['response.create', metadata => a.responses.create({ model: 'gpt-4o-mini', input: 'hi', metadata } as never)]
  ]
  const refused: Array<[string, unknown, string]> = [
    ['a number', { a: 1 }, 'metadata.a'],
    ['a boolean', { flag: true }, 'metadata.flag'],
    ['null', { a: 'x', gone: null }, 'metadata.gone'],
    ['an object', { nested: { b: 'c' } }, 'metadata.nested'],
    ['a list', { tags: ['x'] }, 'metadata.tags'],
    ['a value of 513 characters', { long: 'v'.repeat(513) }, 'metadata.long'],
    ['a key of 65 characters', { ['k'.repeat(65)]: 'v' }, 'metadata']
  ]
  const sent = upstream.requests.length
  for (const [action, call] of routes) {
    for (const [label, metadata, param] of refused) {
      const e = await rejection(call(metadata))
      t.type(e, OpenAI.BadRequestError, `${action}, ${label}: the SDK's BadRequestError`)
      t.match(e, { status: 400, code: 'invalid_metadata', type: 'invalid_request_error', param }, `${action}, ${label}: invalid_metadata, param ${param}`)
    }
  }
  t.same(upstream.requests.slice(sent).map(r => `${r.method} ${r.url}`), [], 'none of them went upstream')
  // At the limits, as OpenAI counts characters (an emoji is one): served, and stored as sent.
  const edge = { ['k'.repeat(64)]: 'v'.repeat(512), emoji: '\u{1F600}'.repeat(512), empty: '' }
  t.same((await a.conversations.create({ metadata: edge })).metadata, edge, 'conversation.create at the limits')
  t.same((await a.conversations.update(conv.id, { metadata: edge })).metadata, edge, 'conversation.update at the limits')
  t.same((await a.responses.create({ model: 'gpt-4o-mini', input: 'hi', metadata: edge })).metadata, edge, 'response.create at the limits')
})

t.test('a create or update body that is not a JSON object is refused on every route that takes one, before the upstream', async t => {
  // The upstream would refuse these too; the gateway's checks read the body's keys, and the README promises a 400
  // invalid_metadata for a create or update body that is not an object, items create included.
  const { upstream, gw, sdk } = await setup(t)
  const conv = await sdk(KEYS.full).conversations.create({})
  const sent = upstream.requests.length
  const paths = ['/v1/conversations', `/v1/conversations/${conv.id}`, `/v1/conversations/${conv.id}/items`, '/v1/responses']
  for (const path of paths) {
    for (const body of ['null', '[]', '"text"', '123', 'true']) {
      const res = await fetch(`${gw.url}${path}`, {
        method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body
      })
      t.equal(res.status, 400, `POST ${path} ${body}: 400`)
      const { error } = await res.json() as { error: { code: string, type: string, param: unknown } }
      t.match(error, { code: 'invalid_metadata', type: 'invalid_request_error' }, `POST ${path} ${body}: invalid_metadata`)
      // (the body itself is wrong, not a parameter of it: an SDK's err.param names none, as OpenAI's does for a body)
      t.equal(error.param, null, `POST ${path} ${body}: param null, not metadata`)
    }
  }
  t.equal(upstream.requests.length, sent, 'none of them went upstream')
  const refused = gw.audit().filter(r => r.status === 400)
  t.equal(refused.length, paths.length * 5, 'each is audited')
  t.ok(refused.every(r => r.outcome === 'invalid'), 'as invalid')
})

t.test('a body the gateway adds the owner to reaches the upstream with every number as the client wrote it', async t => {
  const { upstream, gw } = await setup(t)
  const numbers = '[9007199254740993,12345678901234567891,1.0000000000000001,-0.5,42]'
  const post = (path: string, body: string) => fetch(`${gw.url}${path}`, {
    method: 'POST', body, headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }
  })
  const sentBody = () => upstream.requests.at(-1)!.body.toString()

  const created = await post('/v1/conversations', `{"items":[{"type":"message","role":"user","content":"x","n":${numbers}}]}`)
  t.equal(created.status, 200)
  t.match(sentBody(), `"n":${numbers}`, 'conversation create: the integers past 2^53 and the 17-digit number unrounded')
  t.match(sentBody(), '"gateway_owner":"team-full"', 'with the owner added')
  const { id } = await created.json() as { id: string }

  t.equal((await post(`/v1/conversations/${id}`, `{"metadata":{"a":"b"},"n":${numbers}}`)).status, 200)
  t.match(sentBody(), `"n":${numbers}`, 'update with metadata (the owner merged back): the same')

  const tools = `[{"type":"function","name":"pick","parameters":{"type":"object","properties":{"id":{"type":"integer","enum":${numbers}}}}}]`
  await post('/v1/responses', `{"model":"gpt-4o","input":"hi","tools":${tools}}`)
  t.match(sentBody(), `"enum":${numbers}`, 'response create: a tool schema\'s enum unrounded')

  // The writer marks each such number with a UUID made for the call: a string shaped like a mark stays a string.
  const lookalike = `"${crypto.randomUUID()}0"`
  await post(`/v1/conversations/${id}`, `{"metadata":{"a":"d"},"n":${numbers},"s":[${lookalike},"0"]}`)
  t.match(sentBody(), `"n":${numbers},"s":[${lookalike},"0"]`, 'strings stay as they were beside the numbers')

  // 17 or more significant digits with the point among them (neither side 16 digits long), as a Decimal or
  // BigDecimal type writes a number, alone in a body: JSON.parse rounds them as well.
  const decimals = '[123456789012345.6789,12345678.123456789,-1234567.1234567891e-3]'
  await post(`/v1/conversations/${id}`, `{"metadata":{"a":"e"},"n":${decimals}}`)
  t.match(sentBody(), `"n":${decimals}`, 'long decimals unrounded')
  await post('/v1/conversations', `{"items":[{"type":"message","role":"user","content":"x","n":${decimals}}]}`)
  t.match(sentBody(), `"n":${decimals}`, 'long decimals unrounded on create too')

  // A key given twice: the last, as JSON.parse reads it, with its number as written all the same.
  await post(`/v1/conversations/${id}`, '{"metadata":{"a":"c"},"n":1,"n":9007199254740993,"m":12345678901234567891,"m":2}')
  t.match(sentBody(), '"n":9007199254740993,"m":2}', 'a key given twice: the last, unrounded')
})

t.test('long numbers inside strings (a tool\'s output holding JSON, a CSV) cost the gateway no second reading of a body or an answer, and stay as they were', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const client = sdk(KEYS.full)
  const conversation = await client.conversations.create({})
  // 20 tool outputs of about 180 KiB each holding JSON with 17-digit floats: text JSON.parse reads exactly, which
  // a JavaScript parser read again took about half a second per call of, serving no one else meanwhile.
  const output = `${JSON.stringify({ lat: 0.12345678901234567, lon: 1.1, rows: '7,1234567890123456789' })} `.repeat(2500)
  const items = Array.from({ length: 20 }, (_, i) => ({ type: 'function_call_output' as const, call_id: `call_${i}`, output }))
  await client.conversations.items.create(conversation.id, { items })
  const sent = JSON.parse(upstream.requests.at(-1)!.body.toString()) as { items: Array<{ output: string }> }
  t.equal(sent.items.length, 20)
  t.ok(sent.items.every(item => item.output === output), 'every output reached the upstream as it was sent')

  const text = JSON.stringify({ items })
  const parsed = JSON.parse(text) as unknown
  t.equal(exactJson(text, parsed), parsed, 'JSON.parse\'s reading is kept: nothing in it is rounded')
  const withNumber = `{"n":12345678901234567891,"s":${JSON.stringify(output)}}`
  const exact = exactJson(withNumber, JSON.parse(withNumber))
  t.equal(stringifyExact(exact, exact), withNumber, 'beside a number JSON.parse would round, the strings stay as they were and the number as written')
})

t.test('16 metadata keys leave no room for the owner: 400 metadata_limit; 15 are fine', async t => {
  const { upstream, sdk } = await setup(t)
  const keys = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}`, 'v']))
  const a = sdk(KEYS.full)
  t.match(await rejection(a.conversations.create({ metadata: keys(16) })), { status: 400, code: 'metadata_limit', param: 'metadata' })
  const conv = await a.conversations.create({ metadata: keys(15) })
  t.same(conv.metadata, keys(15), 'the owner does not show among them')
  t.match(await rejection(a.conversations.update(conv.id, { metadata: keys(16) })), { status: 400, code: 'metadata_limit' })
  t.equal(upstream.requests.length, 1, 'only the valid create went upstream')
})

t.test('A never sees gateway_owner in any answer, streamed objects and item deletes included', async t => {
  const { upstream, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const created = await a.conversations.create({ metadata: { topic: 't' }, items: [{ type: 'message', role: 'user', content: 'x' }] })
  const { data: items } = await a.conversations.items.list(created.id)
  const answers = [
    created,
    await a.conversations.retrieve(created.id),
    await a.conversations.update(created.id, { metadata: { topic: 'u' } }),
    await a.conversations.items.delete(String(items[0]!.id), { conversation_id: created.id })
  ]
  for (const answer of answers) t.notMatch(JSON.stringify(answer), /gateway_owner/, `${(answer as { object?: string }).object}: no owner key`)
  t.ok(upstream.requests.filter(r => r.method === 'POST' && r.url === '/v1/conversations').every(r => r.body.toString().includes('"gateway_owner":"team-full"')),
    'while upstream the conversation carries it')
  const raw = await fetch(`${(a as unknown as { baseURL: string }).baseURL}/conversations/${created.id}`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  const text = await raw.text()
  t.equal(raw.headers.get('content-length'), String(Buffer.byteLength(text)), 'a rewritten answer has the right content-length')
})

t.test('a conversation created outside the gateway is denied by default, and served with ownership.unowned: allow', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const outside = await createUpstream(upstream, { source: 'script' })

  const strict = await gateway(t, upstream)
  await assertNotFound(t, await rejection(strict.sdk(KEYS.full).conversations.retrieve(outside)), 'deny (default)', outside)
  t.match(strict.gw.audit()[0], { outcome: 'denied', ownerId: null })
  t.same((await strict.sdk(KEYS.admin).conversations.retrieve(outside)).metadata, { source: 'script' }, 'an admin is never denied for it')

  const lenient = await gateway(t, upstream, { ownership: { unowned: 'allow' } })
  t.same((await lenient.sdk(KEYS.other).conversations.retrieve(outside)).metadata, { source: 'script' }, 'allow: served')
  const updated = await lenient.sdk(KEYS.other).conversations.update(outside, { metadata: { source: 'edited' } })
  t.same(updated.metadata, { source: 'edited' }, 'an update of an unowned conversation adds no owner')
  t.notMatch(upstream.requests.at(-1)!.body.toString(), /gateway_owner/)
})

t.test('with unowned: allow, no client can claim an unowned conversation with metadata given twice: the upstream gets what the gateway read', async t => {
  // JSON.parse keeps the last of a key given twice; a parser that keeps the first (some do) would read the
  // owner key the gateway never saw, and the conversation every team may use would become one team's.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const outside = await createUpstream(upstream, { source: 'script' })
  const { gw } = await gateway(t, upstream, { ownership: { unowned: 'allow' } })
  const twice = '{"metadata":{"gateway_owner":"team-other"},"metadata":{"source":"edited"}}'
  const res = await fetch(`${gw.url}/v1/conversations/${outside}`, {
    method: 'POST', body: twice, headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }
  })
  t.equal(res.status, 200, 'the update the gateway read is served')
  const sent = upstream.requests.at(-1)!
  t.equal(sent.method, 'POST')
  t.same(JSON.parse(sent.body.toString()), { metadata: { source: 'edited' } }, 'what went upstream is the gateway\'s reading')
  t.notMatch(sent.body.toString(), /gateway_owner/, 'the owner key the gateway did not read never reaches the upstream')
})

t.test('the owner is looked up once, then cached; a delete forgets it; a missing conversation is remembered briefly', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full' })
  const { sdk } = await gateway(t, upstream, { ownership: { notFoundTtlMs: 200 } })
  const a = sdk(KEYS.full)
  const lookups = () => upstream.requests.filter(r => r.method === 'GET' && r.url === `/v1/conversations/${conv}`).length
  const base = upstream.requests.length

  await a.conversations.items.list(conv)
  await a.conversations.items.list(conv)
  await Promise.all([1, 2, 3].map(() => a.conversations.items.list(conv)))
  t.equal(lookups(), 1, 'five calls, one lookup')
  t.equal(upstream.requests.length - base, 6, 'one lookup and the five calls')

  await a.conversations.delete(conv)
  await assertNotFound(t, await rejection(a.conversations.items.list(conv)), 'after the delete', conv)
  t.equal(lookups(), 2, 'the delete forgot the owner: looked up again, and found missing')
  await assertNotFound(t, await rejection(a.conversations.items.list(conv)), 'again', conv)
  t.equal(lookups(), 2, 'the missing conversation was remembered: no second round trip')
  await new Promise(resolve => setTimeout(resolve, 250))
  await assertNotFound(t, await rejection(a.conversations.items.list(conv)), 'after notFoundTtlMs', conv)
  t.equal(lookups(), 3, 'and forgotten after notFoundTtlMs')
})

t.test('a lookup answered while the owner deletes the object does not keep the deleted object\'s owner', async t => {
  // B's call on A's conversation looks the owner up (a stranger's is looked up even with the owner cached). When
  // that lookup was answered during A's delete, its answer (the object, owned by A) was cached after the delete
  // had emptied the cache: for cacheTtlMs A's calls went upstream for its own 404 (not the gateway's), and B's were
  // refused, and audited, as calls on A's object. Found by a random walk of two teams (h32-walk, seed 14 --slow).
  // Two orders: the lookup answered before the delete reaches the upstream, and answered after the delete's answer.
  for (const order of ['answered before the delete', 'answered after the delete'] as const) {
    await t.test(order, async t => {
      const inner = createConversationsHandler({ apiKey: UPSTREAM_TOKEN })
      const held: Array<() => void> = []
      let hold: ((req: { method?: string, url?: string }) => boolean) = () => false
      const upstream = await startUpstream({
        conversations: (req, res, body) => {
          if (!hold(req)) { inner(req, res, body); return }
          if (order === 'answered before the delete') { held.push(() => { inner(req, res, body) }); return }
          // The lookup read the object now, before the delete; its answer comes after the delete's.
          const end = res.end.bind(res) as (chunk: unknown) => void
          res.end = ((chunk: unknown) => { held.push(() => { end(chunk) }); return res }) as typeof res.end
          inner(req, res, body)
        }
      })
      t.teardown(() => upstream.close())
      const { gw, sdk } = await gateway(t, upstream)
      const a = sdk(KEYS.full)
      const b = sdk(KEYS.other)
      const conv = await a.conversations.create({})
      const path = `/v1/conversations/${conv.id}`
      const arrived = (method: string) => upstream.requests.some(r => r.method === method && r.url === path)

      let refusedB: Promise<unknown>
      let deleted: Promise<unknown>
      if (order === 'answered before the delete') {
        hold = req => req.method === 'DELETE'
        deleted = a.conversations.delete(conv.id)
        await until('the delete at the upstream', () => arrived('DELETE'))
        refusedB = rejection(b.conversations.retrieve(conv.id)) // looked up while the delete waits
        await assertNotFound(t, await refusedB, 'B, during the delete', conv.id)
        hold = () => false
        held.shift()!()
        await deleted
      } else {
        hold = req => req.method === 'GET' && req.url === path
        refusedB = rejection(b.conversations.retrieve(conv.id))
        await until('B\'s lookup at the upstream', () => arrived('GET'))
        hold = () => false
        await a.conversations.delete(conv.id)
        held.shift()!()
        await assertNotFound(t, await refusedB, 'B, during the delete', conv.id)
      }

      // The gateway knows the conversation is gone: A gets its own 404 (not the upstream's), B's call is on nothing.
      const own = await rejection(a.conversations.retrieve(conv.id)) as InstanceType<typeof OpenAI.NotFoundError>
      t.equal(own.code, 'conversation_not_found', 'A: the gateway\'s 404, from a lookup, not the upstream\'s')
      await assertNotFound(t, await rejection(b.conversations.retrieve(conv.id)), 'B, after the delete', conv.id)
      const records = gw.audit().filter(r => r.action === 'conversation.retrieve')
      t.match(records.at(-1), { clientId: 'team-other', outcome: 'invalid', ownerId: null }, 'B\'s last call was on no one\'s object')
      t.match(records.at(-2), { clientId: 'team-full', outcome: 'invalid', ownerId: null }, 'A\'s too')
    })
  }
})

t.test('a lookup answered while the owner deletes a response does not keep the deleted response\'s owner', async t => {
  // The same race as above, on a response: B's lookup answered while A's delete waits at the upstream.
  const inner = createConversationsHandler({ apiKey: UPSTREAM_TOKEN })
  const held: Array<() => void> = []
  let holding = false
  const upstream = await startUpstream({
    conversations: (req, res, body) => {
      if (holding && req.method === 'DELETE') held.push(() => { inner(req, res, body) })
      else inner(req, res, body)
    }
  })
  t.teardown(() => upstream.close())
  const { gw, sdk } = await gateway(t, upstream)
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const response = await a.responses.create({ model: 'gpt-4o-mini', input: 'hello' })
  holding = true
  const deleted = a.responses.delete(response.id)
  await until('the delete at the upstream', () => upstream.requests.some(r => r.method === 'DELETE'))
  t.match(await rejection(b.responses.retrieve(response.id)), { status: 404, code: 'response_not_found' }, 'B, during the delete')
  holding = false
  held.shift()!()
  await deleted
  t.match(await rejection(a.responses.retrieve(response.id)), { status: 404, code: 'response_not_found' },
    'A: the gateway\'s 404, from a lookup, not the upstream\'s')
  t.match(await rejection(b.responses.retrieve(response.id)), { status: 404, code: 'response_not_found' }, 'B, after the delete')
  const records = gw.audit().filter(r => r.action === 'response.retrieve')
  t.match(records.at(-1), { clientId: 'team-other', outcome: 'invalid', ownerId: null }, 'B\'s last call was on no one\'s object')
})

t.test('another team\'s 404 costs what a missing id\'s does: one lookup upstream, then none for notFoundTtlMs, so an object in use cannot be told from none by when the answer comes', async t => {
  // A missing id costs a round trip to the upstream, then is remembered for notFoundTtlMs. An object whose owner
  // the gateway holds (its team uses it) was refused at once, every time: timing B's first call told B that an
  // id it had seen in a log still exists and is in use. Each side is counted here in lookups, not timed.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // (2 s: the two calls of one side must come within it however loaded the machine is; 200 ms failed once.)
  const { gw, sdk } = await gateway(t, upstream, { ownership: { notFoundTtlMs: 2000 } })
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const conv = await a.conversations.create({ items: [{ type: 'message', role: 'user', content: 'secret' }] })
  const response = await a.responses.create({ model: 'gpt-4o', input: 'secret' })
  const conv2 = await a.conversations.create({})
  const response2 = await a.responses.create({ model: 'gpt-4o', input: 'secret' })
  const missingConv = 'conv_doesnotexist000000000000000'
  const missingResp = 'resp_doesnotexist000000000000000'
  const gets = (path: string) => upstream.requests.filter(r => r.method === 'GET' && r.url === path).length

  const sides: Array<[string, string, (id: string) => Promise<unknown>]> = [
    ['A\'s conversation', conv.id, id => b.conversations.retrieve(id)],
    ['a missing conversation', missingConv, id => b.conversations.retrieve(id)],
    ['A\'s response', response.id, id => b.responses.retrieve(id)],
    ['a missing response', missingResp, id => b.responses.retrieve(id)],
    ['A\'s conversation named in a response', conv2.id, id => b.responses.create({ model: 'gpt-4o', input: 'x', conversation: id })],
    ['A\'s previous response', response2.id, id => b.responses.create({ model: 'gpt-4o', input: 'x', previous_response_id: id })]
  ]
  const seen: Record<string, number[]> = {}
  for (const round of [1, 2]) {
    for (const [label, id, call] of sides) {
      const kind = id.startsWith('conv_') ? 'conversations' : 'responses'
      const counts = seen[label] ??= []
      const before = gets(`/v1/${kind}/${id}`)
      // (a previous_response_id not found is a 400, as OpenAI answers it)
      t.type(await rejection(call(id)), label === 'A\'s previous response' ? OpenAI.BadRequestError : OpenAI.NotFoundError, `${label}, round ${round}: refused`)
      counts.push(gets(`/v1/${kind}/${id}`) - before)
      await rejection(call(id))
      counts.push(gets(`/v1/${kind}/${id}`) - before)
    }
    await new Promise(resolve => setTimeout(resolve, 2100))
  }
  t.same(seen['a missing conversation'], [1, 1, 1, 1], 'a missing id: one lookup, remembered, looked up again after notFoundTtlMs')
  t.same(seen['a missing response'], [1, 1, 1, 1], 'the same for a response')
  t.same(seen['A\'s conversation'], seen['a missing conversation'], 'A\'s conversation costs B the same lookups')
  t.same(seen['A\'s response'], seen['a missing response'], 'A\'s response too')
  t.same(seen['A\'s conversation named in a response'], [1, 1, 1, 1], 'and named as a response\'s conversation')
  t.same(seen['A\'s previous response'], [1, 1, 1, 1], 'or as its previous response')
  t.same(upstream.requests.filter(r => r.method !== 'GET').map(r => r.url), ['/v1/conversations', '/v1/responses', '/v1/conversations', '/v1/responses'], 'nothing but lookups went upstream for B')

  // A's own calls still need no lookup: its owner is held.
  const before = upstream.requests.length
  await a.conversations.retrieve(conv.id)
  await a.responses.retrieve(response.id)
  t.same(calls(upstream.requests.slice(before)), [`GET /v1/conversations/${conv.id}`, `GET /v1/responses/${response.id}`], 'A: the calls themselves, no lookup')
  t.ok(gw.audit().filter(r => r.clientId === 'team-other').every(r => r.status === (r.previousResponseId === null ? 404 : 400)),
    'every call of B was a 404 (a 400 naming a previous response)')
})

t.test('a stranger who keeps asking for another team\'s object is looked up again once notFoundTtlMs has passed, as for a missing id: refusals do not keep the refusal remembered', async t => {
  // Each refusal answered from the remembered refusal used to remember it again, for notFoundTtlMs from then: a
  // stranger asking more often than that was answered at once for ever, where a missing id is looked up again
  // once notFoundTtlMs after its lookup. How soon the 404s came then told an object from none after all.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // (3 s, asked at 0, 2 and 4 s: the second asking is well within notFoundTtlMs of the first, the third well past it.)
  const { sdk } = await gateway(t, upstream, { ownership: { notFoundTtlMs: 3000 } })
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const conv = await a.conversations.create({ items: [{ type: 'message', role: 'user', content: 'secret' }] })
  const missing = 'conv_doesnotexist000000000000000'
  const lookups = (id: string) => upstream.requests.filter(r => r.method === 'GET' && r.url === `/v1/conversations/${id}`).length
  const seen: Record<string, number[]> = { theirs: [], missing: [] }
  for (const round of [0, 1, 2]) {
    if (round > 0) await new Promise(resolve => setTimeout(resolve, 2000))
    // Both asked at the same moments, one right after the other.
    for (const [side, id] of [['theirs', conv.id], ['missing', missing]] as const) {
      t.type(await rejection(b.conversations.retrieve(id)), OpenAI.NotFoundError, `${side}, asking ${round + 1}: 404`)
      seen[side]!.push(lookups(id))
    }
  }
  t.same(seen.missing, [1, 1, 2], 'a missing id: looked up, remembered, looked up again once notFoundTtlMs has passed')
  t.same(seen.theirs, seen.missing, 'another team\'s conversation: the very same lookups')
})

t.test('a lookup that fails fails closed: 504 on a timeout, 502 on a 5xx or an answer that is not the conversation', async t => {
  const cases: Array<[string, (res: import('node:http').ServerResponse) => void, number, string]> = [
    ['a 500', res => { res.writeHead(500, { 'content-type': 'application/json' }).end('{"error":{"message":"boom"}}') }, 502, 'upstream_unavailable'],
    ['a 401 (bad token)', res => { res.writeHead(401, { 'content-type': 'application/json' }).end('{}') }, 502, 'upstream_auth_failed'],
    ['a list instead of a conversation', res => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[]}') }, 502, 'upstream_unavailable'],
    ['not JSON', res => { res.writeHead(200, { 'content-type': 'application/json' }).end('<html>') }, 502, 'upstream_unavailable'],
    ['not JSON, quoting the token', res => { res.writeHead(200, { 'content-type': 'application/json' }).end(`${UPSTREAM_TOKEN} is not valid`) }, 502, 'upstream_unavailable'],
    ['no answer in time', () => {}, 504, 'upstream_timeout'],
    // Never silent for bodyTimeoutMs, and whole only after hours: the lookup's body counts inside timeoutMs too.
    ['an answer that drips in', res => {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': '100000' })
      res.write('{"id":"conv_x","object":"conversation","metadata":{},"pad":"')
      const drip = setInterval(() => { if (res.destroyed) clearInterval(drip); else res.write('a') }, 100)
    }, 504, 'upstream_timeout']
  ]
  for (const [label, answer, status, code] of cases) {
    await t.test(`${label} → ${status} ${code}, and the call goes no further`, async t => {
      const upstream = await startUpstream()
      t.teardown(() => upstream.close())
      const { gw } = await gateway(t, upstream, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 300 } })
      upstream.respond = (_req, res) => { answer(res) }
      const res = await fetch(`${gw.url}/v1/conversations/conv_x/items`, { headers: { authorization: `Bearer ${KEYS.full}` }, signal: AbortSignal.timeout(5000) })
      t.equal(res.status, status)
      t.match(await res.json(), { error: { code } })
      t.same(calls(upstream.requests), ['GET /v1/conversations/conv_x'], 'only the lookup went upstream, never the call itself')
      await new Promise(resolve => setTimeout(resolve, 20))
      t.match(gw.audit(), [{ status, outcome: 'upstream_error' }])
      t.notMatch(gw.logs.join('\n'), UPSTREAM_TOKEN.slice(0, 8), 'the log quotes nothing of the answer')
    })
  }
})

t.test('a lookup or item check that outlives the timeout the SDK says it has is answered 504 before it, and the call itself never goes upstream', async t => {
  // The lookups waited upstream.timeoutMs whatever the client said: the SDK gave up first with its own timeout error
  // (and with its retries, three times as long), the call audited as a hang-up.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { gw, sdk } = await gateway(t, upstream, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 30_000 } })
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full' }) // its owner not cached: looked up first
  const own = await sdk(KEYS.full).conversations.create({})
  const base = upstream.requests.length
  upstream.respond = () => {} // no answer, to anything

  // The Node SDK says a call's own timeout (X-Stainless-Timeout, whole seconds); the gateway answers a tenth of it
  // early, which leaves the SDK, in this same process, time to read the answer on a busy machine.
  const items = [{ type: 'message' as const, role: 'user' as const, content: 'hi' }]
  const lookup = await rejection(sdk(KEYS.full).conversations.items.create(conv, { items }, { timeout: 5000 }))
  t.match(lookup, { status: 504, error: { code: 'upstream_timeout' } }, 'the gateway\'s 504, not the SDK\'s own timeout')
  t.equal((lookup as InstanceType<typeof OpenAI.APIError>).headers?.get('x-should-retry'), null, 'nothing was sent that a retry could repeat')
  // The Python SDK says its read timeout (X-Stainless-Read-Timeout, seconds); an item named by id is checked first.
  const body = JSON.stringify({ model: 'gpt-4o', conversation: own.id, input: [{ type: 'item_reference', id: 'msg_x' }] })
  const checked = await fetch(`${gw.url}/v1/responses`, {
    method: 'POST',
    headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json', 'x-stainless-read-timeout': '1.5' },
    body,
    signal: AbortSignal.timeout(10_000)
  })
  t.equal(checked.status, 504)
  t.equal(checked.headers.get('x-should-retry'), null, 'nor here: the generation was never sent')
  t.match(await checked.json(), { error: { code: 'upstream_timeout' } })

  t.same(calls(upstream.requests.slice(base)), [`GET /v1/conversations/${conv}`, `GET /v1/conversations/${own.id}/items/msg_x`],
    'only the lookup and the check went upstream, never the calls themselves')
  t.match(gw.audit().slice(-2), [
    { action: 'item.create', status: 504, outcome: 'upstream_error', attempts: 1 },
    { action: 'response.create', status: 504, outcome: 'upstream_error', attempts: 1 }
  ], 'audited as the lookup\'s timeout, with its attempt')
})

t.test('a lookup whose answer stalls after its headers is audited with the attempt it made, and logged as a failed lookup', async t => {
  // Its 504 was taken for a lookup no line was tried for: attempts 0 in the record (and its wait counted as the
  // gateway's own time in gateway_added_duration_seconds), and no log line.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { gw, sdk } = await gateway(t, upstream, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 300, bodyTimeoutMs: 30_000 } })
  upstream.respond = faults.stallMidBody()
  const err = await rejection(sdk(KEYS.full).conversations.retrieve('conv_stalled_lookup', { maxRetries: 0 }))
  t.match(err, { status: 504, error: { code: 'upstream_timeout' } })
  t.match(gw.audit().at(-1), { action: 'conversation.retrieve', status: 504, outcome: 'upstream_error', attempts: 1, upstreamLine: null },
    'audited with the lookup\'s attempt: the upstream was asked')
  const line = JSON.parse(gw.logs.find(l => l.includes('ownership lookup failed')) ?? '{}') as { err?: Record<string, unknown> }
  t.match(line.err, { type: 'UpstreamFailure', code: 'timeout', message: /\S/ }, 'the log says the lookup failed, and how')
  t.notOk(line.err !== undefined && 'stack' in line.err, 'no empty stack of a plain object')
})

t.test('a call refused before its check is audited with the owner the cache knows, and no lookup; a lookup answered 404 counts its attempt', async t => {
  // The README's ownerId: "for a refused call: whose it was". The rate limit and the concurrency cap come before the
  // ownership check: their refusals named no owner, though the cache knew it. A lookup answered 404 ended its call
  // upstream and was recorded with attempts 0, as if nothing had gone there.
  const { upstream, gw, sdk } = await setup(t)
  const limited = sdk(KEYS.limited)
  const own = await limited.conversations.create({})
  await limited.conversations.retrieve(own.id)
  await limited.conversations.retrieve(own.id) // (burst 3: the last token)
  const before = upstream.requests.length
  t.match(await rejection(limited.conversations.retrieve(own.id)), { status: 429 })
  t.match(await rejection(limited.conversations.items.list(own.id)), { status: 429 })
  t.match(await rejection(sdk(KEYS.reader).conversations.delete(own.id)), { status: 403 })
  t.equal(upstream.requests.length, before, 'nothing went upstream for them, no lookup either')
  await until('the records', () => gw.audit().length === 6)
  t.match(gw.audit().slice(3), [
    { action: 'conversation.retrieve', status: 429, ownerId: 'team-limited', attempts: 0 },
    { action: 'item.list', status: 429, ownerId: 'team-limited', attempts: 0 },
    { action: 'conversation.delete', status: 403, clientId: 'team-reader', ownerId: 'team-limited', attempts: 0 }
  ], 'each names the owner the cache knew')

  const unknown = await rejection(limited.conversations.retrieve('conv_never_made'))
  t.match(unknown, { status: 429 })
  const missing = await rejection(sdk(KEYS.full).conversations.retrieve('conv_never_made'))
  t.match(missing, { status: 404, error: { code: 'conversation_not_found' } })
  t.equal(upstream.requests.length, before + 1, 'one lookup, for the call that got that far')
  await until('the records', () => gw.audit().length === 8)
  t.match(gw.audit().slice(6), [
    { status: 429, ownerId: null, attempts: 0 },
    { status: 404, ownerId: null, attempts: 1, upstreamLine: null }
  ], 'an object the cache does not know: no owner; the 404 counts its lookup\'s attempt')
  const again = await rejection(sdk(KEYS.full).conversations.retrieve('conv_never_made'))
  t.match(again, { status: 404 })
  await until('the record', () => gw.audit().length === 9)
  t.equal(upstream.requests.length, before + 1, 'answered from the cache')
  t.match(gw.audit().at(-1), { status: 404, attempts: 0 }, 'no lookup, no attempt')
})

t.test('a call refused by a later check once its lookups answered is audited with the last one\'s attempt, and its time is not the gateway\'s', async t => {
  // The README's attempts and gateway_added_duration_seconds rows: the lookup went upstream, and its time was the
  // upstream's.
  const { upstream, gw } = await setup(t, { metrics: { token: METRICS_TOKEN } })
  const id = await createUpstream(upstream, { gateway_owner: 'team-full' })
  const made = { type: 'code_interpreter_call', id: 'ci_madeup', container_id: 'cntr_x', code: 'x', outputs: [], status: 'completed' }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const before = upstream.requests.length
  const err = await rejection(sdk.responses.create({ model: 'gpt-5.1', conversation: id, input: [made as never] }))
  t.match(err, { status: 403, code: 'container_not_allowed' })
  t.same(calls(upstream.requests.slice(before)), [`GET /v1/conversations/${id}`, `GET /v1/conversations/${id}/items/ci_madeup`], 'the lookup and the item\'s check')
  await until('the record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { status: 403, outcome: 'denied', ownerId: 'team-full', attempts: 1, upstreamLine: null, upstreamMs: null })
  const scraped = await (await fetch(`${gw.url}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } })).text()
  t.notMatch(scraped, /^gateway_added_duration_seconds_count\{action="response\.create"\}/m, 'not observed as the gateway\'s time')
})

t.test('a lookup the upstream answers 500 is logged with that status', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { gw, sdk } = await gateway(t, upstream)
  upstream.respond = faults.status(500)
  const err = await rejection(sdk(KEYS.full).conversations.retrieve('conv_failing_lookup', { maxRetries: 0 }))
  t.match(err, { status: 502, error: { code: 'upstream_unavailable' } })
  const line = JSON.parse(gw.logs.find(l => l.includes('ownership lookup failed')) ?? '{}') as Record<string, unknown>
  t.same(line.err, { type: 'Error', status: 500, message: 'the lookup was answered 500' })
  t.equal(line.conversationId, 'conv_failing_lookup')
})

t.test('a lookup whose answer comes late and then stalls is cut at the client\'s stated wait, even when that wait is longer than timeoutMs', async t => {
  // A lookup takes up to timeoutMs for its headers and timeoutMs more for its body: it was cut at the client's wait
  // only when that wait was shorter than timeoutMs, so a client waiting 3.6 s with timeoutMs 3 s got the SDK's own
  // timeout error (and, with its retries, the lookup again and again) instead of the gateway's 504.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { sdk } = await gateway(t, upstream, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 3000, bodyTimeoutMs: 30_000 } })
  const stall = faults.stallMidBody()
  upstream.respond = (req, res, body) => { setTimeout(() => { stall(req, res, body) }, 2000) } // its headers at 2 s, then nothing
  const err = await rejection(sdk(KEYS.full).conversations.retrieve('conv_late_lookup', { timeout: 4000 }))
  t.match(err, { status: 504, error: { code: 'upstream_timeout' } }, 'the gateway\'s 504, not the SDK\'s own timeout')
  t.equal(upstream.requests.length, 1, 'the lookup went upstream once')
})

t.test('a lookup cut at the client\'s stated wait after a retry on another line is audited with the attempts it made', async t => {
  // The 504 the client's wait gives was audited with one attempt whatever the lookup had done: a lookup retried on
  // another line (the first answered 503) had made two, which the record of a lookup's own timeout does say.
  const [first, second] = [await startUpstream(), await startUpstream()]
  t.teardown(() => Promise.all([first.close(), second.close()]))
  const { gw, sdk } = await gateway(t, first, { upstream: { baseUrls: [first.url, second.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 30_000, retries: 1 } })
  first.respond = faults.status(503)
  second.respond = faults.hang()
  const err = await rejection(sdk(KEYS.full).conversations.retrieve('conv_looked_up_on_two_lines', { timeout: 3000 }))
  t.match(err, { status: 504, error: { code: 'upstream_timeout' } }, 'the gateway\'s 504, before the SDK\'s own timeout')
  const lookups = [...first.requests, ...second.requests].filter(r => r.url === '/v1/conversations/conv_looked_up_on_two_lines')
  t.equal(lookups.length, 2, 'the lookup went to both lines')
  t.match(gw.audit().at(-1), { action: 'conversation.retrieve', status: 504, outcome: 'upstream_error', attempts: 2, upstreamLine: null },
    'audited with the lookup\'s two attempts')
})

t.test('a client that hangs up while its owner lookup or an item\'s check is at the upstream is audited aborted with the attempt it made', async t => {
  // The record said attempts 0, "never went upstream", though the upstream had the lookup (and saw it closed).
  const { upstream, gw, sdk } = await setup(t)
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full' }) // its owner not cached: looked up first
  const own = await sdk(KEYS.full).conversations.create({})
  upstream.respond = faults.hang()
  const hangUpOnceAsked = async (path: string, call: (signal: AbortSignal) => Promise<unknown>) => {
    const records = gw.audit().length
    const leaving = new AbortController()
    const gone = rejection(call(leaving.signal))
    await until(`${path} to reach the upstream`, () => upstream.requests.some(r => r.url === path))
    leaving.abort()
    t.ok(await gone instanceof OpenAI.APIUserAbortError, 'the client gave up')
    await until('its audit record', () => gw.audit().length > records)
    return gw.audit()[records]
  }

  const lookup = await hangUpOnceAsked(`/v1/conversations/${conv}`, signal => sdk(KEYS.full).conversations.items.list(conv, {}, { signal }))
  t.match(lookup, { action: 'item.list', status: 499, outcome: 'aborted', attempts: 1, upstreamLine: null },
    'audited with the lookup\'s attempt: the upstream was asked')
  const check = await hangUpOnceAsked(`/v1/conversations/${own.id}/items/msg_x`, signal => sdk(KEYS.full).responses.create(
    { model: 'gpt-4o', conversation: own.id, input: [{ type: 'item_reference', id: 'msg_x' }] }, { signal }))
  t.match(check, { action: 'response.create', status: 499, outcome: 'aborted', attempts: 1, upstreamLine: null },
    'audited with the check\'s attempt')
  t.same(upstream.requests.filter(r => r.url.includes('/items?') || r.url.endsWith('/items') || r.url === '/v1/responses').map(r => r.method), [],
    'neither call itself went upstream')
})

t.test('a lookup the upstream answered with a refusal is audited with the attempt it made, and its wait as the upstream\'s', async t => {
  // Its record said attempts 0, "never went upstream", for a call ended by its lookup's answer (the account's 429,
  // a status the lookup cannot use, the upstream refusing the gateway's token), where a lookup with no answer at all
  // said 1; and its time at the upstream was counted as the gateway's own in gateway_added_duration_seconds.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full' }) // its owner not cached: looked up first
  const { gw } = await gateway(t, upstream, { metrics: { token: METRICS_TOKEN } })
  const cases: Array<[number, number, string]> = [[429, 429, 'upstream_rate_limited'], [500, 502, 'upstream_error'], [401, 502, 'upstream_error']]
  for (const [answered, status, outcome] of cases) {
    upstream.respond = faults.status(answered)
    const base = upstream.requests.length
    const records = gw.audit().length
    const res = await fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
    t.equal(res.status, status, `the lookup answered ${answered}`)
    await res.arrayBuffer()
    t.same(calls(upstream.requests.slice(base)), [`GET /v1/conversations/${conv}`], 'the lookup went upstream, the call did not')
    await until('its audit record', () => gw.audit().length > records)
    t.match(gw.audit()[records], { action: 'item.list', status, outcome, attempts: 1, upstreamLine: null },
      `the lookup answered ${answered}: audited with its attempt`)
  }
  const metrics = await gw.app.inject({ method: 'GET', url: '/metrics', headers: { authorization: `Bearer ${METRICS_TOKEN}` } })
  t.notMatch(metrics.body, /^gateway_added_duration_seconds_count\{action="item\.list"\}/m, 'no wait at the upstream counted as the gateway\'s')
})

/**
 * Team A (KEYS.full) keeps a secret in a conversation of its own; team B (KEYS.other) has one of its own, and
 * knows the id of A's item. `post` sends a JSON body with a key.
 */
async function twoTeams (url: string) {
  const post = (key: string, path: string, body: unknown) => fetch(`${url}${path}`, {
    method: 'POST', body: JSON.stringify(body), headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }
  })
  const created = await post(KEYS.full, '/v1/conversations', { items: [{ type: 'message', role: 'user', content: 'A secret' }] })
  const conversationA = (await created.json() as { id: string }).id
  const listed = await fetch(`${url}/v1/conversations/${conversationA}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  const itemA = (await listed.json() as { data: Array<{ id: string }> }).data[0]!.id
  const conversationB = (await (await post(KEYS.other, '/v1/conversations', {})).json() as { id: string }).id
  return { post, conversationA, itemA, conversationB }
}

type Post = Awaited<ReturnType<typeof twoTeams>>['post']

/** A call of team B's: its label, path, body, and the status, code and param it must be refused with. */
type Refusal = [string, string, unknown, number, string, string]

/** Each of `refusals`, posted by team B, gets its status and error, and nothing of it is created upstream. */
async function assertRefusedToB (t: Test, upstream: FakeUpstream, post: Post, refusals: Refusal[]) {
  for (const [label, path, body, status, code, param] of refusals) {
    const before = upstream.requests.length
    const res = await post(KEYS.other, path, body)
    t.equal(res.status, status, `${label}: ${status}`)
    t.match(await res.json(), { error: { code, param } }, `${label}: ${code}`)
    t.same(upstream.requests.slice(before).filter(r => r.method === 'POST').map(r => r.url), [], `${label}: nothing was created upstream on B's behalf`)
  }
}

/** Each forgery (target, body, the param its refusal names) is refused with 400 unknown_parameter, and nothing goes upstream. */
async function assertForgeriesRefused (t: Test, upstream: FakeUpstream, post: Post, forgeries: Array<[string, unknown, string]>) {
  for (const [target, body, param] of forgeries) {
    const label = `${target} (${param})`
    const before = upstream.requests.length
    const res = await post(KEYS.other, target, body)
    t.equal(res.status, 400, `${label}: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', type: 'invalid_request_error', param } }, `${label}: unknown_parameter`)
    t.same(upstream.requests.slice(before).filter(r => r.method === 'POST').map(r => r.url), [], `${label}: nothing went upstream`)
  }
}

t.test('an item named by id (item_reference) must be an item of a conversation of the caller\'s: another team\'s is refused wherever it is named', async t => {
  const { upstream, gw } = await setup(t)
  const { post, conversationA, itemA, conversationB } = await twoTeams(gw.url)

  const refusals: Refusal[] = [
    ['a response outside any conversation', '/v1/responses', { model: 'gpt-4o', input: [{ type: 'item_reference', id: itemA }] }, 400, 'item_reference_not_allowed', 'input'],
    ['a response in its own conversation', '/v1/responses', { model: 'gpt-4o', conversation: conversationB, input: [{ type: 'item_reference', id: itemA }] }, 404, 'item_not_found', 'input'],
    ['items added to its own conversation', `/v1/conversations/${conversationB}/items`, { items: [{ type: 'item_reference', id: itemA }] }, 404, 'item_not_found', 'items'],
    ['items added, the type left out', `/v1/conversations/${conversationB}/items`, { items: [{ id: itemA }] }, 404, 'item_not_found', 'items'],
    ['items added, role and content null', `/v1/conversations/${conversationB}/items`, { items: [{ id: itemA, role: null, content: null }] }, 404, 'item_not_found', 'items'],
    ['a response, role and content null', '/v1/responses', { model: 'gpt-4o', input: [{ id: itemA, role: null, content: null }] }, 400, 'item_reference_not_allowed', 'input'],
    // No type and only half a message: no message to a reader that needs both, so a loose one (a union tried in
    // turn, unknown keys ignored) takes the reference it also fits.
    ['items added, no type and a role but no content', `/v1/conversations/${conversationB}/items`, { items: [{ id: itemA, role: 'user' }] }, 404, 'item_not_found', 'items'],
    ['items added, no type and content but no role', `/v1/conversations/${conversationB}/items`, { items: [{ id: itemA, content: 'x' }] }, 404, 'item_not_found', 'items'],
    ['a response, no type and a role but no content', '/v1/responses', { model: 'gpt-4o', input: [{ id: itemA, role: 'assistant' }] }, 400, 'item_reference_not_allowed', 'input'],
    ['a new conversation\'s items', '/v1/conversations', { items: [{ type: 'item_reference', id: itemA }] }, 400, 'item_reference_not_allowed', 'items']
  ]
  await assertRefusedToB(t, upstream, post, refusals)
  // (`audit query --item` finds who named A's item: the record of each refusal says which item it was.)
  const refused = gw.audit().filter(r => r.clientId === 'team-other' && r.status >= 400)
  t.same(refused.map(r => r.itemId), refusals.map(() => itemA), 'each refusal\'s record names the item refused')

  // A key given twice: the gateway reads the last one (a message), as JSON.parse does; an upstream parser that
  // keeps the first would read a reference to A's item. What goes upstream is what the gateway read.
  const twice = `{"items":[{"type":"item_reference","id":"${itemA}","type":"message","role":"user","content":"hi"}]}`
  const sentBefore = upstream.requests.length
  const res = await fetch(`${gw.url}/v1/conversations/${conversationB}/items`, {
    method: 'POST', body: twice, headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }
  })
  t.equal(res.status, 200, 'a body with a key given twice: the message the gateway read is added')
  const carried = upstream.requests.slice(sentBefore).find(r => r.method === 'POST')!.body.toString()
  t.notMatch(carried, /item_reference/, 'the upstream is not sent the reference the gateway did not read')
  t.same(JSON.parse(carried), JSON.parse(twice), 'it gets the body as the gateway read it')

  // A names its own item in its own conversation: checked, and served.
  const before = upstream.requests.length
  const own = await post(KEYS.full, `/v1/conversations/${conversationA}/items`, { items: [{ type: 'item_reference', id: itemA }] })
  t.equal(own.status, 200, 'A\'s own item in A\'s own conversation')
  t.same(calls(upstream.requests.slice(before)), [
    `GET /v1/conversations/${conversationA}/items/${itemA}`, `POST /v1/conversations/${conversationA}/items`
  ], 'one check of the item, then the call')
  const response = await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', conversation: conversationA, input: [{ type: 'item_reference', id: itemA }] })
  t.equal(response.status, 200, 'and in a response in that conversation')
  // An admin acts on every object, references included.
  const admin = await post(KEYS.admin, `/v1/conversations/${conversationB}/items`, { items: [{ type: 'item_reference', id: itemA }] })
  t.equal(admin.status, 200, 'an admin client is not checked')
  await new Promise(resolve => setTimeout(resolve, 20))
  t.match(gw.audit().filter(r => r.clientId === 'team-other' && r.status >= 400).map(r => r.outcome), ['invalid', 'invalid', 'invalid', 'invalid', 'invalid'])
})

t.test('input or items given as an object, not a list, is a 400 invalid_type: a relay that wraps it into a list would pass another team\'s reference', async t => {
  const { upstream, gw } = await setup(t)
  const { post, itemA, conversationB } = await twoTeams(gw.url)
  const reference = { type: 'item_reference', id: itemA }
  await assertRefusedToB(t, upstream, post, [
    ['a response\'s input', '/v1/responses', { model: 'gpt-4o', input: reference }, 400, 'invalid_type', 'input'],
    ['a response\'s input, in its own conversation', '/v1/responses', { model: 'gpt-4o', conversation: conversationB, input: reference }, 400, 'invalid_type', 'input'],
    ['items added', `/v1/conversations/${conversationB}/items`, { items: reference }, 400, 'invalid_type', 'items'],
    ['a new conversation\'s items', '/v1/conversations', { items: reference }, 400, 'invalid_type', 'items'],
    ['items as a string', `/v1/conversations/${conversationB}/items`, { items: itemA }, 400, 'invalid_type', 'items'],
    ['a response\'s input as a number', '/v1/responses', { model: 'gpt-4o', input: 1 }, 400, 'invalid_type', 'input']
  ])
  t.equal((await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).status, 200, 'input as a string is OpenAI\'s and served')
  t.equal((await post(KEYS.other, '/v1/conversations', { items: null })).status, 200, 'items: null (none) is served')
})

t.test('an image generation call without its image is a reference the upstream fills in by id: another team\'s is refused like an item_reference', async t => {
  // OpenAI's "using image ID" multi-turn editing sends { type: 'image_generation_call', id: 'ig_...' } and the
  // upstream puts the stored image (its base64 `result`) in context. Across one shared account, another team's id
  // pulls its image into the caller's context, its conversation's items and its response's input items.
  const { upstream, gw } = await setup(t)
  const { post, conversationA, conversationB } = await twoTeams(gw.url)
  const imageA = 'ig_0123456789abcdef0123456789abcdef'
  const stored = await post(KEYS.full, `/v1/conversations/${conversationA}/items`, {
    items: [{ type: 'image_generation_call', id: imageA, status: 'completed', result: 'QSdzIHByaXZhdGUgaW1hZ2U=' }]
  })
  t.equal(stored.status, 200, 'A\'s conversation holds an image generation call')

  const refusals: Refusal[] = [
    ['an image by id, a response outside any conversation', '/v1/responses', { model: 'gpt-4o', input: [{ type: 'image_generation_call', id: imageA }] }, 400, 'item_reference_not_allowed', 'input'],
    ['an image by id, result null', '/v1/responses', { model: 'gpt-4o', input: [{ type: 'image_generation_call', id: imageA, result: null, status: 'completed' }] }, 400, 'item_reference_not_allowed', 'input'],
    ['an image by id, a response in its own conversation', '/v1/responses', { model: 'gpt-4o', conversation: conversationB, input: [{ type: 'image_generation_call', id: imageA }] }, 404, 'item_not_found', 'input'],
    ['an image by id, items added to its own conversation', `/v1/conversations/${conversationB}/items`, { items: [{ type: 'image_generation_call', id: imageA }] }, 404, 'item_not_found', 'items'],
    ['an image by id, a new conversation\'s items', '/v1/conversations', { items: [{ type: 'image_generation_call', id: imageA }] }, 400, 'item_reference_not_allowed', 'items']
  ]
  await assertRefusedToB(t, upstream, post, refusals)

  // An item that carries its own content names nothing stored: served as before, to anyone.
  const image = await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: [{ type: 'image_generation_call', id: imageA, status: 'completed', result: 'QiBvd24gaW1hZ2U=' }] })
  t.equal(image.status, 200, 'an image generation call with its image is served')
  // A names its own, by id, in its own conversation: checked, and served.
  const before = upstream.requests.length
  const own = await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', conversation: conversationA, input: [{ type: 'image_generation_call', id: imageA }] })
  t.equal(own.status, 200, 'A\'s own image by id, in A\'s own conversation')
  t.same(calls(upstream.requests.slice(before)), [`GET /v1/conversations/${conversationA}/items/${imageA}`, 'POST /v1/responses'],
    'checked, then the call')

  // The key that makes the item carry its image, in another case: a case-blind upstream reads the later one.
  const otherCase = await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: [{ type: 'image_generation_call', id: imageA, result: 'QiBvd24=', Result: null }] })
  t.equal(otherCase.status, 400, 'result in another case: 400')
  t.match(await otherCase.json(), { error: { code: 'unknown_parameter', param: 'input[0].Result' } }, 'unknown_parameter')
})

// A code interpreter container named by id is one the upstream runs the call's code in, with every file in it,
// across the one account all teams share. A team's containers come from its own `container: { type: 'auto' }`
// calls (their ids are in its answers, as `container_id`), carry no metadata to own them by, and are not routed by
// the gateway, so no check can say whose one is: only admin keys may name one. Auto mode still reuses an active
// container from the response's own context.
t.test('a code interpreter container named by id is refused to a non-admin client: it could be another team\'s, with its files', async t => {
  const { upstream, gw } = await setup(t)
  const { post } = await twoTeams(gw.url)
  const container = 'cntr_0123456789abcdef0123456789abcdef'
  const before = upstream.requests.length
  const res = await post(KEYS.other, '/v1/responses', {
    model: 'gpt-4o', input: 'list /mnt/data', tools: [{ type: 'web_search' }, { type: 'code_interpreter', container }]
  })
  t.equal(res.status, 403, 'refused')
  t.match(await res.json(), { error: { type: 'invalid_request_error', code: 'container_not_allowed', param: 'tools[1].container' } }, 'naming the container')
  const otherCase = await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: 'x', tools: [{ type: 'code_interpreter', Container: container }] })
  t.equal(otherCase.status, 400, 'the key in another case, which a case-blind upstream would read')
  t.match(await otherCase.json(), { error: { code: 'unknown_parameter', param: 'tools[0].Container' } })
  // The tool's type in another case (or with Go's Turkish i), which a case-blind upstream takes for the code interpreter.
  for (const type of ['Code_Interpreter', 'CODE_INTERPRETER', 'code_\u0131nterpreter']) {
    const res = await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: 'x', tools: [{ type, container }] })
    t.equal(res.status, 403, `type ${type}: refused`)
    t.match(await res.json(), { error: { code: 'container_not_allowed', param: 'tools[0].container' } })
  }
  const inQuery = await fetch(`${gw.url}/v1/responses?tools[0][type]=code_interpreter&tools[0][container]=${container}`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }, body: '{"model":"gpt-4o","input":"x"}'
  })
  t.equal(inQuery.status, 400, 'in the query string, which a PHP or Rails upstream merges into the body')
  t.match(await inQuery.json(), { error: { code: 'unknown_parameter' } })
  t.same(upstream.requests.slice(before).filter(r => r.method === 'POST').map(r => r.url), [], 'nothing went upstream')
  t.match(gw.audit().at(-6), { status: 403, outcome: 'denied', clientId: 'team-other' }, 'audited as denied')

  const auto = await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: 'x', tools: [{ type: 'code_interpreter', container: { type: 'auto' } }] })
  t.equal(auto.status, 200, 'a container the upstream picks (auto) is served')
  const admin = await post(KEYS.admin, '/v1/responses', { model: 'gpt-4o', input: 'x', tools: [{ type: 'code_interpreter', container }] })
  t.equal(admin.status, 200, 'an admin key may name one')
})

t.test('a code interpreter container given as anything but an object is refused as one named by id, a number of any length included', async t => {
  // `{ "type": "auto" }` is the one form that names no container; a number JSON.parse would round is kept as the
  // client wrote it (http/json.ts), as an object of its own, and is no such form.
  const { upstream, gw } = await setup(t)
  const before = upstream.requests.length
  for (const container of ['5', '12345678901234567890', '1e400', '[]']) {
    const res = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST',
      headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' },
      body: `{"model":"gpt-4o","input":"x","tools":[{"type":"code_interpreter","container":${container}}]}`
    })
    t.equal(res.status, 403, `container ${container}: 403`)
    t.match(await res.json(), { error: { code: 'container_not_allowed', param: 'tools[0].container' } }, `container ${container}`)
  }
  t.same(upstream.requests.slice(before).map(r => r.body.toString()), [], 'nothing went upstream')
})

// The hosted shell tool runs its commands in a container too, and names one by id the way the SDK types it:
// `environment: { type: 'container_reference', container_id }`. A team's shell and code interpreter containers
// have their ids in its answers (`shell_call.environment.container_id`, `code_interpreter_call.container_id`).
t.test('a shell tool\'s container named by id (container_reference) is refused to a non-admin client, as a code interpreter\'s is', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const { post } = await twoTeams(gw.url)
  const container = 'cntr_0123456789abcdef0123456789abcdef'
  const before = upstream.requests.length
  const err = await rejection(sdk(KEYS.other).responses.create({
    model: 'gpt-5.1', input: 'cat /mnt/data/*', tools: [{ type: 'shell', environment: { type: 'container_reference', container_id: container } }]
  }))
  t.type(err, OpenAI.PermissionDeniedError, 'the SDK\'s PermissionDeniedError')
  t.match(err, { status: 403, code: 'container_not_allowed', type: 'invalid_request_error', param: 'tools[0].environment' }, 'naming the environment')
  t.match(gw.audit().at(-1), { status: 403, outcome: 'denied', clientId: 'team-other' }, 'audited as denied')
  await assertRefusedToB(t, upstream, post, [
    ['the id without its type', '/v1/responses', { model: 'gpt-5.1', input: 'x', tools: [{ type: 'shell', environment: { container_id: container } }] },
      403, 'container_not_allowed', 'tools[0].environment'],
    ['Environment in another case', '/v1/responses', { model: 'gpt-5.1', input: 'x', tools: [{ type: 'shell', Environment: { type: 'container_reference', container_id: container } }] },
      400, 'unknown_parameter', 'tools[0].Environment'],
    ['its keys in another case', '/v1/responses', { model: 'gpt-5.1', input: 'x', tools: [{ type: 'shell', environment: { TYPE: 'container_reference', Container_Id: container } }] },
      400, 'unknown_parameter', 'tools[0].environment.TYPE']
  ])
  t.same(upstream.requests.slice(before).filter(r => r.method === 'POST').map(r => r.url), [], 'nothing went upstream')

  const auto = await post(KEYS.other, '/v1/responses', { model: 'gpt-5.1', input: 'x', tools: [{ type: 'shell', environment: { type: 'container_auto' } }] })
  t.equal(auto.status, 200, 'a container the upstream makes (container_auto) is served')
  const local = await post(KEYS.other, '/v1/responses', { model: 'gpt-5.1', input: 'x', tools: [{ type: 'shell', environment: { type: 'local' } }] })
  t.equal(local.status, 200, 'a local environment (the client runs the commands) is served')
  const admin = await post(KEYS.admin, '/v1/responses', {
    model: 'gpt-5.1', input: 'x', tools: [{ type: 'shell', environment: { type: 'container_reference', container_id: container } }]
  })
  t.equal(admin.status, 200, 'an admin key may name one')
})

// An item names a container too: a code interpreter call's `container_id`, a shell call's `environment`. A tool in
// auto mode reuses an active container from the response's context, and an item passed back puts one there: a
// made-up item naming another team's container would run the caller's code among that team's files. The gateway
// notes the containers of the output items it hands a client, with the items: a client passes back its own.
t.test('an item naming a container the gateway did not hand to the caller is refused; its own, passed back as it came, is served', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const { post, conversationB } = await twoTeams(gw.url)
  const containerA = 'cntr_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'
  const shellA = 'cntr_ssssssssssssssssssssssssssssssss'
  // A's code interpreter and shell calls ran in A's containers: their ids are in A's answer.
  upstream.respond = (_req, res, body) => {
    const { metadata } = JSON.parse(body.toString()) as { metadata?: Record<string, string> }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({
      id: 'resp_withcontainers', object: 'response', status: 'completed', model: 'gpt-5.1', metadata, usage: { input_tokens: 1, output_tokens: 1, total_tokens: 2 },
      output: [
        { type: 'code_interpreter_call', id: 'ci_a1', container_id: containerA, code: 'print(1)', outputs: [], status: 'completed' },
        { type: 'shell_call', id: 'sh_a1', call_id: 'call_a1', action: { commands: ['ls'] }, environment: { type: 'container_reference', container_id: shellA }, status: 'completed' }
      ]
    }))
  }
  const a = sdk(KEYS.full)
  const answered = await a.responses.create({ model: 'gpt-5.1', input: 'run it', tools: [{ type: 'code_interpreter', container: { type: 'auto' } }] })
  upstream.respond = null

  const before = upstream.requests.length
  const made = (container: string) => ({ type: 'code_interpreter_call', id: 'ci_madeup', container_id: container, code: 'print(open("/mnt/data/a").read())', outputs: [], status: 'completed' })
  const shell = (container: unknown) => ({ type: 'shell_call', id: 'sh_madeup', call_id: 'call_x', action: { commands: ['cat /mnt/data/*'] }, environment: { type: 'container_reference', container_id: container }, status: 'completed' })
  const auto = [{ type: 'code_interpreter', container: { type: 'auto' } }]
  const err = await rejection(sdk(KEYS.other).responses.create({ model: 'gpt-5.1', input: [made(containerA) as never, { role: 'user', content: 'list /mnt/data' }], tools: auto as never }))
  t.type(err, OpenAI.PermissionDeniedError, 'B naming A\'s container in a made-up item: the SDK\'s PermissionDeniedError')
  t.match(err, { status: 403, code: 'container_not_allowed', param: 'input[0].container_id' })
  t.match(gw.audit().at(-1), { status: 403, outcome: 'denied', clientId: 'team-other', ownerId: 'team-full' }, 'audited denied, with the team it went to')
  await assertRefusedToB(t, upstream, post, [
    ['a shell call naming A\'s shell container', '/v1/responses', { model: 'gpt-5.1', input: [shell(shellA)], tools: [{ type: 'shell', environment: { type: 'container_auto' } }] },
      403, 'container_not_allowed', 'input[0].environment'],
    ['a container never handed out', '/v1/responses', { model: 'gpt-5.1', input: [made('cntr_unknown0000000000000000000000000')], tools: auto },
      403, 'container_not_allowed', 'input[0].container_id'],
    ['a container_reference without its id', '/v1/responses', { model: 'gpt-5.1', input: [shell(undefined)] }, 403, 'container_not_allowed', 'input[0].environment'],
    ['a container id that is no string', '/v1/responses', { model: 'gpt-5.1', input: [made(5 as never)] }, 403, 'container_not_allowed', 'input[0].container_id'],
    ['into B\'s conversation, as items', `/v1/conversations/${conversationB}/items`, { items: [made(containerA)] }, 403, 'container_not_allowed', 'items[0].container_id'],
    ['in a new conversation\'s items', '/v1/conversations', { items: [made(containerA)] }, 403, 'container_not_allowed', 'items[0].container_id'],
    ['container_id in another case', '/v1/responses', { model: 'gpt-5.1', input: [{ ...made('cntr_b'), Container_Id: containerA }] }, 400, 'unknown_parameter', 'input[0].Container_Id'],
    // (as a tool's environment: to an upstream that ignores case, `Type`/`Container_Id` name A's container)
    ['a shell call\'s environment keys in another case', '/v1/responses', { model: 'gpt-5.1', input: [{ ...shell(undefined), environment: { Type: 'container_reference', Container_Id: shellA } }] },
      400, 'unknown_parameter', 'input[0].environment.Type'],
    ['as items, its container_id in another case', `/v1/conversations/${conversationB}/items`, { items: [{ ...shell(undefined), environment: { container_ıd: shellA } }] },
      400, 'unknown_parameter', 'items[0].environment.container_ıd']
  ])
  t.same(upstream.requests.slice(before).filter(r => r.method === 'POST').map(r => r.url), [], 'nothing went upstream')

  // A passes its own output back as it came (OpenAI's tool loop): its containers were handed to it.
  const next = await a.responses.create({ model: 'gpt-5.1', input: [...answered.output as never[], { role: 'user', content: 'and again' }], tools: auto as never })
  t.equal(next.status, 'completed', 'A\'s own items, naming its own containers, are served')
  const admin = await post(KEYS.admin, '/v1/responses', { model: 'gpt-5.1', input: [made(containerA)] })
  t.equal(admin.status, 200, 'an admin key may name any')
})

// A conversation's items, listed and passed back into a new response (a fork of the conversation, a retry outside
// it), hold its code interpreter calls with their containers, as they came: the conversation is the caller's, so the
// containers its items ran in were the caller's too, whether this process handed out the response that made them or
// not (a gateway restarted with the in-memory store, a response run in the background and never retrieved).
t.test('items listed from a conversation of the caller\'s, passed back as they came, are served; to another team, their containers stay refused', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const containerA = 'cntr_llllllllllllllllllllllllllllllll'
  // A's conversation, whose code interpreter call ran before this gateway started (made as the gateway would).
  const conversation = await createUpstream(upstream, { gateway_owner: 'team-full' })
  await fetch(`${upstream.url}/v1/conversations/${conversation}/items`, {
    method: 'POST', headers: { authorization: `Bearer ${UPSTREAM_TOKEN}`, 'content-type': 'application/json' },
    // (its code long enough that the listing streams on as it came, past the 64 KiB read whole)
    body: JSON.stringify({ items: [{ type: 'code_interpreter_call', id: 'ci_listed1', container_id: containerA, code: `print(1)${' '.repeat(100_000)}`, outputs: [], status: 'completed' }] })
  })
  const a = sdk(KEYS.full)
  const items: unknown[] = []
  for await (const item of a.conversations.items.list(conversation, { order: 'asc' })) items.push(item)
  t.match(items, [{ type: 'message' }, { type: 'code_interpreter_call', container_id: containerA }], 'A lists its conversation\'s items')
  const auto = [{ type: 'code_interpreter' as const, container: { type: 'auto' as const } }]
  const forked = await a.responses.create({ model: 'gpt-5.1', input: [...items as never[], { role: 'user', content: 'and again' }], tools: auto })
  t.equal(forked.status, 'completed', 'A\'s listed items, passed back as they came, are served')
  // An item retrieved alone (read whole), in a fresh gateway: it starts a new conversation of A's.
  const fresh = await gateway(t, upstream)
  const retrieved = await fresh.sdk(KEYS.full).conversations.items.retrieve('ci_listed1', { conversation_id: conversation })
  const again = await fresh.sdk(KEYS.full).conversations.create({ items: [retrieved as never] })
  t.match(again.id, /^conv_/, 'an item retrieved from it starts a new conversation of A\'s')

  const err = await rejection(sdk(KEYS.other).responses.create({ model: 'gpt-5.1', input: items as never[], tools: auto }))
  t.match(err, { status: 403, code: 'container_not_allowed', param: 'input[1].container_id' }, 'another team passing them is still refused')
})

// The same items passed back into the conversation they came from, without listing it first: a gateway restarted
// with the in-memory store knows nothing of their containers, but the item each is in the caller's conversation
// says it. The item is looked up there by its id (as an item reference is), only when its container is one the
// gateway does not know as the caller's.
t.test('an item passed back into the caller\'s own conversation, naming a container it holds an item of, is served without a listing first; a made-up one is still refused', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const containerA = 'cntr_rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr'
  const shellA = 'cntr_hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh'
  // A's conversation, whose calls ran before this gateway started (made as the gateway would).
  const conversation = await createUpstream(upstream, { gateway_owner: 'team-full' })
  const ran = { type: 'code_interpreter_call', id: 'ci_before', container_id: containerA, code: 'print(1)', outputs: [], status: 'completed' }
  const shell = { type: 'shell_call', id: 'sh_before', call_id: 'call_b', action: { commands: ['ls'] }, environment: { type: 'container_reference', container_id: shellA }, status: 'completed' }
  await fetch(`${upstream.url}/v1/conversations/${conversation}/items`, {
    method: 'POST', headers: { authorization: `Bearer ${UPSTREAM_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ items: [ran, shell] })
  })
  const a = sdk(KEYS.full)
  const auto = [{ type: 'code_interpreter' as const, container: { type: 'auto' as const } }]
  const lookups = () => upstream.requests.filter(r => r.method === 'GET' && r.url.includes('/items/')).map(r => r.url.replace(conversation, 'conv_a'))

  const answered = await a.responses.create({ model: 'gpt-5.1', conversation, input: [ran as never, { role: 'user', content: 'and again' }], tools: auto })
  t.equal(answered.status, 'completed', 'responses.create({conversation}) with its code interpreter call passed back: served')
  t.same(lookups(), ['/v1/conversations/conv_a/items/ci_before'], 'its item looked up in the conversation, once')
  const added = await a.conversations.items.create(conversation, { items: [shell as never] })
  t.equal(added.object, 'list', 'conversations.items.create with its shell call: served')
  t.same(lookups().slice(1), ['/v1/conversations/conv_a/items/sh_before'])
  await a.responses.create({ model: 'gpt-5.1', conversation, input: [ran as never, shell as never], tools: auto })
  t.equal(lookups().length, 2, 'containers vouched for once are known: no lookup the next time')
  const noContainer = await a.responses.create({ model: 'gpt-5.1', conversation, input: 'plain' })
  t.equal(noContainer.status, 'completed')
  t.equal(lookups().length, 2, 'a call that names no container looks nothing up')

  // Made up: a container the conversation holds no item of, or an item of it with another container.
  const fresh = await gateway(t, upstream)
  const b = fresh.sdk(KEYS.full)
  const refusals: Array<[string, unknown]> = [
    ['an item the conversation does not hold', { ...ran, id: 'ci_madeup', container_id: 'cntr_madeup000000000000000000000000' }],
    ['an item it holds, with another container', { ...ran, container_id: 'cntr_other0000000000000000000000000' }],
    ['an item without an id', { ...ran, id: undefined }]
  ]
  for (const [what, item] of refusals) {
    const err = await rejection(b.responses.create({ model: 'gpt-5.1', conversation, input: [item as never], tools: auto }))
    t.match(err, { status: 403, code: 'container_not_allowed', param: 'input[0].container_id' }, `${what}: refused`)
  }
  // Another team's conversation is not one to vouch from: B's own conversation holding an item named after A's.
  const conversationB = await createUpstream(upstream, { gateway_owner: 'team-other' })
  const err = await rejection(fresh.sdk(KEYS.other).responses.create({ model: 'gpt-5.1', conversation: conversationB, input: [ran as never], tools: auto }))
  t.match(err, { status: 403, code: 'container_not_allowed', param: 'input[0].container_id' }, 'B passing A\'s item into its own conversation: refused')
  t.match(fresh.gw.audit().at(-1), { status: 403, outcome: 'denied', clientId: 'team-other' })
  t.equal(gw.audit().filter(r => r.status === 403).length, 0)
})

// Code interpreter runs every call of a session in the one container it reuses (`container: {type: 'auto'}`): a
// conversation's history passed back holds many calls naming the same container, and one of them in the
// conversation vouches for it. The cap on lookups is on what is looked up, not on how many items name a container.
t.test('many code interpreter calls of the caller\'s own conversation, all in one container, passed back into it: one lookup vouches for them all', async t => {
  const { upstream, sdk } = await setup(t)
  const container = 'cntr_oooooooooooooooooooooooooooooooo'
  const conversation = await createUpstream(upstream, { gateway_owner: 'team-full' })
  // 40 turns' calls, made before this gateway started (as the gateway would have made them)
  const calls = Array.from({ length: 40 }, (_, i) => ({
    type: 'code_interpreter_call', id: `ci_turn${i}`, container_id: container, code: `print(${i})`, outputs: [], status: 'completed'
  }))
  await fetch(`${upstream.url}/v1/conversations/${conversation}/items`, {
    method: 'POST', headers: { authorization: `Bearer ${UPSTREAM_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ items: calls })
  })
  const lookups = () => upstream.requests.filter(r => r.method === 'GET' && r.url.includes('/items/')).length
  const auto = [{ type: 'code_interpreter' as const, container: { type: 'auto' as const } }]
  const answered = await sdk(KEYS.full).responses.create({ model: 'gpt-5.1', conversation, input: [...calls as never[], { role: 'user', content: 'and again' }], tools: auto })
  t.equal(answered.status, 'completed', '40 calls in its one container, passed back into the conversation they are in: served')
  t.equal(lookups(), 1, 'the container looked up once, by the first item naming it')

  // Past the cap in containers (each its own, none in the conversation), still refused without a lookup.
  const fresh = await gateway(t, upstream)
  const before = lookups()
  const many = Array.from({ length: 33 }, (_, i) => ({ ...calls[0], id: `ci_other${i}`, container_id: `cntr_many${String(i).padStart(27, '0')}` }))
  const err = await rejection(fresh.sdk(KEYS.full).responses.create({ model: 'gpt-5.1', conversation, input: many as never[], tools: auto }))
  t.match(err, { status: 403, code: 'container_not_allowed', param: 'input[0].container_id' }, '33 containers: refused')
  t.equal(lookups(), before, 'nothing looked up')
})

// A reasoning item without its `encrypted_content` is read from storage by its id (OpenAI's "Item with id 'rs_...'
// not found. Items are not persisted when `store` is set to false"), across the one account: another team's rs_ id
// would put its reasoning in the caller's context. It is also what every reasoning model's answer holds and clients
// pass back as it came (`input: [...input, ...response.output]`), outside any conversation: the gateway notes each
// one it hands a client, and that client may name it anywhere.
t.test('a reasoning item without its encrypted content is a reference the upstream fills in by id: another team\'s is refused', async t => {
  const { upstream, gw } = await setup(t)
  const { post, conversationA, conversationB } = await twoTeams(gw.url)
  const answered = await (await post(KEYS.full, '/v1/responses', { model: 'o3', conversation: conversationA, input: 'A\'s secret plan' })).json() as { output: Array<{ type: string, id: string }> }
  const reasoningA = answered.output.find(item => item.type === 'reasoning')!.id
  t.match(reasoningA, /^rs_/, 'A\'s reasoning model answered with a reasoning item')

  const refusals: Refusal[] = [
    ['outside any conversation', '/v1/responses', { model: 'o3', input: [{ type: 'reasoning', id: reasoningA, summary: [] }] }, 400, 'item_reference_not_allowed', 'input'],
    ['encrypted_content null', '/v1/responses', { model: 'o3', input: [{ type: 'reasoning', id: reasoningA, summary: [], encrypted_content: null }] }, 400, 'item_reference_not_allowed', 'input'],
    ['in its own conversation', '/v1/responses', { model: 'o3', conversation: conversationB, input: [{ type: 'reasoning', id: reasoningA, summary: [] }] }, 404, 'item_not_found', 'input'],
    ['items added to its own conversation', `/v1/conversations/${conversationB}/items`, { items: [{ type: 'reasoning', id: reasoningA, summary: [] }] }, 404, 'item_not_found', 'items'],
    ['a new conversation\'s items', '/v1/conversations', { items: [{ type: 'reasoning', id: reasoningA, summary: [] }] }, 400, 'item_reference_not_allowed', 'items']
  ]
  await assertRefusedToB(t, upstream, post, refusals)
  const withContent = await post(KEYS.other, '/v1/responses', { model: 'o3', input: [{ type: 'reasoning', id: reasoningA, summary: [], encrypted_content: 'gAAAA-B' }] })
  t.equal(withContent.status, 200, 'a reasoning item with its encrypted content names nothing stored: served')
  const otherCase = await post(KEYS.other, '/v1/responses', { model: 'o3', input: [{ type: 'reasoning', id: reasoningA, summary: [], encrypted_content: 'gAAAA-B', Encrypted_Content: null }] })
  t.equal(otherCase.status, 400, 'encrypted_content in another case, which a case-blind upstream would read: 400')
  t.match(await otherCase.json(), { error: { code: 'unknown_parameter', param: 'input[0].Encrypted_Content' } })
  t.equal((await post(KEYS.admin, '/v1/responses', { model: 'o3', input: [{ type: 'reasoning', id: reasoningA, summary: [] }] })).status, 200, 'an admin key is not checked')
})

t.test('a response\'s output passed back as it came or named by item_reference, outside any conversation, by the official SDK: served to the team it was handed to', async t => {
  // OpenAI's function-calling loop: `input.push(...response.output)`, then the next create, with store on (the
  // default), so the upstream fills each reasoning item in by its id.
  const { upstream, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const input: OpenAI.Responses.ResponseInputItem[] = [{ role: 'user', content: 'What is the weather?' }]
  const first = await a.responses.create({ model: 'o3', input })
  t.equal(first.output[0]?.type, 'reasoning', 'the answer starts with a reasoning item, without encrypted_content')
  input.push(...first.output as OpenAI.Responses.ResponseInputItem[], { role: 'user', content: 'And tomorrow?' })
  const second = await a.responses.create({ model: 'o3', input })
  t.equal(second.status, 'completed', 'the output passed back is served')
  const sent = JSON.parse(upstream.requests.at(-1)!.body.toString()) as { input: Array<{ type?: string, id?: string }> }
  t.same(sent.input.filter(i => i.type === 'reasoning').map(i => i.id), [first.output[0]!.id], 'and the reasoning item went upstream by id')

  // Streamed: the items come in events (output_item.added/done, response.completed).
  const stream = await a.responses.create({ model: 'o3', input: 'Stream it', stream: true })
  let streamed: OpenAI.Responses.Response | undefined
  for await (const event of stream) if (event.type === 'response.completed') streamed = event.response
  const again = await a.responses.create({ model: 'o3', input: [...streamed!.output as OpenAI.Responses.ResponseInputItem[], { role: 'user', content: 'more' }] })
  t.equal(again.status, 'completed', 'a streamed answer\'s reasoning passed back is served')
  const conversation = await a.conversations.create({ items: streamed!.output as OpenAI.Conversations.ConversationCreateParams['items'] })
  t.match(conversation.id, /^conv_/, 'and so is a new conversation made from it')

  // Earlier turns named by id, as the Vercel AI SDK sends them with store: true: the output items A was handed.
  const byReference: OpenAI.Responses.ResponseInputItem[] = [
    { role: 'user', content: 'What is the weather?' },
    ...first.output.map(item => ({ type: 'item_reference' as const, id: item.id! })),
    { role: 'user', content: 'And tomorrow?' }
  ]
  t.equal((await a.responses.create({ model: 'o3', input: byReference })).status, 'completed', 'A\'s own output items named by item_reference: served')
  const refused = await rejection(b.responses.create({ model: 'o3', input: byReference }))
  t.match(refused, { status: 400, code: 'item_reference_not_allowed', param: 'input' }, 'the same references from team B: refused')

  // An admin who retrieves A's response is handed its items too, but they stay A's.
  await sdk(KEYS.admin).responses.retrieve(first.id)
  t.equal((await a.responses.create({ model: 'o3', input })).status, 'completed', 'after an admin\'s retrieve, A still passes its output back')

  // The same items from team B's hands: refused, and nothing of B's went upstream.
  const before = upstream.requests.length
  const e = await rejection(b.responses.create({ model: 'o3', input }))
  t.type(e, OpenAI.BadRequestError, 'team B passing A\'s output back: BadRequestError')
  t.match(e, { status: 400, code: 'item_reference_not_allowed', param: 'input' })
  t.equal(upstream.requests.length, before, 'nothing went upstream')
})

// The answer cannot say whose an item is (a stranger's and a missing one are refused alike), but the audit can when
// the gateway handed it out: as for another team's conversation, `audit query --outcome denied` finds who tried.
t.test('a call refused an item the gateway handed to another team is audited denied, with that team as ownerId; one naming an unknown item stays invalid', async t => {
  const { gw, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const reasoning = (await a.responses.create({ model: 'o3', input: 'A\'s secret plan' })).output[0]!
  t.equal(reasoning.type, 'reasoning')
  const conversationB = (await b.conversations.create({})).id
  const unknown = `rs_${'0'.repeat(32)}`
  const calls: Array<[string, (id: string) => Promise<unknown>]> = [
    ['outside any conversation', async id => await b.responses.create({ model: 'o3', input: [{ type: 'item_reference', id }] })],
    ['in its own conversation', async id => await b.responses.create({ model: 'o3', conversation: conversationB, input: [{ type: 'item_reference', id }] })],
    ['a new conversation\'s items', async id => await b.conversations.create({ items: [{ type: 'item_reference', id }] })],
    ['items added to its own conversation', async id => await b.conversations.items.create(conversationB, { items: [{ type: 'item_reference', id }] })]
  ]
  for (const [label, call] of calls) {
    const refusedA = await rejection(call(reasoning.id!)) as InstanceType<typeof OpenAI.APIError>
    const recordA = gw.audit().at(-1)!
    const refusedNone = await rejection(call(unknown)) as InstanceType<typeof OpenAI.APIError>
    const recordNone = gw.audit().at(-1)!
    t.same([refusedA.status, refusedA.code, refusedA.message.replace(reasoning.id!, 'ID')],
      [refusedNone.status, refusedNone.code, refusedNone.message.replace(unknown, 'ID')], `${label}: the same answer to the client`)
    t.match(recordA, { clientId: 'team-other', outcome: 'denied', ownerId: 'team-full', itemId: reasoning.id }, `${label}: A's item, audited denied`)
    t.match(recordNone, { clientId: 'team-other', outcome: 'invalid', itemId: unknown }, `${label}: an unknown item, audited invalid`)
    t.not(recordNone.ownerId, 'team-full', `${label}: and not A's`)
  }
})

t.test('a background response\'s reasoning, handed out by a retrieve or a cancel, may be passed back by its team only', async t => {
  // OpenAI answers a background create queued, with no output yet: the client gets the output from a retrieve
  // (polling), or from the cancel that stops it.
  const { upstream, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const handOuts: Array<[string, (id: string) => Promise<OpenAI.Responses.Response>]> = [
    ['retrieve', async id => await a.responses.retrieve(id)],
    ['cancel', async id => await a.responses.cancel(id)]
  ]
  for (const [how, handOut] of handOuts) {
    const created = await a.responses.create({ model: 'o3', input: 'Plan the launch', background: true })
    t.same(created.output, [], `${how}: the create's answer holds no output yet`)
    const output = (await handOut(created.id)).output as OpenAI.Responses.ResponseInputItem[]
    t.equal(output[0]?.type, 'reasoning', `the ${how}'s answer holds a reasoning item`)
    const input = [...output, { role: 'user' as const, content: 'Go on' }]
    const next = await a.responses.create({ model: 'o3', input })
    t.equal(next.status, 'completed', `passed back after a ${how}: served`)
    const before = upstream.requests.length
    t.match(await rejection(sdk(KEYS.other).responses.create({ model: 'o3', input })), { status: 400, code: 'item_reference_not_allowed' },
      'and refused to team B')
    t.equal(upstream.requests.length, before, 'which sent nothing upstream')
  }
})

t.test('a key the ownership check reads, spelled in another case or held in "__proto__", is refused (400 unknown_parameter) and never sent upstream', async t => {
  // An upstream whose JSON reader matches keys without regard to case (Go's encoding/json does) would read
  // "Conversation" as the conversation, "Items" as the items, "Type" as an item's type; the gateway, reading the
  // exact keys, would have checked nothing. The API knows no such keys.
  const { upstream, gw } = await setup(t)
  const { post, conversationA, itemA, conversationB } = await twoTeams(gw.url)
  const previousA = (await (await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const itemsOfB = `/v1/conversations/${conversationB}/items`

  const forgeries: Array<[string, string, unknown, string]> = [
    ['Conversation', '/v1/responses', { model: 'gpt-4o', input: 'hi', Conversation: conversationA }, 'Conversation'],
    ['conversation.ID', '/v1/responses', { model: 'gpt-4o', input: 'hi', conversation: { id: conversationB, ID: conversationA } }, 'conversation.ID'],
    ['Previous_Response_Id', '/v1/responses', { model: 'gpt-4o', input: 'hi', Previous_Response_Id: previousA }, 'Previous_Response_Id'],
    ['Input', '/v1/responses', { model: 'gpt-4o', conversation: conversationB, input: 'hi', Input: [{ type: 'item_reference', id: itemA }] }, 'Input'],
    ['input[].Type', '/v1/responses', { model: 'gpt-4o', conversation: conversationB, input: [{ type: 'message', role: 'user', content: 'x', Type: 'item_reference', id: itemA }] }, 'input[0].Type'],
    ['Items on item create', itemsOfB, { items: [], Items: [{ type: 'item_reference', id: itemA }] }, 'Items'],
    ['items[].Id', itemsOfB, { items: [{ type: 'item_reference', id: itemA, Id: itemA }] }, 'items[0].Id'],
    ['Items on conversation create', '/v1/conversations', { Items: [{ type: 'item_reference', id: itemA }] }, 'Items'],
    // "__proto__" (an own key to JSON.parse, written out by JSON.stringify) is the prototype of a copy made by
    // assignment (Object.assign): to an upstream in JavaScript that copies the body so, each key in it is the body's own.
    ['__proto__ holding previous_response_id', '/v1/responses', JSON.parse(`{"model":"gpt-4o","input":"hi","__proto__":{"previous_response_id":"${previousA}"}}`), '__proto__'],
    ['__proto__ holding conversation', '/v1/responses', JSON.parse(`{"model":"gpt-4o","input":"hi","__proto__":{"conversation":"${conversationA}"}}`), '__proto__'],
    ['__proto__ in an item', itemsOfB, JSON.parse(`{"items":[{"role":"user","content":"x","__proto__":{"type":"item_reference","id":"${itemA}"}}]}`), 'items[0].__proto__'],
    ['__proto__ on conversation create', '/v1/conversations', JSON.parse(`{"__proto__":{"items":[{"type":"item_reference","id":"${itemA}"}]}}`), '__proto__']
  ]
  for (const [label, path, body, param] of forgeries) {
    const before = upstream.requests.length
    const res = await post(KEYS.other, path, body)
    t.equal(res.status, 400, `${label}: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', type: 'invalid_request_error', param, message: `Unknown parameter: '${param}'.` } }, `${label}: unknown_parameter`)
    t.same(upstream.requests.slice(before).filter(r => r.method === 'POST').map(r => r.url), [], `${label}: nothing went upstream`)
  }
  // An update's metadata under "__proto__" would give B's conversation to A upstream: refused as Metadata is.
  const before = upstream.requests.length
  const update = await post(KEYS.other, `/v1/conversations/${conversationB}`, JSON.parse('{"__proto__":{"metadata":{"gateway_owner":"team-full"}}}'))
  t.equal(update.status, 400, '__proto__ holding metadata on an update: 400')
  t.match(await update.json(), { error: { code: 'invalid_metadata', param: 'metadata' } })
  t.same(upstream.requests.slice(before).filter(r => r.method === 'POST').map(r => r.url), [], 'the update did not go upstream')
  // Keys the API knows in lowercase still pass, and case is free where the client names things (metadata keys).
  const fine = await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: [{ type: 'message', role: 'user', content: 'x' }], conversation: conversationB, metadata: { Topic: 'ok' } })
  t.equal(fine.status, 200, 'an ordinary body is served')
})

t.test('a list the checks read (input, items, tools), given as a JSON object, is refused (400 invalid_type) and never sent upstream: {"0": item} is the list [item] to PHP', async t => {
  // PHP's json_decode($body, true) makes {"0": x} the array [0 => x], which json_encode writes back as [x]: through a
  // relay in PHP, an object the gateway read as no list at all reaches the upstream as the list it never checked.
  const { upstream, gw } = await setup(t)
  const { post, itemA, conversationB } = await twoTeams(gw.url)
  const reference = { type: 'item_reference', id: itemA }
  await assertRefusedToB(t, upstream, post, [
    ['input naming A\'s item', '/v1/responses', { model: 'gpt-4o', input: { 0: reference } }, 400, 'invalid_type', 'input'],
    ['input naming A\'s item in B\'s conversation', '/v1/responses', { model: 'gpt-4o', conversation: conversationB, input: { 0: reference } }, 400, 'invalid_type', 'input'],
    ['tools naming a container', '/v1/responses', { model: 'gpt-4o', input: 'x', tools: { 0: { type: 'code_interpreter', container: 'cntr_a' } } }, 400, 'invalid_type', 'tools'],
    ['a new conversation\'s items', '/v1/conversations', { items: { 0: reference } }, 400, 'invalid_type', 'items'],
    ['items added to B\'s conversation', `/v1/conversations/${conversationB}/items`, { items: { 0: reference } }, 400, 'invalid_type', 'items']
  ])
  t.notOk(upstream.everything().includes(itemA), 'A\'s item was never sent upstream')
  // A text input, and lists, are served as before.
  t.equal((await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: 'x', tools: [] })).status, 200, 'a text input is served')
})

t.test('a key the checks read, given in the query string of a POST (?conversation=, ?metadata[gateway_owner]=), is refused (400 unknown_parameter) and never sent upstream', async t => {
  // No POST route of the API takes these in the query, but a framework that merges the query into the body it
  // reads (PHP's, Rails') would take ?conversation=<A's> for the conversation, which the gateway never checked.
  const { upstream, gw } = await setup(t)
  const { post, conversationA, itemA, conversationB } = await twoTeams(gw.url)
  const previousA = (await (await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const forgeries: Array<[string, unknown, string]> = [
    [`/v1/responses?conversation=${conversationA}`, { model: 'gpt-4o', input: 'hi' }, 'conversation'],
    [`/v1/responses?conversation[id]=${conversationA}`, { model: 'gpt-4o', input: 'hi' }, 'conversation[id]'],
    [`/v1/responses?Conversation.id=${conversationA}`, { model: 'gpt-4o', input: 'hi' }, 'Conversation.id'],
    [`/v1/responses?previous_response_id=${previousA}`, { model: 'gpt-4o', input: 'hi' }, 'previous_response_id'],
    [`/v1/responses?model=o3-pro&stream=1`, { input: 'hi' }, 'model'],
    [`/v1/conversations/${conversationB}/items?items[0][type]=item_reference&items[0][id]=${itemA}`, { items: [] }, 'items[0][type]'],
    ['/v1/conversations?metadata[gateway_owner]=team-full', {}, 'metadata[gateway_owner]'],
    [`/v1/conversations/${conversationB}?metadata%5Bgateway_owner%5D=team-full`, { metadata: { a: 'b' } }, 'metadata[gateway_owner]']
  ]
  await assertForgeriesRefused(t, upstream, post, forgeries)
  // The one query parameter a POST route takes (include, on item create) still goes upstream as it came.
  const include = `/v1/conversations/${conversationB}/items?include[]=message.output_text.logprobs`
  t.equal((await post(KEYS.other, include, { items: [{ type: 'message', role: 'user', content: 'x' }] })).status, 200, 'include is passed on')
  t.equal(upstream.requests.at(-1)!.url, include)
})

t.test('a checked key in a POST\'s query spelled as PHP reads it (previous.response.id, previous response_id, previous[response_id) is refused and never sent upstream', async t => {
  // PHP names a query parameter as a variable: a dot or a space becomes `_`, and so does a `[` never closed. To
  // Laravel (which merges the query into a JSON body's input) `?previous.response.id=<A's>` is previous_response_id,
  // and B would go on from A's response, reading A's context.
  const { upstream, gw } = await setup(t)
  const { post } = await twoTeams(gw.url)
  const previousA = (await (await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const body = { model: 'gpt-4o', input: 'hi' }
  const forgeries: Array<[string, unknown, string]> = [
    [`/v1/responses?previous.response.id=${previousA}`, body, 'previous.response.id'],
    [`/v1/responses?previous%20response_id=${previousA}`, body, 'previous response_id'],
    [`/v1/responses?previous+response.id=${previousA}`, body, 'previous response.id'],
    [`/v1/responses?previous[response_id=${previousA}`, body, 'previous[response_id'],
    [`/v1/responses?%20previous.response_id=${previousA}`, body, ' previous.response_id'],
    ['/v1/conversations?gateway.owner=team-full', {}, 'gateway.owner']
  ]
  await assertForgeriesRefused(t, upstream, post, forgeries)
  // A name PHP keeps as an array (previous[x]=) is the array `previous`, which the API has no key of: passed on.
  t.equal((await post(KEYS.other, '/v1/responses?previous[response_id]=x', body)).status, 200, 'an array named otherwise is passed on')
})

/** A response of each team's, and an item of B's in its conversation: ids for paths of B's own calls. */
async function pathIdsOfB (post: Awaited<ReturnType<typeof twoTeams>>['post'], conversationB: string) {
  const responseA = (await (await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const responseB = (await (await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const itemB = (await (await post(KEYS.other, `/v1/conversations/${conversationB}/items`, { items: [{ type: 'message', role: 'user', content: 'x' }] })).json() as { data: Array<{ id: string }> }).data[0]!.id
  return { responseA, responseB, itemB }
}

/** Each [method, target, param] sent by B (a POST with an empty items list): 400 unknown_parameter naming param. */
async function assertTargetsRefused (t: Test, url: string, targets: Array<[string, string, string]>) {
  for (const [method, target, param] of targets) {
    const res = await fetch(`${url}${target}`, {
      method, headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }, body: method === 'POST' ? '{"items":[]}' : undefined
    })
    t.equal(res.status, 400, `${method} ${target}: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', param } }, `${method} ${target}: names ${param}`)
  }
}

t.test('an id the path carries, named again in the query of a POST or DELETE (?conversation_id=<A\'s>) or in its body, is refused and never sent upstream', async t => {
  // Laravel's $request->conversation_id reads the query (and the body) before the route's own parameter: to such an
  // upstream, B's delete of its own conversation with ?conversation_id=<A's> deletes A's.
  const { upstream, gw } = await setup(t)
  const { post, conversationA, itemA, conversationB } = await twoTeams(gw.url)
  const { responseA, responseB, itemB } = await pathIdsOfB(post, conversationB)
  const forgeries: Array<[string, string, string]> = [
    ['DELETE', `/v1/conversations/${conversationB}?conversation_id=${conversationA}`, 'conversation_id'],
    ['DELETE', `/v1/conversations/${conversationB}/items/${itemB}?item_id=${itemA}`, 'item_id'],
    ['DELETE', `/v1/conversations/${conversationB}/items/${itemB}?Conversation.Id=${conversationA}`, 'Conversation.Id'],
    ['DELETE', `/v1/responses/${responseB}?[response_id]=${responseA}`, '[response_id]'],
    ['POST', `/v1/responses/${responseB}/cancel?response.id=${responseA}`, 'response.id'],
    ['POST', `/v1/conversations/${conversationB}?conversation_id=${conversationA}`, 'conversation_id'],
    ['POST', `/v1/conversations/${conversationB}/items?conversation_id=${conversationA}`, 'conversation_id']
  ]
  const before = upstream.requests.length
  await assertTargetsRefused(t, gw.url, forgeries)
  // The same read from a JSON body, which Laravel's input holds too (and reads first).
  const inBody: Array<[string, unknown]> = [
    [`/v1/conversations/${conversationB}`, { metadata: { a: 'b' }, conversation_id: conversationA }],
    [`/v1/conversations/${conversationB}/items`, { conversation_id: conversationA, items: [{ type: 'message', role: 'user', content: 'x' }] }]
  ]
  for (const [target, body] of inBody) {
    const res = await post(KEYS.other, target, body)
    t.equal(res.status, 400, `POST ${target} with conversation_id in its body: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', param: 'conversation_id' } })
  }
  t.same(upstream.requests.slice(before), [], 'nothing of them went upstream')
})

t.test('on a route with an id in its path, a query name or body key a framework reads as that id (conversation, item, response, id) is refused and never sent upstream', async t => {
  // Laravel's resource routes name their parameters for the resource (`{conversation}`, `{item}`, `{response}`), or
  // `{id}`, and $request->conversation reads the input (a JSON body, the query) before the route's parameter: to such
  // an upstream, B's update of its own conversation with `"conversation": "<A's>"` updates A's.
  const { upstream, gw } = await setup(t)
  const { post, conversationA, itemA, conversationB } = await twoTeams(gw.url)
  const { responseA, responseB, itemB } = await pathIdsOfB(post, conversationB)
  const inQuery: Array<[string, string, string]> = [
    ['DELETE', `/v1/conversations/${conversationB}?conversation=${conversationA}`, 'conversation'],
    ['DELETE', `/v1/conversations/${conversationB}?id=${conversationA}`, 'id'],
    ['DELETE', `/v1/conversations/${conversationB}/items/${itemB}?item=${itemA}`, 'item'],
    ['DELETE', `/v1/conversations/${conversationB}/items/${itemB}?ID=${itemA}`, 'ID'],
    ['DELETE', `/v1/responses/${responseB}?response=${responseA}`, 'response'],
    ['DELETE', `/v1/responses/${responseB}?responseId=${responseA}`, 'responseId'],
    ['POST', `/v1/responses/${responseB}/cancel?[id]=${responseA}`, '[id]'],
    ['POST', `/v1/conversations/${conversationB}?Conversation=${conversationA}`, 'Conversation'],
    ['POST', `/v1/conversations/${conversationB}/items?.conversation=${conversationA}`, '.conversation']
  ]
  const before = upstream.requests.length
  await assertTargetsRefused(t, gw.url, inQuery)
  const items = [{ type: 'message', role: 'user', content: 'x' }]
  const inBody: Array<[string, unknown, string]> = [
    [`/v1/conversations/${conversationB}`, { metadata: { a: 'b' }, conversation: conversationA }, 'conversation'],
    [`/v1/conversations/${conversationB}`, { id: conversationA, metadata: { a: 'b' } }, 'id'],
    [`/v1/conversations/${conversationB}/items`, { conversation: conversationA, items }, 'conversation'],
    [`/v1/conversations/${conversationB}/items`, { items, conversationId: conversationA }, 'conversationId']
  ]
  for (const [target, body, param] of inBody) {
    const res = await post(KEYS.other, target, body)
    t.equal(res.status, 400, `POST ${target} with ${param} in its body: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', param } })
  }
  t.same(upstream.requests.slice(before), [], 'nothing of them went upstream')
  // A route with no id in its path takes them as the API does: a create's conversation.
  t.equal((await post(KEYS.other, '/v1/responses', { model: 'gpt-4o', input: 'hi', conversation: conversationB })).status, 200, 'a create in the team\'s own conversation is passed on')
})

t.test('a checked key in a POST\'s query bracketed as Rack 2 reads it ([conversation], ]conversation, previous_response_id]) is refused and never sent upstream', async t => {
  // Rack before 3.0 (Rails 6 and 7.0) skips brackets before a parameter's name and after it: `[conversation]=` is
  // `conversation` to it, and Rails merges the query into a JSON body's params.
  const { upstream, gw } = await setup(t)
  const { post, conversationA } = await twoTeams(gw.url)
  const previousA = (await (await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const body = { model: 'gpt-4o', input: 'hi' }
  const forgeries: Array<[string, unknown, string]> = [
    [`/v1/responses?[conversation]=${conversationA}`, body, '[conversation]'],
    [`/v1/responses?%5D%5Dconversation=${conversationA}`, body, ']]conversation'],
    [`/v1/responses?previous_response_id%5D=${previousA}`, body, 'previous_response_id]'],
    [`/v1/responses?[[conversation]][id]=${conversationA}`, body, '[[conversation]][id]'],
    ['/v1/conversations?]metadata[gateway_owner]=team-full', {}, ']metadata[gateway_owner]']
  ]
  await assertForgeriesRefused(t, upstream, post, forgeries)
})

t.test('a checked key or a path\'s id in a POST\'s query after a leading dot, as qs reads it with allowDots (.conversation), is refused and never sent upstream', async t => {
  // qs (Express's extended query parser, NestJS) with allowDots reads `.conversation=` as `conversation`: to an
  // upstream that merges the query into the body, B's response would go on in A's conversation.
  const { upstream, gw } = await setup(t)
  const { post, conversationA, conversationB } = await twoTeams(gw.url)
  const previousA = (await (await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const body = { model: 'gpt-4o', input: 'hi' }
  const forgeries: Array<[string, unknown, string]> = [
    [`/v1/responses?.conversation=${conversationA}`, body, '.conversation'],
    [`/v1/responses?.conversation.id=${conversationA}`, body, '.conversation.id'],
    [`/v1/responses?.previous_response_id=${previousA}`, body, '.previous_response_id'],
    ['/v1/conversations?.metadata.gateway_owner=team-full', {}, '.metadata.gateway_owner'],
    [`/v1/conversations/${conversationB}?.conversation_id=${conversationA}`, { metadata: { a: 'b' } }, '.conversation_id']
  ]
  await assertForgeriesRefused(t, upstream, post, forgeries)
})

t.test('a checked key spelled with a Turkish i (ı, İ), which Go\'s case-blind reader folds to i, is refused and never sent upstream', async t => {
  // Go's encoding/json matches a key to a field when unicode.ToUpper(unicode.ToLower(r)) agree rune by rune:
  // U+0131 (ı) upper-cases to I and U+0130 (İ) lower-cases to i, so "conversatıon" is the conversation to it.
  // JavaScript's toLowerCase leaves ı alone and makes İ two characters: the gateway saw no such key.
  const { upstream, gw } = await setup(t)
  const { post, conversationA, itemA, conversationB } = await twoTeams(gw.url)
  const previousA = (await (await post(KEYS.full, '/v1/responses', { model: 'gpt-4o', input: 'hi' })).json() as { id: string }).id
  const itemsOfB = `/v1/conversations/${conversationB}/items`
  const forgeries: Array<[string, unknown, string]> = [
    ['/v1/responses', { model: 'gpt-4o', input: 'hi', 'conversat\u0131on': conversationA }, 'conversat\u0131on'],
    ['/v1/responses', { model: 'gpt-4o', input: 'hi', 'conversat\u0130on': conversationA }, 'conversat\u0130on'],
    ['/v1/responses', { model: 'gpt-4o', input: 'hi', 'prev\u0131ous_response_id': previousA }, 'prev\u0131ous_response_id'],
    ['/v1/responses', { model: 'gpt-4o', input: 'hi', conversation: { id: conversationB, '\u0131d': conversationA } }, 'conversation.\u0131d'],
    ['/v1/responses', { model: 'gpt-4o', conversation: conversationB, input: 'hi', '\u0131nput': [{ type: 'item_reference', id: itemA }] }, '\u0131nput'],
    [itemsOfB, { items: [], '\u0130tems': [{ type: 'item_reference', id: itemA }] }, '\u0130tems']
  ]
  await assertForgeriesRefused(t, upstream, post, forgeries)
})

t.test('a response larger than a megabyte is still its owner\'s on a replica that has to look it up: retrieved and continued, not a 502', async t => {
  // A response object holds its whole output (an image generation's base64, a long answer): the owner lookup
  // reads it whole, and must not refuse what the gateway itself passes on.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const one = await gateway(t, upstream)
  const two = await gateway(t, upstream, {})
  const big = 'word '.repeat(300_000)
  const made = await one.sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: big })
  t.ok(JSON.stringify(made).length > 1024 * 1024, 'the response object is over a megabyte')
  const again = await two.sdk(KEYS.full).responses.retrieve(made.id)
  t.equal(again.id, made.id, 'the owner retrieves it through a replica that never saw it')
  t.equal((again.metadata as Record<string, string> | null)?.gateway_owner, undefined, 'without the owner key')
  const next = await two.sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'more', previous_response_id: made.id })
  t.equal(next.previous_response_id, made.id, 'and continues it there')
  const e = await rejection(two.sdk(KEYS.other).responses.retrieve(made.id))
  t.type(e, OpenAI.NotFoundError, 'another team still gets 404')
})

t.test('an upstream that does not keep the owner in metadata: the creator is told the same by every replica, and the operators are told why', async t => {
  // A reseller that drops metadata on create: the owner the gateway wrote is not in the object. The object's
  // metadata is what every replica reads, so the replica that made it must not serve it as the creator's from
  // its cache (for up to cacheTtlMs) while every other replica refuses it.
  const keepsNoMetadata = createConversationsHandler({ apiKey: UPSTREAM_TOKEN })
  const upstream = await startUpstream({
    conversations: (req, res, body) => {
      const parsed = body.length > 0 ? JSON.parse(body.toString()) as Record<string, unknown> : undefined
      if (req.method === 'POST' && parsed !== undefined) delete parsed.metadata
      keepsNoMetadata(req, res, parsed === undefined ? body : Buffer.from(JSON.stringify(parsed)))
    }
  })
  t.teardown(() => upstream.close())
  const one = await gateway(t, upstream)
  const two = await gateway(t, upstream)

  const conv = await one.sdk(KEYS.full).conversations.create({})
  const onOne = await one.sdk(KEYS.full).conversations.retrieve(conv.id).then(() => 200, (e: { status: number }) => e.status)
  const onTwo = await two.sdk(KEYS.full).conversations.retrieve(conv.id).then(() => 200, (e: { status: number }) => e.status)
  t.equal(onOne, onTwo, 'the replica that created it answers as the other does')
  t.equal(onTwo, 404, 'an unowned conversation (ownership.unowned: deny)')
  t.match(one.gw.logs.join('\n'), /"level":40.*did not keep the owner/, 'a warning says the upstream lost the owner')
})

t.test('two teams sending one Idempotency-Key send two keys upstream; one team\'s retries send the same one', async t => {
  const { upstream, gw } = await setup(t)
  const create = (key: string) => fetch(`${gw.url}/v1/conversations`, {
    method: 'POST', body: '{}',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', 'idempotency-key': 'create-1' }
  })
  for (const key of [KEYS.full, KEYS.full, KEYS.other]) t.equal((await create(key)).status, 200)
  const sent = upstream.requests.filter(r => r.method === 'POST').map(r => r.headers['idempotency-key'])
  t.equal(sent.length, 3)
  t.equal(sent[0], sent[1], 'a retry by the same team carries the same key')
  t.not(sent[2], sent[0], 'another team\'s same key is another key upstream')
  t.notOk(sent.includes('create-1'), 'no team\'s key goes upstream as it is')
})

t.test('two teams giving one end user or prompt cache key give two upstream; one team gives the same one each time', async t => {
  // OpenAI blocks an end user by the safety_identifier its abuse came with, and routes by prompt_cache_key to where a
  // prompt's prefix is cached: in the one account all teams share, team B sending abuse under team A's identifiers (a
  // guessable user_123, the same hash of one email) would get A's users blocked, and B sending A's cache key with a
  // guessed prompt could read from its own cached_tokens whether A sent it.
  const { upstream, sdk, gw } = await setup(t)
  const create = (key: string) => sdk(key).responses.create({
    model: 'gpt-4o-mini', input: 'hi', safety_identifier: 'user_1', user: 'end-user-1', prompt_cache_key: 'support-bot'
  })
  for (const key of [KEYS.full, KEYS.full, KEYS.other]) await create(key)
  const names = ['safety_identifier', 'user', 'prompt_cache_key'] as const
  const sent = upstream.requests.filter(r => r.method === 'POST').map(r => JSON.parse(r.body.toString()) as Record<typeof names[number], string>)
  t.equal(sent.length, 3)
  t.same(sent[0], sent[1], 'the same team\'s names are the same upstream each time')
  for (const name of names) {
    t.not(sent[2]![name], sent[0]![name], `another team's ${name} is another upstream`)
    for (const s of sent) t.match(s[name], /^[0-9a-f]{64}$/, `${name}: a digest, within OpenAI's 64 characters`)
  }
  // Spelled so that only an upstream blind to case reads it, or in the query string of a POST: refused, not passed on
  // as it came.
  const raw = (path: string, body: string) => fetch(`${gw.url}${path}`, {
    method: 'POST', body, headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }
  })
  for (const [path, body] of [
    ['/v1/responses', '{"model":"gpt-4o-mini","input":"hi","Safety_Identifier":"user_1"}'],
    ['/v1/responses', '{"model":"gpt-4o-mini","input":"hi","USER":"end-user-1"}'],
    ['/v1/responses', '{"model":"gpt-4o-mini","input":"hi","prompt_cache_Key":"support-bot"}'],
    ['/v1/responses?safety_identifier=user_1', '{"model":"gpt-4o-mini","input":"hi"}']
  ]) {
    const res = await raw(path!, body!)
    t.equal(res.status, 400, `${path} ${body}`)
    t.equal((await res.json() as { error?: { code: string } }).error?.code, 'unknown_parameter')
  }
  t.equal(upstream.requests.filter(r => r.method === 'POST').length, 3, 'none of those went upstream')
})

t.test('a create answered with an object another team owns (an upstream replaying answers) is a 502, and does not make it the caller\'s', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const theirs = await createUpstream(upstream, { gateway_owner: 'team-full' })
  const { gw, sdk } = await gateway(t, upstream)
  const replayed = await fetch(`${upstream.url}/v1/conversations/${theirs}`, { headers: { authorization: `Bearer ${UPSTREAM_TOKEN}` } })
  const body = await replayed.text()
  upstream.respond = (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' }).end(body) // every create answered with A's object
  }
  const res = await fetch(`${gw.url}/v1/conversations`, {
    method: 'POST', body: '{}', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' }
  })
  t.equal(res.status, 502)
  const text = await res.text()
  t.match(JSON.parse(text), { error: { code: 'upstream_unavailable' } })
  t.notMatch(text, theirs, 'nothing of A\'s conversation reaches B')

  upstream.respond = null
  const b = sdk(KEYS.other)
  await assertNotFound(t, await rejection(b.conversations.retrieve(theirs)), 'B after the create', theirs)
  await assertNotFound(t, await rejection(b.conversations.update(theirs, { metadata: {} })), 'B updating it', theirs)
  const upstreamView = await fetch(`${upstream.url}/v1/conversations/${theirs}`, { headers: { authorization: `Bearer ${UPSTREAM_TOKEN}` } })
  t.match(await upstreamView.json(), { metadata: { gateway_owner: 'team-full' } }, 'A still owns it upstream')
  t.match(gw.audit()[0], { action: 'conversation.create', status: 502, outcome: 'upstream_error' })
})

t.test('a call on an object of the caller\'s answered with another team\'s (an upstream or relay mixing answers up) is a 502: nothing of it reaches the caller', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const b = sdk(KEYS.other)
  // B's objects, as the upstream holds them (what a mixed-up answer would carry)
  const theirConversation = await b.conversations.create({ metadata: { secret: 'theirs' } })
  const theirResponse = await b.responses.create({ model: 'gpt-4o', input: 'their secret', background: true })
  const read = async (path: string) => await (await fetch(`${upstream.url}${path}`, { headers: { authorization: `Bearer ${UPSTREAM_TOKEN}` } })).text()
  const conversationJson = await read(`/v1/conversations/${theirConversation.id}`)
  const responseJson = await read(`/v1/responses/${theirResponse.id}`)
  const responseEvent = `event: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":1,"response":${responseJson}}\n\n`

  const a = sdk(KEYS.full)
  const conv = await a.conversations.create({})
  const item = (await a.conversations.items.create(conv.id, { items: [{ type: 'message', role: 'user', content: 'hi' }] })).data[0]!
  const mine = await a.responses.create({ model: 'gpt-4o', input: 'mine', background: true })
  // Every owner is cached now: what follows goes upstream once, and is answered with B's object.
  upstream.respond = (req, res) => {
    if (req.url!.includes('stream=true')) res.writeHead(200, { 'content-type': 'text/event-stream' }).end(responseEvent)
    else res.writeHead(200, { 'content-type': 'application/json' }).end(req.url!.startsWith('/v1/responses') ? responseJson : conversationJson)
  }
  const before = gw.audit().length
  for (const [label, call] of [
    ['conversation.retrieve', () => a.conversations.retrieve(conv.id)],
    ['conversation.update', () => a.conversations.update(conv.id, { metadata: { topic: 'x' } })],
    ['item.delete', () => a.conversations.items.delete(item.id!, { conversation_id: conv.id })],
    ['response.retrieve', () => a.responses.retrieve(mine.id)],
    ['response.cancel', () => a.responses.cancel(mine.id)]
  ] as const) {
    const e = await rejection(call())
    t.match(e, { status: 502, error: { code: 'upstream_unavailable' } }, `${label}: 502`)
    t.notMatch(JSON.stringify(e), /theirs|their secret|team-other/, `${label}: nothing of B's object`)
  }
  const events: string[] = []
  const streamed = await rejection((async () => {
    for await (const event of await a.responses.retrieve(mine.id, { stream: true })) events.push(JSON.stringify(event))
  })())
  t.same(events, [], 'a streamed retrieve passes on none of B\'s response')
  t.match(streamed, { error: { code: 'upstream_unavailable' } }, 'and is broken off with an error event')
  await until('the audit records', () => gw.audit().length === before + 6)
  t.same(gw.audit().slice(before).map(r => [r.action, r.outcome]), [
    ['conversation.retrieve', 'upstream_error'], ['conversation.update', 'upstream_error'], ['item.delete', 'upstream_error'],
    ['response.retrieve', 'upstream_error'], ['response.cancel', 'upstream_error'], ['response.retrieve', 'upstream_error']
  ])
})

t.test('a lookup answered 400 or 422 (an id the upstream refuses) is a 404 remembered as a missing one, not a 502 to retry', async t => {
  for (const status of [400, 422]) {
    await t.test(`a lookup answered ${status}`, async t => {
      const upstream = await startUpstream()
      t.teardown(() => upstream.close())
      const { gw, sdk } = await gateway(t, upstream)
      upstream.respond = (_req, res) => {
        res.writeHead(status, { 'content-type': 'application/json' })
          .end('{"error":{"message":"Invalid \'conversation_id\': \'abc\'. Expected an ID that begins with \'conv\'.","type":"invalid_request_error","param":null,"code":null}}')
      }
      const client = sdk(KEYS.full)
      await assertNotFound(t, await rejection(client.conversations.items.list('abc')), 'first call', 'abc')
      await assertNotFound(t, await rejection(client.conversations.retrieve('abc')), 'second call', 'abc')
      t.same(calls(upstream.requests), ['GET /v1/conversations/abc'], 'one lookup, remembered; the calls themselves never went upstream')
      await new Promise(resolve => setTimeout(resolve, 20))
      t.match(gw.audit(), [{ status: 404, outcome: 'invalid' }, { status: 404, outcome: 'invalid' }])
      t.notMatch(gw.logs.join('\n'), /ownership lookup failed/, 'not logged as a failure')
    })
  }
})

t.test('the shared account\'s 429 on a lookup is the client\'s 429 with the upstream\'s retry hints, audited upstream_rate_limited, and not remembered', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full' })
  const { gw } = await gateway(t, upstream)
  upstream.respond = (_req, res) => {
    res.writeHead(429, {
      'content-type': 'application/json', 'retry-after': '7', 'retry-after-ms': '6500', 'x-should-retry': 'false',
      'x-ratelimit-remaining-requests': '0', 'x-ratelimit-reset-requests': `6s ${UPSTREAM_TOKEN}`, 'set-cookie': 'a=b'
    }).end(`{"error":{"message":"Rate limit reached for ${UPSTREAM_TOKEN}","type":"requests","param":null,"code":"rate_limit_exceeded"}}`)
  }
  const base = upstream.requests.length
  const res = await fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.equal(res.status, 429)
  t.equal(res.headers.get('retry-after'), '7')
  t.equal(res.headers.get('retry-after-ms'), '6500')
  t.equal(res.headers.get('x-should-retry'), 'false', 'the SDKs obey it: an upstream that says not to retry is not called again')
  t.equal(res.headers.get('x-ratelimit-remaining-requests'), '0')
  t.equal(res.headers.get('x-ratelimit-reset-requests'), '6s [redacted]', 'searched for the token')
  t.equal(res.headers.get('set-cookie'), null, 'nothing else of the upstream\'s headers')
  const body = await res.text()
  t.match(JSON.parse(body), { error: { type: 'requests', code: 'rate_limit_exceeded', param: null } })
  t.notMatch(body, UPSTREAM_TOKEN, 'the upstream\'s body is not passed on')
  t.same(calls(upstream.requests.slice(base)), [`GET /v1/conversations/${conv}`], 'only the lookup went upstream')
  await new Promise(resolve => setTimeout(resolve, 20))
  t.match(gw.audit(), [{ status: 429, outcome: 'upstream_rate_limited' }])

  // A wait over a minute (a quota reset in an hour): not to be slept through by the SDK, whatever the upstream says.
  upstream.respond = faults.status(429, { 'retry-after': '3600', 'x-should-retry': 'true' })
  const long = await fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.equal(long.status, 429)
  t.equal(long.headers.get('retry-after'), '3600')
  t.equal(long.headers.get('x-should-retry'), 'false', 'the SDKs raise it at once')

  upstream.respond = null // the fake OhMyGPT again
  const again = await fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.equal(again.status, 200, 'the next call looks up again and is served')
})

t.test('a lookup\'s 429 gives the client the retry hints a 429 passed on gives, for a retry-after written twice or one the Connection header names', async t => {
  // A retry-after written twice (two lines) came as an array and was dropped from the lookup's 429, while its wait
  // still made x-should-retry false; a passed-on 429 keeps both lines. One the Connection header names was the other
  // way round: dropped, but still read for x-should-retry, on both.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const [cached, uncached] = [await createUpstream(upstream, { gateway_owner: 'team-full' }), await createUpstream(upstream, { gateway_owner: 'team-full' })]
  const { gw } = await gateway(t, upstream)
  const items = (conv: string) => fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.equal((await items(cached)).status, 200, 'its owner is cached: its next call goes up as the call itself')
  const hints = (res: Response) => ({ status: res.status, ...Object.fromEntries(['retry-after', 'retry-after-ms', 'x-should-retry'].map(name => [name, res.headers.get(name)])) })
  for (const [label, headers, expected] of [
    ['retry-after twice', { 'retry-after': ['3600', '3600'] }, { 'retry-after': '3600, 3600', 'x-should-retry': 'false' }],
    ['retry-after for the hop only', { 'retry-after': '3600', connection: 'retry-after' }, { 'retry-after': null, 'x-should-retry': null }]
  ] as Array<[string, Record<string, string | string[]>, Record<string, string | null>]>) {
    upstream.respond = faults.status(429, headers)
    const base = upstream.requests.length
    const passedOn = hints(await items(cached))
    const lookup = hints(await items(uncached))
    t.same(calls(upstream.requests.slice(base)), [`GET /v1/conversations/${cached}/items`, `GET /v1/conversations/${uncached}`],
      `${label}: the first passed on, the second a lookup's`)
    t.match(passedOn, { status: 429, ...expected }, `${label}: passed on`)
    t.same(lookup, passedOn, `${label}: the lookup's the same`)
  }
})

t.test('a lookup answered 503 or 500 keeps the upstream\'s retry hints on its 502: the SDKs wait what the upstream asks, and not an hour', async t => {
  // The lookup's 502 carried none of them: the SDKs sent the call again twice within a second and a half to an
  // upstream that asked for seconds (or an hour, which a 503 passed on tells them not to wait out, x-should-retry).
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const [cached, uncached] = [await createUpstream(upstream, { gateway_owner: 'team-full' }), await createUpstream(upstream, { gateway_owner: 'team-full' })]
  // (a line that answers 502 and 503 is skipped after failureThreshold of them: not here, where every answer is asked for)
  const { gw } = await gateway(t, upstream, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 2000, failureThreshold: 100 } })
  const items = (conv: string) => fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.equal((await items(cached)).status, 200, 'its owner is cached: its next call goes up as the call itself')
  const hints = (res: Response) => Object.fromEntries(['retry-after', 'retry-after-ms', 'x-should-retry'].map(name => [name, res.headers.get(name)]))
  for (const [status, headers, expected] of [
    [503, { 'retry-after': '20' }, { 'retry-after': '20', 'retry-after-ms': null, 'x-should-retry': null }],
    [503, { 'retry-after': '3600' }, { 'retry-after': '3600', 'retry-after-ms': null, 'x-should-retry': 'false' }],
    [500, { 'retry-after-ms': '2500', 'x-should-retry': 'true' }, { 'retry-after': null, 'retry-after-ms': '2500', 'x-should-retry': 'true' }],
    [502, { 'retry-after': `${UPSTREAM_TOKEN}`, connection: 'x-should-retry', 'x-should-retry': 'false' }, { 'retry-after': '[redacted]', 'retry-after-ms': null, 'x-should-retry': null }]
  ] as Array<[number, Record<string, string>, Record<string, string | null>]>) {
    upstream.respond = faults.status(status, headers)
    const base = upstream.requests.length
    const passedOn = await items(cached)
    const lookup = await items(uncached)
    t.same(calls(upstream.requests.slice(base)), [`GET /v1/conversations/${cached}/items`, `GET /v1/conversations/${uncached}`],
      `${status}: the first passed on, the second a lookup's`)
    t.equal(lookup.status, 502, `${status}: the lookup's is the gateway's 502`)
    t.match(await lookup.json(), { error: { code: 'upstream_unavailable' } })
    t.same(hints(lookup), expected, `${status} ${JSON.stringify(headers)}: the lookup's 502 carries the hints`)
    t.same(hints(lookup), hints(passedOn), `${status}: as the answer passed on does`)
  }
})

t.test('a lookup answered 504 or 524 is a 504, and one answered 402 or 403 that status with the upstream\'s message, as the call passed on gets', async t => {
  // A 504/524 (a proxy's timeout) became the gateway's 502, and a 402 (the shared balance spent) or 403 (a region
  // refused) a 502 "could not be reached": the same call passed on says what the upstream said.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const [cached, uncached] = [await createUpstream(upstream, { gateway_owner: 'team-full' }), await createUpstream(upstream, { gateway_owner: 'team-full' })]
  const { gw } = await gateway(t, upstream, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 2000, failureThreshold: 100 } })
  const items = (conv: string) => fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.equal((await items(cached)).status, 200, 'its owner is cached: its next call goes up as the call itself')
  const refusal = (status: number, message: string, code: string): Responder => (_req, res) => {
    res.writeHead(status, { 'content-type': 'application/json', 'retry-after': '7' })
    res.end(JSON.stringify({ error: { message, type: 'invalid_request_error', param: null, code } }))
  }
  for (const status of [504, 524]) {
    upstream.respond = faults.status(status)
    const passedOn = await items(cached)
    const lookup = await items(uncached)
    t.equal(passedOn.status, status)
    t.equal(lookup.status, 504, `${status}: the lookup's is a 504, a timeout, not a 502`)
    t.match(await lookup.json(), { error: { code: 'upstream_timeout', type: 'server_error' } })
  }
  for (const [status, message, code] of [
    [402, 'Insufficient balance on the account.', 'insufficient_balance'],
    [403, 'Country, region, or territory not supported', 'unsupported_country_region_territory'],
    [403, `Key ${UPSTREAM_TOKEN} may not do this`, 'forbidden']
  ] as Array<[number, string, string]>) {
    upstream.respond = refusal(status, message, code)
    const passedOn = await items(cached)
    const lookup = await items(uncached)
    t.equal(passedOn.status, status)
    t.equal(lookup.status, status, `${status}: the lookup's answer has the upstream's status`)
    const body = await lookup.json() as { error: { message: string, code: string } }
    t.match(body, { error: { message: message.replace(UPSTREAM_TOKEN, '[redacted]'), code } }, `${status}: and its message`)
    t.notMatch(JSON.stringify(body), UPSTREAM_TOKEN)
    t.equal(lookup.headers.get('retry-after'), passedOn.headers.get('retry-after'), 'and its retry hints')
    t.match(gw.audit().at(-1), { status, outcome: 'upstream_error', attempts: 1 })
  }
})

t.test('an owned object\'s answer is read as JSON whatever its content-type says: the owner key never reaches the client, and what is not JSON is a readable 502', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full', topic: 't' })
  const { gw } = await gateway(t, upstream)
  const get = () => fetch(`${gw.url}/v1/conversations/${conv}`, { headers: { authorization: `Bearer ${KEYS.full}`, 'accept-encoding': 'identity' } })
  t.equal((await get()).status, 200, 'the owner is looked up and cached')
  const object = JSON.stringify({ id: conv, object: 'conversation', created_at: 1, metadata: { topic: 't', gateway_owner: 'team-full' } })
  for (const type of [undefined, 'text/plain', 'application/vnd.api+json']) {
    upstream.respond = (_req, res) => { res.writeHead(200, type === undefined ? {} : { 'content-type': type }).end(object) }
    const res = await get()
    const text = await res.text()
    t.equal(res.status, 200, `content-type ${type ?? 'none'}: served`)
    t.notMatch(text, /gateway_owner/, `content-type ${type ?? 'none'}: without the owner key`)
    t.same(JSON.parse(text).metadata, { topic: 't' }, `content-type ${type ?? 'none'}: the rest of the metadata as it was`)
  }
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'text/plain' }).end(`gateway_owner: team-full, ${conv}`) }
  const notJson = await get()
  t.equal(notJson.status, 502, 'not JSON: 502')
  t.match(await notJson.json(), { error: { code: 'upstream_unavailable' } })

  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip' }).end(gzipSync(object)) }
  const gzipped = await get()
  t.equal(gzipped.status, 200, 'compressed unasked in an encoding the gateway reads: decoded and served')
  t.equal(gzipped.headers.get('content-encoding'), null, 'sent decoded')
  t.same(JSON.parse(await gzipped.text()).metadata, { topic: 't' }, 'without the owner key')

  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'zstd', etag: '"x"' }).end('\x28\xb5\x2f\xfd') }
  const unreadable = await get()
  t.equal(unreadable.status, 502, 'an encoded answer the gateway cannot read: 502')
  t.equal(unreadable.headers.get('content-encoding'), null, 'the error does not claim the upstream\'s content-encoding')
  t.equal(unreadable.headers.get('etag'), null, 'nor its etag')
  t.match(await unreadable.json(), { error: { code: 'upstream_unavailable', type: 'server_error' } }, 'the envelope, readable as it is')

  // A gateway that has not looked the owner up yet (a replica, a restart) reads the lookup's answer as it reads
  // the object it passes on: compressed unasked, it is decoded, not a 502 on every first call.
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip' }).end(gzipSync(object)) }
  const replica = await gateway(t, upstream)
  const retrieved = await replica.sdk(KEYS.full).conversations.retrieve(conv)
  t.same(retrieved.metadata, { topic: 't' }, 'the owner retrieves it through a gateway that looked its owner up in a compressed answer')
  t.type(await rejection(replica.sdk(KEYS.other).conversations.retrieve(conv)), OpenAI.NotFoundError, 'another team still gets 404')
})

t.test('a conversation\'s id asked for on a response route, or a response\'s on a conversation route, does not hide it from its owner', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full' })
  const { gw, sdk } = await gateway(t, upstream)
  const asOther = await fetch(`${gw.url}/v1/responses/${conv}`, { headers: { authorization: `Bearer ${KEYS.other}` } })
  t.equal(asOther.status, 404, 'another team asks for it as a response: no such response')
  const mine = await sdk(KEYS.full).conversations.retrieve(conv)
  t.equal(mine.id, conv, 'its owner still gets the conversation')

  const response = await sdk(KEYS.full).responses.create({ model: 'gpt-4o-mini', input: 'hi' })
  const gw2 = await gateway(t, upstream)
  const asConversation = await fetch(`${gw2.gw.url}/v1/conversations/${response.id}`, { headers: { authorization: `Bearer ${KEYS.other}` } })
  t.equal(asConversation.status, 404, 'another team asks for a response as a conversation (on a gateway that has not seen it): 404')
  t.equal((await gw2.sdk(KEYS.full).responses.retrieve(response.id)).id, response.id, 'its owner still gets the response')
})

t.test('a caller that hangs up during a lookup shared with others does not fail theirs', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const conv = await createUpstream(upstream, { gateway_owner: 'team-full' })
  const { gw } = await gateway(t, upstream)
  let lookups = 0
  let lookupClosedEarly = false
  upstream.respond = (req, res) => {
    if (req.url === `/v1/conversations/${conv}`) {
      lookups++
      res.on('close', () => { if (!res.writableFinished) lookupClosedEarly = true })
      setTimeout(() => {
        res.writeHead(200, { 'content-type': 'application/json' })
          .end(JSON.stringify({ id: conv, object: 'conversation', created_at: 1, metadata: { gateway_owner: 'team-full' } }))
      }, 300)
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false}')
  }
  const items = (key: string, signal?: AbortSignal) =>
    fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${key}` }, signal })
  const leaver = new AbortController()
  const first = items(KEYS.other, leaver.signal).catch(() => 'gone')
  await new Promise(resolve => setTimeout(resolve, 50))
  const second = items(KEYS.full)
  await new Promise(resolve => setTimeout(resolve, 100))
  leaver.abort()
  t.equal(await first, 'gone', 'the first caller hung up during the lookup')
  const res = await second
  t.equal(res.status, 200, 'the owner, waiting on the same lookup, is served')
  t.match(await res.json(), { object: 'list' })
  t.equal(lookups, 1, 'one lookup for both')
  t.equal(lookupClosedEarly, false, 'the lookup was not stopped while a caller still waited on it')

  // When every caller goes, the lookup is stopped.
  const upstream2 = await startUpstream()
  t.teardown(() => upstream2.close())
  const conv2 = await createUpstream(upstream2, { gateway_owner: 'team-full' })
  const other = await gateway(t, upstream2)
  let stopped = false
  upstream2.respond = (_req, res) => { res.on('close', () => { if (!res.writableFinished) stopped = true }) }
  const alone = new AbortController()
  const call = fetch(`${other.gw.url}/v1/conversations/${conv2}`, { headers: { authorization: `Bearer ${KEYS.full}` }, signal: alone.signal }).catch(() => 'gone')
  await new Promise(resolve => setTimeout(resolve, 100))
  alone.abort()
  t.equal(await call, 'gone')
  for (let i = 0; i < 100 && !stopped; i++) await new Promise(resolve => setTimeout(resolve, 10))
  t.ok(stopped, 'the lookup no one waits on any more is stopped')
})
