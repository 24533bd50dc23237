// The gateway's audit failure policy, with an audit file that turns bad mid-run (its path now leads to a full
// device, which the writer refuses to write into: root ignores file modes here). "closed" (the default): API calls get 503 audit_unavailable and never
// reach the upstream until writing works again. "open": calls are served and lost records are counted.
import { existsSync, renameSync, rmSync, symlinkSync } from 'node:fs'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import { pino } from 'pino'
import { buildApp } from '../src/app.js'
import { chainHasher } from '../src/audit/chain.js'
import { seriesFiles } from '../src/audit/series.js'
import { verifySeries } from '../src/audit/verify.js'
import { openAuditWriter } from '../src/audit/writer.js'
import { memoryLog } from './fixtures/audit.js'
import { healthDetails, KEYS, METRICS_TOKEN, startGateway, testConfig, type TestGateway } from './fixtures/gateway.js'
import { startUpstream } from './fixtures/upstream.js'
import { tempDir } from './fixtures/tmp.js'

function create (gw: TestGateway) {
  return fetch(`${gw.url}/v1/conversations`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: '{}'
  })
}

async function auditState (gw: TestGateway): Promise<unknown> {
  return await healthDetails(gw.url)
}

async function until (what: string, check: () => Promise<boolean> | boolean, ms = 5000) {
  for (const start = Date.now(); !await check(); await sleep(25)) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`)
  }
}

/**
 * The audit file is moved aside (it stays whole) and its path now leads to a device that is always full. The
 * writer opens only regular files, so its reopen of the path fails.
 */
function diskFills (file: string) {
  renameSync(file, `${file}.1`)
  symlinkSync('/dev/full', file)
}

t.test('closed: once an audit write fails, API calls get 503 audit_unavailable before the upstream, until writing works again', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: METRICS_TOKEN } }))
  const file = gw.config.audit.file
  t.equal(gw.config.audit.onFailure, 'closed', 'closed is the default')
  t.match(await auditState(gw), { status: 200, body: { status: 'ok', audit: 'ok' } })
  t.equal((await create(gw)).status, 200)
  await gw.auditFile()

  diskFills(file)
  // The writer notices the new file at its path on its next check (within a second), and cannot open it.
  await until('the writer to reopen the replaced file', () => gw.logs.some(l => /was replaced by something else/.test(l)))
  await until('the audit to turn unavailable', async () => ((await auditState(gw)) as { body: { audit: string } }).body.audit === 'unavailable')
  t.match(await auditState(gw), { status: 200, body: { status: 'ok', audit: 'unavailable' } }, '/healthz stays 200 (liveness) and says so')
  t.ok(gw.logs.some(l => /audit: records cannot be written; API calls are refused with 503/.test(l) && /is not a regular file/.test(l)),
    'logged, with the cause')

  const seen = upstream.requests.length
  const refused = await create(gw)
  t.equal(refused.status, 503)
  t.same(await refused.json(), {
    error: {
      message: 'The gateway cannot write its audit trail right now, so it serves no API calls. Please try again later.',
      type: 'server_error', param: null, code: 'audit_unavailable'
    }
  })
  const unknown = await fetch(`${gw.url}/v1/models`)
  t.equal(unknown.status, 404, 'a path that is no API call is still answered 404')
  t.equal(upstream.requests.length, seen, 'nothing reached the upstream')

  rmSync(file) // the device is fixed: the retry opens a real file again
  await until('the audit to work again', async () => ((await auditState(gw)) as { body: { audit: string } }).body.audit === 'ok')
  t.equal((await create(gw)).status, 200, 'calls are served again')
  const records = await gw.auditFile()
  t.same(records.map(r => [r.status, r.outcome]), [[200, 'ok'], [503, 'unavailable'], [404, 'invalid'], [200, 'ok']],
    'the refused calls are recorded once writing works, the 503 as unavailable')
  t.ok(gw.logs.some(l => /audit: writing works again/.test(l)))
  await gw.app.close()
  const series = (await seriesFiles(file)).map(f => f.path)
  t.same(series, [`${file}.1`, file])
  t.match(await verifySeries(series, chainHasher()), { ok: true, records: 4 }, 'and the chain runs on unbroken over the failure')
})

t.test('open: calls are served while the audit cannot be written, and records that do not fit the buffer are counted as lost', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const config = testConfig(upstream.url, { audit: { file: testConfig(upstream.url).audit.file, onFailure: 'open' }, metrics: { token: METRICS_TOKEN } })
  const log = memoryLog()
  const writer = await openAuditWriter({ ...config.audit, log, maxPending: 2 })
  const gw = await startGateway(t, config, { auditWriter: writer })
  t.equal((await create(gw)).status, 200)
  await gw.auditFile()

  diskFills(config.audit.file)
  // The writer notices the replaced file on its next check (within a second), and cannot open it.
  await until('the failure to be noticed', () => !writer.available)
  t.ok(log.lines.some(l => /was replaced by something else/.test(l.msg)))
  const seen = upstream.requests.length
  for (let i = 0; i < 5; i++) t.equal((await create(gw)).status, 200, `call ${i + 1} is served`)
  t.equal(upstream.requests.length, seen + 5, 'and reaches the upstream')
  await until('records to be lost', () => writer.stats().lost >= 3)
  t.match(writer.stats(), { written: 1, lost: 3 }, 'two wait in the buffer, three are lost')
  t.match(log.lines.filter(l => l.level === 'error').map(l => l.msg), [
    /records cannot be written; calls are still served \(audit.onFailure: open\)/,
    /records are being lost/
  ])
  t.match(await auditState(gw), { status: 200, body: { status: 'ok', audit: 'unavailable' } })

  rmSync(config.audit.file)
  await until('the audit to work again', () => writer.available)
  await gw.app.close()
  const series = (await seriesFiles(config.audit.file)).map(f => f.path)
  t.match(await verifySeries(series, chainHasher()), { ok: true, notes: [/3 records were lost between/] },
    'the loss is in the trail itself')
})

t.test('a start that fails once the audit is open (its caFile gone since the config was read) leaves no lock: the next start is not refused', async t => {
  // The CA file is read again when the upstream's pools are built, after the audit writer has taken its lock; a
  // mounted secret replaced meanwhile throws there. The lock left behind made every later start fail as a second
  // gateway on the series, until it was removed by hand.
  const config = testConfig('https://127.0.0.1:9')
  const gone = { ...config, upstream: { ...config.upstream, caFile: join(tempDir('gw-ca-'), 'ca.pem') } }
  await t.rejects(buildApp(gone, { logger: pino({ level: 'silent' }) }), { code: 'ENOENT' })
  t.notOk(existsSync(`${config.audit.file}.lock`), 'no audit lock left')
  const gw = await startGateway(t, config)
  t.equal((await fetch(`${gw.url}/readyz`)).status, 200, 'the next start serves')
  await gw.app.close()
  const series = (await seriesFiles(config.audit.file)).map(f => f.path)
  t.match(await verifySeries(series, chainHasher()), { ok: true }, 'and the trail verifies')
})
