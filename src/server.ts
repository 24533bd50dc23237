// Process concerns only: build the app from a loaded config, listen, and close gracefully on SIGTERM/SIGINT:
// stop accepting, let in-flight calls finish up to a deadline, flush the audit file, exit. SIGUSR2 reopens the
// audit file (after an outside logrotate moved it).
import type { FastifyInstance } from 'fastify'
import { buildApp, type AppDependencies } from './app.js'
import type { GatewayConfig } from './config.js'
import { auditDirectoryProblem, describeListenError, StartupError } from './preflight.js'

/** Longest a shutdown waits for in-flight calls before it stops anyway. */
const DRAIN_DEADLINE_MS = 30_000
/** After a complete close, the process exits by itself; if something still holds it (a stdout nobody reads), this. */
const EXIT_GRACE_MS = 2_000

export async function startServer (config: GatewayConfig, deps: Pick<AppDependencies, 'auditHmacKey'> = {}): Promise<FastifyInstance> {
  const auditProblem = auditDirectoryProblem(config.audit.file)
  if (auditProblem !== null) throw new StartupError(auditProblem)
  const app = await buildApp(config, deps)
  let draining = false

  // Keep-alive sockets that go idle during the drain would otherwise stay open for the client's timeout.
  app.addHook('onSend', async (_request, reply) => {
    if (draining) reply.header('connection', 'close')
  })

  const { host, port } = config.listen
  try {
    await app.listen({ host, port })
  } catch (err) {
    await app.close()
    throw new StartupError(describeListenError(host, port, err as NodeJS.ErrnoException))
  }

  const shutdown = (signal: NodeJS.Signals) => {
    if (draining) return
    draining = true
    app.log.info({ signal }, 'shutting down: draining in-flight requests')
    const deadline = setTimeout(() => {
      app.log.warn('drain deadline reached; closing remaining connections')
      app.server.closeAllConnections()
    }, DRAIN_DEADLINE_MS).unref()
    app.close().then(() => {
      clearTimeout(deadline)
      app.log.info('closed')
      process.exitCode = 0
      setTimeout(() => process.exit(), EXIT_GRACE_MS).unref()
    }, (err: unknown) => {
      app.log.error({ err }, 'error while closing')
      process.exitCode = 1
    })
  }
  process.once('SIGTERM', shutdown)
  process.once('SIGINT', shutdown)
  process.on('SIGUSR2', () => {
    app.log.info('SIGUSR2: reopening the audit file')
    app.auditReopen()
  })
  return app
}
