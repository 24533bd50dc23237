// `audit verify` and `audit query` as ops run them: the files found through the config like `start` finds them,
// gzipped files included, exit codes and messages as documented.
import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { appendFileSync, readdirSync, truncateSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import { callRecord, linesOf, parsed, tempDir, writeLines, writeSeries } from './fixtures/audit.js'
import { queryFiles } from '../src/audit/query.js'
import { chainHasher } from '../src/audit/chain.js'
import { acquireLock, seriesIsBeingWritten } from '../src/audit/lock.js'
import { firstLine, pinFiles, readLines, rotatedName, seriesFiles } from '../src/audit/series.js'
import { verifySeries } from '../src/audit/verify.js'
import { parseQueryArgs } from '../src/cli/audit-query.js'
import { BIN, configFile, env, gatewayYaml, run, runAsync } from './fixtures/bin.js'
import OpenAI from 'openai'
import { KEYS, startGateway, testConfig } from './fixtures/gateway.js'
import { startUpstream } from './fixtures/upstream.js'
import { until } from './fixtures/client.js'

/** A config whose audit series holds records 1..60 over several files, the closed ones gzipped. */
async function gzippedSeries () {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 60, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: true } })
  return { auditFile, files, config: configFile(gatewayYaml(auditFile)).file }
}

t.test('audit verify finds the series through the config and prints the count and head', async t => {
  const { config, files } = await gzippedSeries()
  t.ok(files.filter(f => f.endsWith('.gz')).length >= 3, 'several gzipped files')
  const head = parsed(files.at(-1)!).at(-1)!.hash
  const r = run(['audit', 'verify', '--config', config])
  t.equal(r.status, 0, r.stderr)
  t.equal(r.stdout, `ok: 60 records, chain intact, head ${head}\n`)
  const viaEnv = run(['audit', 'verify'], { GATEWAY_CONFIG: config })
  t.equal(viaEnv.stdout, r.stdout, 'GATEWAY_CONFIG, like start')
})

t.test('audit verify exits 1 naming the file, line and seq of the first bad record', async t => {
  const { config, auditFile } = await gzippedSeries()
  const lines = linesOf(auditFile)
  lines[1] = lines[1]!.replace('"status":200', '"status":204')
  writeLines(auditFile, lines)
  const r = run(['audit', 'verify', '--config', config])
  t.equal(r.status, 1)
  const seq = parsed(auditFile)[1]!.seq
  t.equal(r.stderr, `FAILED: ${auditFile}:2 (seq ${seq}): hash does not match the record's content: the record was edited\n`)
  t.equal(r.stdout, '')
})

t.test('a gzipped file cut short: verify, query and start name it and say what is wrong, with no stack trace', async t => {
  for (const which of ['the second', 'the newest'] as const) {
    const { config, files, auditFile } = await gzippedSeries()
    const gz = files.filter(f => f.endsWith('.gz'))
    const damaged = which === 'the second' ? gz[1]! : gz.at(-1)!
    truncateSync(damaged, 60)
    const verify = run(['audit', 'verify', '--config', config])
    t.equal(verify.status, 1, `${which}: verify fails`)
    t.equal(verify.stderr, `FAILED: ${damaged}:1: cannot read audit file ${damaged} (Z_BUF_ERROR): a compressed file cut short or damaged\n`,
      `${which}: verify names the damaged file, not a gap it makes`)
    const query = run(['audit', 'query', '--config', config])
    t.equal(query.status, 1, `${which}: query fails`)
    t.match(query.stderr, `cannot read audit file ${damaged}`, `${which}: query names it`)
    t.notMatch(query.stderr + verify.stderr, /\n\s+at /, `${which}: no stack trace`)
    if (which === 'the newest') {
      writeFileSync(auditFile, '') // the active file empty: the start reads the chain's head from the newest closed file
      const start = run(['start', '--config', config])
      t.equal(start.status, 1, 'start refuses')
      t.match(start.stderr, `cannot read audit file ${damaged}`, 'start names it')
      t.notMatch(start.stderr, /\n\s+at /, 'no stack trace')
    }
  }
})

t.test('a FIFO named like a file of the series: verify and query name it and fail at once, they do not wait on it', async t => {
  const { config, auditFile, files } = await gzippedSeries()
  const fifo = auditFile + '.x'
  spawnSync('mkfifo', [fifo])
  const inSeries = `ohmygpt-gateway audit: cannot read audit file ${fifo} (not a regular file (a FIFO, device, socket, symbolic link ` +
    'or directory) named like a file of the series: move it out of the audit directory)\n'
  const verify = run(['audit', 'verify', '--config', config])
  t.equal(verify.status, 1, 'verify fails')
  t.equal(verify.stderr, inSeries)
  const query = run(['audit', 'query', '--config', config])
  t.equal(query.status, 1, 'query fails')
  t.equal(query.stderr, inSeries)
  t.equal(query.stdout, '', 'before printing anything')
  const named = run(['audit', 'verify', ...files, fifo])
  t.equal(named.status, 1, 'named on the command line, it fails too')
  t.equal(named.stderr, `FAILED: ${fifo}:1: cannot read audit file ${fifo} (not a regular file: a FIFO, device, socket or directory)\n`)
})

t.test('a reader that stops early closes the file, a gzipped one too (no descriptor left for the garbage collector)', async t => {
  const { files } = await gzippedSeries()
  const gz = files.find(f => f.endsWith('.gz'))!
  const open = () => readdirSync('/proc/self/fd').length
  const before = open()
  for (let i = 0; i < 20; i++) t.match(await firstLine(gz), /^\{"action"/)
  for (let i = 0; i < 50 && open() > before; i++) await sleep(10) // closing is asynchronous
  // At most as many as before: a descriptor an earlier test left closing may close meanwhile (seen once in CI).
  t.ok(open() <= before, `every descriptor closed (${open()} open, ${before} before)`)
})

t.test('a very long line is read with work linear in its length: its bytes are copied once, not once per chunk read', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const size = 4 << 20 // 64 chunks of 64 KiB: copying the line so far at each chunk would copy about 130 MiB
  writeFileSync(file, '{"a":"' + 'x'.repeat(size) + '"}\n{"b":1}\n{"c":')
  const concat = Buffer.concat
  let copied = 0
  Buffer.concat = ((list: readonly Uint8Array[], total?: number) => {
    const joined = concat(list, total)
    copied += joined.length
    return joined
  }) as typeof Buffer.concat
  const lengths: number[] = []
  const end = { unterminated: false }
  try {
    for await (const line of readLines(file, end)) lengths.push(line.length)
  } finally {
    Buffer.concat = concat
  }
  t.same(lengths, [size + 8, 7, 5], 'every line whole, the unterminated one too')
  t.ok(end.unterminated, 'the last line had no newline')
  t.ok(copied < 2 * size, `${copied} bytes copied for a line of ${size}`)
})

t.test('audit verify given a shell glob leaves out the lock and files being written', async t => {
  const { auditFile, files } = await gzippedSeries()
  writeFileSync(auditFile + '.lock', '{"pid":1,"host":"h","since":"x"}\n')
  writeFileSync(auditFile + '.20250101T000000Z.99.gz.tmp', 'partial')
  const r = run(['audit', 'verify', ...files, auditFile + '.lock', auditFile + '.20250101T000000Z.99.gz.tmp'])
  t.equal(r.status, 0, r.stderr)
  t.match(r.stdout, /^ok: 60 records/)
})

t.test('audit verify and query read only audit.file from the config: the auditor needs none of the gateway\'s secrets', async t => {
  const { auditFile } = await gzippedSeries()
  const config = configFile(`
upstream: { baseUrls: ["http://127.0.0.1:9"], apiKey: "\${OHMYGPT_API_KEY}" }
audit: { file: "\${AUDIT_DIR}/audit.jsonl" }
clients:
  - { id: team-a, keySha256: "\${TEAM_A_DIGEST}", scopes: [read] }
`).file
  const dir = join(auditFile, '..')
  const verify = run(['audit', 'verify', '--config', config], { AUDIT_DIR: dir })
  t.equal(verify.status, 0, verify.stderr)
  t.match(verify.stdout, /^ok: 60 records/)
  const query = run(['audit', 'query', '--config', config, '--limit', '1'], { AUDIT_DIR: dir })
  t.equal(query.status, 0, query.stderr)
  t.equal(query.stdout.trim().split('\n').length, 1)
  const unset = run(['audit', 'verify', '--config', config])
  t.equal(unset.status, 1)
  t.match(unset.stderr, /audit\.file: environment variable AUDIT_DIR is not set/, 'what it does read must be there')
  for (const [yaml, message] of [['audit: { file: null }', /audit\.file: must be a path or "-"/], ['audit: nope', /audit: must be a map/]] as const) {
    const bad = run(['audit', 'verify', '--config', configFile(yaml).file])
    t.equal(bad.status, 1, `${yaml}: refused, as start refuses it`)
    t.match(bad.stderr, message)
  }
})

t.test('audit verify --head passes only when a head published earlier is still the hash of a record', async t => {
  const { config, auditFile } = await gzippedSeries()
  const head = parsed(auditFile).at(-1)!.hash as string
  const whole = run(['audit', 'verify', '--config', config, '--head', head])
  t.equal(whole.status, 0, whole.stderr)
  t.equal(whole.stdout, `ok: 60 records, chain intact, head ${head}\n` +
    'note: the published head is the hash of seq 60: the trail is whole up to it (0 records after it)\n')
  const lines = linesOf(auditFile)
  writeLines(auditFile, lines.slice(0, -1)) // the last record cut off: what is left still links
  t.equal(run(['audit', 'verify', '--config', config]).status, 0, 'without --head, a cut tail passes')
  const cut = run(['audit', 'verify', '--config', config, '--head', head])
  t.equal(cut.status, 1)
  t.equal(cut.stderr, `FAILED: ${auditFile}:${lines.length - 1} (seq 59): the published head ${head} is not the hash of any record ` +
    'of the series: records were cut from its end (or the head is from another series, or another AUDIT_HMAC_KEY)\n')
  const bad = run(['audit', 'verify', '--config', config, '--head', 'abc'])
  t.equal(bad.status, 1)
  t.equal(bad.stderr, 'ohmygpt-gateway audit: --head takes a record hash: 64 hexadecimal characters\n')
})

t.test('audit verify with AUDIT_HMAC_KEY checks an HMAC chain, and refuses a key too short to trust', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const key = 'a'.repeat(64)
  await writeSeries(auditFile, 5, { hmacKey: key })
  t.equal(run(['audit', 'verify', auditFile], { AUDIT_HMAC_KEY: key }).status, 0)
  const short = run(['audit', 'verify', auditFile], { AUDIT_HMAC_KEY: 'short' })
  t.equal(short.status, 1)
  t.match(short.stderr, /AUDIT_HMAC_KEY is too short \(5 characters; at least 32/)
  t.notMatch(short.stderr, /short"/, 'the key itself is not echoed')
})

async function query (files: string[], ...args: string[]) {
  const { filters, limit } = parseQueryArgs(args, Date.parse('2025-01-02T00:00:00Z'))
  const found: string[] = []
  await queryFiles(files, filters, limit, record => { found.push(record.requestId as string); return true })
  return found
}

t.test('audit query filters return exactly the matching records, oldest first, over plain and gzipped files', async t => {
  const { files } = await gzippedSeries()
  const all = Array.from({ length: 60 }, (_v, i) => callRecord(i + 1))
  const ids = (rs: Array<Record<string, unknown>>) => rs.map(r => r.requestId)
  t.same(await query(files, '--client', 'team-a'), ids(all.filter(r => r.clientId === 'team-a')))
  t.same(await query(files, '--conversation', 'conv_2', '--action', 'item.delete'), ids(all.filter(r => r.conversationId === 'conv_2')))
  t.same(await query(files, '--conversation', 'conv_2', '--action', 'item.list'), [])
  t.same(await query(files, '--item', 'msg_17'), [callRecord(17).requestId])
  t.same(await query(files, '--status', '404'), ids(all.filter(r => r.status === 404)))
  t.same(await query(files, '--status', '4xx', '--client', 'team-b'), ids(all.filter(r => r.status === 404 && r.clientId === 'team-b')))
  t.same(await query(files, '--status', '2xx', '--outcome', 'ok'), ids(all.filter(r => r.status === 200)))
  t.same(await query(files, '--outcome', 'denied'), [])
  t.same(await query(files, '--since', '2025-01-01T00:00:10Z', '--until', '2025-01-01T00:00:13Z'), ids(all.slice(9, 12)))
  const tz = process.env.TZ
  process.env.TZ = 'America/New_York' // an operator's machine away from UTC
  t.same(await query(files, '--since', '2025-01-01T00:00:10', '--until', '2025-01-01T00:00:13.000'), ids(all.slice(9, 12)),
    'a time with no offset is UTC, as the trail\'s times are, wherever the command runs')
  t.same(await query(files, '--since', '2025-01-01 00:00:10', '--until', '2025-01-01 00:00:13'), ids(all.slice(9, 12)),
    'a date and time written with a space instead of T is UTC too, not the machine\'s local time')
  if (tz === undefined) delete process.env.TZ
  else process.env.TZ = tz
  t.same(await query(files, '--since', '23h'), [], 'an age counts back from now')
  t.same(await query(files, '--since', '1d'), ids(all), '1d before 2025-01-02 is the start of the series')
  t.same(await query(files, '--limit', '3'), ids(all.slice(0, 3)))
  t.same(await query(files, '--limit', '0'), [])
  t.same(await query(files), ids(all), 'no filter: every call record, no chain event')
})

t.test('audit query from the command line: JSONL as written, found through the config', async t => {
  const { config } = await gzippedSeries()
  const r = run(['audit', 'query', '--config', config, '--client', 'team-a', '--limit', '2'])
  t.equal(r.status, 0, r.stderr)
  const lines = r.stdout.split('\n')
  t.equal(lines.length, 3, 'two records, one a line')
  t.match(JSON.parse(lines[0]!), { requestId: callRecord(2).requestId, seq: 2, hash: /^[0-9a-f]{64}$/ })
  t.match(JSON.parse(lines[1]!), { requestId: callRecord(4).requestId, seq: 4 })
})

t.test('audit query --ip finds the calls from one address, the refused ones with no client\'s key included', async t => {
  // As the gateway writes them: a client's call, then wrong keys from another address (401, then 429 once past
  // limits.authFailuresPerMinute), a refused expired key from it (its client named), and the client's call again.
  const shapes: Array<Record<string, unknown>> = [
    { clientId: 'team-a', ip: '10.1.4.20', status: 200, outcome: 'ok' },
    { clientId: null, ip: '203.0.113.9', status: 401, outcome: 'denied' },
    { clientId: null, ip: '203.0.113.9', status: 429, outcome: 'denied' },
    { clientId: 'team-b', ip: '203.0.113.9', status: 401, outcome: 'denied' },
    { clientId: 'team-a', ip: '2001:db8::7', status: 200, outcome: 'ok' }
  ]
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 10, {}, 1, i => callRecord(i, shapes[i % shapes.length]))
  const ids = (keep: (shape: Record<string, unknown>) => boolean) =>
    Array.from({ length: 10 }, (_v, n) => n + 1).filter(i => keep(shapes[i % shapes.length]!)).map(i => callRecord(i).requestId)
  t.same(await query(files, '--ip', '203.0.113.9'), ids(s => s.ip === '203.0.113.9'), 'every call from the address')
  t.same(await query(files, '--ip', '203.0.113.9', '--client', 'none'), ids(s => s.ip === '203.0.113.9' && s.clientId === null),
    'the ones with no client\'s key')
  t.same(await query(files, '--ip', '2001:db8::7'), ids(s => s.ip === '2001:db8::7'))
  t.same(await query(files, '--ip', '203.0.113.'), [], 'the whole address, not a prefix')
  const r = run(['audit', 'query', '--config', configFile(gatewayYaml(auditFile)).file, '--ip', '203.0.113.9', '--status', '429'])
  t.equal(r.status, 0, r.stderr)
  t.same(r.stdout.trim().split('\n').map(line => (JSON.parse(line) as Record<string, unknown>).requestId),
    ids(s => s.ip === '203.0.113.9' && s.status === 429), 'from the command line too')
})

t.test('audit query --ip finds an address however the operator spells it, as the records write it one way', async t => {
  // The gateway writes `::ffff:203.0.113.9` (a dual-stack listener's IPv4 peer, as `ss` and a proxy's log show it) as
  // 203.0.113.9, and an IPv6 address lowercase and compressed: the spelling an operator copies from elsewhere finds
  // the same calls, not none.
  const shapes: Array<Record<string, unknown>> = [
    { clientId: null, ip: '203.0.113.9', status: 401, outcome: 'denied' },
    { clientId: 'team-a', ip: '2001:db8::7', status: 200, outcome: 'ok' },
    { clientId: 'team-a', ip: '10.1.4.20', status: 200, outcome: 'ok' }
  ]
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 9, {}, 1, i => callRecord(i, shapes[i % shapes.length]))
  const ids = (ip: string) => Array.from({ length: 9 }, (_v, n) => n + 1).filter(i => shapes[i % shapes.length]!.ip === ip).map(i => callRecord(i).requestId)
  for (const spelling of ['::ffff:203.0.113.9', '::FFFF:203.0.113.9', '::ffff:cb00:7109']) {
    t.same(await query(files, '--ip', spelling), ids('203.0.113.9'), spelling)
  }
  for (const spelling of ['2001:DB8::7', '2001:db8:0:0:0:0:0:7', '2001:0db8::0007']) {
    t.same(await query(files, '--ip', spelling), ids('2001:db8::7'), spelling)
  }
  t.same(await query(files, '--ip', '203.0.113.'), [], 'still the whole address, not a prefix')
})

t.test('audit query --owner answers "which calls were refused on team-a\'s objects", whoever made them', async t => {
  // As the gateway writes them: team-a on its own conversation; team-b refused it (404, denied, ownerId team-a);
  // team-b on its own; a call on no object (ownerId null).
  const shapes: Array<Record<string, unknown>> = [
    { clientId: 'team-a', ownerId: 'team-a', status: 200, outcome: 'ok' },
    { clientId: 'team-b', ownerId: 'team-a', status: 404, outcome: 'denied' },
    { clientId: 'team-b', ownerId: 'team-b', status: 200, outcome: 'ok' },
    { clientId: 'team-b', ownerId: null, status: 401, outcome: 'denied' }
  ]
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 12, {}, 1, i => callRecord(i, shapes[i % shapes.length]))
  const ids = (keep: (shape: Record<string, unknown>) => boolean) =>
    Array.from({ length: 12 }, (_v, n) => n + 1).filter(i => keep(shapes[i % shapes.length]!)).map(i => callRecord(i).requestId)
  t.same(await query(files, '--owner', 'team-a'), ids(s => s.ownerId === 'team-a'), 'every call on team-a\'s objects')
  t.same(await query(files, '--owner', 'team-a', '--outcome', 'denied'), ids(s => s.ownerId === 'team-a' && s.outcome === 'denied'),
    'the refused ones: team-b\'s reads of them')
  t.same(await query(files, '--owner', 'team-a', '--client', 'team-b'), ids(s => s.ownerId === 'team-a' && s.clientId === 'team-b'))
  t.same(await query(files, '--owner', 'team-c'), [])
  // As --client none: the calls on no team's object (a create, one refused before its owner was known).
  t.same(await query(files, '--owner', 'none'), ids(s => s.ownerId === null), '--owner none: the calls with no owner')
  t.same(await query(files, '--owner', 'none', '--client', 'none'), [], 'each filter on its own field')
  const r = run(['audit', 'query', '--config', configFile(gatewayYaml(auditFile)).file, '--owner', 'team-a', '--outcome', 'denied'])
  t.equal(r.status, 0, r.stderr)
  t.same(r.stdout.trim().split('\n').map(line => JSON.parse(line) as Record<string, unknown>).map(rec => [rec.clientId, rec.ownerId, rec.status]),
    ids(s => s.ownerId === 'team-a' && s.outcome === 'denied').map(() => ['team-b', 'team-a', 404]), 'from the command line too')
  const table = run(['audit', 'query', '--config', configFile(gatewayYaml(auditFile)).file, '--owner', 'team-a', '--format', 'table'])
  const [header, ...rows] = table.stdout.trim().split('\n')
  t.match(header, /^time\s+client\s+owner\s+action\s/, 'the table has an owner column')
  const onTeamA = Array.from({ length: 12 }, (_v, n) => shapes[(n + 1) % shapes.length]!).filter(s => s.ownerId === 'team-a')
  t.same(rows.map(row => row.split(/\s+/).slice(1, 3)), onTeamA.map(s => [s.clientId, 'team-a']), 'who called, and whose object it was')
})

t.test('audit query --client none finds the calls gateway_denied_total{client="none"} counts: those made with no client\'s key', async t => {
  // The metrics label a call without a client's key "none" (no client may have that id): an operator checking a
  // spike of it against the trail asks for that label, and got nothing, every record of it holding clientId null.
  const shapes: Array<Record<string, unknown>> = [
    { clientId: null, keyId: null, status: 401, outcome: 'denied' },
    { clientId: 'team-a', status: 200, outcome: 'ok' },
    { clientId: null, keyId: null, status: 429, outcome: 'denied' }
  ]
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 9, {}, 1, i => callRecord(i, shapes[i % shapes.length]))
  const ids = (keep: (shape: Record<string, unknown>) => boolean) =>
    Array.from({ length: 9 }, (_v, n) => n + 1).filter(i => keep(shapes[i % shapes.length]!)).map(i => callRecord(i).requestId)
  const withoutKey = ids(s => s.clientId === null)
  t.same(await query(files, '--client', 'none'), withoutKey)
  t.same(await query(files, '--client', 'none', '--status', '401'), ids(s => s.clientId === null && s.status === 401))
  t.same(await query(files, '--client', 'team-a'), ids(s => s.clientId === 'team-a'), 'a client id as before')
  const r = run(['audit', 'query', '--config', configFile(gatewayYaml(auditFile)).file, '--client', 'none', '--format', 'table'])
  t.equal(r.stdout.trim().split('\n').length, 1 + withoutKey.length, 'from the command line too, one row each')
})

t.test('audit query answers "who deleted item X of conversation Y, when, from where" as a table', async t => {
  const { config } = await gzippedSeries()
  const r = run(['audit', 'query', '--config', config, '--action', 'item.delete', '--conversation', 'conv_2', '--item', 'msg_17', '--format', 'table'])
  t.equal(r.status, 0)
  const [header, row, ...rest] = r.stdout.split('\n')
  t.match(header, /^time\s+client\s+owner\s+action\s+status\s+outcome\s+model\s+conversation\s+item\s+response\s+ip\s+request$/)
  t.match(row, /^2025-01-01T00:00:17\.000Z\s+team-b\s+-\s+item\.delete\s+200\s+ok\s+-\s+conv_2\s+msg_17\s+-\s+127\.0\.0\.1\s+gw_0+17$/)
  t.same(rest, [''])
})

t.test('audit query --format table shows a Responses call\'s model and response, and OpenAI\'s ids (53 characters) keep the columns in line', async t => {
  // The table had no model or response column, and ids as long as OpenAI's overflowed a 22-character column,
  // shifting the rest of the row.
  const hex = (c: string) => c.repeat(48)
  const shapes: Array<Record<string, unknown>> = [
    { action: 'response.create', method: 'POST', conversationId: `conv_${hex('a')}`, itemId: null, responseId: `resp_${hex('b')}`, model: 'gpt-4o-mini-2024-07-18' },
    { action: 'item.retrieve', method: 'GET', conversationId: `conv_${hex('c')}`, itemId: `msg_${hex('d')}`, responseId: null, model: null },
    // (an id as long as the gateway takes: its row shifts, the next ones do not)
    { action: 'conversation.retrieve', method: 'GET', conversationId: `conv_${'e'.repeat(100)}`, itemId: null, responseId: null, model: null }
  ]
  const auditFile = join(tempDir(), 'audit.jsonl')
  await writeSeries(auditFile, 4, {}, 1, i => callRecord(i, shapes[(i - 1) % shapes.length]))
  const table = run(['audit', 'query', '--config', configFile(gatewayYaml(auditFile)).file, '--format', 'table'])
  t.equal(table.status, 0, table.stderr)
  const [header, ...rows] = table.stdout.trimEnd().split('\n') as [string, ...string[]]
  t.match(header, /^time\s+client\s+owner\s+action\s+status\s+outcome\s+model\s+conversation\s+item\s+response\s+ip\s+request$/)
  const starts = (line: string) => [...line.matchAll(/\S+/g)].map(m => m.index)
  for (const i of [0, 1, 3]) t.same(starts(rows[i]!), starts(header), `row ${i + 1}: each cell under its heading`)
  const cells = rows[0]!.split(/\s+/)
  t.same(cells.slice(6, 10), ['gpt-4o-mini-2024-07-18', `conv_${hex('a')}`, '-', `resp_${hex('b')}`], 'its model and response, whole')
  t.ok(rows[2]!.includes(` conv_${'e'.repeat(100)} `), 'a longer id is shown whole')
  t.same(starts(rows[2]!).slice(-2), starts(header).slice(-2), 'and the cells after it are back in their columns once there is room')
})

t.test('a client cannot write rows of its own into the table ops read: what it chose is shown escaped', async t => {
  // The item id a refused body named is recorded as it came (audit query --item finds it); in a table, a line break
  // in it started a row of the client's making ("team-b deleted msg_forged"), and a terminal escape hid the real
  // address and request id after it.
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const forged = 'msg_1\n2025-01-01T00:00:00.000Z team-b         team-a         item.delete           200    ok             ' +
    'conv_forged            msg_forged             10.9.9.9        gw_forged\u001b[8m\u202e'
  await t.rejects(client.responses.create({ model: 'gpt-4o-mini', input: [{ type: 'item_reference', id: forged }] }),
    { status: 400, code: 'item_reference_not_allowed' })
  const [record] = await gw.auditFile()
  t.equal(record?.itemId, forged, 'the record keeps what the client named')
  const r = run(['audit', 'query', '--format', 'table', gw.config.audit.file])
  t.equal(r.status, 0, r.stderr)
  const rows = r.stdout.split('\n').slice(1, -1)
  t.equal(rows.length, 1, 'one row for the one call')
  t.notMatch(r.stdout, /[\u001b\u202e]/, 'no escape or bidi control reaches the terminal')
  t.match(rows[0], /^\S+\s+team-full\s+-\s+response\.create\s+400\s+invalid\s+gpt-4o-mini\s+-\s+msg_1\\u000a2025-01-01T00:00:00\.000Z\\u0020team-b\S*\\u001b\[8m\\u202e\s+-\s+127\.0\.0\.1\s+gw_[0-9a-f]{32}$/,
    'the row says who called and what it named, escaped, then the real address and request id')
})

t.test('audit query --request finds the call an SDK error or a served call names by its request id', async t => {
  // What a team hands ops is the request id its SDK reported: an error's (the gateway's id) or a served call's
  // `_request_id` (the upstream's x-request-id).
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const created = await client.conversations.create({}).withResponse()
  const failed = await client.conversations.retrieve('conv_nowhere').catch((err: unknown) => err) as InstanceType<typeof OpenAI.APIError>
  t.equal(failed.status, 404)
  await client.conversations.retrieve(created.data.id)
  // (each record goes to the writer as its call's response closes, and into the file with the writer's next batch)
  await until('the three calls\' records', () => gw.audit().length >= 3)
  await gw.auditFile()
  const found = (id: string) => {
    const r = run(['audit', 'query', '--request', id, gw.config.audit.file])
    t.equal(r.status, 0, r.stderr)
    return r.stdout.split('\n').filter(line => line !== '').map(line => JSON.parse(line) as Record<string, unknown>)
  }
  const byError = found(failed.requestID!)
  t.match(byError, [{ action: 'conversation.retrieve', status: 404, requestId: failed.requestID }], 'the error\'s request_id: that call alone')
  const served = created.response.headers.get('x-request-id')!
  t.ok(served, '(the served call\'s x-request-id, the SDK\'s _request_id)')
  const byServed = found(served)
  t.ok(byServed.length >= 1 && byServed.every(r => r.upstreamRequestId === served), 'a served call\'s: the calls the upstream answered with it')
  t.match(byServed[0], { action: 'conversation.create', status: 200 })
  t.same(found('gw_00000000000000000000000000000000'), [], 'an id no call had: nothing')
})

t.test('audit query refuses bad flags with the reason, and --help lists every flag from the one table', async t => {
  for (const [args, message] of [
    [['--status', '42'], /--status: "42" is not a status/],
    [['--action', 'item.erase'], /--action: "item.erase" is not one of: conversation.create, /],
    // A mistyped outcome would find nothing and exit 0: "no denied calls" when there were some.
    [['--outcome', 'deny'], /--outcome: "deny" is not one of: ok, upstream_rate_limited, upstream_error, denied, /],
    [['--outcome', 'Denied'], /--outcome: "Denied" is not one of: /],
    [['--since', 'yesterday'], /--since: "yesterday" is not a time/],
    [['--since', '999999999d'], /--since: "999999999d" is not a time/],
    // A day its month does not have would be read as one of the next month (2025-02-30 as March 2): a range that
    // silently holds other days, or none.
    [['--until', '2025-02-30'], /--until: "2025-02-30" is not a time/],
    [['--since', '2024-04-31T10:00'], /--since: "2024-04-31T10:00" is not a time/],
    [['--since', '2025-02-29T00:00:00Z'], /--since: "2025-02-29T00:00:00Z" is not a time/],
    [['--limit', 'many'], /--limit: give a whole number/],
    [['--limit=-1'], /--limit: give a whole number/],
    // Node's parser takes a value starting with a dash for a forgotten one ("argument is ambiguous"): the flag says why.
    [['--limit', '-1'], /^--limit: give a whole number/],
    [['--status', '-404'], /^--status: "-404" is not a status/],
    [['--format', 'csv'], /--format: jsonl or table/],
    [['--colour', 'blue'], /Unknown option '--colour'/]
  ] as Array<[string[], RegExp]>) {
    t.throws(() => parseQueryArgs(args, Date.now()), { message }, args.join(' '))
  }
  t.equal(parseQueryArgs(['--since', '2024-02-29'], 0).filters.length, 1, 'a leap day is a day')
  for (const outcome of ['ok', 'upstream_rate_limited', 'upstream_error', 'denied', 'rate_limited', 'invalid', 'unavailable', 'aborted', 'error']) {
    t.doesNotThrow(() => parseQueryArgs(['--outcome', outcome], Date.now()), `--outcome ${outcome}, a word of the README's record table`)
  }
  const bad = run(['audit', 'query', '--status', 'teapot'])
  t.equal(bad.status, 1)
  t.equal(bad.stderr, 'ohmygpt-gateway audit: --status: "teapot" is not a status: give a code (404) or a class (4xx)\n')
  const help = run(['audit', 'query', '--help'])
  for (const flag of ['client', 'action', 'conversation', 'item', 'status', 'outcome', 'since', 'until', 'limit', 'format', 'config']) {
    t.match(help.stdout, new RegExp(`--${flag} [A-Z]+ `), flag)
  }
  t.match(run(['audit', 'frobnicate']).stderr, /audit takes a subcommand: verify or query/)
})

t.test('audit query | head: the query stops quietly when the reader goes, exit 0, no stack', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  await writeSeries(auditFile, 3000)
  for (let i = 0; i < 5; i++) {
    const child = spawn(process.execPath, [BIN, 'audit', 'query', auditFile], { env, stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
    await once(child.stdout, 'data')
    child.stdout.destroy() // as head does once it has its line
    const [code] = await once(child, 'exit')
    t.equal(code, 0, `run ${i + 1}: exit 0`)
    t.equal(stderr, '', `run ${i + 1}: nothing on stderr`)
  }
})

t.test('audit query into a slow reader: every record arrives, and waiting for it leaks no listeners (no warning)', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  await writeSeries(auditFile, 4000)
  const child = spawn(process.execPath, [BIN, 'audit', 'query', auditFile], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (c: Buffer) => { stderr += c.toString() })
  // A reader slower than the query (a pager, jq over ssh): the pipe fills, and the query waits for it, many times.
  let lines = 0
  let ended = false
  child.stdout.on('end', () => { ended = true })
  child.stdout.pause()
  while (!ended) {
    const chunk = child.stdout.read() as Buffer | null
    if (chunk === null) {
      await Promise.race([once(child.stdout, 'readable'), once(child.stdout, 'end')])
      continue
    }
    for (const byte of chunk) if (byte === 0x0a) lines++
    await sleep(5)
  }
  const [code] = child.exitCode === null ? await once(child, 'exit') : [child.exitCode]
  t.equal(code, 0)
  t.equal(lines, 4000, 'every record')
  t.equal(stderr, '', 'nothing on stderr (no MaxListenersExceededWarning)')
})

t.test('audit commands say why when there is nothing to read', async t => {
  const empty = configFile(gatewayYaml(join(tempDir(), 'audit.jsonl'))).file
  const r = run(['audit', 'verify', '--config', empty])
  t.equal(r.status, 1)
  t.match(r.stderr, /no audit files at .*audit\.jsonl/)
  const stdout = run(['audit', 'query', '--config', configFile(gatewayYaml('-')).file])
  t.equal(stdout.status, 1)
  t.match(stdout.stderr, /audit.file is "-" \(stdout\): there are no audit files to read/)
})


t.test('audit query --model and --response find Responses calls', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const models = ['gpt-4o', 'gpt-4o-mini', 'gpt-4o']
  const records = models.map((model, i) => callRecord(i + 1, {
    action: 'response.create', method: 'POST', path: '/v1/responses', conversationId: null, itemId: null,
    responseId: `resp_${i + 1}`, model, stream: i === 1, inputTokens: 3, outputTokens: 4
  }))
  await writeSeries(auditFile, records.length, {}, 1, i => records[i - 1]!)
  t.same(await query([auditFile], '--model', 'gpt-4o'), [records[0]!.requestId, records[2]!.requestId], 'exactly the model, not its prefix')
  t.same(await query([auditFile], '--response', 'resp_2'), [records[1]!.requestId])
  t.same(await query([auditFile], '--model', 'gpt-4'), [])
})

t.test('verify and query read the series as it was when they listed it, while a running gateway rotates it', async t => {
  const file = join(tempDir(), 'audit.jsonl')
  const { openAuditWriter } = await import('../src/audit/writer.js')
  const { memoryLog } = await import('./fixtures/audit.js')
  const writer = await openAuditWriter({ file, fsync: 'off', rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: true }, log: memoryLog() })
  t.teardown(() => writer.close())
  for (let i = 1; i <= 3; i++) writer.write(callRecord(i))
  await sleep(100)
  // The command lists the series and opens its files (auditFiles does both) ...
  const listed = (await seriesFiles(file)).map(f => f.path)
  t.same(listed, [file], 'one file so far: the active one')
  await pinFiles(listed, seriesIsBeingWritten)
  // ... and the gateway goes on: its active file fills up, is renamed, and gzipped (and removed) meanwhile.
  for (let i = 4; i <= 30; i++) writer.write(callRecord(i))
  await sleep(300)
  t.ok((await seriesFiles(file)).length > 1, 'the series was rotated meanwhile')
  const found: unknown[] = []
  await queryFiles(listed, [], Infinity, r => { found.push(r.requestId); return true })
  t.same(found, [1, 2, 3].map(i => callRecord(i).requestId), 'the query finds the records that were there, and only those')
  t.match(await verifySeries(listed, chainHasher()), { ok: true, records: 3 }, 'verify passes on them')
})

t.test('verify and query beside a gateway caught writing a line: the trail up to that line passes, the line is the next run\'s', async t => {
  const { config, auditFile } = await gzippedSeries()
  // A write that a reader sees part-way (the kernel grows the file a page at a time), by a gateway holding the series.
  const next = linesOf(auditFile).at(-1)!.replace(/"seq":\d+/, '"seq":61')
  appendFileSync(auditFile, next.slice(0, 40))
  const lock = await acquireLock(auditFile, () => {})
  const verify = await runAsync(['audit', 'verify', '--config', config])
  const query = await runAsync(['audit', 'query', '--config', config])
  const named = await runAsync(['audit', 'verify', ...readdirSync(dirname(auditFile)).map(n => join(dirname(auditFile), n))])
  await lock.release()
  t.equal(verify.status, 0, verify.stderr)
  t.match(verify.stdout, /^ok: 60 records, chain intact/)
  t.equal(query.stderr, '', 'query skips no line')
  t.equal(query.stdout.split('\n').length - 1, 60)
  t.match(named.stdout, /^ok: 60 records, chain intact/, 'the files named (a shell glob) too')
  // With no gateway holding it, that line is a torn one (a crash), said as before.
  const after = run(['audit', 'verify', '--config', config])
  t.equal(after.status, 1)
  t.match(after.stderr, /the last line is not a whole record: torn by a crash/)
})

t.test('verify and query beside a gateway that rotates and gzips just after they list the directory: no gap, no file missing', async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 40, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: false } })
  t.ok(files.length >= 3, 'closed files (not gzipped yet) and the active one')
  const { file: config } = configFile(gatewayYaml(auditFile))
  const rotation = {
    NODE_OPTIONS: `--import=${join(import.meta.dirname, 'fixtures', 'rotate-after-listing.mjs')}`,
    ROTATE_ACTIVE: auditFile,
    ROTATE_GZIP: files[0]!,
    ROTATE_RENAME_TO: rotatedName(auditFile, Date.now(), parsed(auditFile)[0]!.seq as number)
  }
  const verify = run(['audit', 'verify', '--config', config], rotation)
  t.equal(verify.stderr, '')
  t.match(verify.stdout, /^ok: 40 records, chain intact/, 'verify reads every record once, and passes')
  t.equal(verify.status, 0)
  const again = await writeSeries(join(tempDir(), 'audit.jsonl'), 40, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: false } })
  const query = run(['audit', 'query', '--config', configFile(gatewayYaml(again.at(-1)!)).file], {
    ...rotation, ROTATE_ACTIVE: again.at(-1)!, ROTATE_GZIP: again[0]!, ROTATE_RENAME_TO: rotatedName(again.at(-1)!, Date.now(), parsed(again.at(-1)!)[0]!.seq as number)
  })
  t.equal(query.stderr, '')
  t.same(query.stdout.trim().split('\n').map(l => (JSON.parse(l) as { seq: number }).seq), Array.from({ length: 40 }, (_, i) => i + 1),
    'query finds every record, once, in order')
})

t.test('a series of more files than the command may open at once: verify and query say so and how to fix it, not that a file is damaged', { skip: process.platform !== 'linux' }, async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 2000, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: true } })
  t.ok(files.length > 150, `${files.length} files`)
  const { file: config } = configFile(gatewayYaml(auditFile))
  for (const command of ['verify', 'query']) {
    // Enough descriptors to load the command, not to hold every file of the series open.
    const r = spawnSync('sh', ['-c', `ulimit -n 150 && exec "${process.execPath}" ${BIN} audit ${command} --config "${config}"`],
      { encoding: 'utf8', env, timeout: 20_000, killSignal: 'SIGKILL' })
    t.equal(r.status, 1, `audit ${command}`)
    t.match(r.stderr, /more files than this process may open at once \(EMFILE\): raise its limit \(ulimit -n\)/, `audit ${command}: says why`)
    t.notMatch(r.stderr, /damaged|\n\s+at /, `audit ${command}: no file blamed, no stack trace`)
  }
})

t.test('the files named on the command line, more than the command may open at once: verify and query say so too, not that a file is damaged', { skip: process.platform !== 'linux' }, async t => {
  const auditFile = join(tempDir(), 'audit.jsonl')
  const files = await writeSeries(auditFile, 2000, { rotate: { maxBytes: 4096, daily: false, keep: 0, gzip: true } })
  t.ok(files.length > 150, `${files.length} files`)
  // As a shell glob names them (audit.jsonl*), with no config to find them by.
  const named = files.map(f => `"${f}"`).join(' ')
  for (const command of ['verify', 'query']) {
    const r = spawnSync('sh', ['-c', `ulimit -n 150 && exec "${process.execPath}" ${BIN} audit ${command} ${named}`],
      { encoding: 'utf8', env, timeout: 20_000, killSignal: 'SIGKILL' })
    t.equal(r.status, 1, `audit ${command}`)
    t.match(r.stderr, /more files than this process may open at once \(EMFILE\): raise its limit \(ulimit -n\)/, `audit ${command}: says why`)
    t.notMatch(r.stderr, /damaged|\n\s+at /, `audit ${command}: no file blamed, no stack trace`)
  }
})
