import fp from 'fastify-plugin'

export default fp(async function health (app) {
  app.get('/healthz', { config: { internal: true } }, async () => ({ status: 'ok' }))
}, { name: 'health' })
