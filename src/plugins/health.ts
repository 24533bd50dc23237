import fp from 'fastify-plugin'

export default fp(async function health (app) {
  // Probed every few seconds by orchestrators: not worth a log line each time.
  app.get('/healthz', { config: { internal: true }, logLevel: 'warn' }, async () => ({ status: 'ok' }))
}, { name: 'health' })
