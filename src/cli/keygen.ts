// `ohmygpt-gateway keygen <client-id> [--key-id ID]`: a new key, shown once, and the config entry holding only its
// digest: the single-key form (keySha256), or with --key-id the rotating form (keys:), whose entry can also be
// added beside a client's current key to rotate it without downtime.
import { parseArgs } from 'node:util'
import { RESERVED_CLIENT_IDS } from '../config.js'
import { generateKey, keyDigest } from '../keys.js'
import { UsageError } from './common.js'

/** The pattern of clients[].keys[].id in the config schema. */
const KEY_ID = /^[A-Za-z0-9._-]{1,64}$/

export function keygen (args: string[]): void {
  const { values, positionals } = parseArgs({ args, options: { 'key-id': { type: 'string' } }, allowPositionals: true, strict: true })
  const id = positionals[0]
  if (id === undefined || !/^[a-z0-9._-]{1,64}$/.test(id) || positionals.length > 1) {
    throw new UsageError('keygen takes one client id matching ^[a-z0-9._-]{1,64}$')
  }
  // The config refuses these ids (the metrics' client labels): a key made for one could never be used.
  if ((RESERVED_CLIENT_IDS as readonly string[]).includes(id)) {
    throw new UsageError(`the client id "${id}" is reserved (a label of the metrics): choose another`)
  }
  const keyId = values['key-id']
  if (keyId !== undefined && !KEY_ID.test(keyId)) throw new UsageError(`--key-id must match ${KEY_ID.source}`)
  const key = generateKey()
  const digest = keyDigest(key)
  // Quoted, as the key id below: a client id like 2024, 1e3, null or true would otherwise be read as no string.
  const quotedId = `"${id}"`
  console.log(`# key for ${id} (shown once; give it to the team, store only the digest below):
${key}
`)
  if (keyId === undefined) {
    console.log(`# add under clients: in the gateway config
  - id: ${quotedId}
    keySha256: "${digest}"
    scopes: [read, write, delete]
    rateLimit: { requestsPerMinute: 600, burst: 60 }`)
    return
  }
  // Quoted: a key id like 2025-06 or 1 would otherwise be read as a date or a number.
  const entry = `{ id: "${keyId}", sha256: "${digest}" }`
  console.log(`# to rotate the key of ${id}: add this line under its keys: beside the current key (a client still on
# keySha256 moves that digest into keys: first, as { id: "old", sha256: "<its digest>" }), give the current key
# an expiresAt (e.g. expiresAt: "2030-01-31T00:00:00Z") or remove it once the team uses the new one, and reload:
# kill -HUP <gateway pid>
      - ${entry}

# or, for a new client, add under clients: in the gateway config
  - id: ${quotedId}
    keys:
      - ${entry}
    scopes: [read, write, delete]
    rateLimit: { requestsPerMinute: 600, burst: 60 }`)
}
