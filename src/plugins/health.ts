import fp from 'fastify-plugin'

export default fp(async function health (app) {
  // Probed every few seconds by orchestrators: not worth a log line each time. Liveness: 200 whatever the audit
  // says (restarting would not fix a full disk), and the audit's state in the body for people and alerts.
  app.get('/healthz', { config: { internal: true }, logLevel: 'warn' }, async () => ({ status: 'ok', audit: app.auditState() }))
}, { name: 'health', dependencies: ['audit'] })
