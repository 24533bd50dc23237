// Ids and query (400) → scope (403), after the key and the rate limit: every authenticated call, invalid or out of
// scope ones included, has taken its token by now. Ids are checked on the raw path segment, a GET's query against
// the parameters its route takes (operations.ts).
import fp from 'fastify-plugin'
import { InsufficientScopeError, InvalidIdError, InvalidRequestError, UnknownParameterError, type GatewayError } from '../errors.js'
import { invalidId, queryProblem, type QueryProblem } from '../operations.js'

function queryError (problem: QueryProblem): GatewayError {
  if (problem.kind === 'fragment') return new InvalidRequestError('the request target holds a fragment (#...), which is never sent.')
  const err = problem.kind === 'unknown'
    ? new UnknownParameterError(problem.param)
    : new InvalidRequestError(problem.kind === 'repeated'
      ? `the query parameter '${problem.param}' is given more than once.`
      : `the query parameter '${problem.param}' must be true or false.`)
  err.param = problem.param
  return err
}

export default fp(async function scope (app) {
  app.addHook('onRequest', (request, _reply, done) => {
    const operation = request.operation
    const client = request.client
    if (operation === null || client === null) {
      done()
      return
    }
    const param = invalidId(operation)
    if (param !== null) {
      const err = new InvalidIdError(param)
      err.param = param
      done(err)
      return
    }
    const problem = queryProblem(operation, request.originalUrl)
    if (problem !== null) {
      done(queryError(problem))
      return
    }
    if (!client.scopes.includes(operation.scope)) {
      done(new InsufficientScopeError(operation.scope, operation.action))
      return
    }
    done()
  })
}, { name: 'scope', dependencies: ['rate-limit'] })
