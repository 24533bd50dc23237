// Signals that come while `start` is still loading the gateway's code (under a second, seconds on a busy machine),
// before its config is read and anything opened: a stop is honoured at once (exit 0, one log line), also when the
// gateway is PID 1 (a container without an init, where a signal with no handler is dropped and `docker stop` waits
// its whole timeout); a SIGHUP or SIGUSR2 does not end the process, and is answered once it is built. Real
// processes, with Node's loading of the code held at dist/server.js (fixtures/hold-load.mjs).
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import t, { type Test } from 'tap'
import { BIN, BIN_KEY, configFile, env as binEnv, gatewayYaml } from './fixtures/bin.js'
import { call } from './fixtures/client.js'
import { eventually } from './fixtures/eventually.js'
import { startUpstream, UPSTREAM_TOKEN } from './fixtures/upstream.js'

const HOLD_LOAD = resolve('test/fixtures/hold-load.mjs')

/**
 * `start` (run by `wrapper` if given), resolved once Node is loading the gateway's code, held at dist/server.js:
 * `go()` lets the load go on. `pid` is the gateway's own process.
 */
async function startWhileLoading (t: Test, wrapper: string[] = []) {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { file, dir } = configFile('')
  writeFileSync(file, gatewayYaml(join(dir, 'audit.jsonl'), upstream.url).replace('apiKey: sk-test', `apiKey: ${UPSTREAM_TOKEN}`))
  const node = [process.execPath, '--import', HOLD_LOAD, BIN, 'start', '--config', file]
  const [command, ...args] = [...wrapper, ...node]
  const child = spawn(command!, args, { env: { ...binEnv, HOLD_LOAD_AT: '/dist/server.js', HOLD_LOAD_DIR: dir } })
  t.teardown(() => child.kill('SIGKILL'))
  const output = { text: '' }
  child.stdout.on('data', (c: Buffer) => { output.text += c.toString() })
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>
  await eventually(async () => existsSync(join(dir, 'loading')), 'Node loading the gateway\'s code')
  // (under a wrapper, the gateway is the wrapper's child)
  const pid = wrapper.length === 0 ? child.pid! : Number(readFileSync(`/proc/${child.pid}/task/${child.pid}/children`, 'utf8').trim())
  return { child, pid, output, exited, dir, go: () => { writeFileSync(join(dir, 'go'), '') } }
}

t.test('a SIGTERM while the gateway\'s code loads stops it at once: exit 0, one log line, nothing opened', async t => {
  const { pid, output, exited, dir, go } = await startWhileLoading(t)
  process.kill(pid, 'SIGTERM')
  go()
  t.same(await exited, [0, null], 'exit 0, not ended by the signal')
  const lines = output.text.trim().split('\n').map(l => JSON.parse(l) as Record<string, unknown>)
  t.match(lines, [{ level: 30, pid, signal: 'SIGTERM', msg: 'SIGTERM: stopped while starting, before anything was opened' }],
    'one line, as the operational log writes them')
  t.notOk(existsSync(join(dir, 'audit.jsonl')), 'the audit was never opened')
  t.notOk(existsSync(join(dir, 'audit.jsonl.lock')), 'no audit lock left behind')
})

const pidNamespace = spawnSync('unshare', ['--pid', '--fork', 'true']).status === 0 ? false : 'unshare --pid cannot make a PID namespace here'
t.test('a SIGTERM while the gateway\'s code loads, the gateway being PID 1 (docker stop, no init): it stops', { skip: pidNamespace }, async t => {
  const { child, pid, output, exited, go } = await startWhileLoading(t, ['unshare', '--pid', '--fork', '--kill-child'])
  t.equal(readFileSync(`/proc/${pid}/status`, 'utf8').match(/^NSpid:.*\s(\d+)$/m)?.[1], '1', 'the gateway is PID 1 in its namespace')
  process.kill(pid, 'SIGTERM')
  go() // (a lost signal: it goes on to listen)
  const listening = new Promise(resolve => { child.stdout.on('data', () => { if (/Server listening/.test(output.text)) resolve('listening') }) })
  t.same(await Promise.race([exited, listening]), [0, null], 'the process exits 0')
  t.match(output.text, /SIGTERM: stopped while starting/)
})

t.test('a SIGHUP and a SIGUSR2 while the gateway\'s code loads do not end it: they are answered once it is built', async t => {
  const { child, pid, output, exited, go } = await startWhileLoading(t)
  process.kill(pid, 'SIGHUP') // by default, each ends a process
  process.kill(pid, 'SIGUSR2')
  go()
  const url = await eventually(async () => /Server listening at (http:\/\/[^"]+)/.exec(output.text)?.[1] ??
    (child.exitCode !== null || child.signalCode !== null ? 'exited' : null), 'the gateway listening', 20_000)
  t.same([child.exitCode, child.signalCode], [null, null], 'the signals did not end the process')
  await eventually(async () => /SIGHUP: config reloaded/.test(output.text) && /audit: reopened/.test(output.text), 'the reload and the reopen')
  t.equal((await call(url, 'GET', '/v1/conversations/conv_1/items', { key: BIN_KEY })).status, 404, 'and it serves (the upstream has no conv_1)')
  child.kill('SIGTERM')
  t.same(await exited, [0, null])
})
