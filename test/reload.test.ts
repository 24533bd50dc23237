// Operable without restarts: SIGHUP and `start --watch` reload the config into the running gateway (clients and
// their keys, limits, upstream lines and token, timeouts) without failing a call in flight; an invalid file is
// refused and the running config stays; restart-only keys are named in the log. Keys rotate: a client may hold
// several, each until its expiresAt. Real processes and signals where the behaviour is the process's; the app
// itself (app.applyConfig) for what a reload does inside.
import { once } from 'node:events'
import { lookup } from 'node:dns/promises'
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { spawn, spawnSync } from 'node:child_process'
import { request, type IncomingMessage, type ServerResponse } from 'node:http'
import { createServer as createTcpServer, type AddressInfo, type Socket } from 'node:net'
import { rootCertificates } from 'node:tls'
import t, { type Test } from 'tap'
import { buildApp } from '../src/app.js'
import type { AuditWriter } from '../src/audit/writer.js'
import { ClientDirectory } from '../src/clients.js'
import { ConfigSchema, parseConfig, type GatewayConfig } from '../src/config.js'
import { generateKey, keyDigest } from '../src/keys.js'
import { RELOADABLE, reloaded, RESTART_ONLY } from '../src/reload.js'
import { MemoryStore } from '../src/stores/memory.js'
import { call, sleep, until, type Answer } from './fixtures/client.js'
import { BIN, configFile, env as binEnv, run, startBin } from './fixtures/bin.js'
import { eventually } from './fixtures/eventually.js'
import { healthDetails, KEYS, METRICS_TOKEN, startGateway, testConfig, withoutOwnership } from './fixtures/gateway.js'
import { closedPort, faults, startUpstream, UPSTREAM_TOKEN, type FakeUpstream } from './fixtures/upstream.js'
import { startRedis } from './fixtures/redis-server.js'

const KEY_A = generateKey()
const KEY_B = generateKey()
const KEY_C = generateKey()

interface ClientSpec { id: string, key: string, keyId?: string, rateLimit?: string }

function clientYaml ({ id, key, keyId, rateLimit = '{ requestsPerMinute: 100000, burst: 100000 }' }: ClientSpec): string {
  const keyForm = keyId === undefined ? `keySha256: "${keyDigest(key)}"` : `keys: [{ id: "${keyId}", sha256: "${keyDigest(key)}" }]`
  return `  - { id: ${id}, ${keyForm}, scopes: [read, write, delete], rateLimit: ${rateLimit} }\n`
}

function gatewayYaml (dir: string, upstream: string, clients: ClientSpec[], extra = '', apiKey = `apiKey: ${UPSTREAM_TOKEN}`): string {
  return `listen: { host: 127.0.0.1, port: 0 }
log: { level: info }
upstream: { baseUrls: ["${upstream}"], ${apiKey} }
audit: { file: "${join(dir, 'audit.jsonl')}" }
${extra}
clients:
${clients.map(clientYaml).join('')}`
}

/** POST /v1/conversations with `key`: served by the fake upstream's own Conversations API. */
async function create (url: string, key: string): Promise<Answer> {
  return await call(url, 'POST', '/v1/conversations', { key, body: '{}' })
}

/** POST /v1/conversations with the body in chunks and no Content-Length: the status. */
function chunkedPost (url: string, body: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(`${url}/v1/conversations`, {
      method: 'POST', agent: false, headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }
    }, res => { res.resume(); res.on('end', () => resolve(res.statusCode!)) })
    req.on('error', reject)
    for (let i = 0; i < body.length; i += 16) req.write(body.slice(i, i + 16))
    req.end()
  })
}

function codeOf (a: Answer): unknown {
  return (JSON.parse(a.body) as { error?: { code?: unknown } }).error?.code
}

/** The log lines after the `n`th one, once one of them says `what`. */
async function logged (output: { text: string }, what: RegExp, from = 0): Promise<string> {
  return await eventually(async () => output.text.split('\n').slice(from).find(l => what.test(l)) ?? null, `a log line ${what}`)
}

const lineCount = (output: { text: string }) => output.text.split('\n').length - 1

/** The gateway with team-a (KEY_A) and /metrics on its main port (`metrics`, the config's line for it). */
async function startWithMetrics (t: Test) {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  const metrics = `metrics: { token: ${METRICS_TOKEN} }`
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }], metrics))
  return { upstream, file, dir, metrics, ...await startBin(t, file, {}) }
}

/** gateway_config_last_reload_successful, from /metrics on the main port (metrics.token METRICS_TOKEN). */
async function lastReloadGauge (url: string): Promise<string | undefined> {
  const text = await (await fetch(`${url}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } })).text()
  return /^gateway_config_last_reload_successful (\d+)$/m.exec(text)?.[1]
}

async function fakeUpstream (t: Test): Promise<FakeUpstream> {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  return upstream
}

t.test('SIGHUP adds a client (its key works at once), revokes one (401 at once), and says what it applied', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-b', key: KEY_B }]))
  const { child, url, output } = await startBin(t, file, {})
  t.equal((await create(url, KEY_B)).status, 200)
  t.equal((await create(url, KEY_C)).status, 401)

  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C, keyId: 'c-2025' }]))
  const from = lineCount(output)
  child.kill('SIGHUP')
  const line = await logged(output, /config reloaded/, from)
  t.match(JSON.parse(line), { msg: /SIGHUP: config reloaded: clients\[team-c\] \(added\), clients\[team-b\] \(removed\)/ })
  t.equal((await create(url, KEY_C)).status, 200, 'the new client\'s key works')
  const revoked = await create(url, KEY_B)
  t.same([revoked.status, codeOf(revoked)], [401, 'invalid_api_key'], 'the removed client\'s key is refused')
  t.equal((await create(url, KEY_A)).status, 200, 'the unchanged client is served as before')
  t.equal(child.exitCode, null, 'SIGHUP does not end the process')

  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  t.equal((await exited)[0], 0)
  const records = readFileSync(join(dir, 'audit.jsonl'), 'utf8').trim().split('\n').map(l => JSON.parse(l) as Record<string, unknown>)
  t.match(records.filter(r => r.clientId === 'team-c'), [{ keyId: 'c-2025', status: 200 }], 'the audit names the key that was used')
})

/**
 * The bin started on a config whose "Redis" takes connections and never answers: the start waits on it (up to 2 s)
 * with the audit open. Returned once the gateway has connected to it, while it is still being built.
 */
async function startOnSilentRedis (t: Test, upstreamUrl: string) {
  const connected: Socket[] = []
  const silent = createTcpServer(socket => { connected.push(socket) })
  await new Promise<void>(resolve => silent.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { for (const s of connected) s.destroy(); silent.close() })
  const redisUrl = `redis://127.0.0.1:${(silent.address() as AddressInfo).port}`
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstreamUrl, [{ id: 'team-a', key: KEY_A }], `store: { url: "${redisUrl}" }`))
  const child = spawn(process.execPath, [BIN, 'start', '--config', file], { env: binEnv })
  t.teardown(() => child.kill('SIGKILL'))
  const output = { text: '' }
  child.stdout.on('data', (c: Buffer) => { output.text += c.toString() })
  const exited = once(child, 'exit')
  await eventually(async () => connected.length > 0, 'the gateway connecting to its store (before it opens the audit)')
  return { child, output, exited, file, dir, redisUrl }
}

t.test('a SIGHUP while the gateway starts (its Redis not answering yet) does not end it: the reload is held and done once it is built', async t => {
  const upstream = await fakeUpstream(t)
  const { child, output, exited, file, dir, redisUrl } = await startOnSilentRedis(t, upstream.url)
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-b', key: KEY_B }], `store: { url: "${redisUrl}" }`))
  child.kill('SIGHUP')

  const url = await eventually(async () => /Server listening at (http:\/\/[^"]+)/.exec(output.text)?.[1] ?? (child.exitCode !== null || child.signalCode !== null ? 'exited' : null), 'the gateway listening', 15_000)
  t.same([child.exitCode, child.signalCode], [null, null], 'the SIGHUP did not end the process')
  t.match(await logged(output, /config reloaded/), /SIGHUP: config reloaded: clients\[team-b\] \(added\)/)
  t.equal((await create(url, KEY_B)).status, 200, 'the reloaded config is in force')
  child.kill('SIGTERM')
  await exited
})

t.test('a SIGUSR2 while the gateway starts (a logrotate run, its Redis not answering yet) does not end it: the audit reopen is held and done once it is built', async t => {
  const upstream = await fakeUpstream(t)
  const { child, output, exited } = await startOnSilentRedis(t, upstream.url)
  child.kill('SIGUSR2') // by default, SIGUSR2 ends a process
  t.notMatch(output.text, /Server listening/, 'the signal came while the gateway was being built')

  const url = await eventually(async () => /Server listening at (http:\/\/[^"]+)/.exec(output.text)?.[1] ?? (child.exitCode !== null || child.signalCode !== null ? 'exited' : null), 'the gateway listening', 15_000)
  t.same([child.exitCode, child.signalCode], [null, null], 'the SIGUSR2 did not end the process')
  await logged(output, /audit: reopened/)
  t.equal((await create(url, KEY_A)).status, 200, 'and it serves')
  child.kill('SIGTERM')
  await exited
})

// A stop asked while the gateway is still being built (docker stop, a rollout, Ctrl-C, with its Redis slow to
// answer) is a clean stop too: its audit lock is already taken, and left behind by a process ended by the signal,
// it would have the next start wait for the lock's heartbeat and write audit.unclean_stop, as after a kill -9.
t.test('a SIGTERM while the gateway starts (its Redis not answering yet) stops it cleanly once built: exit 0, its audit lock removed, never listening', async t => {
  const upstream = await fakeUpstream(t)
  const { child, output, exited, dir } = await startOnSilentRedis(t, upstream.url)
  t.notOk(existsSync(join(dir, 'audit.jsonl.lock')), 'the audit is opened once the store has answered (a store refused leaves nothing)')
  child.kill('SIGTERM')
  const [code, signal] = await exited
  t.same([code, signal], [0, null], 'exit 0, not ended by the signal')
  t.ok(existsSync(join(dir, 'audit.jsonl')), 'the gateway was built, its audit opened')
  t.notOk(existsSync(join(dir, 'audit.jsonl.lock')), 'the audit lock is removed: the next start takes it at once, with no audit.unclean_stop')
  t.notMatch(output.text, /Server listening/, 'it never listened')
})

t.test('a SIGHUP and then a SIGTERM while the gateway starts: the stop is answered first, the config is not reloaded for a gateway that stops', async t => {
  // Replayed in the order they came, the reload ran, and said "config reloaded", for a process already stopping.
  const upstream = await fakeUpstream(t)
  const { child, output, exited, file, dir, redisUrl } = await startOnSilentRedis(t, upstream.url)
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-b', key: KEY_B }], `store: { url: "${redisUrl}" }`))
  child.kill('SIGHUP')
  await sleep(100) // (two signals, in this order)
  child.kill('SIGTERM')
  const [code, signal] = await exited
  t.same([code, signal], [0, null], 'exit 0')
  t.notMatch(output.text, /config reloaded/, 'no reload for a gateway that stops')
  t.match(output.text, /SIGHUP: shutting down; the config is not reloaded/, 'the SIGHUP is said as not answered')
  t.match(output.text, /SIGTERM: shutting down before listening/)
  t.notMatch(output.text, /Server listening/)
})

t.test('SIGHUP rotates the upstream token from upstream.apiKeyFile: the next call carries the new one, a call in flight finishes', async t => {
  const upstream = await fakeUpstream(t)
  const held: Array<() => void> = []
  upstream.respond = (req: IncomingMessage, res: ServerResponse) => {
    if (req.url === '/v1/conversations/conv_1') {
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"id":"conv_1","object":"conversation","metadata":{"gateway_owner":"team-a"}}')
      return
    }
    const answer = () => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[]}') }
    if (req.headers.authorization === 'Bearer sk-old-token') held.push(answer)
    else answer()
  }
  const { file, dir } = configFile('')
  const tokenFile = join(dir, 'ohmygpt-token')
  writeFileSync(tokenFile, 'sk-old-token\n')
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }], '', `apiKeyFile: "${tokenFile}"`))
  const { child, url, output } = await startBin(t, file, {})
  const inFlight = call(url, 'GET', '/v1/conversations/conv_1/items', { key: KEY_A })
  await eventually(async () => held.length === 1, 'the first call held at the upstream')

  writeFileSync(tokenFile, 'sk-new-token\n')
  const from = lineCount(output)
  child.kill('SIGHUP')
  await logged(output, /config reloaded: upstream\.apiKey/, from)
  const next = await call(url, 'GET', '/v1/conversations/conv_1/items', { key: KEY_A })
  t.equal(next.status, 200)
  held[0]!()
  t.equal((await inFlight).status, 200, 'the call in flight at the reload finishes')
  const seen = upstream.requests.filter(r => r.url === '/v1/conversations/conv_1/items').map(r => r.headers.authorization)
  t.same(seen, ['Bearer sk-old-token', 'Bearer sk-new-token'], 'the upstream saw the old token, then the new one')
  t.notOk(/sk-(old|new)-token/.test(output.text + output.err), 'neither token is in the log')
})

t.test('SIGHUP with upstream.apiKeyFile turned into a FIFO is refused at once: the gateway is not stuck reading it, and serves on', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  const tokenFile = join(dir, 'ohmygpt-token')
  writeFileSync(tokenFile, `${UPSTREAM_TOKEN}\n`)
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }], '', `apiKeyFile: "${tokenFile}"`))
  const { child, url, output } = await startBin(t, file, {})
  rmSync(tokenFile)
  t.equal(spawnSync('mkfifo', [tokenFile]).status, 0, 'the token file is now a FIFO nobody writes to')
  const from = lineCount(output)
  child.kill('SIGHUP')
  const line = await logged(output, /config reload refused/, from)
  t.match(JSON.parse(line), { msg: /upstream\.apiKeyFile: cannot read .*: not a regular file/ })
  t.equal((await create(url, KEY_A)).status, 200, 'the gateway serves on, with the token it had')
})

t.test('a config file replaced by a FIFO nobody writes to: SIGHUP (and --watch) refuse it at once, and the gateway serves on', async t => {
  for (const args of [[], ['--watch']]) {
    const upstream = await fakeUpstream(t)
    const { file, dir } = configFile('')
    writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }]))
    const { child, url, output } = await startBin(t, file, {}, args)
    if (args.length > 0) await logged(output, /watching the config file/)
    rmSync(file)
    t.equal(spawnSync('mkfifo', [file]).status, 0, 'the config file is now a FIFO')
    const from = lineCount(output)
    child.kill('SIGHUP')
    const line = await logged(output, /config reload refused/, from)
    t.match(JSON.parse(line), { msg: /cannot read the file: not a regular file/ }, `${args.join(' ')}: refused, not waited on`)
    t.equal((await create(url, KEY_A)).status, 200, `${args.join(' ')}: the gateway serves on with the config it had`)
  }
})

t.test('an invalid config is refused in one log line and the running config stays in force', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }]))
  const { child, url, output } = await startBin(t, file, {})
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C }], 'limits: { bodyBytes: 0 }'))
  const from = lineCount(output)
  child.kill('SIGHUP')
  const line = await logged(output, /config reload refused/, from)
  t.match(JSON.parse(line), { level: 50, msg: /SIGHUP: config reload refused, the running config stays in force: .*limits\.bodyBytes: must be >= 1/ })
  t.equal(output.text.split('\n').slice(from).filter(l => /reload/.test(l)).length, 1, 'one line')
  t.equal((await create(url, KEY_A)).status, 200, 'the running config serves on')
  t.equal((await create(url, KEY_C)).status, 401, 'nothing of the refused file was applied')

  writeFileSync(file, 'clients: [')
  child.kill('SIGHUP')
  await logged(output, /config reload refused.*YAML/, from)
  t.equal((await create(url, KEY_A)).status, 200, 'nor of a file that is not YAML')
})

t.test('a refused reload shows in /metrics until a reload is applied: the file in place is not what runs, and a restart would refuse it', async t => {
  const { upstream, file, dir, metrics, child, url, output } = await startWithMetrics(t)
  const reloadGauge = async () => await lastReloadGauge(url)
  t.equal(await reloadGauge(), '1', 'as started')

  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }], `${metrics}\nlimits: { bodyBytes: 0 }`))
  let from = lineCount(output)
  child.kill('SIGHUP')
  await logged(output, /config reload refused/, from)
  t.equal(await reloadGauge(), '0', 'refused')
  t.equal((await create(url, KEY_A)).status, 200, 'the running config serves on')

  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C }], metrics))
  from = lineCount(output)
  child.kill('SIGHUP')
  await logged(output, /config reloaded/, from)
  t.equal(await reloadGauge(), '1', 'applied')
})

t.test('a reload that changes audit.file, listen.host or metrics.listen to one this machine cannot use is refused, as check-config and the next start refuse it', async t => {
  const { upstream, file, dir, metrics, child, url, output } = await startWithMetrics(t)
  const reloadGauge = async () => await lastReloadGauge(url)
  const notADirectory = join(dir, 'not-a-directory')
  writeFileSync(notADirectory, '')
  const withTeamC = gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C }], metrics)
  const localhost = await lookup('localhost')
  const port = await closedPort()
  for (const [changed, text, problem] of [
    ['audit.file', withTeamC.replace(join(dir, 'audit.jsonl'), join(notADirectory, 'audit.jsonl')), /audit\.file: cannot create the directory .*not-a-directory: (EEXIST|ENOTDIR)/],
    // 192.0.2.1 (TEST-NET-1, RFC 5737) is no address of this machine
    ['listen.host', withTeamC.replace('host: 127.0.0.1', 'host: 192.0.2.1'), /listen\.host: cannot listen on 192\.0\.2\.1:0: .*EADDRNOTAVAIL/],
    ['metrics.listen', withTeamC.replace(metrics, `metrics: { token: ${METRICS_TOKEN}, listen: "192.0.2.1:0" }`), /metrics\.listen: cannot listen on 192\.0\.2\.1:0: .*EADDRNOTAVAIL/],
    // on listen.port, localhost and 127.0.0.1 (one address here, named two ways): the next start would refuse it
    ...(localhost.address === '127.0.0.1'
      ? [['metrics.listen on listen.port', withTeamC.replace('port: 0', `port: ${port}`).replace(metrics, `metrics: { token: ${METRICS_TOKEN}, listen: "localhost:${port}" }`),
          /metrics\.listen: its port is listen\.port, on an address listen\.host also takes/]]
      : [])
  ] as Array<[string, string, RegExp]>) {
    writeFileSync(file, text)
    t.equal(run(['check-config', '--config', file]).status, 1, `${changed}: check-config refuses the file`)
    const from = lineCount(output)
    child.kill('SIGHUP')
    const line = await logged(output, /SIGHUP: config reload/, from)
    t.match(JSON.parse(line), { level: 50, msg: /config reload refused, the running config stays in force/ }, `${changed}: refused`)
    t.match(line, problem, `${changed}: the log says why, as check-config does`)
    t.equal(await reloadGauge(), '0', `${changed}: /metrics shows the file in place would not start`)
    t.equal((await create(url, KEY_C)).status, 401, `${changed}: nothing of the refused file was applied`)
    t.equal((await create(url, KEY_A)).status, 200, `${changed}: the running config serves on`)
  }
  writeFileSync(file, withTeamC)
  const from = lineCount(output)
  child.kill('SIGHUP')
  await logged(output, /SIGHUP: config reloaded/, from)
  t.equal(await reloadGauge(), '1', 'a usable file is applied')
  t.equal((await create(url, KEY_C)).status, 200)
})

t.test('a changed listen.port is reported as needing a restart; the rest of the file is applied', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }]))
  const { child, url, output } = await startBin(t, file, {})
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C }])
    .replace('port: 0', 'port: 1'))
  const from = lineCount(output)
  child.kill('SIGHUP')
  const line = await logged(output, /applied only by a restart/, from)
  t.match(JSON.parse(line), { level: 40, needRestart: ['listen.port'], msg: /SIGHUP: changed in .* but applied only by a restart \(the running values stay\): listen\.port/ })
  t.equal((await create(url, KEY_C)).status, 200, 'the new client is served, on the port the gateway listens on')
})

t.test('start --watch reloads when the file is replaced (as editors save) or written in place', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }]))
  const { url, output } = await startBin(t, file, {}, ['--watch'])
  await logged(output, /watching the config file/)
  const saved = join(dir, '.gateway.yaml.swp')
  writeFileSync(saved, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C }]))
  renameSync(saved, file)
  await eventually(async () => (await create(url, KEY_C)).status === 200, 'the new client is served after the rename')
  t.match(output.text, /gateway\.yaml changed: config reloaded: clients\[team-c\] \(added\)/)

  writeFileSync(file, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }]))
  await eventually(async () => (await create(url, KEY_C)).status === 401, 'and refused after the file is written in place')
})

t.test('start --watch refuses a config file grown past 8 MiB in one line, and /metrics shows it, as SIGHUP does', async t => {
  // The file is not read whole, so --watch cannot compare its text: it reloaded nothing and said nothing, while the
  // file in place would not start.
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  const metrics = `metrics: { token: ${METRICS_TOKEN} }`
  const good = gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }], metrics)
  writeFileSync(file, good)
  const { url, output } = await startBin(t, file, {}, ['--watch'])
  await logged(output, /watching the config file/)
  const from = lineCount(output)
  writeFileSync(file, good + `# ${'x'.repeat(9 * 1024 * 1024)}\n`)
  const line = await logged(output, /config reload refused/, from)
  t.match(JSON.parse(line), { level: 50, msg: /gateway\.yaml changed: config reload refused, .*cannot read the file: it is larger than 8 MiB/ })
  t.equal(await lastReloadGauge(url), '0', 'the file in place would not start')
  writeFileSync(file, good)
  await eventually(async () => await lastReloadGauge(url) === '1', 'the file put right is reloaded')
})

t.test('start --watch follows a Kubernetes ConfigMap update (the ..data symlink swapped to a new directory)', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  const version = (name: string, clients: ClientSpec[]) => {
    mkdirSync(join(dir, name))
    writeFileSync(join(dir, name, 'gateway.yaml'), gatewayYaml(dir, upstream.url, clients))
  }
  version('..v1', [{ id: 'team-a', key: KEY_A }])
  symlinkSync('..v1', join(dir, '..data'))
  rmSync(file)
  symlinkSync(join('..data', 'gateway.yaml'), file)
  const { url, output } = await startBin(t, file, {}, ['--watch'])
  await logged(output, /watching the config file/)
  version('..v2', [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C }])
  symlinkSync('..v2', join(dir, '..data_tmp'))
  renameSync(join(dir, '..data_tmp'), join(dir, '..data'))
  await eventually(async () => (await create(url, KEY_C)).status === 200, 'the new client is served after the swap')
})

t.test('start --watch sees a change to a config file that is a symlink into another directory (the revoked key gets 401)', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  // /etc/gateway/gateway.yaml -> /srv/config/gateway.yaml: the file edited in place where it really is.
  const real = join(dir, 'elsewhere', 'gateway.yaml')
  mkdirSync(join(dir, 'elsewhere'))
  writeFileSync(real, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }, { id: 'team-c', key: KEY_C }]))
  rmSync(file)
  symlinkSync(real, file)
  const { url, output } = await startBin(t, file, {}, ['--watch'])
  await logged(output, /watching the config file/)
  t.equal((await create(url, KEY_C)).status, 200)
  writeFileSync(real, gatewayYaml(dir, upstream.url, [{ id: 'team-a', key: KEY_A }]))
  await eventually(async () => (await create(url, KEY_C)).status === 401, 'the removed client refused after the real file is written')
  t.match(output.text, /gateway\.yaml changed: config reloaded: clients\[team-c\] \(removed\)/)
})

t.test('token buckets survive a reload: unchanged limits keep their state, a raised burst hands out no fresh tokens, a new rate applies at once', async t => {
  const upstream = await fakeUpstream(t)
  const { file, dir } = configFile('')
  const slow = { id: 'team-a', key: KEY_A, rateLimit: '{ requestsPerMinute: 1, burst: 2 }' }
  writeFileSync(file, gatewayYaml(dir, upstream.url, [slow]))
  const { child, url, output } = await startBin(t, file, {})
  const statuses = async () => [(await create(url, KEY_A)).status]
  t.same([...await statuses(), ...await statuses(), ...await statuses()], [200, 200, 429])

  const reload = async (clients: ClientSpec[], what: RegExp) => {
    writeFileSync(file, gatewayYaml(dir, upstream.url, clients))
    const from = lineCount(output)
    child.kill('SIGHUP')
    await logged(output, what, from)
  }
  await reload([slow, { id: 'team-c', key: KEY_C }], /config reloaded: clients\[team-c\] \(added\)/)
  t.same(await statuses(), [429], 'unchanged limits: the empty bucket is still empty')
  await reload([{ ...slow, rateLimit: '{ requestsPerMinute: 1, burst: 50 }' }], /config reloaded: clients\[team-a\]\.rateLimit\.burst/)
  t.same(await statuses(), [429], 'a raised burst: still empty, refilled at the client\'s rate')
  await reload([{ ...slow, rateLimit: '{ requestsPerMinute: 6000000, burst: 50 }' }], /config reloaded: clients\[team-a\]\.rateLimit\.requestsPerMinute/)
  const fast = await create(url, KEY_A)
  t.equal(fast.status, 200, 'the new rate refills the bucket at once')
  t.equal(fast.headers['x-ratelimit-limit-requests'], '6000000')
})

// ---- inside the app: what app.applyConfig does ----

function withConfig (config: GatewayConfig, change: (raw: Record<string, unknown>) => void): GatewayConfig {
  const raw = JSON.parse(JSON.stringify(config)) as Record<string, unknown>
  change(raw)
  return parseConfig(raw)
}

t.test('with Redis, a reload that lowers a rate or raises a burst keeps a drained bucket drained after the old limits would have refilled it', async t => {
  const redis = await startRedis(t)
  const upstream = await fakeUpstream(t)
  const limitsOf = (limits: Record<string, Record<string, number>>) => (raw: Record<string, unknown>) => {
    for (const client of raw.clients as Array<Record<string, unknown>>) client.rateLimit = limits[client.id as string] ?? client.rateLimit
  }
  // One token at 60 a minute: one call drains it, and the old limits would have it full again 1 s later.
  const before = { requestsPerMinute: 60, burst: 1 }
  const config = withConfig(testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 2000 } }),
    limitsOf({ 'team-limited': before, 'team-reader': before }))
  const gw = await startGateway(t, config)
  const read = async (key: string) => (await call(gw.url, 'GET', '/v1/conversations/conv_1/items', { key })).status
  t.not(await read(KEYS.limited), 429)
  t.not(await read(KEYS.reader), 429)
  t.same(gw.app.applyConfig(withConfig(config, limitsOf({
    'team-limited': { requestsPerMinute: 1, burst: 1 },
    'team-reader': { requestsPerMinute: 1, burst: 50 }
  }))).applied.sort(), ['clients[team-limited].rateLimit.requestsPerMinute', 'clients[team-reader].rateLimit.burst',
    'clients[team-reader].rateLimit.requestsPerMinute'])
  // Past the time the old limits needed to fill the buckets (and Redis, keeping a bucket until then, to forget
  // them): at one token a minute, not one has come back since.
  await sleep(2500)
  const limited = await call(gw.url, 'GET', '/v1/conversations/conv_1/items', { key: KEYS.limited })
  t.same([limited.status, limited.headers['x-ratelimit-limit-requests']], [429, '1'], 'a lowered rate: still drained')
  t.equal(await read(KEYS.reader), 429, 'a raised burst: still drained, no fresh burst of 50')
})

t.test('a reload that raises a drained client\'s rate hands out no fresh burst: the time before it refills at the old rate, the time after at the new', async t => {
  const upstream = await fakeUpstream(t)
  let now = 1_000_000
  const before = { requestsPerMinute: 1, burst: 3 }
  const config = withConfig(testConfig(upstream.url), raw => {
    (raw.clients as Array<Record<string, unknown>>).find(client => client.id === 'team-limited')!.rateLimit = before
  })
  const gw = await startGateway(t, config, { rateLimitStore: new MemoryStore({ now: () => now }) })
  const read = async () => (await call(gw.url, 'GET', '/v1/conversations/conv_1/items', { key: KEYS.limited })).status
  for (let i = 0; i < 3; i++) t.not(await read(), 429)
  t.equal(await read(), 429, 'drained')
  now += 30_000 // half a token at one a minute; 300 tokens at ten a second
  t.same(gw.app.applyConfig(withConfig(config, raw => {
    (raw.clients as Array<Record<string, unknown>>).find(client => client.id === 'team-limited')!.rateLimit = { requestsPerMinute: 600, burst: 3 }
  })).applied, ['clients[team-limited].rateLimit.requestsPerMinute'])
  t.equal(await read(), 429, 'the half token of the old rate: no fresh burst of 3')
  now += 50 // the other half, at ten a second
  t.not(await read(), 429, 'the new rate from the reload on')
  t.equal(await read(), 429)
})

/** A config change that gives team-writer a token budget of `tokensPerMinute`. */
function writerBudget (tokensPerMinute: number) {
  return (raw: Record<string, unknown>) => {
    const writer = (raw.clients as Array<Record<string, unknown>>).find(client => client.id === 'team-writer')!
    writer.rateLimit = { ...writer.rateLimit as object, tokensPerMinute }
  }
}

/** Generations the upstream holds until the test lets each answer (in order), with `usage`. */
function holdGenerations (upstream: FakeUpstream, usage = { input_tokens: 1, output_tokens: 1, total_tokens: 2 }): Array<() => void> {
  const held: Array<() => void> = []
  upstream.respond = (_req, res, body) => {
    const { metadata } = JSON.parse(body.toString()) as { metadata?: unknown }
    held.push(() => {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({
        object: 'response', id: `resp_held${held.length}`, status: 'completed', model: 'gpt-4o-mini', output: [], metadata, usage
      }))
    })
  }
  return held
}

t.test('a generation in flight across a reload that lowers tokensPerMinute is charged under the new limit: its end refills nothing at the old rate', async t => {
  const upstream = await fakeUpstream(t)
  let now = 1_000_000
  const config = withConfig(testConfig(upstream.url), writerBudget(600))
  const gw = await startGateway(t, config, { rateLimitStore: new MemoryStore({ now: () => now }) })
  const generate = async (input: string) => await call(gw.url, 'POST', '/v1/responses', { key: KEYS.writer, body: JSON.stringify({ model: 'gpt-4o-mini', input }) })
  // A generation the upstream holds until the test lets it answer, with a usage of two tokens.
  const answers = holdGenerations(upstream)
  const held = generate('hi')
  await until('the held generation at the upstream', () => answers.length === 1)
  upstream.respond = null
  // 700 words in, 701 out (the fake's usage): 1401 tokens of a budget of 600, 801 in debt
  t.equal((await generate(Array.from({ length: 700 }, (_, i) => `w${i}`).join(' '))).status, 200)
  gw.app.applyConfig(withConfig(config, writerBudget(6)))
  now += 120_000 // 1200 tokens at the old limit, 12 at the new
  answers[0]!()
  t.equal((await held).status, 200)
  const refused = await generate('hi')
  t.same([refused.status, refused.headers['x-ratelimit-limit-tokens']], [429, '6'], 'still in debt: the two minutes after the reload paid back 12 tokens, not 1200')
})

t.test('a generation in flight when a reload removes its client\'s budget (or the client) is not charged to the budget it had', async t => {
  const upstream = await fakeUpstream(t)
  const budgets = (kept: Record<string, number>) => (raw: Record<string, unknown>) => {
    raw.clients = (raw.clients as Array<Record<string, unknown>>).filter(client => client.id !== 'team-other' || 'team-other' in kept)
    for (const client of raw.clients as Array<{ id: string, rateLimit: Record<string, number> }>) {
      const { tokensPerMinute: _dropped, ...rest } = client.rateLimit
      client.rateLimit = client.id in kept ? { ...rest, tokensPerMinute: kept[client.id]! } : rest
    }
  }
  const config = withConfig(testConfig(upstream.url), budgets({ 'team-writer': 600, 'team-other': 600 }))
  const gw = await startGateway(t, config, { rateLimitStore: new MemoryStore({ now: () => 1_000_000 }) })
  const generate = async (key: string) => await call(gw.url, 'POST', '/v1/responses', { key, body: JSON.stringify({ model: 'gpt-4o-mini', input: 'hi' }) })
  const held = holdGenerations(upstream)
  const calls = [generate(KEYS.writer), generate(KEYS.other)]
  await until('both generations held at the upstream', () => held.length === 2)
  upstream.respond = null
  gw.app.applyConfig(withConfig(config, budgets({})))
  for (const answer of held) answer()
  t.same((await Promise.all(calls)).map(a => a.status), [200, 200], 'served with the client and key they were admitted with')
  gw.app.applyConfig(config)
  const remaining = async (key: string) => (await generate(key)).headers['x-ratelimit-remaining-tokens']
  t.same([await remaining(KEYS.writer), await remaining(KEYS.other)], ['600', '600'], 'the budgets as they were: nothing charged')
})

t.test('a generation in flight when a reload gives its client a token budget is charged to that budget when it ends', async t => {
  const upstream = await fakeUpstream(t)
  const config = testConfig(upstream.url) // (team-writer without a budget)
  const gw = await startGateway(t, config, { rateLimitStore: new MemoryStore({ now: () => 1_000_000 }) })
  const generate = async () => await call(gw.url, 'POST', '/v1/responses', { key: KEYS.writer, body: JSON.stringify({ model: 'gpt-4o-mini', input: 'hi' }) })
  const held = holdGenerations(upstream, { input_tokens: 100, output_tokens: 200, total_tokens: 300 })
  const inFlight = generate()
  await until('the generation held at the upstream', () => held.length === 1)
  upstream.respond = null
  gw.app.applyConfig(withConfig(config, writerBudget(600)))
  held[0]!()
  t.equal((await inFlight).status, 200)
  t.equal((await generate()).headers['x-ratelimit-remaining-tokens'], '300', 'its 300 tokens charged under the budget in force when it ended')
})

t.test('with Redis, a reload that raises a drained client\'s rate hands out no fresh burst', async t => {
  const redis = await startRedis(t)
  const upstream = await fakeUpstream(t)
  const limits = (rateLimit: object) => (raw: Record<string, unknown>) => {
    (raw.clients as Array<Record<string, unknown>>).find(client => client.id === 'team-limited')!.rateLimit = rateLimit
  }
  const config = withConfig(testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 2000 } }), limits({ requestsPerMinute: 1, burst: 1 }))
  const gw = await startGateway(t, config)
  const read = async () => (await call(gw.url, 'GET', '/v1/conversations/conv_1/items', { key: KEYS.limited })).status
  t.not(await read(), 429)
  await sleep(3000) // a twentieth of a token at one a minute; one and a half at 30 a minute
  gw.app.applyConfig(withConfig(config, limits({ requestsPerMinute: 30, burst: 1 })))
  t.equal(await read(), 429, 'still drained: the time before the reload refilled at the old rate')
})

t.test('with Redis, replicas reloaded in turn: the second reload refills nothing at the old rate for the time since the first, no fresh burst', async t => {
  // Every replica reads its own copy of the file and is reloaded in its turn (README, "Running several replicas"):
  // the second finds the bucket the first already wrote under the new limits.
  const redis = await startRedis(t)
  const upstream = await fakeUpstream(t)
  const limits = (rateLimit: object) => (raw: Record<string, unknown>) => {
    (raw.clients as Array<Record<string, unknown>>).find(client => client.id === 'team-limited')!.rateLimit = rateLimit
  }
  // One token at 30 a minute: one call drains it, and the old rate would have it back 2 s later.
  // (each replica its own config object: its own audit file)
  const replica = () => withConfig(testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 2000 } }), limits({ requestsPerMinute: 30, burst: 1 }))
  const [one, two] = [await startGateway(t, replica()), await startGateway(t, replica())]
  const read = async (gw: { url: string }) => (await call(gw.url, 'GET', '/v1/conversations/conv_1/items', { key: KEYS.limited })).status
  const lower = (gw: { app: { applyConfig: (c: GatewayConfig) => unknown }, config: GatewayConfig }) => {
    gw.app.applyConfig(withConfig(gw.config, limits({ requestsPerMinute: 1, burst: 1 })))
  }
  t.not(await read(one), 429)
  lower(one)
  await sleep(2500) // a token and a quarter at the old rate; a twenty-fourth of one at the new
  lower(two)
  t.equal(await read(two), 429, 'still drained through the replica reloaded last')
  t.equal(await read(one), 429, 'and through the first')
})

t.test('with Redis, a token budget in debt when a reload lowers tokensPerMinute is kept until the new limit has paid the debt back', async t => {
  const redis = await startRedis(t)
  const upstream = await fakeUpstream(t)
  const budget = (tokensPerMinute: number) => (raw: Record<string, unknown>) => {
    const writer = (raw.clients as Array<Record<string, unknown>>).find(client => client.id === 'team-writer')!
    writer.rateLimit = { ...writer.rateLimit as object, tokensPerMinute }
  }
  const config = withConfig(testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 2000 } }), budget(30))
  const gw = await startGateway(t, config)
  // 20 words in, 21 out (the fake's usage): 41 tokens of a budget of 30, 11 in debt
  const input = Array.from({ length: 20 }, (_, i) => `w${i}`).join(' ')
  t.equal((await call(gw.url, 'POST', '/v1/responses', { key: KEYS.writer, body: JSON.stringify({ model: 'gpt-4o-mini', input }) })).status, 200)
  const ttl = async () => Number(/:(-?\d+)/.exec(await redis.command('PTTL ogw:rl:tokens:team-writer'))![1])
  await eventually(async () => await ttl() > 0, 'the generation charged to the budget')
  gw.app.applyConfig(withConfig(config, budget(1)))
  // At one token a minute, 11 in debt and 1 to fill: 12 minutes (at 30 a minute, as before the reload, 82 s).
  await eventually(async () => await ttl() > 11 * 60_000, 'the budget kept as long as the new limit needs')
  const refused = await call(gw.url, 'POST', '/v1/responses', { key: KEYS.writer, body: JSON.stringify({ model: 'gpt-4o-mini', input: 'hi' }) })
  t.same([refused.status, refused.headers['x-ratelimit-limit-tokens']], [429, '1'])
})

for (const onFailure of ['closed', 'open'] as const) {
  // (open serves calls from local buckets meanwhile; the shared buckets are no more written under the new limits than
  // with closed: once Redis is back, the time since the reload refills at the old ones)
  t.test(`with Redis down (${onFailure}), a reload that changes every client's limits says once that their buckets could not be kept, not once per bucket`, async t => {
    const redis = await startRedis(t)
    const upstream = await fakeUpstream(t)
    const config = testConfig(upstream.url, { store: { url: redis.url, timeoutMs: 500, onFailure } })
    const gw = await startGateway(t, config)
    await redis.stop()
    const changed = withConfig(config, raw => {
      for (const client of raw.clients as Array<Record<string, unknown>>) {
        client.rateLimit = { ...client.rateLimit as object, requestsPerMinute: 7, tokensPerMinute: 700 }
      }
    })
    t.ok(gw.app.applyConfig(changed).applied.length > 2, 'every client\'s limits changed')
    const buckets = 2 * changed.clients.length // a request bucket and a token budget each
    const warned = () => gw.logs.filter(l => l.includes('could not be kept under'))
    await eventually(async () => warned().length > 0, 'the warning, once every rewrite has failed')
    await sleep(600) // (past the store's timeout: nothing still pending adds a line)
    t.equal(warned().length, 1, 'one line for the reload')
    const line = JSON.parse(warned()[0]!) as { level: number, buckets: number, named: string[], msg: string }
    t.match(line, { level: 40, buckets, msg: new RegExp(`^rate limits: ${buckets} bucket`) })
    t.same(line.named, changed.clients.flatMap(c => [c.id, `tokens:${c.id}`]).slice(0, 10), 'the first ten named')
  })
}

t.test('new upstream lines take new calls while a call in flight finishes on the old line, whose pool then closes, and the audit names each one\'s line', async t => {
  const [oldLine, newLine] = [await fakeUpstream(t), await fakeUpstream(t)]
  const gw = await startGateway(t, ...withoutOwnership(oldLine.url))
  const released: Array<() => void> = []
  oldLine.respond = (_req, res) => { released.push(() => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[]}') }) }
  const inFlight = call(gw.url, 'GET', '/v1/conversations/conv_1/items')
  await eventually(async () => released.length === 1, 'the call held on the old line')

  const change = gw.app.applyConfig(withConfig(gw.config, raw => {
    (raw.upstream as Record<string, unknown>).baseUrls = [newLine.url]
    ;(raw.upstream as Record<string, unknown>).timeoutMs = 3000
  }))
  t.same(change, { applied: ['upstream.baseUrls', 'upstream.timeoutMs'], needRestart: [] })
  newLine.respond = faults.status(200)
  t.equal((await call(gw.url, 'GET', '/v1/conversations/conv_2/items')).status, 200)
  t.equal(newLine.requests.length, 1, 'the new call went to the new line')
  t.equal(oldLine.requests.length, 1, 'and not to the old one')
  t.equal(oldLine.connections(), 1, 'the old line\'s connection stays open while its call is in flight')
  released[0]!()
  t.equal((await inFlight).status, 200, 'the call in flight finished on the old line')
  await eventually(async () => oldLine.connections() === 0, 'the old pool closes once its call is done')
  t.match(gw.app.currentConfig().upstream, { baseUrls: [newLine.url], timeoutMs: 3000 })
  // Both were served by line 0 of the config they started under: the audit names each one's own line by its host.
  t.same((await gw.auditFile()).map(r => [r.path, r.upstreamLine, r.upstreamHost]), [
    ['/v1/conversations/conv_2/items', 0, new URL(newLine.url).host],
    ['/v1/conversations/conv_1/items', 0, new URL(oldLine.url).host]
  ], 'each call\'s audit record names the line that served it, not only an index that now names another')
})

t.test('a reload that adds a line (or reorders them) keeps each remaining line\'s health: a skipped line is not trusted again', async t => {
  // Every line was trusted again on any change of baseUrls: a line added during an outage of another (the natural
  // fix) put the failing line back in front, and the next create, sent to it and lost, got a 502 not to retry.
  const [bad, good, added] = [await fakeUpstream(t), await fakeUpstream(t), await fakeUpstream(t)]
  const gw = await startGateway(t, ...withoutOwnership(bad.url, {
    upstream: { baseUrls: [bad.url, good.url], apiKey: UPSTREAM_TOKEN, failureThreshold: 1, cooldownMs: 60_000 },
    metrics: { token: METRICS_TOKEN }
  }))
  bad.respond = faults.reset() // takes each call, answers none
  t.equal((await call(gw.url, 'GET', '/v1/conversations/conv_1/items')).status, 404, 'a read: reset on line 0, retried on line 1 (which has no such conversation)')
  const states = async () => ((await healthDetails(gw.url)).body.upstream as Array<{ host: string, state: string }>).map(l => [l.host, l.state])
  t.same(await states(), [[new URL(bad.url).host, 'down'], [new URL(good.url).host, 'up']], 'line 0 is skipped')

  for (const baseUrls of [[bad.url, good.url, added.url], [good.url, added.url, bad.url]]) {
    t.same(gw.app.applyConfig(withConfig(gw.config, raw => { (raw.upstream as Record<string, unknown>).baseUrls = baseUrls })),
      { applied: ['upstream.baseUrls'], needRestart: [] })
    const hosts = baseUrls.map(url => new URL(url).host)
    t.same(await states(), hosts.map(host => [host, host === new URL(bad.url).host ? 'down' : 'up']), 'the skipped line is still skipped, wherever it now is')
    const created = await call(gw.url, 'POST', '/v1/conversations', { body: '{}' })
    t.equal(created.status, 200, 'a create after the reload is served')
    t.equal(bad.requests.length, 1, 'and never sent to the skipped line')
  }
})

t.test('a reload keeps the health of a URL listed twice line by line: the line of it that is up stays up', async t => {
  // Each line took over the first line of the old list with its URL: with a URL listed twice (two lines to one
  // host, so that a call that fails on one is retried on the other), the copy that was up took the skipped one's
  // state, and every call after a reload of cooldownMs got 503 (every line down) though that line answered.
  const upstream = await fakeUpstream(t)
  const gw = await startGateway(t, ...withoutOwnership(upstream.url, {
    upstream: { baseUrls: [upstream.url, upstream.url], apiKey: UPSTREAM_TOKEN, failureThreshold: 1, cooldownMs: 60_000 },
    metrics: { token: METRICS_TOKEN }
  }))
  upstream.respond = (req, res, body) => { upstream.respond = null; faults.reset()(req, res, body) } // the first call only
  t.equal((await call(gw.url, 'GET', '/v1/conversations/conv_1/items')).status, 404, 'a read: reset on line 0, retried on line 1')
  const states = async () => ((await healthDetails(gw.url)).body.upstream as Array<{ state: string }>).map(l => l.state)
  t.same(await states(), ['down', 'up'], 'line 0 is skipped, line 1 is up')
  t.same(gw.app.applyConfig(withConfig(gw.config, raw => { (raw.upstream as Record<string, unknown>).cooldownMs = 30_000 })),
    { applied: ['upstream.cooldownMs'], needRestart: [] })
  t.same(await states(), ['down', 'up'], 'after the reload, still: line 1 is not skipped')
  t.equal((await call(gw.url, 'POST', '/v1/conversations', { body: '{}' })).status, 200, 'a create after the reload is served on line 1')
})

t.test('upstream.caFile rotated in place (same path, a new CA in it) is read again by a reload, and the log says so', async t => {
  const tlsDir = join(import.meta.dirname, 'fixtures', 'tls')
  const upstream = await startUpstream({ tls: { key: readFileSync(join(tlsDir, 'server.key'), 'utf8'), cert: readFileSync(join(tlsDir, 'server.pem'), 'utf8') } })
  t.teardown(() => upstream.close())
  const dir = t.testdir({ 'ca.pem': rootCertificates[0]! }) // a valid CA, but not the one that signed the upstream
  const config = testConfig(upstream.url)
  const gw = await startGateway(t, { ...config, upstream: { ...config.upstream, caFile: join(dir, 'ca.pem') } })
  t.equal((await create(gw.url, KEYS.full)).status, 502, 'the upstream cannot be verified with the old CA')

  writeFileSync(join(dir, 'ca.pem'), readFileSync(join(tlsDir, 'ca.pem'))) // as a mounted secret is updated
  const change = gw.app.applyConfig(withConfig(gw.config, () => {}))
  t.same(change, { applied: ['upstream.caFile (contents)'], needRestart: [] })
  t.equal((await create(gw.url, KEYS.full)).status, 200, 'the next call is verified with the new CA')
  t.same(gw.app.applyConfig(withConfig(gw.config, () => {})), { applied: [], needRestart: [] }, 'an unchanged CA file is nothing to apply')
})

t.test('limits.bodyBytes applies at once: declared and chunked bodies over the new limit get 413', async t => {
  const upstream = await fakeUpstream(t)
  const gw = await startGateway(t, testConfig(upstream.url))
  const body = JSON.stringify({ metadata: { topic: 'x'.repeat(100) } })
  t.equal((await call(gw.url, 'POST', '/v1/conversations', { body })).status, 200)
  t.same(gw.app.applyConfig(withConfig(gw.config, raw => { raw.limits = { bodyBytes: 64 } })), { applied: ['limits.bodyBytes'], needRestart: [] })
  const declared = await call(gw.url, 'POST', '/v1/conversations', { body })
  t.same([declared.status, codeOf(declared)], [413, 'request_too_large'])
  t.match(JSON.parse(declared.body), { error: { message: /larger than the 64 bytes/ } })
  t.equal(await chunkedPost(gw.url, body), 413, 'a chunked body (no length declared) is cut at the new limit too')
  t.equal((await call(gw.url, 'POST', '/v1/conversations', { body: '{}' })).status, 200, 'a body within it is served')
})

t.test('every top-level config key is either applied by a reload or reported as needing a restart', async t => {
  const keys = Object.keys(ConfigSchema.properties).sort()
  t.same([...RELOADABLE, ...RESTART_ONLY].sort(), keys)
})

t.test('what a reload reports: key paths only, never a value, and the restart-only sections keep their running values', async t => {
  const running = testConfig('http://127.0.0.1:9')
  const next = withConfig(running, raw => {
    (raw.upstream as Record<string, unknown>).apiKey = 'sk-rotated-SECRET'
    ;(raw.listen as Record<string, unknown>).port = 9999
    raw.trustProxy = ['10.0.0.0/8']
    ;(raw.clients as Array<Record<string, unknown>>)[0]!.scopes = ['read']
    raw.shutdown = { graceMs: 5000 }
  })
  const result = reloaded(running, next)
  t.same(result.applied, ['upstream.apiKey', 'clients[team-full].scopes', 'shutdown.graceMs'])
  t.same(result.needRestart, ['listen.port', 'trustProxy'])
  t.notOk(JSON.stringify([result.applied, result.needRestart]).includes('SECRET'), 'no value in the report')
  t.equal(result.config.listen.port, running.listen.port, 'listen stays as it runs')
  t.same(result.config.trustProxy, false)
  t.equal(result.config.upstream.apiKey, 'sk-rotated-SECRET')
  t.ok(Object.isFrozen(result.config))
})

t.test('a client added by a reload gets its own label in /metrics, not "other"', async t => {
  const upstream = await fakeUpstream(t)
  const token = 'metrics-token-0123456789'
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token } }))
  const key = generateKey()
  gw.app.applyConfig(withConfig(gw.config, raw => {
    (raw.clients as unknown[]).push({ id: 'team-new', keySha256: keyDigest(key), scopes: ['write'] })
  }))
  t.equal((await create(gw.url, key)).status, 200)
  await eventually(async () => gw.audit().length === 1, 'the call audited')
  const text = await (await fetch(`${gw.url}/metrics`, { headers: { authorization: `Bearer ${token}` } })).text()
  t.match(text, /gateway_requests_total\{client="team-new",action="conversation\.create",status="200",outcome="ok"\} 1/)
})

t.test('an expired key gets 401 invalid_api_key like an unknown one, audited with its client and key id; the client\'s other key works and is named in the audit', async t => {
  const upstream = await fakeUpstream(t)
  const [oldKey, newKey] = [generateKey(), generateKey()]
  const gw = await startGateway(t, testConfig(upstream.url, {
    clients: [{
      id: 'team-rot',
      keys: [
        { id: 'old', sha256: keyDigest(oldKey), expiresAt: '2020-01-01T00:00:00Z' },
        { id: 'new', sha256: keyDigest(newKey), expiresAt: '2999-01-01T00:00:00+02:00' }
      ],
      scopes: ['read', 'write']
    }]
  }))
  const expired = await create(gw.url, oldKey)
  const unknown = await create(gw.url, generateKey())
  t.same([expired.status, JSON.parse(expired.body)], [401, JSON.parse(unknown.body)], 'the same answer as an unknown key')
  t.equal(codeOf(expired), 'invalid_api_key')
  t.equal((await create(gw.url, newKey)).status, 200)
  await eventually(async () => gw.audit().length === 3, 'three records')
  t.match(gw.audit(), [
    { clientId: 'team-rot', keyId: 'old', status: 401, outcome: 'denied' },
    { clientId: null, keyId: null, status: 401 },
    { clientId: 'team-rot', keyId: 'new', status: 200, outcome: 'ok' }
  ])
})

t.test('a key is refused from its expiresAt on, even one already found valid and remembered', async t => {
  let now = Date.parse('2030-01-01T00:00:00Z')
  const key = generateKey()
  const directory = new ClientDirectory([{
    id: 'team-a', keys: [{ id: 'k1', sha256: keyDigest(key), expiresAt: '2030-01-01T00:01:00Z' }], scopes: ['read'], rateLimit: { requestsPerMinute: 1, burst: 1 }
  }], () => now)
  t.match(directory.find(key), { client: { id: 'team-a' }, keyId: 'k1' })
  now += 59_999
  t.ok(directory.find(key), 'valid until its expiresAt')
  now += 1
  t.equal(directory.find(key), null, 'refused at it')
})

t.test('/readyz: 503 "starting" before listening, "upstream_unavailable" with every line skipped, "audit_unavailable" while the audit refuses calls', async t => {
  const upstream = await fakeUpstream(t)
  const starting = await buildApp(testConfig(upstream.url))
  t.teardown(() => starting.close())
  const before = await starting.inject('/readyz')
  t.same([before.statusCode, before.json()], [503, { status: 'starting' }])

  const gw = await startGateway(t, ...withoutOwnership(upstream.url, { upstream: { baseUrls: [upstream.url], apiKey: UPSTREAM_TOKEN, failureThreshold: 1, cooldownMs: 60000, retries: 0 } }))
  t.same(await (await fetch(`${gw.url}/readyz`)).json(), { status: 'ready' })
  t.equal((await fetch(`${gw.url}/readyz`, { method: 'HEAD' })).status, 200)
  upstream.respond = faults.status(503)
  t.equal((await call(gw.url, 'GET', '/v1/conversations/conv_1/items')).status, 503)
  const down = await fetch(`${gw.url}/readyz`)
  t.same([down.status, await down.json()], [503, { status: 'upstream_unavailable' }])
  t.equal((await fetch(`${gw.url}/healthz`)).status, 200, '/healthz stays 200')

  const failing: AuditWriter = { write () {}, available: false, stats: () => ({ written: 0, failed: 1, lost: 0 }), reopen () {}, close: async () => {} }
  const refusing = await startGateway(t, testConfig(upstream.url), { auditWriter: failing })
  upstream.respond = null
  const res = await fetch(`${refusing.url}/readyz`)
  t.same([res.status, await res.json()], [503, { status: 'audit_unavailable' }])
})

t.test('/healthz tells anyone it is alive, and only a caller with the metrics token the lines\' addresses and whether calls are audited', async t => {
  // With audit.onFailure "open", "audit":"unavailable" would tell a client when its calls are served without a record.
  const upstream = await fakeUpstream(t)
  const failing: AuditWriter = { write () {}, available: false, stats: () => ({ written: 0, failed: 1, lost: 0 }), reopen () {}, close: async () => {} }
  const withToken = await startGateway(t, testConfig(upstream.url, { audit: { file: '-', onFailure: 'open' }, metrics: { token: METRICS_TOKEN } }), { auditWriter: failing })
  const without = await startGateway(t, testConfig(upstream.url, { audit: { file: '-', onFailure: 'open' } }), { auditWriter: failing })
  for (const [gw, headers, who] of [
    [withToken, {}, 'no token'], [withToken, { authorization: 'Bearer wrong-token-0123456789abcdef' }, 'a wrong token'],
    [withToken, { authorization: `Bearer ${KEYS.full}` }, 'a client\'s key'], [without, { authorization: `Bearer ${METRICS_TOKEN}` }, 'no token configured']
  ] as const) {
    const res = await fetch(`${gw.url}/healthz`, { headers })
    t.same([res.status, await res.text()], [200, '{"status":"ok"}'], `${who}: alive, and nothing more`)
  }
  t.match(await healthDetails(withToken.url), {
    status: 200, body: { status: 'ok', audit: 'unavailable', store: 'ok', upstream: [{ line: 0, host: new URL(upstream.url).host, state: 'up' }] }
  }, 'the metrics token: the details')
})

t.test('/readyz: 503 "store_unavailable" while Redis is disconnected and store.onFailure is closed (every call refused), ready again when it is back; with "open" it stays ready', async t => {
  const redis = await startRedis(t)
  const upstream = await fakeUpstream(t)
  const closed = await startGateway(t, ...withoutOwnership(upstream.url, { store: { url: redis.url, timeoutMs: 2000, onFailure: 'closed' }, metrics: { token: METRICS_TOKEN } }))
  const open = await startGateway(t, ...withoutOwnership(upstream.url, { store: { url: redis.url, timeoutMs: 2000, onFailure: 'open' }, metrics: { token: METRICS_TOKEN } }))
  const probe = async (gw: { url: string }, path: string) => {
    const res = await fetch(`${gw.url}${path}`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } })
    return [res.status, await res.json()] as const
  }
  t.same(await probe(closed, '/readyz'), [200, { status: 'ready' }])
  t.match(await probe(closed, '/healthz'), [200, { status: 'ok', store: 'ok' }])

  await redis.stop()
  t.equal((await call(closed.url, 'GET', '/v1/conversations/conv_1/items')).status, 503, 'closed: every call is refused')
  await eventually(async () => (await probe(closed, '/readyz'))[0] === 503, 'closed: not ready')
  t.same(await probe(closed, '/readyz'), [503, { status: 'store_unavailable' }], 'closed: not ready, and why')
  t.match(await probe(closed, '/healthz'), [200, { status: 'ok', store: 'unavailable' }], '/healthz stays 200 and says so')
  t.equal((await call(open.url, 'GET', '/v1/conversations/conv_1/items')).status, 404,
    'open: the call is served from a local bucket (the upstream\'s 404 for an unknown id), not refused')
  t.same(await probe(open, '/readyz'), [200, { status: 'ready' }], 'open: still ready')
  t.match(await probe(open, '/healthz'), [200, { store: 'unavailable' }])

  // No call comes while the replica is out of rotation: the store's own reconnection makes it ready again.
  await redis.start()
  await eventually(async () => (await probe(closed, '/readyz'))[0] === 200, 'ready again once Redis is back')
  t.same(await probe(closed, '/readyz'), [200, { status: 'ready' }], 'ready again once Redis is back')
  t.match(await probe(closed, '/healthz'), [200, { store: 'ok' }])
})

t.test('/readyz: a Redis that stops answering (paused, stuck in a long command) with no call coming is found out by the store itself: 503 "store_unavailable", then ready again', async t => {
  // A replica just started, or with no traffic yet, would otherwise say ready while every call it gets is refused.
  const redis = await startRedis(t)
  const upstream = await fakeUpstream(t)
  const closed = await startGateway(t, ...withoutOwnership(upstream.url, { store: { url: redis.url, timeoutMs: 2000, onFailure: 'closed' } }))
  const readyz = async () => { const res = await fetch(`${closed.url}/readyz`); return [res.status, await res.json()] as const }
  t.same(await readyz(), [200, { status: 'ready' }])
  redis.pause()
  await eventually(async () => (await readyz())[0] === 503, 'not ready, with no call made')
  t.same(await readyz(), [503, { status: 'store_unavailable' }])
  t.same(closed.audit(), [], 'no call was made')
  redis.resume()
  await eventually(async () => (await readyz())[0] === 200, 'ready again once Redis answers')
  t.equal((await call(closed.url, 'GET', '/v1/conversations/conv_1/items')).status, 404, 'and calls are admitted (the upstream\'s 404 for an unknown id)')
})

t.test('check-config refuses a client with both key forms, or neither', async t => {
  const base = { upstream: { baseUrls: ['http://x'], apiKey: 'k' } }
  const both = { id: 'a', keySha256: keyDigest(KEYS.full), keys: [{ id: 'k', sha256: keyDigest(KEY_A) }], scopes: ['read'] }
  t.throws(() => parseConfig({ ...base, clients: [both] }), { message: /clients\[0\]: give either keySha256 or keys, not both/ })
  t.throws(() => parseConfig({ ...base, clients: [{ id: 'a', scopes: ['read'] }] }), { message: /clients\[0\]: give either keySha256 or keys, not neither/ })
  t.throws(() => parseConfig({ ...base, clients: [{ ...both, keySha256: undefined, keys: [{ id: 'k', sha256: keyDigest(KEY_A), expiresAt: 'tomorrow' }] }] }),
    { message: /clients\[0\]\.keys\[0\]\.expiresAt: must be a date and time/ })
})

t.test('an expiresAt on a day its month does not have is refused, not taken for a day of the next month', async t => {
  // JavaScript's Date reads 2025-06-31 as July 1 and 2025-02-29 as March 1: a key meant to end with June would
  // have worked a day longer, with nothing said.
  const config = (expiresAt: string) => ({
    upstream: { baseUrls: ['http://x'], apiKey: 'k' },
    clients: [{ id: 'a', keys: [{ id: 'k', sha256: keyDigest(KEY_A), expiresAt }], scopes: ['read'] }]
  })
  for (const expiresAt of ['2025-06-31T00:00:00Z', '2025-02-29T12:00:00+02:00', '2100-02-29T00:00Z', '2025-04-00T00:00:00Z']) {
    t.throws(() => parseConfig(config(expiresAt)), { message: /clients\[0\]\.keys\[0\]\.expiresAt: not a valid time/ }, expiresAt)
  }
  for (const expiresAt of ['2024-02-29T00:00:00Z', '2000-02-29T00:00Z', '2025-06-30T23:59:59.999-07:00', '2025-12-31T24:00:00Z']) {
    t.doesNotThrow(() => parseConfig(config(expiresAt)), expiresAt)
  }
})

t.test('upstream.apiKeyFile: the token is read from the file (one trailing line break dropped); exactly one of the two forms', async t => {
  const { dir } = configFile('')
  const file = join(dir, 'token')
  writeFileSync(file, 'sk-from-file\n')
  t.equal(parseConfig({ upstream: { baseUrls: ['http://x'], apiKeyFile: file } }).upstream.apiKey, 'sk-from-file')
  t.throws(() => parseConfig({ upstream: { baseUrls: ['http://x'], apiKeyFile: file, apiKey: 'k' } }), { message: /upstream: give either apiKey or apiKeyFile, not both/ })
  t.throws(() => parseConfig({ upstream: { baseUrls: ['http://x'] } }), { message: /upstream\.apiKey: is required \(or upstream\.apiKeyFile\)/ })
  t.throws(() => parseConfig({ upstream: { baseUrls: ['http://x'], apiKeyFile: join(dir, 'missing') } }), { message: /upstream\.apiKeyFile: cannot read .*ENOENT/ })
  writeFileSync(file, 'sk-one\nsk-two\n')
  t.throws(() => parseConfig({ upstream: { baseUrls: ['http://x'], apiKeyFile: file } }), { message: /upstream\.apiKeyFile: the file must hold the token alone/ })
  // A secret mounted before its value was filled in: said as such, not as a token with something beside it.
  for (const empty of ['', '\n']) {
    writeFileSync(file, empty)
    t.throws(() => parseConfig({ upstream: { baseUrls: ['http://x'], apiKeyFile: file } }), { message: /upstream\.apiKeyFile: the file is empty: it must hold the OhMyGPT token/ }, JSON.stringify(empty))
  }
})

t.test('upstream.apiKeyFile holding an env file\'s line (OHMYGPT_API_KEY=sk-...) is refused, not sent as the token, and the token is not quoted', async t => {
  // The whole line went upstream as the Bearer token: every call 502 upstream_auth_failed, with nothing at start.
  const { dir } = configFile('')
  const file = join(dir, 'token')
  for (const line of ['OHMYGPT_API_KEY=sk-Secret0123456789\n', 'OHMYGPT_API_KEY="sk-Secret0123456789"']) {
    writeFileSync(file, line)
    const err = (() => { try { parseConfig({ upstream: { baseUrls: ['http://x'], apiKeyFile: file } }) } catch (e) { return e as Error } })()
    t.match(err, { message: /upstream\.apiKeyFile: the file holds NAME=value \(an env file's line\?\): it must hold the token alone/ }, line)
    t.notMatch(err?.message, /Secret0123456789/, 'without the token')
  }
  // A token that ends in base64's padding is a token.
  writeFileSync(file, 'c2stdG9rZW4tMDEyMzQ1Njc4OQ==')
  t.equal(parseConfig({ upstream: { baseUrls: ['http://x'], apiKeyFile: file } }).upstream.apiKey, 'c2stdG9rZW4tMDEyMzQ1Njc4OQ==')
})
