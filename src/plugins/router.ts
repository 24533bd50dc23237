// Route match, the first check: a path outside the eight operations is 404, a known path with another method
// is 405 with Allow. It runs as an onRequest hook for matched and unmatched routes alike, on the raw target.
import fp from 'fastify-plugin'
import { MethodNotAllowedError, UnknownRouteError } from '../errors.js'
import { matchOperation, rawPath } from '../operations.js'

export default fp(async function router (app) {
  app.decorateRequest('operation', null)

  app.addHook('onRequest', async (request, reply) => {
    if (request.routeOptions.config.internal === true) return
    const match = matchOperation(request.method, request.raw.url ?? '')
    if (match.kind === 'operation') {
      request.operation = match.operation
      return
    }
    if (match.kind === 'method_not_allowed') {
      reply.header('allow', match.allow)
      throw new MethodNotAllowedError(request.method, rawPath(request.raw.url ?? ''))
    }
    throw new UnknownRouteError(request.method, rawPath(request.raw.url ?? ''))
  })

  // Reached only by a target the matcher accepted but Fastify's router did not (none is known); stay closed.
  app.setNotFoundHandler(async (request) => {
    throw new UnknownRouteError(request.method, rawPath(request.raw.url ?? ''))
  })
}, { name: 'router' })
