// The README's reference tables against the code they describe: the routes against operations.ts, the error
// table against src/errors.ts, the metrics table against a scrape, the audit record's fields against a record the
// gateway wrote, the Layout against src/. (The config tables are held to the schema in config.test.ts.) A code, metric or field added without its row, or a row
// left behind by one removed, fails here rather than misleading an operator.
import { readdirSync, readFileSync } from 'node:fs'
import t from 'tap'
import * as errors from '../src/errors.js'
import { API_PREFIX, RESOURCES } from '../src/operations.js'
import { KEYS, METRICS_TOKEN, startGateway, testConfig } from './fixtures/gateway.js'
import { startUpstream } from './fixtures/upstream.js'

const readme = readFileSync('README.md', 'utf8')

/** The cells of each row of the first table after `heading`, header and separator left out. */
function tableRows (heading: string): string[][] {
  const at = readme.indexOf(`\n${heading}\n`)
  if (at === -1) throw new Error(`no heading ${heading} in the README`)
  const lines = readme.slice(at).split('\n')
  const start = lines.findIndex(l => l.startsWith('|'))
  const end = lines.findIndex((l, i) => i > start && !l.startsWith('|'))
  return lines.slice(start + 2, end).map(row => row.split(' | ').map(cell => cell.replace(/^\| ?| ?\|$/g, '').trim()))
}

/** The first `code` span of a cell: `invalid_id` → invalid_id. */
const spanned = (cell: string) => /`([^`]+)`/.exec(cell)?.[1]

t.test('the README error table lists every error the gateway answers with, with its status and type, and no other', async t => {
  const documented = new Set(tableRows('## Errors').map(([status, code, type]) => `${status} ${spanned(code!)} ${spanned(type!)}`))
  const defined = new Set<string>()
  for (const ErrorClass of Object.values(errors)) {
    if (typeof ErrorClass !== 'function' || !(ErrorClass.prototype instanceof Error)) continue
    const err = new (ErrorClass as new () => errors.GatewayError)()
    defined.add(`${err.statusCode} ${err.code} ${err.type}`)
  }
  t.ok(defined.size > 30, 'the error classes were found')
  for (const row of defined) t.ok(documented.has(row), `${row} is in the table`)
  // Besides errors.ts, only the envelope the gateway puts on an upstream error answer that had none (proxy.ts).
  const made = [...documented].filter(row => !defined.has(row))
  t.same(made, ["the upstream's upstream_error server_error"], 'every other row is an error errors.ts defines')
})

t.test('the README metrics table lists every gateway metric /metrics serves, and no other', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url, { metrics: { token: METRICS_TOKEN } }))
  await fetch(`${gw.url}/v1/conversations`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: '{}'
  })
  const scraped = await (await fetch(`${gw.url}/metrics`, { headers: { authorization: `Bearer ${METRICS_TOKEN}` } })).text()
  // Every registered metric has its TYPE line, observed or not (a labelled counter before its first call too).
  const served = [...scraped.matchAll(/^# TYPE (gateway_\w+) /gm)].map(m => m[1]).sort()
  const documented = tableRows('### Metrics').map(([name]) => spanned(name!)!).filter(name => name.startsWith('gateway_')).sort()
  t.same(served, documented)
})

t.test('the README record table names every field of an audit record, in the file as written', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  await fetch(`${gw.url}/v1/conversations`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: '{}'
  })
  const [record] = await gw.auditFile()
  const documented = tableRows('### The record').map(([field]) => spanned(field!)!)
  t.same(Object.keys(record!).sort(), [...documented].sort())
})

t.test('the README routes table lists every routed operation, with its action and scope, and no other', async t => {
  const documented = tableRows('## Routes')
    .filter(([, action]) => /^`[a-z_]+\.[a-z_]+`$/.test(action!))
    .map(([route, action, scope]) => `${spanned(route!)!.replace(/\{(\w+)\}/g, ':$1')} ${spanned(action!)} ${spanned(scope!)}`)
  const routed = RESOURCES.flatMap(r => Object.entries(r.methods).map(([method, op]) => `${method} ${API_PREFIX}${r.route} ${op.action} ${op.scope}`))
  t.same(documented.sort(), routed.sort())
})

t.test('the README Layout names every module and folder of src/', async t => {
  const layout = readme.slice(readme.indexOf('\n## Layout\n'))
  for (const entry of readdirSync('src', { withFileTypes: true })) {
    const name = entry.isDirectory() ? `src/${entry.name}/` : `src/${entry.name}`
    t.ok(layout.includes(name), `${name} is named`)
  }
})
