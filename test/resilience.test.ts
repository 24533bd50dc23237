// Resilience: several OhMyGPT lines with failover and safe retries, split timeouts, slow and hostile clients,
// bounded load. Faults are injected into fake upstreams on loopback; every time is a small configured value.
import { spawn } from 'node:child_process'
import { Agent, request, type ServerResponse } from 'node:http'
import { dirname, resolve } from 'node:path'
import net, { createServer as createTcpServer, createConnection, type AddressInfo, type Socket } from 'node:net'
import t, { type Test } from 'tap'
import OpenAI from 'openai'
import type { AuditRecord } from '../src/plugins/audit.js'
import { call, openCall, sleep, until, type Answer } from './fixtures/client.js'
import { eventually } from './fixtures/eventually.js'
import { healthDetails, KEYS, METRICS_TOKEN, startGateway, testConfig, withoutOwnership, type TestGateway } from './fixtures/gateway.js'
import { closedPort, faults, startLines, UPSTREAM_TOKEN, type FakeUpstream, type Responder } from './fixtures/upstream.js'
import { startRedis } from './fixtures/redis-server.js'
import { keyDigest } from '../src/keys.js'
import { parseConfig } from '../src/config.js'
import { LineHealth } from '../src/upstream/lines.js'
import { BIN, configFile, env } from './fixtures/bin.js'

interface Lines {
  lines: FakeUpstream[]
  gw: TestGateway
  /** a conversation that exists behind every line (they share one account) */
  conv: string
}

/** `count` fake lines (plus any extra base URLs first) and a gateway in front of them. */
async function setup (t: Test, count: number, upstream: Record<string, unknown> = {}, overrides: Record<string, unknown> = {},
  before: string[] = []): Promise<Lines> {
  const lines = await startLines(count)
  t.teardown(async () => { await Promise.all(lines.map(l => l.close())) })
  const baseUrls = [...before, ...lines.map(l => l.url)]
  const gw = await startGateway(t, ...withoutOwnership(baseUrls[0]!, {
    upstream: { baseUrls, apiKey: UPSTREAM_TOKEN, timeoutMs: 2000, ...upstream },
    metrics: { token: METRICS_TOKEN },
    ...overrides
  }))
  if (lines[0] === undefined) return { lines, gw, conv: 'conv_nowhere' }
  const created = await fetch(`${lines[0].url}/v1/conversations`, { method: 'POST', headers: { authorization: `Bearer ${UPSTREAM_TOKEN}` }, body: '{}' })
  const { id } = await created.json() as { id: string }
  lines[0].requests.length = 0
  return { lines, gw, conv: id }
}

async function lastRecord (gw: TestGateway, count: number): Promise<AuditRecord> {
  await until(`${count} audit records`, () => gw.audit().length >= count)
  return gw.audit()[count - 1]!
}

function codeOf (a: Answer): unknown {
  return (JSON.parse(a.body) as { error?: { code?: unknown } }).error?.code
}

const GENERATION = '{"model":"gpt-4o-mini","input":"a long answer"}'

/** A healthy line whose generations (POST /v1/responses) take `ms` to answer; anything else is answered at once. */
function slowGenerations (ms: number): Responder {
  return (req, res) => {
    const answer = () => {
      if (res.destroyed) return
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ object: 'list', data: [], first_id: null, last_id: null, has_more: false }))
    }
    if (req.method === 'POST' && req.url === '/v1/responses') setTimeout(answer, ms)
    else answer()
  }
}

/** An https:// line that takes TCP connections and never speaks TLS: no connection to it is ever set up. */
async function silentTlsLine (t: Test): Promise<string> {
  const accepted: Socket[] = []
  const silent = createTcpServer(socket => { socket.on('error', () => {}); accepted.push(socket) })
  await new Promise<void>(resolve => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise(resolve => { for (const s of accepted) s.destroy(); silent.close(resolve) }))
  return `https://127.0.0.1:${(silent.address() as AddressInfo).port}`
}

const healthOf = async (gw: TestGateway) => (await healthDetails(gw.url)).body as unknown as { upstream: Array<{ line: number, state: string, failures: number, retryInMs: number | null }> }

t.test('lines and failover', async t => {
  await t.test('a GET whose first line refuses connections is served by the next; the audit names the line and the attempts', async t => {
    const refused = `http://127.0.0.1:${await closedPort()}`
    const { lines, gw, conv } = await setup(t, 1, {}, {}, [refused])
    const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(a.status, 200)
    t.equal(lines[0]!.requests.length, 1, 'the second line served it')
    t.match(await lastRecord(gw, 1), { status: 200, outcome: 'ok', upstreamLine: 1, attempts: 2 })
  })

  await t.test('after failureThreshold failures in a row a line is skipped for cooldownMs, then one trial call decides', async t => {
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 400 })
    const [first, second] = lines as [FakeUpstream, FakeUpstream]
    first.respond = faults.status(503)
    for (let i = 0; i < 2; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, `call ${i + 1}: retried on line 1`)
    t.equal(first.requests.length, 2)
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }, { line: 1, state: 'up' }], '/healthz shows line 0 down')
    t.ok(gw.logs.some(l => l.includes('upstream line 0 skipped')), 'the log says the line is skipped')

    for (let i = 0; i < 3; i++) await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(first.requests.length, 2, 'while skipped, line 0 gets nothing')
    t.match(await lastRecord(gw, 5), { upstreamLine: 1, attempts: 1 }, 'and calls go straight to line 1')

    await sleep(450)
    first.respond = faults.status(503)
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'a failed trial call is retried elsewhere')
    t.equal(first.requests.length, 3, 'after the cooldown line 0 got exactly one trial call')
    t.match((await healthOf(gw)).upstream[0], { state: 'down' }, 'it failed, so line 0 sleeps again')

    await sleep(450)
    first.respond = null
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200)
    t.equal(first.requests.length, 4, 'the next trial call')
    t.match((await healthOf(gw)).upstream[0], { state: 'up' }, 'succeeded: line 0 is trusted again')
    t.ok(gw.logs.some(l => l.includes('upstream line 0 restored')), 'the log says so')
    await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(first.requests.length, 5, 'and preferred again')
    t.equal(second.requests.length, 6)
  })

  await t.test('a trial call whose answer the line breaks off after its headers puts the line back to sleep: one call per cooldown, not failureThreshold', async t => {
    // The trial's headers restored the line at once, failures cleared: the answer broken off after them was one
    // failure of a line up, and failureThreshold more calls (not one) met the broken line in every cooldown.
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 400 })
    const [first, second] = lines as [FakeUpstream, FakeUpstream]
    const breaksOff: Responder = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': '1000' })
      res.write('{"object":"list","data":[')
      setTimeout(() => res.socket?.destroy(), 20)
    }
    first.respond = breaksOff
    for (let i = 0; i < 2; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 502, `call ${i + 1}: broken off by line 0`)
    t.match((await healthOf(gw)).upstream[0], { state: 'down' }, 'line 0 is skipped')

    await sleep(450)
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 502, 'the trial call: broken off again')
    t.equal(first.requests.length, 3, 'line 0 got its one trial call')
    await eventually(async () => (await healthOf(gw)).upstream[0]!.state === 'down', 'line 0 skipped again')
    t.match((await healthOf(gw)).upstream[0], { state: 'down', failures: 3 }, 'the trial failed: line 0 sleeps again, its failures counted on')
    const before = second.requests.length
    for (let i = 0; i < 2; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, `call ${i + 1} after the trial: served`)
    t.equal(first.requests.length, 3, 'by line 1 alone: line 0 gets nothing until its next trial')
    t.equal(second.requests.length, before + 2)

    await sleep(450)
    first.respond = null
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'the next trial call, answered whole')
    t.match((await healthOf(gw)).upstream[0], { state: 'up', failures: 0 }, 'line 0 is trusted again')
  })

  await t.test('a call the line took before it was skipped does not restore it when it ends well: only its trial call decides', async t => {
    // A slow answer (a long stream, a read the line was slow on) that started while the line was up and ended well
    // after it was skipped restored it at once, long before its cooldown: the next create went to the line that
    // was answering 503 and got that 503, where the next line was up.
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 60_000 })
    const [first, second] = lines as [FakeUpstream, FakeUpstream]
    let release = (): void => {}
    first.respond = (_req, res) => {
      release = () => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false}') }
      first.respond = faults.status(503) // from now on the line fails every call
    }
    const slow = call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    await until('the slow call to reach line 0', () => first.requests.length === 1)
    for (let i = 0; i < 2; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, `read ${i + 1}: 503 on line 0, retried on line 1`)
    t.match((await healthOf(gw)).upstream[0], { state: 'down' }, 'line 0 is skipped')
    release()
    t.equal((await slow).status, 200, 'the slow call, taken before, ends well')
    await lastRecord(gw, 3)
    t.match((await healthOf(gw)).upstream[0], { state: 'down' }, 'line 0 is still skipped: that call was no trial')
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
    t.match(await sdk.conversations.create({}), { object: 'conversation' }, 'the next create is served')
    t.equal(first.requests.length, 3, 'by line 1: line 0 got nothing more')
    t.equal(second.requests.filter(r => r.method === 'POST').length, 1)
  })

  await t.test('a POST is no skipped line\'s trial while another line is up: that line serves it, and the next read is the trial', async t => {
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 200 })
    const [first, second] = lines as [FakeUpstream, FakeUpstream]
    // A line that drops every connection once the request is in: a POST sent there may have been done, and is lost.
    first.respond = faults.reset()
    for (let i = 0; i < 2; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, `read ${i + 1}: retried on line 1`)
    t.match((await healthOf(gw)).upstream[0], { state: 'down' }, 'line 0 skipped')
    await sleep(250)
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 2 })
    const created = await sdk.conversations.create({ metadata: { topic: 'failover' } })
    t.match(created, { object: 'conversation', metadata: { topic: 'failover' } }, 'the create is served')
    t.equal(first.requests.length, 2, 'line 0, due for its trial, was not given the create')
    t.equal(second.requests.filter(r => r.method === 'POST' && r.url === '/v1/conversations').length, 1, 'line 1 got it, once')
    t.match((await healthOf(gw)).upstream[0], { state: 'down' }, 'line 0 is still waiting for its trial')
    t.match(await lastRecord(gw, 3), { action: 'conversation.create', status: 200, upstreamLine: 1, attempts: 1 })
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'the next read: line 0\'s trial, failed, retried on line 1')
    t.equal(first.requests.length, 3, 'the read was line 0\'s trial')
    await sleep(250)
    first.respond = null
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200)
    t.match((await healthOf(gw)).upstream[0], { state: 'up' }, 'a read restores it')
    // With no other line up, a POST is a due line's trial all the same: it is the only line there is.
    const alone = await setup(t, 1, { failureThreshold: 1, cooldownMs: 200 })
    alone.lines[0]!.respond = faults.status(503)
    t.equal((await call(alone.gw.url, 'GET', `/v1/conversations/${alone.conv}/items`)).status, 503)
    alone.lines[0]!.respond = null
    await sleep(250)
    const aloneSdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${alone.gw.url}/v1`, maxRetries: 0 })
    t.match(await aloneSdk.conversations.create({}), { object: 'conversation' }, 'the only line\'s trial is the create, served')
    t.match((await healthOf(alone.gw)).upstream[0], { state: 'up' })
  })

  await t.test('a trial call whose client hangs up decides nothing, and the log does not say the line was skipped again', async t => {
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 1, cooldownMs: 1 })
    const [first] = lines as [FakeUpstream, FakeUpstream]
    first.respond = faults.status(503)
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'retried on line 1; line 0 skipped')
    first.respond = faults.hang()
    const req = openCall(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    await until('the trial call at line 0', () => first.requests.length === 2)
    req.destroy()
    await lastRecord(gw, 2)
    await until('the trial given up', () => gw.logs.some(l => l.includes('upstream line 0 trial call')))
    t.equal(gw.logs.filter(l => l.includes('upstream line 0 skipped')).length, 1, 'one line says line 0 was skipped: when it was')
    t.match(gw.logs.find(l => l.includes('upstream line 0 trial call')), /"level":30/, 'the trial given up is told at info')
  })

  await t.test('a line that fails every other call is skipped while another line is up; the last line up is not', async t => {
    /** 503 to every other call (never two failures in a row), an empty list of items to the others */
    const flapping = (): Responder => {
      let calls = 0
      return (req, res, body) => {
        if (calls++ % 2 === 0) {
          faults.status(503)(req, res, body)
          return
        }
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false}')
      }
    }
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 3, cooldownMs: 30_000 })
    lines[0]!.respond = flapping()
    for (let i = 0; i < 11; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, `read ${i + 1}`)
    t.equal(lines[0]!.requests.length, 11)
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }, { line: 1, state: 'up' }], 'half of its last ten calls failed: skipped')
    t.ok(gw.logs.some(l => l.includes('upstream line 0 skipped')), 'the log says so')
    await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(lines[0]!.requests.length, 11, 'and it gets nothing while skipped')

    // Alone, it is never skipped for it: half its calls served is better than none.
    const alone = await setup(t, 1, { failureThreshold: 3, cooldownMs: 30_000 })
    alone.lines[0]!.respond = flapping()
    const statuses = []
    for (let i = 0; i < 20; i++) statuses.push((await call(alone.gw.url, 'GET', `/v1/conversations/${alone.conv}/items`)).status)
    t.equal(statuses.filter(s => s === 200).length, 10, 'every other call served')
    t.equal(alone.lines[0]!.requests.length, 20, 'every call tried on the line')
    t.match((await healthOf(alone.gw)).upstream, [{ line: 0, state: 'up' }])
  })

  await t.test('a line that breaks off its answers mid-body counts failures and is skipped; the next line serves', async t => {
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 30_000 })
    const [first, second] = lines as [FakeUpstream, FakeUpstream]
    first.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.write('{"object":"list","data":[')
      setTimeout(() => { res.socket?.destroy() }, 20)
    }
    for (let i = 0; i < 2; i++) {
      const res = await fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
      t.equal(res.status, 200, `read ${i + 1}: the headers had gone out`)
      await t.rejects(res.text(), `read ${i + 1}: its body is cut`)
    }
    await lastRecord(gw, 2)
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }, { line: 1, state: 'up' }], 'after failureThreshold broken answers, line 0 is skipped')
    t.ok(gw.logs.some(l => l.includes('upstream line 0 skipped')), 'the log says so')
    const next = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(next.status, 200, 'the next read is served whole by line 1')
    t.equal(first.requests.length, 2)
    t.equal(second.requests.length, 1)
  })

  await t.test('a client that hangs up mid-body is no failure of the line', async t => {
    const { lines, gw, conv } = await setup(t, 1, { failureThreshold: 1, cooldownMs: 30_000 })
    lines[0]!.respond = faults.trickle(50, 50)
    const req = openCall(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    await new Promise<void>(resolve => req.once('response', res => { res.once('data', () => { resolve() }) }))
    req.destroy()
    await lastRecord(gw, 1)
    await sleep(100)
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'up', failures: 0 }], 'the line stays up (failureThreshold 1)')
  })

  await t.test('with every line down, 502 upstream_unavailable at once, without trying any', async t => {
    const ports = [await closedPort(), await closedPort()]
    const { gw } = await setup(t, 0, { failureThreshold: 1, cooldownMs: 60_000 }, {}, ports.map(p => `http://127.0.0.1:${p}`))
    const first = await call(gw.url, 'GET', '/v1/conversations/conv_x/items')
    t.equal(first.status, 502)
    t.equal(first.headers['retry-after'], undefined, 'the lines were tried: no hint of when to come back')
    t.match(await lastRecord(gw, 1), { outcome: 'upstream_error', attempts: 2, upstreamLine: null })
    const second = await call(gw.url, 'GET', '/v1/conversations/conv_x/items')
    t.equal(second.status, 502)
    t.equal(codeOf(second), 'upstream_unavailable')
    const retryAfter = Number(second.headers['retry-after'])
    t.ok(retryAfter >= 59 && retryAfter <= 60, `retry-after says when the first line gets its trial call (cooldownMs 60 s): ${retryAfter}`)
    t.match(await lastRecord(gw, 2), { outcome: 'upstream_error', attempts: 0 }, 'no line was tried')
    t.match((await healthOf(gw)).upstream, [{ state: 'down' }, { state: 'down' }])
  })

  await t.test('with every line down for minutes (cooldownMs 10 min), the SDK with its retries raises the 502 at once instead of sleeping through retry-after', async t => {
    const ports = [await closedPort()]
    const { gw } = await setup(t, 0, { failureThreshold: 1, cooldownMs: 600_000 }, {}, ports.map(p => `http://127.0.0.1:${p}`))
    let sent = 0
    // (the SDK's default retries, two: it sleeps what retry-after says, however long, before it sends the call again)
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, fetch: async (url, init) => { sent++; return await fetch(url, init) } })
    t.equal((await call(gw.url, 'GET', '/v1/conversations/conv_x/items')).status, 502, 'the line refused: skipped for 10 minutes')
    const err = await sdk.conversations.items.list('conv_x').then(() => null, (e: unknown) => e)
    t.type(err, OpenAI.InternalServerError)
    const e = err as InstanceType<typeof OpenAI.InternalServerError>
    t.match(e, { status: 502, code: 'upstream_unavailable' })
    t.ok(Number(e.headers?.get('retry-after')) > 60, 'retry-after still says when: in minutes')
    t.equal(e.headers?.get('x-should-retry'), 'false')
    t.equal(sent, 1, 'sent once, not again')
  })

  await t.test('with every line down, the calls refused at once write no log line each: the log said when each line was skipped', async t => {
    const ports = [await closedPort(), await closedPort()]
    const baseUrls = ports.map(p => `http://127.0.0.1:${p}`)
    // Ownership checked, as in production: a call on a conversation looks its owner up upstream first.
    const gw = await startGateway(t, testConfig(baseUrls[0]!, {
      log: { level: 'info' }, upstream: { baseUrls, apiKey: UPSTREAM_TOKEN, failureThreshold: 1, cooldownMs: 60_000 }, metrics: { token: METRICS_TOKEN }
    }))
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
    await t.rejects(sdk.conversations.create({}), { status: 502, code: 'upstream_unavailable' }, 'both lines tried, both skipped')
    t.match((await healthOf(gw)).upstream, [{ state: 'down' }, { state: 'down' }])
    const before = gw.logs.length
    for (let i = 0; i < 10; i++) {
      await t.rejects(sdk.conversations.create({}), { status: 502, code: 'upstream_unavailable' })
      await t.rejects(sdk.conversations.items.list('conv_x'), { status: 502, code: 'upstream_unavailable' }, 'its owner lookup not tried either')
    }
    t.equal(gw.audit().length, 21, 'each call is in the audit')
    t.same(gw.logs.slice(before), [], 'and not in the log: an outage of every line is not a line per call refused')
  })
})

/** What Cloudflare, in front of a line, answers when it cannot get an answer from the origin: its own HTML page. */
function cloudflare (status: number): Responder {
  return (_req, res) => {
    res.writeHead(status, { 'content-type': 'text/html; charset=UTF-8', server: 'cloudflare' })
    res.end(`<!DOCTYPE html><html><head><title>opapi.win | ${status}: Cloudflare</title></head><body>Error code ${status}</body></html>`)
  }
}

t.test('a fronting proxy\'s (Cloudflare\'s) statuses speak against the line, and a POST it never passed on goes to the next', async t => {
  await t.test('522 (the origin never reached): a create is sent on the next line, once', async t => {
    const { lines, gw } = await setup(t, 2)
    lines[0]!.respond = cloudflare(522)
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
    const created = await sdk.conversations.create({ metadata: { topic: 'once' } })
    t.match(created, { object: 'conversation', metadata: { topic: 'once' } })
    t.same(lines.map(l => l.requests.length), [1, 1], 'line 0 refused it at its edge, line 1 created it')
    t.match(await lastRecord(gw, 1), { status: 200, upstreamLine: 1, attempts: 2 })
  })

  await t.test('520 (the origin\'s answer unusable: it may have done it): a POST is not sent again; a GET is', async t => {
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 100 })
    lines[0]!.respond = cloudflare(520)
    const post = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { body: '{"items":[]}' })
    t.equal(post.status, 520, 'the line\'s status')
    t.equal(codeOf(post), 'upstream_error', 'in OpenAI\'s envelope, not the HTML page')
    t.equal(lines[1]!.requests.length, 0, 'line 1 never saw the POST')
    const get = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(get.status, 200, 'the GET is served by line 1')
    t.same(lines.map(l => l.requests.length), [2, 1])
  })

  await t.test('failureThreshold of them in a row and the line is skipped; a generation that outlived the proxy\'s deadline (524) is not held against it', async t => {
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 30_000 })
    lines[0]!.respond = cloudflare(524)
    const generation = await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })
    t.equal(generation.status, 524, 'passed on: the model may have done it, so it is not sent again')
    t.equal(lines[1]!.requests.length, 0)
    t.match((await healthOf(gw)).upstream[0], { state: 'up', failures: 0 }, 'a slow model says nothing of the line')
    for (let i = 0; i < 2; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, `read ${i + 1}: retried on line 1`)
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }, { line: 1, state: 'up' }], 'two quick calls timed out at the edge: line 0 skipped')
    t.ok(gw.logs.some(l => l.includes('upstream line 0 answered 524; retrying on line 1')), 'the log says why')
  })

  await t.test('a generation its proxy gave up on (524) decides nothing: it neither restores a skipped line nor clears its count', async t => {
    const { lines, gw, conv } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 200 })
    lines[0]!.respond = cloudflare(524)
    const read = async () => { t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'a read, served by line 1') }
    await read()
    t.equal((await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })).status, 524)
    await read()
    t.match((await healthOf(gw)).upstream[0], { state: 'down' }, 'two quick calls timed out at the edge, a generation between them')
    // Line 1 skipped too (a generation is a line's trial only when no other line is up), then working again.
    lines[1]!.respond = faults.status(503)
    for (let i = 0; i < 2; i++) await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.match((await healthOf(gw)).upstream, [{ state: 'down' }, { state: 'down' }], 'both lines skipped')
    lines[1]!.respond = null
    await sleep(250)
    t.equal((await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })).status, 524, 'the trial call, a generation: 524')
    t.notMatch((await healthOf(gw)).upstream[0], { state: 'up' }, 'the line whose origin does not answer is not trusted again')
    await read()
    t.equal(lines[0]!.requests.length, 5, 'the next call was its trial')
    t.match((await healthOf(gw)).upstream[0], { state: 'down' })
  })

  await t.test('a POST its proxy says the origin got (504, 520, 524) is not sent again by the SDK either: x-should-retry: false', async t => {
    const { lines, gw, conv } = await setup(t, 1, { failureThreshold: 100 })
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 2, timeout: 5000 })
    for (const status of [524, 504, 520]) {
      lines[0]!.requests.length = 0
      lines[0]!.respond = cloudflare(status)
      const err = await sdk.responses.create({ model: 'gpt-4o-mini', input: 'a long answer' }).catch((e: unknown) => e)
      t.equal((err as InstanceType<typeof OpenAI.APIError>).status, status, `${status}: raised`)
      t.equal(lines[0]!.requests.length, 1, `${status}: the generation the origin may be running is sent once, not three times`)
    }
    // A GET is still the SDK's to retry, and a 503 (the origin refused it: overloaded) too.
    lines[0]!.requests.length = 0
    const get = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(get.status, 520)
    t.equal(get.headers['x-should-retry'], undefined)
    lines[0]!.respond = cloudflare(503)
    const overloaded = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { body: '{"items":[]}' })
    t.equal(overloaded.headers['x-should-retry'], undefined)
  })
})

/** A line that is not where the config says: every call answered with a redirect (http:// to https://, a moved host). */
function redirecting (status: number): Responder {
  return (req, res) => {
    res.writeHead(status, { location: `https://moved.example${req.url ?? '/'}`, 'content-type': 'text/html' })
    res.end('<html><body>Moved</body></html>')
  }
}

t.test('a line that redirects is failing: the gateway follows no redirect, counts it against the line and goes to the next', async t => {
  await t.test('a create answered 301 (the request not done) is sent on the next line; the line is skipped after failureThreshold', async t => {
    const { lines, gw } = await setup(t, 2, { failureThreshold: 2, cooldownMs: 30_000 })
    lines[0]!.respond = redirecting(301)
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
    for (let i = 0; i < 2; i++) {
      const created = await sdk.conversations.create({ metadata: { topic: `moved ${i}` } })
      t.match(created, { object: 'conversation', metadata: { topic: `moved ${i}` } }, `create ${i + 1}: served by line 1`)
    }
    t.same(lines.map(l => l.requests.length), [2, 2])
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }, { line: 1, state: 'up' }], 'line 0 skipped')
    await sdk.conversations.create({})
    t.same(lines.map(l => l.requests.length), [2, 3], 'while skipped, line 0 gets nothing')
    t.ok(gw.logs.some(l => l.includes('upstream line 0 answered 301; retrying on line 1')), 'the log says why')
  })

  await t.test('with one line, the client gets 502 upstream_unavailable (no redirect, no location), and a POST the line may have done (303) is not sent again', async t => {
    const { lines, gw, conv } = await setup(t, 1, { failureThreshold: 100 })
    for (const status of [301, 302, 307, 308]) {
      lines[0]!.respond = redirecting(status)
      const a = await call(gw.url, 'POST', '/v1/conversations', { body: '{}' })
      t.equal(a.status, 502, `${status}: 502`)
      t.equal(codeOf(a), 'upstream_unavailable', `${status}: upstream_unavailable`)
      t.equal(a.headers.location, undefined, `${status}: no location`)
      t.equal(a.headers['x-should-retry'], undefined, `${status}: nothing was done: the SDK may send it again`)
    }
    lines[0]!.respond = redirecting(303)
    const seeOther = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { body: '{"items":[]}' })
    t.equal(seeOther.status, 502)
    t.equal(seeOther.headers['x-should-retry'], 'false', '303 See Other: the call may have been done')
    t.match(await lastRecord(gw, 5), { status: 502, outcome: 'upstream_error', upstreamLine: 0 })
    t.ok(gw.logs.some(l => l.includes('https://moved.example/v1/conversations')), 'the log says where the line points')
  })
})

t.test('retries never duplicate work', async t => {
  await t.test('a POST that got a 503 is not sent again: the 503 passes through unchanged', async t => {
    const { lines, gw, conv } = await setup(t, 2)
    lines[0]!.respond = faults.status(503, { 'retry-after': '7' })
    const a = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { body: '{"items":[]}' })
    t.equal(a.status, 503)
    t.equal(a.headers['retry-after'], '7')
    t.equal(a.headers['x-request-id'], 'req_fault_503')
    t.equal(codeOf(a), null, 'the upstream\'s own body')
    t.equal(lines[1]!.requests.length, 0, 'line 1 never saw it')
    t.match(await lastRecord(gw, 1), { status: 503, outcome: 'upstream_error', upstreamLine: 0, attempts: 1 })
  })

  await t.test('a POST whose connection was refused (nothing sent) goes to the next line', async t => {
    const { lines, gw, conv } = await setup(t, 1, {}, {}, [`http://127.0.0.1:${await closedPort()}`])
    const a = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { body: '{"items":[{"type":"message","role":"user","content":"once"}]}' })
    t.equal(a.status, 200)
    t.equal(lines[0]!.requests.length, 1)
    t.equal(lines[0]!.requests[0]!.body.toString(), '{"items":[{"type":"message","role":"user","content":"once"}]}', 'the buffered body, re-sent whole')
  })

  await t.test('a POST whose TLS handshake is reset (nothing of it sent) goes to the next line', async t => {
    // A line (or a balancer in front of it) that resets its connections before TLS is set up: the request never had
    // a connection to be written on, however the failure is spelled (ECONNRESET, not a refusal).
    const resetting = createTcpServer(socket => { socket.on('error', () => {}); socket.resetAndDestroy() })
    await new Promise<void>(resolve => resetting.listen(0, '127.0.0.1', resolve))
    t.teardown(() => new Promise(resolve => resetting.close(resolve)))
    const { lines, gw } = await setup(t, 1, {}, {}, [`https://127.0.0.1:${(resetting.address() as AddressInfo).port}`])
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
    const created = await sdk.conversations.create({ metadata: { topic: 'once' } })
    t.match(created, { object: 'conversation', metadata: { topic: 'once' } }, 'created on the next line')
    t.equal(lines[0]!.requests.length, 1, 'sent once, to line 1')
    t.match(await lastRecord(gw, 1), { status: 200, upstreamLine: 1, attempts: 2 })
  })

  await t.test('a POST whose connection broke after it was sent is not sent again: 502', async t => {
    const { lines, gw, conv } = await setup(t, 2)
    lines[0]!.respond = faults.reset()
    const a = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { body: '{"items":[]}' })
    t.equal(a.status, 502)
    t.equal(codeOf(a), 'upstream_unavailable')
    t.equal(lines[0]!.requests.length, 1)
    t.equal(lines[1]!.requests.length, 0, 'line 1 never saw it')
  })

  await t.test('a POST answered 200 whose body then breaks off gets 502 with x-should-retry: false: the SDK does not send it again', async t => {
    // The upstream did the work (a generation, a conversation created) and said so; the gateway, which reads these
    // answers whole to take the owner key out, cannot pass it on. Without the header the SDK sends it twice more.
    const { lines, gw } = await setup(t, 1, { failureThreshold: 100 })
    lines[0]!.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': '1000' })
      res.write('{"id":"resp_')
      setTimeout(() => { res.socket?.resetAndDestroy() }, 20)
    }
    const a = await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })
    t.equal(a.status, 502)
    t.equal(codeOf(a), 'upstream_unavailable')
    t.equal(a.headers['x-should-retry'], 'false')
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 2 })
    const statusOf = async (p: Promise<unknown>) => await p.then(() => 200, (err: { status?: number }) => err.status)
    t.equal(await statusOf(sdk.responses.create({ model: 'gpt-4o-mini', input: 'once' })), 502)
    t.equal(await statusOf(sdk.conversations.create({})), 502)
    t.same(lines[0]!.requests.map(r => `${r.method} ${r.url}`), ['POST /v1/responses', 'POST /v1/responses', 'POST /v1/conversations'],
      'each POST reached the upstream once')
  })

  await t.test('a POST answered 200 of unknown length that breaks off before any of its body gets 502 with x-should-retry: false, not a 500 the SDK sends again', async t => {
    // Items added: an answer the gateway passes on as it streams (searched for the token as it goes), whose headers
    // go to the client with its first bytes. The upstream added the items and said so before breaking off.
    const { lines, gw, conv } = await setup(t, 1, { failureThreshold: 100 })
    lines[0]!.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' }) // no content-length: chunked
      res.flushHeaders()
      res.socket?.end() // the connection closes after the headers, before any of the body
    }
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 2 })
    const err = await sdk.conversations.items.create(conv, { items: [{ type: 'message', role: 'user', content: 'once' }] }).then(() => null, (e: unknown) => e)
    t.match(err, { status: 502, error: { code: 'upstream_unavailable' } })
    t.equal((err as { headers?: Headers }).headers?.get('x-should-retry'), 'false')
    t.equal(lines[0]!.requests.length, 1, 'the POST reached the upstream once')
    t.match(await lastRecord(gw, 1), { status: 502, outcome: 'upstream_error' })
  })

  await t.test('a DELETE whose connection broke is sent to the next line', async t => {
    const { lines, gw, conv } = await setup(t, 2)
    lines[0]!.respond = faults.reset()
    const a = await call(gw.url, 'DELETE', `/v1/conversations/${conv}`)
    t.equal(a.status, 200)
    t.equal(lines[1]!.requests.length, 1)
    t.match(await lastRecord(gw, 1), { upstreamLine: 1, attempts: 2 })
  })

  await t.test('a line that answers with bytes that are not HTTP: a GET goes to the next line, a POST (it was sent) is not sent again', async t => {
    const { lines, gw, conv } = await setup(t, 2)
    // (a plain-HTTP line pointed at the wrong port, a TLS port or another protocol's: the request went out, what came back is unreadable)
    lines[0]!.respond = (_req, res) => { res.socket?.end('SSH-2.0-OpenSSH_9.6\r\n') }
    const read = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(read.status, 200, 'the read is served by line 1')
    t.match(await lastRecord(gw, 1), { upstreamLine: 1, attempts: 2 })
    const write = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { body: '{"items":[]}' })
    t.equal(write.status, 502)
    t.equal(write.headers['x-should-retry'], 'false', 'the SDK does not send it again either')
    t.same(lines.map(l => l.requests.map(r => r.method)), [['GET', 'POST'], ['GET']], 'the POST reached line 0 only, once')
  })

  await t.test('a line whose answer has a header block no HTTP client may read (two lengths, a length and chunked, headers past 16 KiB) is one that answers no HTTP: a GET goes to the next line, a POST is not sent again', async t => {
    const body = '{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":false}'
    const heads: Record<string, string> = {
      'two different lengths': `content-length: ${body.length}\r\ncontent-length: 3\r\n`,
      'a length and chunked': `content-length: ${body.length}\r\ntransfer-encoding: chunked\r\n`,
      'headers past 16 KiB': `x-padding: ${'a'.repeat(20_000)}\r\ncontent-length: ${body.length}\r\n`
    }
    for (const [what, head] of Object.entries(heads)) {
      await t.test(what, async t => {
        const { lines, gw, conv } = await setup(t, 2)
        lines[0]!.respond = (_req, res) => { res.socket?.end(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n${head}\r\n${body}`) }
        const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
        const page = await sdk.conversations.items.list(conv)
        t.same(page.data, [], 'the read is served by line 1')
        t.match(await lastRecord(gw, 1), { outcome: 'ok', upstreamLine: 1, attempts: 2 })
        const err = await sdk.conversations.items.create(conv, { items: [] }).catch((e: unknown) => e)
        t.ok(err instanceof OpenAI.APIError && err.status === 502, 'the write gets its 502')
        t.equal((err as InstanceType<typeof OpenAI.APIError>).headers?.get('x-should-retry'), 'false', 'the SDK does not send it again either')
        t.same(lines.map(l => l.requests.map(r => r.method)), [['GET', 'POST'], ['GET']], 'the POST reached line 0 only, once')
      })
    }
  })

  await t.test('an upstream 429 is never retried', async t => {
    const { lines, gw, conv } = await setup(t, 2)
    lines[0]!.respond = faults.status(429, { 'retry-after': '3' })
    const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(a.status, 429)
    t.equal(a.headers['retry-after'], '3')
    t.equal(lines[1]!.requests.length, 0)
  })

  await t.test('at most `retries` extra attempts; then the last answer passes through unchanged', async t => {
    const { lines, gw, conv } = await setup(t, 3)
    for (const line of lines) line.respond = faults.status(503, { 'retry-after': '9' })
    const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(a.status, 503)
    t.equal(a.headers['retry-after'], '9')
    t.same(lines.map(l => l.requests.length), [1, 1, 0], 'retries: 1 (default) → two lines tried, the third untouched')
    t.match(await lastRecord(gw, 1), { status: 503, upstreamLine: 1, attempts: 2 })
  })

  await t.test('with one line, a 503 passes through after one attempt', async t => {
    const { lines, gw, conv } = await setup(t, 1)
    lines[0]!.respond = faults.status(503, { 'retry-after': '5' })
    const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(a.status, 503)
    t.equal(a.headers['retry-after'], '5')
    t.equal(lines[0]!.requests.length, 1)
  })
})

t.test('upstream timeouts', async t => {
  await t.test('timeoutMs counts from the call\'s start: the wait for a pooled connection is inside it', async t => {
    const { lines, gw, conv } = await setup(t, 1, { timeoutMs: 400, maxConnections: 1 })
    lines[0]!.respond = faults.hang()
    const answering = Promise.all([1, 2].map(() => call(gw.url, 'GET', `/v1/conversations/${conv}/items`)))
    // A while after the first call reached the upstream, before the deadline: the second call is waiting for the
    // one pooled connection. (Counted from the first call's arrival, not the start, which a loaded machine
    // delays. Once both deadlines pass, the first call's connection is let go in the same moment as the second
    // call: whether the second reaches the upstream before it is stopped is a race, not asserted. A connection
    // held past the waiting call's deadline, by a stream, is the next test.)
    await until('the first call at the upstream', () => lines[0]!.requests.length >= 1, 2000)
    await sleep(100)
    t.equal(lines[0]!.requests.length, 1, 'the second call is waiting for the one pooled connection')
    const answers = await answering
    t.same(answers.map(a => a.status), [504, 504])
    await until('two audit records', () => gw.audit().length === 2)
    for (const r of gw.audit()) t.ok(r.durationMs < 750, `answered within the one deadline, not two (${r.durationMs} ms)`)
  })

  await t.test('a call waiting for a pooled connection held by a long stream gets its 504 at its own deadline, is never sent, and counts no failure', async t => {
    const { lines, gw, conv } = await setup(t, 1, { timeoutMs: 300, maxConnections: 1, failureThreshold: 1 })
    const streams: ServerResponse[] = []
    lines[0]!.respond = (req, res) => {
      if (req.url === '/v1/responses') {
        res.writeHead(200, { 'content-type': 'text/event-stream' })
        res.write('event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1","object":"response","model":"m","output":[]}}\n\n')
        streams.push(res) // the generation goes on, holding the one pooled connection
        return
      }
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end(JSON.stringify({ object: 'list', data: [], first_id: null, last_id: null, has_more: false }))
    }
    const completed = 'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1","object":"response","model":"m","output":[]}}\n\n'
    t.teardown(() => { for (const s of streams) s.end(completed) })
    const stream = await fetch(`${gw.url}/v1/responses`, {
      method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: '{"model":"gpt-4o-mini","input":"hi","stream":true}'
    })
    t.equal(stream.status, 200, 'a stream holds the pool\'s one connection')
    // 3 s is a hang check against the 300 ms deadline (the stream ends only when the test ends it), not a speed test.
    const queued = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`, { key: KEYS.other, timeoutMs: 3000 }).catch((e: Error) => e)
    t.ok(!(queued instanceof Error) && queued.status === 504, `the queued read is answered 504 (got ${queued instanceof Error ? queued.message : queued.status})`)
    if (!(queued instanceof Error)) t.equal(codeOf(queued), 'upstream_timeout')
    t.ok(gw.logs.some(l => l.includes('no connection free within 300 ms')), 'the log says it waited for a connection')
    t.match((await healthOf(gw)).upstream, [{ state: 'up', failures: 0 }], 'waiting for a connection is no line failure (failureThreshold 1)')
    // A POST never sent is the SDK's to send again: no x-should-retry: false, which is for a call the upstream may have.
    const queuedPost = await call(gw.url, 'POST', `/v1/conversations/${conv}/items`, { key: KEYS.other, body: '{"items":[]}', timeoutMs: 3000 })
    t.equal(queuedPost.status, 504, 'a queued POST is answered 504 too')
    t.equal(queuedPost.headers['x-should-retry'], undefined, 'without x-should-retry: false: it was never sent')
    // Audited as never sent: `attempts` 0 ("0 when it never went upstream"), not an attempt on a line that never
    // saw the call, which an operator would read as the line failing to answer (the pool is the gateway's load).
    await until('both queued calls audited', () => gw.audit().filter(r => r.status === 504).length === 2)
    t.match(gw.audit().filter(r => r.status === 504), [{ action: 'item.list', attempts: 0, upstreamLine: null }, { action: 'item.create', attempts: 0, upstreamLine: null }])

    for (const s of streams) s.end(completed)
    await stream.text()
    const next = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(next.status, 200, 'once the stream is over, the line serves the next call')
    t.same(lines[0]!.requests.map(r => `${r.method} ${r.url}`), ['POST /v1/responses', `GET /v1/conversations/${conv}/items`],
      'the read given up on was never sent when the connection came free; the next one was')
  })

  await t.test('a call whose client hangs up while it waits for a pooled connection is audited attempts 0', async t => {
    // Its record is written when the client leaves, before the call settles: it said attempts 1 (counted when the
    // attempt began), an attempt on a line that never saw the call.
    const { lines, gw, conv } = await setup(t, 1, { timeoutMs: 5000, maxConnections: 1 })
    const held: ServerResponse[] = []
    lines[0]!.respond = (_req, res) => { held.push(res) } // holds the one pooled connection
    t.teardown(() => { for (const res of held) res.destroy() })
    const holder = call(gw.url, 'GET', `/v1/conversations/${conv}`, { timeoutMs: 6000 }).catch(() => null)
    await until('the first call at the upstream', () => lines[0]!.requests.length === 1, 2000)
    const leaving = new AbortController()
    const queued = fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.other}` }, signal: leaving.signal })
      .catch(() => null)
    await sleep(200) // well past the checks: it waits for the connection the first holds
    leaving.abort()
    await queued
    await until('the queued call audited', () => gw.audit().some(r => r.action === 'item.list'), 2000)
    t.match(gw.audit().find(r => r.action === 'item.list'), { status: 499, outcome: 'aborted', attempts: 0, upstreamLine: null })
    t.equal(lines[0]!.requests.length, 1, 'it never reached the line')
    for (const res of held) res.destroy()
    await holder
  })

  await t.test('a generation slower than timeoutMs but within generationTimeoutMs is waited for, streamed or not; a read as slow gets 504', async t => {
    const { lines, gw, conv } = await setup(t, 1, { timeoutMs: 300, bodyTimeoutMs: 300, generationTimeoutMs: 4000 })
    lines[0]!.respond = (req, res, body) => {
      if (req.method === 'POST' && req.url === '/v1/responses' && body.toString().includes('"stream":true')) {
        // a streamed generation: created at once, then quiet for longer than bodyTimeoutMs while the model reasons
        res.writeHead(200, { 'content-type': 'text/event-stream' })
        res.write('event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"m","output":[]}}\n\n')
        setTimeout(() => {
          res.end('event: response.completed\ndata: {"type":"response.completed","sequence_number":1,"response":{"id":"resp_1","object":"response","status":"completed","model":"m","output":[]}}\n\n')
        }, 2500) // (undici's body timer is coarse: well past bodyTimeoutMs)
        return
      }
      if (req.method === 'POST' && req.url === '/v1/responses') {
        setTimeout(() => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"id":"resp_1","object":"response","status":"completed","model":"m","output":[]}') }, 600)
        return
      }
      setTimeout(() => { if (!res.destroyed) res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[],"has_more":false}') }, 600)
    }
    const answered = await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })
    t.equal(answered.status, 200, 'the non-streamed answer, after twice timeoutMs')
    const streamed = await call(gw.url, 'POST', '/v1/responses', {
      body: '{"model":"gpt-4o-mini","input":"think","stream":true}'
    })
    t.equal(streamed.status, 200)
    t.match(streamed.body, /response\.completed/, 'the stream went on after a silence longer than bodyTimeoutMs')
    const read = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(read.status, 504, 'a read as slow: timeoutMs')
  })

  await t.test('a generation slower than generationTimeoutMs gets 504 but is no line failure: the only line stays up for every client', async t => {
    const { lines, gw, conv } = await setup(t, 1, { timeoutMs: 300, generationTimeoutMs: 300, failureThreshold: 2, cooldownMs: 30_000 })
    lines[0]!.respond = slowGenerations(600)
    // Three in a row, as an SDK's two retries of one slow create would send them: past failureThreshold.
    for (let i = 0; i < 3; i++) {
      const a = await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })
      t.equal(a.status, 504, `generation ${i + 1}: 504`)
      t.equal(codeOf(a), 'upstream_timeout')
    }
    const read = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`, { key: KEYS.other })
    t.equal(read.status, 200, 'another team\'s read is served, not refused by a line marked down')
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'up', failures: 0 }], 'the line has no failure booked')
    t.equal((await fetch(`${gw.url}/readyz`)).status, 200, '/readyz stays ready')
    t.notOk(gw.logs.some(l => l.includes('upstream line 0 skipped')), 'no line was skipped')
  })

  await t.test('a generation the upstream holds gets the gateway\'s 504 (not sent again) before the SDK\'s own timeout, which the SDK would retry', async t => {
    // The SDK's timer starts before the gateway's. With the two equal (both were 10 minutes by default), the SDK
    // gives up first, never sees x-should-retry: false, and sends the generation again twice: three generations
    // upstream, each waited on for the whole timeout (counted on a fake line with both at 3 s).
    const defaults = parseConfig({ upstream: { baseUrls: ['https://cn2us02.opapi.win'], apiKey: 'sk-1' }, clients: [] })
    t.ok(defaults.upstream.generationTimeoutMs <= OpenAI.DEFAULT_TIMEOUT - 10_000,
      `default generationTimeoutMs (${defaults.upstream.generationTimeoutMs}) ends at least 10 s before the SDK's default timeout (${OpenAI.DEFAULT_TIMEOUT})`)
    // And so, with the same lead scaled down: the gateway's 504 arrives first and the SDK sends nothing again.
    const { lines, gw } = await setup(t, 1, { generationTimeoutMs: 400 })
    lines[0]!.respond = faults.hang()
    const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 2, timeout: 1500 })
    const status = await sdk.responses.create({ model: 'gpt-4o-mini', input: 'once' }).then(() => 200, (err: { status?: number }) => err.status)
    t.equal(status, 504)
    t.equal(lines[0]!.requests.length, 1, 'the generation reached the upstream once')
  })

  await t.test('a quick call with no response headers within timeoutMs is a line failure: a line that takes connections and never answers is skipped', async t => {
    const { lines, gw, conv } = await setup(t, 1, { timeoutMs: 300, failureThreshold: 2, cooldownMs: 30_000 })
    lines[0]!.respond = faults.hang()
    for (let i = 0; i < 2; i++) t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 504, `read ${i + 1}: 504`)
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }], 'skipped after failureThreshold timeouts')
    const next = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(next.status, 502, 'then refused at once')
    t.equal(codeOf(next), 'upstream_unavailable')
    t.match(await lastRecord(gw, 3), { attempts: 0 }, 'without trying the line')
    t.equal(lines[0]!.requests.length, 2)
  })

  await t.test('a quick call whose answer goes silent after its headers is a line failure too: a line that answers so is skipped, the next serves', async t => {
    // Silent past bodyTimeoutMs (an answer passed on as it comes), or not whole within timeoutMs of its headers (one
    // read whole): the line took the call and gave no answer, as one that sends no headers.
    for (const [what, path, timeouts] of [
      ['passed on', '/items', { bodyTimeoutMs: 300, timeoutMs: 5000 }],
      ['read whole', '', { bodyTimeoutMs: 5000, timeoutMs: 300 }]
    ] as const) {
      const { lines, gw, conv } = await setup(t, 2, { ...timeouts, failureThreshold: 2, cooldownMs: 30_000 })
      lines[0]!.respond = faults.stallMidBody()
      for (let i = 0; i < 2; i++) {
        const res = await fetch(`${gw.url}/v1/conversations/${conv}${path}`, { headers: { authorization: `Bearer ${KEYS.full}` } })
        await res.text().catch(() => '')
      }
      await lastRecord(gw, 2)
      t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }, { line: 1, state: 'up' }], `${what}: line 0 is skipped after failureThreshold silent answers`)
      t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}${path}`)).status, 200, `${what}: the next call is served by line 1`)
      t.same(lines.map(l => l.requests.length), [2, 1], `${what}: line 0 was not asked again`)
    }
  })

  await t.test('a slow generation given the half-open trial does not decide it: the line is not put back down, the next call is the trial', async t => {
    const { lines, gw, conv } = await setup(t, 1, { timeoutMs: 300, generationTimeoutMs: 300, failureThreshold: 1, cooldownMs: 500 })
    lines[0]!.respond = faults.hang()
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 504)
    t.match((await healthOf(gw)).upstream, [{ state: 'down' }], 'a read that got no answer put the line down')
    await sleep(550)
    lines[0]!.respond = slowGenerations(600)
    t.equal((await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })).status, 504, 'the trial call: a generation past generationTimeoutMs')
    const read = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(read.status, 200, 'the next call is sent to the line, not refused for another cooldown')
    t.match((await healthOf(gw)).upstream, [{ state: 'up', failures: 0 }], 'and its answer restores the line')
  })

  // A generation that is a line's half-open trial would hold the trial until its answer, which takes as long as the
  // model does: with one line, every other call of every client would get 502 upstream_unavailable and /readyz 503
  // for that long, beyond the SDKs' retries. It gives its place up once it has a connection.
  await t.test('a generation on half-open trial does not lock every other call out for as long as the model takes', async t => {
    const { lines, gw, conv } = await setup(t, 1, { failureThreshold: 1, cooldownMs: 300, generationTimeoutMs: 5000 })
    lines[0]!.respond = faults.reset()
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 502)
    t.match((await healthOf(gw)).upstream, [{ state: 'down' }], 'the line is down')
    await sleep(350)
    lines[0]!.respond = slowGenerations(1500)
    const generation = call(gw.url, 'POST', '/v1/responses', { body: GENERATION })
    await until('the trial generation to reach the line', () => lines[0]!.requests.some(r => r.url === '/v1/responses'))
    const read = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(read.status, 200, 'a read while the generation is under way is served, not refused')
    t.equal((await fetch(`${gw.url}/readyz`)).status, 200, 'and the gateway stays ready')
    t.equal((await generation).status, 200)
  })

  await t.test('a generation that gave its trial place up and then fails puts the line back to sleep', async t => {
    const cooldownMs = 2000
    const { lines, gw, conv } = await setup(t, 1, { failureThreshold: 1, cooldownMs, generationTimeoutMs: 5000 })
    lines[0]!.respond = faults.reset()
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 502)
    await sleep(cooldownMs + 50)
    lines[0]!.respond = (req, res) => { setTimeout(() => res.socket?.destroy(), 300) } // the generation's line breaks off
    const generation = await call(gw.url, 'POST', '/v1/responses', { body: GENERATION })
    t.equal(generation.status, 502, 'the trial generation failed')
    const [line] = (await healthOf(gw)).upstream
    t.equal(line!.state, 'down', 'the line is skipped again')
    t.ok((line!.retryInMs ?? 0) > cooldownMs / 2, `for a new cooldown (${line!.retryInMs} ms left), not due for another trial at once`)
  })

  await t.test('a generation that gave its trial place up and is then left by its client does not free the trial of the call after it', async t => {
    // LineHealth.released freed the trial slot whoever held it: the generation's client hanging up freed the slot
    // of the read that had become the trial since, and the next call was let through to the line as a second trial
    // while that read was still under way (a skipped line gets one call at a time).
    const { lines, gw, conv } = await setup(t, 1, { failureThreshold: 1, cooldownMs: 300, timeoutMs: 4000, generationTimeoutMs: 8000 })
    lines[0]!.respond = faults.reset()
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 502)
    await sleep(350)
    lines[0]!.respond = faults.hang()
    const generation = openCall(gw.url, 'POST', '/v1/responses', { body: GENERATION })
    await until('the trial generation to reach the line', () => lines[0]!.requests.length === 2)
    const trial = call(gw.url, 'GET', `/v1/conversations/${conv}/items`) // the trial now: the generation gave its place up
    await until('the trial read to reach the line', () => lines[0]!.requests.length === 3)
    generation.destroy()
    await lastRecord(gw, 2) // the generation's call, audited as its client left
    const next = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(next.status, 502, 'a call while the trial read is under way is refused at once')
    t.equal(codeOf(next), 'upstream_unavailable')
    t.equal(lines[0]!.requests.length, 3, 'and not sent to the line')
    t.equal((await trial).status, 504, 'the trial read itself gets its answer (here: none in time)')
  })

  await t.test('connectTimeoutMs bounds the connection (TCP and TLS) to a line', async t => {
    const silentLine = await silentTlsLine(t)
    const { gw } = await setup(t, 0, { connectTimeoutMs: 200, timeoutMs: 5000 }, {}, [silentLine])
    const a = await call(gw.url, 'GET', '/v1/conversations/conv_x/items')
    t.equal(a.status, 502)
    t.equal(codeOf(a), 'upstream_unavailable')
    const record = await lastRecord(gw, 1)
    t.ok(record.durationMs < 2000, `a connect timeout, not the 5 s response deadline (${record.durationMs} ms)`)
    t.ok(gw.logs.some(l => l.includes('UND_ERR_CONNECT_TIMEOUT')), 'logged as a connect timeout')
  })

  await t.test('a line no connection can be opened to within timeoutMs (below connectTimeoutMs) is skipped, not waited on by every call', async t => {
    // A call whose deadline passed while its line's connection was being opened counted no failure (taken for a
    // pool busy with long streams): with timeoutMs below connectTimeoutMs the attempt never got to fail, so a line
    // that takes no connections was never skipped, and every call got 504 though the next line was up.
    const silentLine = await silentTlsLine(t)
    const { lines, gw, conv } = await setup(t, 1, { connectTimeoutMs: 2000, timeoutMs: 300, failureThreshold: 2, cooldownMs: 30_000 }, {}, [silentLine])
    for (let i = 0; i < 2; i++) {
      const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
      t.equal(a.status, 504, `read ${i + 1}: 504, its deadline passed while the connection was being opened`)
    }
    t.match((await healthOf(gw)).upstream, [{ line: 0, state: 'down' }, { line: 1, state: 'up' }], 'line 0 is skipped after failureThreshold')
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'the next read is served by line 1')
    t.equal(lines[0]!.requests.length, 1)
    t.ok(gw.logs.some(l => l.includes('no connection to it could be opened within 300 ms')), 'the log says what happened')
  })

  await t.test('a line no connection can be opened to, called only by clients with short waits, is skipped once its connection attempts fail', async t => {
    // Each call ended at the client's wait (a 504 that counts nothing against the line) while the line's connection
    // was being opened, and the connection attempt's own failure, which came after, was thrown away: a line that
    // takes no connections was never skipped while every call had a short wait, and each got 504.
    const silentLine = await silentTlsLine(t)
    const { lines, gw, conv } = await setup(t, 1, { connectTimeoutMs: 1500, timeoutMs: 5000, failureThreshold: 2, cooldownMs: 30_000 }, {}, [silentLine])
    const shortWait = { headers: { 'x-stainless-timeout': '1' } } // the Node SDK's `timeout: 1000` for one call
    for (let i = 0; i < 2; i++) {
      const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`, shortWait)
      t.equal(a.status, 504, `read ${i + 1}: 504 within the client's wait`)
    }
    await eventually(async () => (await healthOf(gw)).upstream[0]!.state === 'down', 'line 0 skipped once its connection attempts failed')
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`, shortWait)).status, 200, 'the next read is served by line 1')
    t.equal(lines[0]!.requests.length, 1)
  })

  await t.test('bodyTimeoutMs: a body that stalls is cut, and audited as an upstream error', async t => {
    const { lines, gw, conv } = await setup(t, 1, { bodyTimeoutMs: 300 })
    lines[0]!.respond = faults.stallMidBody()
    const res = await fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
    t.equal(res.status, 200, 'the headers had gone out')
    await t.rejects(res.text(), 'the body is cut, not ended cleanly')
    t.match(await lastRecord(gw, 1), { status: 200, outcome: 'upstream_error' })
  })

  await t.test('an answer read whole (a conversation object) that goes silent past bodyTimeoutMs gets 504 upstream_timeout, not 502', async t => {
    // The client sees nothing of such an answer until it is whole: its error is a timeout, as one past timeoutMs is.
    const { lines, gw, conv } = await setup(t, 1, { bodyTimeoutMs: 300, timeoutMs: 5000 })
    lines[0]!.respond = faults.stallMidBody()
    const a = await call(gw.url, 'GET', `/v1/conversations/${conv}`)
    t.equal(a.status, 504)
    t.equal(codeOf(a), 'upstream_timeout')
    t.match(await lastRecord(gw, 1), { status: 504, outcome: 'upstream_error' })
  })

  await t.test('an answer passed on as it streams that goes silent past bodyTimeoutMs before any of it went out gets 504 upstream_timeout', async t => {
    // Items listed, of unknown length: its headers go to the client with its first bytes, so the client has seen
    // nothing, as with an answer read whole.
    const { lines, gw, conv } = await setup(t, 1, { bodyTimeoutMs: 300, timeoutMs: 5000 })
    lines[0]!.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.flushHeaders()
    }
    const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(a.status, 504)
    t.equal(codeOf(a), 'upstream_timeout')
    t.match(await lastRecord(gw, 1), { status: 504, outcome: 'upstream_error' })
  })

  await t.test('a trickle inside bodyTimeoutMs streams on: the limit is between chunks, not on the whole', async t => {
    const { lines, gw, conv } = await setup(t, 1, { bodyTimeoutMs: 400 })
    lines[0]!.respond = faults.trickle(8, 100)
    const res = await fetch(`${gw.url}/v1/conversations/${conv}/items`, { headers: { authorization: `Bearer ${KEYS.full}` } })
    t.equal(await res.text(), '........', 'all of it, after 800 ms in all')
  })

  await t.test('a client that hangs up aborts its upstream request at once', async t => {
    const { lines, gw, conv } = await setup(t, 1)
    let upstreamClosed = false
    lines[0]!.respond = (req) => { req.socket.once('close', () => { upstreamClosed = true }) }
    const req = openCall(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    await until('the upstream to hold the call', () => lines[0]!.requests.length === 1)
    req.destroy()
    await until('the upstream to see its socket closed', () => upstreamClosed, 1000)
    t.ok(upstreamClosed, 'the upstream saw the gateway close the connection')
    t.match(await lastRecord(gw, 1), { status: 499, outcome: 'aborted' })
  })
})

/** `n` connections that each made one call (a /healthz) and are kept alive, idle, in the order they were made. */
async function keptAlive (t: Test, url: string, n: number): Promise<Array<Awaited<ReturnType<typeof rawSocket>>>> {
  const idle: Array<Awaited<ReturnType<typeof rawSocket>>> = []
  t.teardown(() => { for (const s of idle) s.destroy() })
  for (let i = 0; i < n; i++) {
    const s = await rawSocket(url)
    idle.push(s)
    s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
    await until(`the answer on kept-alive connection ${i + 1}`, () => s.text().includes('"status":"ok"'), 2000)
  }
  return idle
}

/** A raw connection for clients that misbehave. */
function rawSocket (url: string): Promise<Socket & { closedAt: () => number | null, text: () => string }> {
  const { port } = new URL(url)
  return new Promise((resolve, reject) => {
    const socket = createConnection({ host: '127.0.0.1', port: Number(port) })
    let closedAt: number | null = null
    let text = ''
    socket.on('data', (c: Buffer) => { text += c.toString('latin1') })
    socket.on('close', () => { closedAt = Date.now() })
    socket.on('error', () => {})
    socket.once('connect', () => { resolve(Object.assign(socket, { closedAt: () => closedAt, text: () => text })) })
    socket.once('error', reject)
  })
}

/**
 * Has a paused raw connection read `bytes` every `everyMs` (a client reading slowly but on); the returned function
 * stops that and reads on at full speed.
 */
function sipping (s: Socket, bytes: number, everyMs: number): () => void {
  let quota = 0
  s.on('data', (c: Buffer) => {
    quota -= c.length
    if (quota <= 0) s.pause()
  })
  const sip = setInterval(() => {
    quota = bytes
    s.resume()
  }, everyMs)
  return () => {
    clearInterval(sip)
    quota = Infinity
    s.resume()
  }
}

t.test('slow and hostile clients', async t => {
  const listen = { host: '127.0.0.1', port: 0, headersTimeoutMs: 300, requestTimeoutMs: 600, sendTimeoutMs: 300, maxConnections: 4 }

  await t.test('headers that never finish get 408 after listen.headersTimeoutMs, and the connection closes', async t => {
    const { gw } = await setup(t, 1, {}, { listen })
    const s = await rawSocket(gw.url)
    s.write(`GET /v1/conversations/conv_x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n`)
    await until('the gateway to close', () => s.closedAt() !== null, 3000)
    t.match(s.text(), /^HTTP\/1\.1 408 /, '408')
    t.match(s.text(), /"code":"request_timeout"/)
  })

  await t.test('a body announced and never sent gets 408 after listen.requestTimeoutMs', async t => {
    const { lines, gw, conv } = await setup(t, 1, {}, { listen })
    const s = await rawSocket(gw.url)
    s.write(`POST /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{`)
    await until('the gateway to close', () => s.closedAt() !== null, 3000)
    t.match(s.text(), /^HTTP\/1\.1 408 /)
    t.equal(lines[0]!.requests.length, 0)
  })

  await t.test('the 408 for a body never sent carries the id its audit record has, as x-request-id too', async t => {
    // The client's only handle on a failed call is the id in its answer: it must find the call's record.
    const { gw, conv } = await setup(t, 1, {}, { listen })
    const s = await rawSocket(gw.url)
    s.write(`POST /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{`)
    await until('the gateway to close', () => s.closedAt() !== null, 3000)
    t.match(s.text(), /^HTTP\/1\.1 408 /)
    const record = await lastRecord(gw, 1)
    t.match(record, { status: 408, outcome: 'invalid' })
    t.equal(/\r\nx-gateway-request-id: (\S+)\r\n/i.exec(s.text())?.[1], record.requestId, 'x-gateway-request-id is the record\'s')
    t.equal(/\r\nx-request-id: (\S+)\r\n/i.exec(s.text())?.[1], record.requestId, 'and so is x-request-id, which the SDKs read')
  })

  await t.test('after a 401, a body dribbled in is not read for long: the connection closes', async t => {
    const { gw, conv } = await setup(t, 1, {}, { listen })
    const s = await rawSocket(gw.url)
    const started = Date.now()
    s.write(`POST /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ogw_wrong\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n`)
    const drip = setInterval(() => { if (!s.destroyed) s.write('a') }, 50)
    t.teardown(() => { clearInterval(drip) })
    await until('the gateway to close', () => s.closedAt() !== null, 3000)
    clearInterval(drip)
    t.match(s.text(), /^HTTP\/1\.1 401 /, 'the 401 came first')
    t.ok(s.closedAt()! - started < 2000, `closed within the discard bound (${s.closedAt()! - started} ms)`)
  })

  await t.test('a call answered early gets that one answer: the rest of its body, malformed, adds none', async t => {
    const { gw, conv } = await setup(t, 1, {}, { listen })
    const s = await rawSocket(gw.url)
    s.write(`POST /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ogw_wrong\r\n` +
      'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n')
    await until('the 401', () => s.text().includes('invalid_api_key'), 3000)
    // The rest of the body, being thrown away, breaks its chunked framing: Node's parser refuses it.
    s.write('zz\r\nnot a chunk\r\n')
    await until('the gateway to close the connection', () => s.closedAt() !== null, 3000)
    t.match(s.text(), /^HTTP\/1\.1 401 /, 'the 401 came')
    t.equal(s.text().match(/HTTP\/1\.1 \d{3} /g)?.length, 1, 'and no other answer after it, to a call already answered')
    t.equal((await lastRecord(gw, 1)).status, 401, 'its record says what the client got')
    t.equal(gw.audit().length, 1, 'one record for the one call')

    // Once that body is whole, malformed bytes are a new request's, and get their own answer.
    const next = await rawSocket(gw.url)
    next.write(`POST /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ogw_wrong\r\n` +
      'Content-Type: application/json\r\nContent-Length: 4\r\n\r\n{}')
    await until('the 401', () => next.text().includes('invalid_api_key'), 3000)
    next.write('  GET /v1 HTTP/1.1 junk\r\n\r\n')
    await until('the gateway to close the connection', () => next.closedAt() !== null, 3000)
    t.match(next.text().match(/HTTP\/1\.1 \d{3} /g), ['HTTP/1.1 401 ', 'HTTP/1.1 400 '], 'the malformed request after it is answered 400')
  })

  await t.test('a call refused before its body, whose body breaks its framing in the same packet, is audited as refused, not as a hang-up', async t => {
    // `audit query --outcome denied` is how ops see keys being guessed: a bad chunk sent along must not hide a 401.
    const { lines, gw } = await setup(t, 1, {}, { listen })
    const head = (key: string, framing: string) => `POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\n` +
      `Content-Type: application/json\r\n${framing}\r\n\r\n`
    const cases: Array<[string, string, number, string]> = [
      ['a wrong key and a bad chunk', head('ogw_wrong', 'Transfer-Encoding: chunked') + 'zz\r\n{}\r\n0\r\n\r\n', 401, 'denied'],
      ['a missing scope and a bad chunk', head(KEYS.reader, 'Transfer-Encoding: chunked') + 'zz\r\n{}\r\n0\r\n\r\n', 403, 'denied'],
      ['a framing the gateway does not take (Transfer-Encoding: identity)', head(KEYS.full, 'Transfer-Encoding: identity') + '{}', 501, 'invalid']
    ]
    for (const [what, request, status, outcome] of cases) {
      const before = gw.audit().length
      const s = await rawSocket(gw.url)
      s.write(request)
      await until('the gateway to close', () => s.closedAt() !== null, 3000)
      t.match(s.text(), new RegExp(`^HTTP/1\\.1 ${status} [^]*"error":`), `${what}: the client reads its ${status}`)
      t.equal(s.text().match(/HTTP\/1\.1 \d{3} /g)?.length, 1, `${what}: and no other answer`)
      await until(`${what}: its record`, () => gw.audit().length > before)
      t.match(gw.audit()[before], { status, outcome }, `${what}: audited ${status} ${outcome}`)
    }
    t.equal(lines[0]!.requests.length, 0, 'nothing went upstream')
  })

  await t.test('a client that stops reading its answer is cut off after listen.sendTimeoutMs', async t => {
    const { lines, gw, conv } = await setup(t, 1, {}, { listen })
    let upstreamDone = false
    lines[0]!.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' })
      const chunk = Buffer.alloc(1024 * 1024, 0x61)
      let n = 0
      const more = () => {
        while (n < 64 && !res.destroyed) {
          n++
          if (!res.write(chunk)) { res.once('drain', more); return }
        }
        upstreamDone = true
        res.end()
      }
      res.on('close', () => { upstreamDone = true })
      more()
    }
    const s = await rawSocket(gw.url)
    s.pause() // reads nothing
    s.write(`GET /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n\r\n`)
    await until('the gateway to cut the client off', () => s.closedAt() !== null || s.destroyed || gw.audit().length > 0, 5000)
    const record = await lastRecord(gw, 1)
    t.equal(record.outcome, 'aborted', 'the call ends as cut off')
    t.ok(record.bytesOut < 64 * 1024 * 1024, `only part of the 64 MB went out (${record.bytesOut} bytes)`)
    await until('the upstream to be let go', () => upstreamDone, 3000)
    // Cut off by a reset: what was still in the gateway's send buffer is dropped, not held by the kernel and
    // delivered once the client reads again (a plain close would deliver every byte the gateway wrote).
    s.resume()
    await until('the connection to be gone', () => s.closedAt() !== null, 3000)
    t.ok(s.text().length < record.bytesOut, `the client could read only part of what was written (${s.text().length} of ${record.bytesOut} bytes)`)
  })

  await t.test('a client that stops reading an answer the gateway sends whole (a conversation it rewrote) is cut off after listen.sendTimeoutMs too', async t => {
    // Read whole to take the owner key out, then written in one piece: more than the kernel's buffers take, so most
    // of it waits in the gateway for a client that reads nothing.
    const { lines, gw, conv } = await setup(t, 1, {}, { listen })
    const big = JSON.stringify({ id: conv, object: 'conversation', created_at: 1, metadata: {}, padding: 'x'.repeat(12 * 1024 * 1024) })
    lines[0]!.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(big) }
    const s = await rawSocket(gw.url)
    s.pause() // reads nothing
    s.write(`GET /v1/conversations/${conv} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n\r\n`)
    await until('the gateway to cut the client off', () => gw.audit().length > 0, 5000)
    const record = await lastRecord(gw, 1)
    t.match(record, { status: 200, outcome: 'aborted' }, 'the call ends as cut off, and is audited while the client still holds its socket')
    t.ok(record.bytesOut < big.length, `bytesOut counts what went out, not the part dropped with the connection (${record.bytesOut} of ${big.length} bytes)`)
    s.resume()
    await until('the connection to be gone', () => s.closedAt() !== null, 3000)
    t.ok(s.text().length < big.length, `the client could read only part of the answer (${s.text().length} of ${big.length} bytes)`)
  })

  await t.test('a client that pipelines calls and reads none of their answers, each small, is cut off after listen.sendTimeoutMs once its buffers are full', async t => {
    // Each answer is sent whole and is below what a connection's stream buffers before a write asks to wait (16 KiB):
    // once the kernel's buffers are full, the answer holding the connection waits for a client that reads nothing,
    // with no write of it ever refused, and those behind it wait with it (their places in limits.maxInFlight, their
    // audit records). (Whole requests, as many as the gateway reads at once: none is left half read, for
    // listen.requestTimeoutMs to end.)
    const { lines, gw, conv } = await setup(t, 1, {}, { listen })
    const answer = JSON.stringify({ id: conv, object: 'conversation', created_at: 1, metadata: {}, padding: 'x'.repeat(14 * 1024) })
    lines[0]!.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(answer) }
    const s = await rawSocket(gw.url)
    s.pause() // reads nothing
    const calls = 500 // (7 MiB of answers, more than loopback's buffers take)
    s.write(`GET /v1/conversations/${conv} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n\r\n`.repeat(calls))
    await until('the gateway to cut the client off', () => gw.audit().length === calls, 10_000)
    const records = gw.audit() as Array<{ status: number, outcome: string }>
    t.ok(records.some(r => r.outcome === 'ok'), 'the answers the buffers took were served')
    t.ok(records.some(r => r.status === 200 && r.outcome === 'aborted'), 'the one the client left waiting is audited as cut off')
    s.resume()
    await until('the connection to be gone', () => s.closedAt() !== null, 3000)
  })

  await t.test('a client that reads such an answer slowly, a little at a time, gets it whole', async t => {
    // listen.sendTimeoutMs bounds a client taking none of its answer, not how long a large answer may take.
    // (1 s here: the client sips in this process, so a stall of its event loop stops the sips and the gateway's
    // watch alike, and on a loaded machine one of 300 ms looked like a client taking nothing)
    const { lines, gw, conv } = await setup(t, 1, {}, { listen: { ...listen, sendTimeoutMs: 1000 } })
    const big = JSON.stringify({ id: conv, object: 'conversation', created_at: 1, metadata: {}, padding: 'x'.repeat(12 * 1024 * 1024) })
    lines[0]!.respond = (_req, res) => { res.writeHead(200, { 'content-type': 'application/json' }).end(big) }
    const s = await rawSocket(gw.url)
    s.pause()
    // 256 KiB every 50 ms, about 5 MB/s, 2.5 s for the answer's 12 MiB: over three times what a client must take in each
    // sendTimeoutMs for the kernel to take more (README: about 1.4 MB); only a stall of this process's event loop
    // (the client's and the gateway's) of most of a second would look like a client taking nothing.
    const readOn = sipping(s, 256 * 1024, 50)
    t.teardown(readOn)
    s.write(`GET /v1/conversations/${conv} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n\r\n`)
    await until('the call to end', () => gw.audit().length > 0, 60_000)
    readOn()
    t.match(await lastRecord(gw, 1), { status: 200, outcome: 'ok' }, 'served, not cut off')
    await until('the whole answer read', () => s.text().length > big.length, 5000)
    t.equal(s.closedAt(), null, 'the connection stays open for the next call')
  })

  await t.test('a client that reads a streamed response slowly but on gets every event, however large one is', async t => {
    // An event goes out in one write: one of megabytes (a response.completed with a long output, an image's base64)
    // drains only once the kernel has taken all of it. listen.sendTimeoutMs bounds a client taking none of its
    // answer, not how long such a write may take a client that reads on.
    const { lines, gw } = await setup(t, 1, {}, { listen: { ...listen, sendTimeoutMs: 1000 } })
    const delta = 'x'.repeat(15 * 1024 * 1024)
    const completed = { type: 'response.completed', response: { id: 'resp_big', object: 'response', status: 'completed', output: [], usage: { input_tokens: 2, output_tokens: 3 } } }
    lines[0]!.respond = (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.end(`event: response.output_text.delta\ndata: ${JSON.stringify({ type: 'response.output_text.delta', delta })}\n\n` +
        `event: response.completed\ndata: ${JSON.stringify(completed)}\n\n`)
    }
    const s = await rawSocket(gw.url)
    s.pause()
    // 256 KiB every 50 ms, about 5 MB/s: over three times what a client must take in each sendTimeoutMs (1 s) for
    // the kernel to take more of what the gateway holds (README: about 1.4 MB), a third of the event's 15 MiB.
    const readOn = sipping(s, 256 * 1024, 50)
    t.teardown(readOn)
    const body = JSON.stringify({ model: 'gpt-4o-mini', input: 'a long answer', stream: true })
    s.write(`POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
    await until('the call to end', () => gw.audit().length > 0, 60_000)
    readOn()
    t.match(await lastRecord(gw, 1), { status: 200, outcome: 'ok', inputTokens: 2, outputTokens: 3 }, 'served, not cut off')
    await until('the whole stream read', () => s.text().includes('"type":"response.completed"'), 5000)
    t.ok(s.text().includes(delta), 'the large event came whole')
    t.equal(s.closedAt(), null, 'the connection stays open for the next call')
  })

  await t.test('connections past listen.maxConnections are refused', async t => {
    const { gw } = await setup(t, 1, {}, { listen })
    const held = await Promise.all([1, 2, 3, 4].map(async () => await rawSocket(gw.url)))
    t.teardown(() => { for (const s of held) s.destroy() })
    const extra = await rawSocket(gw.url)
    await until('the extra connection to be closed', () => extra.closedAt() !== null, 2000)
    t.ok(held.every(s => s.closedAt() === null), 'the first four stay open')
  })

  await t.test('connections kept alive after a call cannot lock others out: past listen.maxConnections the least recently used idle one is closed', async t => {
    const { gw, conv } = await setup(t, 1, {}, { listen })
    const idle = await keptAlive(t, gw.url, 4)
    idle[0]!.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n') // the first is used again: the second is now the least recent
    await until('the second answer on connection 1', () => idle[0]!.text().split('"status":"ok"').length === 3, 2000)
    const a = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(a.status, 200, 'a fifth client is served')
    await until('an idle connection to be closed for it', () => idle.some(s => s.closedAt() !== null), 2000)
    t.same(idle.map(s => s.closedAt() !== null), [false, true, false, false], 'the least recently used one, and only it')
  })

  await t.test('a connection part-way through its request headers is never closed for another past listen.maxConnections', async t => {
    // Headers timeouts long enough that the half-sent request cannot time out while the test runs.
    const { gw, conv } = await setup(t, 1, {}, { listen: { ...listen, headersTimeoutMs: 10_000, requestTimeoutMs: 20_000 } })
    const sending = await rawSocket(gw.url)
    sending.write(`GET /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\n`)
    t.teardown(() => { sending.destroy() })
    const idle = await keptAlive(t, gw.url, 3)
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'a fifth client is served')
    await until('an idle connection to be closed for it', () => idle.some(s => s.closedAt() !== null), 2000)
    t.same(idle.map(s => s.closedAt() !== null), [true, false, false], 'the least recently used idle one')
    t.equal(sending.closedAt(), null, 'not the one still sending its request, though older')
    sending.write(`Authorization: Bearer ${KEYS.full}\r\n\r\n`)
    await until('its answer', () => sending.text().startsWith('HTTP/1.1 200 '), 2000)
  })

  await t.test('a pipelining client part-way through its next request\'s headers when its call is answered is never closed for another past listen.maxConnections', async t => {
    const { lines, gw, conv } = await setup(t, 1, {}, { listen: { ...listen, headersTimeoutMs: 10_000, requestTimeoutMs: 20_000 } })
    let answer: (() => void) | null = null
    lines[0]!.respond = (_req, res) => {
      answer = () => {
        res.writeHead(200, { 'content-type': 'application/json' })
        res.end(JSON.stringify({ object: 'list', data: [], first_id: null, last_id: null, has_more: false }))
      }
    }
    let gatewaySide: Socket | null = null
    gw.app.server.once('connection', (socket: Socket) => { gatewaySide = socket })
    const pipelining = await rawSocket(gw.url)
    t.teardown(() => { pipelining.destroy() })
    const first = `GET /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEYS.full}\r\n\r\n`
    pipelining.write(first)
    await until('the call at the upstream', () => answer !== null, 2000)
    // While its first call is under way, the client sends the start of its next one (HTTP/1.1 pipelining).
    pipelining.write(`GET /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\n`)
    await until('the gateway to have read it', () => gatewaySide!.bytesRead > first.length, 2000)
    lines[0]!.respond = null
    answer!()
    await until('the first answer', () => pipelining.text().startsWith('HTTP/1.1 200 '), 2000)
    const idle = await keptAlive(t, gw.url, 3)
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'a fifth client is served')
    await until('a connection to be closed for it', () => [pipelining, ...idle].some(s => s.closedAt() !== null), 2000)
    t.same([pipelining, ...idle].map(s => s.closedAt() !== null), [false, true, false, false],
      'the least recently used idle one, not the one still sending its next request, though older')
    pipelining.write(`Authorization: Bearer ${KEYS.full}\r\n\r\n`)
    await until('its second answer', () => pipelining.text().split('HTTP/1.1 200 ').length === 3, 2000)
  })

  await t.test('a connection refused early whose body came after its answer is idle, and closed for another, once that body is in', async t => {
    const { gw, conv } = await setup(t, 1, {}, { listen: { ...listen, headersTimeoutMs: 10_000, requestTimeoutMs: 20_000 } })
    const refused = await rawSocket(gw.url)
    refused.write(`POST /v1/conversations/${conv}/items HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ogw_wrong\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n`)
    await until('the 401', () => refused.text().startsWith('HTTP/1.1 401 '), 2000)
    refused.write('{}')
    t.teardown(() => { refused.destroy() })
    const idle = await keptAlive(t, gw.url, 3)
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'a fifth client is served')
    await until('an idle connection to be closed for it', () => [refused, ...idle].some(s => s.closedAt() !== null), 2000)
    t.same([refused, ...idle].map(s => s.closedAt() !== null), [true, false, false, false], 'the refused one, least recently used')
  })
})

t.test('bounded load and abuse', async t => {
  await t.test('limits.maxInFlight: past it, 503 overloaded with retry-after at once, audited unavailable', async t => {
    const { lines, gw, conv } = await setup(t, 1, {}, { limits: { maxInFlight: 2 } })
    lines[0]!.respond = faults.hang()
    const held = [openCall(gw.url, 'GET', `/v1/conversations/${conv}/items`), openCall(gw.url, 'GET', `/v1/conversations/${conv}/items`, { key: KEYS.other })]
    await until('two calls at the upstream', () => lines[0]!.requests.length === 2)
    const third = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`, { key: KEYS.writer })
    t.equal(third.status, 503)
    t.equal(codeOf(third), 'overloaded')
    t.equal(third.headers['retry-after'], '1')
    t.match(await lastRecord(gw, 1), { status: 503, outcome: 'unavailable', clientId: 'team-writer' })
    t.equal(lines[0]!.requests.length, 2, 'it never reached the upstream')
    for (const r of held) r.destroy()
    await until('the held calls to end', () => gw.audit().length === 3)
    lines[0]!.respond = null
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'places free again once calls end')
  })

  await t.test('with the Redis store (an asynchronous rate limit), clients that hang up at once leave no place taken, and are not called upstream', async t => {
    const redis = await startRedis(t)
    const { lines, gw, conv } = await setup(t, 1, {}, {
      limits: { maxInFlight: 4 },
      store: { url: redis.url, timeoutMs: 2000, onFailure: 'closed' },
      clients: [{ id: 'team-full', keySha256: keyDigest(KEYS.full), scopes: ['read'], rateLimit: { requestsPerMinute: 100000, burst: 100000, maxConcurrent: 2 } }]
    })
    const { port } = new URL(gw.url)
    const request = `GET /v1/conversations/${conv}/items HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${KEYS.full}\r\n\r\n`
    const sockets = Array.from({ length: 20 }, () => {
      const socket = createConnection(Number(port), '127.0.0.1')
      socket.on('error', () => {})
      socket.write(request, () => { socket.destroy() })
      return socket
    })
    await until('20 audit records', () => gw.audit().length === 20, 5000)
    await sleep(200)
    t.ok(sockets.every(s => s.destroyed))
    const records = gw.audit()
    t.ok(records.every(r => r.outcome === 'aborted' && r.status === 499), 'each one audited as aborted, once')
    // An attempt cut short by its client may or may not have reached the upstream; a call that reached it was
    // always audited with its attempt.
    t.ok(lines[0]!.requests.length <= records.filter(r => r.attempts > 0).length, 'the upstream saw no call audited without an attempt')
    const after = await Promise.all([1, 2].map(async () => await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)))
    t.same(after.map(a => a.status), [200, 200], 'afterwards the client\'s two places (and the gateway\'s four) are free')
  })

  await t.test('rateLimit.maxConcurrent caps one client and not the others', async t => {
    const { lines, gw, conv } = await setup(t, 1, {}, {
      clients: [
        { id: 'team-full', keySha256: (await import('../src/keys.js')).keyDigest(KEYS.full), scopes: ['read'], rateLimit: { maxConcurrent: 1 } },
        { id: 'team-other', keySha256: (await import('../src/keys.js')).keyDigest(KEYS.other), scopes: ['read'] }
      ]
    })
    lines[0]!.respond = faults.hang()
    const held = openCall(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.teardown(() => { held.destroy() })
    await until('one call at the upstream', () => lines[0]!.requests.length === 1)
    const second = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)
    t.equal(second.status, 503)
    t.match(JSON.parse(second.body), { error: { code: 'overloaded', message: /for this client/ } })
    const other = openCall(gw.url, 'GET', `/v1/conversations/${conv}/items`, { key: KEYS.other })
    t.teardown(() => { other.destroy() })
    await until('the other client\'s call at the upstream', () => lines[0]!.requests.length === 2)
    t.pass('another client is not held back by it')
  })

  await t.test('failed keys are counted per address: past the limit, 429 for failing attempts only', async t => {
    const { gw, conv } = await setup(t, 1, {}, { limits: { authFailuresPerMinute: 3 } })
    const statuses = []
    for (let i = 0; i < 5; i++) statuses.push((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`, { key: `ogw_guess_${i}` })).status)
    t.same(statuses, [401, 401, 401, 429, 429])
    const limited = await call(gw.url, 'GET', `/v1/conversations/${conv}/items`, { key: 'ogw_guess_9' })
    t.match(JSON.parse(limited.body), { error: { code: 'too_many_auth_failures', type: 'requests' } })
    t.ok(Number(limited.headers['retry-after']) >= 1)
    t.equal(limited.headers['x-should-retry'], 'false', 'the SDKs are told not to send the wrong key again')
    t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'a valid key from the same address still works')
    t.match(gw.audit().filter(r => r.status === 429), [{ outcome: 'denied', clientId: null }])
  })

  await t.test('trustProxy decides whether X-Forwarded-For counts, for the audit ip and the failed-key count', async t => {
    const xff = (ip: string) => ({ 'x-forwarded-for': ip })
    const trusting = await setup(t, 1, {}, { trustProxy: ['127.0.0.1'], limits: { authFailuresPerMinute: 2 } })
    for (let i = 0; i < 3; i++) await call(trusting.gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: xff('203.0.113.9') })
    const other = await call(trusting.gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: xff('198.51.100.7') })
    t.equal(other.status, 401, 'another address behind the trusted proxy is counted apart')
    const records = trusting.gw.audit()
    t.same(records.map(r => [r.ip, r.status]), [['203.0.113.9', 401], ['203.0.113.9', 401], ['203.0.113.9', 429], ['198.51.100.7', 401]])

    const strict = await setup(t, 1, {}, { limits: { authFailuresPerMinute: 2 } })
    const statuses = []
    for (const ip of ['203.0.113.1', '203.0.113.2', '203.0.113.3']) {
      statuses.push((await call(strict.gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: xff(ip) })).status)
    }
    t.same(statuses, [401, 401, 429], 'by default the peer counts: a forged X-Forwarded-For does not reset the count')
    t.ok(strict.gw.audit().every(r => r.ip === '127.0.0.1'), 'and the audit has the real peer')
  })

  await t.test('behind a trusted proxy that passes the client\'s X-Forwarded-For on, an entry that is no address is the proxy\'s: not recorded, not a fresh count each', async t => {
    const { gw } = await setup(t, 1, {}, { trustProxy: ['127.0.0.1'], limits: { authFailuresPerMinute: 2 } })
    const forged = ['garbage', 'a'.repeat(300), 'x1', 'x2', 'x3', 'fe80::1%' + 'z'.repeat(100)]
    const statuses = []
    for (const value of forged) {
      statuses.push((await call(gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: { 'x-forwarded-for': value } })).status)
    }
    t.same(statuses, [401, 401, 429, 429, 429, 429], 'counted together, as the proxy\'s')
    t.ok(gw.audit().every(r => r.ip === '127.0.0.1'), 'recorded as coming through the proxy')
    t.notOk(gw.logs.some(l => l.includes('garbage') || l.includes('aaaaaaaa')), 'nor logged as the client\'s address')
    const real = await call(gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: { 'x-forwarded-for': '2001:db8::7' } })
    t.equal(real.status, 401, 'an address is believed as before')
    t.equal(gw.audit().at(-1)!.ip, '2001:db8::7')
  })

  await t.test('one address is one address however it is spelled (IPv4-mapped IPv6, case, zeros, a zone): counted once, recorded as one', async t => {
    const { gw } = await setup(t, 1, {}, { trustProxy: ['127.0.0.1'], limits: { authFailuresPerMinute: 2 } })
    const statuses = []
    for (const value of ['203.0.113.9', '::ffff:203.0.113.9', '::FFFF:cb00:7109', '2001:DB8:0:0::5', '2001:db8::5', 'fe80::1%a', 'fe80::1%b']) {
      statuses.push((await call(gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: { 'x-forwarded-for': value } })).status)
    }
    t.same(statuses, [401, 401, 429, 401, 401, 401, 401], 'a new spelling of an address is no fresh count')
    t.same(gw.audit().map(r => r.ip), ['203.0.113.9', '203.0.113.9', '203.0.113.9', '2001:db8::5', '2001:db8::5', 'fe80::1', 'fe80::1'],
      'the audit writes each address one way, so that audit query --ip finds all its calls')
  })

  await t.test('behind a trusted proxy that writes the client\'s port into X-Forwarded-For (Azure Application Gateway: `ip:port`, `[ipv6]:port`), each client is counted and recorded apart, by its address', async t => {
    const { gw } = await setup(t, 1, {}, { trustProxy: ['127.0.0.1'], limits: { authFailuresPerMinute: 2 } })
    const statuses = []
    for (const value of ['203.0.113.9:5678', '203.0.113.9:5679', '203.0.113.9:5680', '198.51.100.7:443', '[2001:db8::5]:443']) {
      statuses.push((await call(gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: { 'x-forwarded-for': value } })).status)
    }
    t.same(statuses, [401, 401, 429, 401, 401], 'one client\'s failures do not throttle another behind the same proxy')
    t.same(gw.audit().map(r => r.ip), ['203.0.113.9', '203.0.113.9', '203.0.113.9', '198.51.100.7', '2001:db8::5'], 'the audit has each client\'s address, without the port')
  })

  await t.test('behind two trusted proxies that write ports into X-Forwarded-For, the client is the one before them, not the inner proxy', async t => {
    // proxy-addr stopped at the inner proxy's `10.0.0.5:443`, no address to it, and took it for the client: every
    // client behind it shared one failed-key count, and the audit recorded the proxy as each call's ip.
    const { gw } = await setup(t, 1, {}, { trustProxy: ['127.0.0.1', '10.0.0.0/8'], limits: { authFailuresPerMinute: 2 } })
    const statuses = []
    for (const value of ['203.0.113.9:5678, 10.0.0.5:443', '203.0.113.9:5679, 10.0.0.6:443', '203.0.113.9:5680, 10.0.0.5:443',
      '198.51.100.7:443, 10.0.0.5:443', '[2001:db8::5]:443, 10.0.0.5:80', '203.0.113.70, 192.0.2.1:80']) {
      statuses.push((await call(gw.url, 'GET', '/v1/conversations/conv_x/items', { key: 'ogw_bad', headers: { 'x-forwarded-for': value } })).status)
    }
    t.same(statuses, [401, 401, 429, 401, 401, 401], 'each client behind the proxies is counted apart')
    t.same(gw.audit().map(r => r.ip), ['203.0.113.9', '203.0.113.9', '203.0.113.9', '198.51.100.7', '2001:db8::5', '192.0.2.1'],
      'recorded by its address; a hop not trusted, port or not, is still where the chain is believed to')
  })
})

t.test('a gateway out of file descriptors does not take its line for a failing one: once descriptors are free again, calls are served', async t => {
  // A connect (or a lookup) that fails with EMFILE is this process's shortage, not the line's. Counted against the
  // line, a flood of client connections skipped it for cooldownMs: every call then got 502 "every line is down", and
  // /readyz 503, long after the flood had gone, with OhMyGPT healthy all along.
  const [line] = await startLines(1)
  t.teardown(() => line!.close())
  // Each answer closes its connection: every call needs a new connection to the line, so a file descriptor.
  line!.respond = (_req, res, body) => {
    const { metadata } = JSON.parse(body.toString()) as { metadata?: unknown }
    res.writeHead(200, { 'content-type': 'application/json', connection: 'close' })
    res.end(JSON.stringify({ id: `conv_${Math.random().toString(36).slice(2)}`, object: 'conversation', created_at: 1, metadata }))
  }
  const { file } = configFile(`
listen: { host: 127.0.0.1, port: 0 }
log: { level: info }
upstream: { baseUrls: ["${line!.url}"], apiKey: ${UPSTREAM_TOKEN}, failureThreshold: 1, cooldownMs: 60000 }
audit: { file: audit.jsonl }
clients:
  - { id: team-a, keySha256: "${keyDigest(KEYS.full)}", scopes: [read, write, delete], rateLimit: { requestsPerMinute: 100000, burst: 100000 } }
`)
  // (a limit of the shell's, hard and soft: Node raises only the soft one to the hard one)
  const child = spawn('sh', ['-c', `ulimit -n 128 && exec "${process.execPath}" "${resolve(BIN)}" start --config "${file}"`], { cwd: dirname(file), env })
  t.teardown(() => { child.kill('SIGKILL') })
  let log = ''
  child.stdout.on('data', (c: Buffer) => { log += c.toString() })
  child.stderr.on('data', (c: Buffer) => { log += c.toString() })
  const port = Number((await eventually(async () => /Server listening at http:\/\/127\.0\.0\.1:(\d+)/.exec(log), `listening: ${log}`))[1])
  // One connection of the client's, open before the flood: the calls go on it.
  const agent = new Agent({ keepAlive: true, maxSockets: 1 })
  t.teardown(() => { agent.destroy() })
  const create = async () => await new Promise<{ status: number, body: string }>((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path: '/v1/conversations', method: 'POST', agent, headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' } }, res => {
      let body = ''
      res.on('data', (c: Buffer) => { body += c.toString() })
      res.on('end', () => { resolve({ status: res.statusCode!, body }) })
    })
    req.on('error', reject)
    req.end('{}')
  })
  t.equal((await create()).status, 200, 'served')
  // Connections that send nothing, until the gateway has no descriptor left to accept one with (it closes it at once).
  const flood: Socket[] = []
  t.teardown(() => { for (const socket of flood) socket.destroy() })
  for (let full = false; !full && flood.length < 300;) {
    const batch = Array.from({ length: 10 }, () => createConnection(port, '127.0.0.1').on('error', () => {}))
    flood.push(...batch)
    full = await new Promise<boolean>(resolve => {
      for (const socket of batch) socket.once('close', () => { resolve(true) })
      setTimeout(() => { resolve(false) }, 50)
    })
  }
  const short = await create()
  t.not(short.status, 200, `with no descriptor left, the call could not reach the line (${short.status})`)
  for (const socket of flood) socket.destroy()
  await sleep(300)
  const after = await create()
  t.equal(after.status, 200, `served as soon as descriptors are free again (${after.body.slice(0, 120)})`)
  t.notMatch(log, /upstream line 0 skipped/, 'the line was never skipped')
  t.match(JSON.parse((await new Promise<string>(resolve => {
    request({ host: '127.0.0.1', port, path: '/readyz', agent }, res => { let b = ''; res.on('data', (c: Buffer) => { b += c.toString() }); res.on('end', () => { resolve(b) }) }).end()
  }))), { status: 'ready' }, '/readyz: ready')
})

t.test('a connection the listener could not accept (ENOBUFS, a network error accept(2) hands over) is logged, and the gateway serves on', async t => {
  const { gw, conv } = await setup(t, 1)
  // What Node's net.js does when libuv reports an accept failed for a reason other than a lack of descriptors
  // (onconnection: `self.emit('error', new ErrnoException(err, 'accept'))`). Unlistened, it would end the process.
  const failure = (code: string) => Object.assign(new Error(`accept ${code}`), { code, syscall: 'accept' })
  gw.app.server.emit('error', failure('ENOBUFS'))
  gw.app.server.emit('error', failure('EPROTO'))
  t.equal((await call(gw.url, 'GET', `/v1/conversations/${conv}/items`)).status, 200, 'served on')
  const lines = gw.logs.map(l => JSON.parse(l) as { level: number, msg: string, err?: Record<string, unknown> })
    .filter(l => l.msg.includes('could not accept a connection'))
  t.equal(lines.length, 1, 'one line at once; the next within the interval is held back and counted on the line after')
  t.match(lines[0], { level: 50, msg: 'the listener could not accept a connection; serving on', err: { code: 'ENOBUFS', message: 'accept ENOBUFS' } })
  t.notOk('stack' in (lines[0]!.err ?? {}), 'no stack')
})

t.test('a line restored on its trial\'s headers is judged on the calls given it since, not on one it took before it was skipped', async t => {
  // The README: a call the line took before it was skipped (a long stream, a slow answer that ends after) decides
  // nothing. Restored on its trial's headers but not yet proven, the line was put back to sleep by such a stream
  // broken off then (every call 502 for cooldownMs on a single line), and proven by one that ended well.
  let now = 0
  const health = new LineHealth(['http://a', 'http://b'], { failureThreshold: 3, cooldownMs: 1000, now: () => now })
  const state = () => health.statuses()[0]!.state
  const streams = [health.ticket(0), health.ticket(0)] // two long streams on line 0 while it is up
  for (let i = 0; i < 3; i++) health.failed(0, health.ticket(0))
  t.equal(state(), 'down', 'skipped after failureThreshold failures')
  now = 2000
  t.equal(health.pick(new Set([1])), 0, 'its trial')
  health.answered(0, health.ticket(0))
  t.equal(state(), 'up', 'restored on the trial\'s headers')
  health.failed(0, streams[0]!)
  t.equal(state(), 'up', 'a stream from before it was skipped, broken off now, says nothing of it')
  health.succeeded(0, streams[1]!)
  const since = health.ticket(0)
  health.failed(0, since)
  t.equal(state(), 'down', 'a stream from before ending well proved nothing: a call since, broken off, is the trial failing')
})

t.test('a connect failing for want of local ports (EADDRNOTAVAIL) is not booked against the line, and another line is tried', async t => {
  // This host out of ephemeral ports to a line (a burst of short connections in TIME_WAIT) is its own shortage, as
  // EMFILE is: counted, it skipped a healthy line for cooldownMs once the ports were free again. The kernel's own
  // EADDRNOTAVAIL, made here by connecting from an address that is not this machine's.
  const { lines, gw } = await setup(t, 2, { failureThreshold: 1, cooldownMs: 60_000 })
  const short = new Set([Number(new URL(lines[0]!.url).port)])
  const connect = net.connect
  net.connect = function (this: unknown, ...args: unknown[]) {
    const [options] = args as [{ port?: unknown }]
    if (typeof options === 'object' && options !== null && short.has(Number(options.port))) args[0] = { ...options, localAddress: '10.255.255.1' }
    return Reflect.apply(connect, this, args) as Socket
  } as typeof net.connect
  t.teardown(() => { net.connect = connect })
  const during = await call(gw.url, 'POST', '/v1/conversations', { body: '{}' })
  t.equal(during.status, 200, 'served by the other line while line 0 has no port free')
  t.equal(lines[1]!.requests.length, 1)
  short.clear()
  const after = await call(gw.url, 'POST', '/v1/conversations', { body: '{}' })
  t.equal(after.status, 200)
  t.equal(lines[0]!.requests.length, 1, 'line 0 serves again once ports are free: it was never skipped')
  t.notMatch(gw.logs.join('\n'), /upstream line 0 skipped/)
})
