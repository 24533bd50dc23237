// Bench child: the gateway as production runs it (startServer: the validated config, listen, signal handling),
// alone in its own process and event loop.
import { parseConfig } from '../dist/config.js'
import { startServer } from '../dist/server.js'
import { serveChild } from './child.js'

serveChild(async ({ config }) => {
  const app = await startServer(parseConfig(config, {}, '(bench)'))
  const { port } = app.server.address()
  return { url: `http://127.0.0.1:${port}` }
})
