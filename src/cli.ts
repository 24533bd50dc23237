#!/usr/bin/env node
// The ohmygpt-gateway command: start, keygen, check-config, demo. Each command is a function of its arguments;
// errors set process.exitCode instead of exiting, so output is flushed.
import type { AddressInfo } from 'node:net'
import { parseArgs } from 'node:util'
import { ConfigError, loadConfig, parseConfig, resolveConfigPath } from './config.js'
import { generateKey, keyDigest } from './keys.js'
import { startServer } from './server.js'

const USAGE = `usage: ohmygpt-gateway <command>

commands:
  start [--config FILE]          run the gateway (config: --config, else $GATEWAY_CONFIG, else config/gateway.yaml)
  keygen <client-id>             print a new client key (once) and the YAML entry holding its sha256
  check-config [--config FILE]   validate a config file; exit 1 listing every bad field
  demo [--port N]                run the gateway on 127.0.0.1:8080 (or N) in front of a built-in fake OhMyGPT, with a demo key
`

function configFlag (args: string[]): string | undefined {
  return parseArgs({ args, options: { config: { type: 'string', short: 'c' } }, strict: true }).values.config
}

async function start (args: string[]): Promise<void> {
  const file = resolveConfigPath(configFlag(args), process.env)
  await startServer(loadConfig(file, process.env))
}

function checkConfig (args: string[]): void {
  const file = resolveConfigPath(configFlag(args), process.env)
  const config = loadConfig(file, process.env)
  console.log(`${file}: ok (${config.clients.length} client${config.clients.length === 1 ? '' : 's'})`)
}

function keygen (args: string[]): void {
  const { positionals } = parseArgs({ args, allowPositionals: true, strict: true })
  const id = positionals[0]
  if (id === undefined || !/^[a-z0-9._-]{1,64}$/.test(id) || positionals.length > 1) {
    throw new UsageError('keygen takes one client id matching ^[a-z0-9._-]{1,64}$')
  }
  const key = generateKey()
  console.log(`# key for ${id} (shown once; give it to the team, store only the digest below):
${key}

# add under clients: in the gateway config
  - id: ${id}
    keySha256: "${keyDigest(key)}"
    scopes: [read, write, delete]
    rateLimit: { requestsPerMinute: 600, burst: 60 }`)
}

async function demo (args: string[]): Promise<void> {
  const port = Number(parseArgs({ args, options: { port: { type: 'string' } }, strict: true }).values.port ?? 8080)
  const { startFakeOhMyGPT } = await import('./demo/fake-ohmygpt.js')
  const upstreamToken = 'sk-demo-upstream-token'
  const fake = await startFakeOhMyGPT({ apiKey: upstreamToken })
  fake.server.unref() // it lives as long as the gateway does
  const key = generateKey()
  const config = parseConfig({
    listen: { host: '127.0.0.1', port },
    log: { level: 'warn' }, // stdout carries the audit records
    upstream: { baseUrls: [fake.url], apiKey: upstreamToken },
    clients: [{ id: 'demo', keySha256: keyDigest(key), scopes: ['read', 'write', 'delete'] }],
    audit: { file: '-' }
  }, {}, '(demo)')
  const app = await startServer(config)
  const url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  console.error(`
ohmygpt-gateway demo: ${url} in front of a fake OhMyGPT at ${fake.url}
Authorization: Bearer ${key}

curl -s ${url}/v1/conversations -H 'Authorization: Bearer ${key}' -H 'Content-Type: application/json' -d '{"metadata":{"topic":"demo"}}'

Audit records are printed on stdout. Ctrl-C stops.
`)
}

class UsageError extends Error {}

const COMMANDS: Record<string, (args: string[]) => unknown> = {
  start,
  'check-config': checkConfig,
  keygen,
  demo
}

async function main (argv: string[]): Promise<void> {
  const [name, ...args] = argv
  const command = name === undefined ? undefined : COMMANDS[name]
  if (name === '--help' || name === '-h' || name === 'help') {
    console.log(USAGE)
    return
  }
  if (command === undefined) {
    console.error(name === undefined ? USAGE : `unknown command "${name}"\n\n${USAGE}`)
    process.exitCode = 1
    return
  }
  try {
    await command(args)
  } catch (err) {
    if (err instanceof ConfigError || err instanceof UsageError || (err as NodeJS.ErrnoException).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`ohmygpt-gateway ${name}: ${(err as Error).message}`)
    } else {
      console.error(`ohmygpt-gateway ${name}: ${(err as Error).stack ?? String(err)}`)
    }
    process.exitCode = 1
  }
}

await main(process.argv.slice(2))
