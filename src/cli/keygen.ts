// `ohmygpt-gateway keygen <client-id>`: a new key, shown once, and the config entry holding only its digest.
import { parseArgs } from 'node:util'
import { generateKey, keyDigest } from '../keys.js'
import { UsageError } from './common.js'

export function keygen (args: string[]): void {
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
