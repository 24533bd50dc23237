// `ohmygpt-gateway check-config [--config FILE]`: validate a config the way `start` would load it, and check
// what it needs from this machine (the listen address, the audit directory), and the AUDIT_HMAC_KEY in the
// environment, which `start` refuses as it does a bad field (too short, a secret file's trailing newline).
import { ConfigError, loadConfig } from '../config.js'
import { preflight } from '../preflight.js'
import { auditHmacKey, configPathFrom } from './common.js'

export async function checkConfig (args: string[]): Promise<void> {
  const file = configPathFrom(args)
  const config = loadConfig(file, process.env)
  auditHmacKey(process.env)
  const problems = await preflight(config)
  if (problems.length > 0) throw new ConfigError(file, problems)
  const clients = config.clients.length
  const said = clients === 0 ? '0 clients: every API call will be refused with 401 until one is added' : `${clients} client${clients === 1 ? '' : 's'}`
  console.log(`${file}: ok (${said})`)
}
