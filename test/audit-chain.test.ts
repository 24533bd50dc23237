// The audit hash chain and its verification: the chain is exactly the documented formula, and verification
// catches every kind of tampering, naming the file, line and seq of the first bad record.
import { createHash, createHmac } from 'node:crypto'
import { readFileSync, unlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'
import canonicalize from 'canonicalize'
import t from 'tap'
import { canonicalJson, chainHasher, GENESIS_HASH } from '../src/audit/chain.js'
import { inSeriesOrder } from '../src/audit/series.js'
import { verifySeries, type VerifyResult } from '../src/audit/verify.js'
import { callRecord, linesOf, parsed, tempDir, writeLines, writeSeries } from './fixtures/audit.js'

const sha256 = chainHasher()

/** 40 records over several files of about 10 records each. */
async function series (opts = {}) {
  const file = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(file, 40, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: false }, ...opts })
  return { file, files }
}

function failure (result: VerifyResult) {
  if (result.ok) throw new Error(`expected a failure, got ${JSON.stringify(result)}`)
  return result
}

t.test('each record holds seq from 1, prevHash and hash = sha256(prevHash + "\\n" + JCS(record without hash))', async t => {
  const { files } = await series()
  t.ok(files.length >= 3, `a series of ${files.length} files`)
  const records = files.flatMap(parsed)
  t.equal(records.length, 40)
  let prev = GENESIS_HASH
  records.forEach((r, i) => {
    t.equal(r.seq, i + 1)
    t.equal(r.prevHash, prev)
    const { hash, ...rest } = r
    const want = createHash('sha256').update(`${prev}\n${canonicalize(rest) as string}`).digest('hex')
    t.equal(hash, want, `seq ${i + 1}`)
    prev = hash as string
  })
  t.equal(records[0]!.prevHash, '0'.repeat(64), 'the first prevHash is 64 zeros')
  t.equal(parsed(files[1]!)[0]!.prevHash, parsed(files[0]!).at(-1)!.hash, 'a new file\'s first record links to the last file\'s')
})

t.test('an untouched series verifies, with its record count and head', async t => {
  const { files } = await series()
  const result = await verifySeries(files, sha256)
  t.same(result, { ok: true, records: 40, head: parsed(files.at(-1)!).at(-1)!.hash, notes: [] })
})

t.test('an edited record is caught at its own line', async t => {
  const { files } = await series()
  const lines = linesOf(files[1]!)
  lines[3] = lines[3]!.replace('"clientId":"team-', '"clientId":"team-x')
  writeLines(files[1]!, lines)
  const bad = failure(await verifySeries(files, sha256))
  t.match(bad, { file: files[1], line: 4, seq: parsed(files[1]!)[3]!.seq })
  t.match(bad.reason, /edited/)
})

t.test('a record re-spelled (same data, other text) to hide from audit query is caught at its own line, with or without an HMAC key', async t => {
  const respellings: Array<[string, (line: string) => string]> = [
    ['an escaped character', line => line.replace(/"clientId":"team-/, '"clientId":"team\\u002d')],
    ['a number in another notation', line => line.replace(/"status":(\d+)/, (_m, n: string) => `"status":${Number(n) / 100}e2`)],
    ['a key given twice', line => line.replace(/^\{/, '{"time":"1999-01-01T00:00:00.000Z",')],
    ['spaces between the fields', line => line.replace(/,"/g, ', "')]
  ]
  for (const hmacKey of [undefined, 'k'.repeat(32)]) {
    const hasher = chainHasher(hmacKey)
    for (const [what, respell] of respellings) {
      const { files } = await series(hmacKey === undefined ? {} : { hmacKey })
      const lines = linesOf(files[1]!)
      const respelled = respell(lines[3]!)
      t.not(respelled, lines[3], `${what}: the line changed`)
      t.same(JSON.parse(respelled), JSON.parse(lines[3]!), `${what}: the data it holds did not`)
      lines[3] = respelled
      writeLines(files[1]!, lines)
      const bad = failure(await verifySeries(files, hasher))
      t.match(bad, { file: files[1], line: 4, reason: /not spelled as the gateway writes it/ }, `${what}${hmacKey === undefined ? '' : ', HMAC'}: caught`)
    }
  }
})

t.test('an edited record whose own hash was recomputed is caught at the next record', async t => {
  const { files } = await series()
  const records = parsed(files[1]!)
  const forged: Record<string, unknown> = { ...records[3]!, clientId: 'someone-else' }
  const { hash: _old, ...rest } = forged
  forged.hash = sha256(forged.prevHash as string, canonicalize(rest) as string)
  const lines = linesOf(files[1]!)
  lines[3] = JSON.stringify(forged)
  writeLines(files[1]!, lines)
  const bad = failure(await verifySeries(files, sha256))
  t.match(bad, { file: files[1], line: 5, seq: records[4]!.seq })
  t.match(bad.reason, /prevHash does not match/)
})

t.test('a deleted record is caught where it is missing', async t => {
  const { files } = await series()
  const lines = linesOf(files[1]!)
  const seqAfter = parsed(files[1]!)[3]!.seq
  lines.splice(2, 1)
  writeLines(files[1]!, lines)
  const bad = failure(await verifySeries(files, sha256))
  t.match(bad, { file: files[1], line: 3, seq: seqAfter })
  t.match(bad.reason, /1 record was deleted/)
})

t.test('an inserted record is caught at its line', async t => {
  const { files } = await series()
  const lines = linesOf(files[1]!)
  lines.splice(3, 0, lines[2]!) // a copy of a real record: every field right, in the wrong place
  writeLines(files[1]!, lines)
  const bad = failure(await verifySeries(files, sha256))
  t.match(bad, { file: files[1], line: 4, seq: parsed(files[1]!)[3]!.seq })
  t.match(bad.reason, /inserted|reordered/)
})

t.test('reordered records are caught at the first out of place', async t => {
  const { files } = await series()
  const lines = linesOf(files[1]!)
  ;[lines[2], lines[3]] = [lines[3]!, lines[2]!]
  writeLines(files[1]!, lines)
  const bad = failure(await verifySeries(files, sha256))
  t.match(bad, { file: files[1], line: 3, seq: parsed(files[1]!)[2]!.seq })
  // (the record out of place comes first, so seq jumps there: the reason names reordering, not only a deletion)
  t.match(bad.reason, /reordered/)
})

t.test('a missing middle file is caught at the first record after the gap', async t => {
  const { files } = await series()
  unlinkSync(files[1]!)
  const rest = files.filter((_f, i) => i !== 1)
  const bad = failure(await verifySeries(rest, sha256))
  t.match(bad, { file: files[2], line: 1, seq: parsed(files[2]!)[0]!.seq })
  t.match(bad.reason, /records are missing between files/)
})

t.test('a middle file cut short is caught at the first record after the cut', async t => {
  const { files } = await series()
  writeLines(files[1]!, linesOf(files[1]!).slice(0, -2))
  const bad = failure(await verifySeries(files, sha256))
  t.match(bad, { file: files[2], line: 1, seq: parsed(files[2]!)[0]!.seq })
  t.match(bad.reason, /records are missing between files/)
})

t.test('a series whose first file was removed is caught: nothing says it was pruned', async t => {
  const { files } = await series()
  const bad = failure(await verifySeries(files.slice(1), sha256))
  t.match(bad, { file: files[1], line: 1, seq: parsed(files[1]!)[0]!.seq })
  t.match(bad.reason, /files are missing from its start/)
})

t.test('a line that is not a record is caught', async t => {
  const { files } = await series()
  const lines = linesOf(files[0]!)
  lines.splice(1, 0, '{"note":"nothing to see"}')
  writeLines(files[0]!, lines)
  t.match(failure(await verifySeries(files, sha256)), { file: files[0], line: 2, seq: null, reason: /not an audit record/ })
})

t.test('a record edited until it no longer parses (a byte order mark, a character before it) is caught at its own line as not a record', async t => {
  for (const [what, edit] of [['a BOM', (l: string) => `\ufeff${l}`], ['a character', (l: string) => `x${l}`], ['a brace', (l: string) => l.slice(1)]] as const) {
    for (const [where, fileIndex, lineIndex] of [['a middle line', 1, 3], ['the first line of a middle file', 1, 0], ['the first line of the series', 0, 0]] as const) {
      const { files } = await series()
      const lines = linesOf(files[fileIndex]!)
      lines[lineIndex] = edit(lines[lineIndex]!)
      writeLines(files[fileIndex]!, lines)
      // In the order audit verify takes them (by their first record's seq: an unreadable first line puts a file last).
      const ordered = (await inSeriesOrder(files)).map(f => f.path)
      t.match(failure(await verifySeries(ordered, sha256)), { file: files[fileIndex], line: lineIndex + 1, seq: null, reason: /not an audit record/ },
        `${what} on ${where}`)
    }
  }
})

t.test('a closed file none of whose lines is a record any more (overwritten, gzipped twice) is named, not the gap it leaves', async t => {
  for (const what of ['overwritten', 'gzipped twice']) {
    const { files } = await series()
    let spoiled = files[1]!
    if (what === 'overwritten') {
      writeLines(spoiled, linesOf(spoiled).map(l => l.slice(1)))
    } else {
      spoiled = `${files[1]!}.gz`
      writeFileSync(spoiled, gzipSync(gzipSync(readFileSync(files[1]!))))
      unlinkSync(files[1]!)
    }
    const ordered = (await inSeriesOrder(files.map(f => f === files[1] ? spoiled : f))).map(f => f.path)
    t.match(failure(await verifySeries(ordered, sha256)), { file: spoiled, line: 1, seq: null, reason: /not an audit record/ }, what)
  }
})

t.test('a published head passes only as the hash of a verified record: a cut tail fails even when a torn line quotes the head', async t => {
  const key = 'k'.repeat(64)
  const hmac = chainHasher(key)
  const file = join(tempDir(), 'audit.jsonl')
  await writeSeries(file, 10, { hmacKey: key })
  const head = parsed(file).at(-1)!.hash as string // published elsewhere, as the README says
  t.match(await verifySeries([file], hmac, { head }), { ok: true, notes: ['the published head is the hash of seq 10: the trail is whole up to it (0 records after it)'] })
  await writeSeries(file, 2, { hmacKey: key }, 11)
  t.match(await verifySeries([file], hmac, { head }), { ok: true, records: 12, notes: [/seq 10: .*\(2 records after it\)/] }, 'records after it are fine')

  // Records 6..12 are cut off, and what is left ends in a line cut short, as a crash leaves it, that quotes the head.
  writeFileSync(file, linesOf(file).slice(0, 5).map(l => l + '\n').join('') + `{"action":"item.list","hash":"${head}"`)
  await writeSeries(file, 1, { hmacKey: key }, 13) // the gateway starts again, and marks the line torn
  t.ok(readFileSync(file, 'utf8').includes(`"hash":"${head}"`), 'the head is still text in the file')
  t.match(await verifySeries([file], hmac), { ok: true, notes: [/a torn line .* may have been lost/] }, 'the files alone cannot tell a cut from a crash')
  t.match(failure(await verifySeries([file], hmac, { head })), {
    file, line: 8, seq: 7, reason: `the published head ${head} is not the hash of any record of the series: records were cut from its end ` +
      '(or the head is from another series, or another AUDIT_HMAC_KEY)'
  })
})

t.test('a published head whose record rotate.keep has since removed is said to be gone with the pruned files, not only a cut end', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const opts = { rotate: { maxBytes: 4096, daily: false, keep: 2, gzip: false } }
  await writeSeries(file, 5, opts)
  const head = parsed(file).at(-1)!.hash as string // published elsewhere, as the README says
  const files = await writeSeries(file, 40, opts, 6)
  const oldest = parsed(files[0]!)[0]!
  t.ok(oldest.seq as number > 6, `rotate.keep removed the files up to seq ${oldest.seq as number - 1}, the published head's among them`)
  t.ok((await verifySeries(files, sha256)).ok, 'the series verifies')
  const bad = failure(await verifySeries(files, sha256, { head }))
  t.match(bad, { file: files.at(-1), seq: parsed(files.at(-1)!).at(-1)!.seq })
  t.match(bad.reason, `rotate.keep removed the files holding records up to seq ${oldest.seq as number - 1}; the oldest record left, ` +
    `seq ${oldest.seq as number}, was written at ${oldest.time as string}. A head published before then went with those files`)
})

t.test('a series that starts after seq 1 (rotate.keep pruned it) checked without its HMAC key, or with another, is not called edited without a word of the key', async t => {
  const key = 'k'.repeat(64)
  const { files } = await series({ hmacKey: key, rotate: { maxBytes: 4096, daily: false, keep: 2, gzip: false } })
  t.ok(parsed(files[0]!)[0]!.seq as number > 1, 'the oldest files were pruned')
  t.ok((await verifySeries(files, chainHasher(key))).ok, 'verifies with the key')
  for (const [what, hasher] of [['without the key', sha256], ['with another key', chainHasher('w'.repeat(64))]] as const) {
    t.match(failure(await verifySeries(files, hasher)), { line: 1, reason: /written with another AUDIT_HMAC_KEY, or with none/ }, what)
    t.match(failure(await verifySeries([files.at(-1)!], hasher)), { line: 1, reason: /another AUDIT_HMAC_KEY/ }, `${what}, the active file alone`)
  }
})

t.test('with an HMAC key the chain verifies only with that key, and a chain re-hashed without it is rejected', async t => {
  const key = 'k'.repeat(64)
  const hmac = chainHasher(key)
  const { files } = await series({ hmacKey: key })
  const first = parsed(files[0]!)[0]!
  const { hash, ...rest } = first
  t.equal(hash, createHmac('sha256', key).update(`${GENESIS_HASH}\n${canonicalize(rest) as string}`).digest('hex'), 'HMAC-SHA256 replaces sha256')
  t.ok((await verifySeries(files, hmac)).ok, 'verifies with the key')
  t.match(failure(await verifySeries(files, sha256)), { line: 1, seq: 1, reason: /AUDIT_HMAC_KEY/ }, 'not without it')
  t.notOk((await verifySeries(files, chainHasher('w'.repeat(64)))).ok, 'nor with another key')

  // Someone who can write the files edits a record and re-forges the whole chain after it, without the key.
  let prev = GENESIS_HASH
  let forgedAt = 0
  for (const f of files) {
    writeLines(f, parsed(f).map(r => {
      if (r.seq === 15) { r.clientId = 'someone-else'; forgedAt = 15 }
      r.prevHash = prev
      const { hash: _h, ...body } = r
      r.hash = sha256(prev, canonicalize(body) as string)
      prev = r.hash as string
      return JSON.stringify(r)
    }))
  }
  t.equal(forgedAt, 15)
  t.ok((await verifySeries(files, sha256)).ok, 'the forgery holds together as a plain sha256 chain')
  t.match(failure(await verifySeries(files, hmac)), { seq: 1, line: 1 }, 'and is rejected with the key, from its first record')
})

t.test('a key changed at a restart is named where the chain goes on under it, and an edit there is still called an edit', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const [a, b] = ['a'.repeat(64), 'b'.repeat(64)]
  await writeSeries(file, 5, { hmacKey: a })
  await writeSeries(file, 5, { hmacKey: b }, 6) // restarted with another AUDIT_HMAC_KEY, against the README's advice
  t.match(failure(await verifySeries([file], chainHasher(a))), {
    line: 6, seq: 6, reason: /from here on the records were written with another AUDIT_HMAC_KEY, or with none/
  }, 'with the old key: where the new one starts, said as a change of key')
  t.match(failure(await verifySeries([file], chainHasher(b))), { line: 1, seq: 1, reason: /another AUDIT_HMAC_KEY/ }, 'with the new key: from the start')

  const lines = linesOf(file)
  lines[2] = lines[2]!.replace('"status":200', '"status":204')
  writeLines(file, lines)
  t.match(failure(await verifySeries([file], chainHasher(a))), { line: 3, seq: 3, reason: /^hash does not match the record's content: the record was edited$/ },
    'one record edited, the next one verifying: an edit')
})

t.test('the canonical JSON of a flat call record is exactly RFC 8785\'s, whatever its keys and values', async t => {
  const samples: Array<Record<string, unknown>> = [
    callRecord(1),
    { b: 1, a: 'x', c: null, d: true, e: false, f: undefined, g: -0, h: 1e21, i: 0.1, j: 123456789012345680000 },
    { 'é': 'ü', Z: 'a', _: '\u0000\u001f"\\/', 'a b': '\u2028\u2029', '10': 10, '9': 9 },
    { emoji: '😀', lone: 'x\uD800y', key: 'v' },
    { nested: { b: 1, a: [1, { d: 2, c: 3 }] }, n: 1 },
    { big: Number.MAX_SAFE_INTEGER, small: 5e-324, neg: -1.5e-7 }
  ]
  for (let i = 0; i < 200; i++) {
    const r: Record<string, unknown> = {}
    for (let k = 0; k < 12; k++) {
      const key = Math.random().toString(36).slice(2, 2 + (k % 7) + 1)
      const pick = Math.floor(Math.random() * 5)
      r[key] = pick === 0 ? Math.random() * 1e6 : pick === 1 ? Math.floor(Math.random() * 1000) : pick === 2 ? null : pick === 3 ? Math.random() > 0.5 : String.fromCharCode(...Array.from({ length: 8 }, () => Math.floor(Math.random() * 0x2fff)))
    }
    samples.push(r)
  }
  for (const sample of samples) {
    let want: string
    try { want = canonicalize(sample) as string } catch { want = 'refused' }
    const got = canonicalJson(sample)
    if (want === 'refused') t.notMatch(got, /\\ud800/i, 'a lone surrogate is replaced, not written')
    else if (got !== want) { t.equal(got, want, JSON.stringify(sample)); return }
  }
  t.pass(`${samples.length} records: the same bytes as the canonicalize package`)
})
