// Loads the gateway's YAML config: parse, fill ${VAR} / ${VAR:-default} from the environment, validate against
// one schema (which is also where the TypeScript type and the defaults come from), check what a schema cannot
// (unique ids and digests), and return a frozen object. No other module reads process.env.
import { X509Certificate } from 'node:crypto'
import { isIPv4 } from 'node:net'
import { closeSync, constants as fsConstants, fstatSync, openSync, readSync } from 'node:fs'
import { Type, type Static } from '@sinclair/typebox'
import proxyAddr from '@fastify/proxy-addr'
import { Ajv, type ErrorObject } from 'ajv'
import { parse as parseYaml, YAMLParseError } from 'yaml'

/** metrics.listen: host:port ([v6]:port), the port 0–65535. */
const METRICS_LISTEN_PATTERN = '^(\\[[0-9A-Fa-f:.]+\\]|[^\\s:\\[\\]]+):(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})$'

/** Where the audit trail goes when the config does not say. */
const DEFAULT_AUDIT_FILE = './audit/audit.jsonl'

export const DEFAULT_CONFIG_FILE = 'config/gateway.yaml'

/** A secret sent in a header: printable ASCII, no spaces. A trailing newline (a mounted secret file) is refused. */
const SECRET_PATTERN = '^[\\x21-\\x7e]+$'
/** What is wrong with a secret that does not match SECRET_PATTERN. */
const SECRET_PROBLEM = 'must not contain whitespace or control characters (a trailing newline from a secret file?)'
/**
 * An upstream line: http(s)://host[:port][/path]. No user:password@: the lines are called with their origin only
 * (the token is upstream.apiKey), so credentials there would never be sent, only logged with the line's URL.
 */
const BASE_URL_PATTERN = '^https?://[^\\s/?#@]+(/[^\\s?#]*)?$'

// admin: act on every conversation, whoever created it (ownership only; the operation's own scope is still needed).
const Scope = Type.Union([Type.Literal('read'), Type.Literal('write'), Type.Literal('delete'), Type.Literal('admin')])
export type Scope = Static<typeof Scope>

const DIGEST_PATTERN = '^[0-9a-f]{64}$'
const DIGEST = Type.String({ pattern: DIGEST_PATTERN })

const KEY_ID_PATTERN = '^[A-Za-z0-9._-]{1,64}$'
const TIME_PATTERN = '^\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}(:\\d{2}(\\.\\d+)?)?(Z|[+-]\\d{2}:\\d{2})$'
const CLIENT_ID_PATTERN = '^[a-z0-9._-]{1,64}$'
const KEY_PREFIX_PATTERN = '^[A-Za-z0-9:._-]{1,64}$'

/** One of a client's keys, for rotation without downtime: several may be valid at once, each until expiresAt. */
const Key = Type.Object({
  id: Type.String({ pattern: KEY_ID_PATTERN }),
  sha256: DIGEST,
  /** ISO 8601 time after which the key is refused (401) */
  expiresAt: Type.Optional(Type.String({ pattern: TIME_PATTERN }))
}, { additionalProperties: false })

const Client = Type.Object({
  id: Type.String({ pattern: CLIENT_ID_PATTERN }),
  /** the single-key form; `keys` is the rotating form; a client has one or the other */
  keySha256: Type.Optional(DIGEST),
  keys: Type.Optional(Type.Array(Key, { minItems: 1 })),
  scopes: Type.Array(Scope, { minItems: 1, uniqueItems: true }),
  rateLimit: Type.Object({
    requestsPerMinute: Type.Integer({ minimum: 1, default: 600 }),
    burst: Type.Integer({ minimum: 1, default: 60 }),
    /** this client's concurrent upstream calls; none when absent */
    maxConcurrent: Type.Optional(Type.Integer({ minimum: 1 })),
    /** model tokens (input + output, from each answer's usage) per minute; none when absent */
    tokensPerMinute: Type.Optional(Type.Integer({ minimum: 1 }))
  }, { additionalProperties: false, default: {} }),
  /** models this client may ask for in POST /v1/responses: globs (`*` any run of characters, `?` one); all when absent */
  models: Type.Optional(Type.Array(Type.String({ minLength: 1 }), { minItems: 1 }))
}, { additionalProperties: false })
export type ClientConfig = Static<typeof Client>

/** Node's longest timer: a longer setTimeout fires after 1 ms, so every duration key stops here (24.8 days). */
export const MAX_TIMER_MS = 2_147_483_647

export const ConfigSchema = Type.Object({
  listen: Type.Object({
    host: Type.String({ minLength: 1, default: '0.0.0.0' }),
    port: Type.Integer({ minimum: 0, maximum: 65535, default: 8080 }),
    /** a request's headers must arrive within this (slowloris) → 408 */
    headersTimeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 20000 }),
    /** the whole request, body included, must arrive within this → 408 */
    requestTimeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 60000 }),
    /**
     * an idle kept-alive connection is closed after this (Node 24 waits its keepAliveTimeoutBuffer, 1 s, on top:
     * the sum must still fit a timer, or every idle connection prints a TimeoutOverflowWarning)
     */
    keepAliveTimeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS - 1000, default: 72000 }),
    /** a client that reads nothing of its answer for this long is cut off */
    sendTimeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 30000 }),
    /** connections beyond this are refused */
    maxConnections: Type.Integer({ minimum: 1, default: 10000 })
  }, { additionalProperties: false, default: {} }),
  /** the load balancers in front whose X-Forwarded-For is believed (addresses or CIDRs); false: none */
  trustProxy: Type.Union([Type.Literal(false), Type.Array(Type.String({ minLength: 1 }), { minItems: 1 })], { default: false }),
  log: Type.Object({
    level: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map(l => Type.Literal(l)),
      { default: 'info' })
  }, { additionalProperties: false, default: {} }),
  upstream: Type.Object({
    baseUrls: Type.Array(Type.String({ pattern: BASE_URL_PATTERN }), { minItems: 1 }),
    /** the OhMyGPT token, from the environment (`${OHMYGPT_API_KEY}`); or: */
    apiKey: Type.Optional(Type.String({ minLength: 1, pattern: SECRET_PATTERN })),
    /** a file holding the token (a mounted secret), read at start and on every reload: rotation without restart */
    apiKeyFile: Type.Optional(Type.String({ minLength: 1 })),
    /** connection (TCP and TLS) to a line */
    connectTimeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 5000 }),
    /** response headers, from the call's start: waiting for a pooled connection and every retry included */
    timeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 60000 }),
    /** longest silence between two chunks of a response body */
    bodyTimeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 60000 }),
    /**
     * a generation (POST /v1/responses) waits on the model: this replaces timeoutMs and bodyTimeoutMs for it (a
     * reasoning model answers a non-streamed call only when it is done). 10 s under the SDKs' own 10 minutes, so
     * that the gateway's 504, which tells them not to send it again, comes before they give up and retry.
     */
    generationTimeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 590000 }),
    failureThreshold: Type.Integer({ minimum: 1, default: 3 }),
    cooldownMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 30000 }),
    retries: Type.Integer({ minimum: 0, default: 1 }),
    /** connections kept to each line */
    maxConnections: Type.Integer({ minimum: 1, default: 128 }),
    caFile: Type.Optional(Type.String({ minLength: 1 }))
  }, { additionalProperties: false }),
  limits: Type.Object({
    bodyBytes: Type.Integer({ minimum: 1, default: 4194304 }),
    /** concurrent upstream calls, all clients together; above it, 503 overloaded at once */
    maxInFlight: Type.Integer({ minimum: 1, default: 1024 }),
    /** failed key checks per source address and minute; above it, 429 too_many_auth_failures */
    authFailuresPerMinute: Type.Integer({ minimum: 1, default: 30 })
  }, { additionalProperties: false, default: {} }),
  store: Type.Object({
    url: Type.String({ pattern: '^(memory://|rediss?://\\S+)$', default: 'memory://' }),
    timeoutMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 50 }),
    onFailure: Type.Union([Type.Literal('open'), Type.Literal('closed')], { default: 'open' }),
    /** what every Redis key of this deployment starts with: another deployment on the same Redis takes another */
    keyPrefix: Type.String({ pattern: KEY_PREFIX_PATTERN, default: 'ogw:rl:' })
  }, { additionalProperties: false, default: {} }),
  clients: Type.Array(Client, { default: [] }),
  ownership: Type.Object({
    /** conversations not created through the gateway (no owner in their metadata) */
    unowned: Type.Union([Type.Literal('deny'), Type.Literal('allow')], { default: 'deny' }),
    cacheTtlMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 600000 }),
    /** entries of each owner and issued-item cache; lru-cache reserves their room up front (about 130 bytes each) */
    cacheSize: Type.Integer({ minimum: 1, maximum: 10_000_000, default: 100000 }),
    /** how long an upstream 404 is remembered as "no such conversation" */
    notFoundTtlMs: Type.Integer({ minimum: 0, maximum: MAX_TIMER_MS, default: 5000 })
  }, { additionalProperties: false, default: {} }),
  audit: Type.Object({
    file: Type.String({ minLength: 1, default: DEFAULT_AUDIT_FILE }),
    fsync: Type.Union([Type.Literal('off'), Type.Literal('interval'), Type.Literal('every')], { default: 'interval' }),
    onFailure: Type.Union([Type.Literal('closed'), Type.Literal('open')], { default: 'closed' }),
    rotate: Type.Object({
      maxBytes: Type.Optional(Type.Integer({ minimum: 4096 })),
      daily: Type.Boolean({ default: false }),
      keep: Type.Integer({ minimum: 0, default: 0 }),
      gzip: Type.Boolean({ default: false })
    }, { additionalProperties: false, default: {} })
  }, { additionalProperties: false, default: {} }),
  /** SIGTERM/SIGINT/SIGQUIT: how the gateway stops (server.ts) */
  shutdown: Type.Object({
    /** /readyz answers 503 at once, and the gateway keeps serving this long before it stops accepting */
    drainDelayMs: Type.Integer({ minimum: 0, maximum: MAX_TIMER_MS, default: 0 }),
    /** then in-flight calls get this long to finish; past it they are aborted (audited aborted), exit 1 */
    graceMs: Type.Integer({ minimum: 1, maximum: MAX_TIMER_MS, default: 30000 })
  }, { additionalProperties: false, default: {} }),
  metrics: Type.Object({
    listen: Type.Optional(Type.String({ pattern: METRICS_LISTEN_PATTERN })),
    token: Type.Optional(Type.String({ minLength: 16, pattern: SECRET_PATTERN }))
  }, { additionalProperties: false, default: {} })
}, { additionalProperties: false })

/** The config as loaded: `upstream.apiKey` is always there, read from `apiKeyFile` when that is given. */
export type GatewayConfig = Static<typeof ConfigSchema> & { upstream: { apiKey: string } }

export class ConfigError extends Error {
  readonly problems: string[]
  constructor (source: string, problems: string[]) {
    super(`invalid config ${source}:\n${problems.map(p => `  - ${p}`).join('\n')}`)
    this.name = 'ConfigError'
    this.problems = problems
  }
}

/** Shorter values are not taken out of problems (as upstream/scrub.ts's MIN_SCRUBBED_LENGTH): no secret is that short. */
const MIN_SECRET_LENGTH = 8

/**
 * The secrets of the environment a config was filled from that are none of its fields: the audit chain's HMAC key
 * (AUDIT_HMAC_KEY, which the gateway reads beside the config), by the config they may have been put into.
 */
const environmentSecrets = new WeakMap<object, unknown[]>()

/**
 * `problems` with the config's secrets (the upstream token, the metrics token, a Redis password, and the
 * environment's AUDIT_HMAC_KEY) taken out. A problem may quote another field's value (a trustProxy entry, a host
 * that does not resolve), and a mistyped `${VAR}` can have filled that field with a secret: the output of
 * check-config and start never holds one.
 */
export function withoutSecrets (problems: string[], config: unknown): string[] {
  const { upstream, metrics, store } = (config ?? {}) as { upstream?: { apiKey?: unknown }, metrics?: { token?: unknown }, store?: { url?: unknown } }
  const fromEnvironment = config !== null && typeof config === 'object' ? environmentSecrets.get(config) ?? [] : []
  const secrets = [upstream?.apiKey, metrics?.token, ...redisPasswords(store?.url), ...fromEnvironment]
    .filter((secret): secret is string => typeof secret === 'string' && secret.length >= MIN_SECRET_LENGTH)
  if (secrets.length === 0) return problems
  return problems.map(problem => secrets.reduce((text, secret) => text.replaceAll(secret, '[redacted]'), problem))
}

/**
 * A Redis URL's password in every spelling a message could quote: as written between the scheme's `//` (after the
 * user's `:`) and the last `@` (so one with an unescaped @, / or # is whole, as the URL check refuses it), as the
 * URL parser reads it, and each decoded, escape by escape where a % begins none. None for another URL.
 */
function redisPasswords (url: unknown): string[] {
  if (typeof url !== 'string' || !/^rediss?:/.test(url)) return []
  const written = /^rediss?:\/\/[^:@]*:(.*)@/s.exec(url)?.[1]
  const parsed = parsedUrl(url)?.password
  const spellings = [written, parsed].filter((password): password is string => password !== undefined)
  return [...new Set(spellings.flatMap(password => [password, decodedLeniently(password)]))]
}

/** `text` with each run of percent escapes decoded, and a % that begins none (or bytes that are no UTF-8) kept. */
function decodedLeniently (text: string): string {
  return text.replace(/(?:%[0-9a-f]{2})+/gi, escapes => {
    try {
      return decodeURIComponent(escapes)
    } catch {
      return escapes
    }
  })
}

// No type coercion here: a YAML boolean is never a number. Only a string that came from a ${VAR} may be read as
// a number or a boolean (coercePlaceholders below).
const ajv = new Ajv({ allErrors: true, useDefaults: true, strict: true })
const validate = ajv.compile<GatewayConfig>(ConfigSchema)

function pointerParts (pointer: string): string[] {
  return pointer.split('/').slice(1).map(p => p.replace(/~1/g, '/').replace(/~0/g, '~'))
}

/** `/clients/0/keySha256` → `clients[0].keySha256` */
function fieldPath (pointer: string): string {
  const parts = pointerParts(pointer)
  return parts.reduce((out, p) => /^\d+$/.test(p) ? `${out}[${p}]` : out ? `${out}.${p}` : p, '') || '(root)'
}

const TYPE_WORDS: Record<string, string> = {
  array: 'a list', object: 'a map', string: 'a string', integer: 'an integer', number: 'a number', boolean: 'true or false'
}

/**
 * Ajv's errors in our words. A value that fits none of a union's forms (log.level's words, a scope, trustProxy's
 * false or list) comes as one error per form and an 'anyOf': said once, naming the forms.
 */
function describeAll (errors: ErrorObject[]): string[] {
  const unions = new Set(errors.filter(e => e.keyword === 'anyOf').map(e => e.instancePath))
  const under = (path: string) => (e: ErrorObject) => e.instancePath.startsWith(path + '/')
  const consts = new Map<string, unknown[]>()
  const types = new Map<string, string[]>()
  for (const e of errors) {
    if (!unions.has(e.instancePath)) continue
    if (e.keyword === 'const') consts.set(e.instancePath, [...(consts.get(e.instancePath) ?? []), e.params.allowedValue])
    if (e.keyword === 'type') types.set(e.instancePath, [...(types.get(e.instancePath) ?? []), String(e.params.type)])
  }
  return errors.flatMap(e => {
    if (!unions.has(e.instancePath)) return [describe(e)]
    // The value has the form of one of the union's members and breaks a rule of it (an empty list, a bad item):
    // that rule is the error, not the union.
    const specific = errors.filter(x => x.instancePath === e.instancePath && !['anyOf', 'const', 'type'].includes(x.keyword))
    if (specific.length > 0 || errors.some(under(e.instancePath))) return specific.includes(e) ? [describe(e)] : []
    if (e.keyword !== 'anyOf') return []
    const words = consts.get(e.instancePath) ?? []
    // A literal's own type (log.level's words are strings) is no form of its own; a list or a map is.
    const literalTypes = new Set<string>(words.map(w => typeof w))
    const forms = [...new Set((types.get(e.instancePath) ?? []).filter(t => !literalTypes.has(t === 'integer' ? 'number' : t)))]
      .map(t => TYPE_WORDS[t] ?? t)
    const named = [...words.map(w => JSON.stringify(w)), ...forms]
    return [`${fieldPath(e.instancePath)}: must be ${named.length > 0 ? `one of ${named.join(', ')}` : 'another value'}`]
  })
}

/** Each pattern of the schema, as an operator reads it. */
const PATTERN_WORDS: Record<string, string> = {
  [SECRET_PATTERN]: SECRET_PROBLEM,
  [DIGEST_PATTERN]: 'must be 64 lowercase hex characters (quote it in YAML)',
  [BASE_URL_PATTERN]: 'must be http(s)://host[:port][/path], without user:password@ (credentials there are never sent)',
  [METRICS_LISTEN_PATTERN]: 'must be host:port with a port from 0 to 65535 (127.0.0.1:9464)',
  [CLIENT_ID_PATTERN]: 'must be 1 to 64 lowercase letters, digits, ".", "_" or "-" (team-a)',
  [KEY_ID_PATTERN]: 'must be 1 to 64 letters, digits, ".", "_" or "-" (2025-06)',
  [TIME_PATTERN]: 'must be a date and time with its offset, as "2025-07-01T00:00:00Z"',
  [KEY_PREFIX_PATTERN]: 'must be 1 to 64 letters, digits, ":", ".", "_" or "-" (ogw:rl:)'
}

function describe (e: ErrorObject): string {
  const at = fieldPath(e.instancePath)
  if (/\.(keySha256|sha256)$/.test(at) && e.keyword === 'type') return `${at}: ${PATTERN_WORDS[DIGEST_PATTERN]}`
  if (/^clients\[\d+\](\.keys\[\d+\])?\.id$/.test(at) && e.keyword === 'type') {
    return `${at}: must be a string: quote it in YAML (id: "2024"); unquoted, 2024, 1e3, null or true are not strings`
  }
  switch (e.keyword) {
    case 'additionalProperties':
      return `${at === '(root)' ? '' : at + '.'}${String(e.params.additionalProperty)}: unknown key`
    case 'required':
      return `${at === '(root)' ? '' : at + '.'}${String(e.params.missingProperty)}: is required`
    case 'type':
      // (in the words the other messages use: "a map", not Ajv's "object")
      return `${at}: must be ${TYPE_WORDS[String(e.params.type)] ?? String(e.params.type)}`
    case 'pattern':
      if (at === 'store.url') return `${at}: ${STORE_URL_FORM}`
      return `${at}: ${PATTERN_WORDS[String(e.params.pattern)] ?? `must match ${String(e.params.pattern)}`}`
    default:
      return `${at}: ${e.message ?? 'is invalid'}`
  }
}

/** Index of the `}` closing the placeholder whose body starts at `from`, counting nested `${`; -1 if none. */
function closingBrace (text: string, from: number): number {
  let depth = 1
  for (let i = from; i < text.length; i++) {
    if (text.startsWith('${', i)) {
      depth++
      i++
    } else if (text[i] === '}' && --depth === 0) {
      return i
    }
  }
  return -1
}

const PLACEHOLDER_BODY = /^([A-Za-z_][A-Za-z0-9_]*)(?::-([\s\S]*))?$/

/**
 * Fills ${VAR} and ${VAR:-default} in one string. A default may itself hold placeholders (`${A:-${B}}`); a value
 * from the environment is taken as it is, never expanded again. Any other `${` of the file's text (compose's
 * `${VAR-default}` or `${VAR:?message}`, a `${VAR:default}`, a brace left open) is a problem: kept as it is, the
 * text of a placeholder would become the upstream token sent on every call, or the audit file's path. The problem
 * names the variable only: what follows it may be a secret typed into the file.
 */
function expand (text: string, env: NodeJS.ProcessEnv, problem: (message: string) => void, took: (name: string) => void): string {
  let out = ''
  let at = 0
  for (let start = text.indexOf('${'); start !== -1; start = text.indexOf('${', at)) {
    const end = closingBrace(text, start + 2)
    const m = end === -1 ? null : PLACEHOLDER_BODY.exec(text.slice(start + 2, end))
    if (m === null) {
      const name = /^[A-Za-z0-9_]*/.exec(text.slice(start + 2))![0]
      problem(`\${${name}${end === -1 ? ' is not closed' : '... is not a placeholder'}: write \${VAR} or \${VAR:-default}`)
      return ''
    }
    out += text.slice(at, start)
    at = end + 1
    const [, name, fallback] = m as unknown as [string, string, string | undefined]
    const value = env[name]
    if (value !== undefined && value !== '') {
      out += value
      took(name)
    } else if (fallback !== undefined) out += expand(fallback, env, problem, took)
    else problem(`environment variable ${name} is not set`)
  }
  return out + text.slice(at)
}

/** A value that is `$NAME` alone, NAME in a variable's usual capitals. */
const WHOLE_VARIABLE = /^\$([A-Z_][A-Z0-9_]*)$/
/** The fields whose whole value is a secret: a problem of theirs names the field, never any of the value. */
const SECRET_FIELDS = new Set(['/upstream/apiKey', '/metrics/token'])
const UNBRACED = 'a variable without braces is not filled in'
/** What a secret field, or a URL's password, that is `$NAME` alone is told (its value never repeated). */
export const UNBRACED_SECRET = `is $ and a name in capitals: write \${NAME}, ${UNBRACED} (a secret spelled so: give it through ` +
  'a ${VAR}, whose value is taken as it is)'

/**
 * The shell's and compose's `$VAR` written in the file: a value that is `$NAME` alone with NAME in a variable's usual
 * capitals, or holds `$NAME` of a variable the environment has. Kept as it is, it would become the upstream token or
 * the Redis password. Another `$` inside a value is text (a password may hold one, even one that is `$` and a word),
 * and is never repeated in a message. A secret (SECRET_FIELDS, a URL's password) is checked as a whole only, and
 * never quoted: a literal one may hold `$HOME!`.
 */
function unbracedVariable (text: string, env: NodeJS.ProcessEnv, path: string): string | undefined {
  if (!text.includes('$')) return undefined
  const field = fieldPath(path)
  if (SECRET_FIELDS.has(path)) return WHOLE_VARIABLE.test(text) ? `${field}: ${UNBRACED_SECRET}` : undefined
  let rest = text
  const url = parsedUrl(text)
  if (url !== null && url.password !== '') {
    if (WHOLE_VARIABLE.test(url.password)) return `${field}: its password ${UNBRACED_SECRET}`
    // The rest of the URL, without its password (one the parser wrote otherwise than the file: nothing more is read).
    const userinfo = `${url.protocol}//${url.username}:${url.password}@`
    rest = text.startsWith(userinfo) ? `${url.protocol}//${url.username}@${text.slice(userinfo.length)}` : ''
  }
  const whole = WHOLE_VARIABLE.exec(rest)
  if (whole !== null) return `${field}: write \${${whole[1]}}: ${UNBRACED}`
  for (const [, name] of rest.matchAll(/\$([A-Za-z_][A-Za-z0-9_]*)/g)) {
    if (env[name!] !== undefined) return `${field}: write \${${name}}: ${UNBRACED}`
  }
  return undefined
}

/** `text` read as a URL, or null where it is none. */
function parsedUrl (text: string): URL | null {
  try {
    return new URL(text)
  } catch {
    return null
  }
}

/**
 * Replaces placeholders in every string of the parsed tree; values never re-enter the YAML parser. Returns the new
 * tree, and fills `filled` with the JSON pointers of the strings that held a placeholder (only those may be read as
 * numbers/booleans), each with the variables whose values it took.
 */
function interpolate (node: unknown, env: NodeJS.ProcessEnv, path: string, problems: string[], filled: Map<string, string[]>): unknown {
  if (typeof node === 'string') {
    const unbraced = unbracedVariable(node, env, path)
    if (unbraced !== undefined) {
      problems.push(unbraced)
      return node
    }
    if (!node.includes('${')) return node
    const took: string[] = []
    filled.set(path, took)
    return expand(node, env, message => { problems.push(`${fieldPath(path)}: ${message}`) }, name => took.push(name))
  }
  if (Array.isArray(node)) return node.map((v, i) => interpolate(v, env, `${path}/${i}`, problems, filled))
  if (node !== null && typeof node === 'object') {
    return Object.fromEntries(Object.entries(node).map(([k, v]) =>
      [k, interpolate(v, env, `${path}/${k.replace(/~/g, '~0').replace(/\//g, '~1')}`, problems, filled)]))
  }
  return node
}

/** Reads a placeholder's string as the number or boolean the schema wants there; undefined if it is not one. */
function asType (value: string, type: unknown): number | boolean | undefined {
  const text = value.trim()
  if ((type === 'integer' || type === 'number') && /^-?\d+(\.\d+)?$/.test(text)) return Number(text)
  if (type === 'boolean' && (text === 'true' || text === 'false')) return text === 'true'
  return undefined
}

/** The parent object of a JSON pointer's target, and the target's key in it. */
function locate (root: unknown, pointer: string): { parent: Record<string, unknown>, key: string } {
  const parts = pointerParts(pointer)
  const key = parts.pop()!
  let parent = root as Record<string, unknown>
  for (const p of parts) parent = parent[p] as Record<string, unknown>
  return { parent, key }
}

/**
 * Validates; where a type error falls on a string that came from a placeholder, reads it as the wanted type and
 * validates again. Nothing else is ever coerced.
 */
function validateWithPlaceholders (candidate: unknown, filled: ReadonlyMap<string, unknown>): candidate is GatewayConfig {
  for (;;) {
    if (validate(candidate)) return true
    let changed = false
    for (const e of validate.errors ?? []) {
      if (e.keyword !== 'type' || !filled.has(e.instancePath)) continue
      const { parent, key } = locate(candidate, e.instancePath)
      const current = parent[key]
      const typed = typeof current === 'string' ? asType(current, e.params.type) : undefined
      if (typed === undefined) continue
      parent[key] = typed
      changed = true
    }
    if (!changed) return false
  }
}

/** The metrics' `client` label for a call without a valid key, and for a client a reload removed. */
export const RESERVED_CLIENT_IDS = ['none', 'other'] as const

function duplicateIds (clients: ClientConfig[]): string[] {
  const seen = new Map<string, number>()
  const problems: string[] = []
  clients.forEach((c, i) => {
    if ((RESERVED_CLIENT_IDS as readonly string[]).includes(c.id)) {
      problems.push(`clients[${i}].id: "${c.id}" is reserved (the metrics' client label for ${c.id === 'none' ? 'calls without a valid key' : 'clients no longer configured'})`)
    }
    const first = seen.get(c.id)
    if (first === undefined) seen.set(c.id, i)
    else problems.push(`clients[${i}].id: duplicates clients[${first}].id`)
  })
  return problems
}

/**
 * Whether an ISO 8601 time (the schema checked its form) names a real moment. Date.parse takes a day its month
 * does not have for a day of the next (2025-06-31 is July 1): a key would expire a day later than written.
 */
export function isTime (text: string): boolean {
  const [year, month, day] = text.slice(0, 10).split('-').map(Number) as [number, number, number]
  const leap = year % 4 === 0 && (year % 100 !== 0 || year % 400 === 0)
  const days = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1] ?? 0
  return day >= 1 && day <= days && !Number.isNaN(Date.parse(text))
}

/** Each client has exactly one key form; every digest belongs to one key; ids and times are sound. */
function keyProblems (clients: ClientConfig[]): string[] {
  const problems: string[] = []
  const digests = new Map<string, string>()
  clients.forEach((c, i) => {
    if ((c.keySha256 === undefined) === (c.keys === undefined)) {
      problems.push(`clients[${i}]: give either keySha256 or keys, not ${c.keySha256 === undefined ? 'neither' : 'both'}`)
    }
    const owned: Array<[string, string]> = c.keySha256 === undefined ? [] : [[`clients[${i}].keySha256`, c.keySha256]]
    const keyIds = new Set<string>()
    c.keys?.forEach((k, j) => {
      owned.push([`clients[${i}].keys[${j}].sha256`, k.sha256])
      if (keyIds.has(k.id)) problems.push(`clients[${i}].keys[${j}].id: duplicates another key id of this client`)
      keyIds.add(k.id)
      if (k.expiresAt !== undefined && !isTime(k.expiresAt)) {
        problems.push(`clients[${i}].keys[${j}].expiresAt: not a valid time`)
      }
    })
    for (const [at, digest] of owned) {
      const first = digests.get(digest)
      if (first === undefined) digests.set(digest, at)
      else problems.push(`${at}: duplicates ${first}`)
    }
  })
  return problems
}

/**
 * A file the config names for its contents (upstream.apiKeyFile, upstream.caFile), read whole, only when it is a
 * regular file (a symlink to one, as mounted secrets are, is followed). These are read synchronously, by
 * check-config, at start and on every reload: a FIFO would hold the process until someone writes to it, and a
 * device such as /dev/zero would never end. Opened with O_NONBLOCK (nothing to a regular file, and opening a FIFO
 * does not wait for a writer), then the open file's own type is checked (whatever is at the path by then).
 */
export function readRegularFile (file: string): Buffer {
  return readSmallFile(file, true)
}

/**
 * The most a config file (or a file it names) may hold: a config of 10,000 clients is about 2 MB. A larger one is a
 * wrong path (a log, a dump), and the YAML parser would take 20 to 40 times its size in memory to read it (a 30 MB scalar: over 600 MB).
 */
const MAX_FILE_BYTES = 8 * 1024 * 1024

/** A file past MAX_FILE_BYTES, not read further. */
export class FileTooLargeError extends Error {
  constructor () {
    super('it is larger than 8 MiB (a config of 10,000 clients is about 2 MB): is it the right file?')
  }
}

/** readRegularFile, or any file (`regularOnly` false: a pipe at start); past MAX_FILE_BYTES, an error saying so. */
function readSmallFile (file: string, regularOnly: boolean): Buffer {
  const fd = openSync(file, regularOnly ? fsConstants.O_RDONLY | fsConstants.O_NONBLOCK : fsConstants.O_RDONLY)
  try {
    if (regularOnly && !fstatSync(fd).isFile()) throw new Error('not a regular file (a FIFO, device, socket or directory)')
    const chunks: Buffer[] = []
    let total = 0
    for (;;) {
      const chunk = Buffer.allocUnsafe(64 * 1024)
      const n = readSync(fd, chunk, 0, chunk.length, null)
      if (n === 0) return Buffer.concat(chunks, total)
      total += n
      if (total > MAX_FILE_BYTES) throw new FileTooLargeError()
      chunks.push(chunk.subarray(0, n))
    }
  } finally {
    closeSync(fd)
  }
}

/** `NAME=value`, as an env file writes a variable (NAME is not quoted: it may be part of a token after all). */
const ENV_LINE = /^[A-Za-z_][A-Za-z0-9_]*=[^=]/

/**
 * Exactly one of upstream.apiKey and upstream.apiKeyFile. The file's token goes into `apiKey` (one trailing line
 * break, as secret files often end, is not part of it); the file's path is never part of a message's secret.
 */
function upstreamKey (upstream: { apiKey?: string, apiKeyFile?: string }): string[] {
  const { apiKey, apiKeyFile } = upstream
  if (apiKeyFile === undefined) return apiKey === undefined ? ['upstream.apiKey: is required (or upstream.apiKeyFile)'] : []
  if (apiKey !== undefined) return ['upstream: give either apiKey or apiKeyFile, not both']
  let text: string
  try {
    text = readRegularFile(apiKeyFile).toString('utf8').replace(/\r?\n$/, '')
  } catch (err) {
    return [`upstream.apiKeyFile: cannot read ${apiKeyFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`]
  }
  if (text === '') return ['upstream.apiKeyFile: the file is empty: it must hold the OhMyGPT token']
  if (!new RegExp(SECRET_PATTERN).test(text)) {
    return ['upstream.apiKeyFile: the file must hold the token alone: no spaces, control characters or further lines']
  }
  // An env file's line would go upstream whole as the token, refused on every call. (Not base64's `=` padding.)
  if (ENV_LINE.test(text)) return ['upstream.apiKeyFile: the file holds NAME=value (an env file\'s line?): it must hold the token alone']
  upstream.apiKey = text
  return []
}


const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[^-]*-----END CERTIFICATE-----/g

function readable (pem: string): boolean {
  try {
    return new X509Certificate(pem).raw.length > 0
  } catch {
    return false
  }
}

/**
 * A line the schema's pattern lets through and the URL parser refuses (a port over 65535, an IPv4 address with a
 * part over 255): the upstream client would throw building its pools, at start after the audit is opened. And a
 * line that is a host and /v1.
 */
function baseUrlProblems (urls: readonly string[]): string[] {
  return urls.flatMap((url, i) => {
    if (!URL.canParse(url)) return [`upstream.baseUrls[${i}]: not a valid URL (a port over 65535, or a host that is no host name or address?)`]
    // An SDK's base URL (`https://host/v1`), copied as it is: the gateway adds /v1 itself, so every call would be
    // answered 404 by the upstream, from a config that looked fine.
    if (/^\/v1\/*$/.test(new URL(url).pathname)) {
      return [`upstream.baseUrls[${i}]: the gateway adds /v1 itself, so calls would go to /v1/v1/conversations (404): give the line without the /v1`]
    }
    return []
  })
}

/**
 * upstream.caFile must hold PEM certificates, each readable: TLS passes over anything else in silence, and with
 * no CA it trusts, every call to the upstream would fail to verify (a 502 each) from a config that looked fine.
 */
function caFileProblems (file: string | undefined): string[] {
  if (file === undefined) return []
  let text: string
  try {
    text = readRegularFile(file).toString('latin1')
  } catch (err) {
    return [`upstream.caFile: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`]
  }
  const certificates = text.match(PEM_CERTIFICATE) ?? []
  if (certificates.length === 0) return [`upstream.caFile: ${file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`]
  const bad = certificates.findIndex(pem => !readable(pem))
  return bad === -1 ? [] : [`upstream.caFile: certificate ${bad + 1} in ${file} cannot be read`]
}

const STORE_URL_FORM = 'must be memory:// or redis[s]://[[user]:password@]host[:port][/db]'
const ENCODE_THE_PASSWORD = '(percent-encode / ? # @ : % in the password)'

/** Each trustProxy entry as Fastify will compile it (@fastify/proxy-addr): a bad one would stop the start later. */
function trustProxyProblems (trustProxy: false | readonly string[]): string[] {
  if (trustProxy === false) return []
  return trustProxy.flatMap((entry, i) => {
    try {
      proxyAddr.compile([entry])
      return []
    } catch (err) {
      return [`trustProxy[${i}]: ${(err as Error).message} (give an address, a CIDR such as 10.0.0.0/8, or loopback, linklocal, uniquelocal)`]
    }
  })
}

/** What is wrong with a redis:// store URL, in words that never repeat the URL (it may hold a password). */
function storeUrlProblems (url: string): string[] {
  if (url === 'memory://') return []
  const parsed = parsedUrl(url)
  if (parsed === null) return [`store.url: ${STORE_URL_FORM} ${ENCODE_THE_PASSWORD}`]
  // (a / ? or # in the password ends the host part before the host; in a password that also holds an @, after a
  // host read from the password, the rest, the real host with it, read as a path, a query or a fragment)
  if (parsed.hostname === '' || `${parsed.pathname}${parsed.search}${parsed.hash}`.includes('@')) {
    return [`store.url: ${STORE_URL_FORM} ${ENCODE_THE_PASSWORD}`]
  }
  if (!/^(\/\d{0,9})?$/.test(parsed.pathname)) return ['store.url: the path must be a database number, e.g. /0']
  if (parsed.search !== '' || parsed.hash !== '') return ['store.url: query options and fragments are not supported']
  // The Redis client decodes both, and throws at start on a % that begins no escape.
  try {
    decodeURIComponent(parsed.username)
    decodeURIComponent(parsed.password)
  } catch {
    return ['store.url: the user or password is not valid percent-encoding (write % as %25)']
  }
  return []
}

/** metrics.listen's `host:port` (`[::1]:port`; the schema checked its form) */
export function hostPort (listen: string): { host: string, port: number } {
  const at = listen.lastIndexOf(':')
  return { host: listen.slice(0, at).replace(/^\[(.*)\]$/, '$1'), port: Number(listen.slice(at + 1)) }
}

/** metrics.listen taking the port listen.host and listen.port take (start finds it too, by another name: preflight.ts) */
export const METRICS_ON_LISTEN_PORT = 'metrics.listen: its port is listen.port, on an address listen.host also takes; give the metrics a port of their own'

/**
 * Whether two listen hosts take a common address on one port: the same host, `::` (every address, IPv4 too, on a
 * dual-stack machine), or 0.0.0.0 beside an IPv4 address. Host names are left to the start, which resolves them.
 */
function sameAddresses (a: string, b: string): boolean {
  const anyV4 = (h: string) => h === '0.0.0.0'
  return a === b || a === '::' || b === '::' || (anyV4(a) && isIPv4(b)) || (anyV4(b) && isIPv4(a))
}

function deepFreeze<T> (value: T): T {
  if (value !== null && typeof value === 'object') {
    for (const v of Object.values(value)) deepFreeze(v)
    Object.freeze(value)
  }
  return value
}

/**
 * Problems with the variable named whose value is at fault: the file holds only its placeholder. (The name, never
 * the value, which may be a secret.)
 */
function withTheirVariables (problems: string[], filled: ReadonlyMap<string, readonly string[]>): string[] {
  const variables = new Map([...filled].filter(([, names]) => names.length > 0).map(([pointer, names]) => [fieldPath(pointer), names]))
  return problems.map(p => {
    const names = variables.get(p.slice(0, p.indexOf(':')))
    return names === undefined ? p : `${p} (its value came from ${names.join(', ')})`
  })
}

/** Validates an already-parsed config object (tests build these directly). */
export function parseConfig (raw: unknown, env: NodeJS.ProcessEnv = {}, source = '(object)'): GatewayConfig {
  const problems: string[] = []
  const filled = new Map<string, string[]>()
  // interpolate builds a fresh tree, so validation's defaults never touch the caller's object
  const candidate = interpolate(raw ?? {}, env, '', problems, filled)
  if (candidate !== null && typeof candidate === 'object') environmentSecrets.set(candidate, [env.AUDIT_HMAC_KEY])
  if (!validateWithPlaceholders(candidate, filled)) {
    // A field already reported as an unset variable is not reported again for being empty.
    const unset = new Set(problems.map(p => p.slice(0, p.indexOf(':'))))
    problems.push(...withTheirVariables(describeAll(validate.errors ?? []).filter(p => !unset.has(p.slice(0, p.indexOf(':')))), filled))
    // the schema cannot say "one of the two" plainly; say it here too, with the rest
    const upstream = (candidate as { upstream?: Record<string, unknown> }).upstream
    if (upstream !== null && typeof upstream === 'object' && !('apiKey' in upstream) && !('apiKeyFile' in upstream)) {
      problems.push('upstream.apiKey: is required (or upstream.apiKeyFile)')
    }
  } else {
    problems.push(...duplicateIds(candidate.clients), ...keyProblems(candidate.clients))
    problems.push(...upstreamKey(candidate.upstream))
    problems.push(...baseUrlProblems(candidate.upstream.baseUrls))
    problems.push(...caFileProblems(candidate.upstream.caFile))
    if (candidate.listen.headersTimeoutMs > candidate.listen.requestTimeoutMs) {
      problems.push('listen.headersTimeoutMs: must not be longer than listen.requestTimeoutMs')
    }
    problems.push(...storeUrlProblems(candidate.store.url))
    problems.push(...trustProxyProblems(candidate.trustProxy))
    const metricsAt = candidate.metrics.listen === undefined ? undefined : hostPort(candidate.metrics.listen)
    if (metricsAt !== undefined && metricsAt.port !== 0 && metricsAt.port === candidate.listen.port &&
      sameAddresses(metricsAt.host, candidate.listen.host)) {
      problems.push(METRICS_ON_LISTEN_PORT)
    }
  }
  if (problems.length > 0) throw new ConfigError(source, withoutSecrets([...new Set(problems)], candidate))
  return deepFreeze(candidate as GatewayConfig)
}

/** --config, else GATEWAY_CONFIG (empty is unset, as for a ${VAR}), else the default. */
export function resolveConfigPath (flag: string | undefined, env: NodeJS.ProcessEnv): string {
  return flag ?? (env.GATEWAY_CONFIG === '' ? undefined : env.GATEWAY_CONFIG) ?? DEFAULT_CONFIG_FILE
}

/**
 * The config file's text. A running gateway reads it again (a reload) from a regular file only: a FIFO nobody writes
 * to, or a device, would hold the event loop, and every call with it. At start (`--config <(envsubst < tpl)`, a
 * pipe) it is read as it comes.
 */
function configText (file: string, regularOnly: boolean): string {
  try {
    return readSmallFile(file, regularOnly).toString('utf8')
  } catch (err) {
    throw new ConfigError(file, [`cannot read the file: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`])
  }
}

function readConfigFile (file: string, regularOnly = false): unknown {
  const text = configText(file, regularOnly)
  try {
    // logLevel 'error': the parser's warnings (an unknown !tag) would be printed with the lines around them.
    return parseYaml(text, { logLevel: 'error' })
  } catch (err) {
    // The parser's message ends with the lines around the error, which may hold the token or a key: only its
    // first line (what and where) is kept.
    if (err instanceof YAMLParseError && err.code === 'MULTIPLE_DOCS') {
      // The parser's own words send the reader to a function of its API.
      const [line, col] = [err.linePos?.[0].line, err.linePos?.[0].col]
      throw new ConfigError(file, ['YAML: the file holds more than one document: the config is the first, and the "---" at ' +
        `line ${line}, column ${col} starts another; remove it (and what follows)`])
    }
    if (err instanceof YAMLParseError) throw new ConfigError(file, [`YAML: ${err.message.split('\n')[0]!.replace(/:$/, '')}`])
    // An unquoted value starting with * is read as an alias, and the error names it: the value itself. The parser
    // also stops aliases that would copy anchored values over and over (a "billion laughs"), with the same class.
    if (err instanceof ReferenceError) {
      throw new ConfigError(file, [/^Excessive alias count/.test(err.message)
        ? 'YAML: too many aliases (*name), which would copy anchored values over and over: write the values out'
        : 'YAML: an alias (*name) refers to no anchor set before it; a value that starts with * must be quoted'])
    }
    throw err
  }
}

/** `reload`: the running gateway reads the file again, only if it is a regular file (configText). */
export function loadConfig (file: string, env: NodeJS.ProcessEnv, { reload = false } = {}): GatewayConfig {
  return parseConfig(readConfigFile(file, reload), env, file)
}

/**
 * Only `audit.file` of a config file, for the audit commands: whoever verifies or searches the trail needs none
 * of the gateway's secrets (the upstream token, the keys' variables), so nothing else is read or required.
 */
export function loadAuditFile (file: string, env: NodeJS.ProcessEnv): string {
  const raw = readConfigFile(file) as { audit?: unknown } | null
  const audit = raw?.audit
  if (audit !== undefined && (audit === null || typeof audit !== 'object' || Array.isArray(audit))) {
    throw new ConfigError(file, ['audit: must be a map'])
  }
  const value = audit === undefined || !Object.hasOwn(audit, 'file') ? DEFAULT_AUDIT_FILE : (audit as { file?: unknown }).file
  const problems: string[] = []
  const filled = interpolate(value, env, '/audit/file', problems, new Map())
  if (problems.length === 0 && (typeof filled !== 'string' || filled === '')) problems.push('audit.file: must be a path or "-"')
  if (problems.length > 0) throw new ConfigError(file, problems)
  return filled as string
}
