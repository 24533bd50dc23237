// GET /metrics: Prometheus text from real calls, behind a token on the main port or on a listener of its own,
// never open without one, with label values from bounded sets only.
import { once } from 'node:events'
import { connect, type Socket } from 'node:net'
import { Writable } from 'node:stream'
import t, { type Test } from 'tap'
import OpenAI from 'openai'
import { openAuditWriter } from '../src/audit/writer.js'
import { parseConfig } from '../src/config.js'
import { METRICS_MAX_CONNECTIONS } from '../src/plugins/metrics.js'
import { memoryLog } from './fixtures/audit.js'
import { eventually } from './fixtures/eventually.js'
import { KEYS, startGateway, testConfig, type TestGateway } from './fixtures/gateway.js'
import { closedPort, startUpstream, UPSTREAM_TOKEN } from './fixtures/upstream.js'

const TOKEN = 'metrics-token-0123456789abcdef'

function scrape (url: string, token: string | null = TOKEN) {
  return fetch(`${url}/metrics`, { headers: token === null ? {} : { authorization: `Bearer ${token}` } })
}

async function metricsText (url: string): Promise<string> {
  const res = await scrape(url)
  if (res.status !== 200) throw new Error(`scrape: ${res.status}`)
  return res.text()
}

/** The value of one sample line, e.g. `gateway_requests_total{client="a",...}`. */
function sample (text: string, series: string): number | undefined {
  const line = text.split('\n').find(l => l.startsWith(series + ' '))
  return line === undefined ? undefined : Number(line.slice(series.length + 1))
}

function call (gw: TestGateway, key: string, path = '/v1/conversations') {
  return fetch(`${gw.url}${path}`, {
    method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: '{}'
  })
}

t.test('/metrics on the main port answers only with the token, compared whatever its shape', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: TOKEN } }))
  for (const token of [null, 'wrong', `${TOKEN}x`, TOKEN.slice(0, -1), '']) {
    const res = await scrape(gw.url, token)
    t.equal(res.status, 401, `token ${JSON.stringify(token)}`)
    t.same(await res.json(), {
      error: { message: 'Missing or wrong metrics token. Send it as "Authorization: Bearer <token>".', type: 'invalid_request_error', param: null, code: 'invalid_metrics_token' }
    })
  }
  const ok = await scrape(gw.url)
  t.equal(ok.status, 200)
  t.match(ok.headers.get('content-type'), /^text\/plain; version=0\.0\.4/)
  t.same(gw.audit(), [], 'scrapes are not API calls: not audited')
  t.notOk(gw.logs.some(l => l.includes(TOKEN)), 'the token is never logged')
})

t.test('the counters follow real calls: by client, action, status and outcome, with latency and audit totals', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: TOKEN } }))
  for (let i = 0; i < 2; i++) t.equal((await call(gw, KEYS.full)).status, 200)
  for (let i = 0; i < 4; i++) await call(gw, KEYS.limited) // burst 3: the fourth is refused
  t.equal((await call(gw, 'ogw_not-a-key-9f8e7d')).status, 401)
  t.equal((await call(gw, KEYS.full, '/v1/zz-unheard-of-path')).status, 404)
  await gw.auditFile()
  const text = await metricsText(gw.url)

  t.equal(sample(text, 'gateway_requests_total{client="team-full",action="conversation.create",status="200",outcome="ok"}'), 2)
  t.equal(sample(text, 'gateway_requests_total{client="team-limited",action="conversation.create",status="200",outcome="ok"}'), 3)
  t.equal(sample(text, 'gateway_requests_total{client="team-limited",action="conversation.create",status="429",outcome="rate_limited"}'), 1)
  t.equal(sample(text, 'gateway_requests_total{client="none",action="conversation.create",status="401",outcome="denied"}'), 1)
  t.equal(sample(text, 'gateway_requests_total{client="none",action="unknown",status="404",outcome="invalid"}'), 1)
  t.equal(sample(text, 'gateway_rate_limited_total{client="team-limited"}'), 1)
  t.equal(sample(text, 'gateway_denied_total{client="none"}'), 1)
  t.equal(sample(text, 'gateway_upstream_duration_seconds_count{action="conversation.create"}'), 5, 'one upstream latency per call that reached it')
  t.equal(sample(text, 'gateway_added_duration_seconds_count{action="conversation.create"}'), 7, 'gateway latency for every call')
  t.equal(sample(text, 'gateway_in_flight_requests'), 0)
  t.equal(sample(text, 'gateway_audit_records_written_total'), 8)
  t.equal(sample(text, 'gateway_audit_write_failures_total'), 0)
  t.equal(sample(text, 'gateway_audit_records_lost_total'), 0)
  t.equal(sample(text, 'gateway_audit_available'), 1)
  t.equal(sample(text, 'gateway_upstream_token_refused_total'), 0)
  t.match(text, /^process_cpu_user_seconds_total \d/m, 'process metrics')
  t.match(text, /^nodejs_eventloop_lag_seconds \d/m, 'event-loop metrics')
  t.notMatch(text, /zz-unheard-of-path|not-a-key/, 'nothing a client sends becomes a label value')
})

t.test('every call the upstream answered 401 (it refused the gateway\'s own token) is counted, although the log says it once', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: TOKEN } }))
  upstream.respond = (_req, res) => { res.writeHead(401, { 'content-type': 'application/json' }).end('{"error":{"message":"Incorrect API key provided."}}') }
  // Proxied calls and, on an id route, the ownership lookup: each meets the refusal.
  for (let i = 0; i < 3; i++) t.equal((await call(gw, KEYS.full)).status, 502)
  t.equal((await call(gw, KEYS.full, '/v1/conversations/conv_x/items')).status, 502)
  t.equal(gw.logs.filter(l => l.includes('refused the gateway\'s token')).length, 1, 'one log line')
  t.equal(sample(await metricsText(gw.url), 'gateway_upstream_token_refused_total'), 4, 'four refusals counted')
  upstream.respond = null
  t.equal((await call(gw, KEYS.full)).status, 200)
  t.equal(sample(await metricsText(gw.url), 'gateway_upstream_token_refused_total'), 4, 'a counter: it stays once the token is taken again')
})

t.test('the upstream latency histogram reaches upstream.generationTimeoutMs (590 s, in the bucket le=600): a generation of minutes is not lumped in with one of 61 s', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: TOKEN } }))
  t.equal((await call(gw, KEYS.full)).status, 200)
  await gw.auditFile()
  const text = await metricsText(gw.url)
  const bounds = [...text.matchAll(/^gateway_upstream_duration_seconds_bucket\{le="([^"]+)",action="conversation\.create"\}/gm)].map(m => m[1])
  for (const le of ['60', '120', '300', '600', '+Inf']) t.ok(bounds.includes(le), `a bucket le="${le}"`)
})

t.test('in-flight calls are counted while they wait on the upstream', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const held: Array<() => void> = []
  upstream.respond = (_req, res) => { held.push(() => res.writeHead(200, { 'content-type': 'application/json' }).end('{"id":"conv_1"}')) }
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: TOKEN } }))
  const pending = [call(gw, KEYS.full), call(gw, KEYS.full)]
  while (held.length < 2) await new Promise(resolve => setTimeout(resolve, 10))
  t.equal(sample(await metricsText(gw.url), 'gateway_in_flight_requests'), 2)
  for (const release of held) release()
  await Promise.all(pending)
  t.equal(sample(await metricsText(gw.url), 'gateway_in_flight_requests'), 0)
})

/** A gateway with metrics in front of an upstream that takes every call and never answers (timeoutMs 300). */
async function silentUpstream (t: Test) {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  upstream.respond = () => {}
  const gw = await startGateway(t, testConfig(upstream.url, {
    metrics: { token: TOKEN }, upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 300, failureThreshold: 100 }
  }))
  return { upstream, gw }
}

t.test('a call that waited on the upstream and got no answer is not counted as latency the gateway added', async t => {
  const { gw } = await silentUpstream(t)
  t.equal((await call(gw, KEYS.full)).status, 504)
  await gw.auditFile()
  t.match(gw.audit(), [{ status: 504, attempts: 1, upstreamMs: null }])
  const text = await metricsText(gw.url)
  t.equal(sample(text, 'gateway_requests_total{client="team-full",action="conversation.create",status="504",outcome="upstream_error"}'), 1, 'the call is counted')
  const added = sample(text, 'gateway_added_duration_seconds_sum{action="conversation.create"}') ?? 0
  t.ok(added < 0.3, `its 300 ms waiting on the upstream are not the gateway's own latency (added: ${added} s)`)
})

t.test('a call whose owner lookup got no answer went upstream: its record has the attempt, and its wait is not latency the gateway added', async t => {
  const { upstream, gw } = await silentUpstream(t) // takes the lookup, never answers
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  await t.rejects(sdk.conversations.retrieve('conv_1'), { status: 504, code: 'upstream_timeout' })
  t.match(upstream.requests, [{ method: 'GET', url: '/v1/conversations/conv_1' }], 'the owner lookup went upstream, and nothing else')
  await gw.auditFile()
  t.match(gw.audit(), [{ action: 'conversation.retrieve', status: 504, outcome: 'upstream_error', attempts: 1, upstreamLine: null, upstreamMs: null }])
  const text = await metricsText(gw.url)
  t.equal(sample(text, 'gateway_requests_total{client="team-full",action="conversation.retrieve",status="504",outcome="upstream_error"}'), 1, 'the call is counted')
  const added = sample(text, 'gateway_added_duration_seconds_sum{action="conversation.retrieve"}') ?? 0
  t.ok(added < 0.3, `its 300 ms waiting on the upstream's answer to the lookup are not the gateway's own latency (added: ${added} s)`)
})

t.test('a streamed generation\'s time after its headers is the model\'s, not latency the gateway added', async t => {
  const upstream = await startUpstream({ responses: { streamDelayMs: 150 } })
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: TOKEN } }))
  const res = await fetch(`${gw.url}/v1/responses`, {
    method: 'POST',
    headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o', input: 'one two three', stream: true })
  })
  t.equal(res.status, 200)
  t.match(await res.text(), /response\.completed/)
  await gw.auditFile()
  const [record] = gw.audit()
  t.ok(record!.durationMs - record!.upstreamMs! >= 600, `the events came over ${record!.durationMs - record!.upstreamMs!} ms after the headers`)
  const text = await metricsText(gw.url)
  t.equal(sample(text, 'gateway_requests_total{client="team-full",action="response.create",status="200",outcome="ok"}'), 1, 'the call is counted')
  t.equal(sample(text, 'gateway_upstream_duration_seconds_count{action="response.create"}'), 1, 'its time to headers is the upstream\'s')
  const added = sample(text, 'gateway_added_duration_seconds_sum{action="response.create"}') ?? 0
  t.ok(added < 0.3, `the model's generating after the headers is not the gateway's own latency (added: ${added} s)`)
})

t.test('without metrics.token or metrics.listen there is no /metrics at all', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const res = await scrape(gw.url)
  t.equal(res.status, 404)
  t.match(await res.json(), { error: { code: 'unknown_route' } })
})

t.test('metrics.listen serves /metrics on its own host:port only, with the token when one is set', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const open = await startGateway(t, testConfig(upstream.url, { metrics: { listen: '127.0.0.1:0' } }))
  const own = `http://127.0.0.1:${open.app.metricsAddress()!.port}`
  t.equal((await call(open, KEYS.full)).status, 200)
  await open.auditFile()
  t.equal(sample(await (await fetch(`${own}/metrics`)).text(), 'gateway_audit_records_written_total'), 1)
  t.equal((await fetch(`${own}/v1/conversations`)).status, 404, 'nothing else on that port')
  t.equal((await scrape(open.url, null)).status, 404, 'not on the main port')

  const guarded = await startGateway(t, testConfig(upstream.url, { metrics: { listen: '127.0.0.1:0', token: TOKEN } }))
  const port = guarded.app.metricsAddress()!.port
  t.equal((await scrape(`http://127.0.0.1:${port}`, null)).status, 401)
  t.equal((await scrape(`http://127.0.0.1:${port}`, 'wrong-token-0123456789')).status, 401)
  t.equal((await scrape(`http://127.0.0.1:${port}`)).status, 200)
})

t.test('each upstream line\'s state and the store\'s are gauges, read at each scrape', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const refusing = `http://127.0.0.1:${await closedPort()}`
  const gw = await startGateway(t, testConfig(upstream.url, {
    metrics: { token: TOKEN },
    upstream: { baseUrls: [refusing, upstream.url], apiKey: UPSTREAM_TOKEN, timeoutMs: 2000, failureThreshold: 1, cooldownMs: 60_000 }
  }))
  const before = await metricsText(gw.url)
  t.equal(sample(before, 'gateway_upstream_line_up{line="0"}'), 1)
  t.equal(sample(before, 'gateway_upstream_line_up{line="1"}'), 1)
  t.equal(sample(before, 'gateway_store_available'), 1)
  t.equal((await call(gw, KEYS.full)).status, 200, 'refused by line 0, served by line 1')
  const after = await metricsText(gw.url)
  t.equal(sample(after, 'gateway_upstream_line_up{line="0"}'), 0, 'line 0 skipped')
  t.equal(sample(after, 'gateway_upstream_line_up{line="1"}'), 1)
})

t.test('metrics.listen serves /healthz with its details (the API port shows them only to the token)', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const open = await startGateway(t, testConfig(upstream.url, { metrics: { listen: '127.0.0.1:0' } }))
  const own = await fetch(`http://127.0.0.1:${open.app.metricsAddress()!.port}/healthz`)
  t.equal(own.status, 200)
  t.match(await own.json(), { status: 'ok', audit: 'ok', store: 'ok', upstream: [{ line: 0, host: new URL(upstream.url).host, state: 'up' }] })
  t.same(await (await fetch(`${open.url}/healthz`)).json(), { status: 'ok' }, 'the API port: alive, nothing more')

  const guarded = await startGateway(t, testConfig(upstream.url, { metrics: { listen: '127.0.0.1:0', token: TOKEN } }))
  const healthz = `http://127.0.0.1:${guarded.app.metricsAddress()!.port}/healthz`
  t.equal((await fetch(healthz)).status, 401, 'the token, where one is set')
  t.match(await (await fetch(healthz, { headers: { authorization: `Bearer ${TOKEN}` } })).json(), { status: 'ok', audit: 'ok' })
})

/** Two gateways with metrics.token: one with a metrics.listen of its own (ownUrl), one serving /metrics on its main port. */
async function metricsBothWays (t: Test) {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const own = await startGateway(t, testConfig(upstream.url, { metrics: { listen: '127.0.0.1:0', token: TOKEN } }))
  const ownUrl = `http://127.0.0.1:${own.app.metricsAddress()!.port}`
  const main = await startGateway(t, testConfig(upstream.url, { metrics: { token: TOKEN } }))
  return { own, ownUrl, main }
}

t.test('HEAD /healthz and HEAD /metrics answer as GET does, without a body, on metrics.listen and on the main port', async t => {
  // A probe that checks with HEAD (as HTTP lets any GET resource be checked) got 404 where GET had 200.
  const { ownUrl, main } = await metricsBothWays(t)
  for (const url of [`${ownUrl}/healthz`, `${ownUrl}/metrics`, `${main.url}/metrics`]) {
    for (const authorization of [`Bearer ${TOKEN}`, 'Bearer wrong-token-0123456789']) {
      const get = await fetch(url, { headers: { authorization } })
      const head = await fetch(url, { method: 'HEAD', headers: { authorization } })
      t.equal(head.status, get.status, `HEAD ${url.replace(/.*:\d+/, '')} (${authorization === `Bearer ${TOKEN}` ? 'token' : 'wrong token'}): ${get.status} as GET`)
      t.equal(head.headers.get('content-type'), get.headers.get('content-type'), 'the same content-type')
      t.equal(await head.text(), '', 'no body')
      await get.arrayBuffer()
    }
  }
  t.equal((await fetch(`${ownUrl}/v1/conversations`, { method: 'HEAD' })).status, 404, 'nothing else on that port, HEAD or not')
})

t.test('another method on /healthz, /readyz or /metrics is 405 with Allow: GET, HEAD (as on an API path), not 404 "unknown route"', async t => {
  // A probe configured with the wrong method (POST) was told the path does not exist.
  const { own, ownUrl, main } = await metricsBothWays(t)
  for (const url of [`${main.url}/healthz`, `${main.url}/readyz`, `${main.url}/metrics`, `${main.url}/healthz?x=1`]) {
    for (const method of ['POST', 'DELETE', 'PUT']) {
      const res = await fetch(url, { method, headers: { authorization: `Bearer ${TOKEN}` } })
      t.equal(res.status, 405, `${method} ${url.replace(/.*:\d+/, '')}`)
      t.equal(res.headers.get('allow'), 'GET, HEAD')
      t.match(await res.json(), { error: { type: 'invalid_request_error', code: 'method_not_allowed', message: `Method ${method} is not allowed on ${new URL(url).pathname}.` } })
    }
  }
  t.equal((await fetch(`${own.url}/metrics`, { method: 'POST' })).status, 404, 'a /metrics the main port does not serve stays unknown')
  for (const path of ['/healthz', '/metrics']) {
    const res = await fetch(`${ownUrl}${path}`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` } })
    t.equal(res.status, 405, `POST ${path} on metrics.listen`)
    t.equal(res.headers.get('allow'), 'GET, HEAD')
    // the error table's 405 row, on metrics.listen too: it was a line of plain text
    t.match(await res.json(), { error: { type: 'invalid_request_error', param: null, code: 'method_not_allowed', message: `Method POST is not allowed on ${path}.` } })
  }
  const unknown = await fetch(`${ownUrl}/readyz`, { method: 'POST' })
  t.equal(unknown.status, 404, 'metrics.listen serves no /readyz')
  t.match(await unknown.json(), { error: { type: 'invalid_request_error', param: null, code: 'unknown_route', message: /metrics\.listen.*\/metrics and \/healthz/ } },
    'in the envelope, as every error the gateway makes')
})

t.test('metrics.listen keeps at most METRICS_MAX_CONNECTIONS connections: a flood of them on that port cannot use up the process\'s file descriptors and shut the API out', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { listen: '127.0.0.1:0' } }))
  const port = gw.app.metricsAddress()!.port
  const flood: Socket[] = []
  t.teardown(() => { for (const s of flood) s.destroy() })
  let closedByServer = 0
  for (let i = 0; i < METRICS_MAX_CONNECTIONS + 40; i++) {
    const s = connect(port, '127.0.0.1')
    s.on('error', () => {})
    s.on('close', () => { closedByServer++ })
    flood.push(s)
    await once(s, 'connect')
  }
  // (Each of these holds a descriptor in the gateway until Node's headers timeout, with nothing sent.)
  await eventually(async () => closedByServer >= 40, 'the connections past the limit closed by the gateway')
  t.equal(closedByServer, 40, 'exactly those past the limit')
  t.equal((await call(gw, KEYS.full)).status, 200, 'the API is served meanwhile')
  for (const s of flood) s.destroy()
  await eventually(() => fetch(`http://127.0.0.1:${port}/metrics`).then(r => r.status === 200, () => false), 'a scrape once the flood is gone')
})

t.test('metrics.listen closes a connection that sends no request within listen.headersTimeoutMs, as the API listener does', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { listen: '127.0.0.1:0' }, listen: { host: '127.0.0.1', port: 0, headersTimeoutMs: 300 } }))
  const silent = connect(gw.app.metricsAddress()!.port, '127.0.0.1')
  t.teardown(() => silent.destroy())
  silent.on('error', () => {})
  silent.resume() // reads, so that the gateway's closing is seen
  await once(silent, 'connect')
  let closed = false
  silent.on('close', () => { closed = true })
  // Else the METRICS_MAX_CONNECTIONS places, once taken by such connections, would shut out every scrape for good.
  await eventually(async () => closed, 'the silent connection closed by the gateway', 5_000)
  t.ok(closed)
})

t.test('records the audit could not take show as lost, and the audit as unavailable', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const stuck = new Writable({ write () {} }) // takes the first write and never finishes it
  const config = testConfig(upstream.url, { metrics: { token: TOKEN }, audit: { file: '-', onFailure: 'open' } })
  const writer = await openAuditWriter({ ...config.audit, log: memoryLog(), stdout: stuck, maxPending: 1 })
  const gw = await startGateway(t, config, { auditWriter: writer })
  for (let i = 0; i < 4; i++) {
    t.equal((await call(gw, KEYS.full)).status, 200)
    await new Promise(resolve => setImmediate(resolve))
  }
  const text = await metricsText(gw.url)
  t.ok(sample(text, 'gateway_audit_records_lost_total')! >= 2, 'lost records counted')
  t.equal(sample(text, 'gateway_audit_available'), 0)
})

t.test('metrics config: listen must be host:port, and a token must be long enough to guess at nothing', async t => {
  const base = { upstream: { baseUrls: ['http://x'], apiKey: 'k' } }
  t.throws(() => parseConfig({ ...base, metrics: { listen: '9100' } }), { message: /metrics\.listen: must be host:port with a port from 0 to 65535/ })
  t.throws(() => parseConfig({ ...base, metrics: { listen: '127.0.0.1:99999' } }), { message: /metrics\.listen: must be host:port with a port from 0 to 65535/ })
  t.throws(() => parseConfig({ ...base, listen: { host: '127.0.0.1', port: 9100 }, metrics: { listen: '127.0.0.1:9100' } }),
    { message: /metrics\.listen: its port is listen\.port, on an address listen\.host also takes/ })
  t.same(parseConfig({ ...base, metrics: { listen: '127.0.0.1:65535' } }).metrics, { listen: '127.0.0.1:65535' })
  // A wildcard host takes the port on every address: start would fail with "port is in use", check-config said ok.
  for (const [host, listen] of [['0.0.0.0', '127.0.0.1:9100'], ['127.0.0.1', '0.0.0.0:9100'], ['::', '[::1]:9100'], ['10.0.0.5', '[::]:9100']]) {
    t.throws(() => parseConfig({ ...base, listen: { host, port: 9100 }, metrics: { listen } }),
      { message: /metrics\.listen: its port is listen\.port, on an address listen\.host also takes/ }, `${host} and ${listen}`)
  }
  t.ok(parseConfig({ ...base, listen: { host: '10.0.0.5', port: 9100 }, metrics: { listen: '127.0.0.1:9100' } }), 'two addresses, one port each')
  t.ok(parseConfig({ ...base, listen: { host: '0.0.0.0', port: 0 }, metrics: { listen: '127.0.0.1:0' } }), 'port 0: any free port, each its own')
  t.throws(() => parseConfig({ ...base, metrics: { token: 'short' } }), { message: /metrics\.token: must NOT have fewer than 16 characters/ })
  t.throws(() => parseConfig({ ...base, metrics: { path: '/m' } }), { message: /metrics\.path: unknown key/ })
  // A token read from a secret file with its line break could never be presented (a header value holds none):
  // every scrape would get 401. Refused as every other secret is.
  t.throws(() => parseConfig({ ...base, metrics: { token: 'metrics-token-0123456789\n' } }),
    { message: /metrics\.token: must not contain whitespace or control characters/ })
  t.throws(() => parseConfig({ ...base, metrics: { token: 'metrics token 0123456789' } }),
    { message: /metrics\.token: must not contain whitespace or control characters/ })
  t.same(parseConfig({ ...base, metrics: { listen: '[::1]:9100' } }).metrics, { listen: '[::1]:9100' })
})
