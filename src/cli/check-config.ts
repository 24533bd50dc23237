// `ohmygpt-gateway check-config [--config FILE]`: validate a config the way `start` would load it.
import { loadConfig } from '../config.js'
import { configPathFrom } from './common.js'

export function checkConfig (args: string[]): void {
  const file = configPathFrom(args)
  const config = loadConfig(file, process.env)
  console.log(`${file}: ok (${config.clients.length} client${config.clients.length === 1 ? '' : 's'})`)
}
