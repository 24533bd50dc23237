// Loads the gateway's YAML config: parse, fill ${VAR} / ${VAR:-default} from the environment, validate against
// one schema (which is also where the TypeScript type and the defaults come from), check what a schema cannot
// (unique ids and digests), and return a frozen object. No other module reads process.env.
import { readFileSync } from 'node:fs'
import { Type, type Static } from '@sinclair/typebox'
import { Ajv, type ErrorObject } from 'ajv'
import { parse as parseYaml, YAMLParseError } from 'yaml'

export const DEFAULT_CONFIG_FILE = 'config/gateway.yaml'

const Scope = Type.Union([Type.Literal('read'), Type.Literal('write'), Type.Literal('delete')])
export type Scope = Static<typeof Scope>

const Client = Type.Object({
  id: Type.String({ pattern: '^[a-z0-9._-]{1,64}$' }),
  keySha256: Type.String({ pattern: '^[0-9a-f]{64}$' }),
  scopes: Type.Array(Scope, { minItems: 1, uniqueItems: true }),
  rateLimit: Type.Object({
    requestsPerMinute: Type.Integer({ minimum: 1, default: 600 }),
    burst: Type.Integer({ minimum: 1, default: 60 })
  }, { additionalProperties: false, default: {} })
}, { additionalProperties: false })
export type ClientConfig = Static<typeof Client>

export const ConfigSchema = Type.Object({
  listen: Type.Object({
    host: Type.String({ minLength: 1, default: '0.0.0.0' }),
    port: Type.Integer({ minimum: 0, maximum: 65535, default: 8080 })
  }, { additionalProperties: false, default: {} }),
  log: Type.Object({
    level: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map(l => Type.Literal(l)),
      { default: 'info' })
  }, { additionalProperties: false, default: {} }),
  upstream: Type.Object({
    baseUrls: Type.Array(Type.String({ pattern: '^https?://[^\\s/?#]+(/[^\\s?#]*)?$' }), { minItems: 1 }),
    apiKey: Type.String({ minLength: 1 }),
    timeoutMs: Type.Integer({ minimum: 1, default: 60000 }),
    caFile: Type.Optional(Type.String({ minLength: 1 }))
  }, { additionalProperties: false }),
  limits: Type.Object({
    bodyBytes: Type.Integer({ minimum: 1, default: 4194304 })
  }, { additionalProperties: false, default: {} }),
  clients: Type.Array(Client, { default: [] }),
  audit: Type.Object({
    file: Type.String({ minLength: 1, default: './audit/audit.jsonl' }),
    fsync: Type.Union([Type.Literal('off'), Type.Literal('interval'), Type.Literal('every')], { default: 'interval' }),
    onFailure: Type.Union([Type.Literal('closed'), Type.Literal('open')], { default: 'closed' }),
    rotate: Type.Object({
      maxBytes: Type.Optional(Type.Integer({ minimum: 4096 })),
      daily: Type.Boolean({ default: false }),
      keep: Type.Integer({ minimum: 0, default: 0 }),
      gzip: Type.Boolean({ default: false })
    }, { additionalProperties: false, default: {} })
  }, { additionalProperties: false, default: {} }),
  metrics: Type.Object({
    listen: Type.Optional(Type.String({ pattern: '^(\\[[0-9A-Fa-f:.]+\\]|[^\\s:\\[\\]]+):[0-9]{1,5}$' })),
    token: Type.Optional(Type.String({ minLength: 16 }))
  }, { additionalProperties: false, default: {} })
}, { additionalProperties: false })

export type GatewayConfig = Static<typeof ConfigSchema>

export class ConfigError extends Error {
  readonly problems: string[]
  constructor (source: string, problems: string[]) {
    super(`invalid config ${source}:\n${problems.map(p => `  - ${p}`).join('\n')}`)
    this.name = 'ConfigError'
    this.problems = problems
  }
}

const ajv = new Ajv({ allErrors: true, useDefaults: true, coerceTypes: true, strict: true })
const validate = ajv.compile<GatewayConfig>(ConfigSchema)

/** `/clients/0/keySha256` → `clients[0].keySha256` */
function fieldPath (pointer: string): string {
  const parts = pointer.split('/').slice(1).map(p => p.replace(/~1/g, '/').replace(/~0/g, '~'))
  return parts.reduce((out, p) => /^\d+$/.test(p) ? `${out}[${p}]` : out ? `${out}.${p}` : p, '') || '(root)'
}

function describe (e: ErrorObject): string {
  const at = fieldPath(e.instancePath)
  switch (e.keyword) {
    case 'additionalProperties':
      return `${at === '(root)' ? '' : at + '.'}${String(e.params.additionalProperty)}: unknown key`
    case 'required':
      return `${at === '(root)' ? '' : at + '.'}${String(e.params.missingProperty)}: is required`
    case 'pattern':
      if (at.endsWith('.keySha256')) return `${at}: must be 64 lowercase hex characters (quote it in YAML)`
      return `${at}: must match ${String(e.params.pattern)}`
    default:
      return `${at}: ${e.message ?? 'is invalid'}`
  }
}

const PLACEHOLDER = /\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g

/** Replaces ${VAR} and ${VAR:-default} in every string of the parsed tree; values never re-enter the YAML parser. */
function interpolate (node: unknown, env: NodeJS.ProcessEnv, path: string, problems: string[]): unknown {
  if (typeof node === 'string') {
    return node.replace(PLACEHOLDER, (_m, name: string, fallback: string | undefined) => {
      const value = env[name]
      if (value !== undefined && value !== '') return value
      if (fallback !== undefined) return fallback
      problems.push(`${path || '(root)'}: environment variable ${name} is not set`)
      return ''
    })
  }
  if (Array.isArray(node)) return node.map((v, i) => interpolate(v, env, `${path}[${i}]`, problems))
  if (node !== null && typeof node === 'object') {
    return Object.fromEntries(Object.entries(node).map(([k, v]) =>
      [k, interpolate(v, env, path ? `${path}.${k}` : k, problems)]))
  }
  return node
}

function duplicates (clients: ClientConfig[], field: 'id' | 'keySha256'): string[] {
  const seen = new Map<string, number>()
  const problems: string[] = []
  clients.forEach((c, i) => {
    const first = seen.get(c[field])
    if (first === undefined) seen.set(c[field], i)
    else problems.push(`clients[${i}].${field}: duplicates clients[${first}].${field}`)
  })
  return problems
}

function unreadable (file: string | undefined, path: string): string[] {
  if (file === undefined) return []
  try {
    readFileSync(file)
    return []
  } catch (err) {
    return [`${path}: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`]
  }
}

function deepFreeze<T> (value: T): T {
  if (value !== null && typeof value === 'object') {
    for (const v of Object.values(value)) deepFreeze(v)
    Object.freeze(value)
  }
  return value
}

/** Validates an already-parsed config object (tests build these directly). */
export function parseConfig (raw: unknown, env: NodeJS.ProcessEnv = {}, source = '(object)'): GatewayConfig {
  const problems: string[] = []
  // interpolate builds a fresh tree, so validation's defaults never touch the caller's object
  const candidate = interpolate(raw ?? {}, env, '', problems)
  if (!validate(candidate)) {
    // A field already reported as an unset variable is not reported again for being empty.
    const unset = new Set(problems.map(p => p.slice(0, p.indexOf(':'))))
    problems.push(...(validate.errors ?? []).map(describe).filter(p => !unset.has(p.slice(0, p.indexOf(':')))))
  } else {
    problems.push(...duplicates(candidate.clients, 'id'), ...duplicates(candidate.clients, 'keySha256'))
    problems.push(...unreadable(candidate.upstream.caFile, 'upstream.caFile'))
  }
  if (problems.length > 0) throw new ConfigError(source, [...new Set(problems)])
  return deepFreeze(candidate as GatewayConfig)
}

export function resolveConfigPath (flag: string | undefined, env: NodeJS.ProcessEnv): string {
  return flag ?? env.GATEWAY_CONFIG ?? DEFAULT_CONFIG_FILE
}

export function loadConfig (file: string, env: NodeJS.ProcessEnv): GatewayConfig {
  let text: string
  try {
    text = readFileSync(file, 'utf8')
  } catch (err) {
    throw new ConfigError(file, [`cannot read the file: ${(err as NodeJS.ErrnoException).code ?? String(err)}`])
  }
  let raw: unknown
  try {
    raw = parseYaml(text)
  } catch (err) {
    if (err instanceof YAMLParseError) throw new ConfigError(file, [`YAML: ${err.message}`])
    throw err
  }
  return parseConfig(raw, env, file)
}
