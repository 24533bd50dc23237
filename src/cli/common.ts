// What the subcommands share: the --config flag (resolved like `start` resolves it), the usage error, and the
// audit trail's process concerns (its files, its HMAC key from the environment).
import { parseArgs, type ParseArgsConfig } from 'node:util'
import { hmacKeyProblem } from '../audit/chain.js'
import { seriesIsBeingWritten } from '../audit/lock.js'
import { AuditReadError, inSeriesOrder, LOCK_SUFFIX, pinFiles, pinSeries, TEMP_SUFFIX } from '../audit/series.js'
import { loadAuditFile, resolveConfigPath } from '../config.js'

/** A mistake in the command line itself: printed as one line, exit 1. */
export class UsageError extends Error {}

/** The --config option, for commands that take more options than this one. */
export const CONFIG_OPTION = { config: { type: 'string', short: 'c' } } as const

/**
 * The options of a command that takes no other argument. One given anyway is most often the config file
 * (`start gw.yaml`): the error says how to give it.
 */
export function optionsOf<T extends NonNullable<ParseArgsConfig['options']>> (
  args: string[], options: T
): ReturnType<typeof parseArgs<{ options: T, strict: true, allowPositionals: true }>>['values'] {
  const { values, positionals } = parseArgs({ args, options, strict: true, allowPositionals: true })
  if (positionals.length > 0) {
    throw new UsageError(`unexpected argument '${positionals[0]}': a config file is given as --config ${positionals[0]}`)
  }
  return values
}

/** The config file a command works on: --config, else $GATEWAY_CONFIG, else config/gateway.yaml. */
export function configPathFrom (args: string[]): string {
  return resolveConfigPath(optionsOf(args, CONFIG_OPTION).config, process.env)
}

/**
 * AUDIT_HMAC_KEY from the environment, or undefined when unset; a key too short to trust, or with whitespace
 * (hmacKeyProblem), stops the command.
 */
export function auditHmacKey (env: NodeJS.ProcessEnv): string | undefined {
  const key = env.AUDIT_HMAC_KEY
  if (key === undefined || key === '') return undefined
  const problem = hmacKeyProblem(key)
  if (problem !== null) throw new UsageError(problem)
  return key
}

/**
 * The audit files a command reads, oldest first: the ones named on the command line, else the series of the
 * configured audit.file (found through the config like `start` finds it), rotated and gzipped files included.
 * Each is opened as it is listed (pinFiles, pinSeries): the command reads the files as they are now, though a
 * running gateway rotates (renames, gzips, removes) files of the series while a long verify or query runs.
 * An entry named like a file of the series that is not a regular file (a FIFO would make a reader wait for
 * ever; a symbolic link is not the gateway's) stops the command, naming it.
 */
export async function auditFiles (configFlag: string | undefined, named: string[]): Promise<string[]> {
  // A shell glob (audit.jsonl*) also names the lock and any file being written under a temporary name.
  if (named.length > 0) {
    const files = named.filter(n => !n.endsWith(LOCK_SUFFIX) && !n.endsWith(TEMP_SUFFIX))
    await pinFiles(files, seriesIsBeingWritten)
    return (await inSeriesOrder(files)).map(f => f.path)
  }
  const file = loadAuditFile(resolveConfigPath(configFlag, process.env), process.env)
  if (file === '-') throw new UsageError('audit.file is "-" (stdout): there are no audit files to read')
  const { files, irregular } = await pinSeries(file, seriesIsBeingWritten)
  if (irregular.length > 0) {
    throw new AuditReadError(irregular[0]!, 0, new Error('not a regular file (a FIFO, device, socket, symbolic link or directory) ' +
      'named like a file of the series: move it out of the audit directory'))
  }
  if (files.length === 0) throw new UsageError(`no audit files at ${file}`)
  return files.map(f => f.path)
}
