// End to end with the official OpenAI Python SDK (openai 3.x, in .venv-python-sdk/): each test starts the fake
// upstream and a listening gateway, runs one scenario of test/fixtures/python/sdk_scenarios.py against it, and
// checks what the SDK got (its JSON report), what the upstream saw and what the audit file says.
// Python's DELETE sends Content-Type: application/json with no body, which once got 400 (issue 7).
import t, { type Test } from 'tap'
import { keyDigest } from '../src/keys.js'
import { until } from './fixtures/client.js'
import { KEYS, startGateway, testConfig } from './fixtures/gateway.js'
import { LIFECYCLE_AUDIT, LIFECYCLE_UPSTREAM_CALLS } from './fixtures/lifecycle.js'
import { pythonSdk, runScenario, SCENARIO_TIMEOUT_MS, SETUP_TIMEOUT_MS, VENV, type SdkError, type Step } from './fixtures/python-sdk.js'
import { createConversationsHandler } from '../src/demo/fake-ohmygpt.js'
import { startUpstream, UPSTREAM_TOKEN } from './fixtures/upstream.js'

// The venv may have to be created first (see test/fixtures/python-sdk.ts); then a scenario a test, eight at most.
t.setTimeout(SETUP_TIMEOUT_MS + 8 * SCENARIO_TIMEOUT_MS)

const WRONG_KEY = 'ogw_not-a-real-key'

async function setup (t: Test) {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, {
    clients: [
      { id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write', 'delete'] },
      { id: 'team-reader', keySha256: keyDigest(KEYS.reader), scopes: ['read'] },
      // One token a minute after a burst of 3: the fourth call is refused however slowly Python runs.
      { id: 'team-limited', keySha256: keyDigest(KEYS.limited), scopes: ['read', 'write', 'delete'], rateLimit: { requestsPerMinute: 1, burst: 3 } }
    ]
  }))
  const run = (scenario: string) => runScenario(scenario, {
    gatewayUrl: gw.url,
    keys: { KEY_FULL: KEYS.full, KEY_READER: KEYS.reader, KEY_LIMITED: KEYS.limited }
  })
  /** the upstream's requests as "METHOD path?query", with the given ids named */
  const seen = (names: Record<string, string>) => upstream.requests.map(r => {
    let line = `${r.method} ${r.url}`
    for (const [name, id] of Object.entries(names)) line = line.replaceAll(id, name)
    return line
  })
  return { upstream, gw, run, seen }
}

function result (step: Step): any {
  if (step.error !== undefined) throw new Error(`${step.step} raised ${step.error.class} ${step.error.statusCode}: ${step.error.message}`)
  return step.result
}

function raised (step: Step): SdkError {
  if (step.error === undefined) throw new Error(`${step.step} succeeded where an error was expected`)
  return step.error
}

t.test('the openai Python SDK 3.x is set up in .venv-python-sdk', async t => {
  t.match(await pythonSdk(), /^3\.\d+\.\d+/, `openai 3.x in ${VENV}`)
})

t.test('all eight operations round-trip with the Python SDK, its body-less DELETEs included', async t => {
  const { upstream, gw, run, seen } = await setup(t)
  const out = await run('operations')
  t.match(out.sdk, /^3\./)

  const created = result(out.step('conversations.create'))
  t.match(created, { object: 'conversation', metadata: { topic: 'python' } })
  t.match(created.id, /^conv_/)
  const conv: string = created.id
  const added = result(out.step('items.create'))
  t.equal(added.data.length, 2)
  const [first, second] = added.data.map((i: { id: string }) => i.id) as [string, string]
  t.same(result(out.step('items.list')).items.map((i: { id: string }) => i.id), [second, first], 'newest first by default')
  t.match(result(out.step('items.retrieve')), { id: first, type: 'message', content: [{ type: 'input_text', text: 'hello' }] })
  t.match(result(out.step('items.delete')), { id: conv, object: 'conversation' }, 'items.delete answers the conversation')
  t.same(result(out.step('items.list after delete')).items.map((i: { id: string }) => i.id), [second], 'the item is gone upstream')
  t.same(result(out.step('conversations.update')).metadata, { topic: 'changed' })
  t.same(result(out.step('conversations.retrieve')).metadata, { topic: 'changed' })
  t.same(result(out.step('conversations.delete')), { id: conv, object: 'conversation.deleted', deleted: true })

  // The gateway's ownership lookup finds no such conversation and answers 404 itself.
  const gone = raised(out.step('conversations.retrieve deleted'))
  t.match(gone, { class: 'openai.NotFoundError', statusCode: 404, type: 'invalid_request_error', code: 'conversation_not_found', param: 'conversation_id' })
  t.match(gone.message, /Conversation with id '[^']+' not found\./, "OpenAI's words for a missing conversation")

  t.same(out.sent.filter(s => s.method === 'DELETE').map(s => [s.contentType, s.bodyBytes]),
    [['application/json', 0], ['application/json', 0]], 'the SDK sent both DELETEs as JSON with no body')

  t.same(seen({ ':c': conv, ':i': first }), LIFECYCLE_UPSTREAM_CALLS, 'the upstream saw exactly the calls, in order')
  for (const r of upstream.requests.filter(r => r.method === 'DELETE')) {
    t.equal(r.headers['content-type'], undefined, `${r.url}: no content-type upstream`)
    t.equal(r.headers['content-length'], undefined, `${r.url}: no content-length upstream`)
    t.equal(r.body.length, 0, `${r.url}: no body upstream`)
  }
  for (const r of upstream.requests) t.equal(r.headers.authorization, `Bearer ${UPSTREAM_TOKEN}`, `${r.method} ${r.url}: the upstream token`)
  t.notOk(upstream.everything().includes(KEYS.full), 'the client key never reached the upstream')

  const records = gw.audit()
  t.same(records.map(r => [r.action, r.method, r.status, r.outcome]), LIFECYCLE_AUDIT, 'one audit record per call')
  for (const r of records) {
    t.equal(r.clientId, 'team-full')
    t.equal(r.conversationId, conv, `${r.action} names the conversation`)
    t.match(r.userAgent, /^OpenAI\/Python 3\./, `${r.action}: the Python SDK's user agent`)
  }
  t.same(records.filter(r => r.method === 'DELETE').map(r => r.bytesIn), [0, 0], 'the DELETEs are audited with bytesIn 0')
  t.equal(records.find(r => r.action === 'item.delete')?.itemId, first)
})

t.test('the Python SDK pages through items with limit and after, and auto-pagination stops at has_more false', async t => {
  const { gw, run, seen } = await setup(t)
  const out = await run('pagination')
  const conv: string = result(out.step('conversations.create')).id
  const texts = (items: Array<{ text: string }>) => items.map(i => i.text)

  const page1 = result(out.step('page 1 asc'))
  t.same(texts(page1.items), ['m1', 'm2'])
  t.match(page1, { hasMore: true, hasNextPage: true, lastId: page1.items[1].id })
  const page2 = result(out.step('page 2 asc'))
  t.same(texts(page2.items), ['m3', 'm4'], '`after` starts the page after the given item')
  t.match(page2, { hasMore: true, lastId: page2.items[1].id })

  const asc = result(out.step('auto-paginate asc')) as Array<{ id: string, text: string }>
  t.same(texts(asc), ['m1', 'm2', 'm3', 'm4', 'm5'], 'every item once, oldest first')
  const desc = result(out.step('auto-paginate default order')) as Array<{ id: string, text: string }>
  t.same(texts(desc), ['m5', 'm4', 'm3', 'm2', 'm1'], 'every item once, newest first by default')

  const id = Object.fromEntries(asc.map(i => [`:${i.text}`, i.id]))
  const items = `GET /v1/conversations/:c/items`
  t.same(seen({ ':c': conv, ...id }), [
    'POST /v1/conversations',
    `${items}?limit=2&order=asc`,
    `${items}?after=:m2&limit=2&order=asc`,
    `${items}?limit=2&order=asc`,
    `${items}?limit=2&order=asc&after=:m2`,
    `${items}?limit=2&order=asc&after=:m4`,
    `${items}?limit=2`,
    `${items}?limit=2&after=:m4`,
    `${items}?limit=2&after=:m2`
  ], 'each query reached the upstream as the SDK wrote it; auto-pagination took three pages for five items')
  t.same(gw.audit().map(r => [r.action, r.status, r.outcome]),
    [['conversation.create', 200, 'ok'], ...Array(8).fill(['item.list', 200, 'ok'])])
})

t.test('the Python SDK reads items with include, and generates a response into its own conversation only', async t => {
  const { gw, run, seen } = await setup(t)
  const out = await run('responses')
  const conv: string = result(out.step('conversations.create')).id
  const listed = result(out.step('items.list include'))
  t.match(listed, { hasMore: false, items: [{ text: 'hi' }] })
  const hi: string = listed.items[0].id
  t.match(result(out.step('items.retrieve include')), { id: hi, type: 'message' })

  const response = result(out.step('responses.create in conversation'))
  t.match(response, { object: 'response', status: 'completed', conversation: { id: conv }, output: [{ type: 'message', role: 'assistant' }] })
  t.notOk(JSON.stringify(response).includes('gateway_owner'), 'the answer carries no owner key')
  t.same((result(out.step('items.list after the response')) as Array<{ text: string }>).map(i => i.text), ['hi', 'Hello', 'Echo: Hello'],
    'the input and the answer were added to the conversation')

  const refused = raised(out.step('other team: responses.create in conversation'))
  // (param names the field the SDK sent, `conversation`: a pattern, since a string would also match `conversation_id`)
  t.match(refused, { class: 'openai.NotFoundError', statusCode: 404, code: 'conversation_not_found', param: /^conversation$/ })
  // OpenAI's answer to a previous_response_id it cannot find: 400, BadRequestError, with the sync and the async client.
  for (const name of ['other team: responses.create previous_response_id', 'other team, async client: responses.create previous_response_id']) {
    t.match(raised(out.step(name)), { class: 'openai.BadRequestError', statusCode: 400, code: 'previous_response_not_found', type: 'invalid_request_error', param: 'previous_response_id' }, name)
  }

  const include = 'include%5B%5D=message.output_text.logprobs'
  t.same(seen({ ':c': conv, ':hi': hi, ':r': response.id }), [
    'POST /v1/conversations',
    `GET /v1/conversations/:c/items?${include}&limit=1&order=asc`,
    `GET /v1/conversations/:c/items/:hi?${include}`,
    'POST /v1/responses',
    'GET /v1/conversations/:c/items?order=asc',
    'GET /v1/conversations/:c', // the other team's: the gateway's lookup, as a missing id costs; its response is not sent
    'GET /v1/responses/:r' // (and of the previous response, once: then cached)
  ], 'include reached the upstream as the SDK wrote it; the other team\'s response never went upstream')
  t.same(gw.audit().map(r => [r.clientId, r.action, r.status, r.outcome, r.conversationId]), [
    ['team-full', 'conversation.create', 200, 'ok', conv],
    ['team-full', 'item.list', 200, 'ok', conv],
    ['team-full', 'item.retrieve', 200, 'ok', conv],
    ['team-full', 'response.create', 200, 'ok', conv],
    ['team-full', 'item.list', 200, 'ok', conv],
    ['team-limited', 'response.create', 404, 'denied', conv],
    ['team-limited', 'response.create', 400, 'denied', null],
    ['team-limited', 'response.create', 400, 'denied', null]
  ])
})

t.test('the Python SDK passes a reasoning model\'s output back as it came: served to its team, refused to another', async t => {
  const { upstream, run } = await setup(t)
  const out = await run('reasoning')
  const first = result(out.step('responses.create'))
  t.match(first, { output: [{ type: 'reasoning', id: /^rs_/ }, { type: 'message' }] }, 'the answer starts with a reasoning item')
  t.match(result(out.step('responses.create with the output passed back')), { status: 'completed' }, 'the output passed back is served')
  const sent = JSON.parse(upstream.requests[1]!.body.toString()) as { input: Array<{ type?: string, id?: string }> }
  t.same(sent.input.filter(i => i.type === 'reasoning').map(i => i.id), [first.output[0].id], 'with its reasoning item, by id')
  t.match(raised(out.step('other team: the same output passed back')),
    { class: 'openai.BadRequestError', statusCode: 400, code: 'item_reference_not_allowed', param: 'input' })
  t.equal(upstream.requests.length, 2, 'the other team\'s call never went upstream')
})

t.test('the Python SDK raises its typed errors for refused calls, which never reach the upstream', async t => {
  const { upstream, gw, run, seen } = await setup(t)
  const out = await run('errors')
  const conv: string = result(out.step('full: conversations.create')).id
  const item: string = result(out.step('full: items.list')).items[0].id
  const limitedConv: string = result(out.step('limited: conversations.create')).id

  t.test('a wrong key: AuthenticationError, 401 invalid_api_key', async t => {
    for (const name of ['wrong key: conversations.retrieve', 'wrong key: conversations.delete']) {
      const e = raised(out.step(name))
      t.match(e, { class: 'openai.AuthenticationError', statusCode: 401, code: 'invalid_api_key', type: 'invalid_request_error', param: null }, name)
      t.same(Object.keys(e.body as object), ['message', 'type', 'param', 'code'], `${name}: OpenAI's error body`)
      t.match(e.headers['x-gateway-request-id'], /^gw_[0-9a-f]{32}$/)
    }
  })

  t.test('another team\'s conversation: NotFoundError, as if it did not exist', async t => {
    const e = raised(out.step('reader: conversations.retrieve'))
    t.match(e, { class: 'openai.NotFoundError', statusCode: 404, code: 'conversation_not_found', type: 'invalid_request_error', param: 'conversation_id' })
  })

  t.test('a read-only key deleting: PermissionDeniedError, 403 insufficient_scope (the scope is checked before ownership)', async t => {
    for (const name of ['reader: items.delete', 'reader: conversations.delete']) {
      const e = raised(out.step(name))
      t.match(e, { class: 'openai.PermissionDeniedError', statusCode: 403, code: 'insufficient_scope', type: 'permission_error', param: null }, name)
      t.match(e.message, /"delete" scope/)
    }
  })

  t.test('a deleted conversation: NotFoundError from the gateway\'s lookup, remembered for the next call', async t => {
    t.same(result(out.step('full: conversations.delete')), { id: conv, object: 'conversation.deleted', deleted: true })
    for (const name of ['full: conversations.retrieve deleted', 'full: items.delete in deleted']) {
      const e = raised(out.step(name))
      t.match(e, { class: 'openai.NotFoundError', statusCode: 404, code: 'conversation_not_found', type: 'invalid_request_error', param: 'conversation_id' }, name)
      t.match(e.body, { message: /^Conversation with id '[^']+' not found\.$/ }, "OpenAI's own words")
    }
  })

  t.test("an upstream 400 reaches the SDK as BadRequestError with the upstream's param", async t => {
    const e = raised(out.step('full: items.list limit 0'))
    t.match(e, { class: 'openai.BadRequestError', statusCode: 400, type: 'invalid_request_error', param: 'limit' })
  })

  t.test('past its burst: RateLimitError, 429 rate_limit_exceeded', async t => {
    for (const n of [1, 2]) t.match(result(out.step(`limited: conversations.retrieve ${n}`)), { id: limitedConv })
    const e = raised(out.step('limited: conversations.retrieve past burst'))
    t.match(e, { class: 'openai.RateLimitError', statusCode: 429, code: 'rate_limit_exceeded', type: 'requests', param: null })
    t.ok(Number(e.headers['retry-after']) >= 1, 'retry-after in whole seconds')
    t.ok(Number(e.headers['retry-after-ms']) > 0, 'and retry-after-ms, which the SDK prefers')
    t.equal(e.headers['x-ratelimit-remaining-requests'], '0')
    t.equal(e.headers['x-ratelimit-limit-requests'], '1')
  })

  t.same(seen({ ':c': conv, ':i': item, ':l': limitedConv }), [
    'POST /v1/conversations',
    'GET /v1/conversations/:c/items',
    'GET /v1/conversations/:c/items?limit=0',
    'GET /v1/conversations/:c', // the reader's: the gateway's lookup, as a missing id costs
    'DELETE /v1/conversations/:c',
    'GET /v1/conversations/:c', // the gateway's lookup, which finds nothing; the item delete after it is not sent
    'POST /v1/conversations',
    'GET /v1/conversations/:l',
    'GET /v1/conversations/:l'
  ], 'the upstream saw the accepted calls only')
  const everything = upstream.everything()
  for (const [name, key] of [['full', KEYS.full], ['reader', KEYS.reader], ['limited', KEYS.limited], ['wrong', WRONG_KEY]]) {
    t.notOk(everything.includes(key!), `the ${name} key never reached the upstream`)
  }
  t.same(gw.audit().map(r => [r.clientId, r.action, r.status, r.outcome]), [
    ['team-full', 'conversation.create', 200, 'ok'],
    ['team-full', 'item.list', 200, 'ok'],
    ['team-full', 'item.list', 400, 'ok'],
    [null, 'conversation.retrieve', 401, 'denied'],
    [null, 'conversation.delete', 401, 'denied'],
    ['team-reader', 'conversation.retrieve', 404, 'denied'],
    ['team-reader', 'item.delete', 403, 'denied'],
    ['team-reader', 'conversation.delete', 403, 'denied'],
    ['team-full', 'conversation.delete', 200, 'ok'],
    ['team-full', 'conversation.retrieve', 404, 'invalid'],
    ['team-full', 'item.delete', 404, 'invalid'],
    ['team-limited', 'conversation.create', 200, 'ok'],
    ['team-limited', 'conversation.retrieve', 200, 'ok'],
    ['team-limited', 'conversation.retrieve', 200, 'ok'],
    ['team-limited', 'conversation.retrieve', 429, 'rate_limited']
  ], 'one audit record per call, refusals included')
})

t.test('items added while the upstream breaks their answer off after its status: the Python SDK, retrying on its own, sends them once', async t => {
  const conversations = createConversationsHandler({ apiKey: UPSTREAM_TOKEN })
  const upstream = await startUpstream({ conversations })
  t.teardown(() => upstream.close())
  upstream.respond = (req, res, body) => {
    if (req.method !== 'POST' || !/\/items$/.test(req.url ?? '')) return conversations(req, res, body)
    // The items are added upstream, and the answer saying so breaks off half-way (chunked, no length).
    res.writeHead(200, { 'content-type': 'application/json', 'x-request-id': 'req_broken' })
    res.write('{"object":"list","data":[{"id":"msg_1","type":"message"')
    setTimeout(() => res.socket?.destroy(), 50)
  }
  const gw = await startGateway(t, testConfig(upstream.url))
  const out = await runScenario('broken_answer', { gatewayUrl: gw.url, keys: { KEY_FULL: KEYS.full } })

  t.equal(upstream.requests.filter(r => r.method === 'POST' && r.url.endsWith('/items')).length, 1,
    'the upstream got the items once: neither the gateway nor the SDK sent them again')
  t.match(raised(out.step('items.create')), { class: 'openai.InternalServerError', statusCode: 502, code: 'upstream_unavailable', headers: { 'x-should-retry': 'false' } },
    'the SDK raised the gateway\'s 502, which told it not to send the call again')
  t.same(gw.audit().filter(r => r.action === 'item.create').map(r => [r.status, r.outcome, r.attempts]), [[502, 'upstream_error', 1]],
    'one audit record for the one call')
})

// The charset as it is mostly written, and in RFC 2231's form (`charset*=`, `charset*0=`), which Python's email
// parser (httpx's, so the Python SDK's) reads as well.
for (const [errorType, itemsType] of [
  ['application/json; charset=utf-7', 'text/plain; charset="UTF-7"'],
  ["application/json; charset*=utf-8''utf-7", 'text/plain; charset*0=utf; charset*1=-7']
]) {
t.test(`answers the upstream labels with a charset other than UTF-8 (${errorType}) never give the Python SDK the token, which decodes by it`, async t => {
  // In UTF-7, `+AHM-` is `s`: bytes with no token in them as UTF-8, which the gateway searches, read as the token by
  // a client that decodes them as their Content-Type says (the Python SDK: an error's text, an answer not JSON).
  const conversations = createConversationsHandler({ apiKey: UPSTREAM_TOKEN })
  const upstream = await startUpstream({ conversations })
  t.teardown(() => upstream.close())
  const utf7 = `+AHM-${UPSTREAM_TOKEN.slice(1)}`
  upstream.respond = (req, res, body) => {
    if (req.method === 'GET') {
      res.writeHead(400, { 'content-type': errorType })
      res.end(`{"error":{"message":"Bad key ${utf7}","type":"invalid_request_error","param":null,"code":null}}`)
    } else if (/\/items$/.test(req.url ?? '')) {
      res.writeHead(200, { 'content-type': itemsType })
      res.end(`added with ${utf7}`)
    } else {
      conversations(req, res, body)
    }
  }
  const gw = await startGateway(t, testConfig(upstream.url))
  const out = await runScenario('charset_answers', { gatewayUrl: gw.url, keys: { KEY_FULL: KEYS.full } })

  t.notOk(JSON.stringify(out.steps).includes(UPSTREAM_TOKEN.slice(3)), 'nothing the SDK returned or raised holds the token')
  t.match(raised(out.step('conversations.retrieve')), { class: 'openai.BadRequestError', statusCode: 400, code: 'upstream_error', type: 'invalid_request_error' },
    'the upstream\'s 400, in the gateway\'s envelope')
  t.match(raised(out.step('items.create')), { class: 'openai.InternalServerError', statusCode: 502, code: 'upstream_unavailable', headers: { 'x-should-retry': 'false' } },
    'items added, answered in a charset the gateway cannot search: a 502 that says not to send them again')
})
}

t.test('a stream whose events carry ids, with a blank line of its own between them (a keep-alive comment and its blank line), is read to its end by the Python SDK', async t => {
  // The Python SDK keeps the last event id and dispatches, at any blank line after it, an event of no data, which
  // it parses as JSON (JSONDecodeError: the rest of the stream is lost). The JS SDK and the SSE spec dispatch none.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const event = (id: number, data: object) => `id: ${id}\nevent: ${(data as { type: string }).type}\ndata: ${JSON.stringify(data)}\n\n`
  const response = { id: 'resp_1', object: 'response', created_at: 1, model: 'gpt-4o-mini', status: 'in_progress', output: [] }
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(event(1, { type: 'response.created', sequence_number: 0, response }) +
      ': keep-alive\n\n' + '\r\n' +
      event(2, { type: 'response.completed', sequence_number: 1, response: { ...response, status: 'completed', usage: { input_tokens: 2, output_tokens: 1, total_tokens: 3 } } }))
  }
  const gw = await startGateway(t, testConfig(upstream.url))
  const out = await runScenario('stream_events', { gatewayUrl: gw.url, keys: { KEY_FULL: KEYS.full } })
  const streamed = out.step('responses.create stream')
  t.equal(streamed.error, undefined, `no error (got ${JSON.stringify(streamed.error)})`)
  t.same(streamed.result, ['response.created', 'response.completed'], 'every event, in order')
  t.match(gw.audit().filter(r => r.action === 'response.create'), [{ status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 1 }])
})

// A relay that sends nothing until the model's first event, or a comment of its own at once and then nothing (OpenRouter's
// ': OPENROUTER PROCESSING'): the gateway's comments go on until an event has gone out, not only until any bytes have.
for (const [how, opening] of [['nothing before it', null], ['a comment of the upstream\'s before it', ': PROCESSING\n\n']] as const) {
  t.test(`a stream whose first event comes after the Python SDK's read timeout, with ${how}, is read to its end, and generated once: the gateway sends comments meanwhile`, async t => {
    // The SDK says its read timeout (X-Stainless-Read-Timeout) and gives up on a read that waits longer, then sends the
    // create again, twice; OpenAI sends the answer's headers and first events at once, a relay may send nothing until
    // the model has its first event.
    const upstream = await startUpstream()
    t.teardown(() => upstream.close())
    const response = { id: 'resp_1', object: 'response', created_at: 1, model: 'gpt-4o-mini', status: 'in_progress', output: [] }
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      if (opening === null) res.flushHeaders()
      else res.write(opening)
      setTimeout(() => {
        res.end(`event: response.created\ndata: ${JSON.stringify({ type: 'response.created', sequence_number: 0, response })}\n\n` +
          `event: response.completed\ndata: ${JSON.stringify({ type: 'response.completed', sequence_number: 1, response: { ...response, status: 'completed', usage: { input_tokens: 2, output_tokens: 1, total_tokens: 3 } } })}\n\n`)
      }, 2500)
    }
    const gw = await startGateway(t, testConfig(upstream.url))
    const out = await runScenario('slow_first_event', { gatewayUrl: gw.url, keys: { KEY_FULL: KEYS.full } })
    const streamed = out.step('responses.create stream')
    t.equal(streamed.error, undefined, `no error (got ${JSON.stringify(streamed.error)})`)
    t.same(streamed.result, ['response.created', 'response.completed'], 'every event, in order')
    t.equal(upstream.requests.length, 1, 'one generation upstream')
    t.match(gw.audit().filter(r => r.action === 'response.create'), [{ status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 1 }])
  })
}

t.test('a stream whose upstream holds its connection open after the last event: the Python SDK\'s loop ends at that event, and the upstream is let go of', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const response = { id: 'resp_1', object: 'response', created_at: 1, model: 'gpt-4o-mini', status: 'in_progress', output: [] }
  let closed: 'by the gateway' | 'by the upstream' | null = null
  upstream.respond = (_req, res) => {
    res.on('close', () => { closed = res.writableEnded ? 'by the upstream' : 'by the gateway' })
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(`event: response.created\ndata: ${JSON.stringify({ type: 'response.created', sequence_number: 0, response })}\n\n` +
      `event: response.completed\ndata: ${JSON.stringify({ type: 'response.completed', sequence_number: 1, response: { ...response, status: 'completed', usage: { input_tokens: 2, output_tokens: 1, total_tokens: 3 } } })}\n\n`)
    // (held open, as a relay may; ended by the upstream itself only after a while, so that a loop that waits on it
    // ends too, and the test says so instead of running into its timeout)
    setTimeout(() => res.end(), 5000).unref()
  }
  const gw = await startGateway(t, testConfig(upstream.url))
  const out = await runScenario('stream_events', { gatewayUrl: gw.url, keys: { KEY_FULL: KEYS.full } })
  const streamed = out.step('responses.create stream')
  t.equal(streamed.error, undefined, `no error (got ${JSON.stringify(streamed.error)})`)
  t.same(streamed.result, ['response.created', 'response.completed'], 'every event, in order')
  await until('the upstream\'s stream to close', () => closed !== null)
  t.equal(closed, 'by the gateway', 'the gateway closed the upstream\'s stream after its last event: the loop did not wait for the upstream to end it')
  t.match(gw.audit().filter(r => r.action === 'response.create'), [{ status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 1 }])
})
