// Every response, gateway-made or proxied, carries the gateway's own request id. The upstream's x-request-id is
// left alone; the upstream gets ours as x-client-request-id (plugins/proxy.ts).
import { randomFillSync } from 'node:crypto'
import fp from 'fastify-plugin'
import { isCounting } from '../http/response.js'

export const REQUEST_ID_HEADER = 'x-gateway-request-id'

/** Random bytes for 256 ids, drawn from the CSPRNG at once and used 16 at a time. */
const pool = Buffer.alloc(16 * 256)
let taken = pool.length

/**
 * Fastify's genReqId: `gw_` and 128 random bits in hex, never taken from the client, so a client cannot forge an
 * audit trail. One id per call: cheaper than randomUUID with its dashes taken out.
 */
export function newRequestId (): string {
  if (taken === pool.length) {
    randomFillSync(pool)
    taken = 0
  }
  const id = `gw_${pool.toString('hex', taken, taken + 16)}`
  taken += 16
  return id
}

export default fp(async function requestId (app) {
  app.addHook('onRequest', (request, reply, done) => {
    reply.header(REQUEST_ID_HEADER, request.id)
    // (for an answer written on the socket itself, app.ts: a request timeout or malformed framing mid-call)
    if (isCounting(reply.raw)) reply.raw.requestId = request.id
    done()
  })
}, { name: 'request-id' })
