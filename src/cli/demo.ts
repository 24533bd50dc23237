// `ohmygpt-gateway demo [--port N]`: the gateway in front of a built-in fake OhMyGPT, with a fresh demo key.
import type { AddressInfo } from 'node:net'
import { parseArgs } from 'node:util'
import { parseConfig } from '../config.js'
import { generateKey, keyDigest } from '../keys.js'
import { startServer } from '../server.js'
import { UsageError } from './common.js'

export async function demo (args: string[]): Promise<void> {
  const given = parseArgs({ args, options: { port: { type: 'string' } }, strict: true }).values.port ?? '8080'
  // Number('') is 0 (any free port) and Number(' 8080') 8080: only digits are a port here.
  const port = /^\d{1,5}$/.test(given) ? Number(given) : NaN
  if (!(port <= 65535)) throw new UsageError('--port takes a port number from 0 to 65535')
  const { startFakeOhMyGPT } = await import('../demo/fake-ohmygpt.js')
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
  const address = app.server.address() as AddressInfo | null
  if (address === null) return // (stopped while starting: Ctrl-C)
  const url = `http://127.0.0.1:${address.port}`
  console.error(`
ohmygpt-gateway demo: ${url} in front of a fake OhMyGPT at ${fake.url}
Authorization: Bearer ${key}

curl -s ${url}/v1/conversations -H 'Authorization: Bearer ${key}' -H 'Content-Type: application/json' -d '{"metadata":{"topic":"demo"}}'

Audit records are printed on stdout. Ctrl-C stops.
`)
}
