// The audit writer's failure policy: a record that cannot be written is reported, and the gateway keeps serving.
import t from 'tap'
import { KEYS, startGateway, testConfig } from './fixtures/gateway.js'
import { startUpstream } from './fixtures/upstream.js'

t.test('a full disk under the audit file is logged as an error and does not take the gateway down', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { audit: { file: '/dev/full' } }))
  for (let i = 0; i < 2; i++) {
    const res = await fetch(`${gw.url}/v1/conversations`, {
      method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: '{}'
    })
    t.equal(res.status, 200, `call ${i + 1} is served`)
  }
  t.equal((await fetch(`${gw.url}/healthz`)).status, 200)
  const failures = gw.logs.map(l => JSON.parse(l) as { level: number, msg: string, err?: { code?: string } })
    .filter(l => l.msg === 'audit record could not be written')
  t.ok(failures.length >= 2, 'each lost record is reported')
  t.equal(failures[0]!.level, 50, 'at error level')
  t.equal(failures[0]!.err?.code, 'ENOSPC')
})
