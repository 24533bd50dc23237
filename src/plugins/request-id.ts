// Every response, gateway-made or proxied, carries the gateway's own request id. The upstream's x-request-id is
// left alone; the upstream gets ours as x-client-request-id (plugins/proxy.ts).
import { randomUUID } from 'node:crypto'
import fp from 'fastify-plugin'

export const REQUEST_ID_HEADER = 'x-gateway-request-id'

/** Fastify's genReqId: never taken from the client, so a client cannot forge an audit trail. */
export function newRequestId (): string {
  return `gw_${randomUUID().replaceAll('-', '')}`
}

export default fp(async function requestId (app) {
  app.addHook('onRequest', (request, reply, done) => {
    reply.header(REQUEST_ID_HEADER, request.id)
    done()
  })
}, { name: 'request-id' })
