// The ohmygpt-gateway bin's commands that start no gateway: keygen, --help, an unknown command (a real process
// each; test/cli.test.ts has check-config and start, split off so that tap runs the two files side by side).
import t from 'tap'
import { parse } from 'yaml'
import { parseConfig } from '../src/config.js'
import { keyDigest } from '../src/keys.js'
import { run } from './fixtures/bin.js'

t.test('keygen prints a new key once and a config entry holding its sha256', async t => {
  const a = run(['keygen', 'team-search'])
  t.equal(a.status, 0)
  const key = /^(ogw_[A-Za-z0-9_-]{43})$/m.exec(a.stdout)?.[1]
  t.ok(key, 'a 256-bit base64url key')
  const entry = parse(a.stdout.slice(a.stdout.indexOf('  - id:'))) as unknown[]
  t.match(entry, [{ id: 'team-search', keySha256: keyDigest(key!), scopes: ['read', 'write', 'delete'] }])
  t.doesNotThrow(() => parseConfig({ upstream: { baseUrls: ['http://x'], apiKey: 'k' }, clients: entry }), 'the entry is valid config')
  t.not(run(['keygen', 'team-search']).stdout.match(/^ogw_.*$/m)?.[0], key, 'every run makes a new key')
})

t.test('keygen --key-id prints the rotating form: a keys: entry for a new client and the line to add beside a current key', async t => {
  const r = run(['keygen', 'team-search', '--key-id', '2025-06'])
  t.equal(r.status, 0)
  const key = /^(ogw_[A-Za-z0-9_-]{43})$/m.exec(r.stdout)?.[1]
  t.ok(key)
  const entry = parse(r.stdout.slice(r.stdout.indexOf('  - id:'))) as unknown[]
  t.match(entry, [{ id: 'team-search', keys: [{ id: '2025-06', sha256: keyDigest(key!) }], scopes: ['read', 'write', 'delete'] }],
    'the key id stays a string (unquoted, 2025-06 would not)')
  const base = { upstream: { baseUrls: ['http://x'], apiKey: 'k' } }
  t.doesNotThrow(() => parseConfig({ ...base, clients: entry }), 'the entry is valid config')
  const line = parse(/^ {6}- \{ id: .*\}$/m.exec(r.stdout)![0].trim()) as Array<{ id: string, sha256: string }>
  const current = { id: 'old', sha256: keyDigest('ogw_current'), expiresAt: '2030-01-31T00:00:00Z' }
  const rotating = parseConfig({ ...base, clients: [{ id: 'team-search', keys: [current, ...line], scopes: ['read'] }] })
  t.same(rotating.clients[0]!.keys!.map(k => k.id), ['old', '2025-06'], 'the line goes beside the current key')
  const bad = run(['keygen', 'team-search', '--key-id', 'a b'])
  t.equal(bad.status, 1)
  t.match(bad.stderr, /--key-id must match/)
})

t.test('keygen prints an entry that is valid config for every id it takes, those YAML would read as a number, null or boolean too', async t => {
  const base = { upstream: { baseUrls: ['http://x'], apiKey: 'k' } }
  for (const id of ['2024', 'null', 'true']) {
    for (const args of [['keygen', id], ['keygen', id, '--key-id', 'k1']]) {
      const r = run(args)
      t.equal(r.status, 0, args.join(' '))
      const entry = parse(r.stdout.slice(r.stdout.indexOf('  - id:'))) as unknown[]
      t.match(entry, [{ id }], `${args.join(' ')}: the id stays the string ${id}`)
      t.doesNotThrow(() => parseConfig({ ...base, clients: entry }), `${args.join(' ')}: the entry is valid config`)
    }
  }
})

t.test('keygen refuses a missing or invalid client id', async t => {
  for (const args of [['keygen'], ['keygen', 'Team A'], ['keygen', 'a', 'b']]) {
    const r = run(args)
    t.equal(r.status, 1, args.join(' '))
    t.match(r.stderr, /client id/)
  }
})

t.test('keygen refuses the reserved client ids none and other, which no config takes, before making a key', async t => {
  for (const id of ['none', 'other']) {
    for (const args of [['keygen', id], ['keygen', id, '--key-id', 'k1']]) {
      const r = run(args)
      t.equal(r.status, 1, args.join(' '))
      t.notMatch(r.stdout, /ogw_/, `${args.join(' ')}: no key is shown that could never be used`)
      t.match(r.stderr, new RegExp(`"${id}" is reserved`))
    }
  }
})

t.test('--help after any command prints the usage and exits 0, without running the command', async t => {
  for (const args of [['start', '--help'], ['keygen', '-h'], ['check-config', '--help'], ['demo', '--help'], ['audit', 'verify', '--help']]) {
    const r = run(args)
    t.equal(r.status, 0, args.join(' '))
    t.match(r.stdout, /^usage: ohmygpt-gateway <command>/, `${args.join(' ')}: the usage`)
    t.match(r.stdout, /keygen <client-id>/)
    t.equal(r.stderr, '', `${args.join(' ')}: no error`)
  }
  t.match(run(['audit', 'query', '--help']).stdout, /^usage: ohmygpt-gateway audit query /, 'audit query keeps its own, with every filter')
})

t.test('an unknown command exits 1 with the usage', async t => {
  const r = run(['launch'])
  t.equal(r.status, 1)
  t.match(r.stderr, /unknown command "launch"/)
})
