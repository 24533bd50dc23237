// The Redis store against a real redis-server: the same bucket rules as the memory store, shared by every
// store instance (replica) on one Redis, and what happens when Redis goes away, hangs, and comes back.
import { connect, createServer, type AddressInfo, type Socket } from 'node:net'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { createServer as createHttpServer } from 'node:http'
import { createServer as createTlsServer } from 'node:tls'
import t, { type Test } from 'tap'
import { StartupError } from '../src/preflight.js'
import { StoreUnavailableError, type BucketRule } from '../src/stores/rate-limit-store.js'
import { IssuedItems, ISSUED_TTL_MS } from '../src/ownership/issued.js'
import { KEY_PREFIX, RedisStore, type OnFailure, type StoreLogger } from '../src/stores/redis.js'
import { configFile, gatewayYaml, runAsync } from './fixtures/bin.js'
import { tempDir } from './fixtures/tmp.js'
import { eventually } from './fixtures/eventually.js'
import { startRedis, type RedisServer } from './fixtures/redis-server.js'

const sleep = (ms: number) => new Promise(resolve => setTimeout(resolve, ms))
/** one token a minute: refill cannot add a token while a test runs */
const SLOW: BucketRule = { requestsPerMinute: 1, burst: 5 }

interface Line { level: 'warn' | 'info', msg: string, obj: Record<string, unknown> }

function recorder (): StoreLogger & { lines: Line[] } {
  const lines: Line[] = []
  return {
    lines,
    warn (obj, msg) { lines.push({ level: 'warn', msg, obj: obj as Record<string, unknown> }) },
    info (obj, msg) { lines.push({ level: 'info', msg, obj: obj as Record<string, unknown> }) }
  }
}

// A generous timeout unless the test is about timeouts: on a loaded machine a healthy call can take over 50 ms.
async function store (t: Test, redis: RedisServer, { onFailure = 'open' as OnFailure, timeoutMs = 2000, url = redis.url } = {}) {
  const log = recorder()
  const s = await RedisStore.connect({ url, timeoutMs, onFailure, log })
  t.teardown(() => s.close())
  return Object.assign(s, { log })
}

t.test('a shared bucket serves exactly burst calls, then refuses with the time to the next token', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis)
  const rule = { requestsPerMinute: 60, burst: 5 }
  const results = []
  for (let i = 0; i < 6; i++) results.push(await s.take('a', rule))
  t.same(results.map(r => r.allowed), [true, true, true, true, true, false])
  t.same(results.map(r => r.remaining), [4, 3, 2, 1, 0, 0])
  t.equal(results[5]!.limit, 60)
  t.ok(results[5]!.retryAfterMs > 0 && results[5]!.retryAfterMs <= 1000, `retry after ${results[5]!.retryAfterMs} ms`)
  t.ok(results[4]!.resetMs > 4000 && results[4]!.resetMs <= 5000, `full again in ${results[4]!.resetMs} ms`)
})

t.test('tokens come back at requestsPerMinute, never above burst', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis)
  const rule = { requestsPerMinute: 600, burst: 2 } // a token every 100 ms
  await s.take('a', rule)
  await s.take('a', rule)
  const empty = await s.take('a', rule, 2)
  t.equal(empty.allowed, false, 'two tokens cannot be back yet')
  await sleep(empty.retryAfterMs + 50)
  t.equal((await s.take('a', rule, 2)).allowed, true, 'both back after the announced wait')
  await sleep(500)
  t.equal((await s.peek('a', rule)).remaining, 2, 'half a second idle refills to burst, not beyond')
})

t.test('many concurrent takes from two replicas never overdraw one bucket; other clients are untouched', async t => {
  const redis = await startRedis(t)
  const [a, b] = [await store(t, redis), await store(t, redis)]
  const calls = Array.from({ length: 60 }, (_, i) => (i % 2 === 0 ? a : b).take('team', SLOW))
  const results = await Promise.all(calls)
  t.equal(results.filter(r => r.allowed).length, 5, 'exactly burst over both')
  t.equal((await b.take('other', SLOW)).remaining, 4, 'another client has its own full bucket')
})

t.test('cost takes several tokens at once, or none', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis)
  const rule = { requestsPerMinute: 60, burst: 5 }
  t.equal((await s.take('a', rule, 3)).remaining, 2)
  const refused = await s.take('a', rule, 3)
  t.equal(refused.allowed, false)
  t.equal(refused.remaining, 2, 'a refused take takes nothing')
  t.ok(refused.retryAfterMs > 0 && refused.retryAfterMs <= 1000, 'the time for the one missing token')
  t.equal((await s.take('a', rule, 2)).allowed, true)
  t.equal((await s.take('a', rule, 6)).allowed, false, 'a cost above burst is never granted')
})

t.test('charge never refuses, may go into debt, and takes wait until refill pays it back', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis)
  // A token every 500 ms: the wait below is told from one a token shorter even when a loaded machine stalls this
  // process for up to half a second between the charge and the take (at one every 100 ms, 100 ms would do it).
  const rule = { requestsPerMinute: 120, burst: 5 }
  const charged = await s.charge('a', rule, 7)
  t.equal(charged.allowed, true)
  t.equal(charged.remaining, 0, 'in debt reads as 0 remaining')
  const refused = await s.take('a', rule)
  t.equal(refused.allowed, false)
  t.ok(refused.retryAfterMs > 1000 && refused.retryAfterMs <= 1500, `three tokens to wait for: ${refused.retryAfterMs} ms`)
  t.equal((await s.charge('a', rule, 1)).allowed, true, 'charging a bucket in debt still succeeds')
  await sleep(refused.retryAfterMs + 500 + 150) // (and the token charged since)
  t.equal((await s.take('a', rule)).allowed, true, 'served once refill covers the debt and the cost')
  await t.rejects(s.charge('a', rule, -1), RangeError)
  await t.rejects(s.take('a', rule, Number.NaN), RangeError)
})

t.test('buckets live under ogw:rl:<client id> and expire once they would be full again', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis)
  await s.take('team-a', { requestsPerMinute: 60, burst: 5 })
  t.match(await redis.command('KEYS *'), `${KEY_PREFIX}team-a`)
  const ttl = Number(/:(-?\d+)/.exec(await redis.command(`PTTL ${KEY_PREFIX}team-a`))![1])
  t.ok(ttl > 0 && ttl <= 2000, `PTTL ${ttl}: one token's refill (1 s) plus a second`)
  await s.charge('team-c', SLOW, 1e18)
  const longTtl = Number(/:(-?\d+)/.exec(await redis.command(`PTTL ${KEY_PREFIX}team-c`))![1])
  t.ok(longTtl > 1e12 - 60_000 && longTtl <= 1e12, `a debt of centuries still gets a TTL (${longTtl})`)
  t.same(s.log.lines, [], 'and no error: the calls were answered by Redis')
  await s.peek('team-b', SLOW)
  t.notMatch(await redis.command('KEYS *'), 'team-b', 'a peek writes nothing')
})

t.test('a bucket last written at a later Redis time (its clock stepped back since) is still capped at a lowered burst', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis)
  await s.take('team-a', { requestsPerMinute: 60, burst: 60 })
  // As if Redis's clock had been stepped back an hour since that call; then a reload lowers the burst to 3.
  await redis.command(`HSET ${KEY_PREFIX}team-a at ${Date.now() + 3_600_000}`)
  const lowered = { requestsPerMinute: 60, burst: 3 }
  const results = []
  for (let i = 0; i < 4; i++) results.push(await s.take('team-a', lowered))
  t.same(results.map(r => r.allowed), [true, true, true, false], 'three calls, the new burst, not 59 left of the old one')
})

t.test('open: Redis down → calls are served from local buckets, one warning, and sharing resumes by itself', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis)
  await s.take('a', SLOW)
  await redis.stop()
  const served = []
  for (let i = 0; i < 20; i++) served.push(await s.take('a', SLOW))
  t.equal(served.filter(r => r.allowed).length, 5, 'the local bucket holds the burst, starting full')
  t.equal((await s.peek('a', SLOW)).remaining, 0, 'peek reads the local bucket too')
  t.equal((await s.charge('a', SLOW, 1)).allowed, true, 'charge goes to the local bucket')
  const warnings = s.log.lines.filter(l => l.level === 'warn')
  t.equal(warnings.length, 1, 'one warning for the outage, not one per call')
  t.match(warnings[0]!.msg, /rate-limit store unavailable: serving from local in-memory buckets/)

  await redis.start()
  await eventually(async () => s.log.lines.some(l => l.msg.includes('recovered')), 'the recovery is logged')
  t.equal((await s.take('a', SLOW)).remaining, 4, 'the shared bucket is used again (empty Redis: full, minus one)')
  t.match(await redis.command('KEYS *'), `${KEY_PREFIX}a`)
  t.equal(s.log.lines.filter(l => l.msg.includes('recovered')).length, 1, 'the recovery is logged once')
})

t.test('closed: Redis down → calls are refused; they work again when Redis is back', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis, { onFailure: 'closed' })
  t.equal((await s.take('a', SLOW)).allowed, true)
  await redis.stop()
  for (let i = 0; i < 5; i++) await t.rejects(s.take('a', SLOW), StoreUnavailableError)
  await t.rejects(s.peek('a', SLOW), StoreUnavailableError)
  await t.rejects(s.charge('a', SLOW, 1), StoreUnavailableError)
  t.equal(s.log.lines.filter(l => l.level === 'warn').length, 1, 'one warning')
  t.match(s.log.lines[0]!.msg, /refusing calls with 503/)
  await redis.start()
  const back = await eventually(() => s.take('a', SLOW).catch(() => null), 'a take succeeds again')
  t.equal(back.remaining, 4)
})

t.test('a hung Redis costs each call at most the store timeout: served locally (open) or refused (closed)', async t => {
  const redis = await startRedis(t)
  const open = await store(t, redis, { timeoutMs: 30 })
  const closed = await store(t, redis, { timeoutMs: 30, onFailure: 'closed' })
  redis.pause()
  t.teardown(() => { redis.resume() })
  // Without a command timeout these would wait on the open socket until the connection is given up as stalled
  // (2 s). The bound below is loose on purpose: it tells the 30 ms timeout from the stall cutoff, nothing finer.
  const started = Date.now()
  const results = await Promise.all(Array.from({ length: 10 }, () => open.take('a', SLOW)))
  t.ok(Date.now() - started < 1500, 'answered before the stall cutoff')
  t.equal(results.filter(r => r.allowed).length, 5, 'answered from the local bucket')
  await t.rejects(closed.take('b', SLOW), { name: 'StoreUnavailableError', message: /timed out/ })
  t.equal(open.log.lines.filter(l => l.level === 'warn').length, 1)
  redis.resume()
  await eventually(async () => {
    await open.take('a', SLOW)
    return open.log.lines.some(l => l.msg.includes('recovered'))
  }, 'the shared bucket answers again')
  // The timed-out takes sat in the socket and ran once Redis woke up: they drained the shared bucket too.
  // A hang errs on the strict side.
  t.equal((await open.take('a', SLOW)).allowed, false, 'the shared bucket counted the calls that timed out')
})

t.test('a call made while an earlier one waits on a hung Redis still waits at most one store timeout', async t => {
  // With ioredis auto-pipelining (one batch at a time) and its command timeout (started when a command is sent), the
  // second call below would go out only when the first times out, and take about two timeouts less the 50 ms between.
  const redis = await startRedis(t)
  const timeoutMs = 1000
  const s = await store(t, redis, { timeoutMs })
  t.equal((await s.take('a', SLOW)).allowed, true, 'a healthy Redis answers')
  redis.pause()
  t.teardown(() => { redis.resume() })
  const first = s.take('a', SLOW)
  await sleep(50)
  const started = Date.now()
  const second = await s.take('a', SLOW)
  const took = Date.now() - started
  t.equal(second.allowed, true, 'served from the local bucket')
  t.ok(took < 1.5 * timeoutMs, `answered in ${took} ms, within one store.timeoutMs (${timeoutMs} ms) and a loaded machine's margin`)
  t.equal((await first).allowed, true)
})

t.test('a Redis that is down at start does not stop the store; it connects when Redis comes up', async t => {
  const redis = await startRedis(t)
  await redis.stop()
  const s = await store(t, redis, { onFailure: 'closed' })
  t.match(s.log.lines.filter(l => l.level === 'warn'), [{ msg: /rate-limit store unavailable: refusing calls/ }], 'the outage said at once, once')
  await t.rejects(s.take('a', SLOW), StoreUnavailableError)
  await redis.start()
  await eventually(() => s.take('a', SLOW).catch(() => null), 'connected')
  t.pass('connected by itself')
})

t.test('a store closed while Redis is down leaves no timer behind to hold the process (a stop in an outage is not held)', async t => {
  // ioredis ends the connection's socket and destroys it 2 s later unless it closes first: one already closed, Redis
  // being down, never closes again, and that timer held a stopping gateway 2 s past its drain.
  const redis = await startRedis(t)
  const timers = () => process.getActiveResourcesInfo().filter(r => r === 'Timeout').length
  const before = timers()
  const s = await RedisStore.connect({ url: redis.url, timeoutMs: 2000, onFailure: 'open', log: recorder() })
  await redis.stop()
  await eventually(async () => !s.available(), 'the outage seen')
  await s.close()
  await sleep(1) // (after any timer the close set for at once)
  t.equal(timers(), before, 'no timer of the store\'s is left')
})

t.test('a password in the URL authenticates, and is never logged; a wrong one refuses the start, saying why without it', async t => {
  const password = 'pw-S3cret/with:odd@chars'
  const redis = await startRedis(t, { password })
  const s = await store(t, redis)
  t.equal((await s.take('a', SLOW)).allowed, true)
  t.same(s.log.lines, [], 'nothing to log with the right password')
  await s.close()

  // (no reconnection would ever be let in: the start is refused, not a gateway whose buckets are never shared)
  const log = recorder()
  const wrong = RedisStore.connect({ url: redis.url.replace(encodeURIComponent(password), 'wrong-Pa55word'), timeoutMs: 2000, onFailure: 'open', log })
  const err = await wrong.catch((e: unknown) => e)
  t.type(err, StartupError, 'said in one line, as start says any problem it cannot start with')
  t.match((err as Error).message, /^store\.url: Redis refused the user or password given in it \((WRONGPASS|NOAUTH)/)
  t.notOk(log.lines.some(l => /rate-limit store unavailable/.test(l.msg)),
    'no line that says the gateway serves on (from local buckets) before the start is refused')
  const said = `${(err as Error).message} ${JSON.stringify(log.lines)}`
  t.notMatch(said, 'wrong-Pa55word')
  t.notMatch(said, 'S3cret')
  await eventually(async () => (await redis.command('CLIENT LIST')).split('\n').filter(l => l.includes('cmd=')).length === 1,
    'its connection closed (only the probe itself is connected)')
})

t.test('an ACL user that may not run the bucket script (or a command in it), or whose keys leave out store.keyPrefix, refuses the start; one with what it needs is served', async t => {
  const redis = await startRedis(t, { password: 'admin-pw' })
  const port = redis.port
  const user = async (name: string, rules: string) => {
    t.match(await redis.command(`ACL SETUSER ${name} on >pw-${name} ${rules}`), /OK/)
    return `redis://${name}:pw-${name}@127.0.0.1:${port}/0`
  }
  const needs = '+evalsha +eval +script +time +hmget +hset +pexpire +set +mget +ping +hello +auth'
  const refused = {
    'no EVALSHA or EVAL': await user('noscript', `~ogw:* ${needs.replace('+evalsha +eval ', '')}`),
    'no HSET, which the script calls': await user('nohset', `~ogw:* ${needs.replace('+hset ', '')}`),
    'no SET, for the notes of items handed out': await user('noset', `~ogw:* ${needs.replace('+set ', '')}`),
    'keys of another prefix only': await user('otherkeys', '~other:* +@all')
  }
  for (const [what, url] of Object.entries(refused)) {
    await t.rejects(RedisStore.connect({ url, timeoutMs: 2000, onFailure: 'open', log: recorder() }),
      { message: /^store\.url: the user given in it may not run what the gateway needs \((NOPERM|ERR The user executing the script can't run)/ }, what)
  }
  const enough = await user('gateway', `~ogw:* ${needs}`) // (not INFO either: ioredis skips its ready check, and says so)
  const log = recorder()
  const s = await RedisStore.connect({ url: enough, timeoutMs: 2000, onFailure: 'closed', log })
  t.teardown(() => s.close())
  t.equal((await s.take('a', SLOW)).allowed, true, 'what it needs, and nothing more: served from the shared bucket')
})

t.test('a read-only replica, or a Redis Cluster node that leaves slots to other nodes, refuses the start; a cluster of one shard serves', async t => {
  const primary = await startRedis(t)
  const replica = await startRedis(t)
  t.match(await replica.command(`REPLICAOF 127.0.0.1 ${primary.port}`), /OK/)
  for (const onFailure of ['open', 'closed'] as const) {
    await t.rejects(RedisStore.connect({ url: replica.url, timeoutMs: 2000, onFailure, log: recorder() }),
      { message: /^store\.url: it leads to a read-only replica \(role: slave\)/ }, `${onFailure}: every bucket write would be refused`)
  }

  const node = await startRedis(t, { args: ['--cluster-enabled', 'yes'] })
  t.match(await node.command('CLUSTER ADDSLOTSRANGE 0 8191'), /OK/)
  await t.rejects(RedisStore.connect({ url: node.url, timeoutMs: 2000, onFailure: 'open', log: recorder() }),
    { message: /^store\.url: it leads to a Redis Cluster node serving 8192 of the 16384 slots/ })

  const oneShard = await startRedis(t, { args: ['--cluster-enabled', 'yes'] })
  t.match(await oneShard.command('CLUSTER ADDSLOTSRANGE 0 16383'), /OK/)
  await eventually(async () => (await oneShard.command('CLUSTER INFO')).includes('cluster_state:ok'), 'the one-shard cluster is up')
  const s = await store(t, oneShard, { onFailure: 'closed' })
  t.equal((await s.take('a', SLOW)).allowed, true, 'every key is that node\'s: served from the shared bucket')

  // An ACL user that may not ask CLUSTER NODES: nothing is known against it (as for one that may not ask INFO),
  // not "a node serving 0 of the 16384 slots", a start refused for a reason that is not true.
  t.match(await oneShard.command('ACL SETUSER gateway on >pw-gateway ~ogw:* +@all -cluster'), /OK/)
  const noCluster = await store(t, oneShard, { onFailure: 'closed', url: `redis://gateway:pw-gateway@127.0.0.1:${oneShard.port}/0` })
  t.equal((await noCluster.take('b', SLOW)).allowed, true, 'a user without CLUSTER on a cluster of one shard: served from the shared bucket')
})

/**
 * The address the gateway is given for Redis (a DNS name, a cloud provider's primary endpoint): a connection
 * made to it goes to whichever node `target` names at that moment, and stays with that node.
 */
async function endpoint (t: Test, port: number): Promise<{ url: string, moveTo (port: number): void }> {
  let target = port
  const sockets = new Set<Socket>()
  const server = createServer(client => {
    const node = connect(target, '127.0.0.1')
    for (const s of [client, node]) {
      sockets.add(s)
      s.on('error', () => { client.destroy(); node.destroy() })
      s.on('close', () => { sockets.delete(s); client.destroy(); node.destroy() })
    }
    client.pipe(node).pipe(client)
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    for (const s of sockets) s.destroy()
    server.close()
  })
  return {
    url: `redis://127.0.0.1:${(server.address() as AddressInfo).port}/0`,
    moveTo (port) { target = port }
  }
}

/**
 * Two Redis servers behind one address, a store on it that has taken once, and then a failover: the old primary
 * follows the new one (and refuses writes); the address still leads to the old one.
 */
async function failedOver (t: Test, onFailure: OnFailure) {
  const oldPrimary = await startRedis(t)
  const newPrimary = await startRedis(t)
  const redis = await endpoint(t, oldPrimary.port)
  const s = await store(t, oldPrimary, { onFailure, url: redis.url })
  t.equal((await s.take('a', SLOW)).remaining, 4)
  t.match(await oldPrimary.command(`REPLICAOF 127.0.0.1 ${newPrimary.port}`), /OK/)
  return { newPrimary, redis, s }
}

t.test('a Redis that quotes the handshake in its errors (AUTH renamed away) never has store.url\'s password logged', async t => {
  // Redis answers an unknown command with its arguments ("unknown command 'auth', with args beginning with: ..."), and
  // ioredis's handshake is HELLO 3 AUTH <user> <password>, then AUTH <user> <password> where HELLO is unknown.
  const redis = await startRedis(t, { args: ['--rename-command', 'HELLO', '', '--rename-command', 'AUTH', ''] })
  const password = 'pw-Zq8vR4kT2mX7'
  const rule = { requestsPerMinute: 60, burst: 5 }
  for (const [url, onFailure] of [
    [`redis://usr:${password}@127.0.0.1:${redis.port}/0`, 'closed'],
    [`redis://:${encodeURIComponent(password).replace('-', '%2D')}@127.0.0.1:${redis.port}/0`, 'open']
  ] as const) {
    const log = recorder()
    const said = await RedisStore.connect({ url, timeoutMs: 2000, onFailure, log })
      .then(async started => {
        t.teardown(() => started.close())
        return await started.take('a', rule).then(() => 'served', (err: Error) => err.message)
      }, (err: Error) => err.message)
    await eventually(async () => log.lines.length > 0, 'the store\'s failure is logged')
    const out = JSON.stringify([said, log.lines])
    t.match(out, /unknown command 'auth'/, `${onFailure}: the reason is logged`)
    t.notOk(out.includes(password.slice(3, 11)), `${onFailure}: no part of the password in the log or the error: ${out}`)
  }
})

t.test('a store.url whose port leads to a server that is not Redis (an HTTP server, another service) refuses the start, saying so', async t => {
  // (a wrong port: the replica would otherwise run with every call refused, closed, or its buckets never shared,
  // open, said only in a warning every 10 s that Redis is unavailable)
  const sockets = new Set<Socket>()
  const track = (socket: Socket) => { sockets.add(socket); socket.on('close', () => sockets.delete(socket)) }
  // one that answers and keeps the connection, and Node's HTTP server, which answers 400 and hangs up at once
  const answers = createServer(socket => {
    track(socket)
    socket.on('data', () => { socket.write('HTTP/1.1 400 Bad Request\r\n\r\n') })
  })
  const http = createHttpServer(() => {})
  http.on('connection', track)
  for (const server of [answers, http]) {
    await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
    t.teardown(() => { for (const s of sockets) s.destroy(); server.close() })
    const url = `redis://127.0.0.1:${(server.address() as AddressInfo).port}/0`
    for (const onFailure of ['open', 'closed'] as const) {
      const refused = await RedisStore.connect({ url, timeoutMs: 2000, onFailure, log: recorder() })
        .then(async started => { await started.close(); return null }, (err: unknown) => err)
      t.type(refused, StartupError, `${onFailure}: no reconnection would ever find a Redis there`)
      t.match((refused as Error | null)?.message,
        /^store\.url: it leads to a server that does not speak Redis's protocol \(its answer began with "H"\): give the Redis server's address and port$/)
    }
    await eventually(async () => sockets.size === 0, 'its connections closed, not tried again')
  }
})

t.test('rediss:// to a server whose certificate is not trusted (a private CA not given) refuses the start, saying so', async t => {
  // (reconnecting meets the same certificate: the replica would run with every call refused, closed, or its buckets
  // never shared, open, said only in a warning every 10 s)
  const fixtures = new URL('./fixtures/tls/', import.meta.url)
  const server = createTlsServer({ key: readFileSync(new URL('server.key', fixtures)), cert: readFileSync(new URL('server.pem', fixtures)) },
    socket => { socket.on('data', () => { socket.write('+OK\r\n') }) })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => server.close())
  const url = `rediss://127.0.0.1:${(server.address() as AddressInfo).port}/0`
  const refused = await RedisStore.connect({ url, timeoutMs: 2000, onFailure: 'closed', log: recorder() })
    .then(async started => { await started.close(); return null }, (err: unknown) => err)
  t.type(refused, StartupError)
  t.match((refused as Error | null)?.message,
    /^store\.url: its server's TLS certificate was refused \((?:unable to verify the first certificate|self[- ]signed certificate in certificate chain)(?:; [^)]*)?\): add the CA that signed it with NODE_EXTRA_CA_CERTS, or give the host name it is for$/i)
})

t.test('rediss:// to a server whose certificate is trusted but has a key too weak (Node 24 refuses RSA under 2048 bits) refuses the start, saying so', async t => {
  // OpenSSL refuses the certificate itself, whatever CA signed it, and Node has no code of its own for why: taken
  // for an outage, the replica ran with its buckets never shared, or every call refused. A 768-bit key, refused on
  // Node 20 too (its floor is 1024 bits), trusted through NODE_EXTRA_CA_CERTS, which Node reads only at start.
  const fixtures = new URL('./fixtures/tls/', import.meta.url)
  const server = createTlsServer({ key: readFileSync(new URL('weak.key', fixtures)), cert: readFileSync(new URL('weak.pem', fixtures)), ciphers: 'DEFAULT@SECLEVEL=0' },
    socket => { socket.on('data', () => { socket.write('+OK\r\n') }) })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => server.close())
  const auditDir = tempDir('gw-weak-cert-')
  const { file } = configFile(gatewayYaml(join(auditDir, 'audit.jsonl')) +
    `store: { url: "rediss://127.0.0.1:${(server.address() as AddressInfo).port}/0", onFailure: open }\n`)
  const start = await runAsync(['start', '--config', file], { NODE_EXTRA_CA_CERTS: new URL('weak.pem', fixtures).pathname }, 10_000)
  t.equal(start.status, 1, `start refused (${start.stderr.trim()})`)
  t.match(start.stderr, /store\.url: its server's TLS certificate was refused \(EE certificate key too weak\), whatever CA signed it: give the server one with a stronger key/)
  t.same(readdirSync(auditDir), [], 'no audit file opened')
})

t.test('a failover that leaves the old primary a read-only replica: the store reconnects and finds the new primary', async t => {
  const { newPrimary, redis, s } = await failedOver(t, 'closed')
  // The endpoint now names the new primary.
  redis.moveTo(newPrimary.port)
  await t.rejects(s.take('a', SLOW), { name: 'StoreUnavailableError', message: /READONLY/ },
    'the call that meets the read-only node is refused (closed)')
  // Without a reconnect the connection stays with the old node, which answers every call READONLY: 503 for
  // good with `closed`, buckets that are not shared for good with `open`, until someone restarts the gateway.
  const back = await eventually(() => s.take('a', SLOW).catch(() => null), 'a take served by the new primary', 5_000)
  t.equal(back.remaining, 4, 'the new primary\'s bucket (it started empty: full, minus this call)')
  t.match(await newPrimary.command('KEYS *'), `${KEY_PREFIX}a`)
  t.ok(s.log.lines.some(l => l.msg.includes('recovered')), 'the recovery is logged')
})

t.test('many calls refused READONLY at once make one reconnect, not one each (no listener-leak warnings on stderr)', async t => {
  // While a failover's address still leads to the old primary, every call of a burst meets READONLY. Asking
  // ioredis for a reconnect on each of them added a close listener and a timer per call to the one socket: Node's
  // MaxListenersExceededWarning, in plain text on stderr, about every reconnect for as long as the address lags.
  const { newPrimary, redis, s } = await failedOver(t, 'open')
  const warnings: string[] = []
  const onWarning = (w: Error) => { warnings.push(w.name) }
  process.on('warning', onWarning)
  t.teardown(() => { process.off('warning', onWarning) })
  for (let round = 0; round < 3; round++) {
    const results = await Promise.all(Array.from({ length: 20 }, () => s.take(`c${round}`, SLOW)))
    t.equal(results.filter(r => r.allowed).length, 5, 'open: served from the local bucket')
    await sleep(300) // connected again, to the same read-only node
  }
  await sleep(50) // (warnings are emitted on the next tick)
  t.same(warnings.filter(name => name === 'MaxListenersExceededWarning'), [])
  // Each burst still asked for a new connection: once the address leads to the new primary, the next one is there.
  redis.moveTo(newPrimary.port)
  await eventually(async () => {
    await s.take('z', SLOW)
    return (await newPrimary.command('KEYS *')).includes(`${KEY_PREFIX}z`)
  }, 'a take served by the new primary', 5_000)
})

t.test('a database number the Redis does not have: calls never fall through to database 0 (another deployment\'s)', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis, { onFailure: 'closed', url: redis.url.replace(/\/0$/, '/99') })
  // The Redis client goes on after its SELECT is refused: give it the moment it takes to call itself ready.
  await sleep(300)
  await t.rejects(s.take('team-a', SLOW), { name: 'StoreUnavailableError', message: /DB index is out of range/ },
    'refused (closed), saying why')
  t.equal(s.available(), false, '/readyz says store_unavailable')
  t.notMatch(await redis.command('KEYS *'), 'team-a', 'nothing was written to database 0')
  const logged = JSON.stringify(s.log.lines)
  t.match(logged, /DB index is out of range/)
  t.notMatch(logged, /recovered/, 'the log never says the buckets are shared')

  const open = await store(t, redis, { url: redis.url.replace(/\/0$/, '/99') })
  await sleep(300)
  t.equal((await open.take('team-a', SLOW)).remaining, 4, 'open: served from the local bucket')
  t.notMatch(await redis.command('KEYS *'), 'team-a', 'still nothing in database 0')
})

// available() (so /readyz with onFailure closed) does not look only at the connection: a Redis that is connected but
// refuses every bucket write (OOM under maxmemory with the default noeviction policy) would get every call 503 while
// /readyz said ready. Once unready the replica gets no calls, so the store probes Redis itself to come back.
t.test('closed: a Redis that refuses every bucket write (OOM) makes the store unavailable for /readyz, until it accepts them again', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis, { onFailure: 'closed' })
  t.equal((await s.take('a', SLOW)).allowed, true)
  t.match(await redis.command('CONFIG SET maxmemory-policy noeviction'), /OK/)
  t.match(await redis.command('CONFIG SET maxmemory 1'), /OK/)
  await t.rejects(s.take('a', SLOW), { name: 'StoreUnavailableError', message: /OOM/ }, 'every call is refused')
  t.equal(s.available(), false, '/readyz says store_unavailable')
  t.match(await redis.command('CONFIG SET maxmemory 0'), /OK/)
  await eventually(async () => s.available(), 'available again without any call (the store probes Redis)')
  // Out of rotation, the replica gets no call to find that out: the probe ends the outage, in the log too (else a
  // later outage would be logged as this one going on, its downMs and failedCalls counted from here).
  t.match(s.log.lines.map(l => l.msg), [/^rate-limit store unavailable/, /^rate-limit store recovered/], 'the outage and its end are logged')
  t.equal((await s.take('a', SLOW)).allowed, true, 'calls are served from the shared bucket again')
})

t.test('a Redis already full (OOM) when the store connects: unavailable from the start, and said, not found out by the first call', async t => {
  const redis = await startRedis(t)
  t.match(await redis.command('CONFIG SET maxmemory-policy noeviction'), /OK/)
  t.match(await redis.command('CONFIG SET maxmemory 1'), /OK/)
  const s = await store(t, redis, { onFailure: 'closed' })
  t.equal(s.available(), false, '/readyz says store_unavailable before any call is let in')
  t.match(s.log.lines, [{ level: 'warn', msg: /^rate-limit store unavailable/, obj: { reason: /^OOM/ } }], 'the outage is logged at start')
  t.match(await redis.command('CONFIG SET maxmemory 0'), /OK/)
  await eventually(async () => s.available(), 'available once Redis takes writes, without any call')
  t.match(s.log.lines.map(l => l.msg), [/^rate-limit store unavailable/, /^rate-limit store recovered/])
  t.equal((await s.take('a', SLOW)).allowed, true, 'served from the shared bucket')
})

t.test('a Redis already full (OOM) at start: a user without SET or MGET is refused all the same; one without a command the script calls after its write is told once Redis takes writes', async t => {
  // Redis checks a user's ACL before its memory: SET answers NOPERM, not OOM, to a user without it. The start asked
  // SET only after the script, which a full Redis refuses: such a user started, and its notes failed for ever.
  const redis = await startRedis(t, { password: 'admin-pw' })
  const user = async (name: string, rules: string) => {
    t.match(await redis.command(`ACL SETUSER ${name} on >pw-${name} ${rules}`), /OK/)
    return `redis://${name}:pw-${name}@127.0.0.1:${redis.port}/0`
  }
  const needs = '+evalsha +eval +script +time +hmget +hset +pexpire +set +mget +ping +hello +auth'
  const noSet = await user('noset', `~ogw:* ${needs.replace('+set ', '')}`)
  const noMget = await user('nomget', `~ogw:* ${needs.replace('+mget ', '')}`)
  // (the script's last command: a full Redis refuses the HSET before it, as OOM)
  const noPexpire = await user('nopexpire', `~ogw:* ${needs.replace('+pexpire ', '')}`)
  t.match(await redis.command('CONFIG SET maxmemory-policy noeviction'), /OK/)
  t.match(await redis.command('CONFIG SET maxmemory 1'), /OK/)
  for (const [what, url] of [['no SET', noSet], ['no MGET', noMget]]) {
    await t.rejects(RedisStore.connect({ url: url!, timeoutMs: 2000, onFailure: 'closed', log: recorder() }),
      { message: /^store\.url: the user given in it may not run what the gateway needs \(NOPERM/ }, `${what}: refused though Redis is full`)
  }
  const log = recorder()
  const s = await RedisStore.connect({ url: noPexpire, timeoutMs: 2000, onFailure: 'closed', log })
  t.teardown(() => s.close())
  t.equal(s.available(), false, 'full: unavailable, and its script stopped before PEXPIRE')
  t.match(await redis.command('CONFIG SET maxmemory 0'), /OK/)
  const told = await eventually(async () => log.lines.find(l => /may not run what the gateway needs/.test(l.msg)), 'told once Redis runs the script')
  t.match(told, { level: 'warn', obj: { reason: /can't run this command|NOPERM/ } })
  t.equal(s.available(), false, 'still unavailable')
  await new Promise(resolve => setTimeout(resolve, 2500))
  t.equal(log.lines.filter(l => /may not run what the gateway needs/.test(l.msg)).length, 1, 'said once, not at every heartbeat')
})

t.test('a Redis that refuses writes (OOM) and drops the connection: connecting again is no recovery while it still refuses', async t => {
  const redis = await startRedis(t)
  const s = await store(t, redis, { onFailure: 'closed' })
  t.match(await redis.command('CONFIG SET maxmemory-policy noeviction'), /OK/)
  t.match(await redis.command('CONFIG SET maxmemory 1'), /OK/)
  await t.rejects(s.take('a', SLOW), { name: 'StoreUnavailableError', message: /OOM/ })
  const clientIds = async () => [...(await redis.command('CLIENT LIST')).matchAll(/^id=(\d+).* cmd=(?!client\|list)/gm)].map(m => m[1])
  const [before] = await clientIds()
  t.match(await redis.command('CLIENT KILL TYPE normal'), /:\d/)
  await eventually(async () => (await clientIds()).some(id => id !== before), 'connected again')
  await sleep(300) // (its handshake answered: ready)
  t.equal(s.available(), false, 'still refusing')
  t.notOk(s.log.lines.some(l => l.msg.includes('recovered')), 'no "buckets are shared again" while every call is refused')
  t.match(await redis.command('CONFIG SET maxmemory 0'), /OK/)
  await eventually(async () => s.available(), 'available once Redis takes writes')
  t.equal(s.log.lines.filter(l => l.msg.includes('recovered')).length, 1, 'the recovery is logged then, once')
})

t.test('an answer Redis gave in time is used even when this process was too busy to read it before store.timeoutMs', async t => {
  // A burst of calls on one replica keeps its event loop busy past the store timeout while Redis answers at once:
  // judged by the loop's own delay, or sent only once the loop is free, each call would fall back to the local bucket
  // (open: a team gets its burst again from every replica) or be refused (closed: 503 with Redis healthy).
  const redis = await startRedis(t)
  const open = await store(t, redis, { timeoutMs: 30 })
  const closed = await store(t, redis, { timeoutMs: 30, onFailure: 'closed' })
  const rule: BucketRule = { requestsPerMinute: 1, burst: 2 }
  await open.take('warm', rule) // (each connection has loaded the script)
  await closed.take('warm', rule)
  const busy = (ms: number) => { const until = Date.now() + ms; while (Date.now() < until); }
  // Redis busy for 100 ms: the first call is still unanswered when the burst's next calls are made.
  const slow = redis.command('EVAL "local s = redis.call(\'TIME\') repeat local n = redis.call(\'TIME\') until (n[1] - s[1]) * 1000000 + n[2] - s[2] > 100000" 0')
  await sleep(20)
  const first = open.take('a', rule)
  await new Promise(resolve => setImmediate(resolve))
  const later = [open.take('a', rule), closed.take('a', rule)]
  busy(400) // Redis answers meanwhile; the answers wait in the socket until the loop is free
  const [one, two, three] = await Promise.all([first, ...later])
  await slow
  t.equal(one!.allowed, true)
  t.equal(two!.allowed, true)
  t.equal(three!.allowed, false, 'the third call of a burst of 2 is refused, from the shared bucket')
  t.equal(open.log.lines.length + closed.log.lines.length, 0, 'no outage was seen')
})

/** What `issuedTo` answers, its set as a list. */
async function issuedTo (items: IssuedItems, ids: string[], owner: string): Promise<{ handedOut: string[], unanswered: boolean }> {
  const { handedOut, unanswered } = await items.issuedTo(ids, owner)
  return { handedOut: [...handedOut], unanswered }
}
const answered = (handedOut: string[]) => ({ handedOut, unanswered: false })

t.test('issued items: one replica\'s note is read by another, under the key prefix, for 30 days; Redis gone costs at most the store timeout', async t => {
  const redis = await startRedis(t)
  const [s1, s2] = [await store(t, redis), await store(t, redis, { timeoutMs: 200 })]
  const one = new IssuedItems({ max: 10, shared: s1, log: s1.log })
  const two = new IssuedItems({ max: 10, shared: s2, log: s2.log })
  one.note(['rs_a1', 'rs_a2'], 'team-a')
  await eventually(async () => (await redis.command('KEYS *')).includes(`${KEY_PREFIX}issued:rs_a2`), 'the notes reach Redis')
  const ttl = Number(/:(-?\d+)/.exec(await redis.command(`PTTL ${KEY_PREFIX}issued:rs_a1`))![1])
  t.ok(ttl > ISSUED_TTL_MS - 60_000 && ttl <= ISSUED_TTL_MS, `PTTL ${ttl}: 30 days`)
  t.same(await issuedTo(two, ['rs_a1', 'rs_a2', 'rs_x'], 'team-a'), answered(['rs_a1', 'rs_a2']), 'the other replica reads what this one handed team-a')
  t.same(await issuedTo(two, ['rs_a1', 'rs_x'], 'team-b'), answered([]), 'and nothing of it is team-b\'s')

  two.note(['rs_b1'], 'team-b')
  await redis.stop()
  t.same(await issuedTo(two, ['rs_b1', 'rs_a1', 'rs_gone'], 'team-b'), { handedOut: ['rs_b1'], unanswered: true },
    'Redis down: what this replica knows still answers, and it says Redis could not answer for the rest')
  t.same(await issuedTo(one, ['rs_b1'], 'team-b'), { handedOut: [], unanswered: true },
    'what it does not know is not among them, and not known to be another\'s either (the call gets 503, not a refusal)')
  one.note(['rs_a3'], 'team-a') // a note Redis cannot take: no rejection escapes
  await sleep(50)
  const warnings = s1.log.lines.filter(l => l.msg.startsWith('issued items:'))
  t.equal(warnings.length, 1, 'one warning for the failed calls, not one each')
})

t.test('issued items: a note Redis did not take (refused a moment, or the connection lost) is written once it takes notes again', async t => {
  // Without it, the item handed out in that moment stays unknown to every other replica for good (30 days):
  // each later call of the client's loop that lands there, passing the output back, is refused.
  const redis = await startRedis(t)
  const [s1, s2] = [await store(t, redis), await store(t, redis)]
  const one = new IssuedItems({ max: 10, shared: s1, log: s1.log })
  const two = new IssuedItems({ max: 10, shared: s2, log: s2.log })
  t.match(await redis.command('CONFIG SET maxmemory-policy noeviction'), /OK/)
  t.match(await redis.command('CONFIG SET maxmemory 1'), /OK/)
  const refused = async () => Number(/errorstat_OOM:count=(\d+)/.exec(await redis.command('INFO errorstats'))?.[1] ?? 0)
  one.note(['rs_a1'], 'team-a')
  await eventually(async () => await refused() === 1, 'Redis refuses the note')
  // Still refused: the next answer's note, and rs_a1's again (kept for later, not dropped), with no more warnings.
  one.note(['rs_a2'], 'team-a')
  await eventually(async () => await refused() === 3, 'Redis refuses both')
  t.equal(s1.log.lines.filter(l => l.msg.startsWith('issued items: Redis could not note')).length, 1, 'one warning')
  t.match(await redis.command('CONFIG SET maxmemory 0'), /OK/)
  t.same(await issuedTo(two, ['rs_a1', 'rs_a2'], 'team-a'), answered([]), 'the other replica does not know them yet')

  // The client passes them back through replica one: Redis takes notes again.
  t.same(await issuedTo(one, ['rs_a1', 'rs_a2'], 'team-a'), answered(['rs_a1', 'rs_a2']), 'replica one knows them')
  await eventually(async () => (await redis.command(`EXISTS ${KEY_PREFIX}issued:rs_a1 ${KEY_PREFIX}issued:rs_a2`)).includes(':2'),
    'the missed notes reach Redis')
  t.same(await issuedTo(two, ['rs_a1', 'rs_a2'], 'team-a'), answered(['rs_a1', 'rs_a2']), 'and the other replica reads them')
  const ttl = Number(/:(-?\d+)/.exec(await redis.command(`PTTL ${KEY_PREFIX}issued:rs_a1`))![1])
  t.ok(ttl > 0 && ttl <= ISSUED_TTL_MS, `PTTL ${ttl}: what is left of its 30 days`)
})

/** A Redis of its own, a store on it, and two notes of team-a written there by an IssuedItems. */
async function twoNotesInRedis (t: Test) {
  const redis = await startRedis(t)
  const s1 = await store(t, redis)
  const one = new IssuedItems({ max: 10, shared: s1, log: s1.log })
  t.teardown(() => { one.close() })
  one.note(['rs_a1', 'rs_a2'], 'team-a')
  await eventually(async () => (await redis.command(`EXISTS ${KEY_PREFIX}issued:rs_a2`)).includes(':1'), 'the notes reach Redis')
  return { redis, s1 }
}

t.test('issued items: a connection dropped and made again to a Redis that kept its data writes no note again', async t => {
  // Each replica would otherwise write every note it knows (up to ownership.cacheSize) after every network blip.
  const { redis } = await twoNotesInRedis(t)
  await redis.command(`DEL ${KEY_PREFIX}issued:rs_a1`) // (gone by hand: only a rewrite of every note would bring it back)
  const sets = async () => Number(/cmdstat_set:calls=(\d+)/.exec(await redis.command('INFO commandstats'))?.[1] ?? 0)
  const before = await sets()
  await redis.command('CLIENT KILL TYPE normal')
  await eventually(async () => await sets() > before, 'the store connects again and sets its mark', 5_000)
  await new Promise(resolve => setTimeout(resolve, 500))
  t.equal(await sets(), before + 1, 'one SET: the mark, no note')
  t.match(await redis.command(`EXISTS ${KEY_PREFIX}issued:rs_a1`), ':0', 'the note removed by hand stays removed')
  await redis.command('FLUSHALL')
  await redis.command('CLIENT KILL TYPE normal')
  await eventually(async () => (await redis.command(`EXISTS ${KEY_PREFIX}issued:rs_a1`)).includes(':1'),
    'a Redis that lost the mark too (flushed) is given every note again', 5_000)
})

t.test('issued items: a connection dropped and made again to a full Redis (noeviction) that kept its data writes no note again', async t => {
  // Redis refuses the mark's SET then: taken for "lost", every note this process knows (up to ownership.cacheSize)
  // was tried again each second while Redis stayed full, each refused, with warnings, after every network blip.
  const { redis, s1 } = await twoNotesInRedis(t)
  t.match(await redis.command('CONFIG SET maxmemory-policy noeviction'), /OK/)
  t.match(await redis.command('CONFIG SET maxmemory 1'), /OK/)
  const refused = async () => Number(/errorstat_OOM:count=(\d+)/.exec(await redis.command('INFO errorstats'))?.[1] ?? 0)
  await redis.command('CLIENT KILL TYPE normal')
  await eventually(async () => await refused() > 0, 'the store connects again, and Redis refuses its mark\'s SET', 5_000)
  await new Promise(resolve => setTimeout(resolve, 1_500)) // (the notes would be tried again each second)
  t.equal(await refused(), 1, 'one refused SET: the mark\'s, no note')
  t.same(s1.log.lines.filter(l => l.msg.startsWith('issued items:')).map(l => l.msg), [], 'no warning')
})

t.test('issued items: a Redis that comes back empty (restarted, no persistence) is given again the notes each replica knows', async t => {
  // Else an item handed out before the restart is refused, for its 30 days, on every replica but the one that handed
  // it out: the client's loop fails on each call the load balancer sends elsewhere (400, which the SDKs do not retry).
  const redis = await startRedis(t)
  const [s1, s2] = [await store(t, redis), await store(t, redis)]
  const one = new IssuedItems({ max: 10, shared: s1, log: s1.log })
  const two = new IssuedItems({ max: 10, shared: s2, log: s2.log })
  t.teardown(() => { one.close(); two.close() })
  one.note(['rs_a1'], 'team-a')
  await eventually(async () => (await redis.command('KEYS *')).includes(`${KEY_PREFIX}issued:rs_a1`), 'the note reaches Redis')
  await redis.stop()
  await redis.start() // empty
  await eventually(async () => (await redis.command(`EXISTS ${KEY_PREFIX}issued:rs_a1`)).includes(':1'),
    'the replica that handed it out writes it again, with no call', 5_000)
  t.same(await issuedTo(two, ['rs_a1'], 'team-a'), answered(['rs_a1']), 'the other replica reads it')
  t.same(await issuedTo(two, ['rs_a1'], 'team-b'), answered([]), 'as team-a\'s only')
  const ttl = Number(/:(-?\d+)/.exec(await redis.command(`PTTL ${KEY_PREFIX}issued:rs_a1`))![1])
  t.ok(ttl > 0 && ttl <= ISSUED_TTL_MS, `PTTL ${ttl}: what is left of its 30 days`)
})
