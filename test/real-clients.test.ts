// Defects found by real clients (the Python SDK, curl) and hostile ones, each over a real socket: what a client
// sends, what comes back, what the upstream saw and what the audit says.
import t, { type Test } from 'tap'
import { KEYS, startGateway, testConfig, type TestGateway } from './fixtures/gateway.js'
import { buildRequest, chunk, sendRaw } from './fixtures/raw-http.js'
import { startUpstream, type FakeUpstream } from './fixtures/upstream.js'

type Header = [string, string]
const FULL: Header = ['Authorization', `Bearer ${KEYS.full}`]
const JSON_TYPE: Header = ['Content-Type', 'application/json']

interface Harness { upstream: FakeUpstream, gw: TestGateway }

async function setup (t: Test, overrides: Record<string, unknown> = {}): Promise<Harness> {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, overrides))
  return { upstream, gw }
}

function headerNames (raw: string[]): string[] {
  return raw.filter((_, i) => i % 2 === 0).map(n => n.toLowerCase())
}

t.test('an empty body is no body: Content-Type: application/json with nothing after it is served on every method', async t => {
  const { upstream, gw } = await setup(t)
  const created = await sendRaw(gw.url, buildRequest('POST', '/v1/conversations', [FULL, JSON_TYPE], '{"items":[{"type":"message","role":"user","content":"hi"}]}'))
  const conversation = JSON.parse(created.response!.body) as { id: string }
  const listed = await sendRaw(gw.url, buildRequest('GET', `/v1/conversations/${conversation.id}/items`, [FULL]))
  const itemId = (JSON.parse(listed.response!.body) as { data: Array<{ id: string }> }).data[0]!.id
  upstream.requests.length = 0

  const cases: Array<[string, string, string]> = [
    ['DELETE item (Python SDK)', 'DELETE', `/v1/conversations/${conversation.id}/items/${itemId}`],
    ['GET conversation', 'GET', `/v1/conversations/${conversation.id}`],
    ['POST update with no body', 'POST', `/v1/conversations/${conversation.id}`],
    ['DELETE conversation (Python SDK)', 'DELETE', `/v1/conversations/${conversation.id}`]
  ]
  for (const [label, method, target] of cases) {
    for (const framing of ['Content-Length: 0', 'chunked, no chunks'] as const) {
      const headers: Header[] = [FULL, JSON_TYPE, framing === 'chunked, no chunks' ? ['Transfer-Encoding', 'chunked'] : ['Content-Length', '0']]
      const body = framing === 'chunked, no chunks' ? chunk('') : ''
      const before = upstream.requests.length
      const ex = await sendRaw(gw.url, buildRequest(method, target, headers, body))
      const status = ex.response?.status
      // The second DELETE of the same thing is the upstream's own 404: what matters is that it went upstream.
      t.ok(status === 200 || status === 404, `${label} (${framing}): answered by the upstream, got ${status}`)
      t.equal(upstream.requests.length, before + 1, `${label} (${framing}): forwarded once`)
      const seen = upstream.requests[before]!
      t.notOk(headerNames(seen.rawHeaders).includes('content-type'), `${label} (${framing}): no content-type upstream`)
      const length = seen.headers['content-length']
      t.ok(length === undefined || (method === 'POST' && length === '0'), `${label} (${framing}): no body framing upstream (content-length ${length})`)
      t.equal(seen.body.length, 0, `${label} (${framing}): no body bytes upstream`)
    }
  }
  const deletes = gw.audit().filter(r => r.method === 'DELETE')
  t.ok(deletes.length === 4 && deletes.every(r => r.bytesIn === 0), 'the DELETEs are audited with bytesIn 0')
})
