// Responses through the gateway: the official SDK against a listening gateway and the fake upstream's Responses
// mode, which streams Server-Sent Events with a pause between events and reports deterministic usage
// (input tokens = words in, output tokens = words out, "Echo:" included).
import t, { type Test } from 'tap'
import OpenAI from 'openai'
import { keyDigest } from '../src/keys.js'
import { sleep, until } from './fixtures/client.js'
import { KEYS, METRICS_TOKEN, startGateway, testConfig, type TestGateway } from './fixtures/gateway.js'
import { startRedis } from './fixtures/redis-server.js'
import { closedPort, faults, startUpstream, UPSTREAM_TOKEN, type FakeUpstream } from './fixtures/upstream.js'
import { buildRequest, sendRaw } from './fixtures/raw-http.js'
import type { ResponsesOptions } from '../src/demo/fake-responses.js'

interface Setup {
  upstream: FakeUpstream
  gw: TestGateway
  sdk: (key: string) => OpenAI
  /** how each stream the fake served ended, and how many events it had sent */
  streamEnds: Array<{ how: 'finished' | 'closed' | 'released', sent: number, at: number }>
}

/** `streaming`: the pause between streamed events, or how the fake streams (see ResponsesOptions) */
async function setup (t: Test, overrides: Record<string, unknown> = {}, streaming: number | ResponsesOptions = 0): Promise<Setup> {
  const streamEnds: Setup['streamEnds'] = []
  const responses = typeof streaming === 'number' ? { streamDelayMs: streaming } : streaming
  const upstream = await startUpstream({ responses: { ...responses, onStreamEnd: (how, sent) => { streamEnds.push({ how, sent, at: Date.now() }) } } })
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, overrides))
  return { upstream, gw, streamEnds, sdk: key => new OpenAI({ apiKey: key, baseURL: `${gw.url}/v1`, maxRetries: 0 }) }
}

/** The first event of the hostile streams below: a response created. */
const CREATED_EVENT = 'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"m","output":[]}}\n\n'

/** A streamed create read to its end with the SDK: the event types seen, and what it threw (null if nothing). */
async function streamedCreate (client: OpenAI, signal?: AbortSignal): Promise<{ seen: string[], err: unknown }> {
  const seen: string[] = []
  const err = await (async () => {
    const stream = await client.responses.create({ model: 'gpt-4o', input: 'hi', stream: true }, signal === undefined ? {} : { signal })
    for await (const event of stream) seen.push(event.type)
  })().then(() => null, (e: unknown) => e)
  return { seen, err }
}

const rejection = (p: Promise<unknown>) => p.then(() => { throw new Error('expected a rejection') }, (e: unknown) => e)

function upstreamCalls (upstream: FakeUpstream, from = 0): string[] {
  return upstream.requests.slice(from).map(r => `${r.method} ${r.url.replace(/(resp|conv)_[0-9a-f]+/g, '$1_x')}`)
}

t.test('create, retrieve, list input items and delete a response in a conversation, with the SDK', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const conv = await a.conversations.create({ metadata: { topic: 'chat' } })
  const response = await a.responses.create({ model: 'gpt-4o-mini', input: 'hello there', conversation: conv.id, metadata: { run: '1' } })
  t.equal(response.output_text, 'Echo: hello there')
  t.same(response.metadata, { run: '1' }, 'the owner key is not in the answer')
  t.same(response.usage, { input_tokens: 2, output_tokens: 3, total_tokens: 5 })
  const sent = JSON.parse(upstream.requests.at(-1)!.body.toString()) as { metadata: Record<string, string> }
  t.same(sent.metadata, { run: '1', gateway_owner: 'team-full' }, 'upstream, the response carries its owner')

  const items = await a.conversations.items.list(conv.id)
  t.equal(items.data.length, 2, 'the exchange went into the conversation')
  const retrieved = await a.responses.retrieve(response.id)
  t.same(retrieved.metadata, { run: '1' })
  const inputItems = await a.responses.inputItems.list(response.id)
  t.match(inputItems.data, [{ type: 'message', role: 'user' }])
  await a.responses.delete(response.id)
  t.type(await rejection(a.responses.retrieve(response.id)), OpenAI.NotFoundError, 'gone')

  const records = gw.audit().filter(r => r.action.startsWith('response.'))
  t.same(records.map(r => [r.action, r.status, r.outcome]), [
    ['response.create', 200, 'ok'], ['response.retrieve', 200, 'ok'], ['response.input_items', 200, 'ok'],
    ['response.delete', 200, 'ok'], ['response.retrieve', 404, 'invalid']
  ])
  t.match(records[0], { responseId: response.id, model: 'gpt-4o-mini', stream: false, inputTokens: 2, outputTokens: 3, ownerId: 'team-full', conversationId: conv.id },
    'the create names the conversation it wrote into (audit query --conversation finds it)')
  t.match(records[1], { responseId: response.id, model: 'gpt-4o-mini', stream: false, inputTokens: 2, outputTokens: 3 })
  t.ok(records.every(r => r.responseId === response.id), 'every record names the response')
})

t.test('a delete answered 200 with no body (OpenAI documents its success so), or 204, is done for the SDK: not a 502 it sends again', async t => {
  // The SDKs take a delete's answer as void (Accept: */*): the gateway read it as JSON, 502 on an empty one, and
  // the SDK sent the DELETE twice more, to be told the response it had deleted was not found.
  const { upstream, gw, sdk } = await setup(t)
  const a = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 2 })
  for (const [label, answer] of [
    ['200, no body', (res: import('node:http').ServerResponse) => { res.writeHead(200, { 'content-length': '0' }).end() }],
    ['200 JSON, no body', (res: import('node:http').ServerResponse) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': '0' }).end() }],
    ['204', (res: import('node:http').ServerResponse) => { res.writeHead(204).end() }]
  ] as const) {
    const response = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'hi' })
    const before = upstream.requests.length
    upstream.respond = (_req, res) => { answer(res) }
    const { response: raw } = await a.responses.delete(response.id).withResponse()
    upstream.respond = null
    t.equal(raw.status, label === '204' ? 204 : 200, `${label}: passed on`)
    t.same(upstreamCalls(upstream, before), ['DELETE /v1/responses/resp_x'], `${label}: sent once`)
    t.match(gw.audit().at(-1), { action: 'response.delete', status: raw.status, outcome: 'ok', responseId: response.id })
  }
})

t.test('a response\'s input items are passed on as they stream, as a conversation\'s items are: a listing past 16 MiB is not a 502', async t => {
  // (Read whole as JSON, for usage a listing never holds, it was bound by what an answer read whole may be.)
  const { upstream, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const response = await a.responses.create({ model: 'gpt-4o', input: 'hi' })
  const big = 'x'.repeat(17 * 1024 * 1024)
  upstream.respond = (_req, res) => {
    const body = JSON.stringify({ object: 'list', data: [{ id: 'msg_1', type: 'message', role: 'user', content: [{ type: 'input_text', text: big }] }], first_id: 'msg_1', last_id: 'msg_1', has_more: false })
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body)
  }
  const listed = await a.responses.inputItems.list(response.id)
  t.equal((listed.data[0] as { content: Array<{ text: string }> }).content[0]!.text.length, big.length, 'the whole listing came')
})

t.test('a streamed response reaches the client event by event, before the upstream has finished', async t => {
  const { gw, sdk, streamEnds } = await setup(t, {}, 80)
  const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'one two three four', stream: true })
  const events: Array<{ type: string, at: number, text: string }> = []
  for await (const event of stream) events.push({ type: event.type, at: Date.now(), text: JSON.stringify(event) })
  t.equal(events[0]!.type, 'response.created')
  t.equal(events.at(-1)!.type, 'response.completed')
  t.equal(events.filter(e => e.type === 'response.output_text.delta').length, 5)
  t.equal(streamEnds.length, 1)
  t.ok(events[0]!.at < streamEnds[0]!.at - 300, `the first event arrived ${streamEnds[0]!.at - events[0]!.at} ms before the upstream finished`)
  t.notOk(events.some(e => e.text.includes('gateway_owner')), 'no event carries the owner key')
  const completed = JSON.parse(events.at(-1)!.text) as { response: { usage: { total_tokens: number }, id: string } }
  t.equal(completed.response.usage.total_tokens, 4 + 5)
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', stream: true, inputTokens: 4, outputTokens: 5, responseId: completed.response.id, outcome: 'ok' })
  const retrieved = await sdk(KEYS.full).responses.retrieve(completed.response.id)
  t.equal(retrieved.output_text, 'Echo: one two three four', 'the streamed response is owned and can be retrieved')
})

t.test('every SSE framing (data over several lines, CR or CRLF line ends) is rewritten: the owner key never reaches the client, wherever it is, and usage is charged', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const response = (status: string, usage: unknown) => ({
    id: 'resp_framing', object: 'response', status, model: 'gpt-4o', output: [], usage,
    metadata: { gateway_owner: 'team-full', topic: 't' }
  })
  const events = [
    { type: 'response.created', sequence_number: 0, response: response('in_progress', null) },
    { type: 'response.output_item.done', sequence_number: 1, output_index: 0, item: { id: 'msg_1', type: 'message', role: 'assistant', status: 'completed', content: [], metadata: { gateway_owner: 'team-full' } } },
    { type: 'response.completed', sequence_number: 2, response: response('completed', { input_tokens: 3, output_tokens: 7, total_tokens: 10 }) }
  ]
  const framings: Array<[string, (event: object) => string]> = [
    ['data over several lines', e => `event: ${(e as { type: string }).type}\n` + JSON.stringify(e, null, 2).split('\n').map(l => `data: ${l}`).join('\n') + '\n\n'],
    ['CR line ends', e => `event: ${(e as { type: string }).type}\rdata: ${JSON.stringify(e)}\r\r`],
    ['CRLF line ends', e => `event: ${(e as { type: string }).type}\r\ndata: ${JSON.stringify(e)}\r\n\r\n`]
  ]
  for (const [what, frame] of framings) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      // in small pieces, so that line ends and events fall across chunks
      const text = events.map(frame).join('')
      let at = 0
      const next = () => {
        if (at >= text.length) { res.end(); return }
        res.write(text.slice(at, at + 7))
        at += 7
        setImmediate(next)
      }
      next()
    }
    const before = gw.audit().length
    const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'x', stream: true })
    const seen: string[] = []
    for await (const event of stream) seen.push(JSON.stringify(event))
    t.same(seen.map(e => (JSON.parse(e) as { type: string }).type), events.map(e => e.type), `${what}: every event, in order`)
    t.notOk(seen.some(e => e.includes('gateway_owner')), `${what}: no event carries the owner key`)
    t.match(JSON.parse(seen[2]!), { response: { metadata: { topic: 't' }, usage: { total_tokens: 10 } } }, `${what}: the rest as sent`)
    await until(`${what}: the audit record`, () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { responseId: 'resp_framing', inputTokens: 3, outputTokens: 7 }, `${what}: usage seen`)
  }
})

t.test('an answer or event the gateway takes the owner key out of keeps every number as the upstream wrote it', async t => {
  const { upstream, gw } = await setup(t)
  // What the SDKs of other languages (Python's json, Go's json.Number) read exactly: a tool schema's enum past 2^53.
  const numbers = '[9007199254740993,12345678901234567891,1.0000000000000001,-0.5,42]'
  const tools = `[{"type":"function","name":"pick","parameters":{"type":"object","properties":{"id":{"type":"integer","enum":${numbers}}}}}]`
  const response = (status: string) =>
    `{"id":"resp_numbers","object":"response","status":"${status}","model":"gpt-4o","output":[],"tools":${tools},` +
    '"usage":{"input_tokens":1,"output_tokens":1,"total_tokens":2},"metadata":{"gateway_owner":"team-full","topic":"t"}}'
  const post = (body: object) => fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: JSON.stringify(body)
  })

  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(response('completed')) }
  const answer = await (await post({ model: 'gpt-4o', input: 'x' })).text()
  t.notMatch(answer, /gateway_owner/, 'the owner key is taken out of the answer')
  t.match(answer, `"enum":${numbers}`, 'and its numbers are as the upstream wrote them')

  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(`event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":${response('in_progress')}}\n\n` +
      `event: response.completed\ndata: {"type":"response.completed","sequence_number":1,"response":${response('completed')}}\n\n`)
  }
  const events = await (await post({ model: 'gpt-4o', input: 'x', stream: true })).text()
  t.notMatch(events, /gateway_owner/, 'the owner key is taken out of every event')
  t.equal(events.split(`"enum":${numbers}`).length, 3, 'and both events keep their numbers as the upstream wrote them')
})

t.test('generationTimeoutMs applies between events of a streamed generation, not to the whole stream', async t => {
  const upstream = await startUpstream({ responses: { streamDelayMs: 200 } })
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, generationTimeoutMs: 500 } })
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const started = Date.now()
  const stream = await client.responses.create({ model: 'gpt-4o', input: 'a b c d e f', stream: true })
  let count = 0
  for await (const _event of stream) count++
  t.equal(count, 14, 'every event came')
  t.ok(Date.now() - started > 2000, 'over 2 s in all, four times generationTimeoutMs, with 200 ms between events')
})

t.test('a streamed retrieve waits on the model as a streamed create does: a silence past bodyTimeoutMs, within generationTimeoutMs, does not cut it', async t => {
  const upstream = await startUpstream({ responses: {} })
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, bodyTimeoutMs: 300, generationTimeoutMs: 5000 } })
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const created = await client.responses.create({ model: 'gpt-4o', input: 'hi' })
  const event = (n: number, type: string, status: string) => `event: ${type}\ndata: ${JSON.stringify({
    type, sequence_number: n, response: { id: created.id, object: 'response', status, model: 'gpt-4o', output: [], metadata: { gateway_owner: 'team-full' } }
  })}\n\n`
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(event(0, 'response.in_progress', 'in_progress'))
    setTimeout(() => { res.end(event(1, 'response.completed', 'completed')) }, 2500) // the model at work, quiet (undici's body timer is coarse: well past bodyTimeoutMs)
  }
  const stream = await client.responses.retrieve(created.id, { stream: true })
  const types: string[] = []
  for await (const e of stream) types.push(e.type)
  t.same(types, ['response.in_progress', 'response.completed'], 'every event came, after a silence of eight times bodyTimeoutMs')
  t.match(upstream.requests.at(-1), { method: 'GET', url: `/v1/responses/${created.id}?stream=true` })
})

/** A non-streamed generation whose upstream sends its headers at once and its answer `afterMs` later. */
function headersFirst (afterMs: number, answer: string) {
  return (_req: unknown, res: import('node:http').ServerResponse) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write(' ') // (JSON allows whitespace before the value: an upstream keeping its connection alive)
    setTimeout(() => { if (!res.destroyed) res.end(answer) }, afterMs)
  }
}

const SLOW_ANSWER = JSON.stringify({
  id: 'resp_slow', object: 'response', status: 'completed', model: 'gpt-4o', output: [],
  usage: { input_tokens: 1, output_tokens: 2, total_tokens: 3 }, metadata: { gateway_owner: 'team-full' }
})

t.test('a non-streamed generation whose upstream sends its headers first waits generationTimeoutMs for the answer, not timeoutMs', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, timeoutMs: 200, generationTimeoutMs: 5000 } })
  upstream.respond = headersFirst(800, SLOW_ANSWER)
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const response = await client.responses.create({ model: 'gpt-4o', input: 'a long think' })
  t.equal(response.id, 'resp_slow', 'the answer came, four times timeoutMs after its headers')
  t.same(response.metadata, {})
  t.match(gw.audit().at(-1), { status: 200, outcome: 'ok', inputTokens: 1, outputTokens: 2 })
})

/** A streamed generation whose upstream sends its headers at once, then does `then` with its connection. */
function eventStreamThen (then: (res: import('node:http').ServerResponse) => void, afterMs = 50) {
  return (_req: unknown, res: import('node:http').ServerResponse) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.flushHeaders()
    setTimeout(() => { then(res) }, afterMs)
  }
}

/** A relay that answers at once and sends the model's events only when the model has them, `ms` later. */
function eventsAfter (ms: number) {
  const completed = 'event: response.completed\ndata: {"type":"response.completed","sequence_number":1,"response":{"id":"resp_1",' +
    '"object":"response","status":"completed","model":"m","output":[],"usage":{"input_tokens":2,"output_tokens":3,"total_tokens":5}}}\n\n'
  return { events: CREATED_EVENT + completed, respond: eventStreamThen(res => { res.end(CREATED_EVENT + completed) }, ms) }
}

t.test('a generation answered but not read whole in time, or not as JSON, or a streamed one that fails before its first event, is not sent again by the SDK (x-should-retry: false): the model has done the work', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, timeoutMs: 200, generationTimeoutMs: 300, failureThreshold: 100 } })
  // The SDK's defaults: two retries of a 5xx, quickly.
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1` })
  for (const [respond, status, code, stream] of [
    [headersFirst(1500, SLOW_ANSWER), 504, 'upstream_timeout', false],
    [headersFirst(0, 'not JSON'), 502, 'upstream_unavailable', false],
    // (nothing of a stream has gone out before its first event: it is answered as these are, not as a 200 whose only
    // event is the error)
    [eventStreamThen(() => {}), 504, 'upstream_timeout', true], // silent past generationTimeoutMs
    [eventStreamThen(res => { res.socket?.destroy() }), 502, 'upstream_unavailable', true] // broken off
  ] as const) {
    upstream.respond = respond
    const before = upstream.requests.length
    const err = await rejection(client.responses.create({ model: 'gpt-4o', input: 'once', stream }))
    t.match(err, { status, error: { code } })
    t.equal((err as { headers?: Headers }).headers?.get('x-should-retry'), 'false')
    t.equal(upstream.requests.length - before, 1, `${status}: one SDK call, one generation upstream`)
    await until('the audit record', () => gw.audit().length === upstream.requests.length)
    t.match(gw.audit().at(-1), { status, outcome: 'upstream_error', stream })
  }
})

/**
 * A streamed create, read to its end with the SDK (`maxRetries`, the call's `options`: the wait it states), whose
 * upstream sends its events `thinkMs` after its headers: the event types read, the call's audit record, the upstream
 * and the events' bytes. The generation's own deadline is the default, minutes.
 */
async function streamAfterThinking (t: Test, thinkMs: number, options: OpenAI.RequestOptions, maxRetries?: number) {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const { events, respond } = eventsAfter(thinkMs)
  upstream.respond = respond
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, ...(maxRetries === undefined ? {} : { maxRetries }) })
  const seen: string[] = []
  const stream = await client.responses.create({ model: 'gpt-4o', input: 'a think', stream: true }, options)
  for await (const event of stream) seen.push(event.type)
  await until('the audit record', () => gw.audit().length === 1)
  return { seen, record: gw.audit()[0]!, upstream, events }
}

t.test('a streamed generation whose first event is later than the SDK says it waits is served, and sent upstream once: the gateway keeps the client waiting with comments', async t => {
  // A relay that answers at once and sends the model's first event only when the model has one: 2.5 s here, past the
  // second the SDK waits for the answer's headers (OpenAI's own come at once). The SDK's defaults (two retries of a
  // timeout, a POST included), and a call's own timeout, which it sends.
  const { seen, record, upstream } = await streamAfterThinking(t, 2500, { timeout: 1000 })
  t.same(seen, ['response.created', 'response.completed'], 'every event, not the SDK\'s timeout error')
  t.equal(upstream.requests.length, 1, 'one SDK call, one generation upstream')
  t.match(record, { status: 200, outcome: 'ok', stream: true, responseId: 'resp_1', outputTokens: 3 })
})

t.test('a client that says it waits longer than a timer can count (a Python SDK timeout of 1e7 s) gets the stream\'s events alone, no comment lines every millisecond', async t => {
  const warnings: string[] = []
  const onWarning = (w: Error) => { warnings.push(w.name) }
  process.on('warning', onWarning)
  t.teardown(() => { process.off('warning', onWarning) })
  // A model that thinks a little before its first event (well within any wait the client states); the header the
  // Python SDK sends for timeout=1e7: over 2^31 ms, which Node's timers take for 1 ms.
  const { seen, record, events } = await streamAfterThinking(t, 300, { headers: { 'X-Stainless-Read-Timeout': '10000000.0' } }, 0)
  t.same(seen, ['response.created', 'response.completed'])
  t.match(record, { status: 200, outcome: 'ok', bytesOut: Buffer.byteLength(events) }, 'the events\' bytes, no comment before them')
  t.same(warnings.filter(w => w === 'TimeoutOverflowWarning'), [], 'no timer overflow (a warning on stderr each millisecond)')
})

t.test('a client that says it waits a tenth of a second gets a keep-alive comment four times a second at most, not one each few tens of milliseconds', async t => {
  // A model that thinks a second before its first event: far past the client's wait, which no generation can meet.
  const { seen, record, events } = await streamAfterThinking(t, 1000, { headers: { 'X-Stainless-Read-Timeout': '0.1' } }, 0)
  t.same(seen, ['response.created', 'response.completed'])
  const comments = (record.bytesOut as number - Buffer.byteLength(events)) / Buffer.byteLength(': keep-alive\n\n')
  // (the first within 50 ms, then one each 250 ms: five in that second, a few more on a slow machine; over twenty at
  // one each 45 ms, half the client's wait)
  t.ok(comments >= 1 && comments <= 12, `a few comments before the first event (${comments})`)
})

t.test('a client that hangs up mid-stream closes the upstream stream, and is audited aborted with the tokens seen so far', async t => {
  const { upstream, gw, sdk, streamEnds } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write', 'delete'], rateLimit: { tokensPerMinute: 1000 } }]
  }, 60)
  const controller = new AbortController()
  const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'w1 w2 w3 w4 w5 w6 w7 w8', stream: true }, { signal: controller.signal })
  let deltas = 0
  // The SDK ends the iteration quietly when its own signal aborts it.
  let abortedAt = 0
  for await (const event of stream) {
    if (event.type === 'response.output_text.delta' && ++deltas === 3) {
      abortedAt = performance.now()
      controller.abort()
    }
  }
  t.equal(deltas, 3, 'nothing more arrived after the hang-up')
  await until('the upstream to see its stream closed', () => streamEnds.length === 1, 3000)
  t.equal(streamEnds[0]!.how, 'closed', 'the upstream stream was cut, not finished')
  await until('the audit record', () => gw.audit().length === 1)
  const record = gw.audit()[0]!
  t.match(record, { action: 'response.create', outcome: 'aborted', stream: true, inputTokens: null })
  t.ok(record.outputTokens !== null && record.outputTokens >= 3 && record.outputTokens < 9, `the deltas seen so far (${record.outputTokens})`)
  const inputEstimate = Math.ceil(upstream.requests.at(-1)!.body.length / 4)
  const next = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'x' }).withResponse()
  // The budget refills at 1000 tokens a minute meanwhile: at most that much of the time since the hang-up is back.
  const charged = 1000 - record.outputTokens! - inputEstimate
  const refilled = Math.ceil((performance.now() - abortedAt) * 1000 / 60_000)
  const remaining = Number(next.response.headers.get('x-ratelimit-remaining-tokens'))
  t.ok(remaining >= charged && remaining <= charged + refilled,
    `the budget was charged with them, and with the input estimated from the bytes sent (no usage came): ${remaining} ` +
    `left, ${charged} after the charge, up to ${refilled} refilled since`)
})

t.test('a stream cut off before its usage came is charged for its input too: hanging up at response.created does not get a long input past the token budget', async t => {
  const { upstream, gw, sdk, streamEnds } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 100 } }]
  }, 60)
  const input = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ') // 300 input tokens to the fake
  const controller = new AbortController()
  const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input, stream: true }, { signal: controller.signal })
  for await (const event of stream) if (event.type === 'response.created') controller.abort()
  await until('the upstream to see its stream closed', () => streamEnds.length === 1, 3000)
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { outcome: 'aborted', inputTokens: null, outputTokens: null }, 'the audit says what was seen: no usage')
  const sentBytes = upstream.requests.at(-1)!.body.length
  const next = await rejection(sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'x' }))
  t.match(next, { status: 429, type: 'tokens' }, `the budget was charged for the ${sentBytes} bytes of input sent (about 4 a token)`)
})

t.test('a streamed generation the upstream answers whole, as JSON, is a 502 saying so, not a stream of no events the SDK ends quietly', async t => {
  const { upstream, gw } = await setup(t)
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({
      id: 'resp_whole', object: 'response', status: 'completed', model: 'gpt-4o', metadata: { gateway_owner: 'team-full' },
      output: [{ id: 'msg_1', type: 'message', role: 'assistant', status: 'completed', content: [{ type: 'output_text', text: 'Hello', annotations: [] }] }],
      usage: { input_tokens: 3, output_tokens: 1, total_tokens: 4 }
    }))
  }
  // The SDK's default retries on: a 5xx would be sent again, a generation made once more each time.
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1` })
  const err = await rejection(sdk.responses.create({ model: 'gpt-4o', input: 'hi', stream: true }))
  t.match(err, { status: 502, code: 'upstream_not_streamed', message: /resp_whole/ }, 'the SDK raises it, naming the response made')
  t.equal(upstream.requests.length, 1, 'not sent again')
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', status: 502, outcome: 'upstream_error', responseId: 'resp_whole', inputTokens: 3, outputTokens: 1 })
  // (the fake upstream never stored it: its own 404, but asked, as the owner's call is)
  upstream.respond = null
  await sdk.responses.retrieve('resp_whole').catch(() => undefined)
  t.match(upstream.requests.at(-1), { method: 'GET', url: '/v1/responses/resp_whole' }, 'the response it made is its own to retrieve')
})

t.test('a background generation, or a retrieve, asked for as a stream and answered whole, as JSON, is a 502 too, not a stream of no events', async t => {
  const { upstream, gw } = await setup(t)
  const whole = (status: string) => (_req: unknown, res: import('node:http').ServerResponse) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({
      id: 'resp_bg', object: 'response', status, background: true, model: 'gpt-4o', metadata: { gateway_owner: 'team-full' }, output: []
    }))
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1` })
  upstream.respond = whole('queued')
  // (with it passed on, the SDK's loop ends with no event: the client never learns the id of the response it started)
  const created = await rejection((async () => {
    for await (const _ of await sdk.responses.create({ model: 'gpt-4o', input: 'hi', stream: true, background: true })) { /* none */ }
  })())
  t.match(created, { status: 502, code: 'upstream_not_streamed', message: /resp_bg/ }, 'a background create: the SDK raises it, naming the response')
  t.equal(upstream.requests.length, 1, 'not sent again')
  upstream.respond = whole('completed')
  const retrieved = await rejection((async () => {
    for await (const _ of await sdk.responses.retrieve('resp_bg', { stream: true })) { /* none */ }
  })())
  t.match(retrieved, { status: 502, code: 'upstream_not_streamed', message: /resp_bg\)\. Retrieve it without stream/ }, 'a streamed retrieve: the SDK raises it')
  t.notMatch((retrieved as Error).message, /generated/, 'a retrieve generated nothing')
})

t.test('a streamed generation answered 200 with JSON that is no response (an error body) is not said to have made a response', async t => {
  const { upstream, gw } = await setup(t)
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ error: { message: 'overloaded', type: 'server_error', param: null, code: null } }))
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1` })
  const err = await rejection(sdk.responses.create({ model: 'gpt-4o', input: 'hi', stream: true })) as Error
  t.match(err, { status: 502, code: 'upstream_not_streamed' })
  t.notMatch(err.message, /generated|Retrieve it/, 'no response to retrieve is promised')
  t.match(err.message, /no response/)
  // A streamed retrieve answered so: its id comes from the URL, but the answer holds no response either. (The owner
  // lookup before it, not streamed, finds team-full's response.)
  upstream.respond = (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify(req.url?.includes('stream=true') === true
      ? { error: { message: 'overloaded', type: 'server_error', param: null, code: null } }
      : { id: 'resp_1', object: 'response', status: 'completed', model: 'gpt-4o', metadata: { gateway_owner: 'team-full' }, output: [] }))
  }
  const retrieved = await rejection((async () => {
    for await (const _ of await sdk.responses.retrieve('resp_1', { stream: true })) { /* none */ }
  })()) as Error
  t.match(retrieved, { status: 502, code: 'upstream_not_streamed' })
  t.notMatch(retrieved.message, /generated|Retrieve it/, 'a retrieve is not said to have generated the response')
  t.match(retrieved.message, /no response/)
})

t.test('a generation answered whole without its usage is charged for the output it holds, not for its input alone', async t => {
  // A relay that drops `usage` (null, or no key at all): the model's output, about 4 bytes a token, counts against
  // the budget as a stream's deltas do; not a generated image's base64, which is no text.
  for (const usage of ['null', 'absent']) {
    const { upstream, gw, sdk } = await setup(t, {
      clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 300 } }]
    })
    const text = 'word '.repeat(400) // 2000 bytes: about 500 tokens
    upstream.respond = (_req, res) => {
      const response: Record<string, unknown> = {
        id: 'resp_1', object: 'response', status: 'completed', model: 'gpt-4o', metadata: { gateway_owner: 'team-full' },
        output: [
          { id: 'msg_1', type: 'message', role: 'assistant', status: 'completed', content: [{ type: 'output_text', text, annotations: [] }] },
          { id: 'ig_1', type: 'image_generation_call', status: 'completed', result: 'A'.repeat(40_000) }
        ]
      }
      if (usage === 'null') response.usage = null
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify(response))
    }
    const answer = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'hi' })
    t.equal(answer.output_text, text, `usage ${usage}: the answer came whole`)
    await until('the audit record', () => gw.audit().length === 1)
    t.match(gw.audit()[0], { outcome: 'ok', inputTokens: null, outputTokens: 500 }, `usage ${usage}: the output's text as tokens, the image left out`)
    const next = await rejection(sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'x' }))
    t.match(next, { status: 429, type: 'tokens' }, `usage ${usage}: the budget of 300 was charged the output`)
  }
})

t.test('usage is read from the event a stream ends with, not from one before it: an early event with zero usage does not let a client hanging up after it pay nothing for its input', async t => {
  // Some OpenAI-compatible services fill response.created's usage with zeros (OpenAI's is null) until the end.
  const { upstream, gw, sdk } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 100 } }]
  })
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"m","output":[],"usage":{"input_tokens":0,"output_tokens":0,"total_tokens":0}}}\n\n')
    // then the model works on it, until the client hangs up
  }
  const input = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ')
  const controller = new AbortController()
  const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input, stream: true }, { signal: controller.signal })
  for await (const event of stream) if (event.type === 'response.created') controller.abort()
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { outcome: 'aborted', inputTokens: null, outputTokens: null }, 'the audit says what was seen: no usage yet')
  const sentBytes = upstream.requests.at(-1)!.body.length
  upstream.respond = null
  const next = await rejection(sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'x' }))
  t.match(next, { status: 429, type: 'tokens' }, `the budget was charged for the ${sentBytes} bytes of input sent (about 4 a token)`)
})

t.test('a stream cut off before its usage came is charged for every kind of output delta seen, not only text: a long function call read and left before the end is not free', async t => {
  const { upstream, gw, sdk } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 1000 } }]
  })
  const kinds = ['response.function_call_arguments.delta', 'response.reasoning_summary_text.delta', 'response.refusal.delta']
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(CREATED_EVENT)
    for (let i = 0; i < 30; i++) {
      const type = kinds[i % kinds.length]!
      res.write(`event: ${type}\ndata: ${JSON.stringify({ type, sequence_number: i + 1, item_id: 'fc_1', output_index: 0, content_index: 0, summary_index: 0, delta: 'ab' })}\n\n`)
    }
    // then the model goes on, until the client hangs up
  }
  const controller = new AbortController()
  const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'x', stream: true }, { signal: controller.signal })
  let deltas = 0
  for await (const event of stream) if (event.type.endsWith('.delta') && ++deltas === 30) controller.abort()
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { outcome: 'aborted', inputTokens: null, outputTokens: 30 }, 'the 30 deltas seen, whatever their kind')
})

t.test('a client that gives up on a non-streamed create while the upstream works on it is charged for its input: hanging up before the answer does not get a long input past the token budget', async t => {
  const { upstream, gw, sdk } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 100 } }]
  })
  const input = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ') // 300 input tokens to the fake
  upstream.respond = () => {} // the model is at work: no answer yet
  const controller = new AbortController()
  const call = rejection(sdk(KEYS.full).responses.create({ model: 'gpt-4o', input }, { signal: controller.signal }))
  await until('the upstream to have the request', () => upstream.requests.length === 1)
  controller.abort()
  await call
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', outcome: 'aborted', attempts: 1, inputTokens: null, outputTokens: null },
    'the audit says what was seen: no answer, no usage')
  upstream.respond = null
  const sentBytes = upstream.requests[0]!.body.length
  const next = await rejection(sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'x' }))
  t.match(next, { status: 429, type: 'tokens' }, `the budget was charged for the ${sentBytes} bytes of input sent (about 4 a token)`)
})

t.test('a create that never reached the upstream (its line refused the connection) is not charged to the token budget', async t => {
  const gw = await startGateway(t, testConfig(`http://127.0.0.1:${await closedPort()}`, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 100 } }]
  }))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const input = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ') // about 75 tokens a call by the estimate
  for (let i = 0; i < 3; i++) {
    t.match(await rejection(sdk.responses.create({ model: 'gpt-4o', input })), { status: 502 },
      `call ${i + 1}: the line's failure, not 429: nothing was sent, nothing charged`)
  }
})

t.test('a create whose owner lookup (previous_response_id, conversation) went out and got no answer is not charged to the token budget: the generation itself never went upstream', async t => {
  // The lookup's "sent" was taken for the generation's: each such call charged its input's estimate, and a
  // transient fault of the line left the client refused its next generations (429 tokens) until the debt refilled.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, {
    upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 2000, failureThreshold: 100 },
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 100 } }]
  }))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  // Neither is cached yet, as after a restart: each create looks its owner up first, and the line resets that.
  const owned = { gateway_owner: 'team-full' }
  const upstreamCreate = async (path: string, body: Record<string, unknown>) => (await (await fetch(`${upstream.url}${path}`, {
    method: 'POST', headers: { authorization: `Bearer ${UPSTREAM_TOKEN}`, 'content-type': 'application/json' }, body: JSON.stringify(body)
  })).json() as { id: string }).id
  const previous = await upstreamCreate('/v1/responses', { model: 'gpt-4o', input: 'before', metadata: owned })
  const other = await upstreamCreate('/v1/conversations', { metadata: owned })
  const base = upstream.requests.length
  upstream.respond = faults.reset()
  const input = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ') // about 75 tokens a call by the estimate
  for (const [what, named] of [['previous_response_id', { previous_response_id: previous }], ['conversation', { conversation: other }]] as const) {
    for (let i = 0; i < 2; i++) {
      t.match(await rejection(sdk.responses.create({ model: 'gpt-4o', input, ...named })), { status: 502, error: { code: 'upstream_unavailable' } },
        `${what}, call ${i + 1}: the lookup's failure, not 429: the generation was never sent, nothing charged`)
    }
  }
  t.notOk(upstream.requests.slice(base).some(r => r.method === 'POST'), 'only lookups went upstream')
  upstream.respond = null
  t.equal((await sdk.responses.create({ model: 'gpt-4o', input: 'hi' }).withResponse()).response.headers.get('x-ratelimit-remaining-tokens'), '100',
    'the whole budget is left for the next generation')
})

t.test('an upstream that breaks off a streamed response: the SDK raises its own APIError from an error event, the stream is not ended as if whole, and the call is audited upstream_error', async t => {
  const { upstream, gw, sdk } = await setup(t)
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(CREATED_EVENT)
    // then half an event, and the connection breaks
    res.write('event: response.output_text.delta\ndata: {"type":"response.output_t')
    setTimeout(() => res.socket?.destroy(), 50)
  }
  const { seen, err } = await streamedCreate(sdk(KEYS.full))
  t.same(seen, ['response.created'], 'the whole events before the break arrive, and nothing of the broken one')
  t.ok(err instanceof OpenAI.APIError, `an APIError, not a bare TypeError (got ${String(err)})`)
  t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error' } })

  const res = await fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true })
  })
  const reader = res.body!.getReader()
  let text = ''
  const ended = await (async () => {
    for (;;) {
      const { done, value } = await reader.read()
      if (done) return 'a clean end'
      text += Buffer.from(value).toString()
    }
  })().catch(() => 'broken off')
  t.equal(ended, 'broken off', 'the answer is broken off, never ended cleanly')
  t.match(text, /event: error\ndata: \{"type":"error","code":"upstream_unavailable"/, 'after the error event')
  await until('the audit records', () => gw.audit().length === 2)
  t.match(gw.audit(), [{ status: 200, outcome: 'upstream_error' }, { status: 200, outcome: 'upstream_error' }])
})

t.test('a long burst the upstream breaks off, or ends before its last event: the SDK gets every event, then its APIError, not a bare "terminated" (what the client had not read yet is not dropped)', async t => {
  const { upstream, gw, sdk } = await setup(t)
  // 300 KiB of events at once: more than the client's connection takes before the gateway's stream ends, so the
  // event saying why waits behind them in the gateway (Node 20 dropped it there, with the events before it).
  const deltas = Array.from({ length: 300 }, (_, i) => `event: response.output_text.delta\ndata: ${JSON.stringify({ type: 'response.output_text.delta', sequence_number: i + 1, item_id: 'msg_1', output_index: 0, content_index: 0, delta: 'x'.repeat(1000) })}\n\n`).join('')
  const ends: Array<[string, (res: import('node:http').ServerResponse) => void]> = [
    ['broken off', res => { res.write(CREATED_EVENT + deltas, () => { res.socket?.destroy() }) }],
    ['ended before its last event', res => { res.end(CREATED_EVENT + deltas) }]
  ]
  for (const [what, end] of ends) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      end(res)
    }
    const before = gw.audit().length
    const { seen, err } = await streamedCreate(sdk(KEYS.full))
    t.equal(seen.length, 301, `${what}: every event arrives`)
    t.ok(err instanceof OpenAI.APIError, `${what}: then an APIError (got ${String(err)})`)
    t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error', message: /broke off/ } }, `${what}: saying the upstream broke the stream off`)
    await until(`${what}: the audit record`, () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { action: 'response.create', status: 200, outcome: 'upstream_error' }, `${what}: audited upstream_error`)
  }
})

t.test('a burst the upstream breaks off, of any size: every event it sent reaches the client, then the event saying why (what the gateway had not taken yet when the break came is not dropped with the upstream\'s stream)', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // (every break counts against the line: past the threshold, the next calls would be refused, not sent)
  const gw = await startGateway(t, testConfig(upstream.url, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 2000, failureThreshold: 1_000_000 } }))
  const delta = (i: number) => `event: response.output_text.delta\ndata: ${JSON.stringify({ type: 'response.output_text.delta', sequence_number: i, item_id: 'msg_1', output_index: 0, content_index: 0, delta: 'x'.repeat(1000) })}\n\n`
  // Sizes around where the gateway's reads of the upstream outran its own passing on (it takes a slice of events,
  // then lets the event loop turn), so that the break came while the last reads waited in the upstream's stream:
  // found by a sweep of 100 to 700 events, on Node 20 (310) and 24 (283 to 418).
  const lost: string[] = []
  for (let count = 280; count <= 330; count++) {
    const deltas = Array.from({ length: count }, (_, i) => delta(i + 1)).join('')
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.write(CREATED_EVENT + deltas, () => { res.socket?.destroy() })
    }
    // (on a socket of its own: Node's http client, and fetch, throw away what they hold unread when a connection
    // breaks, and what they saw would not be all the gateway sent)
    const { response } = await sendRaw(gw.url, buildRequest('POST', '/v1/responses', [['authorization', `Bearer ${KEYS.full}`], ['content-type', 'application/json'], ['connection', 'close']],
      JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true })), { timeoutMs: 10_000 })
    const status = response?.status
    const how = response?.complete === true ? 'ended' : 'broken off'
    const events = (response?.body ?? '').split('\n\n').filter(e => e.trim() !== '')
    const seen = events.filter(e => e.includes('"response.output_text.delta"')).length
    const why = /^event: error\ndata: .*broke off the stream/.test(events.at(-1) ?? '')
    if (status !== 200 || seen !== count || !why || how !== 'broken off') lost.push(`${count} events: ${status}, ${seen} arrived, ${why ? '' : 'no '}event saying why, ${how}`)
  }
  t.same(lost, [], 'every burst arrives whole, then the event saying why, and the answer is broken off')
  await until('the audit records', () => gw.audit().length === 51)
  t.same(new Set(gw.audit().map(r => `${r.status} ${r.outcome}`)), new Set(['200 upstream_error']), 'each audited upstream_error')
})

t.test('an upstream that ends a streamed generation cleanly before its last event: the SDK raises an APIError instead of taking the text so far for the whole answer, and the call is audited upstream_error', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const delta = 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}\n\n'
  const completed = 'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"completed","model":"m","output":[],"usage":{"input_tokens":2,"output_tokens":1,"total_tokens":3}}}'
  const incomplete = 'event: response.incomplete\ndata: {"type":"response.incomplete","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"incomplete","model":"m","output":[],"usage":{"input_tokens":2,"output_tokens":1,"total_tokens":3}}}\n\n'
  // A relay that lost its own upstream and returned: the chunked answer ends properly, the stream does not.
  const endings: Array<[string, string, string[]]> = [
    ['ended after a delta', CREATED_EVENT + delta, ['response.created', 'response.output_text.delta']],
    ['ended inside its last event (no blank line: a client drops it unread)', CREATED_EVENT + completed + '\n', ['response.created']]
  ]
  for (const [what, body, expected] of endings) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(body)
    }
    const before = gw.audit().length
    const { seen, err } = await streamedCreate(sdk(KEYS.full))
    t.same(seen, expected, `${what}: the whole events arrive`)
    t.ok(err instanceof OpenAI.APIError, `${what}: then an APIError (got ${String(err)})`)
    t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error', message: /broke off/ } })
    await until(`${what}: the audit record`, () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { action: 'response.create', status: 200, outcome: 'upstream_error' }, `${what}: audited upstream_error`)
  }
  // Ended by one of the events a generation's stream ends with: whole.
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(CREATED_EVENT + delta + incomplete)
  }
  const { seen, err } = await streamedCreate(sdk(KEYS.full))
  t.equal(err, null, 'a stream ended by response.incomplete is whole')
  t.same(seen, ['response.created', 'response.output_text.delta', 'response.incomplete'])
  await until('its audit record', () => gw.audit().length === 3)
  t.match(gw.audit().at(-1), { status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 1 })
})

t.test('an upstream whose connection breaks after the stream\'s last event: the SDK gets the whole response and no error, and the call is audited ok with its usage', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const client = sdk(KEYS.full)
  const delta = 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}\n\n'
  const completed = 'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"completed","model":"m","output":[],"usage":{"input_tokens":2,"output_tokens":1,"total_tokens":3},"metadata":{"gateway_owner":"team-full"}}}\n\n'
  // Every event, the last one whole, and then the connection is reset instead of the chunked answer ending (a
  // relay or a load balancer in front of the upstream that drops the connection once the answer seems done).
  const resetAfter = (events: string) => (_req: unknown, res: import('node:http').ServerResponse) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(events)
    setTimeout(() => res.socket?.destroy(), 50)
  }
  upstream.respond = resetAfter(CREATED_EVENT + delta + completed)
  const { seen, err } = await streamedCreate(client)
  t.equal(err, null, 'no error: the response was complete (an SDK user told otherwise would generate it again)')
  t.same(seen, ['response.created', 'response.output_text.delta', 'response.completed'])
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 1 })

  // The same for a streamed retrieve that replays a finished response.
  upstream.respond = (req, res) => {
    if (req.url?.includes('stream=true') === true) {
      resetAfter(delta + completed)(req, res)
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ id: 'resp_1', object: 'response', status: 'completed', model: 'm', output: [], metadata: { gateway_owner: 'team-full' } }))
  }
  const replayed: string[] = []
  const replayErr = await (async () => {
    for await (const event of await client.responses.retrieve('resp_1', { stream: true })) replayed.push(event.type)
  })().then(() => null, (e: unknown) => e)
  t.equal(replayErr, null, 'a streamed retrieve: no error either')
  t.same(replayed, ['response.output_text.delta', 'response.completed'])
  await until('its audit record', () => gw.audit().length === 2)
  t.match(gw.audit()[1], { action: 'response.retrieve', status: 200, outcome: 'ok' })

  // Nor does it count against the line: a relay that drops every connection once the answer is done would
  // otherwise have the line skipped after failureThreshold (3) such calls, and every call refused 502 meanwhile.
  upstream.respond = resetAfter(CREATED_EVENT + delta + completed)
  for (let i = 0; i < 4; i++) t.equal((await streamedCreate(client)).err, null, `whole answer ${i + 1} of 4`)
  upstream.respond = null
  const after = await client.conversations.create({})
  t.match(after.id, /^conv_/, 'the line still serves the next call')
  t.same(gw.logs.filter(line => line.includes('skipped for')), [], 'and was never skipped')
  const before = gw.audit().length

  // Broken before its last event, it is still an upstream failure the client is told of.
  upstream.respond = resetAfter(CREATED_EVENT + delta)
  const broken = await streamedCreate(client)
  t.same(broken.seen, ['response.created', 'response.output_text.delta'])
  t.match(broken.err, { error: { code: 'upstream_unavailable' } })
  await until('its audit record', () => gw.audit().length === before + 1)
  t.match(gw.audit()[before], { action: 'response.create', status: 200, outcome: 'upstream_error' })
})

t.test('an upstream that holds its connection open after the stream\'s last event: the SDK\'s stream ends at that event, as OpenAI\'s does, the upstream is let go of, and the call is audited as that event says, with its usage', async t => {
  // The fake holds each stream open this long after its last event, then ends it: a stream that ended only then
  // waited on the upstream (up to generationTimeoutMs, 9 min 50 s, in production).
  const { upstream, gw, sdk, streamEnds } = await setup(t, {}, { holdOpenMs: 5000 })
  const client = sdk(KEYS.full)

  const { seen, err } = await streamedCreate(client)
  t.equal(err, null)
  t.equal(seen.at(-1), 'response.completed', 'every event, the last one included')
  await until('the upstream to see its stream closed', () => streamEnds.length === 1)
  t.match(streamEnds[0], { how: 'released' }, 'the gateway let the upstream go after the last event; it did not wait for the upstream to end')
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', status: 200, stream: true, outcome: 'ok', inputTokens: 1, outputTokens: 2 })

  // The SDK's helper, which builds the final response from the events, ends too.
  const helper = client.responses.stream({ model: 'gpt-4o', input: 'hello there' })
  const final = await helper.finalResponse()
  t.match(final, { status: 'completed', output_text: 'Echo: hello there' }, 'responses.stream(): the final response')
  await until('the upstream to see its stream closed', () => streamEnds.length === 2)
  t.match(streamEnds[1], { how: 'released' })

  // A background response streamed (which need not end with a last event, as a cancel may end it) ends at it too.
  const background = await client.responses.create({ model: 'gpt-4o', input: 'hi', stream: true, background: true })
  const types: string[] = []
  for await (const event of background) types.push(event.type)
  t.equal(types.at(-1), 'response.completed', 'a background stream')
  await until('the upstream to see its stream closed', () => streamEnds.length === 3)
  t.match(streamEnds[2], { how: 'released' })
  await until('the audit records', () => gw.audit().length === 3)
  t.match(gw.audit().slice(1), [{ outcome: 'ok', stream: true }, { outcome: 'ok', stream: true }])

  // The other last events, and a streamed retrieve replaying a finished response, from an upstream that holds on.
  const delta = 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}\n\n'
  const done = (status: string) => `event: response.${status}\ndata: ${JSON.stringify({ type: `response.${status}`, sequence_number: 2, response: { id: 'resp_1', object: 'response', status, model: 'm', output: [], usage: { input_tokens: 2, output_tokens: 1, total_tokens: 3 }, metadata: { gateway_owner: 'team-full' } } })}\n\n`
  const errorEvent = 'event: error\ndata: {"type":"error","sequence_number":2,"code":"server_error","message":"The model failed.","param":null}\n\n'
  let released = 0
  const heldOpen = (events: string) => (_req: unknown, res: import('node:http').ServerResponse) => {
    res.on('close', () => { if (!res.writableEnded) released++ })
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(events)
    setTimeout(() => res.end(), 5000).unref()
  }
  const lasts: Array<[string, string, Record<string, unknown>]> = [
    ['response.failed', done('failed'), { outcome: 'upstream_error', inputTokens: 2, outputTokens: 1 }],
    ['response.incomplete', done('incomplete'), { outcome: 'ok', inputTokens: 2, outputTokens: 1 }],
    ['error', errorEvent, { outcome: 'upstream_error' }]
  ]
  for (const [type, last, record] of lasts) {
    upstream.respond = heldOpen(CREATED_EVENT + delta + last)
    const before = gw.audit().length
    const releasedBefore = released
    const ended = await streamedCreate(client)
    t.same(ended, { seen: ['response.created', 'response.output_text.delta', type], err: null }, `${type}: the stream ends at it`)
    await until('the upstream to see its stream closed', () => released === releasedBefore + 1)
    await until('the audit record', () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { action: 'response.create', status: 200, ...record }, `${type}: audited as it says`)
  }
  t.equal(released, 3, 'each released by the gateway')

  upstream.respond = (req, res) => {
    if (req.url?.includes('stream=true') === true) {
      heldOpen(delta + done('completed'))(req, res)
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ id: 'resp_1', object: 'response', status: 'completed', model: 'm', output: [], metadata: { gateway_owner: 'team-full' } }))
  }
  const replayed: string[] = []
  for await (const event of await client.responses.retrieve('resp_1', { stream: true })) replayed.push(event.type)
  t.same(replayed, ['response.output_text.delta', 'response.completed'], 'a streamed retrieve ends at its last event')
  await until('the upstream to see its stream closed', () => released === 4)
  await until('its audit record', () => gw.audit().length === 7)
  t.match(gw.audit()[6], { action: 'response.retrieve', status: 200, outcome: 'ok' })
})

t.test('an upstream that ends its stream right after the last event, at once or in a later read: the gateway\'s next streamed calls go on the same upstream connection, as they did before streams ended at their last event', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const client = sdk(KEYS.full)
  const completed = `event: response.completed\ndata: ${JSON.stringify({ type: 'response.completed', sequence_number: 1, response: { id: 'resp_1', object: 'response', status: 'completed', model: 'm', output: [], usage: { input_tokens: 2, output_tokens: 1, total_tokens: 3 }, metadata: { gateway_owner: 'team-full' } } })}\n\n`
  // OpenAI's end of a chunked body (its last, empty chunk) comes with the last event or just after it.
  const ports: number[] = []
  let finished = 0
  upstream.respond = (req, res) => {
    ports.push(req.socket.remotePort!)
    res.on('finish', () => { finished++ })
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(CREATED_EVENT)
    // (a later read: the model's events come as it makes them)
    setImmediate(() => {
      res.write(completed)
      if (ports.length % 2 === 1) res.end()
      else setImmediate(() => res.end())
    })
  }
  for (let call = 1; call <= 4; call++) {
    t.same(await streamedCreate(client), { seen: ['response.created', 'response.completed'], err: null })
    await until('the upstream to end its answer', () => finished === call)
  }
  t.same(new Set(ports).size, 1, `one upstream connection for the four calls (their ports: ${ports.join(', ')})`)
  await until('the audit records', () => gw.audit().length === 4)
  t.match(gw.audit(), Array.from({ length: 4 }, () => ({ action: 'response.create', status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 1 })))
})

t.test('a stream answered 200 whose body is a bare JSON error (no event): the SDK raises the upstream\'s own error, and the call is audited as that error says', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const client = sdk(KEYS.full)
  const bareError = (code: string, ending = '') => (_req: unknown, res: import('node:http').ServerResponse) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(JSON.stringify({ error: { message: `The upstream said ${code}.`, type: 'insufficient_quota', param: null, code } }) + ending)
  }
  // (the body as it is, or ended with a blank line, as an event would be)
  const cases: Array<[string, string, string]> = [['insufficient_quota', 'upstream_error', ''], ['rate_limit_exceeded', 'upstream_rate_limited', ''],
    ['insufficient_quota', 'upstream_error', '\n\n']]
  for (const [code, outcome, ending] of cases) {
    upstream.respond = bareError(code, ending)
    const before = gw.audit().length
    const { seen, err } = await streamedCreate(client)
    t.same(seen, [], `${code}: no events`)
    t.ok(err instanceof OpenAI.APIError, `${code}: an APIError (got ${String(err)})`)
    t.match(err, { error: { code, message: `The upstream said ${code}.` } }, `${code}: the upstream's own error, not a break`)
    await until('the audit record', () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { action: 'response.create', status: 200, outcome }, `${code}: audited ${outcome}`)
  }

  // A streamed retrieve answered the same way: an error too, not an empty stream read as a whole one.
  upstream.respond = (req, res) => {
    if (req.url?.includes('stream=true') === true) {
      bareError('server_error')(req, res)
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ id: 'resp_1', object: 'response', status: 'completed', model: 'm', output: [], metadata: { gateway_owner: 'team-full' } }))
  }
  const replayErr = await (async () => {
    for await (const _event of await client.responses.retrieve('resp_1', { stream: true }));
  })().then(() => null, (e: unknown) => e)
  t.match(replayErr, { error: { code: 'server_error', message: 'The upstream said server_error.' } }, 'a streamed retrieve raises it too')
  await until('its audit record', () => gw.audit().length === 4)
  t.match(gw.audit().at(-1), { action: 'response.retrieve', status: 200, outcome: 'upstream_error' })
})

t.test('an error event whose data is plain text (a relay\'s `event: error`), or a JSON string, reaches the SDK as OpenAI\'s error event: its APIError with the text, not a parse error', async t => {
  const { upstream, gw, sdk } = await setup(t)
  for (const [data, message] of [
    ['data: upstream overloaded,\r\ndata: try later', 'upstream overloaded,\ntry later'],
    // (the string itself, not its JSON quotes and escapes)
    ['data: "upstream \\"m1\\" overloaded"', 'upstream "m1" overloaded'],
    // (an empty string says nothing: the Node SDK would make its message of the whole error object)
    ['data: ""', 'The upstream API reported an error in the stream without a message.']
  ] as const) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(CREATED_EVENT + `event: error\r\n${data}\r\n\r\n`)
    }
    const before = gw.audit().length
    const { seen, err } = await streamedCreate(sdk(KEYS.full))
    t.same(seen, ['response.created'], 'the events before it')
    t.ok(err instanceof OpenAI.APIError, `an APIError (got ${String(err)})`)
    t.match(err, { error: { message, type: 'server_error' } }, 'with the upstream\'s text')
    await until('the audit record', () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { status: 200, outcome: 'upstream_error' })
  }
})

/**
 * A streamed retrieve whose stream the upstream ends with `event` (after a response created), read with the SDK: it
 * raises an APIError with `error`, after the events before it, and the call is audited as failed, not as ended well.
 */
async function retrieveEndingWith (t: Test, { upstream, gw, sdk }: Setup, event: string, error: Record<string, unknown>): Promise<void> {
  upstream.respond = (req, res) => {
    if (req.url?.includes('stream=true') === true) {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(CREATED_EVENT + event)
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ id: 'resp_1', object: 'response', status: 'in_progress', model: 'm', output: [], metadata: { gateway_owner: 'team-full' } }))
  }
  const before = gw.audit().length
  const seen: string[] = []
  const err = await (async () => {
    for await (const e of await sdk(KEYS.full).responses.retrieve('resp_1', { stream: true })) seen.push(e.type)
  })().then(() => null, (e: unknown) => e)
  t.same(seen, ['response.created'], `${JSON.stringify(event)}: the events before it`)
  t.ok(err instanceof OpenAI.APIError, `${JSON.stringify(event)}: an APIError (got ${String(err)})`)
  t.match(err, { error }, 'with the upstream\'s message')
  await until('the audit record', () => gw.audit().length >= before + 1)
  t.match(gw.audit().at(-1), { action: 'response.retrieve', status: 200, outcome: 'upstream_error' })
}

t.test('an error event with no data, or empty data, still reaches the SDK as an error: a streamed retrieve is not read as ended well', async t => {
  const s = await setup(t)
  for (const data of ['data:\r\n', '']) {
    await retrieveEndingWith(t, s, `event: error\r\n${data}\r\n`,
      { message: 'The upstream API reported an error in the stream without a message.', type: 'server_error' })
  }
})

t.test('an error event whose data is a JSON object other than OpenAI\'s error event (a relay\'s), or an event of an error object alone, reaches the SDK as OpenAI\'s error event, and the call is audited as failed', async t => {
  const s = await setup(t)
  for (const [event, error] of [
    // (both SDKs took the first three for events of no type, and a streamed retrieve for one ended well)
    ['event: error\ndata: {"message":"upstream overloaded"}', { message: 'upstream overloaded', type: 'server_error' }],
    ['event: error\ndata: {"type":"server_error","message":"upstream overloaded"}', { message: 'upstream overloaded', type: 'server_error' }],
    ['event: error\ndata: {"error":"upstream overloaded"}', { message: 'upstream overloaded', type: 'server_error' }],
    // (the SDKs raised these, but the gateway took the stream for one ended well)
    ['event: error\ndata: {"error":{"message":"upstream overloaded","type":"server_error","code":"overloaded"}}', { message: 'upstream overloaded', code: 'overloaded' }],
    ['data: {"error":{"message":"upstream overloaded","type":"server_error","code":"overloaded"}}', { message: 'upstream overloaded', code: 'overloaded' }],
    // (the Node SDK raised it with the string's JSON quotes as its message, the Python SDK with a message of its own)
    ['data: {"error":"upstream overloaded"}', { message: 'upstream overloaded', type: 'server_error' }]
  ] as const) await retrieveEndingWith(t, s, `${event}\n\n`, error)

  // One of OpenAI's events, only named error, is left as it is: the SDKs read it by its type.
  s.upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(CREATED_EVENT + 'event: error\ndata: {"type":"response.failed","sequence_number":1,"response":{"id":"resp_1","object":"response","status":"failed","model":"m","output":[],"error":{"code":"server_error","message":"failed"}}}\n\n')
  }
  t.same(await streamedCreate(s.sdk(KEYS.full)), { seen: ['response.created', 'response.failed'], err: null }, 'a response.failed named error')
})

t.test('a bare JSON error passed on as an error event keeps its numbers, strings and keys as the upstream wrote them', async t => {
  // As every event and answer the gateway rewrites (http/json.ts): a number JSON.parse would round goes on as written.
  const { upstream, gw } = await setup(t)
  const error = '{"message":"Limit 😀\\u2028 \\ud800 reached.","type":"tokens","param":null,"code":"rate_limit_exceeded","limit":12345678901234567891,"ratio":0.12345678901234567,"huge":1e400,"__proto__":{"a":1}}'
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(`{"error":${error}}`)
  }
  const res = await fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o-mini', input: 'hi', stream: true })
  })
  const text = await res.text()
  // (s: a U+2028 in the data, as JSON.stringify writes it, is no line end to SSE)
  const data = /^event: error\ndata: (.*)\n\n$/s.exec(text)?.[1]
  t.ok(data !== undefined, 'one error event')
  for (const written of ['12345678901234567891', '0.12345678901234567', '1e400']) {
    t.equal(data?.split(written).length, 2, `${written} as written in its error`)
  }
  t.same(JSON.parse(data!).error, JSON.parse(error), 'the error object, every string and key as sent (read by the same reader)')
})

t.test('a stream the upstream ends with its own error event, or with a failed response, is audited upstream_error (upstream_rate_limited for the account\'s rate limit), not ok', async t => {
  const { upstream, gw, sdk } = await setup(t, { metrics: { token: METRICS_TOKEN } })
  const client = sdk(KEYS.full)
  const delta = 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}\n\n'
  const errorEvent = (code: string) => `event: error\ndata: ${JSON.stringify({ type: 'error', sequence_number: 2, code, message: 'The model failed.', param: null })}\n\n`
  const failed = (id: string, code: string) => `event: response.failed\ndata: ${JSON.stringify({
    type: 'response.failed', sequence_number: 2,
    response: { id, object: 'response', status: 'failed', model: 'gpt-4o', output: [], error: { code, message: 'The model failed.' }, usage: null, metadata: { gateway_owner: 'team-full' } }
  })}\n\n`
  const endings: Array<[string, string, string]> = [
    ['its own error event', errorEvent('server_error'), 'upstream_error'],
    ['a failed response', failed('resp_1', 'server_error'), 'upstream_error'],
    ['an error event for the account\'s rate limit', errorEvent('rate_limit_exceeded'), 'upstream_rate_limited'],
    ['a response failed on the account\'s rate limit', failed('resp_1', 'rate_limit_exceeded'), 'upstream_rate_limited'],
    ['a response done but cut short (incomplete: max_output_tokens)', 'event: response.incomplete\ndata: {"type":"response.incomplete","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"incomplete","model":"m","output":[],"usage":{"input_tokens":2,"output_tokens":1,"total_tokens":3}}}\n\n', 'ok']
  ]
  for (const [what, last, outcome] of endings) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(CREATED_EVENT + delta + last)
    }
    const before = gw.audit().length
    const { seen } = await streamedCreate(client)
    t.same(seen.slice(0, 2), ['response.created', 'response.output_text.delta'], `${what}: the events came`)
    await until('the audit record', () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { action: 'response.create', status: 200, outcome }, `${what}: audited ${outcome}`)
  }

  // A streamed retrieve of a response that failed earlier replays its failure: the call did what it was asked.
  upstream.respond = null
  const created = await client.responses.create({ model: 'gpt-4o', input: 'hi' })
  const replays: Array<[string, string, string]> = [
    ['replaying a response that failed earlier', failed(created.id, 'server_error'), 'ok'],
    ['broken by the upstream\'s own error event', errorEvent('server_error'), 'upstream_error']
  ]
  for (const [what, last, outcome] of replays) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(delta + last)
    }
    const before = gw.audit().length
    await (async () => { for await (const _event of await client.responses.retrieve(created.id, { stream: true })); })().catch(() => {})
    await until('the audit record', () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { action: 'response.retrieve', status: 200, outcome }, `a streamed retrieve ${what}: audited ${outcome}`)
  }
  const metrics = await (await fetch(`${gw.url}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } })).text()
  t.match(metrics, /^gateway_requests_total\{client="team-full",action="response.create",status="200",outcome="upstream_error"\} 2$/m,
    'the metrics count them as the audit does')
  t.match(metrics, /^gateway_requests_total\{client="team-full",action="response.create",status="200",outcome="upstream_rate_limited"\} 2$/m)
})

t.test('a generation answered 200 with a failed response, not streamed, is audited as the same failure streamed is (upstream_error, upstream_rate_limited), not ok; a retrieve or cancel of one that failed earlier is ok', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const client = sdk(KEYS.full)
  const created = await client.responses.create({ model: 'gpt-4o', input: 'hi', background: true })
  const failed = (code: string) => JSON.stringify({
    id: created.id, object: 'response', status: 'failed', model: 'gpt-4o', output: [], error: { code, message: 'The model failed.' },
    usage: { input_tokens: 1, output_tokens: 0, total_tokens: 1 }, metadata: { gateway_owner: 'team-full' }
  })
  const calls: Array<[string, string, () => Promise<{ status?: string }>, string]> = [
    ['response.create', 'server_error', async () => await client.responses.create({ model: 'gpt-4o', input: 'hi' }), 'upstream_error'],
    ['response.create', 'rate_limit_exceeded', async () => await client.responses.create({ model: 'gpt-4o', input: 'hi' }), 'upstream_rate_limited'],
    ['response.retrieve', 'server_error', async () => await client.responses.retrieve(created.id), 'ok'],
    ['response.cancel', 'server_error', async () => await client.responses.cancel(created.id), 'ok']
  ]
  for (const [action, code, call, outcome] of calls) {
    upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(failed(code)) }
    const before = gw.audit().length
    t.equal((await call()).status, 'failed', `${action} (${code}): the SDK gets the failed response as it came`)
    await until('the audit record', () => gw.audit().length === before + 1)
    t.match(gw.audit().at(-1), { action, status: 200, outcome }, `${action} (${code}): audited ${outcome}`)
  }
})

t.test('a streamed create whose events name another owner is broken off with an error event, never passed on, and the gateway stays up', async t => {
  const { upstream, gw, sdk } = await setup(t)
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    // An upstream that answers with another team's response (replayed, mixed up): not this client's creation.
    res.end('event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_9","object":"response","status":"in_progress","model":"m","output":[],"metadata":{"gateway_owner":"team-other","secret":"theirs"}}}\n\n')
  }
  const seen: string[] = []
  const err = await (async () => {
    const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'hi', stream: true })
    for await (const event of stream) seen.push(JSON.stringify(event))
  })().then(() => null, (e: unknown) => e)
  t.same(seen, [], 'nothing of the other team\'s response reached the client')
  t.ok(err instanceof OpenAI.APIError, `the SDK raises an APIError (got ${String(err)})`)
  t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error' } })
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', status: 200, outcome: 'upstream_error' })
  upstream.respond = null
  t.equal((await sdk(KEYS.full).conversations.create({})).object, 'conversation', 'the gateway still serves calls')
})

t.test('a streamed create whose later event names another owner is broken off there: only the first event was the one checked', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const response = (owner: string, text: string) =>
    `{"id":"resp_9","object":"response","status":"completed","model":"m","output":[{"id":"msg_9","type":"message","role":"assistant","content":[{"type":"output_text","text":"${text}"}]}],"metadata":{"gateway_owner":"${owner}"}}`
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    // The caller's own creation first, then (a relay mixing streams up) another team's response.
    res.end('event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_9","object":"response","status":"in_progress","model":"m","output":[],"metadata":{"gateway_owner":"team-full"}}}\n\n' +
      `event: response.completed\ndata: {"type":"response.completed","sequence_number":1,"response":${response('team-other', 'their secret')}}\n\n`)
  }
  const seen: string[] = []
  const err = await (async () => {
    const stream = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'hi', stream: true })
    for await (const event of stream) seen.push(JSON.stringify(event))
  })().then(() => null, (e: unknown) => e)
  t.equal(seen.length, 1, 'the caller\'s own first event only')
  t.notMatch(seen.join('\n'), /their secret/, 'nothing of the other team\'s response reached the client')
  t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error' } }, 'the stream is ended with an error event')
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', status: 200, outcome: 'upstream_error' })
})

t.test('a streamed event that never ends is not held without bound: past 16 MiB the stream is ended with an error event and the upstream released', async t => {
  const { upstream, gw, sdk } = await setup(t)
  let upstreamClosed = false
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(CREATED_EVENT)
    res.write('event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"')
    const piece = 'a'.repeat(1024 * 1024)
    let sent = 0
    // 24 MiB of one event, as fast as the gateway reads it, then a byte every 100 ms (no body timeout), for 3 s.
    const trickle = setInterval(() => { if (sent >= 24) res.write('a') }, 100)
    const broken = setTimeout(() => res.destroy(), 3000)
    const more = (): void => { while (sent < 24 && !res.destroyed) { sent++; if (!res.write(piece)) { res.once('drain', more); return } } }
    res.on('close', () => { upstreamClosed = true; clearInterval(trickle); clearTimeout(broken) })
    more()
  }
  const { seen, err } = await streamedCreate(sdk(KEYS.full))
  t.same(seen, ['response.created'], 'the whole events before it arrive')
  t.ok(err instanceof OpenAI.APIError, `then an APIError (got ${String(err)})`)
  t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error', message: /could not check/ } }, 'ended by the gateway, not by the upstream breaking off')
  await until('the upstream stream to be closed', () => upstreamClosed, 3000)
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', status: 200, outcome: 'upstream_error' })
})

t.test('a streamed event that drips in is not waited for without end: not whole within upstream.timeoutMs of its first byte, the stream is ended with an error event', async t => {
  // A byte every 50 ms: never silent for bodyTimeoutMs, and the event never whole. The client sees nothing of
  // an event until it is whole.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, timeoutMs: 400 } })
  const sdk = (key: string) => new OpenAI({ apiKey: key, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  let upstreamClosed = false
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(CREATED_EVENT)
    res.write('event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"')
    const drip = setInterval(() => { if (!res.destroyed) res.write('a') }, 50)
    res.on('close', () => { upstreamClosed = true; clearInterval(drip) })
  }
  // (The SDK ends the iteration quietly when this signal aborts it: no error then.)
  const { seen, err } = await streamedCreate(sdk(KEYS.full), AbortSignal.timeout(5000))
  t.same(seen, ['response.created'], 'the whole events before it arrive')
  t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error' } }, 'then the error event')
  await until('the upstream stream to be closed', () => upstreamClosed, 3000)
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { action: 'response.create', status: 200, outcome: 'upstream_error' })
})

t.test('keep-alive comment lines between events (no blank line after them, as the SSE spec suggests) reach the client at once and do not end a stream that outlasts upstream.timeoutMs', async t => {
  // A reasoning model quiet for longer than upstream.timeoutMs, its upstream sending a comment line every 100 ms.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, timeoutMs: 300 } })
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  let clientSawComment: () => void = () => {}
  const commentSeen = new Promise<void>(resolve => { clientSawComment = resolve })
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(CREATED_EVENT)
    res.write(': keep-alive\n')
    // The rest only once the client has the first comment (a raw read below; the SDK's call does not wait), then
    // ten more comments 100 ms apart, past upstream.timeoutMs in all.
    void commentSeen.then(() => {
      let left = 10
      const ping = setInterval(() => {
        if (res.destroyed) { clearInterval(ping); return }
        if (left-- > 0) { res.write(': keep-alive\n'); return }
        clearInterval(ping)
        res.end('event: response.completed\ndata: {"type":"response.completed","sequence_number":1,"response":{"id":"resp_1","object":"response","status":"completed","model":"m","output":[],"usage":{"input_tokens":2,"output_tokens":0,"total_tokens":2}}}\n\n')
      }, 100)
    })
  }
  const res = await fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true })
  })
  const reader = res.body!.getReader()
  // (a broken-off answer read as its end: what it held is what the assertions look at)
  const read = async () => await reader.read().catch(() => ({ done: true as const, value: undefined }))
  let text = ''
  while (!text.includes(': keep-alive\n')) {
    const { done, value } = await read()
    if (done) break
    text += Buffer.from(value).toString()
  }
  t.match(text, /: keep-alive\n$/, 'the comment reaches the client while the upstream waits for it')
  clientSawComment()
  for (;;) {
    const { done, value } = await read()
    if (done) break
    text += Buffer.from(value).toString()
  }
  t.equal(text.split(': keep-alive\n').length - 1, 11, 'every comment passed on')
  t.match(text, /event: response\.completed\n/, 'the stream went on to its end')
  t.notMatch(text, /event: error/, 'not ended by the gateway')

  const { seen, err } = await streamedCreate(sdk)
  t.equal(err, null, 'the SDK reads the same stream without an error')
  t.same(seen, ['response.created', 'response.completed'])
  await until('the audit records', () => gw.audit().length === 2)
  t.match(gw.audit(), [{ status: 200, outcome: 'ok', inputTokens: 2 }, { status: 200, outcome: 'ok', inputTokens: 2 }])
})

t.test('an event without data, or with empty data only (an upstream\'s `event: ping` keep-alive, a bare `data:`), reaches the client as comment lines: the SDKs, which would parse its empty data as JSON and throw, read the stream to its end', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const delta = 'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}\n\n'
  const completed = 'event: response.completed\ndata: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"completed","model":"m","output":[],"usage":{"input_tokens":2,"output_tokens":1,"total_tokens":3}}}\n\n'
  // (empty data is no event to the SSE spec either: `data:` alone, a `data: ` keep-alive, data of blank lines only)
  const emptyData = 'event: ping\ndata:\n\n' + 'data: \r\n\r\n' + 'data:\ndata: \n\n'
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(CREATED_EVENT + 'event: ping\n\n' + delta + emptyData + 'event: ping\r\nid: 7\r\n: still here\r\n\r\n' + '\n' + completed)
  }
  const { seen, err } = await streamedCreate(sdk(KEYS.full))
  t.equal(err, null, `no error (got ${String(err)})`)
  t.same(seen, ['response.created', 'response.output_text.delta', 'response.completed'], 'every event with data, in order')
  await until('the audit record', () => gw.audit().length === 1)
  t.match(gw.audit()[0], { status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 1 })

  const res = await fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true })
  })
  const text = await res.text()
  t.ok(text.includes(':event: ping\n' + delta + ':event: ping\n:data:\n:data: \r\n:data:\n:data: \n' + ':event: ping\r\n:id: 7\r\n: still here\r\n:\n' + completed),
    'its lines pass on as comments (keeping the client\'s connection alive as they did), without the blank line that would dispatch it; a lone blank line as an empty comment')
})

t.test('an event that never ends is bounded by what holding it costs, not by its bytes alone: 200,000 short lines end the stream as 16 MiB would', async t => {
  // Each line held is an object of its own in the gateway's heap, about 130 bytes whatever its length: 16 MiB of
  // two-byte lines was 8 million of them, over 1 GiB for one stream.
  const { upstream, sdk } = await setup(t)
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(CREATED_EVENT)
    res.end('x: a\n'.repeat(200_000)) // 1 MB, one event (no blank line)
  }
  const { seen, err } = await streamedCreate(sdk(KEYS.full))
  t.same(seen, ['response.created'], 'the whole events before it arrive')
  t.match(err, { error: { code: 'upstream_unavailable', type: 'server_error', message: /could not check/ } }, 'then the error event')
})

t.test('ownership: another team cannot use, read, cancel or delete a response, nor generate into a conversation, that is not its own', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const conv = await a.conversations.create({})
  const response = await a.responses.create({ model: 'gpt-4o', input: 'secret', conversation: conv.id, background: true })
  const before = upstream.requests.length

  const inConversation = await rejection(b.responses.create({ model: 'gpt-4o', input: 'hi', conversation: conv.id }))
  t.type(inConversation, OpenAI.NotFoundError)
  t.match(inConversation, { status: 404, code: 'conversation_not_found', param: /^conversation$/ }, 'param names the field sent, not the path\'s conversation_id')
  const asObject = await rejection(b.responses.create({ model: 'gpt-4o', input: 'hi', conversation: { id: conv.id } } as never))
  t.match(asObject, { status: 404, code: 'conversation_not_found', param: /^conversation$/ }, '{ id } form too')
  // OpenAI answers a previous_response_id it cannot find 400 (BadRequestError), not 404: clients that start again
  // with the whole context on that error (as its conversation-state guide has them) catch it by that status.
  const notPrevious = await rejection(b.responses.create({ model: 'gpt-4o', input: 'hi', previous_response_id: response.id }))
  t.type(notPrevious, OpenAI.BadRequestError)
  t.match(notPrevious, { status: 400, code: 'previous_response_not_found', param: 'previous_response_id', type: 'invalid_request_error' })
  for (const [label, call] of [
    ['retrieve', () => b.responses.retrieve(response.id)],
    ['input_items', () => b.responses.inputItems.list(response.id)],
    ['cancel', () => b.responses.cancel(response.id)],
    ['delete', () => b.responses.delete(response.id)]
  ] as const) {
    const e = await rejection(call())
    t.type(e, OpenAI.NotFoundError, `${label}: NotFoundError`)
    t.match(e, { status: 404, code: 'response_not_found', param: 'response_id' })
  }
  t.same(upstreamCalls(upstream, before), ['GET /v1/conversations/conv_x', 'GET /v1/responses/resp_x'],
    'nothing of B reached the upstream but a lookup of each, as a missing id costs')

  const chained = await a.responses.create({ model: 'gpt-4o', input: 'again', previous_response_id: response.id, conversation: undefined })
  t.equal(chained.previous_response_id, response.id, 'A may chain its own responses')
  const cancelled = await a.responses.cancel(response.id)
  t.equal(cancelled.status, 'cancelled')
  t.notMatch(JSON.stringify(cancelled), /gateway_owner/)
  t.equal((await sdk(KEYS.admin).responses.retrieve(response.id)).id, response.id, 'an admin reads it')
  await a.responses.delete(chained.id)
  const gone = await rejection(a.responses.create({ model: 'gpt-4o', input: 'more', previous_response_id: chained.id }))
  t.type(gone, OpenAI.BadRequestError, 'A\'s own previous response, deleted: the 400 OpenAI answers, the same as B got')
  t.match(gone, { status: 400, code: 'previous_response_not_found', param: 'previous_response_id' })

  const denied = gw.audit().filter(r => r.clientId === 'team-other')
  t.equal(denied.length, 7)
  t.same(denied.map(r => r.status), [404, 404, 400, 404, 404, 404, 404])
  t.ok(denied.every(r => r.outcome === 'denied' && r.ownerId === 'team-full'), 'audited denied, naming the owner')
  const neverMade = await rejection(b.responses.create({ model: 'gpt-4o', input: 'hi', conversation: 'conv_never_made' }))
  t.match(neverMade, { status: 404, code: 'conversation_not_found', param: /^conversation$/ }, 'a conversation that does not exist: the same param')

  // A fresh gateway (empty cache) finds the owner in the response's metadata upstream.
  const restarted = await startGateway(t, testConfig(upstream.url))
  const b2 = new OpenAI({ apiKey: KEYS.other, baseURL: `${restarted.url}/v1`, maxRetries: 0 })
  t.match(await rejection(b2.responses.retrieve(response.id)), { status: 404, code: 'response_not_found' })
  t.same(upstreamCalls(upstream).slice(-1), ['GET /v1/responses/resp_x'], 'after the only call upstream: the gateway\'s lookup')
})

/** The request ids of the records `audit query --response <id>` finds in the gateway's audit file, in order. */
async function queriedByResponse (gw: TestGateway, responseId: string): Promise<string[]> {
  const { queryFiles } = await import('../src/audit/query.js')
  const { FLAGS } = await import('../src/cli/audit-query.js')
  await gw.auditFile()
  const found: string[] = []
  await queryFiles([gw.config.audit.file], [FLAGS.response.filter(responseId)], Infinity, record => {
    found.push(String(record.requestId))
    return true
  })
  return found
}

t.test('a create refused another team\'s previous response is audited with that response\'s id, and audit query --response finds it', async t => {
  // The record named the owner (team-full) but not the response B was after: beside B's own conversation it read as
  // though that conversation were team-full's, and `audit query --response` did not find the attempt at all.
  const { gw, sdk } = await setup(t)
  const a = sdk(KEYS.full)
  const b = sdk(KEYS.other)
  const response = await a.responses.create({ model: 'gpt-4o', input: 'secret' })
  const own = await b.conversations.create({})
  t.type(await rejection(b.responses.create({ model: 'gpt-4o', input: 'hi', previous_response_id: response.id })), OpenAI.BadRequestError)
  t.type(await rejection(b.responses.create({ model: 'gpt-4o', input: 'hi', conversation: own.id, previous_response_id: response.id })), OpenAI.BadRequestError)
  const chained = await a.responses.create({ model: 'gpt-4o', input: 'more', previous_response_id: response.id })

  const creates = gw.audit().filter(r => r.action === 'response.create')
  t.match(creates[0], { clientId: 'team-full', responseId: response.id, previousResponseId: null })
  t.match(creates[1], { clientId: 'team-other', outcome: 'denied', ownerId: 'team-full', conversationId: null, previousResponseId: response.id },
    'the refused call names the response it was after')
  t.match(creates[2], { clientId: 'team-other', outcome: 'denied', ownerId: 'team-full', conversationId: own.id, previousResponseId: response.id },
    'beside its own conversation too: the owner named is the previous response\'s')
  t.match(creates[3], { clientId: 'team-full', outcome: 'ok', responseId: chained.id, previousResponseId: response.id }, 'and a served one the response it continues')

  t.same(await queriedByResponse(gw, response.id), creates.map(r => r.requestId),
    'audit query --response finds every call that named the response, the refused ones included')
})

t.test('an admin\'s generation in a team\'s conversation is audited with the conversation\'s owner, as the admin\'s items there are: audit query --owner finds both', async t => {
  // The create's record named the admin, its items.create the team: `audit query --owner team-full` missed the
  // generation an admin wrote into team-full's conversation.
  const { gw, sdk } = await setup(t)
  const conv = await sdk(KEYS.full).conversations.create({})
  const admin = sdk(KEYS.admin)
  await admin.conversations.items.create(conv.id, { items: [{ type: 'message', role: 'user', content: 'from ops' }] })
  const response = await admin.responses.create({ model: 'gpt-4o', input: 'hi', conversation: conv.id })
  const stream = await admin.responses.create({ model: 'gpt-4o', input: 'hi', conversation: conv.id, stream: true })
  for await (const event of stream) void event
  const own = await admin.responses.create({ model: 'gpt-4o', input: 'hi' })

  const byAdmin = gw.audit().filter(r => r.clientId === 'ops-admin')
  t.match(byAdmin.map(r => [r.action, r.ownerId, r.conversationId]), [
    ['item.create', 'team-full', conv.id], ['response.create', 'team-full', conv.id], ['response.create', 'team-full', conv.id],
    ['response.create', 'ops-admin', null]
  ], 'each names the conversation\'s owner; a response of the admin\'s own, outside any conversation, the admin')
  t.match(byAdmin[1], { responseId: response.id, outcome: 'ok' })
  t.match(byAdmin[3], { responseId: own.id, outcome: 'ok' })

  const { queryFiles } = await import('../src/audit/query.js')
  const { FLAGS } = await import('../src/cli/audit-query.js')
  await gw.auditFile()
  const found: string[] = []
  await queryFiles([gw.config.audit.file], [FLAGS.owner.filter('team-full'), FLAGS.client.filter('ops-admin')], Infinity, record => {
    found.push(String(record.action))
    return true
  })
  t.same(found, ['item.create', 'response.create', 'response.create'], 'audit query --owner team-full --client ops-admin finds all three')
})

t.test('a call on a response refused before its checks (wrong key, missing scope, rate limit, bad query) is audited with that response\'s id, and audit query --response finds it', async t => {
  // The records of these calls had no responseId (and stream null on a streamed retrieve), where a conversation's
  // calls refused the same way keep the conversation's id from the path: `audit query --response` missed them.
  const { gw, sdk } = await setup(t)
  const response = await sdk(KEYS.full).responses.create({ model: 'gpt-4o', input: 'hi' })
  const refused: Array<[string, Promise<unknown>, new (...args: any[]) => unknown]> = [
    ['a wrong key', sdk('ogw_not-a-real-key').responses.retrieve(response.id), OpenAI.AuthenticationError],
    ['a read-only key deleting', sdk(KEYS.reader).responses.delete(response.id), OpenAI.PermissionDeniedError],
    ['a read-only key cancelling', sdk(KEYS.reader).responses.cancel(response.id), OpenAI.PermissionDeniedError],
    ['an unknown query parameter', sdk(KEYS.full).responses.retrieve(response.id, {}, { query: { stream: 'true', foo: '1' } }), OpenAI.BadRequestError]
  ]
  for (const [what, call, type] of refused) t.type(await rejection(call), type, what)
  // team-limited's burst is 3: the fourth streamed retrieve is refused by its rate limit.
  const limited = sdk(KEYS.limited)
  for (let i = 0; i < 4; i++) await limited.responses.retrieve(response.id, { stream: true }).then(() => null, (e: unknown) => e)

  const records = gw.audit().slice(1)
  t.same(records.map(r => [r.action, r.status, r.responseId, r.stream]), [
    ['response.retrieve', 401, response.id, false],
    ['response.delete', 403, response.id, false],
    ['response.cancel', 403, response.id, false],
    ['response.retrieve', 400, response.id, true],
    ['response.retrieve', 404, response.id, true],
    ['response.retrieve', 404, response.id, true],
    ['response.retrieve', 404, response.id, true],
    ['response.retrieve', 429, response.id, true]
  ], 'each record names the response from its path, and a streamed retrieve says it asked for a stream')

  t.same(await queriedByResponse(gw, response.id), gw.audit().map(r => r.requestId), 'audit query --response finds the create and every refused call')
})

t.test('a conversation or previous_response_id of another shape than the API takes is a 400 before anything goes upstream, not an unchecked call', async t => {
  const { upstream, gw } = await setup(t)
  const cases: Array<[string, Record<string, unknown>, string]> = [
    ['conversation as a number', { conversation: 5 }, 'conversation'],
    ['conversation as a list', { conversation: ['conv_x'] }, 'conversation'],
    ['conversation as an object without a string id', { conversation: { id: 5 } }, 'conversation'],
    ['previous_response_id as an object', { previous_response_id: { id: 'resp_x' } }, 'previous_response_id']
  ]
  for (const [label, extra, param] of cases) {
    const before = upstream.requests.length
    const res = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'gpt-4o', input: 'hi', ...extra })
    })
    t.equal(res.status, 400, label)
    t.match(await res.json(), { error: { code: 'invalid_request', param } }, `${label}: names the parameter`)
    t.equal(upstream.requests.length, before, `${label}: nothing went upstream`)
  }
  const fine = await fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o', input: 'hi', conversation: null, previous_response_id: null })
  })
  t.equal(fine.status, 200, 'null is no conversation and no previous response')
})

t.test('a conversation or previous_response_id string that is no id is a 404 (400) that quotes it cut short: a client cannot have megabytes echoed back', async t => {
  const { upstream, gw } = await setup(t)
  const long = 'c'.repeat(100_000)
  for (const [param, code] of [['conversation', 'conversation_not_found'], ['previous_response_id', 'previous_response_not_found']] as const) {
    const before = upstream.requests.length
    const res = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'gpt-4o', input: 'hi', [param]: long })
    })
    t.equal(res.status, param === 'conversation' ? 404 : 400, param)
    const text = await res.text()
    t.ok(text.length < 1000, `${param}: the answer is ${text.length} bytes, not the whole id again`)
    const { error } = JSON.parse(text) as { error: { code: string, message: string } }
    t.equal(error.code, code)
    t.match(error.message, `'${'c'.repeat(200)}…'`, `${param}: the first 200 characters are quoted, and marked as cut`)
    t.equal(upstream.requests.length, before, `${param}: nothing went upstream`)
  }
})

t.test('a key the gateway does not read but a case-blind JSON reader (Go\'s) would take for one it checked is a 400 before the upstream: no way to another team\'s response, conversation or item, nor past the models list', async t => {
  const { upstream, gw, sdk } = await setup(t, {
    clients: [
      { id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write', 'delete'] },
      { id: 'team-other', keySha256: keyDigest(KEYS.other), scopes: ['read', 'write'], models: ['gpt-4o-mini'] }
    ]
  })
  const a = sdk(KEYS.full)
  const conv = await a.conversations.create({ items: [{ type: 'message', role: 'user', content: 'secret' }] })
  const response = await a.responses.create({ model: 'gpt-4o', input: 'secret', store: true })
  const item = (await a.conversations.items.list(conv.id)).data[0]!
  const own = await sdk(KEYS.other).conversations.create({})
  const cases: Array<[string, Record<string, unknown>, string]> = [
    ['Previous_Response_Id', { Previous_Response_Id: response.id }, 'Previous_Response_Id'],
    ['previouſ_response_id (long s)', { 'previou\u017f_response_id': response.id }, 'previou\u017f_response_id'],
    ['Conversation', { Conversation: conv.id }, 'Conversation'],
    ['conversation { id, ID }', { conversation: { id: own.id, ID: conv.id } }, 'conversation.ID'],
    ['MODEL beside an allowed model', { MODEL: 'gpt-4o' }, 'MODEL'],
    ['an input item that is a reference by TYPE', { conversation: own.id, input: [{ type: 'message', TYPE: 'item_reference', id: item.id }] }, 'input[0].TYPE']
  ]
  const before = upstream.requests.length
  for (const [label, extra, param] of cases) {
    const res = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'gpt-4o-mini', input: 'hi', ...extra })
    })
    t.equal(res.status, 400, `${label}: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', type: 'invalid_request_error', param } }, `${label}: names the key`)
  }
  const items = await fetch(`${gw.url}/v1/conversations/${own.id}/items`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.other}`, 'content-type': 'application/json' },
    body: JSON.stringify({ items: [{ Type: 'item_reference', id: item.id }] })
  })
  t.equal(items.status, 400, 'an item.create with Type: 400')
  t.same(upstreamCalls(upstream, before), [], 'none of them went upstream')
  t.equal((await sdk(KEYS.other).responses.create({ model: 'gpt-4o-mini', input: 'hi', conversation: { id: own.id } } as never)).model, 'gpt-4o-mini',
    'the lowercase keys are served as before')
})

t.test('clients[].models: a model outside the list gets 403 model_not_allowed before the upstream', async t => {
  const { upstream, gw, sdk } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], models: ['gpt-4o-mini', 'gpt-4.1*', 'o?-mini'] }]
  })
  const a = sdk(KEYS.full)
  for (const model of ['gpt-4o', 'gpt-4o-mini-2', 'claude-3', 'o10-mini']) {
    const e = await rejection(a.responses.create({ model, input: 'x' }))
    t.type(e, OpenAI.PermissionDeniedError, `${model}: PermissionDeniedError`)
    t.match(e, { status: 403, code: 'model_not_allowed', type: 'invalid_request_error', param: 'model' })
  }
  t.equal(upstream.requests.length, 0, 'none reached the upstream')
  for (const model of ['gpt-4o-mini', 'gpt-4.1', 'gpt-4.1-nano', 'o3-mini']) {
    t.equal((await a.responses.create({ model, input: 'x' })).model, model, `${model} is allowed`)
  }
  t.match(gw.audit()[0], { status: 403, outcome: 'denied', model: 'gpt-4o', stream: false },
    'the refusal is audited with the model asked for (audit query --model finds who asked for one outside the list)')
  t.match(gw.audit()[0], { inputTokens: null, outputTokens: null, responseId: null })
})

t.test('models and the token budget cannot be got round with Model or Background in another case: 400, nothing upstream', async t => {
  // An upstream whose JSON reader ignores case (Go's) would take the later "Model" for the model the gateway checked.
  const { upstream, gw } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], models: ['gpt-4o-mini'], rateLimit: { tokensPerMinute: 1000 } }]
  })
  for (const [body, param] of [
    [{ model: 'gpt-4o-mini', Model: 'gpt-4o', input: 'x' }, 'Model'],
    [{ model: 'gpt-4o-mini', input: 'x', BACKGROUND: true }, 'BACKGROUND'],
    [{ model: 'gpt-4o-mini', input: 'x', Stream: true }, 'Stream']
  ] as const) {
    const res = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST', body: JSON.stringify(body), headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }
    })
    t.equal(res.status, 400, `${param}: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', param } }, `${param}: unknown_parameter`)
  }
  t.equal(upstream.requests.length, 0, 'none reached the upstream')
})

t.test('an error that quotes what the client sent, cut short, never cuts a character in two (a half alone is no text: JSON spells it \\ud83d, and Python cannot print it)', async t => {
  const { upstream, gw } = await setup(t, { clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], models: ['gpt-4o-mini'] }] })
  const LONE_HALF = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/
  const refused = async (res: Response, status: number, what: string) => {
    const text = await res.text()
    t.equal(res.status, status, `${what}: ${status}`)
    t.notOk(/\\ud[89ab][0-9a-f]{2}/i.test(text), `${what}: no half of a character spelled in the answer`)
    const { error } = JSON.parse(text) as { error: { message: string, param: string | null } }
    t.notOk(LONE_HALF.test(error.message) || LONE_HALF.test(error.param ?? ''), `${what}: its message and param are whole text`)
  }
  // The model is quoted to 100 characters, a parameter's name to 40: the emoji straddles the cut.
  for (const model of ['x'.repeat(99) + '\u{1F600}', 'x'.repeat(98) + '\u{1F600}\u{1F600}']) {
    const res = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: JSON.stringify({ model, input: 'x' })
    })
    await refused(res, 403, `a model of ${model.length} units`)
  }
  const name = encodeURIComponent('x'.repeat(39) + '\u{1F600}')
  await refused(await fetch(`${gw.url}/v1/conversations/conv_1?${name}=1`, { headers: { authorization: `Bearer ${KEYS.full}` } }), 400, 'a query parameter\'s name')
  t.equal(upstream.requests.length, 0, 'none reached the upstream')
  // An id the body names and the upstream does not have, quoted to 200 units; the upstream's own error text, quoted
  // to 500 (an answer not in OpenAI's envelope) or 1,000 (an owner lookup's refusal).
  const post = (path: string, body: unknown) => fetch(`${gw.url}${path}`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: JSON.stringify(body)
  })
  const id = (prefix: string) => prefix + 'x'.repeat(199 - prefix.length) + '\u{1F600}'
  await refused(await post('/v1/responses', { model: 'gpt-4o-mini', input: 'x', previous_response_id: id('resp_') }), 400, 'a previous_response_id not found')
  await refused(await post('/v1/responses', { model: 'gpt-4o-mini', input: 'x', conversation: id('conv_') }), 404, 'a conversation not found')
  const { id: conversation } = await (await post('/v1/conversations', {})).json() as { id: string }
  await refused(await post(`/v1/conversations/${conversation}/items`, { items: [{ type: 'item_reference', id: id('msg_') }] }), 404, 'an item not found')
  const text = (units: number) => 'x'.repeat(units - 1) + '\u{1F600}'
  upstream.respond = (_req, res) => { res.writeHead(400, { 'content-type': 'application/json' }).end(JSON.stringify({ detail: text(500) })) }
  await refused(await fetch(`${gw.url}/v1/conversations/${conversation}`, { headers: { authorization: `Bearer ${KEYS.full}` } }), 400, 'the upstream\'s error text')
  upstream.respond = (_req, res) => { res.writeHead(402, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: text(1000), type: text(1000), code: text(1000) } })) }
  await refused(await fetch(`${gw.url}/v1/conversations/conv_other`, { headers: { authorization: `Bearer ${KEYS.full}` } }), 402, 'an owner lookup\'s refusal')
})

t.test('a long model string that nearly matches a models glob is refused without stalling the gateway (no backtracking match)', async t => {
  const { upstream, gw } = await setup(t, {
    clients: [
      { id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], models: ['*gpt*mini*'] },
      { id: 'team-other', keySha256: keyDigest(KEYS.other), scopes: ['read', 'write'] }
    ]
  })
  const create = async (key: string, model: string) => await fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify({ model, input: 'x' })
  })
  // 900 kB, within the body limit: a regular expression ^.*gpt.*mini.*$ would take minutes on it, the event loop held.
  const long = await create(KEYS.full, 'gpt'.repeat(300_000))
  t.equal(long.status, 403)
  t.match(await long.json(), { error: { code: 'model_not_allowed', param: 'model' } })
  t.equal((await create(KEYS.other, 'gpt-4o')).status, 200, 'the other team is served')
  t.equal((await create(KEYS.full, 'gpt-4o-mini')).status, 200, 'a model the glob matches is served')
  t.equal(upstream.requests.length, 2)
})

t.test('a key with a models list must name the model (a stored prompt\'s own is not checked), and a key with a token budget cannot ask for a background response', async t => {
  const { upstream, gw } = await setup(t, {
    clients: [
      { id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], models: ['gpt-4o-mini'] },
      { id: 'team-other', keySha256: keyDigest(KEYS.other), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 100 } }
    ]
  })
  const create = async (key: string, body: unknown) => await fetch(`${gw.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify(body)
  })
  const noModel = await create(KEYS.full, { prompt: { id: 'pmpt_1' }, input: 'x' })
  t.equal(noModel.status, 403)
  t.match(await noModel.json(), { error: { code: 'model_not_allowed', param: 'model', message: /name one in "model"/ } })
  const background = await create(KEYS.other, { model: 'gpt-4o-mini', input: 'x', background: true })
  t.equal(background.status, 403)
  t.match(await background.json(), { error: { code: 'background_not_allowed', param: 'background' } })
  t.equal(upstream.requests.length, 0, 'neither reached the upstream')
  t.match(gw.audit(), [{ status: 403, outcome: 'denied', model: null }, { status: 403, outcome: 'denied', model: 'gpt-4o-mini' }])
  for (const loose of ['true', 1]) {
    const res = await create(KEYS.other, { model: 'gpt-4o-mini', input: 'x', background: loose })
    t.equal(res.status, 403, `background: ${JSON.stringify(loose)}, which a loose reader takes for true: 403 too`)
  }
  t.equal(upstream.requests.length, 0, 'none of them reached the upstream')
  t.equal((await create(KEYS.other, { model: 'gpt-4o-mini', input: 'x', background: false })).status, 200, 'background: false is served')
  t.equal((await create(KEYS.other, { model: 'gpt-4o-mini', input: 'x' })).status, 200, 'the same key, in the foreground: served')
})

t.test('a model that is not a string is a 400 invalid_type, with or without a models list, before the upstream', async t => {
  for (const models of [undefined, ['gpt-4o-mini']]) {
    const { upstream, gw } = await setup(t, {
      clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], ...(models === undefined ? {} : { models }) }]
    })
    for (const model of [5, null, ['gpt-4o-mini'], { id: 'gpt-4o-mini' }]) {
      const res = await fetch(`${gw.url}/v1/responses`, {
        method: 'POST',
        headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model, input: 'x' })
      })
      t.equal(res.status, 400, `model ${JSON.stringify(model)}${models === undefined ? '' : ', a models list'}: 400`)
      t.match(await res.json(), { error: { code: 'invalid_type', type: 'invalid_request_error', param: 'model' } })
    }
    t.equal(upstream.requests.length, 0, 'none reached the upstream')
  }
})

t.test('a stream that is not a boolean is a 400 invalid_type before the upstream, audited as no answer of stream', async t => {
  // It was passed on, and audited stream: false, though an upstream that reads loosely takes "true" or 1 for true
  // and streams: the audit said otherwise, and the checks that a stream must end were off.
  const { upstream, gw } = await setup(t)
  const create = (stream: unknown) => fetch(`${gw.url}/v1/responses`, {
    method: 'POST',
    headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o-mini', input: 'x', stream })
  })
  for (const stream of ['true', 1, 'false', 0, {}, ['true']]) {
    const res = await create(stream)
    t.equal(res.status, 400, `stream ${JSON.stringify(stream)}: 400`)
    t.match(await res.json(), { error: { code: 'invalid_type', type: 'invalid_request_error', param: 'stream' } })
  }
  t.equal(upstream.requests.length, 0, 'none reached the upstream')
  t.match(gw.audit(), Array(6).fill({ status: 400, outcome: 'invalid', stream: null, model: 'gpt-4o-mini' }), 'audited with stream null, not false')
  t.equal((await create(null)).status, 200, 'stream: null (OpenAI\'s "boolean or null") is served, not streamed')
  t.equal(gw.audit()[6]?.stream, false)
})

t.test('a gateway key given as the model is a 400 credentials_in_body before the upstream: it would reach it, and come back in its answer', async t => {
  // A key in a URL, an id or a header never leaves the gateway; one passed as the model (two settings swapped) went
  // upstream as it came, and the upstream's answer (its model, or "The model ... does not exist") gave it back.
  const { upstream, gw, sdk } = await setup(t)
  for (const model of [KEYS.other, `ft:gpt-4o:${KEYS.other}`]) {
    const err = await rejection(sdk(KEYS.full).responses.create({ model, input: 'hi' }))
    t.type(err, OpenAI.BadRequestError)
    t.match(err, { status: 400, code: 'credentials_in_body', param: 'model' })
    t.notMatch(JSON.stringify((err as InstanceType<typeof OpenAI.APIError>).error), KEYS.other, 'the answer does not quote it')
  }
  t.equal(upstream.requests.length, 0, 'nothing reached the upstream')
  t.match(gw.audit(), [{ status: 400, outcome: 'invalid', model: 'ogw_[withheld]' }, { status: 400, model: 'ft:gpt-4o:ogw_[withheld]' }])
})

t.test('a model string as long as the body limit allows is cut in the audit record: a client cannot write megabytes into the audit with each call', async t => {
  const { gw } = await setup(t)
  const model = 'gpt-4o-'.repeat(150_000) // 1 MB, a string the fake takes (and echoes, as a loose upstream might)
  for (const conversation of [undefined, 'conv_nosuch']) {
    const res = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST',
      headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model, input: 'x', ...(conversation === undefined ? {} : { conversation }) })
    })
    t.equal(res.status, conversation === undefined ? 200 : 404)
    await res.arrayBuffer()
  }
  const records = await gw.auditFile()
  t.equal(records.length, 2)
  for (const record of records) {
    t.equal(record.model, model.slice(0, 256), `${record.status}: the model, cut at 256 characters`)
  }
})

async function budgetFlow (t: Test, store?: Record<string, unknown>) {
  const { upstream, sdk } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 12 } }],
    ...(store === undefined ? {} : { store })
  })
  const a = sdk(KEYS.full)
  const first = await a.responses.create({ model: 'gpt-4o', input: 'a b c' }).withResponse() // 3 in + 4 out
  t.equal(first.data.usage?.total_tokens, 7)
  t.equal(first.response.headers.get('x-ratelimit-limit-tokens'), '12')
  t.equal(first.response.headers.get('x-ratelimit-remaining-tokens'), '12', 'the budget before this call')
  await sleep(50)
  const second = await a.responses.create({ model: 'gpt-4o', input: 'a b c' }).withResponse()
  t.equal(second.response.headers.get('x-ratelimit-remaining-tokens'), '5', 'charged with the 7 tokens the fake reported')
  await sleep(50)
  const over = await rejection(a.responses.create({ model: 'gpt-4o', input: 'a' }))
  t.type(over, OpenAI.RateLimitError, 'past the budget (5 - 7 < 0): RateLimitError')
  const e = over as InstanceType<typeof OpenAI.RateLimitError>
  t.match(e, { status: 429, type: 'tokens', code: 'rate_limit_exceeded' })
  t.equal(e.headers?.get('x-ratelimit-remaining-tokens'), '0')
  t.ok(Number(e.headers?.get('retry-after')) >= 1)
  t.equal(e.headers?.get('x-should-retry'), null, 'a wait of seconds: the SDKs wait it out and retry')
  t.equal(upstream.requests.length, 2, 'the refused call never reached the upstream')
  t.ok((await a.conversations.create({})).id, 'other calls are not held by the token budget')
}

t.test('rateLimit.tokensPerMinute: charged from the usage of each answer; over it, 429 type tokens on the next call (memory store)', async t => {
  await budgetFlow(t)
})

t.test('the token budget with the Redis store', async t => {
  const redis = await startRedis(t)
  await budgetFlow(t, { url: redis.url, timeoutMs: 2000 })
})

t.test('a token budget in debt for minutes: the SDK, retries on, raises RateLimitError at once instead of sleeping through retry-after', async t => {
  const { upstream, gw } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 1 } }]
  })
  let sent = 0
  // (the SDK's default retries, two: it sleeps what retry-after-ms says, however long, before it sends the call again)
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, fetch: async (url, init) => { sent++; return await fetch(url, init) } })
  await client.responses.create({ model: 'gpt-4o', input: 'a b c' }) // 7 tokens of a budget of 1 a minute: 6 in debt
  const err = await rejection(client.responses.create({ model: 'gpt-4o', input: 'a' }))
  t.type(err, OpenAI.RateLimitError)
  const e = err as InstanceType<typeof OpenAI.RateLimitError>
  t.match(e, { status: 429, type: 'tokens', code: 'rate_limit_exceeded' })
  t.ok(Number(e.headers?.get('retry-after')) > 60, 'retry-after still says when: in minutes')
  t.equal(e.headers?.get('x-should-retry'), 'false')
  t.equal(sent, 2, 'the refused call was sent once, not again')
  t.equal(upstream.requests.length, 1, 'and never reached the upstream')
})

t.test('a hung Redis (open) holds a budgeted generation one store.timeoutMs, not one for its request bucket and one more for its budget', async t => {
  const redis = await startRedis(t)
  // Long enough that a loaded machine's own delays (a timer firing late) stay well under the second timeout
  // that two questions in a row would add: with 400 ms one run took 805 ms.
  const timeoutMs = 1000
  const { gw } = await setup(t, {
    clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: { tokensPerMinute: 1000 } }],
    store: { url: redis.url, timeoutMs, onFailure: 'open' }
  })
  const generate = () => fetch(`${gw.url}/v1/responses`, {
    method: 'POST',
    headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o-mini', input: 'hello' })
  })
  t.equal((await generate()).status, 200, 'a healthy Redis answers')
  redis.pause()
  t.teardown(() => { redis.resume() })
  const started = Date.now()
  const res = await generate()
  const took = Date.now() - started
  t.equal(res.status, 200, 'served from the local buckets')
  // The first call's budget charge may still wait on the paused Redis: this call's questions must not queue behind it
  // (as ioredis auto-pipelining would hold it; see the Redis store's own test).
  t.ok(took < 2 * timeoutMs, `answered in ${took} ms: the README promises no call waits on Redis longer than store.timeoutMs (${timeoutMs} ms)`)
})
