// What the subcommands share: the --config flag (resolved like `start` resolves it) and the usage error.
import { parseArgs } from 'node:util'
import { resolveConfigPath } from '../config.js'

/** A mistake in the command line itself: printed as one line, exit 1. */
export class UsageError extends Error {}

/** The config file a command works on: --config, else $GATEWAY_CONFIG, else config/gateway.yaml. */
export function configPathFrom (args: string[]): string {
  const { values } = parseArgs({ args, options: { config: { type: 'string', short: 'c' } }, strict: true })
  return resolveConfigPath(values.config, process.env)
}
