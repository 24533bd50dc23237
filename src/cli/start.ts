// `ohmygpt-gateway start [--config FILE] [--watch]`: run the gateway until a signal stops it. SIGHUP reloads the
// config file; with --watch, so does a change of the file.
import { loadConfig, resolveConfigPath } from '../config.js'
import { startServer } from '../server.js'
import { auditHmacKey, CONFIG_OPTION, optionsOf } from './common.js'

export async function start (args: string[]): Promise<void> {
  const values = optionsOf(args, { ...CONFIG_OPTION, watch: { type: 'boolean' } })
  const file = resolveConfigPath(values.config, process.env)
  const config = loadConfig(file, process.env)
  // One turn of the event loop before anything is opened: a stop that came while the code loaded (which Node 24 does
  // without turning it) or while the config was read is answered now, at once (src/start-signals.ts).
  await new Promise(resolve => setImmediate(resolve))
  await startServer(config, { auditHmacKey: auditHmacKey(process.env) }, { configFile: file, env: process.env, watch: values.watch === true })
}
