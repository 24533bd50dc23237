// Key (401) → ids (400) → scope (403), in that order: an unauthenticated caller learns nothing about ids or
// scopes. Keys are looked up by their sha256 digest, so the gateway holds no key and the lookup takes the same
// path for every wrong key, whatever its shape.
import fp from 'fastify-plugin'
import type { ClientConfig } from '../config.js'
import { InsufficientScopeError, InvalidApiKeyError, InvalidIdError } from '../errors.js'
import { keyDigest } from '../keys.js'
import { invalidId } from '../operations.js'

export interface AuthOptions {
  clients: readonly ClientConfig[]
}

const BEARER = /^Bearer +(\S+) *$/i

export default fp<AuthOptions>(async function auth (app, opts) {
  const byDigest = new Map(opts.clients.map(c => [c.keySha256, c]))

  function authenticate (header: string | undefined): ClientConfig {
    const key = BEARER.exec(header ?? '')?.[1]
    const client = byDigest.get(keyDigest(key ?? ''))
    if (key === undefined || client === undefined) throw new InvalidApiKeyError()
    return client
  }

  app.decorateRequest('client', null)

  app.addHook('onRequest', async (request) => {
    const operation = request.operation
    if (operation === null) return
    const client = authenticate(request.headers.authorization)
    request.client = client

    const param = invalidId(operation)
    if (param !== null) {
      const err = new InvalidIdError(param)
      err.param = param
      throw err
    }

    if (!client.scopes.includes(operation.scope)) {
      throw new InsufficientScopeError(operation.scope, operation.action)
    }
  })
}, { name: 'auth', dependencies: ['router'] })
