// GET/HEAD /healthz: liveness, with the state of each upstream line (up, down while skipped, half-open on trial)
// and of the audit trail. 200 whatever they say (restarting would not fix a full disk or a down line); the body is
// for people and alerts.
// GET/HEAD /readyz: readiness, for a load balancer. 200 {"status":"ready"} only while this gateway should get
// traffic: listening, not draining (a shutdown has begun), at least one upstream line not skipped, and the audit
// not refusing calls (audit.onFailure "closed" while records cannot be written). Otherwise 503 with the first
// reason in that order: "starting", "draining", "upstream_unavailable", "audit_unavailable".
// Probed every few seconds by orchestrators: not audited, not worth a log line each time.
import fp from 'fastify-plugin';
export default fp(async function health(app, { upstream }) {
    let draining = false;
    app.decorate('startDraining', () => { draining = true; });
    const notReady = () => {
        if (!app.server.listening)
            return 'starting';
        if (draining)
            return 'draining';
        if (!upstream.available)
            return 'upstream_unavailable';
        if (app.auditRefuses())
            return 'audit_unavailable';
        return null;
    };
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
    });
    app.route({
        method: ['GET', 'HEAD'],
        url: '/readyz',
        config: { internal: true },
        logLevel: 'warn',
        handler: async (_request, reply) => {
            const reason = notReady();
            if (reason !== null)
                reply.code(503);
            return { status: reason ?? 'ready' };
        }
    });
}, { name: 'health', dependencies: ['audit'] });
//# sourceMappingURL=health.js.map