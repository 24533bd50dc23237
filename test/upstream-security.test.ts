// The upstream hop carries the one secret that matters: verified TLS, an allow-list of request headers, and
// only the eight operations' routes registered.
import { readFileSync } from 'node:fs'
import { request, type IncomingMessage, type RequestOptions, type ServerResponse } from 'node:http'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import OpenAI from 'openai'
import t from 'tap'
import type { FastifyBaseLogger } from 'fastify'
import { parseConfig } from '../src/config.js'
import { REFUSED_LOG_INTERVAL_MS, RefusedTokenLog } from '../src/upstream/refused-token.js'
import { call, type CallOptions } from './fixtures/client.js'
import { eventually } from './fixtures/eventually.js'
import { buildRequest, sendRaw } from './fixtures/raw-http.js'
import { startRedis } from './fixtures/redis-server.js'
import { KEYS, startGateway, testConfig, withoutOwnership } from './fixtures/gateway.js'
import { startUpstream, UPSTREAM_TOKEN } from './fixtures/upstream.js'

const TLS_DIR = join(import.meta.dirname, 'fixtures', 'tls')
const tls = {
  key: readFileSync(join(TLS_DIR, 'server.key'), 'utf8'),
  cert: readFileSync(join(TLS_DIR, 'server.pem'), 'utf8')
}
function httpRequest (url: string, opts: RequestOptions & { body: string }): Promise<IncomingMessage & { status: number }> {
  return new Promise((resolve, reject) => {
    const req = request(url, opts, res => {
      res.resume()
      res.on('end', () => resolve(Object.assign(res, { status: res.statusCode ?? 0 })))
    })
    req.on('error', reject)
    req.end(opts.body)
  })
}

const auth = { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }

t.test('an upstream whose certificate the gateway cannot verify gets no request and the client gets 502', async t => {
  const upstream = await startUpstream({ tls })
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const res = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(res.status, 502)
  const body = await res.json() as { error: { message: string, code: string, type: string } }
  t.equal(body.error.code, 'upstream_unavailable')
  t.equal(body.error.type, 'server_error')
  t.notMatch(body.error.message, /certificate|self.signed|TLS|SSL|127\.0\.0\.1|UNABLE|DEPTH/i, 'no TLS internals')
  t.equal(upstream.requests.length, 0, 'the token never left: no HTTP request reached the upstream')
  t.match(gw.audit(), [{ status: 502, outcome: 'upstream_error', upstreamMs: null }])
})

t.test('the same upstream works once upstream.caFile names the CA that signed it', async t => {
  const upstream = await startUpstream({ tls })
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, caFile: join(TLS_DIR, 'ca.pem') } })
  const res = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(res.status, 200)
  t.equal(upstream.requests.length, 1)
  t.equal(upstream.requests[0]!.headers.authorization, `Bearer ${UPSTREAM_TOKEN}`)
})

t.test('a line in plain http:// beyond this machine is named at start and on reload: the token would cross the network in clear', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const baseUrls = [upstream.url, 'https://line-b.example', 'http://line-c.example:8080/api', 'http://localhost:9', 'http://[::1]:9']
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, baseUrls } })
  const cleartext = () => gw.logs.filter(l => l.includes('"level":40') && l.includes('plain HTTP'))
  t.equal(cleartext().length, 1, 'one warning, for the one line beyond loopback without TLS')
  t.match(cleartext()[0], /line 2 \(http:\/\/line-c\.example:8080\)/, 'naming the line')
  t.notMatch(cleartext()[0], UPSTREAM_TOKEN)
  gw.app.applyConfig({ ...config, upstream: { ...config.upstream, baseUrls: [upstream.url, 'http://line-d.example'] } })
  t.equal(cleartext().length, 2, 'a reload that brings one in warns again')
  t.match(cleartext()[1], /line 1 \(http:\/\/line-d\.example\)/)
  const res = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(res.status, 200, 'a warning, not a refusal: loopback and sidecar upstreams stay usable')
})

t.test('the upstream gets only the headers it needs, and our token last', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  // node:http, not fetch: fetch refuses to send Connection and Keep-Alive itself.
  const res = await httpRequest(`${gw.url}/v1/conversations?limit=2&after=x%7E1`, {
    method: 'POST',
    headers: {
      ...auth,
      'content-type': 'application/json',
      'x-api-key': KEYS.full,
      'api-key': KEYS.full,
      cookie: `session=${KEYS.full}`,
      'x-forwarded-for': '6.6.6.6',
      'x-forwarded-host': 'evil.example',
      'x-forwarded-proto': 'http',
      forwarded: 'for=6.6.6.6',
      via: '1.1 evil',
      'x-real-ip': '6.6.6.6',
      'openai-organization': 'org-client',
      'x-stainless-os': 'Linux',
      'x-client-request-id': 'forged',
      'idempotency-key': 'idem-1',
      accept: 'application/json',
      'user-agent': 'team-search/1.0',
      connection: 'keep-alive, x-custom-hop',
      'x-custom-hop': 'hop',
      'keep-alive': 'timeout=5'
    },
    body: '{"metadata":{"a":"b"}}'
  })
  t.equal(res.status, 200)
  const seen = upstream.requests[0]!
  t.equal(seen.url, '/v1/conversations?limit=2&after=x%7E1', 'the query string is forwarded byte for byte')
  t.same(Object.keys(seen.headers).sort(), [
    'accept', 'authorization', 'connection', 'content-length', 'content-type', 'host', 'idempotency-key',
    'user-agent', 'x-client-request-id'
  ])
  t.equal(seen.headers.authorization, `Bearer ${UPSTREAM_TOKEN}`)
  t.equal(seen.headers['x-client-request-id'], res.headers['x-gateway-request-id'], 'our request id, not the forged one')
  t.match(seen.headers['idempotency-key'], /^[0-9a-f]{64}$/, 'the Idempotency-Key, made the client\'s own (ownership.test.ts)')
  t.equal(seen.headers['user-agent'], 'team-search/1.0')
  t.equal(seen.body.toString(), '{"metadata":{"a":"b","gateway_owner":"team-full"}}', 'the body, with only the owner added')
  t.notOk(upstream.everything().includes(KEYS.full), 'the client key is nowhere upstream')
  t.notOk(upstream.everything().includes('6.6.6.6'), 'no client-supplied forwarding header')
})

t.test('a call whose API takes no body (a delete, a cancel) passes none upstream: what a client sends with one goes unchecked', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  // What a client might put there: another team's ids, the key the gateway keeps the owner in.
  const body = '{"conversation_id":"conv_of_another_team","conversation":"conv_of_another_team","metadata":{"gateway_owner":"team-other"}}'
  const calls: Array<[string, string]> = [
    ['DELETE', '/v1/conversations/conv_1'], ['DELETE', '/v1/conversations/conv_1/items/msg_1'],
    ['DELETE', '/v1/responses/resp_1'], ['POST', '/v1/responses/resp_1/cancel']
  ]
  for (const [method, path] of calls) {
    const res = await httpRequest(`${gw.url}${path}`, { method, headers: { ...auth, 'content-length': body.length }, body })
    t.ok(res.status < 500, `${method} ${path}: answered (${res.status})`)
    const seen = upstream.requests.at(-1)!
    t.equal(`${seen.method} ${seen.url}`, `${method} ${path}`)
    t.equal(seen.body.length, 0, `${method} ${path}: no body upstream`)
    t.not(seen.headers['content-length'], String(body.length), 'nor its length')
  }
  await new Promise(resolve => setTimeout(resolve, 20))
  t.ok(gw.audit().slice(-4).every(r => r.bytesIn === body.length), 'the body read is still counted in the audit')
  const bad = await httpRequest(`${gw.url}/v1/conversations/conv_1`, { method: 'DELETE', headers: { ...auth, 'content-length': 5 }, body: '{"a":' })
  t.equal(bad.status, 400, 'a body that is not JSON is still refused, as on every call')
})

t.test('a gateway key a client put in its User-Agent or Accept reaches neither the upstream nor the audit record', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const sdk = new OpenAI({
    apiKey: KEYS.full,
    baseURL: `${gw.url}/v1`,
    maxRetries: 0,
    // (an app that tags its calls with its credentials, as some debugging setups do)
    defaultHeaders: { 'User-Agent': `team-search/1.0 key=${KEYS.full}`, Accept: `application/json; k=${KEYS.other}` }
  })
  await sdk.conversations.create({ metadata: { a: 'b' } })
  const seen = upstream.requests[0]!
  t.equal(seen.headers['user-agent'], 'team-search/1.0 key=ogw_[withheld]')
  t.equal(seen.headers.accept, 'application/json; k=ogw_[withheld]')
  t.notOk(upstream.everything().includes(KEYS.full), 'the client key is nowhere upstream')
  t.notOk(upstream.everything().includes(KEYS.other), 'nor any other key')
  const [record] = await gw.auditFile()
  t.equal(record!.userAgent, 'team-search/1.0 key=ogw_[withheld]')
  t.notMatch(JSON.stringify(record), KEYS.full)
})

t.test('a gateway key a client put in its Host header stays out of the log (its request lines at debug name the host)', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // (startGateway's teardown fails the test when any log line, at trace level, holds a key)
  const gw = await startGateway(t, testConfig(upstream.url))
  const { response } = await sendRaw(gw.url, buildRequest('GET', '/v1/conversations/conv_1', [['Host', `${KEYS.other}.example`], ['Authorization', `Bearer ${KEYS.full}`]]))
  t.ok(response !== null && response.status < 500, 'answered')
  t.match(gw.logs.join(''), '"host":"ogw_[withheld].example"', 'the host, the key withheld')
})

t.test('an upstream error answer that quotes the upstream token reaches the client without it', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  // As some OpenAI-compatible services answer a key they refuse: quoting it, plainly and inside a JSON string.
  const answer = (req: IncomingMessage) => JSON.stringify({
    error: { message: `Invalid token: ${req.headers.authorization ?? ''} (${UPSTREAM_TOKEN})`, type: 'invalid_request_error', param: null, code: 'invalid_api_key' }
  })
  upstream.respond = (req, res) => { res.writeHead(403, { 'content-type': 'application/json' }).end(answer(req)) }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const err = await sdk.conversations.create({}).then(() => null, (e: unknown) => e)
  t.ok(err instanceof OpenAI.PermissionDeniedError, 'the SDK still reads the upstream\'s 403')
  const apiError = err as InstanceType<typeof OpenAI.APIError>
  t.equal(apiError.status, 403)
  t.equal(apiError.message, '403 Invalid token: Bearer [redacted] ([redacted])', 'the message, with the token taken out')
  t.notMatch(JSON.stringify(apiError.error), UPSTREAM_TOKEN)

  const res = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  const text = await res.text()
  t.equal(res.status, 403)
  t.notMatch(text, UPSTREAM_TOKEN)
  t.equal(res.headers.get('content-length'), String(Buffer.byteLength(text)), 'content-length fits the shorter body')
  t.match(gw.audit().at(-1), { status: 403, bytesOut: Buffer.byteLength(text) }, 'audited as sent')

  // Compressed by the upstream (unasked): decoded, searched, and sent plain.
  upstream.respond = (req, res) => {
    res.writeHead(403, { 'content-type': 'application/json', 'content-encoding': 'gzip' }).end(gzipSync(answer(req)))
  }
  const gzipped = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: { ...auth, 'accept-encoding': 'identity' }, body: '{}' })
  t.equal(gzipped.status, 403)
  t.equal(gzipped.headers.get('content-encoding'), null, 'sent decoded')
  t.match(await gzipped.json(), { error: { message: 'Invalid token: Bearer [redacted] ([redacted])', code: 'invalid_api_key' } })

  // In an encoding the gateway cannot decode, it could not be searched: not passed on.
  upstream.respond = (_req, res) => { res.writeHead(403, { 'content-type': 'application/json', 'content-encoding': 'zstd' }).end('\x28\xb5\x2f\xfd') }
  const unreadable = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(unreadable.status, 502)
  t.equal(unreadable.headers.get('content-encoding'), null)
  t.match(await unreadable.json(), { error: { code: 'upstream_unavailable', type: 'server_error' } })
  t.notMatch(gw.logs.join('\n'), UPSTREAM_TOKEN, 'nor in the log')
})

t.test('the upstream refusing the gateway\'s own token is a 502 upstream_auth_failed, not the team\'s AuthenticationError', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  // As OpenAI answers a key it refuses: quoting its start and end.
  const masked = `${UPSTREAM_TOKEN.slice(0, 3)}****${UPSTREAM_TOKEN.slice(-4)}`
  upstream.respond = (_req, res) => {
    res.writeHead(401, { 'content-type': 'application/json', 'x-request-id': 'req_401' })
      .end(JSON.stringify({ error: { message: `Incorrect API key provided: ${masked}.`, type: 'invalid_request_error', param: null, code: 'invalid_api_key' } }))
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const created = await sdk.conversations.create({}).then(() => null, (e: unknown) => e)
  t.ok(created instanceof OpenAI.InternalServerError, 'a server-side error in the SDK, not AuthenticationError')
  t.match(created, { status: 502, error: { code: 'upstream_auth_failed', type: 'server_error' } })
  t.notMatch(JSON.stringify(created), masked, 'nothing of the upstream\'s message')

  // The same on an id route, where the ownership lookup meets the 401 first.
  const res = await fetch(`${gw.url}/v1/conversations/conv_x/items`, { headers: auth })
  t.equal(res.status, 502)
  t.match(await res.json(), { error: { code: 'upstream_auth_failed' } })
  await new Promise(resolve => setTimeout(resolve, 20))
  t.match(gw.audit(), [{ status: 502, outcome: 'upstream_error' }, { status: 502, outcome: 'upstream_error' }])
  const errors = gw.logs.filter(l => l.includes('"level":50') && l.includes('refused the gateway\'s token'))
  t.equal(errors.length, 1, 'logged at error level for the operators, once for both (the proxy and the lookup share it)')
  t.notMatch(gw.logs.join('\n'), masked)
})

t.test('a refused token under load is one error line, not one per call', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  upstream.respond = (_req, res) => { res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":{"message":"Incorrect API key provided."}}') }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  // Proxied calls and ownership lookups, many at once, as a revoked token meets them.
  const calls = Array.from({ length: 40 }, async (_, i) => await (i % 2 === 0 ? sdk.conversations.create({}) : sdk.conversations.retrieve(`conv_${i}`)).catch((e: unknown) => e))
  const answers = await Promise.all(calls)
  t.ok(answers.every(e => e instanceof OpenAI.InternalServerError && (e as InstanceType<typeof OpenAI.APIError>).status === 502), 'every call is refused with the 502')
  t.equal(upstream.requests.length, 40)
  const errors = gw.logs.filter(l => l.includes('refused the gateway\'s token'))
  t.equal(errors.length, 1, 'one line for 40 refusals')
  t.match(JSON.parse(errors[0]!), { level: 50, upstreamStatus: 401, refusedCalls: 1 })
})

t.test('after the first line, a refused token is logged at most once per interval with how many calls since; a new token at once', async t => {
  let now = 1_000_000
  const log = new RefusedTokenLog(() => now)
  const lines: Array<{ obj: Record<string, unknown>, msg: string }> = []
  const logger = { error (obj: Record<string, unknown>, msg: string) { lines.push({ obj, msg }) } } as unknown as FastifyBaseLogger
  log.refused(logger, 'sk-revoked')
  for (let i = 0; i < 5; i++) log.refused(logger, 'sk-revoked')
  t.equal(lines.length, 1, 'the first at once, the next five held')
  now += REFUSED_LOG_INTERVAL_MS
  log.refused(logger, 'sk-revoked')
  t.equal(lines.length, 2)
  t.match(lines[1], { obj: { refusedCalls: 6 }, msg: /refused the gateway's token \(upstream\.apiKey\): 6 calls since the last line/ })
  now += 1
  log.refused(logger, 'sk-rotated-but-wrong')
  t.equal(lines.length, 3, 'a new token refused is news: logged at once')
  t.match(lines[2], { obj: { refusedCalls: 1 }, msg: 'the upstream refused the gateway\'s token (upstream.apiKey)' })
})

t.test('an error answer without the token, and a 2xx answer the gateway rewrites, keep or lose it as they should', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const error = { error: { message: 'Conversation not found', type: 'invalid_request_error', param: null, code: null } }
  const plain = gzipSync(JSON.stringify(error))
  upstream.respond = (_req, res) => { res.writeHead(400, { 'content-type': 'application/json', 'content-encoding': 'gzip' }).end(plain) }
  const res = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: { ...auth, 'accept-encoding': 'identity' }, body: '{}' })
  t.equal(res.status, 400)
  t.equal(res.headers.get('content-encoding'), 'gzip', 'nothing to take out: the upstream\'s encoding as it came')
  t.equal(res.headers.get('content-length'), String(plain.length), 'and its bytes')
  t.same(await res.json(), error)

  // A created conversation whose answer carries the token: the gateway reads it whole (to take its owner key
  // out), and the token with it.
  upstream.respond = (req, res) => {
    const metadata = JSON.parse(String(upstream.requests.at(-1)!.body)).metadata as Record<string, string>
    res.writeHead(200, { 'content-type': 'application/json', etag: '"v3"' })
      .end(JSON.stringify({ id: 'conv_echo', object: 'conversation', created_at: 1, metadata: { ...metadata, debug: String(req.headers.authorization) } }))
  }
  const { data: created, response } = await new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 }).conversations.create({ metadata: { topic: 't' } }).withResponse()
  t.same(created.metadata, { topic: 't', debug: 'Bearer [redacted]' })
  t.equal(response.headers.get('etag'), null, 'rewritten: the upstream\'s etag named other bytes')
})

t.test('an owned object the upstream compressed unasked is read all the same: created and retrieved, decoded, its owner key taken out', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  let stored: Record<string, unknown> | null = null
  upstream.respond = (req, res, body) => {
    // The gateway asks for no encoding (it sends no Accept-Encoding): this upstream compresses all the same.
    if (req.method === 'POST') stored = { id: 'conv_gz', object: 'conversation', created_at: 1, metadata: JSON.parse(String(body)).metadata }
    res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip' }).end(gzipSync(JSON.stringify(stored)))
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const created = await sdk.conversations.create({ metadata: { topic: 't' } })
  t.same(created, { id: 'conv_gz', object: 'conversation', created_at: 1, metadata: { topic: 't' } }, 'created, not a 502 for a conversation that exists')
  t.same(stored!.metadata, { topic: 't', gateway_owner: 'team-full' }, 'the upstream keeps the owner')
  const res = await fetch(`${gw.url}/v1/conversations/conv_gz`, { headers: { ...auth, 'accept-encoding': 'identity' } })
  t.equal(res.status, 200)
  t.equal(res.headers.get('content-encoding'), null, 'sent decoded, as it was rewritten')
  t.same(JSON.parse(await res.text()), { id: 'conv_gz', object: 'conversation', created_at: 1, metadata: { topic: 't' } })
  t.match(gw.audit(), [{ action: 'conversation.create', status: 200, outcome: 'ok' }, { action: 'conversation.retrieve', status: 200, outcome: 'ok' }])
})

// A 2xx answer the gateway passes on unchanged (it has nothing to take out of it but the token) is searched too.
t.test('a 2xx answer passed through (a deletion, an item, a list) that quotes the token reaches the client without it',
  async t => {
    const upstream = await startUpstream()
    t.teardown(() => upstream.close())
    const gw = await startGateway(t, ...withoutOwnership(upstream.url))
    upstream.respond = (req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' })
      const item = { type: 'message', id: 'msg_1', status: 'completed', role: 'user', content: [{ type: 'input_text', text: `${req.headers.authorization}` }] }
      res.end(JSON.stringify(req.method === 'DELETE'
        ? { id: 'conv_1', object: 'conversation.deleted', deleted: true, note: `${req.headers.authorization}` }
        : req.url?.endsWith('/items') ? { object: 'list', data: [item], first_id: 'msg_1', last_id: 'msg_1', has_more: false } : item))
    }
    for (const [method, path] of [['DELETE', '/v1/conversations/conv_1'], ['GET', '/v1/conversations/conv_1/items/msg_1'], ['GET', '/v1/conversations/conv_1/items']] as const) {
      const res = await fetch(`${gw.url}${path}`, { method, headers: { authorization: `Bearer ${KEYS.full}` } })
      t.equal(res.status, 200, `${method} ${path}`)
      t.notMatch(await res.text(), UPSTREAM_TOKEN, `${method} ${path}: without the token`)
    }
  })

t.test('a 2xx answer passed on unchanged keeps its bytes and framing; long, chunked or compressed, it is searched all the same', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const item = (text: string) => ({ type: 'message', id: 'msg_1', status: 'completed', role: 'user', content: [{ type: 'input_text', text }] })
  const list = (text: string) => JSON.stringify({ object: 'list', data: [item(text)], first_id: 'msg_1', last_id: 'msg_1', has_more: false })

  // Nothing to take out: the upstream's bytes and content-length.
  const clean = list('hello')
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(clean), etag: '"v1"' }).end(clean) }
  const same = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(same.headers.get('content-length'), String(Buffer.byteLength(clean)))
  t.equal(same.headers.get('etag'), '"v1"', 'and its etag, which names these bytes')
  t.equal(await same.text(), clean)

  // 200 KiB, chunked, the token cut between two writes.
  const long = list(`${'x'.repeat(200 * 1024)} Bearer ${UPSTREAM_TOKEN} end`)
  const at = long.indexOf(UPSTREAM_TOKEN) + 5
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write(long.slice(0, at))
    setTimeout(() => res.end(long.slice(at)), 20)
  }
  const page = await sdk.conversations.items.list('conv_1')
  const text = (page.data[0] as { content: Array<{ text: string }> }).content[0]!.text
  t.equal(text.slice(-21), 'Bearer [redacted] end', 'the token taken out across the cut')
  t.equal(text.length, 200 * 1024 + 22, 'and nothing else')

  // Compressed though the gateway asked for no encoding: decoded to be searched.
  const quoting = gzipSync(list(`Bearer ${UPSTREAM_TOKEN}`))
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip', etag: '"v2"' }).end(quoting) }
  const decoded = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: { ...auth, 'accept-encoding': 'identity' } })
  t.equal(decoded.headers.get('content-encoding'), null, 'sent decoded, without the token')
  t.equal(decoded.headers.get('etag'), null, 'without the etag of bytes it is not')
  t.same(JSON.parse(await decoded.text()), JSON.parse(list('Bearer [redacted]')))
  const compressed = gzipSync(clean)
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'gzip' }).end(compressed) }
  const kept = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: { ...auth, 'accept-encoding': 'identity' } })
  t.equal(kept.headers.get('content-encoding'), 'gzip', 'nothing to take out: compressed as it came')
  t.equal(kept.headers.get('content-length'), String(compressed.length))
  t.equal(await kept.text(), clean, '(fetch decodes it)')
  t.notMatch(gw.logs.join('\n'), UPSTREAM_TOKEN)
})

t.test('a short 2xx answer passed on unchanged that spells the token with JSON escapes reaches the client without it', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  // `\u0073` is `s`, `\/` is `/`: the same string once parsed, which is what the SDK hands its caller.
  const escaped = `\\u0073${UPSTREAM_TOKEN.slice(1)}`
  const body = `{"object":"list","data":[{"type":"message","id":"msg_1","status":"completed","role":"user","content":[{"type":"input_text","text":"Bearer ${escaped}"}]}],"first_id":"msg_1","last_id":"msg_1","has_more":false,"n":12345678901234567890}`
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body) }
  const page = await sdk.conversations.items.list('conv_1')
  t.equal((page.data[0] as { content: Array<{ text: string }> }).content[0]!.text, 'Bearer [redacted]')
  const raw = await (await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })).text()
  t.match(raw, '"n":12345678901234567890', 'every other value as it came')
  t.notMatch(raw, escaped)
})

t.test('a token whose first character is escaped after an escaped backslash reaches the SDK neither whole nor as a broken answer', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  // `\\u0073k-…` reads as the text `\u0073k-…`: the token's characters but its first, as written.
  const spelled = `\\\\u0073${UPSTREAM_TOKEN.slice(1)}`
  const list = `{"object":"list","data":[{"type":"message","id":"msg_1","status":"completed","role":"user","content":[{"type":"input_text","text":"path ${spelled}"}]}],"first_id":"msg_1","last_id":"msg_1","has_more":false}`
  const conversation = `{"id":"conv_1","object":"conversation","created_at":1,"metadata":{"note":"path ${spelled}"}}`
  upstream.respond = (req, res) => {
    const body = req.url!.endsWith('/items') ? list : conversation
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body)
  }
  const page = await sdk.conversations.items.list('conv_1')
  t.equal((page.data[0] as { content: Array<{ text: string }> }).content[0]!.text, 'path \\[redacted]', 'a listing, passed on as its bytes')
  const retrieved = await sdk.conversations.retrieve('conv_1')
  t.same(retrieved.metadata, { note: 'path \\[redacted]' }, 'a conversation, read whole')
})

t.test('a token spelled with JSON escapes in an answer JSON.parse refuses but a client reads (a BOM first, a NaN) reaches the client without it', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const escaped = [...UPSTREAM_TOKEN].map(c => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join('')
  const item = `{"type":"message","id":"msg_1","status":"completed","role":"user","content":[{"type":"input_text","text":"Bearer ${escaped}"}]}`
  // A byte order mark before the JSON: the Node SDK (fetch's json()) and the Python SDK (httpx) both skip it.
  const withBom = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(`{"object":"list","data":[${item}],"has_more":false}`)])
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': withBom.length }).end(withBom) }
  const page = await sdk.conversations.items.list('conv_1')
  t.equal((page.data[0] as { content: Array<{ text: string }> }).content[0]!.text, 'Bearer [redacted]', 'the SDK reads it without the token')
  // NaN, which Python's json module (the Python SDK's reader, of answers and of events) takes.
  const withNaN = `{"object":"list","data":[${item}],"has_more":false,"score":NaN}`
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': withNaN.length }).end(withNaN) }
  const list = await (await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })).text()
  t.notMatch(list, escaped)
  t.match(list, '"text":"Bearer [redacted]"')
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","output":[]}}\n\n')
    res.write(`event: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":1,"note":"Bearer ${escaped}","score":NaN}\n\n`)
    res.end('event: response.completed\ndata: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_1","object":"response","status":"completed","output":[]}}\n\n')
  }
  const events = await (await fetch(`${gw.url}/v1/responses`, { method: 'POST', headers: auth, body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true }) })).text()
  t.notMatch(events, escaped, 'an event whose data is not JSON to JSON.parse')
  t.match(events, '"note":"Bearer [redacted]"')
})

t.test('a 2xx answer in UTF-16 or UTF-32, which the Python SDK reads (it tells the encoding from the bytes), is not passed on: it cannot be searched', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const json = (text: string) => JSON.stringify({ object: 'list', data: [{ type: 'message', id: 'msg_1', content: [{ type: 'input_text', text }] }], has_more: false })
  const utf16be = (text: string) => Buffer.from(text, 'utf16le').swap16()
  const utf32le = (text: string) => Buffer.concat([...text].map(c => { const b = Buffer.alloc(4); b.writeUInt32LE(c.codePointAt(0)!); return b }))
  const short = json(`Bearer ${UPSTREAM_TOKEN}`)
  for (const [what, body] of [
    ['UTF-16LE', Buffer.from(short, 'utf16le')],
    ['UTF-16BE with its byte order mark', Buffer.concat([Buffer.from([0xfe, 0xff]), utf16be(short)])],
    ['UTF-32LE', utf32le(short)]
  ] as const) {
    upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': body.length }).end(body) }
    const res = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
    t.equal(res.status, 502, what)
    t.match(await res.json(), { error: { code: 'upstream_unavailable' } }, what)
  }
  // Long and chunked, searched as it streams: refused at its start (nothing of it sent yet), as a short one is.
  const long = Buffer.from(json(`${'x'.repeat(100 * 1024)} Bearer ${UPSTREAM_TOKEN}`), 'utf16le')
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(long) }
  const received = await sendRaw(gw.url, buildRequest('GET', '/v1/conversations/conv_1/items', [['Authorization', `Bearer ${KEYS.full}`]]))
  t.notOk(received.received.includes(Buffer.from(UPSTREAM_TOKEN, 'utf16le')), 'the token never reaches the client')
  t.match(received.response, { status: 502, complete: true }, 'the gateway\'s 502, not a 500 of its own')
  t.match(JSON.parse(received.response?.body ?? '{}'), { error: { code: 'upstream_unavailable' } })
  // UTF-8 and ASCII answers, whatever their first bytes, go on.
  const clean = json('hello')
  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(clean) }).end(clean) }
  t.equal(await (await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })).text(), clean)
})

t.test('a 2xx answer broken off before its content-length, or compressed beyond reading, is a 502, never passed on unsearched', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': 100 }).write('{"object":"list","data":[')
    setTimeout(() => res.destroy(), 20)
  }
  const broken = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { method: 'POST', headers: auth, body: '{"items":[]}' })
  t.equal(broken.status, 502)
  t.equal(broken.headers.get('x-should-retry'), 'false', 'a POST the upstream answered: not to be sent again')
  t.match(await broken.json(), { error: { code: 'upstream_unavailable', type: 'server_error' } })

  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json', 'content-encoding': 'zstd' }).end('\x28\xb5\x2f\xfd') }
  const unreadable = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(unreadable.status, 502)
  t.match(await unreadable.json(), { error: { code: 'upstream_unavailable' } })
})

t.test('an upstream header too long to pass on (a request id of 16 KB) is not passed on: the client\'s header block stays under the 16 KiB its HTTP client takes, and the SDK\'s call succeeds instead of failing as a lost connection it would send again', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const long = 'req_' + 'x'.repeat(16_200)
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'x-request-id': long, 'openai-processing-ms': '7' })
      .end('{"object":"list","data":[],"has_more":false}')
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const page = await sdk.conversations.items.list('conv_1').then(p => p, (e: unknown) => e)
  t.notOk(page instanceof Error, `the SDK's call succeeds (got ${String(page)})`)
  const raw = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(raw.status, 200)
  t.equal(raw.headers.get('x-request-id'), null, 'the upstream\'s request id is not passed on')
  t.match(raw.headers.get('x-gateway-request-id'), /^gw_/, 'the gateway\'s own is there')
  t.equal(raw.headers.get('openai-processing-ms'), '7', 'the other headers pass as before')
  t.equal(upstream.requests.length, 2, 'each call went upstream once')
  t.match(gw.audit().at(-1), { status: 200, upstreamRequestId: long.slice(0, 256) }, 'the audit keeps the upstream\'s id, cut, as before')

  upstream.respond = (_req, res) => {
    res.writeHead(429, { 'content-type': 'application/json', 'retry-after': '1', 'x-ratelimit-debug': 'x'.repeat(16_200) }).end('{"error":{"message":"slow down"}}')
  }
  const limited = await sdk.conversations.items.list('conv_1').then(() => null, (e: unknown) => e)
  t.match(limited, { status: 429 }, 'a 429 with a rate-limit header too long reaches the SDK as its 429')
})

t.test('the token is taken out of the response headers the client gets, and of the upstream request id the audit keeps', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'x-request-id': `req_for_${UPSTREAM_TOKEN}`, 'openai-version': UPSTREAM_TOKEN })
      .end('{"object":"list","data":[],"has_more":false}')
  }
  const list = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(list.status, 200)
  t.equal(list.headers.get('x-request-id'), 'req_for_[redacted]')
  t.equal(list.headers.get('openai-version'), '[redacted]')
  t.match(gw.audit().at(-1), { upstreamRequestId: 'req_for_[redacted]' })

  upstream.respond = (_req, res) => {
    res.writeHead(429, { 'content-type': 'application/json', 'retry-after': '1', 'x-ratelimit-debug': UPSTREAM_TOKEN }).end('{"error":{"message":"slow down"}}')
  }
  const limited = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(limited.status, 429)
  t.equal(limited.headers.get('x-ratelimit-debug'), '[redacted]', 'the shared account\'s rate-limit headers too')
})

t.test('a JSON answer that spells the token with other escapes than JSON.stringify\'s does not bring it back', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  // \u0073 is "s": a JSON parser reads the token itself back (as \/ would, in a token with a slash).
  const spelled = `\\u${UPSTREAM_TOKEN.charCodeAt(0).toString(16).padStart(4, '0')}${UPSTREAM_TOKEN.slice(1)}`
  upstream.respond = (_req, res) => {
    res.writeHead(400, { 'content-type': 'application/json' }).end(`{"error":{"message":"bad key ${spelled}","type":"invalid_request_error","param":null,"code":null}}`)
  }
  const refused = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(refused.status, 400)
  t.same(await refused.json(), { error: { message: 'bad key [redacted]', type: 'invalid_request_error', param: null, code: null } })

  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' }).end(`{"id":"conv_1","object":"conversation","created_at":1,"metadata":{"note":"${spelled}"}}`)
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  t.same((await sdk.conversations.retrieve('conv_1')).metadata, { note: '[redacted]' }, 'a conversation the gateway reads whole')
})

t.test('an answer quoting the token a call was sent with is scrubbed after the token was rotated meanwhile', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const held: Array<() => void> = []
  upstream.respond = (req, res) => {
    held.push(() => { res.writeHead(403, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: `rejected ${req.headers.authorization}` } })) })
  }
  const answer = fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  while (held.length === 0) await new Promise(resolve => setTimeout(resolve, 5))
  const raw = JSON.parse(JSON.stringify(gw.config)) as { upstream: Record<string, unknown> }
  raw.upstream.apiKey = 'sk-rotated-NEW-9876543210'
  t.same(gw.app.applyConfig(parseConfig(raw)).applied, ['upstream.apiKey'])
  held[0]!()
  const res = await answer
  t.same(await res.json(), { error: { message: 'rejected Bearer [redacted]' } }, 'the old token, which the call was sent with')
})

t.test('an event of a streamed response that quotes the token reaches the client without it', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  upstream.respond = (req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write('event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","output":[]}}\n\n')
    res.end(`event: error\ndata: ${JSON.stringify({ type: 'error', sequence_number: 1, code: 'invalid_api_key', message: `bad key ${req.headers.authorization}`, param: null })}\n\n`)
  }
  const res = await fetch(`${gw.url}/v1/responses`, { method: 'POST', headers: auth, body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true }) })
  const text = await res.text()
  t.equal(res.status, 200)
  t.notMatch(text, UPSTREAM_TOKEN)
  t.match(text, /"message":"bad key Bearer \[redacted\]"/)
  t.match(text, /"id":"resp_1"/, 'the other events as they were')
})

t.test('a streamed event that is not JSON, a comment or another field that quotes the token reaches the client without it', async t => {
  // OpenAI-compatible services are not all OpenAI: an error event in plain text, a comment, an event name or id can
  // quote the key they were given as well as a JSON event can.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  upstream.respond = (req, res) => {
    const key = req.headers.authorization
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(`: proxied with ${key}\n\n`)
    res.write('event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","output":[]}}\n\n')
    res.write(`event: response.in_progress\nid: ${key}\ndata: {"type":"response.in_progress","sequence_number":1}\n\n`)
    res.write(`event: notice\ndata: invalid api key ${key}\n\n`)
    res.write(`data: {"unfinished": "${key}"\n\n`)
    res.write(`data: ["${key}"]\n\n`)
    // (an error event in plain text goes out as OpenAI's error event, which ends the stream: the last one here)
    res.end(`event: error\ndata: invalid api key ${key}\n\n`)
  }
  const res = await fetch(`${gw.url}/v1/responses`, { method: 'POST', headers: auth, body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true }) })
  const text = await res.text()
  t.equal(res.status, 200)
  t.notMatch(text, UPSTREAM_TOKEN, 'the token is in no line of any event')
  t.match(text, ': proxied with Bearer [redacted]\n:\n', 'a comment (its blank line an empty comment)')
  t.match(text, 'id: Bearer [redacted]\n', 'another field of a JSON event')
  t.match(text, 'data: invalid api key Bearer [redacted]\n\n', 'a plain-text event')
  t.match(text, '"message":"invalid api key Bearer [redacted]"', 'an error event in plain text, as OpenAI\'s error event')
  t.match(text, 'data: {"unfinished": "Bearer [redacted]"\n\n', 'data that only looks like JSON')
  t.match(text, 'data: ["Bearer [redacted]"]\n\n', 'JSON that is not an object')
  t.match(text, /"id":"resp_1"/, 'the other events as they were')
})

t.test('an error event in plain text that spells the token with escapes or percent-encoded reaches the SDK without it', async t => {
  // (as the same text in any other event does: the gateway's error event carries it in a JSON string, where a
  // `\u0073` of the text is no escape but the text the SDK's message holds)
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const escaped = [...UPSTREAM_TOKEN].map(c => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join('')
  const percent = [...UPSTREAM_TOKEN].map(c => `%${c.charCodeAt(0).toString(16)}`).join('')
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  for (const spelled of [escaped, percent, `"${escaped}"`]) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(`event: error\ndata: invalid api key ${spelled}\n\n`)
    }
    const err = await (async () => {
      for await (const event of await sdk.responses.create({ model: 'gpt-4o', input: 'hi', stream: true })) t.fail(`no event before: ${event.type}`)
    })().then(() => null, (e: unknown) => e)
    t.ok(err instanceof OpenAI.APIError, `an APIError (got ${String(err)})`)
    const message = String((err as { error?: { message?: unknown } }).error?.message)
    t.match(message, /^invalid api key "?\[redacted\]"?$/, `the token taken out of ${spelled.slice(0, 16)}...`)
    t.notOk(decodeURIComponent(JSON.parse(`"${message.replace(/"/g, '')}"`) as string).includes(UPSTREAM_TOKEN.slice(3, 11)), 'in no spelling')
  }
  // (an error event of a JSON object not OpenAI's goes out with its data as written as its message, searched so too)
  for (const spelled of [escaped, percent]) {
    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(`event: error\ndata: {"detail":"invalid api key ${spelled}"}\n\n`)
    }
    const err = await (async () => {
      for await (const event of await sdk.responses.create({ model: 'gpt-4o', input: 'hi', stream: true })) t.fail(`no event before: ${event.type}`)
    })().then(() => null, (e: unknown) => e)
    t.match(err, { error: { message: '{"detail":"invalid api key [redacted]"}' } }, `the token taken out of an object's ${spelled.slice(0, 16)}...`)
  }
})

t.test('an event stream the upstream compressed unasked is not passed on unchecked: 502, no token, no other team\'s owner', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  upstream.respond = (req, res) => {
    // The gateway asks for no encoding (it sends no Accept-Encoding): this upstream compresses all the same.
    const response = { id: 'resp_1', object: 'response', status: 'in_progress', output: [], metadata: { gateway_owner: 'team-other' }, instructions: `sent ${req.headers.authorization}` }
    res.writeHead(200, { 'content-type': 'text/event-stream', 'content-encoding': 'gzip' })
    res.end(gzipSync(`event: response.created\ndata: ${JSON.stringify({ type: 'response.created', sequence_number: 0, response })}\n\n`))
  }
  const res = await fetch(`${gw.url}/v1/responses`, { method: 'POST', headers: auth, body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true }) })
  const text = await res.text() // fetch undoes a gzip the gateway would pass on
  t.equal(res.status, 502)
  t.notMatch(text, UPSTREAM_TOKEN)
  t.notMatch(text, 'team-other')
  t.match(text, /^\{"error":\{.*"type":"server_error".*"code":"upstream_unavailable"\}\}$/)
  t.match(gw.logs.join(''), /upstream event stream is compressed/, 'the operators are told why')
  t.equal(res.headers.get('x-should-retry'), 'false', 'the generation is under way upstream: the SDKs do not start it again')
})

t.test('an answer in a transfer-coding (Transfer-Encoding: gzip, chunked) is not passed on unchecked: 502, no token, no other team\'s owner', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  // A transfer-coding is the hop's, not the body's: undici takes the chunks apart and hands on the gzip bytes, which
  // no Content-Encoding names (the gateway's checks would read them as they are, the client could gunzip them).
  const gzipped = (text: string) => (_req: unknown, res: ServerResponse) => {
    res.writeHead(200, { 'content-type': text.startsWith('event:') ? 'text/event-stream' : 'application/json', 'transfer-encoding': 'gzip, chunked' })
    res.end(gzipSync(text))
  }
  const response = { id: 'resp_1', object: 'response', status: 'in_progress', output: [], metadata: { gateway_owner: 'team-other' }, instructions: `sent Bearer ${UPSTREAM_TOKEN}` }
  upstream.respond = gzipped(`event: response.created\ndata: ${JSON.stringify({ type: 'response.created', sequence_number: 0, response })}\n\n`)
  const events: unknown[] = []
  const streamed = await sdk.responses.create({ model: 'gpt-4o', input: 'hi', stream: true }).then(async stream => {
    for await (const event of stream) events.push(event)
    return null
  }, (err: unknown) => err)
  t.match(streamed, { status: 502, error: { code: 'upstream_unavailable' } }, 'a stream the gateway cannot read event by event: the SDK raises a 502')
  t.equal((streamed as { headers?: Headers }).headers?.get('x-should-retry'), 'false', 'the generation is under way upstream: the SDKs do not start it again')
  t.strictSame(events, [])

  upstream.respond = gzipped(JSON.stringify({ object: 'list', data: [{ id: 'msg_1', type: 'message', role: 'user', content: [{ type: 'input_text', text: `sent Bearer ${UPSTREAM_TOKEN}` }] }], first_id: 'msg_1', last_id: 'msg_1', has_more: false }))
  const listed = await sdk.conversations.items.list('conv_1').then(() => null, (err: unknown) => err)
  t.match(listed, { status: 502, error: { code: 'upstream_unavailable' } }, 'an answer passed on unchanged that could not be searched: 502')
  const raw = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  const bytes = Buffer.from(await raw.arrayBuffer())
  t.equal(raw.status, 502)
  t.notOk(bytes.subarray(0, 2).equals(Buffer.from([0x1f, 0x8b])), 'no gzip bytes reach the client')
  t.notMatch(bytes.toString('latin1'), UPSTREAM_TOKEN)
  t.match(gw.logs.join(''), /transfer-coding/, 'the operators are told why')
})

t.test('an error answer is read whole within bounds: slow or large, it could not be searched and is a 502', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  // One byte every 200 ms, for ever (bodyTimeoutMs bounds only the silence between chunks).
  const drips: NodeJS.Timeout[] = []
  t.teardown(() => { for (const d of drips) clearInterval(d) })
  upstream.respond = (_req, res) => {
    res.writeHead(503, { 'content-type': 'application/json' })
    drips.push(setInterval(() => { if (!res.destroyed) res.write(' ') }, 200))
  }
  const started = Date.now()
  const slow = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(slow.status, 502)
  t.match(await slow.json(), { error: { code: 'upstream_unavailable' } })
  t.ok(Date.now() - started < 15_000, 'answered once the read gave up, about 5 s')

  upstream.respond = (_req, res) => { res.writeHead(500, { 'content-type': 'text/plain' }).end('x'.repeat(1024 * 1024 + 1)) }
  const large = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(large.status, 502, 'over 1 MiB')
})

t.test('an envelope without a content-type gets none from the gateway either; an error answer that is no envelope (a CDN page, plain text, nothing) gets the gateway\'s, with the upstream\'s status', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const envelope = '{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'
  upstream.respond = (_req, res) => { res.writeHead(500).end(envelope) }
  const res = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(res.status, 500)
  t.equal(res.headers.get('content-type'), null)
  t.equal(res.headers.get('content-length'), String(envelope.length))
  t.equal(await res.text(), envelope)

  const answers: Array<[string, number, Record<string, string>, string]> = [
    ['a CDN\'s HTML page', 520, { 'content-type': 'text/html' }, '<!DOCTYPE html><html><title>520: Web server is returning an unknown error</title></html>'],
    ['plain text without a content-type', 500, {}, 'upstream broke'],
    ['an empty 404', 404, { 'content-type': 'application/json' }, ''],
    ['JSON that is no envelope', 503, { 'content-type': 'application/json' }, '{"detail":"overloaded"}']
  ]
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  for (const [label, status, headers, body] of answers) {
    upstream.respond = (_req, res) => { res.writeHead(status, headers).end(body) }
    const err = await sdk.conversations.create({}).then(() => null, (e: unknown) => e)
    t.ok(err instanceof OpenAI.APIError, `${label}: an APIError`)
    t.match(err, {
      status,
      error: { type: status >= 500 ? 'server_error' : 'invalid_request_error', code: 'upstream_error', message: new RegExp(`answered ${status}`) }
    }, `${label}: the SDK reads the gateway's envelope, with the upstream's status`)
    if (body !== '') t.notMatch((err as Error).message, body, `${label}: not the upstream's body`)
  }
  t.equal(gw.logs.filter(l => l.includes('is not OpenAI\'s error envelope')).length, answers.length, 'each logged for the operators')

  // Other OpenAI-compatible services' shapes: what they say in a string is kept in the envelope's message (the
  // token taken out, whatever escapes spell it).
  const spelled = `\\u${UPSTREAM_TOKEN.charCodeAt(0).toString(16).padStart(4, '0')}${UPSTREAM_TOKEN.slice(1)}`
  const shapes: Array<[string, string, string]> = [
    ['{"error": "..."}', `{"error":"model not found for key ${spelled}"}`, 'The upstream API answered 400: model not found for key [redacted]'],
    ['{"detail": "..."}', '{"detail":"Not enough quota"}', 'The upstream API answered 400: Not enough quota']
  ]
  for (const [label, body, message] of shapes) {
    upstream.respond = (_req, res) => { res.writeHead(400, { 'content-type': 'application/json' }).end(body) }
    const err = await sdk.conversations.create({}).then(() => null, (e: unknown) => e)
    t.match(err, { status: 400, error: { code: 'upstream_error', message } }, `${label}: its message kept`)
    t.notMatch(JSON.stringify(err), UPSTREAM_TOKEN)
  }
})

t.test('a token too short to be a secret is not searched for: answers are not mangled', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, apiKey: 'e' } })
  const body = '{"error":{"message":"the conversation was not found","type":"invalid_request_error","param":null,"code":null}}'
  upstream.respond = (_req, res) => { res.writeHead(404, { 'content-type': 'application/json', 'x-request-id': 'req_e' }).end(body) }
  const res = await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })
  t.equal(res.status, 404)
  t.equal(await res.text(), body)
  t.equal(res.headers.get('x-request-id'), 'req_e')
})

t.test('an upstream answer undici cannot parse does not put its bytes in the log', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  for (const path of ['/v1/conversations/conv_1/items', '/v1/conversations/conv_1']) {
    upstream.respond = (_req, res) => {
      // A chunk size that is not hex, followed by bytes quoting the token.
      res.socket!.end(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{"error":"invalid key ${UPSTREAM_TOKEN}"}\r\n`)
    }
    await fetch(`${gw.url}${path}`, { headers: auth }).then(async res => await res.text()).catch(() => '')
  }
  await new Promise(resolve => setTimeout(resolve, 50))
  t.ok(gw.logs.length > 0, 'the failures were logged')
  t.notMatch(gw.logs.join('\n'), UPSTREAM_TOKEN)
})

t.test('only the routed operations are registered: no wildcard, no PUT/PATCH, no HEAD', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const registered: string[] = []
  for (const method of ['GET', 'POST', 'DELETE', 'PUT', 'PATCH', 'HEAD', 'OPTIONS']) {
    for (const url of ['/v1/conversations', '/v1/conversations/:conversation_id', '/v1/conversations/:conversation_id/items',
      '/v1/conversations/:conversation_id/items/:item_id', '/v1/responses', '/v1/responses/:response_id',
      '/v1/responses/:response_id/cancel', '/v1/responses/:response_id/input_items', '/*', '/v1/*', '/v1/conversations/*',
      '/v1/responses/*']) {
      if (gw.app.hasRoute({ method, url })) registered.push(`${method} ${url}`)
    }
  }
  t.same(registered.sort(), [
    'DELETE /v1/conversations/:conversation_id',
    'DELETE /v1/conversations/:conversation_id/items/:item_id',
    'DELETE /v1/responses/:response_id',
    'GET /v1/conversations/:conversation_id',
    'GET /v1/conversations/:conversation_id/items',
    'GET /v1/conversations/:conversation_id/items/:item_id',
    'GET /v1/responses/:response_id',
    'GET /v1/responses/:response_id/input_items',
    'POST /v1/conversations',
    'POST /v1/conversations/:conversation_id',
    'POST /v1/conversations/:conversation_id/items',
    'POST /v1/responses',
    'POST /v1/responses/:response_id/cancel'
  ])
})

t.test('a key in the query string (?api_key=, ?key=, encoded or not) is refused before the key check: never sent upstream, logged or audited', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url, { log: { level: 'debug' } }))
  for (const [query, name] of [
    [`api_key=${KEYS.full}`, 'api_key'], [`limit=2&API-KEY=${KEYS.full}`, 'API-KEY'], [`key=${KEYS.full}&order=asc`, 'key'],
    [`access_token=${KEYS.full}`, 'access_token'], [`api%5Fkey=${KEYS.full}`, 'api_key'],
    // as servers that read loosely take them: an array (PHP, Rails), `;` for `&`, a name cut at a NUL, after a dot
    [`api_key[]=${KEYS.full}`, 'api_key[]'], [`limit=2;api_key=${KEYS.full}`, 'api_key'], [`api_key%00x=${KEYS.full}`, 'api_key\0x'],
    [`.api_key=${KEYS.full}`, '.api_key']
  ] as const) {
    const res = await fetch(`${gw.url}/v1/conversations/conv_1/items?${query}`, { headers: { authorization: `Bearer ${KEYS.full}` } })
    t.equal(res.status, 400, `?${query.replace(KEYS.full, '<key>')}: 400`)
    t.match(await res.json(), { error: { code: 'credentials_in_query', param: name, type: 'invalid_request_error' } })
  }
  // A query with no credential in it still goes upstream as it came.
  const listed = await fetch(`${gw.url}/v1/conversations/conv_1/items?limit=2&order=asc&after=key_1`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.not(listed.status, 400, 'limit, order and a value that only starts like a credential are passed on')
  t.same(upstream.requests.map(r => r.url), ['/v1/conversations/conv_1/items?limit=2&order=asc&after=key_1'], 'only that one reached the upstream')
  t.notOk(upstream.everything().includes(KEYS.full), 'the upstream never saw the key')
  await new Promise(resolve => setTimeout(resolve, 20))
  t.same(gw.audit().slice(0, 8).map(r => [r.status, r.outcome, r.path]), Array(8).fill([400, 'invalid', '/v1/conversations/conv_1/items']), 'each refusal audited, its path without the query')
  t.notOk(JSON.stringify(gw.audit()).includes(KEYS.full), 'no record holds the key')
  // (The fixture fails the test if the key is anywhere in the log, at debug here.)
})

t.test('a GET passes on only the query parameters OpenAI documents for its route: any other, a repeat, or a fragment is refused', async t => {
  // A GET's query went upstream as it came: names no route takes (to an upstream that may read what OpenAI does
  // not), a parameter twice (read by the gateway as the first, by another reader as the last: ?stream=), a fragment.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const refused: Array<[string, number, string, string | null]> = [
    ['/v1/conversations/conv_1?foo=bar', 400, 'unknown_parameter', 'foo'],
    ['/v1/conversations/conv_1?limit=1', 400, 'unknown_parameter', 'limit'],
    ['/v1/conversations/conv_1/items?limit=2&order=asc&keyword=x', 400, 'unknown_parameter', 'keyword'],
    ['/v1/conversations/conv_1/items?after=msg_1;foo=1', 400, 'unknown_parameter', 'foo'],
    ['/v1/conversations/conv_1/items/msg_1?limit=1', 400, 'unknown_parameter', 'limit'],
    ['/v1/responses/resp_1/input_items?stream=true', 400, 'unknown_parameter', 'stream'],
    ['/v1/conversations/conv_1/items?limit=1&limit=100', 400, 'invalid_request', 'limit'],
    ['/v1/responses/resp_1?stream=false&stream=true', 400, 'invalid_request', 'stream'],
    ['/v1/responses/resp_1?stream=yes', 400, 'invalid_request', 'stream'],
    ['/v1/conversations/conv_1/items?limit=1#top', 400, 'invalid_request', null]
  ]
  for (const [target, status, code, param] of refused) {
    // (raw bytes: an HTTP client drops a fragment itself)
    const { response } = await sendRaw(gw.url, buildRequest('GET', target, [['Authorization', `Bearer ${KEYS.full}`]]))
    t.equal(response?.status, status, `${target}: ${status}`)
    t.match(JSON.parse(response?.body ?? '{}'), { error: { code, param, type: 'invalid_request_error' } }, `${target}: ${code}`)
  }
  t.same(upstream.requests, [], 'nothing reached the upstream')
})

t.test('a method override (_method, which Symfony and Laravel read from a POST\'s query or JSON body) is refused on every route: a key without the delete scope cannot delete through such an upstream', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  // team-writer has read and write, not delete: to such an upstream each of these would be a delete.
  const refused: Array<[string, string, string, string]> = [
    ['POST', '/v1/conversations/conv_1?_method=DELETE', '{"metadata":{"a":"b"}}', '_method'],
    ['POST', '/v1/conversations/conv_1/items?include%5B%5D=x&_METHOD=DELETE', '{"items":[]}', '_METHOD'],
    ['POST', '/v1/conversations/conv_1?a=1;_method=DELETE', '{"metadata":{}}', '_method'],
    // (PHP names a parameter `.method` or `[method` `_method`, and ends its name at a NUL: `_method%00x` too)
    ['POST', '/v1/responses/resp_1/cancel?.method=DELETE', '', '.method'],
    ['POST', '/v1/conversations/conv_1?%5Bmethod=DELETE', '{"metadata":{}}', '[method'],
    ['POST', '/v1/conversations/conv_1?_method%00x=DELETE', '{"metadata":{}}', '_method\u0000x'],
    ['POST', '/v1/conversations/conv_1?%20.method%00=DELETE', '{"metadata":{}}', ' .method\u0000'],
    ['POST', '/v1/conversations/conv_1', '{"metadata":{"a":"b"},"_method":"DELETE"}', '_method'],
    ['POST', '/v1/responses', '{"model":"gpt-4o-mini","input":"hi","_method":"DELETE"}', '_method'],
    ['DELETE', '/v1/conversations/conv_1/items/msg_1?_method=GET', '', '_method']
  ]
  for (const [method, target, body, param] of refused) {
    const res = await fetch(`${gw.url}${target}`, {
      method, headers: { authorization: `Bearer ${KEYS.writer}`, 'content-type': 'application/json' }, body: body === '' ? undefined : body
    })
    t.equal(res.status, 400, `${method} ${target} ${body}: 400`)
    t.match(await res.json(), { error: { code: 'unknown_parameter', type: 'invalid_request_error', param } }, `${target}: names ${JSON.stringify(param)}`)
  }
  t.same(upstream.requests, [], 'nothing reached the upstream')
  // A parameter or key that only looks like it goes on.
  const passed = await fetch(`${gw.url}/v1/conversations/conv_1?method=x`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.writer}`, 'content-type': 'application/json' }, body: '{"metadata":{"_method":"x"}}'
  })
  t.not(passed.status, 400)
  t.same(upstream.requests.map(r => r.url), ['/v1/conversations/conv_1?method=x'])
})

t.test('every query parameter the SDKs send on a GET, as they send it, reaches the upstream byte for byte', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const include = ['message.output_text.logprobs', 'reasoning.encrypted_content'] as const
  const settled = async (call: PromiseLike<unknown>) => { await Promise.resolve(call).catch(() => {}) }
  await settled(client.conversations.items.list('conv_1', { include: [...include], after: 'msg_1', limit: 5, order: 'asc' }))
  await settled(client.conversations.items.retrieve('msg_1', { conversation_id: 'conv_1', include: [include[0]] }))
  await settled(client.responses.retrieve('resp_1', { include: [include[1]], starting_after: 3, include_obfuscation: false }))
  await settled(client.responses.inputItems.list('resp_1', { include: [include[1]], after: 'msg_1', limit: 3, order: 'desc' }))
  // `include` repeated without brackets (curl, the docs), or indexed (PHP's http_build_query); an empty query
  for (const target of ['/v1/conversations/conv_1/items?include=a&include=b', '/v1/conversations/conv_1/items/msg_1?include%5B0%5D=a', '/v1/conversations/conv_1?']) {
    t.not((await call(gw.url, 'GET', target)).status, 400, target)
  }
  t.same(upstream.requests.map(r => r.url), [
    '/v1/conversations/conv_1/items?include%5B%5D=message.output_text.logprobs&include%5B%5D=reasoning.encrypted_content&after=msg_1&limit=5&order=asc',
    '/v1/conversations/conv_1/items/msg_1?include%5B%5D=message.output_text.logprobs',
    '/v1/responses/resp_1?include%5B%5D=reasoning.encrypted_content&starting_after=3&include_obfuscation=false',
    '/v1/responses/resp_1/input_items?include%5B%5D=reasoning.encrypted_content&after=msg_1&limit=3&order=desc',
    '/v1/conversations/conv_1/items?include=a&include=b',
    '/v1/conversations/conv_1/items/msg_1?include%5B0%5D=a',
    '/v1/conversations/conv_1'
  ])
})

t.test('a gateway key in the URL (an id, a query value) is refused before the key check: never sent upstream, logged or audited', async t => {
  // A key passed where an id goes (arguments swapped): the SDK puts it in the path as it is. It went upstream (to the
  // owner lookup), into the audit record's path and ids, and into the log at debug.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { log: { level: 'debug' } }))
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const refused = async (call: Promise<unknown>, what: string) => {
    const err = await call.then(() => null, (e: unknown) => e)
    t.ok(err instanceof OpenAI.BadRequestError, `${what}: 400`)
    t.match((err as InstanceType<typeof OpenAI.BadRequestError>).error, { code: 'credentials_in_url', type: 'invalid_request_error' }, what)
  }
  await refused(client.conversations.retrieve(KEYS.full), 'a conversation id')
  await refused(client.conversations.items.delete('msg_1', { conversation_id: KEYS.other }), 'a conversation id, another team\'s key')
  await refused(client.responses.retrieve(KEYS.full), 'a response id')
  await refused(client.conversations.items.list('conv_1', { after: KEYS.full }), 'a query value')
  const unknown = await fetch(`${gw.url}/v1/${KEYS.full}/conversations`, { headers: { authorization: `Bearer ${KEYS.full}` } })
  t.equal(unknown.status, 404, 'an unknown route is still 404')
  t.same(upstream.requests, [], 'nothing reached the upstream')
  // A key in a body field the record keeps (the model, refused with credentials_in_body): the record keeps no key.
  await client.responses.create({ model: KEYS.full, input: 'hi' }).catch(() => {})
  const records = await gw.auditFile()
  t.same(records.slice(0, 5).map(r => [r.status, r.outcome]), [...Array(4).fill([400, 'invalid']), [404, 'invalid']], 'each call audited')
  t.match(records[0], { action: 'conversation.retrieve', path: '/v1/conversations/ogw_[withheld]', conversationId: 'ogw_[withheld]' })
  t.match(records[4], { action: 'unknown', path: '/v1/ogw_[withheld]/conversations' })
  t.match(records[5], { action: 'response.create', model: 'ogw_[withheld]' })
  const text = JSON.stringify(records)
  t.notOk(text.includes(KEYS.full) || text.includes(KEYS.other), 'no record holds a key')
  // (The fixture fails the test if a key is anywhere in the log, at debug here.)
})

t.test('a gateway key given for an id in the body (conversation, previous_response_id, an item reference) is refused: never in a lookup URL upstream', async t => {
  // The same arguments swapped as in the URL, one level down: the gateway looks such an id up upstream, in a URL
  // of its own (GET /v1/conversations/<id>), which took the key to the upstream as it came.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { log: { level: 'debug' } }))
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const conversation = await client.conversations.create({})
  const refused = async (call: Promise<unknown>, param: string) => {
    const err = await call.then(() => null, (e: unknown) => e)
    t.ok(err instanceof OpenAI.BadRequestError, `${param}: 400`)
    t.match((err as InstanceType<typeof OpenAI.BadRequestError>).error, { code: 'credentials_in_body', type: 'invalid_request_error', param }, param)
  }
  const before = upstream.requests.length
  await refused(client.responses.create({ model: 'gpt-4o-mini', input: 'hi', conversation: KEYS.full }), 'conversation')
  await refused(client.responses.create({ model: 'gpt-4o-mini', input: 'hi', conversation: { id: KEYS.other } }), 'conversation')
  await refused(client.responses.create({ model: 'gpt-4o-mini', input: 'hi', previous_response_id: KEYS.full }), 'previous_response_id')
  await refused(client.responses.create({ model: 'gpt-4o-mini', conversation: conversation.id, input: [{ type: 'item_reference', id: KEYS.full }] }), 'input')
  await refused(client.conversations.items.create(conversation.id, { items: [{ type: 'item_reference', id: KEYS.full }] }), 'items')
  t.same(upstream.requests.slice(before), [], 'nothing reached the upstream')
  t.notOk(JSON.stringify(await gw.auditFile()).includes(KEYS.full), 'no record holds the key')
})

t.test('a gateway key in a refused request is withheld from the error answer too (ogw_[withheld]), as from the log', async t => {
  // An unknown route's 404, a 405, and every refusal that quotes a header, a query parameter's name or the model
  // echoed what the client sent, key included; one cut short (a long path) echoed part of it.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url, { log: { level: 'debug' } })
  const gw = await startGateway(t, { ...config, clients: config.clients.map(c => c.id === 'team-full' ? { ...c, models: ['gpt-4o-mini'] } : c) })
  const key = KEYS.other
  const encoded = key.replace('_', '%5F')
  const refusals: Array<[string, string, CallOptions, string]> = [
    ['GET', `/v1/models/${key}`, {}, 'unknown_route'],
    ['GET', `/v1/conversations/conv_1/items/msg_1/${encoded}`, {}, 'unknown_route'],
    ['GET', `/v1/${'a'.repeat(180)}/${key}`, {}, 'unknown_route'],
    ['PUT', `/v1/conversations/${key}`, {}, 'method_not_allowed'],
    ['GET', `/v1/conversations/conv_1?api_key[${key}]=1`, {}, 'credentials_in_query'],
    ['GET', '/v1/conversations/conv_1', { headers: { expect: key } }, 'expectation_failed'],
    ['POST', '/v1/conversations', { headers: { 'content-encoding': key }, body: '{}' }, 'unsupported_media_type'],
    // (a body's key read as an id the path carries, or as `_method`, with a key after what names it)
    ['POST', '/v1/conversations', { body: JSON.stringify({ [`conversation_id[${key}`]: 'conv_1' }) }, 'unknown_parameter'],
    ['POST', '/v1/conversations/conv_1', { body: JSON.stringify({ [`_method\u0000${key}`]: 'DELETE' }) }, 'unknown_parameter']
  ]
  for (const [method, path, opts, code] of refusals) {
    const { body } = await call(gw.url, method, path, opts)
    const what = `${method} ${path.replace(key, '<key>').replace(encoded, '<key>').slice(0, 80)}`
    t.match(JSON.parse(body), { error: { code, message: /ogw_\[withheld\]/ } }, `${what}: ${code}, the key withheld`)
    t.notOk(body.includes(key.slice(4, 12)), `${what}: no part of the key in the answer`)
  }
  // A key as the model is refused as one (before the models list is read, whose refusal would quote the model).
  const { body } = await call(gw.url, 'POST', '/v1/responses', { body: JSON.stringify({ model: key, input: 'hi' }) })
  t.match(JSON.parse(body), { error: { code: 'credentials_in_body', param: 'model' } }, 'POST /v1/responses with the key as its model')
  t.notOk(body.includes(key.slice(4, 12)), 'no part of the key in the answer')
  t.same(upstream.requests, [], 'nothing reached the upstream')
  // (The fixture fails the test if the key is anywhere in the log, at debug here.)
})

t.test('a gateway key in the URL percent-encoded (ogw%5F..., or encoded twice: ogw%255F...) is refused as one written out: not sent upstream, not audited', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { log: { level: 'debug' } }))
  const encoders = [
    (key: string) => key.replace('_', '%5F').replace(/-/g, '%2d'),
    (key: string) => key.replace('_', '%255F').replace(/-/g, '%252d')
  ]
  const conversation = await (await fetch(`${gw.url}/v1/conversations`, { method: 'POST', headers: auth, body: '{}' })).json() as { id: string }
  const before = upstream.requests.length
  for (const encoded of encoders) {
    for (const path of [`/v1/conversations/${conversation.id}/items?after=${encoded(KEYS.full)}`, `/v1/conversations/${encoded(KEYS.other)}`]) {
      const res = await fetch(`${gw.url}${path}`, { headers: auth })
      t.equal(res.status, 400, path)
      t.match(await res.json(), { error: { code: 'credentials_in_url' } }, path)
    }
  }
  t.same(upstream.requests.slice(before), [], 'nothing reached the upstream')
  const text = JSON.stringify(await gw.auditFile())
  const keyChars = (key: string) => key.slice(4).replace(/-/g, '') // (what is left of it between the escapes)
  t.notOk([KEYS.full, KEYS.other].some(key => encoders.some(encoded => text.includes(encoded(key))) || text.includes(key.slice(4)) ||
    text.replace(/%(25)*2d/gi, '').includes(keyChars(key))), 'no record holds a key, encoded once, twice or not')
})

t.test('an upstream header quoting the token (content-encoding, content-type) stays out of the log on every path that logs it', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // Ownership's own lookup, and calls passed on without one (an answer read whole, searched, an error, a stream).
  const owned = await startGateway(t, testConfig(upstream.url))
  const unowned = await startGateway(t, ...withoutOwnership(upstream.url))
  const quoting = `x-${UPSTREAM_TOKEN}`
  const answer = (status: number, headers: Record<string, string>, body: string) => (_req: unknown, res: ServerResponse) => { res.writeHead(status, headers).end(body) }
  const encoded = { 'content-type': 'application/json', 'content-encoding': quoting }
  const calls: Array<[string, typeof owned, string, RequestInit, ReturnType<typeof answer>]> = [
    ['an owner lookup', owned, '/v1/conversations/conv_1', { headers: auth }, answer(200, encoded, '{}')],
    ['an answer read whole', unowned, '/v1/responses', { method: 'POST', headers: auth, body: '{"model":"gpt-4o","input":"hi"}' }, answer(200, encoded, '{}')],
    ['an answer searched', unowned, '/v1/conversations/conv_1/items', { headers: auth }, answer(200, encoded, '{}')],
    ['an error answer', unowned, '/v1/conversations/conv_1/items', { headers: auth }, answer(500, encoded, '{}')],
    ['an event stream', unowned, '/v1/responses', { method: 'POST', headers: auth, body: '{"model":"gpt-4o","input":"hi","stream":true}' },
      answer(200, { 'content-type': 'text/event-stream', 'content-encoding': quoting }, 'data: {}\n\n')],
    ['an error answer that is no envelope', unowned, '/v1/conversations/conv_1/items', { headers: auth },
      answer(500, { 'content-type': `text/html; ${quoting}` }, '<html></html>')]
  ]
  for (const [label, gw, path, init, respond] of calls) {
    upstream.respond = respond
    const before = gw.logs.length
    const res = await fetch(`${gw.url}${path}`, init)
    t.equal(res.status, label === 'an error answer that is no envelope' ? 500 : 502, `${label}: refused or answered by the gateway`)
    t.notMatch(await res.text(), UPSTREAM_TOKEN.toLowerCase(), `${label}: not in the answer`)
    const logged = gw.logs.slice(before).join('\n')
    t.ok(logged.includes('"level":40'), `${label}: the operators are told`)
    t.notOk(logged.toLowerCase().includes(UPSTREAM_TOKEN.toLowerCase()), `${label}: the token is not in the log, in any case`)
  }
})

t.test('a token percent-encoded in an upstream header (a redirect\'s location, a request id) reaches neither the log, the client nor the audit', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const percent = (text: string) => [...text].map(c => `%${c.charCodeAt(0).toString(16).toUpperCase()}`).join('')
  // As a URL holds it: some characters escaped (lowercase hex), every one, or every one twice (a URL built from one).
  const spellings = [UPSTREAM_TOKEN.replace('-', '%2d'), percent(UPSTREAM_TOKEN), percent(UPSTREAM_TOKEN).replaceAll('%', '%25')]
  for (const spelled of spellings) {
    upstream.respond = (_req, res) => { res.writeHead(302, { location: `https://login.example/v1?key=${spelled}` }).end() }
    const before = gw.logs.length
    const moved = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
    t.equal(moved.status, 502)
    const logged = gw.logs.slice(before).join('\n')
    t.match(logged, '"location":"https://login.example/v1?key=[redacted]"', 'the log says where the line points, without the token')
    t.notOk(logged.includes(spelled), 'nor its spelling')

    upstream.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'x-request-id': `req_${spelled}` }).end('{"object":"list","data":[],"has_more":false}')
    }
    const list = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
    t.equal(list.status, 200)
    t.equal(list.headers.get('x-request-id'), 'req_[redacted]')
    t.match(gw.audit().at(-1), { upstreamRequestId: 'req_[redacted]' })
  }
  // A location without the token is logged as it came, escapes and all.
  upstream.respond = (_req, res) => { res.writeHead(301, { location: 'https://moved.example/a%2Fb?q=%7E' }).end() }
  const before = gw.logs.length
  await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.match(gw.logs.slice(before).join('\n'), '"location":"https://moved.example/a%2Fb?q=%7E"')
})

t.test('a token split across two lines of one upstream header reaches neither the client nor the log in halves', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const halves = [UPSTREAM_TOKEN.slice(0, 17), UPSTREAM_TOKEN.slice(17)]
  upstream.respond = (_req, res) => {
    res.writeHead(200, ['content-type', 'application/json', 'x-request-id', halves[0]!, 'x-request-id', halves[1]!,
      'openai-processing-ms', '12', 'openai-processing-ms', '12']).end('{"object":"list","data":[],"has_more":false}')
  }
  const list = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(list.status, 200)
  t.equal(list.headers.get('x-request-id'), null, 'the header that spells the token across its lines is not passed on')
  t.equal(list.headers.get('openai-processing-ms'), '12, 12', 'repeated lines that spell none go on as they came')

  // The log quotes the content-types of an answer that has two.
  upstream.respond = (_req, res) => {
    res.writeHead(500, ['content-type', `text/html; k=${halves[0]!}`, 'content-type', `${halves[1]!}`]).end('<html></html>')
  }
  const before = gw.logs.length
  const twoTypes = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(twoTypes.status, 502)
  const logged = gw.logs.slice(before).join('\n')
  t.match(logged, 'more than one content-type', 'the operators are told')
  t.notOk(halves.some(half => logged.includes(half)), 'without either half of the token')
})

t.test('an answer that quotes the token percent-encoded (a URL built with it) reaches the client without it: an error, a 2xx whole or streamed, an event', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  // Every character escaped (a client decoding the URL reads the token), with one in lowercase hex.
  const spelled = [...UPSTREAM_TOKEN].map(c => `%${c.charCodeAt(0).toString(16).toUpperCase()}`).join('').replace('%2D', '%2d')
  const url = `https://billing.example/keys?key=${spelled}`
  const list = JSON.stringify({ object: 'list', data: [{ type: 'message', id: 'msg_1', content: [{ type: 'input_text', text: url }] }], has_more: false })
  upstream.respond = (_req, res) => { res.writeHead(402, { 'content-type': 'application/json' }).end(JSON.stringify({ error: { message: `Top up at ${url}`, type: 'billing', param: null, code: null } })) }
  const error = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(error.status, 402)
  t.match(await error.text(), '"Top up at https://billing.example/keys?key=[redacted]"')

  upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(list) }
  const whole = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.match(await whole.text(), '"text":"https://billing.example/keys?key=[redacted]"', 'a short answer, read whole')

  // A long one, searched as it streams, with the spelling cut between two chunks in the middle of an escape.
  const long = Buffer.from(list.replace('"has_more"', `"pad":"${'x'.repeat(100_000)}","has_more"`))
  const cut = long.indexOf(spelled) + 7
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write(long.subarray(0, cut))
    setTimeout(() => res.end(long.subarray(cut)), 20)
  }
  const streamed = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  const text = await streamed.text()
  t.match(text, '"text":"https://billing.example/keys?key=[redacted]"', 'a long answer, searched as it streams')
  t.notOk(text.includes(spelled.slice(0, 24)))

  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.end(`: see ${url}\n\nevent: error\ndata: ${JSON.stringify({ type: 'error', sequence_number: 0, code: 'billing', message: `Top up at ${url}`, param: null })}\n\n`)
  }
  const events = await fetch(`${gw.url}/v1/responses`, { method: 'POST', headers: auth, body: JSON.stringify({ model: 'gpt-4o', input: 'hi', stream: true }) })
  const eventText = await events.text()
  t.match(eventText, '"message":"Top up at https://billing.example/keys?key=[redacted]"')
  t.match(eventText, ': see https://billing.example/keys?key=[redacted]')
})

t.test('an answer in a transfer-coding that quotes the token is refused without the token in the log, in any case', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': `x-${UPSTREAM_TOKEN}, gzip, chunked` }).end('{}')
  }
  const res = await fetch(`${gw.url}/v1/conversations/conv_1/items`, { headers: auth })
  t.equal(res.status, 502)
  const logged = gw.logs.join('\n')
  t.match(logged, /transfer-coding/, 'the operators are told why')
  t.match(logged, /gzip/, 'naming the codings it knows')
  t.notOk(logged.toLowerCase().includes(UPSTREAM_TOKEN.toLowerCase()), 'the token is not in the log, in any case')
})

t.test('an event stream in UTF-16, which no event reader splits as the gateway does, is not passed on: the token in it never reaches the client', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const event = `event: response.created\ndata: ${JSON.stringify({ type: 'response.created', sequence_number: 0, response: { id: 'resp_1', object: 'response', status: 'in_progress', output: [], instructions: `Bearer ${UPSTREAM_TOKEN}` } })}\n\n`
  for (const [what, body] of [
    ['UTF-16LE with its byte order mark', Buffer.from(`\ufeff${event}`, 'utf16le')],
    ['UTF-16BE', Buffer.from(event, 'utf16le').swap16()]
  ] as const) {
    upstream.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'text/event-stream' }).end(body) }
    // (a streamed retrieve, which may end without a last event: the stream's bytes go out when it ends)
    const received = await sendRaw(gw.url, buildRequest('GET', '/v1/responses/resp_1?stream=true', [['Authorization', `Bearer ${KEYS.full}`]]))
    t.notOk(received.received.includes(Buffer.from(UPSTREAM_TOKEN, 'utf16le')), `${what}: the token never reaches the client`)
    t.notOk(received.received.includes(Buffer.from(UPSTREAM_TOKEN, 'utf16le').swap16()), `${what}: in either byte order`)
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
    const streamed = await sdk.responses.retrieve('resp_1', { stream: true }).then(async stream => {
      for await (const _ of stream) { /* read to its end */ }
      return null
    }).catch((err: unknown) => err)
    t.ok(streamed instanceof OpenAI.APIError, `${what}: the SDK raises the gateway's error event`)
  }
})

t.test('an event stream in UTF-8 that begins with a byte order mark reaches the SDK with its first event', async t => {
  // The SSE spec ignores a leading U+FEFF; read as part of the first line, it made that line (its data: a relay that
  // writes no event: lines) a comment the SDK skipped, and with it the first event, response.created.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const created = { type: 'response.created', sequence_number: 0, response: { id: 'resp_1', object: 'response', status: 'in_progress', output: [] } }
  upstream.respond = (_req, res) => {
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8' }).end(`\ufeffdata: ${JSON.stringify(created)}\n\n`)
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const types: string[] = []
  for await (const event of await sdk.responses.retrieve('resp_1', { stream: true })) types.push(event.type)
  t.same(types, ['response.created'])
})

t.test('a listed item whose container id quotes the token: the client gets it taken out, and the shared store (Redis) never holds the token', async t => {
  const redis = await startRedis(t)
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 2000 } }))
  const conversation = { id: 'conv_1', object: 'conversation', created_at: 1, metadata: { gateway_owner: 'team-full' } }
  // A short listing (read whole) and a long one (searched as it streams), each with a container of its own.
  let pad = ''
  upstream.respond = (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    if (req.url === '/v1/conversations/conv_1') {
      res.end(JSON.stringify(conversation))
      return
    }
    const item = { id: 'ci_1', type: 'code_interpreter_call', status: 'completed', container_id: `cntr_${pad.length}_${UPSTREAM_TOKEN}`, code: `print(1)${pad}`, outputs: [] }
    res.end(JSON.stringify({ object: 'list', data: [item], first_id: 'ci_1', last_id: 'ci_1', has_more: false }))
  }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  for (const length of [0, 100_000]) {
    pad = ' '.repeat(length)
    const listed = await sdk.conversations.items.list('conv_1')
    t.equal((listed.data[0] as { container_id?: string }).container_id, `cntr_${length}_[redacted]`)
    const keys = await eventually(async () => { const all = await redis.command('KEYS *'); return all.includes(`cntr_${length}_`) ? all : null }, 'the container noted in Redis')
    t.notOk(keys.includes(UPSTREAM_TOKEN), `${length > 0 ? 'a long listing' : 'a short one'}: the shared store never holds the token`)
  }
})

t.test('a 204 labelled with a charset other than UTF-8 has no text to read the token in: a deletion so answered is done for the SDK', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  upstream.respond = (_req, res) => { res.writeHead(204, { 'content-type': 'text/plain; charset=ISO-8859-1' }).end() }
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const deleted = await sdk.conversations.delete('conv_1').then(() => 'deleted', (err: Error) => err.message)
  t.equal(deleted, 'deleted', 'not a 502 for a deletion the upstream did')
  t.equal(upstream.requests.filter(r => r.method === 'DELETE').length, 1, 'sent once')
})

t.test('a Content-Type the upstream sends twice, the same, quoting the token, reaches the client without it', async t => {
  // The same type twice is passed on once: that one line was the upstream's as it came.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, ...withoutOwnership(upstream.url))
  const list = '{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false}'
  for (const [spelled, type] of [['as written', `application/json; note=${UPSTREAM_TOKEN}`], ['percent-encoded', `application/json; note=${UPSTREAM_TOKEN.replace('-', '%2D')}`]] as const) {
    for (const [status, path] of [[200, '/v1/conversations/conv_1/items'], [400, '/v1/conversations/conv_1']] as const) {
      upstream.respond = (_req, res) => {
        res.setHeader('content-type', [type, type])
        res.writeHead(status).end(status === 200 ? list : '{"error":{"message":"no","type":"invalid_request_error","param":null,"code":null}}')
      }
      const received = await sendRaw(gw.url, buildRequest('GET', path, [['Authorization', `Bearer ${KEYS.full}`]]))
      const head = received.received.toString('latin1').split('\r\n\r\n')[0]!
      t.match(head, new RegExp(`^HTTP/1.1 ${status} `), `${path}: passed on`)
      t.notOk(head.replace(/%2D/gi, '-').includes(UPSTREAM_TOKEN.slice(3)), `${path}, the token ${spelled}: not in the headers`)
    }
  }
})
