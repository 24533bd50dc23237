import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { ConfigError, loadConfig, parseConfig, resolveConfigPath } from '../src/config.js'

const DIGEST = 'a'.repeat(64)

function yamlFile (text: string): string {
  const file = join(mkdtempSync(join(tmpdir(), 'gw-config-')), 'gateway.yaml')
  writeFileSync(file, text)
  return file
}

function problems (fn: () => unknown): string[] {
  try {
    fn()
  } catch (err) {
    if (err instanceof ConfigError) return err.problems
    throw err
  }
  return []
}

const minimal = `
upstream:
  baseUrls: [https://cn2us02.opapi.win]
  apiKey: \${OHMYGPT_API_KEY}
clients:
  - id: team-search
    keySha256: "${DIGEST}"
    scopes: [read]
`

t.test('a minimal file gets every documented default', async t => {
  const config = loadConfig(yamlFile(minimal), { OHMYGPT_API_KEY: 'sk-1' })
  t.same(config, {
    listen: { host: '0.0.0.0', port: 8080 },
    log: { level: 'info' },
    upstream: { baseUrls: ['https://cn2us02.opapi.win'], apiKey: 'sk-1', timeoutMs: 60000 },
    limits: { bodyBytes: 4194304 },
    clients: [{ id: 'team-search', keySha256: DIGEST, scopes: ['read'], rateLimit: { requestsPerMinute: 600, burst: 60 } }],
    audit: { file: './audit/audit.jsonl', fsync: 'interval', onFailure: 'closed', rotate: { daily: false, keep: 0, gzip: false } },
    metrics: {}
  })
  t.ok(Object.isFrozen(config) && Object.isFrozen(config.clients[0]!.rateLimit), 'the config is frozen')
})

t.test('${VAR:-default} takes the environment first, then the default, and numbers become numbers', async t => {
  const file = yamlFile(minimal + 'listen: { port: "${PORT:-9090}" }\naudit: { file: "${AUDIT:-/tmp/a.jsonl}" }\n')
  t.equal(loadConfig(file, { OHMYGPT_API_KEY: 'x' }).listen.port, 9090)
  t.equal(loadConfig(file, { OHMYGPT_API_KEY: 'x', PORT: '7000' }).listen.port, 7000)
  t.equal(loadConfig(file, { OHMYGPT_API_KEY: 'x', AUDIT: '-' }).audit.file, '-')
})

t.test('an environment value is never parsed as YAML', async t => {
  const config = loadConfig(yamlFile(minimal), { OHMYGPT_API_KEY: 'a: b\n  - [c' })
  t.equal(config.upstream.apiKey, 'a: b\n  - [c')
})

t.test('an unset variable without default is named with its field', async t => {
  t.same(problems(() => loadConfig(yamlFile(minimal), {})), ['upstream.apiKey: environment variable OHMYGPT_API_KEY is not set'])
})

t.test('every bad field is reported with its path', async t => {
  const bad = problems(() => parseConfig({
    listen: { port: 70000, extra: 1 },
    log: { level: 'loud' },
    upstream: { baseUrls: ['ftp://x'], apiKey: 'k', timeoutMs: 0 },
    limits: { bodyBytes: -1 },
    clients: [
      { id: 'Team A', keySha256: DIGEST, scopes: ['read', 'admin'] },
      { id: 'b', keySha256: 'ABC', scopes: [], rateLimit: { requestsPerMinute: 0 } }
    ],
    surprise: true
  }))
  for (const expected of [
    /^listen\.port:/, /^listen\.extra: unknown key/, /^log\.level:/, /^upstream\.baseUrls\[0\]:/, /^upstream\.timeoutMs:/,
    /^limits\.bodyBytes:/, /^clients\[0\]\.id:/, /^clients\[0\]\.scopes\[1\]:/, /^clients\[1\]\.keySha256: must be 64 lowercase hex/,
    /^clients\[1\]\.scopes:/, /^clients\[1\]\.rateLimit\.requestsPerMinute:/, /^surprise: unknown key/
  ]) {
    t.ok(bad.some(p => expected.test(p)), `reports ${expected}`)
  }
})

t.test('duplicate client ids and digests are bad fields', async t => {
  const client = { id: 'a', keySha256: DIGEST, scopes: ['read'] }
  t.same(problems(() => parseConfig({
    upstream: { baseUrls: ['http://x'], apiKey: 'k' },
    clients: [client, { ...client, keySha256: 'b'.repeat(64) }, { ...client, id: 'c' }]
  })), ['clients[1].id: duplicates clients[0].id', 'clients[2].keySha256: duplicates clients[0].keySha256'])
})

t.test('an unquoted all-digit digest is refused with a hint instead of being read as a number', async t => {
  const file = yamlFile(minimal.replace(`"${DIGEST}"`, '1'.repeat(64)))
  t.match(problems(() => loadConfig(file, { OHMYGPT_API_KEY: 'x' })), [/clients\[0\]\.keySha256: .*quote it/])
})

t.test('unreadable and unparsable files fail with the file named', async t => {
  t.match(problems(() => loadConfig('/nonexistent/gateway.yaml', {})), [/cannot read the file: ENOENT/])
  t.match(problems(() => loadConfig(yamlFile('upstream: [\n'), {})), [/^YAML: /])
})

t.test('the config file comes from --config, else GATEWAY_CONFIG, else config/gateway.yaml', async t => {
  t.equal(resolveConfigPath('a.yaml', { GATEWAY_CONFIG: 'b.yaml' }), 'a.yaml')
  t.equal(resolveConfigPath(undefined, { GATEWAY_CONFIG: 'b.yaml' }), 'b.yaml')
  t.equal(resolveConfigPath(undefined, {}), 'config/gateway.yaml')
})

t.test('the shipped example config is valid', async t => {
  const config = loadConfig('config/gateway.yaml', { OHMYGPT_API_KEY: 'x' })
  t.equal(config.listen.port, 8080)
  t.equal(config.clients.length, 1)
})
