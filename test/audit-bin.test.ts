// The audit trail of the real bin: one writer per series, SIGUSR2, no record lost to a SIGTERM right after a
// burst, and a stdout that nobody reads freezes nothing.
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { renameSync } from 'node:fs'
import { createServer, type AddressInfo } from 'node:net'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import { parsed, tempDir } from './fixtures/audit.js'
import { BIN, BIN_CLIENT, BIN_KEY, configFile, env, gatewayYaml, run, startBin } from './fixtures/bin.js'
import { startUpstream } from './fixtures/upstream.js'

function del (url: string, i: number) {
  return fetch(`${url}/v1/conversations/conv_1/items/msg_${i}`, { method: 'DELETE', headers: { authorization: `Bearer ${BIN_KEY}` } })
}

t.test('a second gateway on the same audit file is refused at start with a clear message', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const { file } = configFile(gatewayYaml(auditFile))
  const { child } = await startBin(t, file, {})
  const second = run(['start', '--config', file])
  t.equal(second.status, 1)
  t.match(second.stderr, new RegExp(`audit file ${auditFile} is in use by another gateway process \\(pid ${child.pid}`))
  t.notMatch(second.stderr, /    at /, 'no stack trace')
})

t.test('SIGTERM right after a burst: every call has its record, and the chain is intact', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  upstream.respond = (req, res) => {
    res.writeHead(200, { 'content-type': 'application/json' })
    // GET: the gateway's ownership lookup, which finds the conversation is this client's
    res.end(req.method === 'GET' ? `{"id":"conv_1","object":"conversation","metadata":{"gateway_owner":"${BIN_CLIENT}"}}` : '{"deleted":true}')
  }
  const auditFile = join(tempDir(), 'audit.jsonl')
  const { file } = configFile(gatewayYaml(auditFile, upstream.url))
  const { child, url } = await startBin(t, file, {})
  const N = 300
  for (let i = 0; i < N; i += 50) {
    const statuses = await Promise.all(Array.from({ length: 50 }, (_v, j) => del(url, i + j).then(r => r.status)))
    t.ok(statuses.every(s => s === 200), `calls ${i + 1}..${i + 50}`)
  }
  child.kill('SIGTERM')
  const [code] = await once(child, 'exit')
  t.equal(code, 0)
  const records = parsed(auditFile)
  t.equal(records.length, N)
  t.same(records.map(r => r.itemId).sort(), Array.from({ length: N }, (_v, i) => `msg_${i}`).sort())
  t.equal(run(['audit', 'verify', '--config', file]).stdout.split(',')[0], `ok: ${N} records`)
})

t.test('SIGUSR2 reopens the audit file after an outside logrotate moved it, and the chain runs on across both', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const { file } = configFile(gatewayYaml(auditFile))
  const { child, url, output } = await startBin(t, file, {})
  t.equal((await del(url, 1)).status, 502) // no upstream: recorded all the same
  await sleep(100)
  renameSync(auditFile, `${auditFile}-20250101`)
  child.kill('SIGUSR2')
  for (let i = 0; i < 50 && !output.text.includes('audit: reopened'); i++) await sleep(20)
  t.match(output.text, /SIGUSR2: reopening the audit file/)
  t.equal((await del(url, 2)).status, 502)
  child.kill('SIGTERM')
  await once(child, 'exit')
  t.same(parsed(`${auditFile}-20250101`).map(r => r.itemId), ['msg_1'])
  t.same(parsed(auditFile).map(r => r.itemId), ['msg_2'])
  t.match(run(['audit', 'verify', '--config', file]).stdout, /^ok: 2 records, chain intact/)
})

async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  await new Promise(resolve => server.close(resolve))
  return port
}

t.test('with audit.file "-" and a stdout nobody reads, the gateway keeps answering (calls and /healthz); records it could not write make its exit 1', async t => {
  const port = await freePort()
  const { file } = configFile(gatewayYaml('-', 'http://127.0.0.1:9', port))
  // stdout is a pipe this test never reads: once the pipe's buffer is full, every write to it would block
  const child = spawn(process.execPath, [BIN, 'start', '--config', file], { env, stdio: ['ignore', 'pipe', 'ignore'] })
  t.teardown(() => { child.kill('SIGKILL') })
  const base = `http://127.0.0.1:${port}`
  for (let i = 0; ; i++) {
    if (await fetch(`${base}/healthz`).then(() => true, () => false)) break
    if (i > 200) throw new Error('the gateway did not start')
    await sleep(50)
  }
  const statuses = new Map<number, number>()
  for (let i = 0; i < 400; i++) {
    const status = (await del(base, i)).status
    statuses.set(status, (statuses.get(status) ?? 0) + 1)
  }
  t.same([...statuses.keys()], [502], '400 calls answered (no upstream here: 502), far past a full pipe')
  const health = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(5000) })
  t.equal(health.status, 200)
  const exited = once(child, 'exit')
  child.kill('SIGTERM')
  const [code] = await exited
  t.equal(code, 1, 'SIGTERM: exit 1, the records still waiting for the pipe are lost')
})

t.test('the stale lock of a gateway that was killed does not stop the next one', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const { file } = configFile(gatewayYaml(auditFile))
  const first = await startBin(t, file, {})
  first.child.kill('SIGKILL')
  await once(first.child, 'exit')
  // It first watches the lock for the 5 s its heartbeat would take to show (audit/lock.ts STALE_AFTER_MS): the usual
  // 10 s to listen left 5 for the start itself, which a busy machine outran (a full run on Node 24, load 8).
  const second = await startBin(t, file, {}, [], 5_000 + 10_000)
  t.match(second.output.text, /taking over a stale lock/)
})
