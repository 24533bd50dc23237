// `ohmygpt-gateway check-config [--config FILE]`: validate a config the way `start` would load it, and check
// what it needs from this machine (the listen address, the audit directory).
import { ConfigError, loadConfig } from '../config.js'
import { preflight } from '../preflight.js'
import { configPathFrom } from './common.js'

export async function checkConfig (args: string[]): Promise<void> {
  const file = configPathFrom(args)
  const config = loadConfig(file, process.env)
  const problems = await preflight(config)
  if (problems.length > 0) throw new ConfigError(file, problems)
  console.log(`${file}: ok (${config.clients.length} client${config.clients.length === 1 ? '' : 's'})`)
}
