// node bench/audit-fsync.js: what each audit.fsync mode costs (after `npm run build`). The gateway never waits
// for the audit (records are written after the response, off the event loop), so the cost of a mode is what it
// takes from the disk and the writer: fsyncs per second, the time they keep a libuv thread busy, how many
// records wait in the buffer, and the writer's top speed. The durability each mode buys is in the README.
//
// The real writer (dist/audit/writer.js) takes gateway-shaped records at an offered rate, handed over each
// millisecond as a busy gateway would, for SECONDS seconds; fsyncs are counted by wrapping FileHandle.datasync.
// Settings (environment): AUDIT_BENCH_SECONDS (3), AUDIT_BENCH_RATES ("200,2000,10000" records/s).
import { mkdtempSync, rmSync } from 'node:fs'
import { open } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { setTimeout as sleep } from 'node:timers/promises'
import { openAuditWriter } from '../dist/audit/writer.js'

const SECONDS = Number(process.env.AUDIT_BENCH_SECONDS ?? 3)
const RATES = (process.env.AUDIT_BENCH_RATES ?? '200,2000,10000').split(',').map(Number)
const quiet = { info () {}, warn () {}, error () {} }

// Count and time every fdatasync the writer makes.
const probe = await open(join(tmpdir(), `audit-fsync-probe-${process.pid}`), 'w')
const FileHandle = Object.getPrototypeOf(probe)
await probe.close()
rmSync(join(tmpdir(), `audit-fsync-probe-${process.pid}`))
const syncs = { count: 0, ms: 0 }
const datasync = FileHandle.datasync
FileHandle.datasync = async function () {
  const t0 = performance.now()
  try { return await datasync.call(this) } finally { syncs.count++; syncs.ms += performance.now() - t0 }
}

function record (i) {
  return {
    time: new Date().toISOString(), requestId: `gw_${String(i).padStart(32, '0')}`, clientId: 'team-search',
    action: 'item.retrieve', method: 'GET', path: `/v1/conversations/conv_${i}/items/msg_${i}`,
    conversationId: `conv_${i}`, itemId: `msg_${i}`, status: 200, outcome: 'ok', durationMs: 12, upstreamMs: 10,
    upstreamRequestId: `req_${i}`, bytesIn: 0, bytesOut: 812, ip: '10.0.0.7', userAgent: 'OpenAI/Python 1.99.0'
  }
}

async function withWriter (fsync, body) {
  const dir = mkdtempSync(join(tmpdir(), 'audit-fsync-'))
  const writer = await openAuditWriter({ file: join(dir, 'audit.jsonl'), fsync, rotate: { daily: false, keep: 0, gzip: false }, log: quiet, maxPending: 1e7 })
  try { return await body(writer) } finally { await writer.close(); rmSync(dir, { recursive: true, force: true }) }
}

/** Records per second when handed over as fast as the event loop goes. */
function topSpeed (fsync, n = 30_000) {
  return withWriter(fsync, async writer => {
    const start = performance.now()
    for (let i = 0; i < n; i += 500) {
      for (let j = i; j < i + 500; j++) writer.write(record(j))
      await new Promise(resolve => setImmediate(resolve))
    }
    while (writer.stats().written < n) await sleep(1)
    return n / (performance.now() - start) * 1000
  })
}

function offered (fsync, rate) {
  return withWriter(fsync, async writer => {
    syncs.count = 0
    syncs.ms = 0
    const start = performance.now()
    let handed = 0
    let maxWaiting = 0
    for (let now = 0; now < SECONDS * 1000; now = performance.now() - start) {
      for (const due = Math.floor(now * rate / 1000); handed < due; handed++) writer.write(record(handed))
      maxWaiting = Math.max(maxWaiting, handed - writer.stats().written)
      await sleep(1)
    }
    while (writer.stats().written < handed) await sleep(1)
    const seconds = (performance.now() - start) / 1000
    return { syncsPerSecond: syncs.count / seconds, syncMsPerSecond: syncs.ms / seconds, maxWaiting, lost: writer.stats().lost }
  })
}

console.log(`audit.fsync: cost per mode (ext4 under ${tmpdir()}, ${SECONDS} s per rate)\n`)
console.log('mode      top speed     | ' + RATES.map(r => `at ${r}/s: fsync/s, fsync ms/s, max waiting`.padEnd(40)).join(' | '))
for (const fsync of ['off', 'interval', 'every']) {
  const speed = await topSpeed(fsync)
  const cells = []
  for (const rate of RATES) {
    const r = await offered(fsync, rate)
    cells.push(`${r.syncsPerSecond.toFixed(0).padStart(5)}, ${r.syncMsPerSecond.toFixed(0).padStart(4)} ms, ${String(r.maxWaiting).padStart(5)}${r.lost ? ` LOST ${r.lost}` : ''}`.padEnd(40))
  }
  console.log(`${fsync.padEnd(9)} ${Math.round(speed).toString().padStart(6)} rec/s | ${cells.join(' | ')}`)
}
