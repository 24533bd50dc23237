// The gateway as production starts it: the raw config validated by parseConfig, then startServer (listen,
// signal handling, graceful drain), from the same sources as dist/.
import type { AddressInfo } from 'node:net'
import { parseConfig } from '../src/config.js'
import { startServer } from '../src/server.js'

export async function startGateway ({ config }: { config: unknown }): Promise<{ url: string }> {
  const app = await startServer(parseConfig(config, {}, '(bench)'))
  return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}` }
}
