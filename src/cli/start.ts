// `ohmygpt-gateway start [--config FILE]`: run the gateway until a signal stops it.
import { loadConfig } from '../config.js'
import { startServer } from '../server.js'
import { configPathFrom } from './common.js'

export async function start (args: string[]): Promise<void> {
  await startServer(loadConfig(configPathFrom(args), process.env))
}
