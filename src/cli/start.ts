// `ohmygpt-gateway start [--config FILE]`: run the gateway until a signal stops it.
import { loadConfig } from '../config.js'
import { startServer } from '../server.js'
import { auditHmacKey, configPathFrom } from './common.js'

export async function start (args: string[]): Promise<void> {
  const config = loadConfig(configPathFrom(args), process.env)
  await startServer(config, { auditHmacKey: auditHmacKey(process.env) })
}
