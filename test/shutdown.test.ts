// Stopping the gateway as an orchestrator does: a real process, real signals, small configured times.
// /readyz turns 503 at the signal, calls are still served for shutdown.drainDelayMs, then in-flight calls get
// shutdown.graceMs, a hard bound; every call is audited; signals the gateway has no use for do not end it.
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { Agent, request, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http'
import { readFileSync, renameSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs'
import { connect } from 'node:net'
import { join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import OpenAI from 'openai'
import t, { type Test } from 'tap'
import { keyDigest } from '../src/keys.js'
import { ignoredSignalLogger } from '../src/server.js'
import { configFile, startBin } from './fixtures/bin.js'
import { KEYS, startGateway, testConfig } from './fixtures/gateway.js'
import { buildRequest } from './fixtures/raw-http.js'
import { eventually } from './fixtures/eventually.js'
import { startRedis } from './fixtures/redis-server.js'
import { startUpstream, UPSTREAM_TOKEN, type FakeUpstream } from './fixtures/upstream.js'

const KEY = 'ogw_shutdown-test-key'
const AUTH = `Authorization: Bearer ${KEY}\r\n`

function gatewayYaml (dir: string, upstream: string, shutdown: string, upstreamExtra = ''): string {
  return `
listen: { host: 127.0.0.1, port: 0 }
log: { level: info }
upstream: { baseUrls: ["${upstream}"], apiKey: ${UPSTREAM_TOKEN}${upstreamExtra} }
audit: { file: "${join(dir, 'audit.jsonl')}" }
shutdown: ${shutdown}
clients:
  - { id: team-a, keySha256: "${keyDigest(KEY)}", scopes: [read, write, delete], rateLimit: { requestsPerMinute: 100000, burst: 100000 } }
`
}

interface Answer { status: number, headers: IncomingHttpHeaders, body: string }

/** One call, on `agent`'s connections (keep-alive) or on a connection of its own. */
function get (url: string, path: string, agent: Agent | false = false): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request(url + path, { agent, headers: { authorization: `Bearer ${KEY}` } }, res => {
      let body = ''
      res.on('data', (c: Buffer) => { body += c.toString() })
      res.on('end', () => { resolve({ status: res.statusCode!, headers: res.headers, body }) })
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end()
  })
}

/**
 * An upstream on which team-a owns conv_1 (the gateway's ownership lookups are answered at once) and whose item
 * lists are held until the test releases them.
 */
async function holdingUpstream (t: Test): Promise<FakeUpstream & { held: Array<{ req: IncomingMessage, release: () => void }> }> {
  const upstream = Object.assign(await startUpstream(), { held: [] as Array<{ req: IncomingMessage, release: () => void }> })
  t.teardown(() => upstream.close())
  upstream.respond = (req: IncomingMessage, res: ServerResponse) => {
    if (req.url === '/v1/conversations/conv_1') {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end('{"id":"conv_1","object":"conversation","metadata":{"gateway_owner":"team-a"}}')
      return
    }
    upstream.held.push({ req, release: () => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[]}') } })
  }
  return upstream
}

function auditRecords (dir: string): Array<Record<string, unknown>> {
  return readFileSync(join(dir, 'audit.jsonl'), 'utf8').trim().split('\n').map(l => JSON.parse(l) as Record<string, unknown>)
    .filter(r => r.event === undefined)
}

t.test('SIGTERM: 50 slow calls in flight all complete with 200, each kept-alive connection closes, all 50 records are on disk, exit 0', async t => {
  const upstream = await holdingUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 20000 }'))
  const { child, url, output } = await startBin(t, file, {})
  const agent = new Agent({ keepAlive: true, maxSockets: 50 })
  t.teardown(() => agent.destroy())
  const calls = Array.from({ length: 50 }, () => get(url, '/v1/conversations/conv_1/items', agent))
  await eventually(async () => upstream.held.length === 50, '50 calls held at the upstream')

  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  await eventually(async () => output.text.includes('stopped accepting connections'), 'the gateway stops accepting')
  child.kill('SIGTERM')
  const refused = await get(url, '/healthz').then(a => a.status, (err: NodeJS.ErrnoException) => err.code)
  t.equal(refused, 'ECONNREFUSED', 'a new connection is refused')
  for (const { release } of upstream.held) release()

  const answers = await Promise.all(calls)
  t.same(answers.map(a => a.status), Array(50).fill(200), 'every in-flight call completed with 200')
  t.ok(answers.every(a => a.headers.connection === 'close'), 'every answer closes its kept-alive connection')
  const [code] = await exited
  t.equal(code, 0)
  const records = auditRecords(dir)
  t.equal(records.length, 50, 'fifty records on disk')
  t.ok(records.every(r => r.status === 200 && r.outcome === 'ok' && r.action === 'item.list'), 'each one complete and ok')
  t.match(output.text, /SIGTERM: already shutting down/, 'a second SIGTERM changes nothing')
})

t.test('SIGTERM with a connection open that never sent a request: the gateway exits at once (0), not at the grace', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 20000 }'))
  const { child, url, output } = await startBin(t, file, {})
  const { hostname, port } = new URL(url)
  // as a client or a load balancer that opens connections ahead
  await sigtermWithSilentConnection(t, child, Number(port), hostname)
  t.notMatch(output.text, /aborting the calls still in flight/)
})

/**
 * Opens a connection to `port` that sends nothing, then SIGTERMs the gateway: it must exit 0 well before its 20 s
 * grace, and close that connection.
 */
async function sigtermWithSilentConnection (t: Test, child: ChildProcess, port: number, host: string): Promise<void> {
  const silent = connect(port, host)
  t.teardown(() => silent.destroy())
  silent.on('error', () => {})
  await once(silent, 'connect')
  const ended = once(silent, 'close')
  const exited = once(child, 'exit')
  const signalled = Date.now()
  child.kill('SIGTERM')
  const [code] = await exited
  const took = Date.now() - signalled
  t.equal(code, 0, 'exit 0: no call had to be aborted')
  t.ok(took < 5_000, `the process ended ${took} ms after SIGTERM, not at the 20 s grace`)
  await ended
}

t.test('SIGTERM with a connection to the metrics listener that never sent a request: the gateway exits at once (0), not past the grace', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 20000 }') + 'metrics: { listen: "127.0.0.1:0" }\n')
  const { child, output } = await startBin(t, file, {})
  const at = /"address":"127\.0\.0\.1:(\d+)","msg":"metrics listening"/.exec(output.text)
  t.ok(at, 'the metrics listener says where it listens')
  // A port scanner, a TCP health check, a scraper that opens its connection ahead: nothing to wait for.
  await sigtermWithSilentConnection(t, child, Number(at![1]), '127.0.0.1')
  t.notMatch(output.text, /aborting the calls still in flight|still not closed/)
})

t.test('at SIGINT /readyz turns 503 draining at once while calls are still served for drainDelayMs; then accepting stops', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 3000, graceMs: 5000 }'))
  const { child, url, output } = await startBin(t, file, {})
  const ready = await get(url, '/readyz')
  t.same([ready.status, JSON.parse(ready.body)], [200, { status: 'ready' }], 'ready before the signal')

  const exited = once(child, 'exit')
  child.kill('SIGINT')
  const draining = await eventually(async () => {
    const a = await get(url, '/readyz')
    return a.status === 503 ? a : null
  }, '/readyz turns 503')
  t.same(JSON.parse(draining.body), { status: 'draining' })
  t.equal((await get(url, '/healthz')).status, 200, '/healthz (liveness) stays 200')
  await new Promise(resolve => setTimeout(resolve, 1000))
  const served = await new Promise<number>((resolve, reject) => {
    const req = request(`${url}/v1/conversations`, {
      method: 'POST', agent: false, headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' }
    }, res => { res.resume(); res.on('end', () => resolve(res.statusCode!)) })
    req.on('error', reject)
    req.end('{"metadata":{"topic":"during the drain delay"}}')
  })
  t.equal(served, 200, 'a new call a second into the drain delay is served')
  await eventually(async () => await get(url, '/healthz').then(() => false, (err: NodeJS.ErrnoException) => err.code === 'ECONNREFUSED'),
    'after the delay, connections are refused')
  const [code] = await exited
  t.equal(code, 0)
  t.match(auditRecords(dir), [{ action: 'conversation.create', status: 200, outcome: 'ok' }], 'the call is audited; the probes are not')
  t.match(output.text, /SIGINT: shutting down: \/readyz answers 503; serving for 3000 ms more/)
})

t.test('a call hanging on the upstream does not hold the process past shutdown.graceMs: aborted, audited aborted, exit 1', async t => {
  const upstream = await holdingUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 500 }', ', timeoutMs: 60000'))
  const { child, url, output } = await startBin(t, file, {})
  const call = get(url, '/v1/conversations/conv_1/items').then(a => a.status, (err: NodeJS.ErrnoException) => err.code)
  await eventually(async () => upstream.held.length === 1, 'the call held at the upstream')
  let upstreamClosed = false
  upstream.held[0]!.req.socket.once('close', () => { upstreamClosed = true })

  const exited = once(child, 'exit')
  const signalled = Date.now()
  child.kill('SIGTERM')
  const [code] = await exited
  const took = Date.now() - signalled
  t.equal(code, 1, 'exit 1: a call had to be aborted')
  t.ok(took < 10_000, `the process ended ${took} ms after SIGTERM, long before upstream.timeoutMs (60 s)`)
  t.equal(await call, 'ECONNRESET', 'the client\'s connection was closed without an answer')
  await eventually(async () => upstreamClosed, 'the upstream request was aborted')
  t.match(auditRecords(dir), [{ action: 'item.list', status: 499, outcome: 'aborted' }], 'the call is on disk, audited aborted')
  t.match(output.text, /shutdown grace of 500 ms over: aborting the calls still in flight/)
})

t.test('a generation still at the upstream when the grace ends is answered 503 x-should-retry: false, not sent again by the SDK to another replica', async t => {
  // Cut with its connection, the SDKs take it for a connection error and send it again: behind a load balancer, to
  // another replica, and the upstream generates it twice.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  let creates = 0
  upstream.respond = (req, res) => {
    if (req.method !== 'POST' || req.url !== '/v1/responses') return
    if (++creates === 1) return // a long generation, still running at the grace's end
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({ id: 'resp_2', object: 'response', status: 'completed', output: [], metadata: { gateway_owner: 'team-a' } }))
  }
  const replicas = []
  for (let i = 0; i < 2; i++) {
    const { file, dir } = configFile('')
    writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 500 }', ', timeoutMs: 60000'))
    replicas.push({ dir, ...await startBin(t, file, {}) })
  }
  const [stopping, other] = replicas as [typeof replicas[0], typeof replicas[0]]
  // The load balancer: the stopping replica until it is signalled, then the other.
  let target = stopping.url
  const client = new OpenAI({ apiKey: KEY, baseURL: 'http://balancer/v1', fetch: async (url, init) => await fetch(String(url).replace('http://balancer', target), init) })
  const answer = client.responses.create({ model: 'gpt-4o-mini', input: 'think for a long time' }).then(() => null, (err: unknown) => err)
  await eventually(async () => creates === 1, 'the generation at the upstream')
  const exited = once(stopping.child, 'exit')
  stopping.child.kill('SIGTERM')
  target = other.url
  const [code] = await exited
  const err = await answer
  t.match(err, { status: 503, error: { code: 'gateway_shutting_down', type: 'server_error' } }, 'the SDK raised the gateway\'s answer')
  t.equal((err as { headers?: Headers } | null)?.headers?.get('x-should-retry'), 'false', 'and not to send it again')
  t.equal(creates, 1, 'generated once: the SDK did not send it again')
  t.equal(code, 1, 'exit 1: a call had to be ended')
  t.match(auditRecords(stopping.dir), [{ action: 'response.create', status: 503, outcome: 'unavailable' }], 'audited as answered')
  t.notMatch(stopping.output.text, /already sent/, 'the upstream call cut afterwards answers nothing more')
})

t.test('a generation whose answer had begun upstream but not reached the client when the grace ends is answered 503 too, not cut', async t => {
  // A non-streamed answer is read whole before anything of it is passed on (its owner key taken out): an upstream
  // that sends its headers first and its body late leaves the client with nothing yet, which a cut connection would
  // have the SDKs take for a connection error, and send again.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  let creates = 0
  upstream.respond = (req, res) => {
    if (req.method !== 'POST' || req.url !== '/v1/responses') return
    creates++
    res.writeHead(200, { 'content-type': 'application/json' })
    res.write('{"id":"resp_1","object":"response",') // the rest never comes before the grace's end
  }
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 500 }', ', timeoutMs: 60000'))
  const gateway = await startBin(t, file, {})
  const client = new OpenAI({ apiKey: KEY, baseURL: `${gateway.url}/v1`, maxRetries: 0 })
  const answer = client.responses.create({ model: 'gpt-4o-mini', input: 'think for a long time' }).then(() => null, (err: unknown) => err)
  await eventually(async () => creates === 1, 'the generation at the upstream')
  await new Promise(resolve => setTimeout(resolve, 100)) // its headers at the gateway
  const exited = once(gateway.child, 'exit')
  gateway.child.kill('SIGTERM')
  await exited
  const err = await answer
  t.match(err, { status: 503, error: { code: 'gateway_shutting_down' } }, 'the SDK raised the gateway\'s answer, no connection error')
  t.equal((err as { headers?: Headers } | null)?.headers?.get('x-should-retry'), 'false', 'and not to send it again')
  t.match(auditRecords(dir), [{ action: 'response.create', status: 503, outcome: 'unavailable' }], 'audited as answered')
  t.notMatch(gateway.output.text, /already sent|could not be read|not what was expected/, 'the read cut afterwards answers nothing more, and warns of nothing')
})

t.test('a grace over while the audit is still being written, with no call in flight, aborts nothing: exit 0, nothing said to be aborted', async t => {
  // The grace bounds the calls; the audit's flush is bounded on its own. A destination that took the last records
  // a moment after the grace (a disk freed, a path put right) had the process say it aborted calls, and exit 1.
  const upstream = await holdingUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 200 }'))
  const { child, url, output } = await startBin(t, file, {})
  t.equal((await get(url, '/v1/conversations/conv_1')).status, 200)
  const active = join(dir, 'audit.jsonl')
  renameSync(active, join(dir, 'audit.jsonl.1'))
  symlinkSync('/dev/full', active) // every write fails until it is gone
  await eventually(async () => (await get(url, '/v1/conversations/conv_1')).status === 503, 'the audit unavailable: calls refused')
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  await eventually(async () => /shutdown grace of 200 ms over/.test(output.text), 'the grace over, the records still waiting')
  unlinkSync(active)
  const [code] = await exited
  t.equal(code, 0, 'exit 0: no call aborted, no record lost')
  t.notMatch(output.text, /aborting the calls still in flight|after aborting/)
  t.ok(auditRecords(dir).some(r => r.status === 503 && r.outcome === 'unavailable'), 'the refused calls\' records were written')
})

/** A gateway draining: a call on a raw connection held at the upstream, SIGTERM sent, accepting stopped. */
async function drainingWithHeldCall (t: Test, graceMs: number) {
  const upstream = await holdingUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, `{ drainDelayMs: 0, graceMs: ${graceMs} }`))
  const { child, url, output } = await startBin(t, file, {})
  const { hostname, port } = new URL(url)
  const socket = connect(Number(port), hostname)
  t.teardown(() => socket.destroy())
  socket.on('error', () => {})
  let received = ''
  socket.on('data', (c: Buffer) => { received += c.toString('latin1') })
  const closed = once(socket, 'close')
  socket.write(`GET /v1/conversations/conv_1/items HTTP/1.1\r\nHost: gw\r\n${AUTH}\r\n`)
  await eventually(async () => upstream.held.length === 1, 'the first call held at the upstream')
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  await eventually(async () => output.text.includes('stopped accepting connections'), 'the gateway stops accepting')
  return { upstream, dir, socket, received: () => received, closed, exited }
}

t.test('calls pipelined on a connection during the drain are each served; the last answer closes the connection', async t => {
  const { upstream, dir, socket, received, closed, exited } = await drainingWithHeldCall(t, 10000)
  const body = '{"metadata":{"topic":"pipelined in the drain"}}'
  socket.write(`GET /v1/conversations/conv_1/items HTTP/1.1\r\nHost: gw\r\n${AUTH}\r\n` +
    `POST /v1/conversations HTTP/1.1\r\nHost: gw\r\n${AUTH}Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await eventually(async () => upstream.held.length === 3, 'the pipelined calls held at the upstream too')
  for (const { release } of upstream.held) release()
  await closed
  const answers = received().split(/^(?=HTTP\/1\.1 )/m)
  t.same(answers.map(a => Number(/^HTTP\/1\.1 (\d{3})/.exec(a)?.[1])), [200, 200, 200], 'three answers, one for each call')
  t.notMatch(answers[0], /^connection: close/im, 'the first answer keeps the connection: calls wait behind it')
  t.notMatch(answers[1], /^connection: close/im, 'so does the second')
  t.match(answers[2], /^connection: close/im, 'the last one closes it')
  const [code] = await exited
  t.equal(code, 0)
  t.same(auditRecords(dir).map(r => [r.action, r.status, r.outcome]).sort(),
    [['conversation.create', 200, 'ok'], ['item.list', 200, 'ok'], ['item.list', 200, 'ok']], 'each one audited ok')
})

t.test('/readyz asked on a connection still open once accepting has stopped says draining, not starting', async t => {
  const { upstream, socket, received, closed, exited } = await drainingWithHeldCall(t, 10000)
  socket.write('GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n')
  await new Promise(resolve => setTimeout(resolve, 200))
  upstream.held[0]!.release()
  await closed
  const answers = received().split(/^(?=HTTP\/1\.1 )/m)
  t.match(answers[1], /^HTTP\/1\.1 503 /, 'the probe is answered 503')
  t.same(JSON.parse(answers[1]!.slice(answers[1]!.indexOf('\r\n\r\n') + 4)), { status: 'draining' })
  const [code] = await exited
  t.equal(code, 0)
})

t.test('the drain does not wait for connections with no call: one with half a request, or one whose call ended after accepting stopped', async t => {
  const upstream = await holdingUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 20000 }'))
  const { child, url, output } = await startBin(t, file, {})
  const { hostname, port } = new URL(url)
  const half = connect(Number(port), hostname)
  t.teardown(() => half.destroy())
  half.on('error', () => {})
  half.write('POST /v1/conversations HTTP/1.1\r\nHost: gw\r\n') // and no more
  const agent = new Agent({ keepAlive: true, maxSockets: 1 })
  t.teardown(() => agent.destroy())
  const call = get(url, '/v1/conversations/conv_1/items', agent)
  await eventually(async () => upstream.held.length === 1, 'a call held at the upstream')
  const exited = once(child, 'exit')
  const signalled = Date.now()
  child.kill('SIGTERM')
  await eventually(async () => output.text.includes('stopped accepting connections'), 'the gateway stops accepting')
  upstream.held[0]!.release() // its answer began... now, after accepting stopped: its connection falls idle after it
  t.equal((await call).status, 200)
  const [code] = await exited
  t.equal(code, 0, 'exit 0: nothing had to be aborted')
  t.ok(Date.now() - signalled < 5_000, `ended ${Date.now() - signalled} ms after SIGTERM, not at the 20 s grace`)
  t.notMatch(output.text, /aborting the calls still in flight/)
})

t.test('a call pipelined behind an answer that closes the connection (a refusal during the drain) goes no further: not upstream, audited aborted', async t => {
  const { upstream, dir, socket, received, closed, exited } = await drainingWithHeldCall(t, 10000)
  const body = '{"metadata":{"topic":"never answered"}}'
  socket.write(`GET /v1/models HTTP/1.1\r\nHost: gw\r\n${AUTH}\r\n`)
  await new Promise(resolve => setTimeout(resolve, 200))
  socket.write(`POST /v1/conversations HTTP/1.1\r\nHost: gw\r\n${AUTH}Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`)
  await new Promise(resolve => setTimeout(resolve, 200))
  upstream.held[0]!.release()
  await closed
  t.same([...received().matchAll(/^HTTP\/1\.1 (\d{3})/gm)].map(m => Number(m[1])), [200, 404], 'the first call and the refusal are answered')
  t.equal(upstream.requests.filter(r => r.method === 'POST').length, 0, 'the call after the closing answer never went upstream')
  const [code] = await exited
  t.equal(code, 0)
  t.same(auditRecords(dir).map(r => [r.action, r.status, r.outcome]).sort(),
    [['conversation.create', 499, 'aborted'], ['item.list', 200, 'ok'], ['unknown', 404, 'invalid']])
})

t.test('a stream still running when the grace ends is audited aborted, not as an upstream failure', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const timers: NodeJS.Timeout[] = []
  t.teardown(() => { for (const timer of timers) clearInterval(timer) })
  upstream.respond = (req: IncomingMessage, res: ServerResponse) => {
    if (req.url === '/v1/conversations/conv_1') {
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end('{"id":"conv_1","object":"conversation","metadata":{"gateway_owner":"team-a"}}')
      return
    }
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    timers.push(setInterval(() => res.write('data: {"type":"tick"}\n\n'), 100))
  }
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 500 }'))
  const { child, url } = await startBin(t, file, {})
  const streaming = new Promise<void>((resolve, reject) => {
    const req = request(`${url}/v1/conversations/conv_1/items`, { agent: false, headers: { authorization: `Bearer ${KEY}` } }, res => {
      res.once('data', () => { resolve() })
      res.on('error', () => {})
    })
    req.on('error', () => {})
    req.end()
    setTimeout(() => { reject(new Error('no event within 5 s')) }, 5000).unref()
  })
  await streaming
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  const [code] = await exited
  t.equal(code, 1, 'exit 1: a call had to be aborted')
  t.match(auditRecords(dir), [{ action: 'item.list', status: 200, outcome: 'aborted' }], 'audited aborted (its status as sent)')
})

t.test('SDK streams cut at the end of the grace end with the gateway\'s error event, which both SDKs raise as APIError, not a bare "terminated"', async t => {
  // Each event 300 ms after the last: a generation still streaming when the grace (1 s) ends.
  const upstream = await startUpstream({ responses: { streamDelayMs: 300 } })
  t.teardown(() => upstream.close())
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 1000 }'))
  const { child, url } = await startBin(t, file, {})
  const client = new OpenAI({ apiKey: KEY, baseURL: `${url}/v1`, maxRetries: 0 })
  const started: Array<Promise<void>> = []
  const ends = Array.from({ length: 3 }, async () => {
    const stream = await client.responses.create({ model: 'gpt-4o-mini', input: 'Tell me a long story about a gateway', stream: true })
    const seen: string[] = []
    let first!: () => void
    started.push(new Promise(resolve => { first = resolve }))
    try {
      for await (const event of stream) {
        seen.push(event.type)
        first()
      }
      return { seen, error: null }
    } catch (err) {
      return { seen, error: err }
    }
  })
  await eventually(async () => started.length === 3, 'three streams answered')
  await Promise.all(started)
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  const results = await Promise.all(ends)
  for (const { seen, error } of results) {
    t.notOk(seen.includes('response.completed'), 'cut before its end')
    t.ok(error instanceof OpenAI.APIError, `an APIError, not ${String(error)}`)
    t.match((error as Error).message, /shutting down/)
  }
  const [code] = await exited
  t.equal(code, 1, 'exit 1: calls had to be aborted')
  t.match(auditRecords(dir).map(r => r.outcome), ['aborted', 'aborted', 'aborted'], 'each audited aborted')
})

t.test('`npm start` as the README runs it: SIGTERM to npm reaches the gateway, which drains and exits; none is left running', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 2000 }'))
  // npm forwards SIGTERM and SIGINT to the script's process only: were that a shell running the gateway, the shell
  // would die and the gateway go on, orphaned, holding its port, never drained.
  const npm = spawn('npm', ['start', '--silent', '--', '--config', file], {
    env: { PATH: process.env.PATH, HOME: process.env.HOME ?? dir, NO_COLOR: '1', npm_config_update_notifier: 'false' }
  })
  let text = ''
  npm.stdout.on('data', (c: Buffer) => { text += c.toString() })
  npm.stderr.on('data', (c: Buffer) => { text += c.toString() })
  const gatewayPid = Number(await eventually(async () => /"pid":(\d+)[^\n]*Server listening/.exec(text)?.[1] ?? null, 'the gateway listening'))
  const alive = () => { try { process.kill(gatewayPid, 0); return true } catch { return false } }
  t.teardown(() => { if (alive()) process.kill(gatewayPid, 'SIGKILL') })
  t.not(gatewayPid, npm.pid, 'the gateway runs under npm')

  npm.kill('SIGTERM')
  await eventually(async () => !alive(), 'the gateway process gone after SIGTERM to npm', 8_000)
  t.match(text, /SIGTERM: shutting down/, 'the gateway got the signal and drained')
  t.match(text, /"msg":"closed"/)
})

t.test('an ignored signal that keeps coming (SIGXFSZ with every audit write past `ulimit -f`) is logged once a minute at most, with how many came meanwhile', async t => {
  let now = 0
  const lines: Array<{ fields: Record<string, unknown>, msg: string }> = []
  const ignored = ignoredSignalLogger({ warn: (fields: Record<string, unknown>, msg: string) => { lines.push({ fields, msg }) } }, () => now)
  // The audit retries a failed write every 500 ms while the disk stays full: a SIGXFSZ with each, and more.
  for (let i = 0; i < 240; i++, now += 250) ignored('SIGXFSZ')
  t.equal(lines.length, 1, 'a minute of them: one line')
  t.match(lines[0], { fields: { signal: 'SIGXFSZ' }, msg: /^SIGXFSZ: ignored .*ulimit -f/ }, 'which says what it means')
  ignored('SIGALRM')
  t.equal(lines.length, 2, 'another signal has its own line')
  now = 60_000
  ignored('SIGXFSZ')
  t.equal(lines.length, 3, 'a minute on, the next line')
  t.match(lines[2], { fields: { signal: 'SIGXFSZ', alsoIgnored: 239 }, msg: /239 more since the last line/ }, 'with how many were not logged')
  now += 1
  ignored('SIGXFSZ')
  t.equal(lines.length, 3)
})

t.test('signals the gateway has no use for are logged and ignored: none ends it, and SIGUSR1 opens no debugger', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, 'http://127.0.0.1:9', '{ drainDelayMs: 0, graceMs: 1000 }'))
  const { child, url, output } = await startBin(t, file, {})
  const logged = ['SIGUSR1', 'SIGALRM', 'SIGVTALRM', 'SIGXCPU', 'SIGXFSZ', 'SIGIO', 'SIGPWR', 'SIGSTKFLT'] as const
  for (const signal of [...logged, 'SIGPIPE'] as const) child.kill(signal)
  for (const signal of logged) {
    await eventually(async () => output.text.includes(`${signal}: ignored`), `the log says ${signal} was ignored`)
  }
  t.equal((await get(url, '/healthz')).status, 200, 'still serving')
  t.equal(child.exitCode, null, 'still running')
  t.notMatch(output.err, /Debugger listening/, 'no inspector was opened')

  const exited = once(child, 'exit')
  child.kill('SIGQUIT')
  const [code, signal] = await exited
  t.same([code, signal], [0, null], 'SIGQUIT shuts down gracefully too')
  t.match(output.text, /SIGQUIT: shutting down/)
})

/**
 * A raw connection to `url` kept alive after one conversation create (`first`, its whole answer); `next(close)`
 * sends the call again and runs `close` while the call is in the kernel, not yet read: 'answered', or how the
 * connection ended. `answers()`: the statuses received.
 */
async function keptAliveCall (t: Test, url: string) {
  const { hostname, port } = new URL(url)
  const socket = connect(Number(port), hostname)
  t.teardown(() => socket.destroy())
  socket.on('error', () => {})
  await once(socket, 'connect')
  let received = ''
  socket.on('data', (c: Buffer) => { received += c.toString('latin1') })
  const call = buildRequest('POST', '/v1/conversations', [['Authorization', `Bearer ${KEYS.full}`], ['Content-Type', 'application/json']], '{}')
  const answers = () => received.split('HTTP/1.1 ').slice(1).map(a => Number(a.slice(0, 3)))
  const answered = (n: number) => eventually(async () => answers().length === n && received.endsWith('}'), `answer ${n}, whole`)
  socket.write(call)
  const first = answered(1)
  const next = async (close: () => void): Promise<string> => {
    socket.write(call)
    close()
    const ended = once(socket, 'close').then(() => 'closed', (err: NodeJS.ErrnoException) => err.code ?? 'error')
    return Promise.race([ended, answered(2).then(() => 'answered', () => 'not answered')])
  }
  return { first, answers, next }
}

t.test('a call sent on a kept-alive connection as the drain closes the unused ones is read and answered, not cut unanswered', async t => {
  // Under load the event loop runs timers (the drain's periodic sweep) before it reads the bytes that came in
  // meanwhile; Node's close() (accepting stops) closes the connections idle between calls at once. A client that
  // sent its next call on such a connection (one just fallen idle after a stream begun before accepting stopped,
  // whose answer could not say Connection: close) lost it, with no answer and no record.
  const closers: Array<[string, (app: FastifyInstance) => void]> = [
    ['the drain\'s sweep', app => { app.closeUnusedConnections() }],
    ['Node closing the idle ones as accepting stops', app => { app.server.closeIdleConnections() }]
  ]
  for (const [what, close] of closers) {
    const upstream = await startUpstream()
    t.teardown(() => upstream.close())
    const gw = await startGateway(t, testConfig(upstream.url))
    const exchange = await keptAliveCall(t, gw.url)
    await exchange.first
    t.equal(await exchange.next(() => { close(gw.app) }), 'answered', `${what}: the call is answered, not cut`)
    t.same(exchange.answers(), [200, 200])
    t.equal((await gw.auditFile()).length, 2, `${what}: both calls audited`)
  }
})

t.test('generations aborted at the end of the grace whose usage Redis does not take are all told before the process exits', async t => {
  // Their charges fail after the rate-limit's close hook has told what was left uncharged (Redis slow, closed with the
  // store): a failure within 10 s of the last warning waited on a timer that did not hold the process, and was lost.
  const redis = await startRedis(t)
  const upstream = await startUpstream({ responses: { streamDelayMs: 300 } })
  t.teardown(() => upstream.close())
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, '{ drainDelayMs: 0, graceMs: 500 }')
    .replace('burst: 100000 }', 'burst: 100000, tokensPerMinute: 100000 }') +
    `store: { url: "${redis.url}", timeoutMs: 1000, onFailure: closed }\n`)
  const { child, url, output } = await startBin(t, file, {})
  const client = new OpenAI({ apiKey: KEY, baseURL: `${url}/v1`, maxRetries: 0 })
  const streams = await Promise.all(Array.from({ length: 3 }, async () => {
    const events = (await client.responses.create({ model: 'gpt-4o-mini', input: 'Tell me a long story', stream: true }))[Symbol.asyncIterator]()
    await events.next() // under way
    return events
  }))
  const read = streams.map(async events => { try { while (!(await events.next()).done); } catch {} })
  redis.pause() // (resumed by the teardown's stop)
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  await Promise.all(read)
  await exited
  const told = output.text.split('\n').filter(l => l.includes('could not be charged')).map(l => JSON.parse(l) as { since: { calls: number } })
  t.equal(told.reduce((sum, line) => sum + line.since.calls, 0), 3, 'the three aborted generations are told')
})
