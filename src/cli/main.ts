// The ohmygpt-gateway command (run by the bin, src/cli.ts): a map of subcommands, one file each under src/cli/.
// Each command is a function of its arguments; errors set process.exitCode instead of exiting, so output is flushed.
import { ConfigError } from '../config.js'
import { AuditLockError } from '../audit/lock.js'
import { AuditReadError } from '../audit/series.js'
import { AuditStartError } from '../audit/writer.js'
import { auditQuery, QUERY_USAGE } from './audit-query.js'
import { auditVerify } from './audit-verify.js'
import { checkConfig } from './check-config.js'
import { UsageError } from './common.js'
import { demo } from './demo.js'
import { keygen } from './keygen.js'
import { start } from './start.js'
import { StartupError } from '../preflight.js'

const USAGE = `usage: ohmygpt-gateway <command>

commands:
  start [--config FILE] [--watch]
                                 run the gateway (config: --config, else $GATEWAY_CONFIG, else config/gateway.yaml);
                                 SIGHUP reloads the config file, and so does a change of it with --watch
  keygen <client-id> [--key-id ID]
                                 print a new client key (once) and the YAML entry holding its sha256
                                 (with --key-id: a keys: entry, to rotate a client's key)
  check-config [--config FILE]   validate a config file; exit 1 listing every bad field
  demo [--port N]                run the gateway on 127.0.0.1:8080 (or N) in front of a built-in fake OhMyGPT, with a demo key
  audit verify [--config FILE] [--head HASH] [FILES...]
                                 check the audit hash chain over the configured series (or FILES), oldest first:
                                 exit 0 with "ok: N records, chain intact, head <hash>", or exit 1 naming the first bad record;
                                 --head: a head published earlier must be the hash of a record (the end was not cut off)
  ${QUERY_USAGE}

audit verify reads AUDIT_HMAC_KEY from the environment when the trail is HMAC-chained.
`

const AUDIT_COMMANDS: Record<string, (args: string[]) => unknown> = { verify: auditVerify, query: auditQuery }

const COMMANDS: Record<string, (args: string[]) => unknown> = {
  start,
  'check-config': checkConfig,
  keygen,
  demo,
  audit: ([sub, ...args]) => {
    const command = sub === undefined ? undefined : AUDIT_COMMANDS[sub]
    if (command === undefined) throw new UsageError(`audit takes a subcommand: ${Object.keys(AUDIT_COMMANDS).join(' or ')}`)
    return command(args)
  }
}

export async function main (argv: string[]): Promise<void> {
  const [name, ...args] = argv
  const command = name === undefined ? undefined : COMMANDS[name]
  // `start --help` as well as `--help`: never an "Unknown option" for asking. audit query has a usage of its own.
  const asksHelp = (a: string) => a === '--help' || a === '-h'
  if (name === 'help' || (name !== undefined && asksHelp(name)) ||
    (command !== undefined && args.some(asksHelp) && !(name === 'audit' && args[0] === 'query'))) {
    console.log(USAGE)
    return
  }
  if (command === undefined) {
    console.error(name === undefined ? USAGE : `unknown command "${name}"\n\n${USAGE}`)
    process.exitCode = 1
    return
  }
  try {
    await command(args)
  } catch (err) {
    if (err instanceof ConfigError || err instanceof UsageError || err instanceof StartupError || err instanceof AuditLockError ||
      err instanceof AuditStartError || err instanceof AuditReadError || (err as NodeJS.ErrnoException).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`ohmygpt-gateway ${name}: ${(err as Error).message}`)
    } else {
      console.error(`ohmygpt-gateway ${name}: ${(err as Error).stack ?? String(err)}`)
    }
    process.exitCode = 1
  }
}
