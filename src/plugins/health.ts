// GET/HEAD /healthz: liveness, with the state of each upstream line (up, down while skipped, half-open on trial)
// and of the audit trail. 200 whatever they say (restarting would not fix a full disk or a down line); the body is
// for people and alerts. Probed every few seconds by orchestrators: not audited, not worth a log line each time.
import fp from 'fastify-plugin'
import type { Upstream } from '../upstream/client.js'

export interface HealthOptions {
  upstream: Upstream
}

export default fp<HealthOptions>(async function health (app, { upstream }) {
  app.route({
    method: ['GET', 'HEAD'], // HEAD: the same answer without a body (some probes use it)
    url: '/healthz',
    config: { internal: true },
    logLevel: 'warn',
    handler: async () => ({
      status: 'ok',
      audit: app.auditState(),
      upstream: upstream.statuses().map(s => ({ line: s.index, host: new URL(s.url).host, state: s.state, failures: s.failures, retryInMs: s.retryInMs }))
    })
  })
}, { name: 'health', dependencies: ['audit'] })
