// The audit writer on its own: the chain goes on across restarts, rotation and outside tools, a torn last line
// is survived and reported, one writer per series, and a destination that stops taking records is a failed
// write (counted, then said in the trail), never a hang.
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { appendFileSync, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, statSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs'
import { open as fsOpen } from 'node:fs/promises'
import { basename, join } from 'node:path'
import { Writable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { chainHasher } from '../src/audit/chain.js'
import { seriesFiles } from '../src/audit/series.js'
import { verifySeries } from '../src/audit/verify.js'
import { queryFiles } from '../src/audit/query.js'
import { AuditStartError, openAuditWriter, type AuditWriterOptions } from '../src/audit/writer.js'
import { callRecord, linesOf, memoryLog, parsed, tempDir, writeSeries } from './fixtures/audit.js'
import { eventually } from './fixtures/eventually.js'

const sha256 = chainHasher()
const NO_ROTATION = { daily: false, keep: 0, gzip: false }

async function open (file: string, opts: Partial<AuditWriterOptions> = {}) {
  const log = memoryLog()
  const writer = await openAuditWriter({ file, fsync: 'off', rotate: NO_ROTATION, log, ...opts })
  return { writer, log }
}

async function verify (file: string) {
  return verifySeries((await seriesFiles(file)).map(f => f.path), sha256)
}

/** Until `check` holds. A file it reads may be gone for a moment (a rotation renamed it, the next is not yet made): not yet. */
async function until (what: string, check: () => boolean, ms = 5000) {
  const holds = () => {
    try {
      return check()
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false
      throw err
    }
  }
  for (const start = Date.now(); !holds(); await sleep(20)) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`)
  }
}

t.test('close() writes every record handed over, even right after a burst', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer } = await open(file)
  for (let i = 1; i <= 2500; i++) writer.write(callRecord(i))
  await writer.close()
  t.same(parsed(file).map(r => r.requestId), Array.from({ length: 2500 }, (_v, i) => callRecord(i + 1).requestId))
  t.same(writer.stats(), { written: 2500, failed: 0, lost: 0 })
  t.match(await verify(file), { ok: true, records: 2500 })
})

t.test('a restart continues the chain from the last record', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 5)
  const { writer, log } = await open(file)
  t.match(log.lines, [{ msg: 'audit: continuing the hash chain', obj: { seq: 6 } }])
  writer.write(callRecord(6))
  await writer.close()
  t.same(parsed(file).map(r => r.seq), [1, 2, 3, 4, 5, 6])
  t.match(await verify(file), { ok: true, records: 6 })
})

t.test('rotation by size keeps the chain, gzips closed files, and a restart after it goes on from the last file', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const rotate = { maxBytes: 4096, daily: false, keep: 0, gzip: true }
  await writeSeries(file, 30, { rotate })
  await writeSeries(file, 30, { rotate }, 31)
  const files = (await seriesFiles(file)).map(f => f.path)
  t.ok(files.length >= 5, `${files.length} files`)
  t.ok(files.slice(0, -1).every(f => f.endsWith('.gz')), 'closed files are gzipped')
  t.equal(files.at(-1), file, 'the active file comes last')
  t.match(await verify(file), { ok: true, records: 60, notes: [] })
})

t.test('rotate.keep removes the oldest files and the chain says so, so verify still accepts the series', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 60, { rotate: { maxBytes: 4096, daily: false, keep: 2, gzip: false } })
  const files = await seriesFiles(file)
  t.equal(files.length, 3, 'two closed files and the active one')
  t.ok(files[0]!.firstSeq! > 1, 'the oldest records are gone')
  const result = await verify(file)
  t.match(result, { ok: true, notes: [/removed by rotate.keep/] })
})

t.test('rotate.keep counts and removes only the writer\'s own files: files claiming seqs it never wrote push out none of its records', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const real = await writeSeries(file, 60, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: false } })
  const closed = real.slice(0, -1)
  t.ok(closed.length > 3, 'several closed files')
  // Someone who can write the directory, not the key, puts files there whose first records carry a seq beyond the
  // chain's head: sorted by first seq, they would be the newest "closed files", and keep would remove the real ones
  // (with a pruned record that the chain signs, so that verify accepts the real history gone).
  const fake = (seq: number) => JSON.stringify({ seq, prevHash: '0'.repeat(64), hash: '1'.repeat(64) }) + '\n'
  writeFileSync(file + '.fake-1', fake(1_000_000))
  writeFileSync(file + '.fake-2', fake(2_000_000))
  const { writer } = await open(file, { rotate: { maxBytes: 4096, daily: false, keep: 2, gzip: false } })
  writer.write(callRecord(61))
  await writer.close()
  const left = (await seriesFiles(file)).map(f => f.path)
  t.ok(existsSync(closed.at(-1)!) && existsSync(closed.at(-2)!), 'the two newest real closed files are kept')
  t.notOk(existsSync(closed[0]!), 'the oldest real ones are pruned')
  t.ok(left.includes(file + '.fake-1') && left.includes(file + '.fake-2'), 'the foreign files are left alone, for verify to name')
  const pruned = parsed(file).find(r => r.event === 'audit.pruned')
  t.match(pruned, { throughSeq: Number, files: Array }, 'the chain says what was pruned')
  t.ok((pruned!.throughSeq as number) < 61, 'through a seq the chain holds')
})

t.test('copies of closed files planted beside the series push none of its files out: keep counts only the files of the chain', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const real = await writeSeries(file, 60, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: false } })
  const closed = real.slice(0, -1)
  t.ok(closed.length > 3, 'several closed files')
  // Someone who can write the directory, not the key, puts there copies of the newest closed file's first line, and of
  // a whole closed file. Their first records are the chain's own: counted by keep, they pushed the oldest real files
  // out, the chain said keep had removed them, and once the copies were taken away verify accepted the history gone.
  for (let k = 1; k <= 3; k++) writeFileSync(`${file}.${k}`, linesOf(closed.at(-1)!)[0] + '\n')
  writeFileSync(`${file}.4`, readFileSync(closed[1]!))
  const { writer } = await open(file, { rotate: { maxBytes: 4096, daily: false, keep: closed.length, gzip: false } })
  writer.write(callRecord(61))
  await writer.close()
  t.ok(closed.every(f => existsSync(f)), `keep: ${closed.length} keeps the ${closed.length} real closed files`)
  t.notOk(parsed(file).some(r => r.event === 'audit.pruned'), 'the chain says nothing was pruned')
  for (let k = 1; k <= 4; k++) rmSync(`${file}.${k}`, { force: true })
  t.match(await verify(file), { ok: true, records: 61, notes: [] }, 'the whole history is there')
})

t.test('pieces cut from a closed file and planted beside it make the chain no longer: keep prunes none of its files before their time', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const real = await writeSeries(file, 60, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: false } })
  const closed = real.slice(0, -1)
  t.ok(closed.length > 3, 'several closed files')
  // Each piece is made of the chain's own records, its first linking to the one before it and its last to the file
  // after it: walked one by one, the two pieces were two links where the file they were cut from is one, and keep
  // counted one file more than the chain has.
  const lines = linesOf(closed[1]!)
  const half = Math.floor(lines.length / 2)
  writeFileSync(`${file}.piece-1`, lines.slice(0, half).join('\n') + '\n')
  writeFileSync(`${file}.piece-2`, lines.slice(half).join('\n') + '\n')
  const { writer } = await open(file, { rotate: { maxBytes: 4096, daily: false, keep: closed.length, gzip: false } })
  writer.write(callRecord(61))
  await writer.close()
  t.ok(closed.every(f => existsSync(f)), `keep: ${closed.length} keeps the ${closed.length} real closed files`)
  t.notOk(parsed(file).some(r => r.event === 'audit.pruned'), 'the chain says nothing was pruned')
  rmSync(`${file}.piece-1`)
  rmSync(`${file}.piece-2`)
  t.match(await verify(file), { ok: true, records: 61, notes: [] }, 'the whole history is there')
})

t.test('a damaged gzipped file beside the series (a copy cut short) stops no pruning: keep goes on with the files of the chain', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const rotate = { maxBytes: 4096, daily: false, keep: 0, gzip: true }
  const real = await writeSeries(file, 60, { rotate })
  const closed = real.slice(0, -1)
  t.ok(closed.length > 3 && closed.every(f => f.endsWith('.gz')), 'several closed files, gzipped')
  // Its first record is the chain's own, so it is looked at as a link; its last can only be read through, and it
  // is cut short (a copy broken off, a disk's damage, or planted by someone who can write the directory). At
  // 3c5d3db such a file stopped nothing; read through to find its last record, it failed every housekeeping after.
  const whole = readFileSync(closed.at(-1)!)
  writeFileSync(`${file}.copy.gz`, whole.subarray(0, whole.length - 16))
  const { writer, log } = await open(file, { rotate: { ...rotate, keep: 2 } })
  for (let i = 61; i <= 90; i++) writer.write(callRecord(i))
  await writer.close()
  t.notOk(log.lines.some(l => l.level === 'error'), `no housekeeping failed: ${JSON.stringify(log.lines.filter(l => l.level === 'error'))}`)
  const left = (await seriesFiles(file)).map(f => f.path)
  t.notOk(closed.some(f => left.includes(f)), 'the oldest closed files are pruned')
  t.equal(left.filter(f => f !== file && f !== `${file}.copy.gz`).length, 2, 'keep: 2 closed files of the chain are left')
  t.ok(left.includes(`${file}.copy.gz`), 'the damaged file is left alone, for verify to name')
  t.ok(parsed(file).some(r => r.event === 'audit.pruned'), 'the chain says what was pruned')
})

t.test('a file planted just before a rotation, quoting the chain\'s next link, cannot make keep prune the history away unseen', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer } = await open(file, { rotate: { maxBytes: 4096, daily: false, keep: 1, gzip: false } })
  t.teardown(() => writer.close())
  const lastOf = () => JSON.parse(readFileSync(file, 'utf8').trimEnd().split('\n').at(-1)!) as { seq: number, hash: string }
  let i = 0
  const write = async () => {
    writer.write(callRecord(++i))
    await until(`record ${i}`, () => readFileSync(file, 'utf8').includes(callRecord(i).requestId as string))
  }
  for (let n = 0; n < 20; n++) await write() // a few rotations: closed files to keep
  // Someone who can write the directory, not the key, waits until the next record would rotate the file, and
  // puts there a file whose first line is the link that record will get (seq and prevHash). Sorted by first seq it
  // is the newest closed file; counted by keep, the real ones went, and the pruned record quoting it made the
  // series verify once the planted file was removed, with none of its closed files left.
  while (statSync(file).size + readFileSync(file, 'utf8').trimEnd().split('\n').at(-1)!.length + 1 <= 4096) await write()
  const last = lastOf()
  writeFileSync(file + '.planted', JSON.stringify({ seq: last.seq + 1, prevHash: last.hash, hash: '1'.repeat(64) }) + '\n')
  await write()
  await until('the pruned record', () => parsed(file).some(r => r.event === 'audit.pruned' && (r.throughSeq as number) >= last.seq - 20))
  await writer.close()
  rmSync(file + '.planted')
  const closed = (await seriesFiles(file)).filter(f => f.path !== file)
  t.equal(closed.length, 1, 'keep: 1 still holds the newest real closed file')
  t.equal(closed[0]!.firstSeq! <= last.seq, true, 'a closed file of the chain')
  t.match(await verify(file), { ok: true })
})

t.test('daily rotation starts a new file at the first write of a new UTC day', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  let now = Date.UTC(2025, 0, 1, 23, 59, 0)
  const { writer } = await open(file, { rotate: { daily: true, keep: 0, gzip: false }, now: () => now })
  writer.write(callRecord(1))
  await until('the first record', () => existsSync(file) && linesOf(file).length === 1)
  now = Date.UTC(2025, 0, 2, 0, 0, 1)
  writer.write(callRecord(2))
  await writer.close()
  const files = await seriesFiles(file)
  t.equal(files.length, 2)
  t.match(files[0]!.path, /audit\.jsonl\.20250102T000001Z\.1$/)
  t.same(parsed(file).map(r => r.seq), [2])
  t.match(await verify(file), { ok: true, records: 2 })
})

t.test('a torn last line is kept, reported at start, and a record saying so starts the next segment', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 5)
  appendFileSync(file, '{"time":"2025-01-01T00:00:06.000Z","requestId":"gw_0000') // the process died mid-write
  t.match(await verify(file), { ok: false, line: 6, reason: /last line is not a whole record/ }, 'verify reports it before the restart')

  const { writer, log } = await open(file)
  t.match(log.lines.find(l => l.level === 'warn'), { msg: /last line of the file is torn/, obj: { line: 6 } })
  writer.write(callRecord(7))
  await writer.close()
  const lines = linesOf(file)
  t.equal(lines[5], '{"time":"2025-01-01T00:00:06.000Z","requestId":"gw_0000', 'the torn line is kept as it was')
  t.match(JSON.parse(lines[6]!), { event: 'audit.torn_line', line: 6, seq: 6 })
  t.match(JSON.parse(lines[7]!), { requestId: callRecord(7).requestId, seq: 7 })
  t.match(await verify(file), { ok: true, records: 7, notes: [/:6: a torn line .* is kept; seq 6 says so\. .*may have been lost/] })
})

t.test('a torn last line in a file an outside rotation moved before the restart: the record saying so opens the next file, naming it', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const moved = `${file}.20250101T000000Z.1`
  await writeSeries(file, 5)
  appendFileSync(file, '{"time":"2025-01-01T00:00:06.000Z","requestId":"gw_0000') // the process died mid-write,
  renameSync(file, moved) // and logrotate moved the file before the gateway started again
  const { writer, log } = await open(file)
  t.match(log.lines.find(l => l.level === 'warn'), { msg: /last line of the file is torn/, obj: { file: moved, line: 6 } })
  writer.write(callRecord(7))
  await writer.close()
  t.equal(readFileSync(moved, 'utf8').split('\n')[5], '{"time":"2025-01-01T00:00:06.000Z","requestId":"gw_0000', 'the torn line is kept where it was, as it was')
  t.match(JSON.parse(linesOf(file)[0]!), { event: 'audit.torn_line', file: basename(moved), line: 6, seq: 6 })
  t.match(await verify(file), { ok: true, records: 7, notes: [/:6: a torn line .* is kept; seq 6 says so/] })

  // The record must name the file: one naming another (or none) does not acknowledge it.
  const forged = linesOf(file)
  writeFileSync(file, [JSON.stringify({ ...JSON.parse(forged[0]!), file: 'audit.jsonl.other' }), ...forged.slice(1)].join('\n') + '\n')
  t.match(await verify(file), { ok: false })
})

t.test('a torn line the trail says it kept, removed afterwards, is caught at the record that quotes it', async t => {
  const torn = '{"time":"2025-01-01T00:00:06.000Z","requestId":"gw_0000'
  // In the same file as the record saying so,
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 5)
  appendFileSync(file, torn) // the process died mid-write
  await writeSeries(file, 1, {}, 7) // the restart marks it
  t.match(await verify(file), { ok: true })
  writeFileSync(file, linesOf(file).filter(l => l !== torn).map(l => l + '\n').join(''))
  t.match(await verify(file), { ok: false, file, line: 6, seq: 6, reason: /says line 6 was torn by a crash and is kept, but no such line comes before it: the torn line was removed/ })

  // and at the end of a file an outside rotation moved before the restart.
  const other = join(tempDir(), 'audit.jsonl')
  const moved = `${other}.20250101T000000Z.1`
  await writeSeries(other, 5)
  appendFileSync(other, torn)
  renameSync(other, moved)
  await writeSeries(other, 1, {}, 7)
  t.match(await verify(other), { ok: true })
  writeFileSync(moved, readFileSync(moved, 'utf8').slice(0, -torn.length))
  t.match(await verify(other), { ok: false, file: other, line: 1, seq: 6, reason: /says line 6 of audit\.jsonl\.20250101T000000Z\.1 was torn .* removed/ })

  // A file rotate.keep removed takes its torn line with it: the record saying so, opening the series now, is fine.
  const kept = join(tempDir(), 'audit.jsonl')
  await writeSeries(kept, 5)
  appendFileSync(kept, torn)
  renameSync(kept, `${kept}.20250101T000000Z.1`)
  await writeSeries(kept, 1, {}, 7)
  await writeSeries(kept, 12, { rotate: { maxBytes: 4096, daily: false, keep: 1, gzip: false } }, 8)
  const files = await seriesFiles(kept)
  t.match(parsed(files[0]!.path)[0], { event: 'audit.torn_line', seq: 6 }, 'the series starts with the record, its torn line pruned')
  t.match(await verify(kept), { ok: true, notes: [/up to seq 5 were removed by rotate\.keep/] })
})

t.test('a whole last line that is not a record (an edit, not a crash) stops the start; nothing is sealed over it', async t => {
  const edits: Array<[string, (lines: string[]) => string[]]> = [
    ['the last record edited into a non-record', lines => [...lines.slice(0, -1), lines.at(-1)!.replace(/"seq":(\d+)/, '"seq":"$1"')]],
    ['a whole line appended', lines => [...lines, JSON.stringify(callRecord(99, { note: 'forged' }))]],
    ['the tail cut and a line quoting the head appended', lines => [...lines.slice(0, 2), `{"hash":"${(JSON.parse(lines.at(-1)!) as { hash: string }).hash}"}`]]
  ]
  for (const [what, edit] of edits) {
    const file = join(tempDir(), 'audit.jsonl')
    await writeSeries(file, 5)
    writeFileSync(file, edit(linesOf(file)).map(l => l + '\n').join('')) // each line ends with its newline
    const before = readFileSync(file, 'utf8')
    await t.rejects(open(file), { name: 'AuditStartError', message: /ends with a whole line \(line \d\) that is not an audit record: a crash never leaves one .*audit verify.*move .* out of it/ }, `${what}: start refused`)
    t.equal(readFileSync(file, 'utf8'), before, `${what}: the file is left as it was`)
    t.notOk(existsSync(file + '.lock'), `${what}: the lock is released`)
    t.match(await verify(file), { ok: false, reason: /not an audit record, yet it ends with a newline, which a crash never leaves/ }, `${what}: verify says why`)
  }
})

t.test('a torn last line stays in the same file as the record acknowledging it, when the restart rotates the file at once', async t => {
  const torn = '{"time":"2025-01-01T00:00:06.000Z","requestId":"gw_0000'
  for (const [why, rotate, tail] of [
    ['a new UTC day', { daily: true, keep: 0, gzip: false }, torn],
    ['its size', { maxBytes: 4096, daily: false, keep: 0, gzip: false }, torn + 'x'.repeat(3000)]
  ] as const) {
    const file = join(tempDir(), 'audit.jsonl')
    let now = Date.UTC(2025, 0, 1, 23, 0, 0)
    await writeSeries(file, 5, { rotate, now: () => now })
    appendFileSync(file, tail) // the process died mid-write, late in the day
    now = Date.UTC(2025, 0, 3, 8, 0, 0) // and is started again two days later
    const { writer } = await open(file, { rotate, now: () => now })
    for (let i = 7; i <= 9; i++) writer.write(callRecord(i))
    await writer.close()
    const files = (await seriesFiles(file)).map(f => f.path)
    t.ok(files.length >= 2, `${why}: the file was rotated (${files.length} files)`)
    const closed = linesOf(files[0]!)
    const at = closed.indexOf(tail)
    t.ok(at >= 0 && /"event":"audit\.torn_line"/.test(closed[at + 1] ?? ''), `${why}: the torn line and its record, together in the closed file`)
    t.notOk(readFileSync(files.at(-1)!, 'utf8').startsWith('\n'), `${why}: the new file starts with a record, not an empty line`)
    t.match(await verify(file), { ok: true, records: 9, notes: [/a torn line .* is kept; seq 6 says so/] }, `${why}: verify accepts the series`)
  }
})

t.test('rotate.keep with gzip under a quick run of rotations: no error or warning, and no partial gzip left behind, then or after a restart', async t => {
  const rotate = { maxBytes: 2048, daily: false, keep: 2, gzip: true }
  const tooSlow = /compressing or pruning closed files took over/
  // The races it is about (a pruning listing the files while a write rotates; a gzip of a file pruned before its
  // turn) show in some runs only: ten runs.
  let file = ''
  for (let run = 1; run <= 10; run++) {
    file = join(tempDir(), 'audit.jsonl')
    const { writer, log } = await open(file, { rotate })
    for (let i = 1; i <= 120; i++) writer.write(callRecord(i)) // some 30 rotations, each a gzip with its fsync
    await writer.close()
    const leftovers = readdirSync(join(file, '..')).filter(n => n.endsWith('.tmp'))
    t.same(log.lines.filter(l => l.level === 'error'), [], `run ${run}: no error logged`)
    // Nor a warning: each file it rotated is a file of the chain (one rotated while a pruning listed the files was
    // once said not to be, and left out of rotate.keep).
    t.same(log.lines.filter(l => l.level === 'warn' && !tooSlow.test(l.msg)), [], `run ${run}: no warning`)
    // The close waits for housekeeping only so long (a slow disk must not hold the exit), and says when it stopped
    // waiting: only then may a partial gzip be left.
    if (log.lines.some(l => tooSlow.test(l.msg))) t.comment(`run ${run}: the close stopped waiting for housekeeping`)
    else t.same(leftovers, [], `run ${run}: no partial gzip`)
    t.match(await verify(file), { ok: true, notes: [/removed by rotate.keep/] })
  }

  writeFileSync(join(file, '..', 'audit.jsonl.20250101T000000Z.9.gz.tmp'), 'partial') // a gzip cut short by a crash,
  const again = await open(file, { rotate }) // of a file removed since
  await again.writer.close()
  t.same(readdirSync(join(file, '..')).filter(n => n.endsWith('.tmp')), [], 'a restart removes a partial gzip whose file is gone')
})

t.test('a newest closed file that no longer ends with a record stops the start, instead of a second chain from seq 1', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 3)
  renameSync(file, `${file}.20250101T000000Z.1`) // rotated by hand while the gateway was stopped: no active file
  appendFileSync(`${file}.20250101T000000Z.1`, '{"note":"added by someone"}\n')
  await t.rejects(open(file), { name: 'AuditStartError', message: /newest closed file of the series, does not end with an audit record/ })
  t.notOk(existsSync(file), 'nothing was written')
  t.notOk(existsSync(file + '.lock'), 'and the lock was let go')
})

t.test('a newest closed file whose first line was edited: a restart goes on from its last record, not from the file before', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 3)
  renameSync(file, `${file}.20250101T000000Z.1`)
  await writeSeries(file, 3, {}, 4)
  const newest = `${file}.20250101T000000Z.4`
  renameSync(file, newest) // rotated by hand while the gateway was stopped: no active file
  const lines = linesOf(newest)
  writeFileSync(newest, [`x${lines[0]!}`, ...lines.slice(1)].map(l => l + '\n').join(''))
  const { writer } = await open(file)
  writer.write(callRecord(7))
  await writer.close()
  // (not seq 4 again, linked to seq 3: a second chain beside the edited file, which verify would blame on it)
  t.same(parsed(file).map(r => r.seq), [7])
  t.match(await verify(file), { ok: false, file: newest, line: 1, reason: /not an audit record/ }, 'verify names the edited line')
})

t.test('an active file whose first line was edited: a restart names it by its first record when it rotates, and the rotations after it never overwrite it', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const now = Date.UTC(2025, 0, 1)
  const rotate = { maxBytes: 4096, daily: false, keep: 0, gzip: false }
  // As many records as the file takes: the next one rotates it.
  let written = 0
  do await writeSeries(file, 1, { rotate, now: () => now }, ++written)
  while (statSync(file).size * (written + 1) / written <= rotate.maxBytes)
  const lines = linesOf(file)
  writeFileSync(file, [`x${lines[0]!}`, ...lines.slice(1)].map(l => l + '\n').join(''))
  // Started again within the same second: enough records to rotate the edited file and the one after it.
  const { writer } = await open(file, { rotate, now: () => now })
  const last = 4 * written
  for (let seq = written + 1; seq <= last; seq++) writer.write(callRecord(seq))
  await writer.close()
  const files = await seriesFiles(file)
  t.ok(files.some(f => f.path.endsWith('.2') && linesOf(f.path).length === written),
    'the edited file is kept, named by its first record (seq 2), not by the next one written')
  const seqs = files.flatMap(f => linesOf(f.path).filter(l => l.startsWith('{')).map(l => (JSON.parse(l) as { seq: number }).seq))
  t.same(seqs, Array.from({ length: last - 1 }, (_, i) => i + 2),
    'every record is still in the series, in order (seq 1 is the edited line)')
  t.match(await verify(file), { ok: false, line: 1, reason: /not an audit record/ }, 'verify names the edited line, not a gap')
})

t.test('a file of records without a chain (an older gateway\'s) is refused, not silently restarted', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  writeFileSync(file, JSON.stringify(callRecord(1)) + '\n')
  await t.rejects(open(file), AuditStartError)
  await t.rejects(open(file), { message: /without a hash chain .* Move it out of the series/ })
})

t.test('a file removed by another tool is noticed within a second, and records that went into it are written again', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file)
  for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
  await until('3 records', () => existsSync(file) && linesOf(file).length === 3)
  rmSync(file)
  await until('the file back', () => existsSync(file), 2000)
  t.match(log.lines, [{ msg: 'audit: starting a new hash chain' }, { level: 'warn', msg: /was removed by something else/ }])
  writer.write(callRecord(4))
  await writer.close()
  t.same(parsed(file).map(r => r.seq), [1, 2, 3, 4], 'nothing lost to the removed file')
  t.match(await verify(file), { ok: true, records: 4 })
})

t.test('records written again into a new file after the active one was removed keep their place: the file is named by its first record, and no rotation after it replaces it', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const maxBytes = 4096
  // Every rotation in the same second, as under load with a small maxBytes: names then differ by their first seq only.
  const { writer, log } = await open(file, { rotate: { ...NO_ROTATION, maxBytes }, now: () => Date.UTC(2025, 0, 1, 12) })
  // The file filled about as far as it goes (a few bytes spare, as records differ in length).
  let n = 0
  do {
    writer.write(callRecord(++n))
    await until(`record ${n}`, () => existsSync(file) && linesOf(file).length === n)
  } while (statSync(file).size * (n + 1) / n + 16 <= maxBytes)
  rmSync(file)
  await until('the records written again', () => existsSync(file) && linesOf(file).length === n, 2000)
  t.match(log.lines, [{ msg: 'audit: starting a new hash chain' }, { level: 'warn', msg: /was removed by something else/, obj: { rewritten: n } }])
  for (let i = n + 1; i <= n + 30; i++) writer.write(callRecord(i))
  await writer.close()
  const files = await seriesFiles(file)
  for (const f of files.slice(0, -1)) t.match(f.path, new RegExp(`\\.${f.firstSeq!}$`), `${basename(f.path)} is named by its first record`)
  t.same(files.flatMap(f => parsed(f.path).map(r => r.seq)), Array.from({ length: n + 30 }, (_, i) => i + 1), 'no record lost')
  t.match(await verify(file), { ok: true, records: n + 30 })
})

t.test('a file moved and compressed at once (logrotate compress, no delaycompress, no signal): each record stays in the series once', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file)
  for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
  await until('3 records', () => existsSync(file) && linesOf(file).length === 3)
  // Within one watch interval: mv, then gzip, which writes the .gz and unlinks the moved file.
  renameSync(file, file + '.1')
  writeFileSync(file + '.1.gz', gzipSync(readFileSync(file + '.1')))
  rmSync(file + '.1')
  await until('the file back', () => existsSync(file), 2000)
  t.match(log.lines.find(l => l.level === 'warn'), { msg: /was removed by something else; reopening it$/, obj: { rewritten: 0 } })
  writer.write(callRecord(4))
  await writer.close()
  t.same(parsed(file).map(r => r.seq), [4], 'the records safe in the .gz are not written again')
  const seen: unknown[] = []
  await queryFiles((await seriesFiles(file)).map(f => f.path), [], Infinity, r => { seen.push(r.requestId); return true })
  t.same(seen, [1, 2, 3, 4].map(i => callRecord(i).requestId), 'audit query returns each call once')
  t.match(await verify(file), { ok: true, records: 4 })
})

t.test('a file moved away (logrotate without copytruncate) is noticed, and the chain runs on across both files', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer } = await open(file)
  writer.write(callRecord(1))
  await until('a record', () => existsSync(file) && linesOf(file).length === 1)
  renameSync(file, file + '.1')
  await until('a new file', () => existsSync(file), 2000)
  writer.write(callRecord(2))
  await writer.close()
  t.same(parsed(file + '.1').map(r => r.seq), [1])
  t.same(parsed(file).map(r => r.seq), [2])
  t.match(await verify(file), { ok: true, records: 2 })
})

t.test('a file removed by another tool just before a rotation by size: its records are written again, and calls are not refused', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file, { rotate: { ...NO_ROTATION, maxBytes: 1000 } })
  for (let i = 1; i <= 2; i++) writer.write(callRecord(i))
  await until('2 records', () => existsSync(file) && linesOf(file).length === 2)
  // Within the watch's second: the next write rotates by size, and finds no file at the path to rename.
  rmSync(file)
  for (let i = 3; i <= 8; i++) writer.write(callRecord(i))
  await sleep(50)
  t.equal(writer.available, true, 'no failed write: calls are not refused with 503 audit_unavailable')
  await writer.close()
  t.notOk(log.lines.some(l => l.level === 'error'), 'no write failed')
  const seqs: number[] = []
  await queryFiles((await seriesFiles(file)).map(f => f.path), [], Infinity, r => { seqs.push(r.seq as number); return true })
  t.same(seqs, [1, 2, 3, 4, 5, 6, 7, 8], 'the records of the removed file are written again')
  t.match(await verify(file), { ok: true, records: 8 })
})

t.test('a file moved away by another tool just before a rotation by size: the write goes on in a new file, not a failed rename', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file, { rotate: { ...NO_ROTATION, maxBytes: 1000 } })
  for (let i = 1; i <= 2; i++) writer.write(callRecord(i))
  await until('2 records', () => existsSync(file) && linesOf(file).length === 2)
  renameSync(file, file + '.1')
  for (let i = 3; i <= 8; i++) writer.write(callRecord(i))
  await sleep(50)
  t.equal(writer.available, true, 'no failed write: calls are not refused with 503 audit_unavailable')
  await writer.close()
  t.notOk(log.lines.some(l => l.level === 'error'), 'no write failed')
  t.same(parsed(file + '.1').map(r => r.seq), [1, 2], 'the moved file keeps its records, and gets no more')
  t.match(await verify(file), { ok: true, records: 8 })
})

t.test('an active file swapped for a symlink to /dev/null is not written into: the writer says it cannot write, and the records wait', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file, { fsync: 'interval' })
  for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
  await until('3 records', () => existsSync(file) && linesOf(file).length === 3)
  renameSync(file, file + '.1')
  symlinkSync('/dev/null', file)
  await until('the writer to give up on the path', () => !writer.available, 3000)
  t.match(log.lines.find(l => l.level === 'error'), { obj: { err: { message: /audit\.jsonl is not a regular file \(a symbolic link/ } } })
  for (let i = 4; i <= 6; i++) writer.write(callRecord(i))
  await sleep(600) // a retry or two: none of them writes into /dev/null
  t.notOk(writer.available, 'still unavailable')
  t.match(writer.stats(), { written: 3, lost: 0 }, 'records 4-6 wait in the buffer')

  rmSync(file) // the link is removed: the retry opens a regular file at the path
  await until('records 4-6 to be written', () => writer.available && writer.stats().written === 6)
  await writer.close()
  t.same(parsed(file).map(r => r.seq), [4, 5, 6])
  t.match(await verify(file), { ok: true, records: 6 })
})

t.test('close() tries a failed write again until its deadline, as writing does while running: a path fixed meanwhile loses nothing', async t => {
  // A stop while records wait for a destination that fails (SIGTERM during an audit outage): close() tried twice at
  // once, then counted every waiting record lost, though the README gives the stop 5 s to write them.
  const file = join(tempDir(), 'audit.jsonl')
  const { writer } = await open(file)
  for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
  await until('3 records', () => existsSync(file) && linesOf(file).length === 3)
  renameSync(file, file + '.1')
  symlinkSync('/dev/null', file)
  await until('the writer to give up on the path', () => !writer.available, 3000)
  for (let i = 4; i <= 6; i++) writer.write(callRecord(i))
  const failedBefore = writer.stats().failed
  const closed = writer.close()
  await until('a write during the close to fail', () => writer.stats().failed > failedBefore)
  rmSync(file) // fixed: a regular file can be made at the path again
  await closed
  t.match(writer.stats(), { written: 6, lost: 0 }, 'records 4-6 written by the close')
  t.same(parsed(file).map(r => r.seq), [4, 5, 6])
  t.match(await verify(file), { ok: true, records: 6 })
})

t.test('records to write again from a removed file, held while the new path fails: close() writes them, or counts them lost', async t => {
  // They were held apart from the records waiting to be written: a close with none of those waiting did not try the
  // destination again, and dropped them without counting them (the stop's exit code and the log said nothing lost).
  for (const fixed of [true, false]) {
    const file = join(tempDir(), 'audit.jsonl')
    const { writer, log } = await open(file)
    for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
    await until('3 records', () => existsSync(file) && linesOf(file).length === 3)
    rmSync(file)
    symlinkSync('/dev/null', file) // removed, and the path unusable: the records that went into it wait
    await until('the writer to find the file removed and the path unusable', () => !writer.available, 3000)
    t.match(log.lines.find(l => l.level === 'warn'), { obj: { rewritten: 3 } })
    const closed = writer.close()
    if (fixed) {
      await until('a write during the close to fail', () => writer.stats().failed >= 2)
      rmSync(file)
    }
    await closed
    if (fixed) {
      t.match(writer.stats(), { lost: 0 }, 'path fixed during the close: nothing lost')
      t.same(parsed(file).map(r => r.seq), [1, 2, 3], 'the records are written again')
      t.match(await verify(file), { ok: true, records: 3 })
    } else {
      t.match(writer.stats(), { lost: 3 }, 'path never fixed: the 3 records are counted lost')
      t.ok(log.lines.some(l => l.level === 'error' && /lost/.test(l.msg)), 'and the log says so')
    }
  }
})

t.test('a symlink at the audit path is refused at start', async t => {
  const dir = tempDir()
  const file = join(dir, 'audit.jsonl')
  writeFileSync(join(dir, 'elsewhere.jsonl'), '')
  symlinkSync(join(dir, 'elsewhere.jsonl'), file)
  await t.rejects(open(file), { name: 'AuditStartError', message: `audit file ${file} is not a regular file (a symbolic link, device, pipe or directory): records are written only into a regular file` })
  t.notOk(existsSync(file + '.lock'), 'the lock is released')
})

t.test('a failed fsync is a failed write until an fsync succeeds, not forgotten after one attempt', async t => {
  const probeFile = join(tempDir(), 'probe')
  const probe = await fsOpen(probeFile, 'w')
  const proto = Object.getPrototypeOf(probe) as { datasync: () => Promise<void> }
  await probe.close()
  const datasync = proto.datasync
  let failing = false
  proto.datasync = function (this: unknown) {
    if (!failing) return datasync.call(this)
    return Promise.reject(Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' }))
  }
  t.teardown(() => { proto.datasync = datasync })
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file, { fsync: 'interval' })
  failing = true
  for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
  await until('the fsync to fail', () => !writer.available, 3000)
  t.match(log.lines.find(l => l.level === 'error'), { obj: { err: { code: 'EIO' } } })
  await until('the fsync to be tried again, and fail again', () => writer.stats().failed >= 3, 3000)
  t.notOk(writer.available, 'the writer stays unavailable while fsync fails')
  failing = false
  await until('an fsync to succeed', () => writer.available, 3000)
  await writer.close()
  t.match(await verify(file), { ok: true, records: 3 })
})

t.test('reopen() (SIGUSR2) starts writing the path anew at once', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file)
  writer.write(callRecord(1))
  await until('a record', () => existsSync(file) && linesOf(file).length === 1)
  renameSync(file, `${file}-20250101`)
  writer.reopen()
  writer.write(callRecord(2))
  await until('the record in the new file', () => existsSync(file) && linesOf(file).length === 1, 900)
  await writer.close()
  t.ok(log.lines.some(l => l.msg === 'audit: reopened'))
  t.same(log.lines.filter(l => l.level === 'warn'), [], 'the rotation asked for is no warning (a log pipeline alerting on warn)')
  t.match(await verify(file), { ok: true, records: 2 })
})

t.test('reopen() (SIGUSR2) after a logrotate with `create` (an empty file made at the path): written there, no warning', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file)
  writer.write(callRecord(1))
  await until('a record', () => existsSync(file) && linesOf(file).length === 1)
  renameSync(file, `${file}.1`)
  writeFileSync(file, '')
  writer.reopen()
  writer.write(callRecord(2))
  await until('the record in the new file', () => linesOf(file).length === 1, 900)
  await writer.close()
  t.same(log.lines.filter(l => l.level === 'warn'), [], 'no warning')
  t.match(await verify(file), { ok: true, records: 2 })
})

t.test('a file moved by another tool with no signal is said to be moved, not removed', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file)
  writer.write(callRecord(1))
  await until('a record', () => existsSync(file) && linesOf(file).length === 1)
  renameSync(file, `${file}.1`)
  await until('the file back', () => existsSync(file), 2000)
  await writer.close()
  t.match(log.lines.filter(l => l.level === 'warn'), [{ msg: /^audit: the file was moved by something else; reopening it$/, obj: { rewritten: 0 } }])
  t.match(await verify(file), { ok: true, records: 1 })
})

t.test('reopen() (SIGUSR2) after the file was removed, not moved: the records that went into it are written again', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { writer } = await open(file)
  for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
  await until('3 records', () => existsSync(file) && linesOf(file).length === 3)
  rmSync(file) // rm audit.jsonl && kill -USR2, within the watch's second
  writer.reopen()
  writer.write(callRecord(4))
  await writer.close()
  t.same(parsed(file).map(r => r.seq), [1, 2, 3, 4], 'nothing lost to the removed file')
  t.match(await verify(file), { ok: true, records: 4 })
})

t.test('a second writer on the same series is refused, in this process and from another process', async t => {
  const dir = tempDir()
  const file = join(dir, 'audit.jsonl')
  const { writer } = await open(file)
  t.teardown(() => writer.close())
  await t.rejects(open(file), { name: 'AuditLockError', message: /already written by this process/ })

  const out = await openInAnotherProcess(file)
  t.match(out, new RegExp(`AuditLockError: audit file .* is in use by another gateway process \\(pid ${process.pid}`))
  t.match(out, /Each gateway needs its own audit\.file/)
})

/** What another gateway process opening a writer on `file` says: `opened`, or the error that refused it. */
async function openInAnotherProcess (file: string): Promise<string> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', `
    import { openAuditWriter } from ${JSON.stringify(join(process.cwd(), 'dist/audit/writer.js'))}
    const log = { info () {}, warn () {}, error () {} }
    try {
      await openAuditWriter({ file: ${JSON.stringify(file)}, fsync: 'off', rotate: { daily: false, keep: 0, gzip: false }, log })
      console.log('opened')
    } catch (err) { console.log(err.name + ': ' + err.message) }
    process.exit(0)
  `], { stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  child.stdout.on('data', (c: Buffer) => { out += c.toString() })
  await once(child, 'exit')
  return out
}

t.test('a lock file removed under a running gateway (a cleanup of the audit directory) is made again: a second gateway is still refused', async t => {
  for (const removed of ['the lock', 'the whole directory'] as const) {
    const dir = tempDir()
    const file = join(dir, 'audit.jsonl')
    const { writer, log } = await open(file)
    rmSync(removed === 'the lock' ? file + '.lock' : dir, { recursive: true })
    // (the file is there a moment before the heartbeat, which made it, has said so)
    await until('the lock is made again, and said', () => existsSync(file + '.lock') && log.lines.some(l => /lock file/.test(l.msg)))
    t.match(readFileSync(file + '.lock', 'utf8'), `"pid":${process.pid}`, `${removed}: holding this process's pid`)
    t.match(log.lines.find(l => /lock file/.test(l.msg)), { level: 'warn', msg: /lock file .* was removed .*; made again/ }, `${removed}: said so`)
    t.match(await openInAnotherProcess(file), /AuditLockError: audit file .* is in use by another gateway process/, `${removed}: a second gateway is refused`)
    await writer.close()
  }
})

t.test('a lock file removed and made again by another gateway before the heartbeat came round is noticed, and left to it', async t => {
  const dir = tempDir()
  const file = join(dir, 'audit.jsonl')
  const { writer, log } = await open(file)
  // Between a cleanup and the next heartbeat, a second gateway started on the series and took the lock as its own.
  const other = JSON.stringify({ pid: 4242, host: 'other-gateway', since: '2026-01-01T00:00:00.000Z' })
  rmSync(file + '.lock')
  writeFileSync(file + '.lock', other)
  lastTouched(file + '.lock', 60_000)
  await until('the heartbeat says so', () => log.lines.some(l => /lock file/.test(l.msg)))
  t.match(log.lines.find(l => /lock file/.test(l.msg)),
    { level: 'error', msg: /was removed by something else, and another process made it again: two gateways may be writing this series/ })
  t.equal(readFileSync(file + '.lock', 'utf8'), other, 'the other gateway\'s lock is left as it was')
  t.ok(statSync(file + '.lock').mtimeMs < Date.now() - 30_000, 'and is not kept fresh for it (its own heartbeat says whether it lives)')
  await writer.close()
  t.equal(readFileSync(file + '.lock', 'utf8'), other, 'nor removed at close')
})

t.test('a running gateway\'s lock overwritten with what is no lock is still its: a second gateway is refused, not let in at once', async t => {
  // Anyone who can write the audit directory can write into the lock (or a disk can leave it empty). It names no
  // holder, but its heartbeat goes on: a second gateway taking it for stale would write the series too, forking the chain.
  for (const text of ['garbage\n', '']) {
    const file = join(tempDir(), 'audit.jsonl')
    const { writer } = await open(file)
    writeFileSync(file + '.lock', text)
    t.match(await openInAnotherProcess(file), /AuditLockError: audit file .* is locked .*still being refreshed/, `${JSON.stringify(text)}: refused`)
    t.equal(readFileSync(file + '.lock', 'utf8'), text, `${JSON.stringify(text)}: the lock is left as it is`)
    await writer.close()
  }
  // The same lock, its heartbeat stopped (its gateway gone): taken over.
  const file = join(tempDir(), 'audit.jsonl')
  writeFileSync(file + '.lock', 'garbage\n')
  lastTouched(file + '.lock', 10_000)
  t.equal(await openInAnotherProcess(file), 'opened\n', 'a lock no longer refreshed is taken over')
})

/** Sets a lock's last touch `ago` ms back: the heartbeat of its (pretended) holder stopped then. */
function lastTouched (path: string, ago: number): void {
  const then = new Date(Date.now() - ago)
  utimesSync(path, then, then)
}

t.test('a lock whose host and time hold line breaks or run long is said in one bounded line, not copied as written', async t => {
  // Anyone who can write the audit directory can write the lock: its fields went into start's one-line error, the
  // log and the trail's unclean-stop record as written.
  const lock = await import('../src/audit/lock.js')
  const file = join(tempDir(), 'audit.jsonl')
  const host = 'other-host\nohmygpt-gateway start: ok' + 'x'.repeat(100_000)
  writeFileSync(file + '.lock', JSON.stringify({ pid: 4242, host, since: '2025-01-01\r\n' + 'y'.repeat(100_000) }))
  const err = await lock.acquireLock(file, () => {}).then(() => null, (e: unknown) => e) as Error | null
  t.match(err, { name: 'AuditLockError', message: /locked by pid 4242 on host other-host\?ohmygpt-gateway start: okx+ since 2025-01-01\?\?y+ / })
  t.notMatch(err!.message, /[\r\n]/, 'one line')
  t.ok(err!.message.length < 1200, `bounded (${err!.message.length} characters)`)

  // A pid no gateway writes (0 asks kill() about this process group, -1 about every process): not a holder, stale.
  const { hostname } = await import('node:os')
  for (const pid of [0, -1, 1.5]) {
    writeFileSync(file + '.lock', JSON.stringify({ pid, host: hostname(), since: '2025-01-01T00:00:00.000Z' }))
    lastTouched(file + '.lock', 60_000)
    const held = await lock.acquireLock(file, () => {})
    t.match(readFileSync(file + '.lock', 'utf8'), `"pid":${process.pid}`, `pid ${pid}: taken over`)
    await held.release()
  }
})

t.test('a lock whose holder looks gone by its pid but is still refreshed (a gateway in another pid namespace, same host name) is not taken over', async t => {
  const { hostname } = await import('node:os')
  const lock = await import('../src/audit/lock.js')
  // As two containers with host networking see each other's lock: the same host name, a pid that is not theirs
  // or is their own (both are pid 1).
  for (const pid of [process.pid, 999_999]) {
    const file = join(tempDir(), 'audit.jsonl')
    writeFileSync(file + '.lock', JSON.stringify({ pid, host: hostname(), since: '2025-01-01T00:00:00.000Z' }))
    const beat = setInterval(() => { lastTouched(file + '.lock', 0) }, 500) // the other gateway's heartbeat
    const err = await lock.acquireLock(file, () => {}).then(() => null, (e: unknown) => e)
    clearInterval(beat)
    t.match(err, { name: 'AuditLockError', message: /still being refreshed: another gateway writes it/ }, `pid ${pid}: refused`)
    t.match(readFileSync(file + '.lock', 'utf8'), `"pid":${pid}`, `pid ${pid}: the lock is left to its holder`)
  }
  // The same lock, its heartbeat stopped: a crashed gateway's, taken over.
  const file = join(tempDir(), 'audit.jsonl')
  writeFileSync(file + '.lock', JSON.stringify({ pid: process.pid, host: hostname(), since: '2025-01-01T00:00:00.000Z' }))
  lastTouched(file + '.lock', 10_000)
  const held = await lock.acquireLock(file, () => {})
  t.match(readFileSync(file + '.lock', 'utf8'), /"since":"20[0-9]{2}-/, 'taken over at once')
  const touched = statSync(file + '.lock').mtimeMs
  await new Promise(resolve => setTimeout(resolve, 1300))
  t.ok(statSync(file + '.lock').mtimeMs > touched, 'and its new holder refreshes it')
  await held.release()
})

t.test('a lock left by a crashed container of this machine, under another host name (the container made anew), is taken over once its heartbeat stops', async t => {
  // docker compose up after a crash makes a new container, whose host name is its new id; a Kubernetes pod made anew
  // has a new name. Its lock names the old one: refused as another host's, the gateway would never start again on its
  // own volume (restart: unless-stopped loops, the app waits on its health) until someone deleted the lock.
  const boot = readFileSync('/proc/sys/kernel/random/boot_id', 'latin1').trim()
  const file = join(tempDir(), 'audit.jsonl')
  writeFileSync(file, '')
  const old = { pid: 7, host: '3f2a9c1b7d0e', since: '2025-01-01T00:00:00.000Z', boot }
  writeFileSync(file + '.lock', JSON.stringify(old))
  const beat = setInterval(() => { lastTouched(file + '.lock', 0) }, 500) // that container still runs
  t.match(await openInAnotherProcess(file), /AuditLockError: .*locked by pid 7 on a host named 3f2a9c1b7d0e \(another container of this machine\).*still being refreshed/,
    'refused while its heartbeat goes on')
  clearInterval(beat)
  lastTouched(file + '.lock', 60_000) // then it crashed
  const { writer, log } = await open(file)
  writer.write(callRecord(1))
  await writer.close()
  t.match(log.lines, [{ level: 'warn', msg: 'audit: taking over a stale lock left by a gateway that is gone', obj: { holder: { host: old.host } } }])
  t.match(parsed(file), [{ event: 'audit.unclean_stop', pid: 7, host: old.host }, { seq: 2 }], 'the chain says the unclean stop')

  // Another machine's lock (another boot id, or none: an older gateway's) is still refused, stale or not.
  for (const other of [{ ...old, boot: '00000000-0000-0000-0000-000000000000' }, { pid: 7, host: old.host, since: old.since } as typeof old]) {
    writeFileSync(file + '.lock', JSON.stringify(other))
    lastTouched(file + '.lock', 60_000)
    t.match(await openInAnotherProcess(file), /AuditLockError: audit file .* is locked by pid 7 on host 3f2a9c1b7d0e .*delete the lock file/, `${other.boot ?? 'no boot id'}: refused`)
  }
})

/** The lock a gateway killed a minute ago left beside `file` (its pid gone, its heartbeat stopped), since 2025-01-01. */
async function lockOfGoneGateway (file: string): Promise<{ pid: number | undefined }> {
  const gone = spawn(process.execPath, ['-e', ''])
  await once(gone, 'exit')
  const { hostname } = await import('node:os')
  writeFileSync(file + '.lock', JSON.stringify({ pid: gone.pid, host: hostname(), since: '2025-01-01T00:00:00.000Z' }))
  lastTouched(file + '.lock', 60_000)
  return { pid: gone.pid }
}

/** A start on a series of 3 records whose lock lockOfGoneGateway left: it says the unclean stop, then its first call. */
async function startsAfterUncleanStop (t: Test, file: string, pid: number | undefined): Promise<void> {
  const { writer } = await open(file)
  writer.write(callRecord(4))
  await writer.close()
  t.match(parsed(file).slice(3), [
    { seq: 4, event: 'audit.unclean_stop', pid, since: '2025-01-01T00:00:00.000Z' },
    { seq: 5, requestId: callRecord(4).requestId }
  ])
}

t.test('a lock left by a process that is gone is taken over, with a warning', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const gone = await lockOfGoneGateway(file)
  const { writer, log } = await open(file)
  t.match(log.lines[0], { level: 'warn', msg: /taking over a stale lock/, obj: { holder: { pid: gone.pid } } })
  await writer.close()
  t.notOk(existsSync(file + '.lock'), 'close() releases the lock')
})

t.test('a gateway that stopped without closing (its lock left behind) is said in the trail where the next one goes on', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 3)
  // As kill -9 leaves it: the records answered in its last moments, not handed to the disk yet, are gone with it.
  const gone = await lockOfGoneGateway(file)
  await startsAfterUncleanStop(t, file, gone.pid)
  t.match(await verify(file), { ok: true, records: 5, notes: [/seq 4: the gateway writing before it .*pid \d+.* stopped without closing/] })
  const found: unknown[] = []
  await queryFiles([file], [], Infinity, r => { found.push(r.seq); return true })
  t.same(found, [1, 2, 3, 5], 'audit query leaves it out, as the other chain events')
})

t.test('a start that takes over a stale lock and then fails (the series cannot be gone on from) leaves the unclean stop for the next start to say, once', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 3)
  const gone = await lockOfGoneGateway(file)
  const stale = readFileSync(file + '.lock', 'utf8')
  const touched = statSync(file + '.lock').mtimeMs
  // A line added to the file after the gateway stopped: the chain cannot go on from it, and the start fails.
  const records = readFileSync(file)
  appendFileSync(file, 'not a record\n')
  const err = await open(file).then(() => null, (e: unknown) => e)
  t.match(err, { name: 'AuditStartError' }, 'the start fails')
  t.equal(readFileSync(file + '.lock', 'utf8'), stale, 'the stale lock is put back as it was, for the next start to find')
  t.ok(Math.abs(statSync(file + '.lock').mtimeMs - touched) < 1, 'untouched since its holder stopped: the next start does not wait on it')

  // The file set right, the next start says the unclean stop, once.
  writeFileSync(file, records)
  await startsAfterUncleanStop(t, file, gone.pid)
  t.notOk(existsSync(file + '.lock'), 'close() releases the lock')
  const again = await open(file)
  await again.writer.close()
  t.equal(parsed(file).filter(r => r.event === 'audit.unclean_stop').length, 1, 'and no later start says it again')
})

t.test('a lock left by a process that has exited but is not reaped yet (a zombie, just after a kill -9) is taken over', { skip: process.platform !== 'linux' && 'zombies are told from /proc' }, async t => {
  // The parent forks a child that exits at once and is never waited on: it stays a zombie while the parent sleeps.
  const parent = spawn('python3', ['-c', 'import os, sys, time\npid = os.fork()\nif pid == 0: os._exit(0)\nprint(pid, flush=True)\ntime.sleep(30)'])
  t.teardown(() => { parent.kill() })
  const [line] = await once(parent.stdout, 'data') as [Buffer]
  const zombie = Number(line.toString().trim())
  await eventually(async () => readFileSync(`/proc/${zombie}/stat`, 'latin1').includes(') Z '), 'the child to be a zombie')
  const file = join(tempDir(), 'audit.jsonl')
  const { hostname } = await import('node:os')
  writeFileSync(file + '.lock', JSON.stringify({ pid: zombie, host: hostname(), since: '2025-01-01T00:00:00.000Z' }))
  lastTouched(file + '.lock', 60_000)
  const { writer, log } = await open(file)
  t.match(log.lines[0], { level: 'warn', msg: /taking over a stale lock/, obj: { holder: { pid: zombie } } })
  await writer.close()
})

t.test('gateways starting together on a series with a stale lock: exactly one takes it over, the others are refused', async t => {
  const lock = join(process.cwd(), 'dist/audit/lock.js')
  const gone = spawn(process.execPath, ['-e', ''])
  await once(gone, 'exit')
  const { hostname } = await import('node:os')
  const rounds = 8
  for (let round = 0; round < rounds; round++) {
    const file = join(tempDir(), 'audit.jsonl')
    writeFileSync(file + '.lock', JSON.stringify({ pid: gone.pid, host: hostname(), since: '2025-01-01T00:00:00.000Z' }))
    lastTouched(file + '.lock', 60_000)
    const startAt = Date.now() + 400
    // Each holder keeps the lock, as a running gateway does, until every child has its outcome (its stdin is
    // ended then): a child that starts late on a loaded machine must find it held, not released meanwhile.
    const children = Array.from({ length: 4 }, () => spawn(process.execPath, ['--input-type=module', '-e', `
      const { acquireLock } = await import(${JSON.stringify(lock)})
      const { once } = await import('node:events')
      const released = once(process.stdin, 'end')
      process.stdin.resume()
      while (Date.now() < ${startAt}) {}
      try {
        const held = await acquireLock(${JSON.stringify(file)}, () => {})
        console.log('held')
        await released
        await held.release()
      } catch (err) {
        console.log(err.name)
      }
    `], { stdio: ['pipe', 'pipe', 'inherit'] }))
    const outcomes = await Promise.all(children.map(async child => {
      let out = ''
      await new Promise<void>(resolve => {
        child.stdout.on('data', (c: Buffer) => {
          out += c.toString()
          if (out.includes('\n')) resolve()
        })
        child.once('exit', () => { resolve() })
      })
      return out.trim()
    }))
    for (const child of children) child.stdin.end()
    await Promise.all(children.map(async child => { if (child.exitCode === null) await once(child, 'exit') }))
    if (outcomes.filter(o => o === 'held').length !== 1 || outcomes.some(o => o !== 'held' && o !== 'AuditLockError')) {
      t.fail(`round ${round + 1}: ${outcomes.join(', ')}`)
      return
    }
    t.same(readdirSync(join(file, '..')), [], `round ${round + 1}: nothing is left beside the series once released`)
  }
  t.pass(`${rounds} rounds of 4 at once: one held the lock each time, the others were refused`)
})

/** Mounts a 64 KiB file system (root can, here); the reason why not otherwise. */
function smallDisk (dir: string): string | null {
  const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', dir])
  return mount.status === 0 ? null : `mount refused: ${String(mount.stderr ?? mount.error).trim()}`
}
const probe = tempDir()
const cannotMount = smallDisk(probe)
if (cannotMount === null) spawnSync('umount', [probe])

t.test('a disk that fills up mid-write: the file keeps whole records only, and writing goes on where it stopped once there is room',
  { skip: cannotMount ?? false }, async t => {
  const dir = tempDir()
  t.equal(smallDisk(dir), null)
  t.teardown(() => { spawnSync('umount', [dir]) })
  const filler = join(dir, 'filler')
  writeFileSync(filler, Buffer.alloc(40 * 1024))
  const file = join(dir, 'audit.jsonl')
  const { writer, log } = await open(file)
  for (let i = 1; i <= 100; i++) writer.write(callRecord(i, { pad: 'x'.repeat(100) }))
  await until('the disk to fill', () => !writer.available)
  t.match(log.lines.find(l => l.level === 'error'), { obj: { err: { code: 'ENOSPC' } } })
  const partly = writer.stats().written
  t.ok(partly > 0 && partly < 100, `${partly} records went in before the disk was full`)
  t.same(parsed(file).map(r => r.seq), Array.from({ length: partly }, (_v, i) => i + 1), 'whole records only, no torn line')

  rmSync(filler)
  await until('the rest to be written', () => writer.available && writer.stats().written === 100)
  await writer.close()
  t.same(parsed(file).map(r => r.seq), Array.from({ length: 100 }, (_v, i) => i + 1))
  t.match(await verify(file), { ok: true, records: 100 })
})

t.test('a gateway starting on a full disk is refused in one line saying so, and leaves nothing beside the series', { skip: cannotMount ?? false }, async t => {
  const dir = tempDir()
  t.equal(smallDisk(dir), null)
  t.teardown(() => { spawnSync('umount', [dir]) })
  try { writeFileSync(join(dir, 'filler'), Buffer.alloc(128 * 1024)) } catch { /* full */ }
  const file = join(dir, 'audit.jsonl')
  const err = await open(file).then(() => null, (e: unknown) => e as Error)
  t.match(err, { message: /^cannot write the audit lock .*audit\.jsonl\.lock: ENOSPC/ })
  t.notMatch(err?.message ?? '', /\n/, 'one line')
  t.same(readdirSync(dir).filter(n => n !== 'filler' && n !== 'audit.jsonl'), [], 'no temporary lock file left')
})

/** A destination that takes writes and answers none of them until told to: a pipe nobody reads. */
function stuckStream () {
  const held: Array<() => void> = []
  const stream = new Writable({
    highWaterMark: 1,
    write (chunk: Buffer, _enc, done) {
      held.push(() => { lines.push(...chunk.toString().split('\n').filter(Boolean)); done() })
    }
  })
  const lines: string[] = []
  return { stream, lines, release () { while (held.length > 0) held.shift()!() } }
}

t.test('a destination that takes nothing: write() never blocks, a full buffer is a failed write, and the loss is said once writing works', async t => {
  const out = stuckStream()
  const { writer, log } = await open('-', { stdout: out.stream, maxPending: 5 })
  t.match(log.lines, [{ msg: /stdout .*no hash chain, no rotation/ }], 'says at start that stdout has no chain')
  for (let i = 1; i <= 5; i++) writer.write(callRecord(i))
  await sleep(20) // the first batch is in flight, and stuck
  t.ok(writer.available, 'waiting is not failing')
  for (let i = 6; i <= 12; i++) writer.write(callRecord(i)) // returns at once, whatever the destination does
  t.notOk(writer.available, 'a full buffer makes the writer unavailable')
  t.match(writer.stats(), { lost: 7 })
  t.match(log.lines.filter(l => l.level === 'error'), [{ msg: /a record was lost: the audit buffer is full/ }])

  out.release()
  await until('the writer to recover', () => writer.available)
  writer.write(callRecord(13))
  out.release()
  await until('record 13', () => (out.release(), out.lines.length >= 7))
  const records = out.lines.map(l => JSON.parse(l) as Record<string, unknown>)
  t.same(records.filter(r => r.event === undefined).map(r => r.requestId), [1, 2, 3, 4, 5, 13].map(i => callRecord(i).requestId))
  t.match(records.find(r => r.event === 'audit.lost'), { count: 7 })
  t.notOk('seq' in records[0]!, 'stdout records carry no chain')
  const closed = writer.close()
  out.release()
  await closed
})

t.test('records that cannot be written by close() are counted as lost and logged', async t => {
  const out = stuckStream()
  const { writer, log } = await open('-', { stdout: out.stream })
  writer.write(callRecord(1))
  const started = Date.now()
  await writer.close() // the destination never answers: close gives up after its deadline
  t.ok(Date.now() - started < 10_000)
  t.match(writer.stats(), { written: 0, lost: 1 })
  t.ok(log.lines.some(l => l.level === 'error' && /lost/.test(l.msg)))
  writer.write(callRecord(2))
  t.match(writer.stats(), { lost: 2 }, 'a record after close is lost, not written')
  out.release()
})

t.test('records a close could not write leave their trace in the chain: the next start says the unclean stop, as after a crash', async t => {
  // A stop while the disk is full: what close() cannot write is lost and logged. With the lock removed as at a clean
  // stop, the next start said nothing, and verify passed a trail that lost them without a word.
  const file = join(tempDir(), 'audit.jsonl')
  const { writer, log } = await open(file)
  writer.write(callRecord(1))
  await until('record 1', () => parsed(file).length === 1)
  renameSync(file, file + '.1') // (an outside rotation; nothing can be written at the path it leaves)
  mkdirSync(file)
  await until('the failure', () => !writer.available)
  writer.write(callRecord(2))
  await writer.close()
  t.match(writer.stats(), { lost: 1 })
  t.ok(log.lines.some(l => l.level === 'error' && /before closing and are lost/.test(l.msg)), 'the loss is logged')
  t.ok(existsSync(file + '.lock'), 'the lock is left for the next start')

  rmSync(file, { recursive: true })
  const next = await open(file)
  next.writer.write(callRecord(3))
  await next.writer.close()
  t.match(next.log.lines, [{ level: 'warn', msg: /taking over a stale lock/ }])
  t.match(parsed(file), [{ seq: 2, event: 'audit.unclean_stop', pid: process.pid }, { seq: 3 }])
  t.match(await verify(file), { ok: true, records: 3, notes: [/seq 2: .*closed with records it could not write/] })
})

t.test('a FIFO named like a closed file of the series is left out with a warning; one at the audit path is refused; neither hangs the start', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  spawnSync('mkfifo', [file + '.x'])
  const { writer, log } = await open(file)
  t.match(log.lines[0], { level: 'warn', msg: /not a regular file, though named like a file of the series: left out of it/, obj: { file: file + '.x' } })
  writer.write(callRecord(1))
  await writer.close()
  t.same((await seriesFiles(file)).map(f => f.path), [file], 'the series holds the regular file only')
  t.same(parsed(file).map(r => r.seq), [1])

  const other = join(tempDir(), 'audit.jsonl')
  spawnSync('mkfifo', [other])
  await t.rejects(open(other), { name: 'AuditStartError', message: /audit\.jsonl is not a regular file \(a symbolic link, device, pipe or directory\)/ })
  t.notOk(existsSync(other + '.lock'), 'the lock is released')
})

t.test('the active file\'s directory is created, and only the series\' own files count as its members', async t => {
  const dir = join(tempDir(), 'nested', 'deeper')
  const file = join(dir, 'audit.jsonl')
  await writeSeries(file, 3)
  writeFileSync(join(dir, 'other.jsonl'), 'not ours\n')
  t.same(readdirSync(dir).sort(), ['audit.jsonl', 'other.jsonl'])
  t.same((await seriesFiles(file)).map(f => f.path), [file])
})
