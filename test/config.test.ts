import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { ConfigError, ConfigSchema, loadAuditFile, loadConfig, parseConfig, resolveConfigPath, UNBRACED_SECRET } from '../src/config.js'
import { tempDir } from './fixtures/tmp.js'

const DIGEST = 'a'.repeat(64)

function yamlFile (text: string): string {
  const file = join(tempDir('gw-config-'), 'gateway.yaml')
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
    listen: {
      host: '0.0.0.0', port: 8080, headersTimeoutMs: 20000, requestTimeoutMs: 60000, keepAliveTimeoutMs: 72000,
      sendTimeoutMs: 30000, maxConnections: 10000
    },
    trustProxy: false,
    log: { level: 'info' },
    upstream: {
      baseUrls: ['https://cn2us02.opapi.win'], apiKey: 'sk-1', connectTimeoutMs: 5000, timeoutMs: 60000, bodyTimeoutMs: 60000, generationTimeoutMs: 590000,
      failureThreshold: 3, cooldownMs: 30000, retries: 1, maxConnections: 128
    },
    limits: { bodyBytes: 4194304, maxInFlight: 1024, authFailuresPerMinute: 30 },
    store: { url: 'memory://', timeoutMs: 50, onFailure: 'open', keyPrefix: 'ogw:rl:' },
    clients: [{ id: 'team-search', keySha256: DIGEST, scopes: ['read'], rateLimit: { requestsPerMinute: 600, burst: 60 } }],
    ownership: { unowned: 'deny', cacheTtlMs: 600000, cacheSize: 100000, notFoundTtlMs: 5000 },
    audit: { file: './audit/audit.jsonl', fsync: 'interval', onFailure: 'closed', rotate: { daily: false, keep: 0, gzip: false } },
    shutdown: { drainDelayMs: 0, graceMs: 30000 },
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

t.test('a bad value that came from the environment names its variable: the file holds only the placeholder', async t => {
  const file = yamlFile(minimal + 'listen: { port: "${GATEWAY_PORT:-8080}" }\nlog: { level: "${LOG_LEVEL:-info}" }\n')
  t.same(problems(() => loadConfig(file, { OHMYGPT_API_KEY: 'x', GATEWAY_PORT: '80x', LOG_LEVEL: 'DEBUG' })), [
    'listen.port: must be an integer (its value came from GATEWAY_PORT)',
    'log.level: must be one of "fatal", "error", "warn", "info", "debug", "trace", "silent" (its value came from LOG_LEVEL)'
  ])
  t.same(problems(() => loadConfig(yamlFile(minimal + 'listen: { port: "${GATEWAY_PORT:-80x}" }\n'), { OHMYGPT_API_KEY: 'x' })),
    ['listen.port: must be an integer'], 'a default written in the file is in plain sight')
})

t.test('a value of the wrong type is named in the words the other messages use, not Ajv\'s', async t => {
  const upstream = { baseUrls: ['http://x'], apiKey: 'k' }
  const about = (field: string, config: Record<string, unknown>) => problems(() => parseConfig({ upstream, ...config })).filter(p => p.startsWith(field))
  t.same(about('listen', { listen: 5 }), ['listen: must be a map'])
  t.same(about('clients', { clients: {} }), ['clients: must be a list'])
  t.same(about('listen', { listen: { host: 5 } }), ['listen.host: must be a string'])
})

t.test('an environment value is never parsed as YAML', async t => {
  const config = loadConfig(yamlFile(minimal + 'audit: { file: "${AUDIT_FILE}" }\n'), { OHMYGPT_API_KEY: 'x', AUDIT_FILE: 'a: b\n  - [c' })
  t.equal(config.audit.file, 'a: b\n  - [c')
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
      { id: 'Team A', keySha256: DIGEST, scopes: ['read', 'root'] },
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
  t.ok(bad.includes('log.level: must be one of "fatal", "error", "warn", "info", "debug", "trace", "silent"'), 'a word outside a set is said once, with the words')
  t.ok(bad.includes('clients[0].scopes[1]: must be one of "read", "write", "delete", "admin"'))
  t.notOk(bad.some(p => /must be equal to constant|must match a schema in anyOf/.test(p)), 'not in Ajv\'s words')
  const upstream = { baseUrls: ['http://x'], apiKey: 'k' }
  t.same(problems(() => parseConfig({ upstream, log: { level: 5 } })), ['log.level: must be one of "fatal", "error", "warn", "info", "debug", "trace", "silent"'],
    'a value of another type: the words, not "a string"')
  t.same(problems(() => parseConfig({ upstream, trustProxy: 'yes' })), ['trustProxy: must be one of false, a list'])
  t.same(problems(() => parseConfig({ upstream, trustProxy: [] })), ['trustProxy: must NOT have fewer than 1 items'], 'a list breaking a rule: that rule')
  t.same(problems(() => parseConfig({ upstream, trustProxy: [123] })), ['trustProxy[0]: must be a string'], 'a bad item: the item, alone')
})

t.test('an id, a digest, an expiresAt or a keyPrefix of the wrong form is said in words, not as a regular expression', async t => {
  const found = problems(() => loadConfig(yamlFile(minimal.replace('id: team-search', 'id: Team-Search') + `  - id: b
    keys: [{ id: "key 1", sha256: "${'b'.repeat(64)}", expiresAt: 2025-07-01 }, { id: k2, sha256: ${'1'.repeat(64)} }, { id: k3, sha256: "B" }]
    scopes: [read]
store: { keyPrefix: "ogw rl" }
`), { OHMYGPT_API_KEY: 'x' }))
  t.same(found, [
    'store.keyPrefix: must be 1 to 64 letters, digits, ":", ".", "_" or "-" (ogw:rl:)',
    'clients[0].id: must be 1 to 64 lowercase letters, digits, ".", "_" or "-" (team-a)',
    'clients[1].keys[0].id: must be 1 to 64 letters, digits, ".", "_" or "-" (2025-06)',
    'clients[1].keys[0].expiresAt: must be a date and time with its offset, as "2025-07-01T00:00:00Z"',
    'clients[1].keys[1].sha256: must be 64 lowercase hex characters (quote it in YAML)',
    'clients[1].keys[2].sha256: must be 64 lowercase hex characters (quote it in YAML)'
  ])
})

t.test('duplicate client ids and digests are bad fields', async t => {
  const client = { id: 'a', keySha256: DIGEST, scopes: ['read'] }
  t.same(problems(() => parseConfig({
    upstream: { baseUrls: ['http://x'], apiKey: 'k' },
    clients: [client, { ...client, keySha256: 'b'.repeat(64) }, { ...client, id: 'c' }]
  })), ['clients[1].id: duplicates clients[0].id', 'clients[2].keySha256: duplicates clients[0].keySha256'])
})

t.test('client ids "none" and "other" are refused: the metrics use them for calls without a key and clients removed', async t => {
  const upstream = { baseUrls: ['http://x'], apiKey: 'k' }
  t.same(problems(() => parseConfig({
    upstream, clients: [{ id: 'none', keySha256: DIGEST, scopes: ['read'] }, { id: 'other', keySha256: 'b'.repeat(64), scopes: ['read'] }]
  })), [
    'clients[0].id: "none" is reserved (the metrics\' client label for calls without a valid key)',
    'clients[1].id: "other" is reserved (the metrics\' client label for clients no longer configured)'
  ])
  t.doesNotThrow(() => parseConfig({ upstream, clients: [{ id: 'nonesuch', keySha256: DIGEST, scopes: ['read'] }] }), 'a longer id is fine')
})

t.test('an unquoted all-digit digest is refused with a hint instead of being read as a number', async t => {
  const file = yamlFile(minimal.replace(`"${DIGEST}"`, '1'.repeat(64)))
  t.match(problems(() => loadConfig(file, { OHMYGPT_API_KEY: 'x' })), [/clients\[0\]\.keySha256: .*quote it/])
})

t.test('an unquoted id that YAML reads as a number, null or boolean is refused with a hint to quote it', async t => {
  for (const id of ['2024', 'null', 'true']) {
    const file = yamlFile(minimal.replace('id: team-search', `id: ${id}`))
    t.same(problems(() => loadConfig(file, { OHMYGPT_API_KEY: 'x' })),
      ['clients[0].id: must be a string: quote it in YAML (id: "2024"); unquoted, 2024, 1e3, null or true are not strings'], id)
  }
  const keyId = yamlFile(minimal.replace(`keySha256: "${DIGEST}"`, `keys: [{ id: 2025, sha256: "${DIGEST}" }]`))
  t.match(problems(() => loadConfig(keyId, { OHMYGPT_API_KEY: 'x' })), [/^clients\[0\]\.keys\[0\]\.id: must be a string: quote it/])
})

t.test('unreadable and unparsable files fail with the file named', async t => {
  t.match(problems(() => loadConfig('/nonexistent/gateway.yaml', {})), [/cannot read the file: ENOENT/])
  t.match(problems(() => loadConfig(yamlFile('upstream: [\n'), {})), [/^YAML: /])
})

t.test('a YAML error names what and where, never the lines around it (which may hold the token)', async t => {
  const secret = 'sk-live-SECRET-0123456789'
  for (const text of [
    `upstream:\n  baseUrls: ['http://x']\n  apiKey: ${secret}\n  apiKey: ${secret}2\n`, // pasting the new token in
    `upstream:\n\tapiKey: ${secret}\n`,
    `upstream:\n  apiKey: @${secret}\n`
  ]) {
    const found = problems(() => loadConfig(yamlFile(text), {}))
    t.match(found, [/^YAML: .* at line \d+, column \d+$/])
    t.notMatch(found.join('\n'), secret)
  }
  // Unquoted, a value starting with * is an alias and one starting with ! a tag: the parser's error or warning
  // would quote it.
  const warnings: string[] = []
  const onWarning = (w: Error) => { warnings.push(String(w.message)) }
  process.on('warning', onWarning)
  t.teardown(() => { process.off('warning', onWarning) })
  for (const value of [`*${secret}`, `!${secret}`]) {
    const found = problems(() => loadConfig(yamlFile(`upstream:\n  baseUrls: ['http://x']\n  apiKey: ${value}\n`), {}))
    t.ok(found.length > 0, `${value.slice(0, 1)}: refused`)
    t.notMatch(found.join('\n'), secret)
  }
  await new Promise(resolve => setImmediate(resolve))
  t.notMatch(warnings.join('\n'), secret, 'no warning quoting it either')
})

t.test('a file with a second YAML document (a --- after the config) is refused in the operator\'s words, with where', async t => {
  for (const text of ['upstream: {}\n---\nlisten: { port: 1 }\n', 'upstream: {}\n---\n']) {
    t.same(problems(() => loadConfig(yamlFile(text), {})),
      ['YAML: the file holds more than one document: the config is the first, and the "---" at line 2, column 1 starts another; remove it (and what follows)'])
  }
})

t.test('YAML whose aliases would multiply out (a "billion laughs") is refused as that, not as an alias without its anchor', async t => {
  const levels = ['a: &a [x, x, x, x, x, x, x, x, x]']
  for (const [name, prev] of [['b', 'a'], ['c', 'b'], ['d', 'c'], ['e', 'd'], ['f', 'e']]) {
    levels.push(`${name}: &${name} [${Array(9).fill(`*${prev}`).join(', ')}]`)
  }
  t.same(problems(() => loadConfig(yamlFile(levels.join('\n') + '\n'), {})),
    ['YAML: too many aliases (*name), which would copy anchored values over and over: write the values out'])
  t.same(problems(() => loadConfig(yamlFile('upstream: *nowhere\n'), {})),
    ['YAML: an alias (*name) refers to no anchor set before it; a value that starts with * must be quoted'])
})

t.test('an upstream.caFile that holds no certificate is refused: TLS would ignore it and every call fail', async t => {
  const ca = readFileSync(join(import.meta.dirname, 'fixtures', 'tls', 'ca.pem'), 'utf8')
  const dir = tempDir('gw-ca-')
  const file = (name: string, text: string) => { writeFileSync(join(dir, name), text); return join(dir, name) }
  const withCa = (caFile: string) => problems(() => parseConfig({ upstream: { baseUrls: ['https://x'], apiKey: 'k', caFile } }))
  t.match(withCa(file('empty.pem', '')), [/^upstream\.caFile: .* holds no PEM certificate/])
  t.match(withCa(file('key.pem', '-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n')), [/^upstream\.caFile: .* holds no PEM certificate/],
    'a key where the CA should be')
  const cut = ca.replace(/\n[^\n]+\n-----END CERTIFICATE-----/, '\nAAAA\n-----END CERTIFICATE-----')
  t.match(withCa(file('cut.pem', cut)), [/^upstream\.caFile: certificate 1 in .* cannot be read/], 'a damaged certificate')
  t.same(withCa(file('ca.pem', ca)), [], 'the CA that signed the test upstream is fine')
  t.same(withCa(file('two.pem', `# a bundle\n${ca}\n${ca}`)), [], 'so is a bundle of several, with text around them')
})

t.test('an upstream base URL with user:password@ is refused: never sent, it would only reach the log', async t => {
  const upstream = (url: string) => ({ baseUrls: ['https://cn2us02.opapi.win', url], apiKey: 'k' })
  for (const url of ['https://ops:hunter2-SECRET@line.example', 'https://hunter2-SECRET@line.example/v1', 'http://a:b@127.0.0.1:8080']) {
    const found = problems(() => parseConfig({ upstream: upstream(url) }))
    t.match(found, [/^upstream\.baseUrls\[1\]: .*user:password@/], `${url.replace(/\/\/.*@/, '//…@')}: refused, the line named`)
    t.notMatch(found.join('\n'), 'hunter2-SECRET', 'without echoing the credentials')
  }
  t.same(problems(() => parseConfig({ upstream: upstream('https://line.example:8443/api/v1') })), [], 'a port and a path prefix are fine')
})

t.test('an upstream base URL that is a host and /v1 (an SDK\'s base URL) is refused: every call would go to /v1/v1 and get 404', async t => {
  const upstream = (url: string) => ({ baseUrls: ['https://cn2us02.opapi.win', url], apiKey: 'k' })
  for (const url of ['https://cn2us02.opapi.win/v1', 'https://cn2us02.opapi.win/v1/', 'http://127.0.0.1:8080/v1']) {
    t.match(problems(() => parseConfig({ upstream: upstream(url) })), [/^upstream\.baseUrls\[1\]: .*\/v1\/v1\/conversations.*without the \/v1/], `${url}: refused, the line named`)
  }
  t.same(problems(() => parseConfig({ upstream: upstream('https://cn2us02.opapi.win/') })), [], 'a trailing slash alone is fine')
  t.same(problems(() => parseConfig({ upstream: upstream('https://line.example/v1beta') })), [], 'a path that only starts like it is fine')
})

t.test('store.url takes memory:// or a redis URL, and a bad one is refused without echoing its password', async t => {
  const upstream = { baseUrls: ['http://x'], apiKey: 'k' }
  const store = (s: Record<string, unknown>) => parseConfig({ upstream, store: s }).store
  t.same(store({ url: 'redis://:pw@redis:6379/2', timeoutMs: 20, onFailure: 'closed' }),
    { url: 'redis://:pw@redis:6379/2', timeoutMs: 20, onFailure: 'closed', keyPrefix: 'ogw:rl:' })
  t.equal(store({ keyPrefix: 'ogw:staging:' }).keyPrefix, 'ogw:staging:', 'another deployment on the same Redis takes its own prefix')
  for (const url of ['redis://redis', 'rediss://user:p%40ss@cache.example:6380/0', 'redis://:pw@10.0.0.5:6379/']) {
    t.equal(store({ url }).url, url, url)
  }
  t.equal(parseConfig({ upstream, store: { url: '${STORE_URL}' } }, { STORE_URL: 'redis://:env-pw@r:1/0' }).store.url,
    'redis://:env-pw@r:1/0', 'the password can come from the environment')

  const secret = 'hunter2-S3cret'
  const bad: Array<[unknown, RegExp]> = [
    [`http://:${secret}@redis:6379`, /store\.url: must be memory:\/\/ or redis\[s\]:\/\//],
    [`redis://:${secret}@redis:6379/zero`, /store\.url: the path must be a database number/],
    [`redis://:${secret}@redis:6379/0?tls=true`, /store\.url: query options/],
    [`redis://:${secret}@redis:99999/0`, /store\.url: must be/],
    [`redis://:${secret}@/0`, /store\.url: must be/],
    ['memory://x', /store\.url: must be/],
    // a % that starts no escape: accepted, the start crashed in the Redis client with a stack trace
    [`redis://:pa%zz${secret}@redis:6379/0`, /store\.url: .*percent-encod.*%25/],
    [`redis://us%r:${secret}@redis:6379/0`, /store\.url: .*percent-encod.*%25/],
    // a password from a password manager: each of these ends the host part of a URL
    [`redis://:pa#${secret}@redis:6379/0`, /store\.url: .*percent-encode .*#/],
    [`redis://:pa?${secret}@redis:6379/0`, /store\.url: .*percent-encode .*\?/],
    // ... and with an @ before it, which made a host of what came between (it was "the path must be a database number")
    [`redis://:p@ss/w${secret}@redis:6379/0`, /store\.url: .*percent-encode \/ /],
    [`redis://:p@ss?w${secret}@redis:6379/0`, /store\.url: .*percent-encode .*\?/],
    [`redis://:p@ss#w${secret}@redis:6379/0`, /store\.url: .*percent-encode .*#/]
  ]
  for (const [url, message] of bad) {
    const found = problems(() => parseConfig({ upstream, store: { url } }))
    t.match(found, [message], String(url).replace(secret, '***'))
    t.notMatch(found.join('\n'), secret, 'the password is not echoed')
  }
  t.match(problems(() => parseConfig({ upstream, store: { timeoutMs: 0, onFailure: 'maybe', size: 1 } })),
    ['store.size: unknown key', 'store.timeoutMs: must be >= 1', /store\.onFailure/])
  t.match(problems(() => parseConfig({ upstream, store: { keyPrefix: 'has space' } })), [/store\.keyPrefix/])
  t.match(problems(() => parseConfig({ upstream, store: { keyPrefix: '' } })), [/store\.keyPrefix/])
})

t.test('a store.url password is kept out of every problem however the URL spells it, even one the URL check refuses', async t => {
  const upstream = { baseUrls: ['http://x'], apiKey: 'k' }
  // A mistyped ${VAR} put the password in trustProxy too, whose problem quotes the entry.
  const cases: Array<[string, string[]]> = [
    // a % that starts no escape: the decoding threw and nothing was redacted
    ['redis://:pw%zz-S3cret-tail@redis:6379/0', ['pw%zz-S3cret-tail']],
    ['redis://:pw%zz-S3cret%41tail@redis:6379/0', ['pw%zz-S3cret%41tail', 'pw%zz-S3cretAtail']],
    // a URL that does not parse (a port out of range)
    ['redis://:hunter2-S3cret@redis:99999/0', ['hunter2-S3cret']],
    // a password with an unescaped @ and #: the URL parser takes "p" for the password and "ss" for the host
    ['redis://:p@ss#w-hunter2-S3cret@redis:6379/0', ['p@ss#w-hunter2-S3cret']],
    // (an accepted one, as before)
    ['redis://:hunter2%2DS3cret@redis:6379/0', ['hunter2%2DS3cret', 'hunter2-S3cret']]
  ]
  for (const [url, spellings] of cases) {
    const found = problems(() => parseConfig({ upstream, trustProxy: spellings, store: { url } })).join('\n')
    t.match(found, /trustProxy\[0\]: invalid IP address: \[redacted\]/, url.replace(/:[^:]*@/, ':***@'))
    for (const spelling of spellings) t.notOk(found.includes(spelling), `${spelling.slice(0, 4)}…: not quoted`)
  }
})

t.test('trustProxy entries are checked as Fastify will compile them: a bad address or range is a bad field, not a crash at start', async t => {
  const upstream = { baseUrls: ['http://x'], apiKey: 'k' }
  t.same(parseConfig({ upstream, trustProxy: ['10.0.0.0/8', '::1', '192.168.1.7', 'loopback'] }).trustProxy,
    ['10.0.0.0/8', '::1', '192.168.1.7', 'loopback'])
  const found = problems(() => parseConfig({ upstream, trustProxy: ['10.0.0.1', 'notanip', '10.0.0.0/33', '10.0.0.0/8 '] }))
  t.equal(found.length, 3, found.join('\n'))
  t.match(found, [
    /^trustProxy\[1\]: invalid IP address: notanip/,
    /^trustProxy\[2\]: invalid range on address: 10\.0\.0\.0\/33/,
    /^trustProxy\[3\]: invalid range on address/
  ])
})

t.test('the config file comes from --config, else GATEWAY_CONFIG, else config/gateway.yaml', async t => {
  t.equal(resolveConfigPath('a.yaml', { GATEWAY_CONFIG: 'b.yaml' }), 'a.yaml')
  t.equal(resolveConfigPath(undefined, { GATEWAY_CONFIG: 'b.yaml' }), 'b.yaml')
  t.equal(resolveConfigPath(undefined, {}), 'config/gateway.yaml')
  // Set but empty (compose's GATEWAY_CONFIG: ${GATEWAY_CONFIG} with nothing exported) is unset, as in a ${VAR}.
  t.equal(resolveConfigPath(undefined, { GATEWAY_CONFIG: '' }), 'config/gateway.yaml')
})

interface SchemaNode { type?: string, default?: unknown, minimum?: number, maximum?: number, properties?: Record<string, SchemaNode>, items?: SchemaNode }

/** Every key a config can hold, as the README names it (`clients[].rateLimit.burst`); maps only hold keys. */
function schemaKeys (node: SchemaNode, path: string, out: Map<string, SchemaNode>): Map<string, SchemaNode> {
  if (node.properties !== undefined) {
    for (const [name, child] of Object.entries(node.properties)) schemaKeys(child, path === '' ? name : `${path}.${name}`, out)
    return out
  }
  out.set(path, node)
  if (node.items?.properties !== undefined) schemaKeys(node.items, `${path}[]`, out)
  return out
}

/** The rows of the README's two config tables: key, type and default as written. */
function readmeConfigRows (): Map<string, Array<{ type: string, default: string }>> {
  const readme = readFileSync('README.md', 'utf8')
  const section = (from: string, to: string) => readme.slice(readme.indexOf(from), readme.indexOf(to, readme.indexOf(from)))
  const rows = new Map<string, Array<{ type: string, default: string }>>()
  for (const text of [section('## Configuration reference', '\n## '), section('### Config keys for operations', '\n## ')]) {
    for (const m of text.matchAll(/^\| `([A-Za-z0-9.[\]]+)` \| ([^|]+) \| ([^|]+) \|/gm)) {
      const key = m[1]!.replace(/\[\]$/, '') // `clients[]`: the list itself
      rows.set(key, [...(rows.get(key) ?? []), { type: m[2]!.trim(), default: m[3]!.trim() }])
    }
  }
  return rows
}

t.test('the README config reference documents every schema key, with its default and bounds, and no other key', async t => {
  const keys = schemaKeys(ConfigSchema as SchemaNode, '', new Map())
  const rows = readmeConfigRows()
  t.same([...rows.keys()].filter(k => !keys.has(k)), [], 'every documented key exists')
  for (const [key, node] of keys) {
    const documented = rows.get(key)
    if (documented === undefined) {
      t.fail(`${key} is not in the README's config reference`)
      continue
    }
    for (const row of documented) {
      // The default column starts with the value in backticks, or says there is none (— required, none).
      const stated = /^`([^`]*)`/.exec(row.default)?.[1]
      const actual = node.default === undefined ? undefined : typeof node.default === 'string' ? node.default : JSON.stringify(node.default)
      t.equal(stated, actual, `${key}: default ${row.default}`)
      if (node.type === 'integer') {
        t.match(row.type, /^integer/, `${key} is documented as an integer`)
        const bounds = node.maximum === undefined ? `≥ ${node.minimum}` : `${node.minimum}–${node.maximum}`
        t.ok(row.type.includes(bounds), `${key}: ${row.type} states ${bounds}`)
      }
      if (node.type === 'boolean') t.equal(row.type, 'boolean', `${key} is documented as a boolean`)
    }
  }
})

t.test('the shipped example config is valid', async t => {
  const config = loadConfig('config/gateway.yaml', { OHMYGPT_API_KEY: 'x' })
  t.equal(config.listen.port, 8080)
  t.equal(config.clients.length, 1)
})

t.test('the shipped example config reads the variables the README Docker section lists, each where it says', async t => {
  const config = loadConfig('config/gateway.yaml', {
    OHMYGPT_API_KEY: 'sk-x', GATEWAY_HOST: '127.0.0.1', GATEWAY_PORT: '9000', LOG_LEVEL: 'warn', STORE_URL: 'redis://r:6379/0', AUDIT_FILE: '-'
  })
  t.match(config, {
    upstream: { apiKey: 'sk-x' }, listen: { host: '127.0.0.1', port: 9000 }, log: { level: 'warn' }, store: { url: 'redis://r:6379/0' }, audit: { file: '-' }
  })
  const readme = readFileSync('README.md', 'utf8')
  const from = readme.indexOf('The built-in config reads')
  const listed = from === -1 ? '' : readme.slice(from, readme.indexOf('the gateway itself reads', from))
  for (const name of ['OHMYGPT_API_KEY', 'GATEWAY_HOST', 'GATEWAY_PORT', 'LOG_LEVEL', 'STORE_URL', 'AUDIT_FILE']) {
    t.ok(listed.includes(`\`${name}\``), `the README lists ${name}`)
  }
  const used = [...readFileSync('config/gateway.yaml', 'utf8').matchAll(/^[^#\n]*\$\{([A-Z_]+)/gm)].map(m => m[1])
  t.same([...new Set(used)].sort(), ['AUDIT_FILE', 'GATEWAY_HOST', 'GATEWAY_PORT', 'LOG_LEVEL', 'OHMYGPT_API_KEY', 'STORE_URL'],
    'and the config reads no other (outside comments)')
})

t.test('a secret with whitespace or control characters is refused with a message that says so, without echoing it', async t => {
  for (const value of ['sk-live-123\n', 'sk live', 'sk-\t1', ' sk-1']) {
    const found = problems(() => loadConfig(yamlFile(minimal), { OHMYGPT_API_KEY: value }))
    t.match(found, [/^upstream\.apiKey: must not contain whitespace or control characters/], JSON.stringify(value))
    t.notOk(found.join('\n').includes(value.trim()), 'the secret is not in the message')
  }
})

t.test('a YAML boolean or a literal string is never read as a number; only a ${VAR} string is', async t => {
  t.match(problems(() => loadConfig(yamlFile(minimal.replace('apiKey: ${OHMYGPT_API_KEY}', 'apiKey: k\n  timeoutMs: true')), {})),
    [/upstream\.timeoutMs: must be an integer/])
  const rateLimited = minimal.replace('scopes: [read]', 'scopes: [read]\n    rateLimit: { requestsPerMinute: true }')
  t.match(problems(() => loadConfig(yamlFile(rateLimited), { OHMYGPT_API_KEY: 'x' })),
    [/clients\[0\]\.rateLimit\.requestsPerMinute: must be an integer/])
  t.match(problems(() => loadConfig(yamlFile(minimal + 'listen: { port: "8080" }\n'), { OHMYGPT_API_KEY: 'x' })),
    [/listen\.port: must be an integer/], 'a quoted literal stays a string')
  t.equal(loadConfig(yamlFile(minimal + 'listen: { port: "${PORT}" }\n'), { OHMYGPT_API_KEY: 'x', PORT: '9000' }).listen.port, 9000)
  t.match(problems(() => loadConfig(yamlFile(minimal + 'listen: { port: "${PORT}" }\n'), { OHMYGPT_API_KEY: 'x', PORT: 'eighty' })),
    [/listen\.port: must be an integer/], 'a variable that is not a number is reported')
})

t.test('a default may hold another placeholder: ${A:-${B}} and deeper', async t => {
  const file = yamlFile(minimal + 'audit: { file: "${AUDIT_FILE:-${AUDIT_DIR:-/var/audit}/gateway.jsonl}" }\n')
  t.equal(loadConfig(file, { OHMYGPT_API_KEY: 'x' }).audit.file, '/var/audit/gateway.jsonl')
  t.equal(loadConfig(file, { OHMYGPT_API_KEY: 'x', AUDIT_DIR: '/data' }).audit.file, '/data/gateway.jsonl')
  t.equal(loadConfig(file, { OHMYGPT_API_KEY: 'x', AUDIT_FILE: '/x.jsonl', AUDIT_DIR: '/data' }).audit.file, '/x.jsonl')
  t.equal(loadConfig(file, { OHMYGPT_API_KEY: 'x', AUDIT_FILE: '${AUDIT_DIR}' }).audit.file, '${AUDIT_DIR}',
    'a value from the environment is not expanded again')
  const unset = yamlFile(minimal + 'audit: { file: "${AUDIT_FILE:-${AUDIT_DIR}}" }\n')
  t.match(problems(() => loadConfig(unset, { OHMYGPT_API_KEY: 'x' })), [/audit\.file: environment variable AUDIT_DIR is not set/])
})

t.test('a ${ that is no placeholder the gateway fills is refused naming its key, never taken as literal text', async t => {
  // Compose's ${VAR-default} and ${VAR:?message}, a missing "-", an unclosed brace: each was kept as it is, so the
  // text of the placeholder became the upstream token sent on every call, or the audit file's path.
  const typos = ['${OHMYGPT_API_KEY-sk-fallback}', '${OHMYGPT_API_KEY:?set it}', '${OHMYGPT_API_KEY:sk-fallback}', '${OHMYGPT_API_KEY',
    '${OHMYGPT API KEY}']
  for (const typo of typos) {
    const found = problems(() => loadConfig(yamlFile(minimal.replace('apiKey: ${OHMYGPT_API_KEY}', `apiKey: "${typo}"`)), { OHMYGPT_API_KEY: 'x' }))
    t.match(found, [/^upstream\.apiKey: .*\$\{VAR\} or \$\{VAR:-default\}/], `${typo.slice(0, 18)}...: refused`)
    t.notOk(found.join('\n').includes('fallback'), 'without repeating what follows the name (a secret may be there)')
  }
  const inDefault = yamlFile(minimal + 'audit: { file: "${AUDIT_FILE:-${AUDIT_DIR-/var/audit}/a.jsonl}" }\n')
  t.match(problems(() => loadConfig(inDefault, { OHMYGPT_API_KEY: 'x' })), [/^audit\.file: /], 'in a default too')
  t.equal(loadConfig(inDefault, { OHMYGPT_API_KEY: 'x', AUDIT_FILE: '/x.jsonl' }).audit.file, '/x.jsonl',
    'a default not used is not read (as ${A:-${B}} with B unset)')
  t.match(problems(() => loadAuditFile(yamlFile(minimal + 'audit: { file: "${AUDIT_FILE-/var/a.jsonl}" }\n'), {})), [/^audit\.file: /],
    'audit verify and query, which read audit.file alone, refuse it as well')
})

t.test('a $VAR without braces (the shell\'s and compose\'s spelling) is refused naming its key, never taken as literal text', async t => {
  // It was kept as it is: "$OHMYGPT_API_KEY" became the upstream token sent on every call (each answered 502
  // upstream_auth_failed), "redis://:$REDIS_PASSWORD@redis" the Redis password, from a config check-config passed.
  const env = { OHMYGPT_API_KEY: 'x', REDIS_PASSWORD: 'p' }
  t.same(problems(() => loadConfig(yamlFile(minimal.replace('${OHMYGPT_API_KEY}', '$OHMYGPT_API_KEY')), env)),
    [`upstream.apiKey: ${UNBRACED_SECRET}`], 'a secret field is named, its value never repeated')
  t.same(problems(() => loadConfig(yamlFile(minimal.replace('${OHMYGPT_API_KEY}', '$OHMYGPT_API_KEY')), {})),
    [`upstream.apiKey: ${UNBRACED_SECRET}`], 'the whole value, with the variable unset too')
  t.same(problems(() => loadConfig(yamlFile(minimal + 'store: { url: "redis://:$REDIS_PASSWORD@redis:6379/0" }\n'), env)),
    [`store.url: its password ${UNBRACED_SECRET}`], 'a URL\'s password that is one alone')
  t.same(problems(() => loadConfig(yamlFile(minimal + 'store: { url: "redis://:p@$REDIS_HOST:6379/0" }\n'), { ...env, REDIS_HOST: 'h' })),
    ['store.url: write ${REDIS_HOST}: a variable without braces is not filled in'], 'inside a value, a variable the environment has')
  t.same(problems(() => loadConfig(yamlFile(minimal + 'listen: { port: $GATEWAY_PORT }\n'), { ...env, GATEWAY_PORT: '1' })),
    ['listen.port: write ${GATEWAY_PORT}: a variable without braces is not filled in'], 'said once, not also as "must be an integer"')
  t.equal(loadConfig(yamlFile(minimal + 'store: { url: "redis://:pa$SECRET-1@redis:6379/0" }\n'), env).store.url,
    'redis://:pa$SECRET-1@redis:6379/0', 'a $ inside a value naming no variable set is text (a password may hold one)')
  t.equal(loadConfig(yamlFile(minimal.replace('${OHMYGPT_API_KEY}', '$s3cret_token')), {}).upstream.apiKey, '$s3cret_token',
    'a whole value of $ and a word not in a variable\'s capitals, naming no variable set, is text: a secret may be one')
  t.equal(loadConfig(yamlFile(minimal + 'store: { url: "${STORE_URL}" }\n'), { ...env, STORE_URL: 'redis://:$REDIS_PASSWORD@redis:6379/0' }).store.url,
    'redis://:$REDIS_PASSWORD@redis:6379/0', 'a value from the environment is taken as it is')
  t.match(problems(() => loadAuditFile(yamlFile(minimal + 'audit: { file: "./audit/$HOSTNAME.jsonl" }\n'), { HOSTNAME: 'h' })),
    ['audit.file: write ${HOSTNAME}: a variable without braces is not filled in'], 'audit verify and query, which read audit.file alone, refuse it as well')
})

t.test('a secret holding $ and a word is taken as written, and no problem repeats any of a secret', async t => {
  // The check for a $VAR without braces refused a literal metrics.token "$AB12CD..." or a Redis password holding
  // "$HOME!" (a variable the environment has, then a character no name holds), and its problem quoted the name:
  // the token, or part of the password, in check-config's output and start's problems.
  const env = { OHMYGPT_API_KEY: 'x', HOME: '/home/gw', USER: 'gw' }
  const literal = minimal.replace('${OHMYGPT_API_KEY}', 'sk-$USER@s3cret') +
    'store: { url: "redis://:pa$HOME!s3cret@redis:6379/0" }\n'
  const config = loadConfig(yamlFile(literal), env)
  t.equal(config.upstream.apiKey, 'sk-$USER@s3cret', 'the upstream token as written')
  t.equal(config.store.url, 'redis://:pa$HOME!s3cret@redis:6379/0', 'the Redis password as written')
  const tokens = minimal + 'metrics: { listen: "127.0.0.1:9100", token: "$AB12CDEFGHIJKLMNOP" }\n' +
    'store: { url: "redis://:$PASSWORD12@redis:6379/0" }\n'
  const said = problems(() => loadConfig(yamlFile(tokens), env))
  t.same(said, [`metrics.token: ${UNBRACED_SECRET}`, `store.url: its password ${UNBRACED_SECRET}`],
    'a secret that is $ and a name in capitals is refused, naming its field')
  t.notMatch(said.join('\n'), /AB12CD|PASSWORD12/, 'and none of it is said')
})

t.test('a duration past Node\'s longest timer (2147483647 ms) is refused: Node would fire it after 1 ms', async t => {
  // store.timeoutMs: 3000000000 (meant as "wait as long as it takes") made every call time out at once, so every
  // call fell back (open) or got 503 (closed); shutdown.graceMs so would abort every in-flight call at SIGTERM.
  const upstream = { baseUrls: ['http://x'], apiKey: 'k' }
  const tooLong = 2_147_483_648
  const bad = problems(() => parseConfig({
    upstream: { ...upstream, timeoutMs: tooLong, cooldownMs: tooLong },
    listen: { sendTimeoutMs: tooLong },
    store: { timeoutMs: tooLong },
    ownership: { cacheTtlMs: tooLong },
    shutdown: { drainDelayMs: tooLong, graceMs: tooLong }
  }))
  for (const key of ['upstream.timeoutMs', 'upstream.cooldownMs', 'listen.sendTimeoutMs', 'store.timeoutMs',
    'ownership.cacheTtlMs', 'shutdown.drainDelayMs', 'shutdown.graceMs']) {
    t.ok(bad.includes(`${key}: must be <= 2147483647`), `${key} is refused`)
  }
  t.same(problems(() => parseConfig({ upstream, store: { timeoutMs: 2_147_483_647 }, shutdown: { graceMs: 2_147_483_647 } })), [],
    'the longest timer itself is accepted')
  // Node 24 keeps an idle connection keepAliveTimeoutBuffer (1 s) past keepAliveTimeout, in one timer.
  t.same(problems(() => parseConfig({ upstream, listen: { keepAliveTimeoutMs: 2_147_482_648 } })), ['listen.keepAliveTimeoutMs: must be <= 2147482647'])
})
