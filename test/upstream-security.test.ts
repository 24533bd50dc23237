// The upstream hop carries the one secret that matters: verified TLS, an allow-list of request headers, and
// only the eight operations' routes registered.
import { readFileSync } from 'node:fs'
import { request, type IncomingMessage, type RequestOptions } from 'node:http'
import { join } from 'node:path'
import t from 'tap'
import { KEYS, startGateway, testConfig } from './fixtures/gateway.js'
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
  t.equal(seen.headers['idempotency-key'], 'idem-1')
  t.equal(seen.headers['user-agent'], 'team-search/1.0')
  t.equal(seen.body.toString(), '{"metadata":{"a":"b","gateway_owner":"team-full"}}', 'the body, with only the owner added')
  t.notOk(upstream.everything().includes(KEYS.full), 'the client key is nowhere upstream')
  t.notOk(upstream.everything().includes('6.6.6.6'), 'no client-supplied forwarding header')
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
