// Several gateways, one Redis: the token buckets are shared, and a Redis outage is met with the configured
// open/closed behaviour and healed without a restart. The replicas are real processes started as ops start
// them (`node dist/cli.js start --config FILE`); one in-process gateway checks what the answers look like.
import { spawn } from 'node:child_process'
import { readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import OpenAI from 'openai'
import t, { type Test } from 'tap'
import { generateKey, keyDigest } from '../src/keys.js'
import { configFile, gatewayYaml, runAsync } from './fixtures/bin.js'
import { startGateway, testConfig, KEYS } from './fixtures/gateway.js'
import { eventually } from './fixtures/eventually.js'
import { startRedis } from './fixtures/redis-server.js'
import { startUpstream, UPSTREAM_TOKEN, type FakeUpstream } from './fixtures/upstream.js'
import { tempDir } from './fixtures/tmp.js'

const KEY_A = generateKey()
const KEY_B = generateKey()
const UNAVAILABLE = /"msg":"rate-limit store unavailable/g
const RECOVERED = /"msg":"rate-limit store recovered/

interface Replica { url: string, log: () => string, audit: () => Array<Record<string, unknown>>, stop: () => Promise<void> }

interface ReplicaOptions {
  unowned?: 'allow' | 'deny'
  scopes?: string
}

/** one gateway process; its config file, log and audit file are its own */
async function startReplica (t: Test, upstream: string, store: Record<string, unknown>, burst: number,
  opts: ReplicaOptions = {}): Promise<Replica> {
  const dir = tempDir('gw-replica-')
  const file = join(dir, 'gateway.yaml')
  // requestsPerMinute 1: no token comes back while a test runs, so counts are exact
  const rateLimit = `{ requestsPerMinute: 1, burst: ${burst} }`
  writeFileSync(file, `
listen: { host: 127.0.0.1, port: 0 }
log: { level: info }
upstream: { baseUrls: ["${upstream}"], apiKey: "\${OHMYGPT_API_KEY}", timeoutMs: 5000 }
store: ${JSON.stringify(store)}
ownership: { unowned: ${opts.unowned ?? 'allow'} }
audit: { file: ${join(dir, 'audit.jsonl')} }
clients:
  - { id: team-a, keySha256: "${keyDigest(KEY_A)}", scopes: [${opts.scopes ?? 'read'}], rateLimit: ${rateLimit} }
  - { id: team-b, keySha256: "${keyDigest(KEY_B)}", scopes: [${opts.scopes ?? 'read'}], rateLimit: ${rateLimit} }
`)
  const child = spawn(process.execPath, ['dist/cli.js', 'start', '--config', file],
    { env: { PATH: process.env.PATH, OHMYGPT_API_KEY: UPSTREAM_TOKEN } })
  t.teardown(() => { child.kill('SIGKILL') })
  let log = ''
  child.stdout.on('data', (c: Buffer) => { log += c.toString() })
  child.stderr.on('data', (c: Buffer) => { log += c.toString() })
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => { reject(new Error(`no listening line in: ${log}`)) }, 10_000)
    child.stdout.on('data', () => {
      const m = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(log)
      if (m) { clearTimeout(timer); resolve(m[1]!) }
    })
  })
  return {
    url,
    log: () => log,
    audit: () => readFileSync(join(dir, 'audit.jsonl'), 'utf8').trim().split('\n').map(l => JSON.parse(l) as Record<string, unknown>),
    async stop () {
      if (child.exitCode !== null) return
      const exited = new Promise(resolve => child.once('exit', resolve))
      child.kill('SIGTERM')
      await exited
    }
  }
}

function get (replica: { url: string }, key: string) {
  return fetch(`${replica.url}/v1/conversations/conv_1/items`, { headers: { authorization: `Bearer ${key}` } })
}

async function alwaysOk (t: Test): Promise<FakeUpstream> {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  // A conversation not made through the gateway (no owner): both teams may read it (ownership.unowned: allow).
  upstream.respond = (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(req.url === '/v1/conversations/conv_1' ? '{"id":"conv_1","object":"conversation","metadata":{}}' : '{"object":"list","data":[]}')
  }
  return upstream
}

t.test('two replicas share one client\'s burst; another client keeps its own', async t => {
  const [redis, upstream] = [await startRedis(t), await alwaysOk(t)]
  const store = { url: redis.url, timeoutMs: 2000 } // not about timeouts: a slow healthy call must not fall back
  const replicas = [await startReplica(t, upstream.url, store, 5), await startReplica(t, upstream.url, store, 5)]

  const answers = []
  for (let i = 0; i < 12; i++) answers.push(await get(replicas[i % 2]!, KEY_A))
  const ok = answers.filter(r => r.status === 200)
  t.equal(ok.length, 5, 'the sum of 2xx over both replicas is the one bucket\'s burst (each alone would grant 5)')
  t.same(answers.map(r => r.status), [200, 200, 200, 200, 200, 429, 429, 429, 429, 429, 429, 429])
  t.same(ok.map(r => r.headers.get('x-ratelimit-remaining-requests')), ['4', '3', '2', '1', '0'],
    'each answer counts down the same bucket, whichever replica gave it')
  t.equal(upstream.requests.filter(r => r.url.endsWith('/items')).length, 5, 'refused calls never reached the upstream')

  t.equal((await get(replicas[1]!, KEY_B)).status, 200, 'team-b is not affected')
  t.equal((await get(replicas[0]!, KEY_B)).headers.get('x-ratelimit-remaining-requests'), '3')
})

t.test('at start the log says in one info line whether the store is Redis (where, never its password) or this process\'s memory', async t => {
  // Nothing said it: a replica left on memory:// by mistake (each granting every client its whole burst) looked the
  // same as one on the shared Redis until the limits were found not to hold.
  const [redis, upstream] = [await startRedis(t, { password: 'right-Pa55word' }), await alwaysOk(t)]
  const shared = await startReplica(t, upstream.url, { url: redis.url }, 5)
  const alone = await startReplica(t, upstream.url, { url: 'memory://' }, 5)
  const said = (replica: Replica) => replica.log().split('\n').filter(line => line.includes('"msg":"rate-limit and ownership store'))
  t.match(said(shared), [new RegExp(`"level":30,.*"msg":"rate-limit and ownership store: Redis at redis:\\/\\/127\\.0\\.0\\.1:${redis.port}/0"`)])
  t.notMatch(shared.log(), /right-Pa55word/, 'never its password')
  t.match(said(alone), [/"level":30,.*"msg":"rate-limit and ownership store: memory:\/\/, this process alone/])
})

t.test('two deployments on one Redis, each with its own store.keyPrefix, keep their own buckets for the same client id', async t => {
  const [redis, upstream] = [await startRedis(t), await alwaysOk(t)]
  // prod keeps the default prefix; staging (same client ids, its own config) is given another one
  const prod = await startReplica(t, upstream.url, { url: redis.url, timeoutMs: 2000 }, 3)
  const staging = await startReplica(t, upstream.url, { url: redis.url, timeoutMs: 2000, keyPrefix: 'ogw:staging:' }, 3)
  const staged = []
  for (let i = 0; i < 4; i++) staged.push((await get(staging, KEY_A)).status)
  t.same(staged, [200, 200, 200, 429], 'staging\'s team-a has used its burst')
  const res = await get(prod, KEY_A)
  t.equal(res.status, 200, 'prod\'s team-a is not limited by staging\'s calls')
  t.equal(res.headers.get('x-ratelimit-remaining-requests'), '2', 'it takes from a bucket of its own')
  const keys = await redis.command('KEYS *')
  t.match(keys, 'ogw:rl:team-a', 'the default prefix')
  t.match(keys, 'ogw:staging:team-a')
})

t.test('a replica started with a read-only Redis replica as its store exits 1 saying so in one line, before it listens, its audit directory as it was', async t => {
  // (the replica would otherwise serve every call from local buckets, never shared, or refuse every one, said in warnings)
  const [primary, readOnly] = [await startRedis(t), await startRedis(t)]
  t.match(await readOnly.command(`REPLICAOF 127.0.0.1 ${primary.port}`), /OK/)
  const audit = join(tempDir('gw-replica-'), 'audit.jsonl')
  const { file } = configFile(`${gatewayYaml(audit)}store: { url: "${readOnly.url}" }\n`)
  const { status, stdout, stderr } = await runAsync(['start', '--config', file])
  t.equal(status, 1)
  t.match(stderr, /^ohmygpt-gateway start: store\.url: it leads to a read-only replica \(role: slave\), which refuses every bucket write: give the primary's address\n$/)
  t.notMatch(stdout, /Server listening/)
  // No lock (the next start would be taken for a second gateway), and no empty audit.jsonl for an operator to wonder
  // about: the store is checked before the audit is opened.
  t.same(readdirSync(dirname(audit)), [], 'nothing left in the audit directory')
})

t.test('a replica started with a wrong Redis password exits 1 saying so, and leaves nothing in its audit directory', async t => {
  const redis = await startRedis(t, { password: 'right-Pa55word' })
  const audit = join(tempDir('gw-replica-'), 'audit.jsonl')
  const { file } = configFile(`${gatewayYaml(audit)}store: { url: "${redis.url.replace('right-Pa55word', 'wrong-Pa55word')}" }\n`)
  const { status, stderr } = await runAsync(['start', '--config', file])
  t.equal(status, 1)
  t.match(stderr, /^ohmygpt-gateway start: store\.url: Redis refused the user or password given in it/)
  t.same(readdirSync(dirname(audit)), [], 'no audit file, no lock')
})

t.test('Redis stopped: the open replica serves locally with one warning, the closed one answers 503 and the upstream sees nothing; both recover when Redis is back', async t => {
  const [redis, upstream] = [await startRedis(t), await alwaysOk(t)]
  const open = await startReplica(t, upstream.url, { url: redis.url, timeoutMs: 2000, onFailure: 'open' }, 20)
  const closed = await startReplica(t, upstream.url, { url: redis.url, timeoutMs: 2000, onFailure: 'closed' }, 20)
  t.equal((await get(open, KEY_A)).status, 200)
  t.equal((await get(closed, KEY_A)).status, 200)

  await redis.stop()
  const served = await Promise.all(Array.from({ length: 10 }, () => get(open, KEY_A)))
  t.same(served.map(r => r.status), Array(10).fill(200), 'open: every call answered and served')
  t.equal(served[9]!.headers.get('x-ratelimit-remaining-requests') !== null, true, 'with headers from the local bucket')
  t.equal(open.log().match(UNAVAILABLE)?.length, 1, 'open: one warning, not one per call')

  const before = upstream.requests.length
  for (let i = 0; i < 5; i++) {
    const res = await get(closed, KEY_A)
    t.equal(res.status, 503)
    t.equal(res.headers.get('x-ratelimit-remaining-requests'), null, 'no rate-limit headers without a bucket')
    t.same(await res.json(), {
      error: {
        message: 'The rate-limit store is unavailable, so this call cannot be admitted. Please try again shortly.',
        type: 'server_error',
        param: null,
        code: 'rate_limit_store_unavailable'
      }
    })
  }
  t.equal(upstream.requests.length, before, 'closed: nothing reached the upstream')
  t.equal(closed.log().match(UNAVAILABLE)?.length, 1, 'closed: one warning')
  t.equal((await fetch(`${closed.url}/healthz`)).status, 200, '/healthz does not depend on Redis')
  t.match(closed.audit().at(-1), { clientId: 'team-a', status: 503 }, 'the refused call is audited')

  await redis.start() // same port, empty (no persistence)
  const back = await eventually(() => get(closed, KEY_A).then(r => r.status === 200 && r), 'the closed replica serves again')
  t.equal(back.headers.get('x-ratelimit-remaining-requests'), '19', 'from the shared bucket, which Redis lost')
  await eventually(async () => RECOVERED.exec(open.log()) !== null, 'the open replica reconnects')
  t.equal((await get(open, KEY_A)).headers.get('x-ratelimit-remaining-requests'), '18',
    'the open replica takes from the shared bucket again, not its local one (9 left there)')
  for (const replica of [open, closed]) {
    t.equal(replica.log().split(RECOVERED).length - 1, 1, 'the recovery is logged once')
  }
})

t.test('in process: closed mode answers 503 in the envelope, a scope refusal takes its token, and the app closes its client', async t => {
  const [redis, upstream] = [await startRedis(t), await alwaysOk(t)]
  const config = testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 2000, onFailure: 'closed' }, ownership: { unowned: 'allow' } })
  const gw = await startGateway(t, config)
  const call = (key: string, method = 'GET') => fetch(`${gw.url}/v1/conversations/conv_1`, { method, headers: { authorization: `Bearer ${key}` } })

  t.equal((await call(KEYS.limited)).headers.get('x-ratelimit-remaining-requests'), '2')
  const forbidden = await call(KEYS.reader, 'DELETE')
  t.equal(forbidden.status, 403)
  t.equal(forbidden.headers.get('x-ratelimit-remaining-requests'), String(config.clients[1]!.rateLimit.burst - 1),
    'a scope refusal comes after the rate limit: it took its token from the shared bucket')
  t.match(await redis.command('KEYS *'), 'ogw:rl:team-limited')

  await redis.stop()
  const refused = await call(KEYS.limited)
  t.equal(refused.status, 503)
  t.match(await refused.json(), { error: { code: 'rate_limit_store_unavailable', type: 'server_error' } })
  t.equal(refused.headers.get('retry-after'), '2', 'the SDKs\' two retries, 2 s apart, outlast a stall of a few seconds')
  t.equal(refused.headers.get('x-should-retry'), null, 'retried: it never reached the upstream')
  t.match(gw.audit().at(-1), { clientId: 'team-limited', status: 503 })
  const forbiddenNow = await call(KEYS.reader, 'DELETE')
  t.equal(forbiddenNow.status, 503, 'the rate limit comes before the scope check: it answers first')
  t.equal(forbiddenNow.headers.get('x-ratelimit-remaining-requests'), null, 'without headers when the bucket cannot be read')
  const unknown = await call('ogw_unknown-key')
  t.equal(unknown.status, 401, 'a refusal before the rate limit keeps its own answer')
  t.equal(unknown.headers.get('x-ratelimit-remaining-requests'), null)
  t.equal(gw.logs.filter(l => l.includes('rate-limit store unavailable')).length, 1)

  await redis.start()
  await eventually(() => call(KEYS.limited).then(r => r.status === 200), 'served again')
  await gw.app.close()
  const connected = async () => (await redis.command('CLIENT LIST')).split('\n').filter(l => l.includes('cmd=')).length
  await eventually(async () => await connected() === 1, 'only the probe itself is connected')
  t.pass('closing the app closed its Redis client')
})

t.test('ownership set through one replica holds on the other, and after both restart', async t => {
  const [redis, upstream] = [await startRedis(t), await startUpstream()]
  t.teardown(() => upstream.close())
  const store = { url: redis.url, timeoutMs: 2000 }
  const replica = () => startReplica(t, upstream.url, store, 100, { unowned: 'deny', scopes: 'read, write, delete' })
  const call = (r: Replica, key: string, method: string, path: string) =>
    fetch(`${r.url}/v1/conversations${path}`, { method, headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, ...(method === 'POST' ? { body: '{}' } : {}) })

  let [one, two] = [await replica(), await replica()]
  const created = await call(one, KEY_A, 'POST', '')
  t.equal(created.status, 200)
  const { id } = await created.json() as { id: string }
  t.equal((await call(two, KEY_B, 'GET', `/${id}`)).status, 404, 'team-b is refused on the other replica')
  t.equal((await call(two, KEY_A, 'GET', `/${id}`)).status, 200, 'team-a is served there')

  await Promise.all([one.stop(), two.stop()]);
  [one, two] = [await replica(), await replica()]
  t.equal((await call(one, KEY_B, 'DELETE', `/${id}`)).status, 404, 'after a restart of both, team-b is still refused')
  t.equal((await call(two, KEY_B, 'GET', `/${id}/items`)).status, 404)
  t.equal((await call(one, KEY_A, 'GET', `/${id}/items`)).status, 200, 'and team-a still served')
  t.same(upstream.requests.filter(r => r.method !== 'GET').map(r => r.method), ['POST'], 'nothing of team-b changed anything upstream')
})

/** A reasoning model's answer through replica `r`: its output starts with a reasoning item. */
function respond (r: Replica, key: string, input: unknown) {
  return fetch(`${r.url}/v1/responses`, {
    method: 'POST', headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' }, body: JSON.stringify({ model: 'o3', input })
  })
}

t.test('a reasoning item handed out by one replica may be passed back through the other, by its team only, after both restart too', async t => {
  const [redis, upstream] = [await startRedis(t), await startUpstream()]
  t.teardown(() => upstream.close())
  const replica = () => startReplica(t, upstream.url, { url: redis.url, timeoutMs: 2000 }, 100, { scopes: 'read, write' })

  let [one, two] = [await replica(), await replica()]
  const first = await (await respond(one, KEY_A, 'Plan the launch')).json() as { output: Array<{ type: string }> }
  t.equal(first.output[0]?.type, 'reasoning', 'replica one handed team-a a reasoning item')
  const input = [...first.output, { role: 'user', content: 'Go on' }]
  t.equal((await respond(two, KEY_B, input)).status, 400, 'team-b passing it back through replica two: refused')
  t.equal((await respond(two, KEY_A, input)).status, 200, 'team-a passing it back through replica two: served')

  await Promise.all([one.stop(), two.stop()]);
  [one, two] = [await replica(), await replica()]
  t.equal((await respond(one, KEY_A, input)).status, 200, 'after a restart of both, team-a is still served')
  t.equal((await respond(two, KEY_B, input)).status, 400, 'and team-b still refused')
})

// A code interpreter loop passes its output back as it came, the container its call ran in with it (b2a99ff): a
// replica serves it when another one handed that output out, as it does the items themselves.
t.test('a code interpreter call handed out by one replica, passed back through the other, is served to its team only', async t => {
  const [redis, upstream] = [await startRedis(t), await startUpstream()]
  t.teardown(() => upstream.close())
  upstream.respond = (_req, res, body) => {
    const { metadata } = JSON.parse(body.toString()) as { metadata?: Record<string, string> }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(JSON.stringify({
      id: 'resp_ci', object: 'response', status: 'completed', model: 'gpt-5.1', metadata, usage: { input_tokens: 1, output_tokens: 1, total_tokens: 2 },
      output: [{ type: 'code_interpreter_call', id: 'ci_r1', container_id: 'cntr_replicaaaaaaaaaaaaaaaaaaaaaaaaaa', code: 'print(1)', outputs: [], status: 'completed' }]
    }))
  }
  const replica = () => startReplica(t, upstream.url, { url: redis.url, timeoutMs: 2000 }, 100, { scopes: 'read, write' })
  const [one, two] = [await replica(), await replica()]
  const sdk = (r: Replica, key: string) => new OpenAI({ apiKey: key, baseURL: `${r.url}/v1`, maxRetries: 0 })
  const tools = [{ type: 'code_interpreter' as const, container: { type: 'auto' as const } }]
  const first = await sdk(one, KEY_A).responses.create({ model: 'gpt-5.1', input: 'run it', tools })
  const input = [...first.output as never[], { role: 'user' as const, content: 'and again' }]
  t.equal((await sdk(two, KEY_A).responses.create({ model: 'gpt-5.1', input, tools })).status, 'completed', 'team-a through replica two: served')
  const refused = await sdk(two, KEY_B).responses.create({ model: 'gpt-5.1', input, tools }).then(() => null, (e: unknown) => e)
  t.match(refused, { status: 403, code: 'container_not_allowed' }, 'team-b through replica two: refused')
})

t.test('a reasoning item handed out while Redis was down may be passed back through the other replica once Redis is back, with no call through the first', async t => {
  // Redis down (open: served from local buckets), or one replica's connection to it lost a moment: the note of
  // what it handed out did not reach Redis. Once Redis is back, that replica writes it, calls or none (a load
  // balancer may send it none that would, only reads); otherwise the other replica would refuse the client's loop,
  // which passes the item back on every call, until one came.
  const [redis, upstream] = [await startRedis(t), await startUpstream()]
  t.teardown(() => upstream.close())
  const replica = () => startReplica(t, upstream.url, { url: redis.url, timeoutMs: 2000 }, 100, { scopes: 'read, write' })
  const [one, two] = [await replica(), await replica()]

  await redis.stop()
  const first = await (await respond(one, KEY_A, 'Plan the launch')).json() as { output: Array<{ type: string }> }
  t.equal(first.output[0]?.type, 'reasoning', 'replica one handed team-a a reasoning item, Redis down')
  await redis.start()
  const input = [...first.output, { role: 'user', content: 'Go on' }]
  await eventually(async () => (await respond(two, KEY_A, input)).status === 200, 'team-a served through replica two')
  t.equal((await respond(two, KEY_B, input)).status, 400, 'team-b passing it back is still refused')
})

/** Redis, the fake upstream, and two replicas on them whose clients may generate; `sdk` is a team's SDK on one. */
async function twoGenerating (t: Test, storeTimeoutMs: number) {
  const [redis, upstream] = [await startRedis(t), await startUpstream()]
  t.teardown(() => upstream.close())
  const replica = () => startReplica(t, upstream.url, { url: redis.url, timeoutMs: storeTimeoutMs }, 100, { scopes: 'read, write' })
  const [one, two] = [await replica(), await replica()]
  const sdk = (r: Replica, key: string) => new OpenAI({ apiKey: key, baseURL: `${r.url}/v1`, maxRetries: 0 })
  return { redis, upstream, one, two, sdk }
}

t.test('Redis not answering: a reasoning item the other replica handed out, passed back, gets a 503 the SDK retries, not a 400 that says it is not the client\'s', async t => {
  // open (the default): calls are served from local buckets, but whose item this replica did not hand out itself
  // only Redis can say. Unable to check, the replica refuses the call as one it cannot serve safely right now, the
  // same for every client, rather than telling the owner its own item is another team's, which its loop would not retry.
  const { redis, upstream, one, two, sdk } = await twoGenerating(t, 300)
  const first = await sdk(one, KEY_A).responses.create({ model: 'o3', input: 'Plan the launch' })
  t.equal(first.output[0]?.type, 'reasoning', 'replica one handed team-a a reasoning item')
  const input = [...first.output, { role: 'user' as const, content: 'Go on' }] as OpenAI.Responses.ResponseInput

  redis.pause() // (a stopped Redis would come back empty, without the note: see "Output passed back")
  const generations = () => upstream.requests.filter(r => r.method === 'POST' && r.url === '/v1/responses').length
  const before = generations()
  for (const key of [KEY_A, KEY_B]) {
    const err = await sdk(two, key).responses.create({ model: 'o3', input }).catch((e: unknown) => e)
    t.type(err, OpenAI.InternalServerError, 'a 5xx, which the SDK retries')
    t.match(err, { status: 503, code: 'rate_limit_store_unavailable', type: 'server_error' })
    t.equal((err as InstanceType<typeof OpenAI.APIError>).headers?.get('x-ratelimit-remaining-requests') !== null, true,
      'it took its token (here from the local bucket), and says so')
  }
  t.equal(generations(), before, 'nothing went upstream')
  const refused = await eventually(async () => { const r = two.audit().filter(r => r.status === 503); return r.length === 2 && r }, 'both audited')
  t.match(refused, [{ clientId: 'team-a', outcome: 'unavailable', itemId: null }, { clientId: 'team-b', outcome: 'unavailable', itemId: null }])
  t.equal((await sdk(one, KEY_A).responses.create({ model: 'o3', input })).status, 'completed',
    'the replica that handed it out still knows it')

  redis.resume()
  await eventually(async () => (await respond(two, KEY_A, input)).status === 200, 'team-a served through replica two once Redis answers')
  t.equal((await respond(two, KEY_B, input)).status, 400, 'team-b is refused as before')
})

t.test('Redis full (noeviction), refusing writes but answering reads: an item the other replica handed out meanwhile, passed back, gets a 503 the SDK retries, not a 400', async t => {
  // The note of what replica one hands out cannot be written while Redis refuses writes; Redis still answers the
  // read for it, with nothing. Taken for "handed to no one", that would refuse the owner's loop its own item (400,
  // which the SDKs do not retry) on every other replica for as long as Redis is full.
  const { redis, one, two, sdk } = await twoGenerating(t, 2000)
  const passedBack = (output: OpenAI.Responses.ResponseOutputItem[]) =>
    [...output, { role: 'user' as const, content: 'Go on' }] as OpenAI.Responses.ResponseInput
  const noted = passedBack((await sdk(one, KEY_A).responses.create({ model: 'o3', input: 'Plan the launch' })).output)
  t.match(await redis.command('CONFIG SET maxmemory-policy noeviction'), /OK/)
  t.match(await redis.command('CONFIG SET maxmemory 1'), /OK/)
  const first = await sdk(one, KEY_A).responses.create({ model: 'o3', input: 'Plan the launch' })
  t.equal(first.output[0]?.type, 'reasoning', 'replica one handed team-a a reasoning item (open: from its local bucket)')
  const input = passedBack(first.output)
  // (team-b gets the same for an item Redis has a note of as team-a's: a 400 for it, beside a 503 for one with
  // none, would tell which ids went out to another team)
  for (const [key, items] of [[KEY_A, input], [KEY_B, input], [KEY_B, noted]] as const) {
    const err = await sdk(two, key).responses.create({ model: 'o3', input: items }).catch((e: unknown) => e)
    t.type(err, OpenAI.InternalServerError, 'a 5xx, which the SDK retries')
    t.match(err, { status: 503, code: 'rate_limit_store_unavailable', type: 'server_error' })
  }
  t.equal((await sdk(two, KEY_A).responses.create({ model: 'o3', input: noted })).status, 'completed',
    'an item of team-a\'s that Redis has a note of is still served through replica two')
  t.equal((await sdk(one, KEY_A).responses.create({ model: 'o3', input })).status, 'completed',
    'the replica that handed it out still knows it')

  t.match(await redis.command('CONFIG SET maxmemory 0'), /OK/)
  await eventually(async () => (await respond(one, KEY_A, input)).status === 200 && (await respond(two, KEY_A, input)).status === 200,
    'team-a served through replica two once Redis takes writes again')
  t.equal((await respond(two, KEY_B, input)).status, 400, 'team-b is refused as before')
})

t.test('in process, Redis not answering: an item named by id in a conversation is still found there; one that is not, or in a new conversation, gets 503', async t => {
  const [redis, upstream] = [await startRedis(t), await startUpstream()]
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 300 } }))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const conversation = await sdk.conversations.create({ items: [{ type: 'message', role: 'user', content: 'Plan the launch' }] })
  const items = await sdk.conversations.items.list(conversation.id)
  const inIt = items.data[0]!.id!

  redis.pause()
  const named = (id: string) => [{ type: 'item_reference' as const, id }, { role: 'user' as const, content: 'Go on' }]
  const served = await sdk.responses.create({ model: 'gpt-4o-mini', conversation: conversation.id, input: named(inIt) })
  t.equal(served.status, 'completed', 'an item of the conversation is checked upstream, as always')
  // (each caught as it is made: the second may be refused before the first, and a refusal nothing waits on yet
  // would be an unhandled rejection)
  const refusals = [
    sdk.responses.create({ model: 'gpt-4o-mini', conversation: conversation.id, input: named('msg_elsewhere') }),
    sdk.conversations.create({ items: [{ type: 'item_reference', id: 'msg_elsewhere' }] })
  ].map(async refusal => await refusal.catch((e: unknown) => e))
  for (const refusal of refusals) {
    t.match(await refusal, { status: 503, code: 'rate_limit_store_unavailable' },
      'not 404 item_not_found or 400 item_reference_not_allowed: Redis might know it as the client\'s')
  }
  redis.resume()
  const refused = await eventually(async () => {
    const err = await sdk.conversations.create({ items: [{ type: 'item_reference', id: 'msg_elsewhere' }] }).catch((e: unknown) => e)
    return (err as { status?: number }).status !== 503 && err
  }, 'Redis answers again')
  t.match(refused, { status: 400, code: 'item_reference_not_allowed' }, 'refused as before once Redis answers')
})

t.test('in process, Redis not answering: another team\'s item this replica handed out gets the 503 a made-up id gets, not a refusal that says it exists', async t => {
  // A stranger must not learn from the answer whether an id was handed out to another team (README, "Teams and
  // isolation"). With Redis down, an id this replica knows nothing of gets 503 (Redis might know it as the
  // caller's); so must one it knows as another team's, or the stranger tells the two apart by the status.
  const [redis, upstream] = [await startRedis(t), await startUpstream()]
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 300 } }))
  const sdk = (key: string) => new OpenAI({ apiKey: key, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const handedOut = (await sdk(KEYS.full).responses.create({ model: 'o3', input: 'Plan the launch' })).output[0]!.id!
  const own = await sdk(KEYS.other).conversations.create({})
  const named = (id: string) => [{ type: 'item_reference' as const, id }, { role: 'user' as const, content: 'Go on' }]
  // (the refusals as the client reads them, the id it named put aside: some quote it)
  const answers = async (id: string) => await Promise.all([
    sdk(KEYS.other).responses.create({ model: 'gpt-4o-mini', input: named(id) }),
    sdk(KEYS.other).responses.create({ model: 'gpt-4o-mini', conversation: own.id, input: named(id) })
  ].map(async call => await call.then(() => null, (e: unknown) => e as InstanceType<typeof OpenAI.APIError>)))
  const shape = (e: InstanceType<typeof OpenAI.APIError> | null) => ({ status: e?.status, error: e?.error })
  const shapes = async (id: string) => JSON.stringify((await answers(id)).map(shape)).replaceAll(id, '<id>')
  const madeUpId = 'rs_made_up_0123456789'
  t.equal(await shapes(handedOut), await shapes(madeUpId), 'Redis answering: the same refusals')

  redis.pause()
  const [another, madeUp] = [await answers(handedOut), await answers(madeUpId)]
  t.same(another.map(shape), madeUp.map(shape), 'Redis not answering: the same answers for another team\'s item and a made-up one')
  t.same(another.map(e => e?.headers?.get('retry-after')), madeUp.map(e => e?.headers?.get('retry-after')), 'with the same retry-after')
  t.match(madeUp, [{ status: 503, code: 'rate_limit_store_unavailable' }, { status: 503, code: 'rate_limit_store_unavailable' }])
  t.equal((await sdk(KEYS.full).responses.create({ model: 'o3', input: named(handedOut) })).status, 'completed',
    'its own team is served: this replica handed it out')
  const records = await eventually(async () => { const r = gw.audit().filter(r => r.clientId === 'team-other' && r.status === 503); return r.length === 4 && r }, 'audited')
  t.match(records.filter(r => r.itemId === handedOut), [{ outcome: 'denied', ownerId: 'team-full' }, { outcome: 'denied', ownerId: 'team-full' }],
    'the audit says whose item it was after')
  redis.resume()
})

/**
 * A budgeted client's `count` streamed generations under way when Redis (store.onFailure closed) goes down, and run to
 * their ends in the outage; then a call after them, by whose answer their charges have long been tried. The gateway.
 */
async function generationsEndingInAnOutage (t: Test, count: number) {
  const redis = await startRedis(t)
  const upstream = await startUpstream({ responses: { streamDelayMs: 20 } })
  t.teardown(() => upstream.close())
  const budget = { requestsPerMinute: 6000, burst: 1000, tokensPerMinute: 100_000 }
  const gw = await startGateway(t, testConfig(upstream.url, {
    store: { url: redis.url, timeoutMs: 2000, onFailure: 'closed' },
    clients: [{ id: 'team-budget', keySha256: keyDigest(KEYS.full), scopes: ['read', 'write'], rateLimit: budget }]
  }))
  const sdk = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const streams = await Promise.all(Array.from({ length: count }, async () => {
    const events = (await sdk.responses.create({ model: 'gpt-4o-mini', input: 'one two three four', stream: true }))[Symbol.asyncIterator]()
    await events.next() // under way
    return events
  }))
  await redis.stop()
  for (const events of streams) while (!(await events.next()).done);
  await eventually(async () => gw.audit().filter(r => r.action === 'response.create').length === count, `the ${count} calls ended`)
  t.equal((await fetch(`${gw.url}/v1/responses/resp_1`, { headers: { authorization: `Bearer ${KEYS.full}` } })).status, 503)
  return gw
}

t.test('in process, closed: generations that end while Redis is down give one warning that their usage could not be charged, not one each', async t => {
  // The outage itself is logged once per 10 s however many calls fail (README, "When Redis is down or slow"); the
  // calls in flight when it starts (up to limits.maxInFlight streams) end in it, each with usage to charge.
  const gw = await generationsEndingInAnOutage(t, 5)
  const uncharged = () => gw.logs.filter(l => l.includes('could not be charged')).map(l => JSON.parse(l) as { since: { calls: number } })
  t.equal(uncharged().length, 1, 'one warning at once, not one each')
  t.match(uncharged()[0], { clientId: 'team-budget' })
  // The calls after the first are told in one more line when the interval is over, whether or not any call fails
  // then (Redis may be back): else they would never be told.
  const told = () => uncharged().reduce((sum, line) => sum + line.since.calls, 0)
  await eventually(async () => told() === 5, 'every uncharged call is told', 15_000)
  t.equal(uncharged().length, 2, 'in two lines')
})

t.test('in process, closed: usage left uncharged in the last warning interval is told when the gateway stops', async t => {
  const gw = await generationsEndingInAnOutage(t, 3)
  await gw.app.close()
  const lines = gw.logs.filter(l => l.includes('could not be charged')).map(l => JSON.parse(l) as { since: { calls: number, tokens: number } })
  t.equal(lines.reduce((sum, line) => sum + line.since.calls, 0), 3, 'all three told by the time the gateway has stopped')
  t.ok(lines.every(line => line.since.tokens > 0))
})
