import fp from 'fastify-plugin'

export default fp(async function health (app) {
  // Probed every few seconds by orchestrators: not worth a log line each time.
  // HEAD too (some probes use it): the same answer without a body.
  app.route({
    method: ['GET', 'HEAD'],
    url: '/healthz',
    config: { internal: true },
    logLevel: 'warn',
    handler: async () => ({ status: 'ok' })
  })
}, { name: 'health' })
