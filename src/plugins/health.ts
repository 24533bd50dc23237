// GET/HEAD /healthz: liveness, 200 {"status":"ok"} whatever the gateway's parts say (restarting would not fix a full
// disk or a down line). To a caller with the metrics token, also the state of each upstream line (up, down while
// skipped, half-open on trial), of the audit trail and of the rate-limit store, for people and alerts: not to
// anyone who can reach the API port (the lines' addresses; whether calls are being audited right now). The same
// details on metrics.listen's GET /healthz, the operators' own port.
// GET/HEAD /readyz: readiness, for a load balancer. 200 {"status":"ready"} only while this gateway should get
// traffic: not draining (a shutdown has begun), listening, at least one upstream line not skipped, the audit not
// refusing calls (audit.onFailure "closed" while records cannot be written), and the store not refusing them
// (store.onFailure "closed" while Redis is disconnected or refuses the bucket script). Otherwise 503 with the first
// reason in that order: "draining", "starting", "upstream_unavailable", "audit_unavailable", "store_unavailable".
// Probed every few seconds by orchestrators: not audited, not worth a log line each time.
import fp from 'fastify-plugin'
import type { RateLimitStore } from '../stores/rate-limit-store.js'
import type { Upstream } from '../upstream/client.js'
import type { LineState } from '../upstream/lines.js'
import { tokenCheck } from './metrics.js'

export interface HealthOptions {
  upstream: Upstream
  store: RateLimitStore
  /** store.onFailure is "closed": while the store is unavailable every API call gets 503 */
  storeRefuses: boolean
  /** metrics.token: /healthz's details are shown only to a caller presenting it (never, without one) */
  token?: string
}

/** /healthz's body for operators (the API port's callers see only the status). */
export interface HealthDetails {
  status: 'ok'
  audit: 'ok' | 'unavailable'
  store: 'ok' | 'unavailable'
  upstream: Array<{ line: number, host: string, state: LineState, failures: number, retryInMs: number | null }>
}

export type NotReady = 'draining' | 'starting' | 'upstream_unavailable' | 'audit_unavailable' | 'store_unavailable'

export default fp<HealthOptions>(async function health (app, { upstream, store, storeRefuses, token }) {
  let draining = false
  const seesDetails = token === undefined ? () => false : tokenCheck(token)
  const details = (): HealthDetails => ({
    status: 'ok',
    audit: app.auditState(),
    store: store.available() ? 'ok' : 'unavailable',
    upstream: upstream.statuses().map(s => ({ line: s.index, host: new URL(s.url).host, state: s.state, failures: s.failures, retryInMs: s.retryInMs }))
  })
  // (also served on metrics.listen, the operators' own port: plugins/metrics.ts)
  app.decorate('healthDetails', details)
  app.decorate('startDraining', () => { draining = true })

  const notReady = (): NotReady | null => {
    // Draining first: once accepting has stopped the server no longer listens, and a probe on a connection still
    // open would otherwise be told the gateway is starting.
    if (draining) return 'draining'
    if (!app.server.listening) return 'starting'
    if (!upstream.available) return 'upstream_unavailable'
    if (app.auditRefuses()) return 'audit_unavailable'
    if (storeRefuses && !store.available()) return 'store_unavailable'
    return null
  }

  app.route({
    method: ['GET', 'HEAD'], // HEAD: the same answer without a body (some probes use it)
    url: '/healthz',
    config: { internal: true },
    logLevel: 'warn',
    handler: async request => seesDetails(request.headers.authorization) ? details() : { status: 'ok' }
  })

  app.route({
    method: ['GET', 'HEAD'],
    url: '/readyz',
    config: { internal: true },
    logLevel: 'warn',
    handler: async (_request, reply) => {
      const reason = notReady()
      if (reason !== null) reply.code(503)
      return { status: reason ?? 'ready' }
    }
  })
}, { name: 'health', dependencies: ['audit'] })
