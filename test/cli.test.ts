// The ohmygpt-gateway bin as ops run it: a real process, real config files, real signals.
import { spawn, spawnSync } from 'node:child_process'
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { once } from 'node:events'
import { lookup } from 'node:dns/promises'
import { connect, createServer, type AddressInfo } from 'node:net'
import t, { type Test } from 'tap'
import { keyDigest } from '../src/keys.js'
import { BIN, configFile, env, gatewayYaml, run, runAsync, startBin } from './fixtures/bin.js'
import { eventually } from './fixtures/eventually.js'
import { closedPort, startUpstream } from './fixtures/upstream.js'

const DIGEST = keyDigest('ogw_cli-test-key')
const good = (dir: string) => `
listen: { host: 127.0.0.1, port: 0 }
upstream: { baseUrls: ["http://127.0.0.1:9"], apiKey: "\${OHMYGPT_API_KEY}" }
audit: { file: ${join(dir, 'audit.jsonl')} }
clients:
  - { id: team-a, keySha256: "${DIGEST}", scopes: [read] }
`

t.test('check-config exits 0 for a good file and 1 naming every bad field', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir))
  const ok = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(ok.status, 0)
  t.match(ok.stdout, /ok \(1 client\)/)

  writeFileSync(file, good(dir) + `  - { id: team-a, keySha256: "${DIGEST}", scopes: [read], colour: blue }\n`)
  const bad = run(['check-config', '--config', file])
  t.equal(bad.status, 1)
  for (const field of ['upstream.apiKey: environment variable OHMYGPT_API_KEY is not set', 'clients[1].colour: unknown key']) {
    t.ok(bad.stderr.includes(field), field)
  }
  t.notOk(bad.stderr.includes('    at '), 'no stack trace')
})

t.test('check-config refuses an apiKeyFile or caFile that is not a regular file (a FIFO would hang it), and follows symlinks to one', async t => {
  const { file, dir } = configFile('')
  const fifo = join(dir, 'fifo')
  t.equal(spawnSync('mkfifo', [fifo]).status, 0, 'a FIFO nobody writes to')
  symlinkSync(fifo, join(dir, 'to-fifo'))
  writeFileSync(join(dir, 'token'), 'sk-from-file\n')
  symlinkSync(join(dir, 'token'), join(dir, 'to-token')) // a mounted secret (Kubernetes: ..data/ links)
  const withUpstream = (upstream: string) => good(dir).replace(/upstream: .*\n/, `upstream: ${upstream}\n`)
  for (const [what, upstream] of [
    ['apiKeyFile, a FIFO', `{ baseUrls: ["http://127.0.0.1:9"], apiKeyFile: "${fifo}" }`],
    ['apiKeyFile, a symlink to a FIFO', `{ baseUrls: ["http://127.0.0.1:9"], apiKeyFile: "${join(dir, 'to-fifo')}" }`],
    ['caFile, a FIFO', `{ baseUrls: ["https://127.0.0.1:9"], apiKey: sk-test, caFile: "${fifo}" }`],
    ['caFile, a directory', `{ baseUrls: ["https://127.0.0.1:9"], apiKey: sk-test, caFile: "${dir}" }`]
  ] as const) {
    writeFileSync(file, withUpstream(upstream))
    const r = run(['check-config', '--config', file])
    t.equal(r.status, 1, `${what}: refused (not killed stuck)`)
    t.match(r.stderr, /upstream\.(apiKeyFile|caFile): cannot read .*: not a regular file/, `${what}: says why`)
  }
  writeFileSync(file, withUpstream(`{ baseUrls: ["http://127.0.0.1:9"], apiKeyFile: "${join(dir, 'to-token')}" }`))
  t.equal(run(['check-config', '--config', file]).status, 0, 'a symlink to a regular file is read')
})

t.test('a config file too large to be a gateway\'s (a wrong path: a log, a dump) is refused before it is read whole', async t => {
  const { file, dir } = configFile('')
  // One scalar of 9 MiB: the YAML parser would take 20 to 40 times that in memory to read it.
  writeFileSync(file, good(dir) + `note: "${'a'.repeat(9 * 1024 * 1024)}"\n`)
  for (const [command, how] of [
    [`exec "${process.execPath}" ${BIN} check-config --config "${file}"`, 'check-config, a file'],
    [`cat "${file}" | exec "${process.execPath}" ${BIN} start --config /dev/stdin`, 'start, a pipe']
  ] as const) {
    const r = spawnSync('sh', ['-c', command], { encoding: 'utf8', env: { ...env, OHMYGPT_API_KEY: 'x' }, timeout: 20_000, killSignal: 'SIGKILL' })
    t.equal(r.status, 1, `${how}: exit 1`)
    t.match(r.stderr, /cannot read the file: it is larger than 8 MiB \(a config of 10,000 clients is about 2 MB\): is it the right file\?/, `${how}: says why`)
    t.notOk(r.stderr.includes('aaaa'), `${how}: without repeating the file`)
  }
  const apiKeyFile = join(dir, 'token')
  writeFileSync(apiKeyFile, 'a'.repeat(9 * 1024 * 1024))
  writeFileSync(file, good(dir).replace(/apiKey: .*\}/, `apiKeyFile: "${apiKeyFile}" }`))
  const r = run(['check-config', '--config', file])
  t.equal(r.status, 1)
  t.match(r.stderr, /upstream\.apiKeyFile: cannot read .*: it is larger than 8 MiB/, 'an apiKeyFile as well')
})

t.test('check-config finds its file through GATEWAY_CONFIG', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir))
  const r = run(['check-config'], { OHMYGPT_API_KEY: 'x', GATEWAY_CONFIG: file })
  t.equal(r.status, 0)
  t.match(r.stdout, file)
})

t.test('start exits 1 on a bad config, before listening', async t => {
  const { file } = configFile('upstream: { baseUrls: [] }\n')
  const r = run(['start', '--config', file])
  t.equal(r.status, 1)
  t.match(r.stderr, /upstream\.baseUrls/)
  t.match(r.stderr, /upstream\.apiKey: is required/)
})

t.test('start and check-config given the config file without --config say to give it with --config', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir))
  for (const command of ['start', 'check-config']) {
    const r = run([command, file], { OHMYGPT_API_KEY: 'x' })
    t.equal(r.status, 1, `${command}: exit 1`)
    t.equal(r.stderr, `ohmygpt-gateway ${command}: unexpected argument '${file}': a config file is given as --config ${file}\n`, `${command}: says how`)
  }
  t.match(run(['start', '--watch', file]).stderr, `a config file is given as --config ${file}`, 'after another option too')
})

t.test('an AUDIT_HMAC_KEY with whitespace (a secret file\'s trailing newline) is refused by check-config, start and audit verify, not used', async t => {
  // Kubernetes hands a secret made --from-file of `openssl rand -hex 32 > key` to the gateway with its newline; the
  // auditor's shell ($(cat key)) drops it, and every record of the chain the gateway wrote would fail to verify.
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir))
  const key = 'a'.repeat(64)
  const start = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x', AUDIT_HMAC_KEY: `${key}\n` })
  t.equal(start.status, 1)
  t.equal(start.stderr, 'ohmygpt-gateway start: AUDIT_HMAC_KEY must not contain whitespace or control characters (a trailing newline from a secret file?)\n')
  // check-config said ok to the environment start then refused: a deploy checked with it failed at start.
  const check = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x', AUDIT_HMAC_KEY: `${key}\n` })
  t.equal(check.status, 1, 'check-config refuses it too')
  t.equal(check.stderr, 'ohmygpt-gateway check-config: AUDIT_HMAC_KEY must not contain whitespace or control characters (a trailing newline from a secret file?)\n')
  const short = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x', AUDIT_HMAC_KEY: 'short' })
  t.equal(short.status, 1, 'and a key too short to trust')
  t.match(short.stderr, /AUDIT_HMAC_KEY is too short \(5 characters; at least 32/)
  t.equal(run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x', AUDIT_HMAC_KEY: key }).status, 0, 'a good key passes')
  for (const spelled of [`${key}\n`, `${key}\r\n`, ` ${key}`, `${key.slice(0, 32)} ${key.slice(32)}`, `${key}\t`]) {
    const verify = run(['audit', 'verify', '--config', file], { AUDIT_HMAC_KEY: spelled })
    t.equal(verify.status, 1, JSON.stringify(spelled.replace(key, 'KEY')))
    t.match(verify.stderr, /AUDIT_HMAC_KEY must not contain whitespace or control characters/)
    t.notOk(verify.stderr.includes(key.slice(0, 16)), 'the key is not echoed')
  }
})

t.test('start serves, and on SIGTERM drains, writes the audit and exits 0', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, `${good(dir)}metrics: { token: "\${METRICS_TOKEN}" }\n`)
  const { child, url, output } = await startBin(t, file, { OHMYGPT_API_KEY: 'x', METRICS_TOKEN: 'cli-test-metrics-token-0123' })
  t.same(await (await fetch(`${url}/healthz`)).json(), { status: 'ok' }, 'alive, to anyone')
  const health = await fetch(`${url}/healthz`, { headers: { authorization: 'Bearer cli-test-metrics-token-0123' } })
  t.match(await health.json(), { status: 'ok', audit: 'ok', upstream: [{ line: 0, host: '127.0.0.1:9', state: 'up' }] }, 'the details, to the metrics token')
  const denied = await fetch(`${url}/v1/conversations`, { method: 'POST', headers: { authorization: 'Bearer ogw_cli-test-key-wrong' } })
  t.equal(denied.status, 401)

  child.kill('SIGTERM')
  const [code] = await once(child, 'exit')
  t.equal(code, 0)
  const records = readFileSync(join(dir, 'audit.jsonl'), 'utf8').trim().split('\n').map(l => JSON.parse(l))
  t.match(records, [{ action: 'conversation.create', status: 401, outcome: 'denied' }], 'healthz is not audited')
  t.notOk(output.text.includes('ogw_cli-test-key-wrong'), 'the presented key is not logged')
})

t.test('listen timeouts past Node\'s own 5-minute request timeout, which check-config accepts, start with too', async t => {
  // Fastify hands Node headersTimeout when it makes the server and sets requestTimeout only afterwards, so Node
  // checked headersTimeoutMs against its default requestTimeout (300000): start died with a RangeError and a
  // stack trace on a config check-config said was ok (headersTimeoutMs 300001, requestTimeoutMs 600000).
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace('port: 0 }', 'port: 0, headersTimeoutMs: 300001, requestTimeoutMs: 600000 }'))
  t.equal(run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' }).status, 0, 'check-config says ok')
  const { child, url } = await startBin(t, file, { OHMYGPT_API_KEY: 'x' })
  t.equal((await fetch(`${url}/readyz`)).status, 200, 'and start serves')
  child.kill('SIGTERM')
  const [code] = await once(child, 'exit')
  t.equal(code, 0)
})

t.test('an ownership.cacheSize the gateway could not allocate is refused by check-config, not met by start with a crash and its audit lock left', async t => {
  // The owner and issued-item caches reserve their room when the gateway is built: 10^10 entries threw a RangeError
  // (stack trace, exit 1) after the audit file was opened, leaving its lock for the next start to wait on, on a
  // config check-config called ok; 10^8 took 6 GB before the first call.
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir) + 'ownership: { cacheSize: 10000000000 }\n')
  const check = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(check.status, 1)
  t.match(check.stderr, /ownership\.cacheSize: must be <= 10000000/)
  const start = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(start.status, 1)
  t.notOk(start.stderr.includes('    at '), 'no stack trace')
  t.notOk(existsSync(join(dir, 'audit.jsonl.lock')), 'no audit lock left behind')
})

t.test('an upstream.baseUrls entry no URL parser takes (a port over 65535, an IPv4 address out of range) is refused by check-config, not met by start with a crash', async t => {
  // The schema's pattern let them through; start then died on new URL() with a TypeError and a stack trace, after
  // the audit file was opened, leaving its lock for the next start to wait on.
  for (const url of ['http://127.0.0.1:99999', 'http://999.1.1.1']) {
    const { file, dir } = configFile('')
    writeFileSync(file, good(dir).replace('http://127.0.0.1:9', url))
    const check = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
    t.equal(check.status, 1, `${url}: check-config refuses it`)
    t.match(check.stderr, /upstream\.baseUrls\[0\]: not a valid URL/)
    const start = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
    t.equal(start.status, 1)
    t.notOk(start.stderr.includes('    at '), 'no stack trace')
    t.notOk(existsSync(join(dir, 'audit.jsonl.lock')), 'no audit lock left behind')
  }
})

t.test('a stdout whose reader is gone (a log shipper that died) does not end the gateway at its next log line: it serves, and stops cleanly', async t => {
  // Node ignores SIGPIPE: the write fails with EPIPE, an 'error' event nobody listened for, which ended the process
  // with a stack trace at the next line (an upstream failure, a reload, the SIGTERM itself), its lock left behind.
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir))
  const { child, url } = await startBin(t, file, { OHMYGPT_API_KEY: 'x' })
  const stderr: string[] = []
  child.stderr.on('data', (c: Buffer) => { stderr.push(c.toString()) })
  child.stdout.destroy() // the reader goes: the gateway's next write to stdout fails with EPIPE
  child.kill('SIGHUP') // a line: "config reloaded"
  const answered = await fetch(`${url}/v1/conversations/conv_1`, { headers: { authorization: 'Bearer ogw_cli-test-key' } })
  t.equal(answered.status, 502, 'served (its upstream is down, and that is a log line too)')
  t.equal(child.exitCode, null, 'still running')
  child.kill('SIGTERM')
  const [code] = await once(child, 'exit')
  t.equal(code, 0, 'a clean stop')
  t.notOk(existsSync(join(dir, 'audit.jsonl.lock')), 'its audit lock removed')
  t.match(readFileSync(join(dir, 'audit.jsonl'), 'utf8').trim().split('\n').map(l => JSON.parse(l)), [{ status: 502 }], 'the call audited')
  t.notMatch(stderr.join(''), /Unhandled 'error'|\n\s+at /, 'no crash')
  t.match(stderr.join(''), /^ohmygpt-gateway: the log's output failed \(EPIPE\): log lines are dropped from now on\n$/, 'said once, on stderr')
})

t.test('a config with no clients is accepted, and check-config, start and a reload say that every call will be refused', async t => {
  // (A deployment made before its teams are added by a reload is legitimate; `clients:` left empty by mistake is
  // not, and showed only as 401s.)
  const { file, dir } = configFile('')
  const none = good(dir).replace(/clients:\n.*\n/, 'clients: []\n')
  writeFileSync(file, none)
  const check = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(check.status, 0, 'accepted')
  t.match(check.stdout, /ok \(0 clients: every API call will be refused with 401 until one is added\)/)
  const { child, url, output } = await startBin(t, file, { OHMYGPT_API_KEY: 'x' })
  const warned = () => output.text.split('\n').filter(line => /"level":40.*no clients in the config: every API call is refused with 401/.test(line)).length
  t.equal(warned(), 1, 'start says it at warn')
  t.equal((await fetch(`${url}/v1/conversations/conv_1`, { headers: { authorization: 'Bearer ogw_cli-test-key' } })).status, 401)
  writeFileSync(file, `${none}log: { level: info }\n`)
  child.kill('SIGHUP')
  await eventually(async () => warned() === 2, 'a reload that leaves no clients says it again')
  writeFileSync(file, good(dir))
  child.kill('SIGHUP')
  await eventually(async () => output.text.includes('config reloaded: clients'), 'the reload that adds one')
  t.equal(warned(), 2, 'not said once there is a client')
  t.not((await fetch(`${url}/v1/conversations/conv_1`, { headers: { authorization: 'Bearer ogw_cli-test-key' } })).status, 401, 'served')
})

t.test('SIGTERM lets in-flight calls finish, refuses new ones, and audits every call', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const held: Array<() => void> = []
  upstream.respond = (req, res) => {
    if (req.url === '/v1/conversations/conv_1') { // the gateway's ownership lookup: team-a's conversation
      res.writeHead(200, { 'content-type': 'application/json' })
      res.end('{"id":"conv_1","object":"conversation","metadata":{"gateway_owner":"team-a"}}')
      return
    }
    held.push(() => { res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"list","data":[]}') })
  }
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace('"http://127.0.0.1:9"', `"${upstream.url}"`))
  const { child, url } = await startBin(t, file, { OHMYGPT_API_KEY: 'x' })
  const call = () => fetch(`${url}/v1/conversations/conv_1/items`, { headers: { authorization: 'Bearer ogw_cli-test-key' } })
  const inFlight = [call(), call(), call()]
  while (held.length < 3) await new Promise(resolve => setTimeout(resolve, 10))

  child.kill('SIGTERM')
  const exited = once(child, 'exit')
  await new Promise(resolve => setTimeout(resolve, 200))
  const refused = await call().then(r => r.status, () => 'connection refused')
  t.ok(refused === 503 || refused === 'connection refused', `a new call during the drain is refused (${refused})`)
  for (const release of held) release()
  const statuses = await Promise.all(inFlight.map(p => p.then(r => r.status)))
  t.same(statuses, [200, 200, 200], 'every in-flight call completed')
  const [code] = await exited
  t.equal(code, 0)
  const records = readFileSync(join(dir, 'audit.jsonl'), 'utf8').trim().split('\n').map(l => JSON.parse(l))
  t.equal(records.filter(r => r.status === 200 && r.outcome === 'ok').length, 3, 'one complete record per in-flight call')
})

t.test('demo --port with a value that is no port says so, naming --port, and starts nothing', async t => {
  for (const port of ['abc', '', '70000', '1.5', ' 8080']) {
    const r = run(['demo', '--port', port])
    t.equal(r.status, 1, `--port "${port}"`)
    t.equal(r.stderr, 'ohmygpt-gateway demo: --port takes a port number from 0 to 65535\n', `--port "${port}": the flag named`)
  }
})

t.test('the demo serves a conversation with the key it prints, writes the audit to stdout, and outlives a SIGHUP and a body that is JSON but no object', async t => {
  const child = spawn(process.execPath, [BIN, 'demo', '--port', '0'], { env })
  t.teardown(() => { child.kill('SIGKILL') })
  let err = ''
  let out = ''
  child.stdout.on('data', (c: Buffer) => { out += c.toString() })
  const banner = await new Promise<RegExpExecArray>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no banner in: ${err}`)), 10_000)
    child.stderr.on('data', (c: Buffer) => {
      err += c.toString()
      const m = /curl -s (http:\/\/127\.0\.0\.1:\d+)\/v1\/conversations -H 'Authorization: Bearer (ogw_[\w-]+)'/.exec(err)
      if (m) { clearTimeout(timer); resolve(m) }
    })
  })
  t.match(err, /^Authorization: Bearer ogw_/m)
  child.kill('SIGHUP')
  await eventually(async () => out.includes('there is no config file to reload'), 'the demo says SIGHUP has nothing to reload')
  const res = await fetch(`${banner[1]}/v1/conversations`, {
    method: 'POST',
    headers: { authorization: `Bearer ${banner[2]}`, 'content-type': 'application/json' },
    body: '{"metadata":{"topic":"demo"}}'
  })
  t.equal(res.status, 200)
  const conversation = await res.json() as { id: string }
  t.match(conversation.id, /^conv_/)
  // JSON, so the gateway passes it on to the built-in fake OhMyGPT, which runs in the demo's own process.
  for (const body of ['null', '{"items":[null]}']) {
    const odd = await fetch(`${banner[1]}/v1/conversations/${conversation.id}/items`, {
      method: 'POST', headers: { authorization: `Bearer ${banner[2]}`, 'content-type': 'application/json' }, body
    })
    t.equal(odd.status, 400, `adding items with ${body} is refused as OpenAI would`)
    t.match(await odd.json(), { error: { type: 'invalid_request_error' } })
  }
  const echoed = await fetch(`${banner[1]}/v1/responses`, {
    method: 'POST',
    headers: { authorization: `Bearer ${banner[2]}`, 'content-type': 'application/json' },
    body: '{"model":"gpt-4o-mini","input":[{"role":"user","content":[null]}]}'
  })
  t.equal(echoed.status, 200, 'a response whose input holds a null part is answered')
  const after = await fetch(`${banner[1]}/v1/conversations/${conversation.id}`, { headers: { authorization: `Bearer ${banner[2]}` } })
  t.equal(after.status, 200, 'and the demo is still there')
  child.kill('SIGTERM')
  const [code] = await once(child, 'exit')
  t.equal(code, 0)
  t.match(out.trim().split('\n').map(line => JSON.parse(line)).find(r => r.action === 'conversation.create'),
    { clientId: 'demo', action: 'conversation.create', conversationId: conversation.id, outcome: 'ok' })
})

t.test('check-config reports a listen host this machine cannot use and an audit directory that cannot be created', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace('host: 127.0.0.1', 'host: 203.0.113.7').replace(join(dir, 'audit.jsonl'), '/dev/null/audit/a.jsonl'))
  const r = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(r.status, 1)
  t.match(r.stderr, /listen\.host: cannot listen on 203\.0\.113\.7.*EADDRNOTAVAIL/)
  t.match(r.stderr, /audit\.file: cannot create the directory \/dev\/null\/audit: ENOTDIR/)
  t.notOk(r.stderr.includes('    at '), 'no stack trace')
})

t.test('check-config reports a metrics.listen host this machine cannot use, which start refuses', async t => {
  const { file, dir } = configFile('')
  for (const [listen, reason] of [['203.0.113.7:0', /EADDRNOTAVAIL/], ['no-such-host.invalid:0', /ENOTFOUND|EAI_AGAIN/]] as const) {
    writeFileSync(file, good(dir) + `metrics: { listen: "${listen}" }\n`)
    const start = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
    t.equal(start.status, 1, `${listen}: start refuses it`)
    t.match(start.stderr, reason)
    const r = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
    t.equal(r.status, 1, `${listen}: check-config says so`)
    t.match(r.stderr, new RegExp(`metrics\\.listen: cannot listen on ${listen.split(':')[0]!.replace(/\./g, '\\.')}:0: .*${reason.source}`))
  }
  writeFileSync(file, good(dir) + 'metrics: { listen: "[::1]:0" }\n')
  t.equal(run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' }).status, 0, 'a usable one passes ([v6] form)')
})

t.test('check-config leaves no audit directory behind: it makes the missing ones to check them, then removes them', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace(join(dir, 'audit.jsonl'), join(dir, 'var', 'audit', 'audit.jsonl')))
  const r = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(r.status, 0, r.stderr)
  t.same(readdirSync(dir), ['gateway.yaml'], 'no var/audit left (a later mount or chown there would find it taken)')
})

/**
 * The error code this machine's kernel gives `act` (a mkdir, a file made), or null when it succeeds (its undo run).
 * What /proc and /sys refuse, and how, depends on how they are mounted: /sys is read-only (EROFS) in a default
 * container, writable by root but without room for a file (EACCES) on a VM; the gateway must say whichever it meets.
 */
function refusalOf (act: () => void, undo: () => void): string | null {
  try {
    act()
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err)
  }
  undo()
  return null
}

const procRefusal = process.platform !== 'linux' ? null : refusalOf(() => { mkdirSync('/proc/ogw-audit') }, () => { rmSync('/proc/ogw-audit', { recursive: true }) })
t.test('an audit directory that cannot be made under /proc is reported, not retried for ever', { skip: procRefusal === null && 'no /proc that refuses a directory here' }, async t => {
  // Node's recursive mkdir never returns there (ENOENT although the parent exists): check-config hung at full CPU.
  const code = procRefusal!
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace(join(dir, 'audit.jsonl'), '/proc/ogw-audit/a.jsonl'))
  const r = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(r.signal, null, 'it returned (run() kills it after 20 s)')
  t.equal(r.status, 1)
  t.match(r.stderr, `audit.file: cannot create the directory /proc/ogw-audit: ${code}\n`, `the kernel's reason (${code})`)
  const start = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(start.status, 1)
  t.equal(start.stderr, `ohmygpt-gateway start: audit.file: cannot create the directory /proc/ogw-audit: ${code}\n`)
})

t.test('an audit directory that is a file is reported by check-config, as start would meet it', async t => {
  const { file, dir } = configFile('')
  writeFileSync(join(dir, 'not-a-dir'), '')
  writeFileSync(file, good(dir).replace(join(dir, 'audit.jsonl'), join(dir, 'not-a-dir', 'audit.jsonl')))
  const r = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(r.status, 1)
  t.match(r.stderr, /audit\.file: cannot create the directory .*not-a-dir: EEXIST/)
  writeFileSync(file, good(dir).replace(join(dir, 'audit.jsonl'), join(dir, 'not-a-dir', 'sub', 'audit.jsonl')))
  t.match(run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' }).stderr, /cannot create the directory .*not-a-dir\/sub: ENOTDIR/)
})

t.test('check-config and start refuse an audit.file that names a directory (a trailing slash) with the same line', async t => {
  // AUDIT_FILE=/var/log/gateway/: check-config said ok (the directory above it could be written in), and start was
  // refused by the audit lock, "cannot write the audit lock .../.lock: ENOENT", which says nothing of the cause.
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace(join(dir, 'audit.jsonl'), `${join(dir, 'logs')}/`))
  refusedByBoth(t, file, `audit.file: ${join(dir, 'logs')}/ names a directory: give the file's path in it (${join(dir, 'logs')}/audit.jsonl)`)
})

t.test('check-config and start refuse an audit.file that is not a regular file (a link to /dev/null) with the same line', async t => {
  // start refused it (records would vanish while every write succeeds); check-config said ok.
  const { file, dir } = configFile('')
  symlinkSync('/dev/null', join(dir, 'audit.jsonl'))
  writeFileSync(file, good(dir))
  refusedByBoth(t, file, `audit.file: ${join(dir, 'audit.jsonl')} is not a regular file (a symbolic link, device, pipe or directory): ` +
    'records are written only into a regular file')
})

/** check-config lists `problem`, and start refuses with it alone, in one line (no stack trace). */
function refusedByBoth (t: Test, file: string, problem: string): void {
  const check = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(check.status, 1)
  t.match(check.stderr, problem)
  const start = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(start.status, 1)
  t.equal(start.stderr, `ohmygpt-gateway start: ${problem}\n`, 'one line, no stack trace')
}

// /sys/kernel: it exists, and no user, root included, can make a file in it (EACCES where /sys is mounted writable,
// EROFS in a default container).
const sysRefusal = process.platform !== 'linux' ? null : refusalOf(() => { closeSync(openSync('/sys/kernel/.ogw-check', 'wx')) }, () => { rmSync('/sys/kernel/.ogw-check') })
t.test('check-config and start report an audit directory the gateway cannot write in', { skip: (sysRefusal === null || sysRefusal === 'ENOENT') && 'no /sys/kernel that refuses a file here' }, async t => {
  // As a host directory bind-mounted over /app/audit that uid 1000 cannot write: check-config said ok, and start
  // died with a stack trace from the audit lock. /sys/kernel stands for it here.
  const code = sysRefusal!
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace(join(dir, 'audit.jsonl'), '/sys/kernel/audit.jsonl'))
  const check = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(check.status, 1)
  t.match(check.stderr, `audit.file: cannot write in the directory /sys/kernel: ${code}`, `the kernel's reason (${code})`)
  const start = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(start.status, 1)
  t.equal(start.stderr, `ohmygpt-gateway start: audit.file: cannot write in the directory /sys/kernel: ${code}\n`, 'one line, no stack trace')
})

t.test('start fails with one clear line, not a stack trace, when it cannot listen or create the audit directory', async t => {
  const { file, dir } = configFile('')
  writeFileSync(file, good(dir).replace('host: 127.0.0.1', 'host: 203.0.113.7'))
  const host = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(host.status, 1)
  t.match(host.stderr, /^ohmygpt-gateway start: cannot listen on 203\.0\.113\.7:0: .*EADDRNOTAVAIL/m)
  t.notOk(host.stderr.includes('    at '), 'no stack trace')
  // Refused before the audit is opened: no empty audit file, no lock, for the operator to wonder about.
  t.same(readdirSync(dir), ['gateway.yaml'], 'nothing left in the audit directory')

  writeFileSync(file, good(dir).replace(join(dir, 'audit.jsonl'), '/dev/null/audit/a.jsonl'))
  const audit = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(audit.status, 1)
  t.equal(audit.stderr.trim().split('\n').length, 1, 'one line')
  t.match(audit.stderr, /audit\.file: cannot create the directory \/dev\/null\/audit: ENOTDIR/)

  // A metrics port already taken is named as metrics.listen's, not the main listener's.
  const taken = createServer()
  await new Promise<void>(resolve => { taken.listen(0, '127.0.0.1', resolve) })
  t.teardown(() => { taken.close() })
  const takenPort = (taken.address() as AddressInfo).port
  writeFileSync(file, good(dir) + `metrics: { listen: "127.0.0.1:${takenPort}" }\n`)
  const metrics = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(metrics.status, 1)
  t.equal(metrics.stderr.trim().split('\n').length, 1, 'one line')
  t.match(metrics.stderr, new RegExp(`^ohmygpt-gateway start: metrics\\.listen: cannot listen on 127\\.0\\.0\\.1:${takenPort}: .*EADDRINUSE`, 'm'))
  t.same(readdirSync(dir), ['gateway.yaml'], 'nothing left in the audit directory')

  // Its own port taken (another gateway, a process left over): the same, before the audit is opened.
  writeFileSync(file, good(dir).replace('port: 0', `port: ${takenPort}`))
  const port = run(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(port.status, 1)
  t.equal(port.stderr, `ohmygpt-gateway start: cannot listen on 127.0.0.1:${takenPort}: the port is in use (EADDRINUSE)\n`, 'one line')
  t.same(readdirSync(dir), ['gateway.yaml'], 'nothing left in the audit directory')
})

t.test('start refuses its two listeners on one port, the address named two ways, before the audit is opened', async t => {
  // localhost and 127.0.0.1: the config cannot tell them one address, and each is free alone; the gateway's own
  // listener then took the port its metrics listener wanted, once the audit was open.
  const localhost = await lookup('localhost')
  if (localhost.address !== '127.0.0.1') {
    t.comment(`localhost is ${localhost.address} here: the two listeners do not meet`)
    return
  }
  const { file, dir } = configFile('')
  const port = await closedPort()
  writeFileSync(file, good(dir).replace('port: 0', `port: ${port}`) + `metrics: { listen: "localhost:${port}" }\n`)
  const both = await runAsync(['start', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(both.status, 1)
  t.equal(both.stderr, 'ohmygpt-gateway start: metrics.listen: its port is listen.port, on an address listen.host also takes; give the metrics a port of their own\n', 'one line')
  t.same(readdirSync(dir), ['gateway.yaml'], 'nothing left in the audit directory')
  // check-config says it too (found on a free port: the configured one may be the running gateway's)
  const checked = run(['check-config', '--config', file], { OHMYGPT_API_KEY: 'x' })
  t.equal(checked.status, 1)
  t.match(checked.stdout + checked.stderr, /metrics\.listen: its port is listen\.port, on an address listen\.host also takes/)
})

t.test('a secret that a mistyped ${VAR} put in another field (trustProxy, listen.host) is not quoted by check-config or start', async t => {
  const { file, dir } = configFile('')
  const secrets = {
    OHMYGPT_API_KEY: 'sk-cli-SECRET-token-0123456789',
    METRICS_TOKEN: 'metrics-SECRET-token-0123456789',
    REDIS_PASSWORD: 'redis-SECRET-pw-0123',
    // (no field of the config: the audit chain's key, read from the environment beside it)
    AUDIT_HMAC_KEY: 'hmac-SECRET-key-0123456789abcdef0123456789'
  }
  const yaml = (host: string, trustProxy: string, store: string) => `
listen: { host: "${host}", port: 0 }
trustProxy: ${trustProxy}
upstream: { baseUrls: ["http://127.0.0.1:9"], apiKey: "\${OHMYGPT_API_KEY}" }
metrics: { token: "\${METRICS_TOKEN}" }
store: { url: "${store}" }
audit: { file: ${join(dir, 'audit.jsonl')} }
clients:
  - { id: team-a, keySha256: "${DIGEST}", scopes: [read] }
`
  const leaked = (text: string) => Object.values(secrets).filter(secret => text.includes(secret))
  writeFileSync(file, yaml('127.0.0.1', '["${METRICS_TOKEN}", "${REDIS_PASSWORD}", "${AUDIT_HMAC_KEY}"]', 'redis://:${REDIS_PASSWORD}@127.0.0.1:9/0'))
  const entries = run(['check-config', '--config', file], secrets)
  t.equal(entries.status, 1)
  t.match(entries.stderr, /trustProxy\[0\]: invalid IP address: \[redacted\]/, 'the entry named by its place')
  t.match(entries.stderr, /trustProxy\[1\]: invalid IP address: \[redacted\]/)
  t.match(entries.stderr, /trustProxy\[2\]: invalid IP address: \[redacted\]/)
  t.same(leaked(entries.stderr + entries.stdout), [])

  for (const secret of ['${OHMYGPT_API_KEY}', '${AUDIT_HMAC_KEY}']) {
    writeFileSync(file, yaml(secret, 'false', 'memory://'))
    const host = run(['check-config', '--config', file], secrets)
    t.equal(host.status, 1)
    t.match(host.stderr, /listen\.host: cannot listen on \[redacted\]:0/, secret)
    t.same(leaked(host.stderr + host.stdout), [])
    const start = run(['start', '--config', file], secrets)
    t.equal(start.status, 1)
    t.match(start.stderr, /cannot listen on \[redacted\]:0/, secret)
    t.same(leaked(start.stderr + start.stdout), [])
  }
})

t.test('listen.host localhost where it names two addresses: every address the gateway takes connections on answers as the gateway', async t => {
  // A machine whose /etc/hosts maps localhost to 127.0.0.1 and ::1 (this one maps it to 127.0.0.1 only). Fastify
  // listened on the second address with a server of its own, which had none of the gateway's connection handling
  // (a CONNECT closed without an answer, listen.maxConnections, the drain, accept errors: an EMFILE ended the process).
  const { file, dir } = configFile('')
  const preload = join(dir, 'hosts.mjs')
  writeFileSync(preload, `import dns from 'node:dns'
const lookup = dns.lookup
dns.lookup = function (host, options, callback) {
  if (host === 'localhost' && typeof options === 'object' && options.all === true) {
    return process.nextTick(callback, null, [{ address: '127.0.0.1', family: 4 }, { address: '::1', family: 6 }])
  }
  return lookup.apply(this, arguments)
}
`)
  writeFileSync(file, gatewayYaml(join(dir, 'audit.jsonl')).replace('host: 127.0.0.1', 'host: localhost'))
  const { url } = await startBin(t, file, { NODE_OPTIONS: `--import ${preload}` })
  const port = Number(new URL(url).port)
  let answered = 0
  for (const host of ['127.0.0.1', '::1']) {
    const socket = connect({ host, port })
    const taken = await new Promise<boolean>(resolve => {
      socket.once('connect', () => resolve(true))
      socket.once('error', () => resolve(false))
    })
    if (!taken) continue
    socket.end('CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n')
    let received = ''
    socket.on('data', (chunk: Buffer) => { received += chunk.toString('latin1') })
    await once(socket, 'close')
    t.match(received, /^HTTP\/1\.1 4\d\d /, `${host}: CONNECT gets the gateway's 4xx answer, not a silent close`)
    answered++
  }
  t.ok(answered > 0, 'it listens')
})

t.test('listen.host localhost where the resolver gives ::1 first: the gateway and its metrics listen on 127.0.0.1, where the image\'s health check and the README\'s curl call', async t => {
  // Most Linux machines with IPv6 list `::1 localhost` beside `127.0.0.1 localhost`, and getaddrinfo puts ::1 first:
  // Node's own listen then takes ::1 alone, and http://127.0.0.1:8080 (the HEALTHCHECK, compose's, the README's
  // examples) is refused, where Fastify had listened on both. A client that names localhost tries each address.
  const { file, dir } = configFile('')
  const preload = join(dir, 'ipv6-first.mjs')
  writeFileSync(preload, `import dns from 'node:dns'
import { syncBuiltinESMExports } from 'node:module'
const both = [{ address: '::1', family: 6 }, { address: '127.0.0.1', family: 4 }]
const lookup = dns.lookup
dns.lookup = function (host, options, callback) {
  if (typeof options === 'function') { callback = options; options = {} }
  if (host !== 'localhost' || (typeof options === 'object' && (options.family ?? 0) !== 0)) return lookup.call(this, host, options, callback)
  if (typeof options === 'object' && options.all === true) return process.nextTick(callback, null, both)
  return process.nextTick(callback, null, '::1', 6)
}
const promised = dns.promises.lookup
dns.promises.lookup = async function (host, options) {
  if (host !== 'localhost' || (typeof options === 'object' && (options.family ?? 0) !== 0)) return promised.call(this, host, options)
  return typeof options === 'object' && options.all === true ? both : both[0]
}
syncBuiltinESMExports()
`)
  const metricsPort = await closedPort()
  writeFileSync(file, gatewayYaml(join(dir, 'audit.jsonl')).replace('host: 127.0.0.1', 'host: localhost') +
    `metrics: { listen: "localhost:${metricsPort}", token: metrics-token-0123456789 }\n`)
  t.equal(run(['check-config', '--config', file], { NODE_OPTIONS: `--import ${preload}` }).status, 0, 'check-config passes')
  const { url, output } = await startBin(t, file, { NODE_OPTIONS: `--import ${preload}` })
  t.match(url, /^http:\/\/127\.0\.0\.1:\d+$/, 'the gateway listens on 127.0.0.1')
  t.equal((await fetch(`${url}/healthz`)).status, 200, 'and answers there')
  await eventually(async () => output.text.includes('metrics listening'), 'the metrics listener')
  t.match(output.text, new RegExp(`"address":"127\\.0\\.0\\.1:${metricsPort}".*"msg":"metrics listening"`), 'so do the metrics')
})
