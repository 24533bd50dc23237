// npm run bench: what the gateway costs, as ratios against the fake upstream loaded directly, side by side.
//
// Three processes, three event loops: this one generates load (autocannon), bench/upstream.js runs the fake
// OhMyGPT, bench/gateway.js runs the gateway in front of it. Each scenario loads the upstream directly
// (baseline) and the same request through the gateway, alternating sides round by round, and takes the median
// per side. Absolute numbers depend on the machine (and here three processes share its cores); the ratios are
// the result. Results go to stdout and bench/results/latest.json.
//
// Settings (environment): BENCH_SECONDS (5) per measured run, BENCH_WARMUP_SECONDS (1), BENCH_ROUNDS (2),
// BENCH_CONNECTIONS (32).
import { execFileSync, fork } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import { generateKey, keyDigest } from '../dist/keys.js'

const HERE = dirname(fileURLToPath(import.meta.url))
const RESULTS_FILE = join(HERE, 'results', 'latest.json')
const MiB = 1024 * 1024

const settings = {
  seconds: positiveNumber('BENCH_SECONDS', 5),
  warmupSeconds: positiveNumber('BENCH_WARMUP_SECONDS', 1),
  rounds: positiveInteger('BENCH_ROUNDS', 2),
  connections: positiveInteger('BENCH_CONNECTIONS', 32),
  bodyBytes: 1024,
  /** high enough that the gateway's per-client limit never answers 429 during a run */
  rateLimit: { requestsPerMinute: 100_000_000, burst: 100_000_000 },
  /** after a scenario, before its "after" memory sample */
  settleSeconds: 1
}

function positiveNumber (name, fallback) {
  const raw = process.env[name]
  if (raw === undefined || raw === '') return fallback
  const value = Number(raw)
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${name} must be a positive number, got "${raw}"`)
  return value
}

function positiveInteger (name, fallback) {
  const value = positiveNumber(name, fallback)
  if (!Number.isInteger(value)) throw new Error(`${name} must be a positive integer, got "${value}"`)
  return value
}

// ---------------------------------------------------------------------------------------------------------
// Children: started, watched, and always ended, whatever way this process ends.

const children = new Set()
let stopping = false
const tmp = mkdtempSync(join(tmpdir(), 'ohmygpt-gateway-bench-'))

process.on('exit', () => {
  stopping = true
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  rmSync(tmp, { recursive: true, force: true })
})
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => {
    console.error(`\nbench: ${signal}, stopping`)
    process.exit(130)
  })
}

/** Forks a bench child, sends it its options and resolves with its URL once it listens. */
function startChild (name, options) {
  const child = fork(join(HERE, `${name}.js`), [], {
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    execArgv: ['--expose-gc'] // only used for the last memory sample, after the load
  })
  children.add(child)
  child.on('exit', (code, signal) => {
    children.delete(child)
    if (stopping) return
    console.error(`bench: the ${name} child exited unexpectedly (code ${code}, signal ${signal})`)
    process.exit(1)
  })
  return new Promise((resolve, reject) => {
    child.on('message', function onReady (message) {
      if (message.type === 'ready') {
        child.off('message', onReady)
        resolve({ name, child, url: message.url })
      } else if (message.type === 'failed') {
        child.off('message', onReady)
        reject(new Error(`the ${name} child failed to start:\n${message.error}`))
      }
    })
    child.send({ type: 'start', options })
  })
}

async function stopChildren () {
  stopping = true
  await Promise.all([...children].map(child => new Promise(resolve => {
    const kill = setTimeout(() => child.kill('SIGKILL'), 3000)
    child.once('exit', () => { clearTimeout(kill); resolve() })
    if (child.connected) child.disconnect() // the child exits when its parent lets go of it
    else child.kill('SIGTERM')
  })))
}

let memorySeq = 0
/** The child's RSS now, its peak RSS since the previous question, and its heap. */
function memory ({ child }, { gc = false } = {}) {
  const seq = ++memorySeq
  return new Promise(resolve => {
    child.on('message', function onMemory (message) {
      if (message.type !== 'memory' || message.seq !== seq) return
      child.off('message', onMemory)
      resolve(message)
    })
    child.send({ type: 'memory', seq, gc })
  })
}

// ---------------------------------------------------------------------------------------------------------
// Load.

/** One autocannon run; throughput is completed requests over the measured duration. */
function load ({ url, method, headers, body, seconds }) {
  return new Promise((resolve, reject) => {
    autocannon({ url, method, headers, body, connections: settings.connections, duration: seconds },
      (err, result) => {
        if (err) return reject(err)
        resolve({
          reqPerSec: result.requests.total / result.duration,
          p50: result.latency.p50,
          p99: result.latency.p99,
          requests: result.requests.total,
          non2xx: result.non2xx,
          errors: result.errors,
          timeouts: result.timeouts,
          statusCodes: Object.fromEntries(Object.entries(result.statusCodeStats).map(([s, v]) => [s, v.count]))
        })
      })
  })
}

function median (values) {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

function summarise (runs) {
  return {
    reqPerSec: median(runs.map(r => r.reqPerSec)),
    p50: median(runs.map(r => r.p50)),
    p99: median(runs.map(r => r.p99)),
    failed: runs.reduce((n, r) => n + r.non2xx + r.errors + r.timeouts, 0),
    runs
  }
}

async function call (url, { method = 'GET', headers = {}, body } = {}) {
  const res = await fetch(url, { method, headers, body })
  const text = await res.text()
  if (res.status !== 200) throw new Error(`${method} ${url} answered ${res.status}: ${text.slice(0, 500)}`)
  return JSON.parse(text)
}

function itemsBody (bytes) {
  const shell = { items: [{ type: 'message', role: 'user', content: [{ type: 'input_text', text: '' }] }] }
  const filler = 'The quick brown fox jumps over the lazy dog. '.repeat(Math.ceil(bytes / 45))
  shell.items[0].content[0].text = filler.slice(0, bytes - JSON.stringify(shell).length)
  return JSON.stringify(shell)
}

// ---------------------------------------------------------------------------------------------------------

async function main () {
  const expectedSeconds = 2 * (2 * settings.warmupSeconds + 2 * settings.rounds * settings.seconds + settings.settleSeconds)
  setTimeout(() => {
    console.error(`bench: still running after ${Math.round(expectedSeconds * 1.5 + 30)} s, giving up`)
    process.exit(1)
  }, (expectedSeconds * 1.5 + 30) * 1000).unref()

  const upstreamToken = `sk-bench-${generateKey()}`
  const key = generateKey()
  const upstream = await startChild('upstream', { apiKey: upstreamToken })
  const gateway = await startChild('gateway', {
    config: {
      listen: { host: '127.0.0.1', port: 0 },
      log: { level: 'warn' },
      upstream: { baseUrls: [upstream.url], apiKey: upstreamToken },
      clients: [{ id: 'bench', keySha256: keyDigest(key), scopes: ['read', 'write', 'delete'], rateLimit: settings.rateLimit }],
      audit: { file: join(tmp, 'audit.jsonl') }
    }
  })
  const sides = {
    baseline: { url: upstream.url, headers: { authorization: `Bearer ${upstreamToken}` } },
    gateway: { url: gateway.url, headers: { authorization: `Bearer ${key}` } }
  }
  const json = { 'content-type': 'application/json' }

  // Conversations are created through the gateway, so they stay usable if it comes to check ownership; the
  // baseline reads and writes them directly with the upstream token.
  const createConversation = async () => (await call(`${gateway.url}/v1/conversations`,
    { method: 'POST', headers: { ...sides.gateway.headers, ...json }, body: '{"metadata":{"bench":"1"}}' })).id
  const deleteConversation = (id) => call(`${gateway.url}/v1/conversations/${id}`,
    { method: 'DELETE', headers: sides.gateway.headers })

  const readId = await createConversation()
  // Both sides must answer the same thing, or the comparison is meaningless.
  const direct = await call(`${upstream.url}/v1/conversations/${readId}`, { headers: sides.baseline.headers })
  const proxied = await call(`${gateway.url}/v1/conversations/${readId}`, { headers: sides.gateway.headers })
  if (JSON.stringify(direct) !== JSON.stringify(proxied)) {
    throw new Error(`the gateway and the upstream disagree:\n${JSON.stringify(direct)}\n${JSON.stringify(proxied)}`)
  }

  const body = itemsBody(settings.bodyBytes)
  const scenarios = [
    { name: 'GET conversation', method: 'GET', path: (id) => `/v1/conversations/${id}` },
    {
      // Each run writes to a fresh conversation, deleted afterwards, so the fake's memory does not grow from
      // run to run and later runs do not pay for earlier ones.
      name: `POST items (${Buffer.byteLength(body)} B)`,
      method: 'POST',
      body,
      headers: json,
      path: (id) => `/v1/conversations/${id}/items`,
      freshConversation: true
    }
  ]

  console.log(`ohmygpt-gateway bench: node ${process.version}, ${cpus().length} cores, ` +
    `${settings.connections} connections, ${settings.seconds} s x ${settings.rounds} rounds per side ` +
    `(+${settings.warmupSeconds} s warm-up), loopback\n`)

  const results = []
  for (const scenario of scenarios) {
    const run = async (side, seconds) => {
      const id = scenario.freshConversation ? await createConversation() : readId
      const result = await load({
        url: sides[side].url + scenario.path(id),
        method: scenario.method,
        headers: { ...sides[side].headers, ...scenario.headers },
        body: scenario.body,
        seconds
      })
      if (scenario.freshConversation) await deleteConversation(id)
      return result
    }

    const before = { gateway: await memory(gateway), upstream: await memory(upstream) }
    const warmup = [await run('baseline', settings.warmupSeconds), await run('gateway', settings.warmupSeconds)]
    const runs = { baseline: [], gateway: [] }
    for (let round = 0; round < settings.rounds; round++) {
      // baseline, gateway, gateway, baseline, ...: a drift in the machine's speed hits both sides alike.
      const order = round % 2 === 0 ? ['baseline', 'gateway'] : ['gateway', 'baseline']
      for (const side of order) {
        const result = await run(side, settings.seconds)
        runs[side].push(result)
        const failed = result.non2xx + result.errors + result.timeouts
        console.log(`  ${scenario.name}, round ${round + 1}, ${side}: ${Math.round(result.reqPerSec)} req/s` +
          (failed > 0 ? `, ${failed} NOT 2xx ${JSON.stringify(result.statusCodes)}` : ''))
      }
    }
    await sleep(settings.settleSeconds * 1000)
    const after = { gateway: await memory(gateway), upstream: await memory(upstream) }

    const baseline = summarise(runs.baseline)
    const proxiedSide = summarise(runs.gateway)
    results.push({
      name: scenario.name,
      request: `${scenario.method} ${scenario.path('{id}')}`,
      baseline,
      gateway: proxiedSide,
      ratio: { reqPerSec: proxiedSide.reqPerSec / baseline.reqPerSec, p99: proxiedSide.p99 / baseline.p99 },
      warmupFailed: warmup.reduce((n, r) => n + r.non2xx + r.errors + r.timeouts, 0),
      memory: Object.fromEntries(['gateway', 'upstream'].map(name => [name, {
        beforeRss: before[name].rss, peakRss: after[name].peak, afterRss: after[name].rss
      }]))
    })
  }
  const final = { gateway: await memory(gateway, { gc: true }), upstream: await memory(upstream, { gc: true }) }
  await stopChildren()

  print(results, final)
  const failed = results.reduce((n, r) => n + r.baseline.failed + r.gateway.failed + r.warmupFailed, 0)
  writeResults(results, final)
  if (failed > 0) {
    console.error(`\n!!!!!!!! ${failed} requests were not answered 2xx (or failed or timed out): ` +
      'these numbers measure errors, not the gateway. See statusCodes in ' + RESULTS_FILE + ' !!!!!!!!')
    process.exitCode = 1
  }
}

// ---------------------------------------------------------------------------------------------------------
// Output.

const fmt = {
  int: n => String(Math.round(n)),
  ms: n => (Number.isInteger(n) ? String(n) : n.toFixed(1)),
  ratio: n => n.toFixed(2),
  mib: n => (n / MiB).toFixed(1)
}

function table (rows) {
  const widths = rows[0].map((_, i) => Math.max(...rows.map(r => r[i].length)))
  return rows.map(r => r.map((cell, i) => i === 0 ? cell.padEnd(widths[i]) : cell.padStart(widths[i])).join('  ')).join('\n')
}

function print (results, final) {
  console.log('\nthroughput and latency: median per side; ratio = gateway / baseline (baseline = the fake upstream, direct)')
  console.log(table([
    ['scenario', 'base req/s', 'gw req/s', 'ratio', 'p50 ms b/g', 'p99 ms b/g', 'p99 ratio', 'non-2xx b/g'],
    ...results.map(r => [
      r.name, fmt.int(r.baseline.reqPerSec), fmt.int(r.gateway.reqPerSec), fmt.ratio(r.ratio.reqPerSec),
      `${fmt.ms(r.baseline.p50)} / ${fmt.ms(r.gateway.p50)}`, `${fmt.ms(r.baseline.p99)} / ${fmt.ms(r.gateway.p99)}`,
      fmt.ratio(r.ratio.p99), `${r.baseline.failed} / ${r.gateway.failed}`
    ])
  ]))
  console.log('\nmemory: RSS in MiB, before the scenario / peak during it / after it')
  console.log(table([
    ['scenario', 'gateway before/peak/after', 'upstream before/peak/after'],
    ...results.map(r => [r.name, ...['gateway', 'upstream'].map(n =>
      `${fmt.mib(r.memory[n].beforeRss)} / ${fmt.mib(r.memory[n].peakRss)} / ${fmt.mib(r.memory[n].afterRss)}`)])
  ]))
  console.log(`after all runs and a GC: gateway RSS ${fmt.mib(final.gateway.rss)} MiB, heap ${fmt.mib(final.gateway.heapUsed)} MiB; ` +
    `upstream RSS ${fmt.mib(final.upstream.rss)} MiB, heap ${fmt.mib(final.upstream.heapUsed)} MiB`)
  console.log(`\nAbsolute numbers are for this machine only (${cpus().length} cores shared by the load generator, the ` +
    'gateway and the upstream); compare the ratios.')
}

function gitRevision () {
  try {
    const rev = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: HERE, encoding: 'utf8' }).trim()
    const dirty = execFileSync('git', ['status', '--porcelain', '--', 'src'], { cwd: HERE, encoding: 'utf8' }).trim() !== ''
    return dirty ? `${rev}+dirty` : rev
  } catch {
    return null
  }
}

function writeResults (results, final) {
  mkdirSync(dirname(RESULTS_FILE), { recursive: true })
  writeFileSync(RESULTS_FILE, JSON.stringify({
    date: new Date().toISOString(),
    node: process.version,
    platform: `${process.platform} ${process.arch}`,
    cpus: { count: cpus().length, model: cpus()[0]?.model ?? null },
    revision: gitRevision(),
    settings,
    note: 'baseline = the fake upstream loaded directly; ratio = gateway / baseline; absolute numbers are machine-specific',
    scenarios: results,
    afterGc: Object.fromEntries(Object.entries(final).map(([n, m]) => [n, { rss: m.rss, heapUsed: m.heapUsed }]))
  }, null, 2) + '\n')
  console.log(`results: ${RESULTS_FILE}`)
}

main().catch(err => {
  console.error(`bench: ${err instanceof Error ? err.stack : String(err)}`)
  process.exitCode = 1
}).finally(() => stopChildren())
