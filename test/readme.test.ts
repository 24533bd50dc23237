// The README's reference tables against the code they describe: the routes against operations.ts, the error
// table against src/errors.ts, the metrics table against a scrape, the audit record's fields against a record the
// gateway wrote, the Layout against src/. (The config tables are held to the schema in config.test.ts.) A code, metric or field added without its row, or a row
// left behind by one removed, fails here rather than misleading an operator.
import { spawnSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import t from 'tap'
import * as errors from '../src/errors.js'
import { ConfigSchema } from '../src/config.js'
import { API_PREFIX, RESOURCES } from '../src/operations.js'
import { RESTART_ONLY } from '../src/reload.js'
import { CHECKED_KEYS } from '../src/plugins/ownership.js'
import { CHECKED_KEYS as RESPONSE_CHECKED_KEYS } from '../src/plugins/responses.js'
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
  // Split at every pipe but an escaped one (`jsonl\|table`): an empty cell stays a cell.
  return lines.slice(start + 2, end).map(row => row.split(/(?<!\\)\|/).slice(1, -1).map(cell => cell.trim()))
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

t.test('the README unknown_parameter row names every key of a create body the checks read', async t => {
  // A key refused in another case (`User`) that the row leaves out sends a client reading it looking for another cause.
  const row = tableRows('## Errors').find(([, code]) => spanned(code!) === 'unknown_parameter')![3]!
  const named = new Set([...row.matchAll(/`([^`]+)`/g)].map(m => m[1]))
  for (const key of [...RESPONSE_CHECKED_KEYS, ...Object.values(CHECKED_KEYS).flat()]) t.ok(named.has(key), `${key} is named`)
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
  const rows = tableRows('### Metrics').filter(([name]) => spanned(name!)!.startsWith('gateway_'))
  const documented = rows.map(([name]) => spanned(name!)!).sort()
  t.same(served, documented)
  // Each metric's labels as the table names them (its code spans that are label names), against every sample line
  // of the scrape (a histogram's `le` left out); its kind as the name and the meaning say it.
  const types = new Map([...scraped.matchAll(/^# TYPE (gateway_\w+) (\w+)$/gm)].map(m => [m[1]!, m[2]!]))
  for (const [nameCell, labelsCell, meaning] of rows) {
    const name = spanned(nameCell!)!
    const labels = [...labelsCell!.matchAll(/`([a-z_]+)`/g)].map(m => m[1]).sort()
    const samples = [...scraped.matchAll(new RegExp(`^${name}(?:_bucket|_sum|_count)?(?:\\{([^}]*)\\})? `, 'gm'))]
    for (const [line, inBraces] of samples) {
      const served = [...(inBraces ?? '').matchAll(/(\w+)="/g)].map(m => m[1]).filter(label => label !== 'le').sort()
      t.same(served, labels, `${line.trim()}: the README's labels for ${name}`)
    }
    const kind = meaning!.startsWith('histogram') ? 'histogram' : name.endsWith('_total') ? 'counter' : 'gauge'
    t.equal(types.get(name), kind, `${name} is a ${kind}, as the README has it`)
  }
  t.ok(scraped.includes('gateway_requests_total{'), 'a labelled series was scraped')
})

t.test('the README record table names every field of an audit record, in the file as written', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  await fetch(`${gw.url}/v1/conversations`, {
    method: 'POST', headers: { authorization: `Bearer ${KEYS.full}`, 'content-type': 'application/json' }, body: '{}'
  })
  const [record] = await gw.auditFile()
  const rows = tableRows('### The record')
  const documented = rows.map(([field]) => spanned(field!)!)
  t.same(Object.keys(record!).sort(), [...documented].sort())
  // Each value of the type the table gives it (`string or null`, `integer`, ...).
  const kinds: Record<string, (value: unknown) => boolean> = {
    string: value => typeof value === 'string',
    integer: value => Number.isInteger(value),
    boolean: value => typeof value === 'boolean',
    null: value => value === null
  }
  for (const [field, type] of rows) {
    const allowed = type!.split(' or ')
    t.ok(allowed.every(kind => kind in kinds), `${type} is a type the test knows`)
    const value = (record as unknown as Record<string, unknown>)[spanned(field!)!]
    t.ok(allowed.some(kind => kinds[kind]?.(value)), `${spanned(field!)} = ${JSON.stringify(value)} is a ${type}`)
  }
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

t.test('the README says of each config key whether a reload applies it, as src/reload.ts does', async t => {
  const restartOnly = new Set<string>(RESTART_ONLY)
  const topLevel = (key: string) => key.split(/[.[]/)[0]!
  // The table of the keys for operations: its reload column.
  for (const [key, , , reload] of tableRows('### Config keys for operations')) {
    const name = spanned(key!)!
    t.equal(reload === 'restart', restartOnly.has(topLevel(name)), `${name}: ${reload}`)
  }
  // The table under "Reloading the config": every top-level key in the column that applies to it.
  const rows = tableRows('What a reload applies, at once, to every call that starts after it:')
  const spans = (cells: Array<string | undefined>) => cells.flatMap(cell => [...(cell ?? '').matchAll(/`([^`]+)`/g)].map(m => topLevel(m[1]!)))
  const applied = new Set(spans(rows.map(([cell]) => cell)))
  const restarted = new Set(spans(rows.map(([, cell]) => cell)))
  for (const key of Object.keys(ConfigSchema.properties)) {
    if (restartOnly.has(key)) t.ok(restarted.has(key) && !applied.has(key), `${key} needs a restart, as the README says`)
    else t.ok(applied.has(key) && !restarted.has(key), `${key} is applied by a reload, as the README says`)
  }
})

t.test('the README CLI table has a row for every command --help lists, naming each of its options, and no other', async t => {
  // The built bin, as a user runs it (npm test builds first).
  const help = spawnSync(process.execPath, ['dist/cli.js', '--help'], { encoding: 'utf8' }).stdout
  // A command's line: two spaces, its synopsis, then its description after a run of spaces (or on the next line);
  // an option of audit query's: four spaces and the flag.
  const helped = new Map<string, Set<string>>()
  let last = ''
  for (const line of help.split('\n')) {
    const command = /^ {2}([a-z][a-z-]*(?: [a-z]+)?)((?: [[<][^\]>]*[\]>])*)/.exec(line)
    if (command !== null) {
      last = command[1]!
      helped.set(last, new Set([...command[2]!.matchAll(/--[a-z-]+/g)].map(m => m[0])))
    } else {
      const option = /^ {4}(--[a-z-]+) /.exec(line)
      if (option !== null) helped.get(last)!.add(option[1]!)
    }
  }
  t.ok(helped.has('audit query') && helped.get('audit query')!.has('--since'), '--help was read')
  const rows = tableRows('The CLI (`bin: ohmygpt-gateway`, after `npm run build`; `--help` after any command prints the usage):')
  const documented = new Map(rows.map(([synopsis, what]) => {
    const span = spanned(synopsis!)!
    return [/^[a-z][a-z-]*(?: [a-z]+)?/.exec(span)![0], `${span} ${what}`]
  }))
  t.same([...documented.keys()].sort(), [...helped.keys()].sort(), 'the same commands')
  for (const [command, options] of helped) {
    for (const option of options) t.match(documented.get(command), new RegExp(`(?<![\\w-])${option}(?![\\w-])`), `${command} ${option} is in its row`)
  }
})
