// GET/HEAD /healthz: liveness, with the state of each upstream line (up, down while skipped, half-open on trial),
// of the audit trail and of the rate-limit store. 200 whatever they say (restarting would not fix a full disk or a
// down line); the body is for people and alerts.
// GET/HEAD /readyz: readiness, for a load balancer. 200 {"status":"ready"} only while this gateway should get
// traffic: listening, not draining (a shutdown has begun), at least one upstream line not skipped, the audit not
// refusing calls (audit.onFailure "closed" while records cannot be written), and the store not refusing them
// (store.onFailure "closed" while Redis is disconnected or refuses the bucket script). Otherwise 503 with the first
// reason in that order: "starting", "draining", "upstream_unavailable", "audit_unavailable", "store_unavailable".
// Probed every few seconds by orchestrators: not audited, not worth a log line each time.
import fp from 'fastify-plugin'
import type { RateLimitStore } from '../stores/rate-limit-store.js'
import type { Upstream } from '../upstream/client.js'

export interface HealthOptions {
  upstream: Upstream
  store: RateLimitStore
  /** store.onFailure is "closed": while the store is unavailable every API call gets 503 */
  storeRefuses: boolean
}

export type NotReady = 'starting' | 'draining' | 'upstream_unavailable' | 'audit_unavailable' | 'store_unavailable'

export default fp<HealthOptions>(async function health (app, { upstream, store, storeRefuses }) {
  let draining = false
  app.decorate('startDraining', () => { draining = true })

  const notReady = (): NotReady | null => {
    if (!app.server.listening) return 'starting'
    if (draining) return 'draining'
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
    handler: async () => ({
      status: 'ok',
      audit: app.auditState(),
      store: store.available() ? 'ok' : 'unavailable',
      upstream: upstream.statuses().map(s => ({ line: s.index, host: new URL(s.url).host, state: s.state, failures: s.failures, retryInMs: s.retryInMs }))
    })
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
