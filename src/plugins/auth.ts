// Key (401), the first check after the route: an unauthenticated caller learns nothing about ids, scopes or
// limits. Failed key checks are counted per source address: past limits.authFailuresPerMinute, that address's
// failing attempts get 429 too_many_auth_failures (a valid key from the same address, behind the same NAT, still
// works). The count is kept per address only, bounded, and never per presented key.
import fp from 'fastify-plugin'
import type { ClientDirectory } from '../clients.js'
import { InvalidApiKeyError, retryAfterSeconds, TooManyAuthFailuresError } from '../errors.js'
import { MemoryStore } from '../stores/memory.js'
import { formatDuration } from './rate-limit.js'
import { clientIp } from '../http/address.js'

export interface AuthOptions {
  directory: ClientDirectory
  /** failed key checks allowed per source address and minute */
  failuresPerMinute: () => number
}

const BEARER = /^Bearer +(\S+) *$/i

/**
 * The key of a request's one `Authorization: Bearer` header. Node keeps the first of two and drops the second: a
 * request with two is refused like one with none (which of two keys a call is made with is not for the gateway to
 * guess, nor for a proxy in front of it, which may read the other).
 */
function bearerKey (header: string | undefined, rawHeaders: string[]): string | undefined {
  if (header === undefined) return undefined
  let seen = 0
  for (let i = 0; i < rawHeaders.length; i += 2) {
    const name = rawHeaders[i]!
    if (name.length === 13 && name.toLowerCase() === 'authorization' && ++seen > 1) return undefined
  }
  return BEARER.exec(header)?.[1]
}

export default fp<AuthOptions>(async function auth (app, { directory, failuresPerMinute }) {
  const failures = new MemoryStore({ max: 10_000 })

  app.decorateRequest('client', null)
  app.decorateRequest('keyId', null)
  app.decorateRequest('expiredKey', null)

  // Callback style (it runs on every call); a thrown refusal is the hook's error.
  app.addHook('onRequest', (request, _reply, done) => {
    if (request.operation === null) {
      done()
      return
    }
    const key = bearerKey(request.headers.authorization, request.raw.rawHeaders)
    const holder = key === undefined ? null : directory.find(key)
    if (holder !== null) {
      request.client = holder.client
      request.keyId = holder.keyId
      done()
      return
    }
    // The same refusal as an unknown key; the audit record names whose key it was, so that ops see who still
    // sends a key past its expiresAt.
    const expired = key === undefined ? null : directory.expired(key)
    if (expired !== null) request.expiredKey = { clientId: expired.client.id, keyId: expired.keyId }
    const perMinute = failuresPerMinute()
    const counted = failures.take(clientIp(request), { requestsPerMinute: perMinute, burst: perMinute })
    if (counted.allowed) throw new InvalidApiKeyError()
    const err = new TooManyAuthFailuresError(formatDuration(counted.retryAfterMs))
    // A wrong key stays wrong: the SDKs would wait out retry-after and send it again (a 429 is retried).
    err.headers = { 'retry-after': retryAfterSeconds(counted.retryAfterMs), 'x-should-retry': 'false' }
    throw err
  })
}, { name: 'auth', dependencies: ['router'] })
