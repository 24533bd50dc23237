// What a config needs from the machine it runs on, checked before anything starts: the listen addresses (the API's
// and the metrics') can be bound and the audit file's directory can be created and written in. `check-config`
// reports these with the schema's problems; `start` meets the same conditions as one clear line (server.ts).
import { randomBytes } from 'node:crypto'
import { closeSync, existsSync, lstatSync, mkdirSync, openSync, rmdirSync, statSync, unlinkSync } from 'node:fs'
import { createServer, type AddressInfo, type Server } from 'node:net'
import { dirname, join, resolve } from 'node:path'
import { hostPort, METRICS_ON_LISTEN_PORT, withoutSecrets, type GatewayConfig } from './config.js'
import { listenAddress } from './http/address.js'

/** The gateway cannot start on this machine with this config: said in one line, without a stack. */
export class StartupError extends Error {}

/** Why an address cannot be listened on, in words. */
const LISTEN_ERRORS: Record<string, string> = {
  EADDRNOTAVAIL: 'the address is not one of this machine\'s',
  ENOTFOUND: 'the host name does not resolve',
  EAI_AGAIN: 'the host name does not resolve',
  EADDRINUSE: 'the port is in use',
  EACCES: 'permission denied (ports below 1024 need privileges)'
}

export function describeListenError (host: string, port: number, err: NodeJS.ErrnoException): string {
  return `cannot listen on ${host}:${port}: ${LISTEN_ERRORS[err.code ?? ''] ?? err.message} (${err.code ?? 'error'})`
}

/**
 * Binds host on a free port and lets go: the host is usable if that works (the port itself may be taken later).
 * `key` names the config key in the problem.
 */
async function checkListenHost (host: string, key = 'listen.host'): Promise<string | null> {
  const problem = await listenProblem(host, 0)
  return problem === null ? null : `${key}: ${problem}`
}

/** Binds host:port and lets go (or, given `held`, keeps it there): why it cannot be listened on, or null. */
async function listenProblem (host: string, port: number, held?: Server[]): Promise<string | null> {
  const address = await listenAddress(host)
  return await new Promise(resolve => {
    const server = createServer()
    server.once('error', (err: NodeJS.ErrnoException) => { resolve(describeListenError(host, port, err)) })
    server.listen(port, address, () => {
      if (held === undefined) server.close(() => { resolve(null) })
      else {
        held.push(server)
        resolve(null)
      }
    })
  })
}

/** The metrics listener's host (metrics.listen), which start binds as it binds listen.host. */
async function checkMetricsHost (listen: string | undefined): Promise<string | null> {
  return listen === undefined ? null : await checkListenHost(hostPort(listen).host, 'metrics.listen')
}

/**
 * `mkdir -p`, one missing directory at a time; the directories it made, outermost first. Node's own recursive mkdir never returns where creating a directory
 * answers ENOENT although its parent exists (anywhere under /proc): it retries for ever at full CPU. Here that
 * answer is an error like any other.
 */
export function makeDirectories (dir: string): string[] {
  const missing: string[] = []
  let at = resolve(dir)
  for (; !existsSync(at); at = dirname(at)) {
    missing.unshift(at)
    if (dirname(at) === at) break
  }
  // What is there already (the root at least) must be a directory: the one asked for (EEXIST, as mkdir -p says)
  // or one above it.
  if (!statSync(at).isDirectory()) {
    throw Object.assign(new Error(`${at} is not a directory`), { code: missing.length === 0 ? 'EEXIST' : 'ENOTDIR' })
  }
  const made: string[] = []
  for (const d of missing) {
    try {
      mkdirSync(d)
      made.push(d)
    } catch (err) {
      // Made meanwhile by someone else: fine if it is a directory.
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || !statSync(d).isDirectory()) throw err
    }
  }
  return made
}

function errorCode (err: unknown): string {
  const e = err as NodeJS.ErrnoException
  return e.code ?? e.message
}

/**
 * Whether the gateway can make files in `dir` (its audit file, the lock beside it, rotated files): one made and
 * removed. Permissions alone do not tell (root, a read-only mount, a file system that makes no files).
 */
function directoryWriteProblem (dir: string): string | null {
  const probe = join(dir, `.ohmygpt-gateway-check.${process.pid}.${randomBytes(6).toString('hex')}`)
  try {
    closeSync(openSync(probe, 'wx'))
  } catch (err) {
    return `audit.file: cannot write in the directory ${dir}: ${errorCode(err)}`
  }
  try { unlinkSync(probe) } catch { /* made, so the directory is writable: nothing more to say */ }
  return null
}

/** Why the audit writer refuses an active file that is there but not a regular file (audit/writer.ts). */
export function notRegularAuditFile (file: string): string {
  return `${file} is not a regular file (a symbolic link, device, pipe or directory): records are written only into a regular file`
}

/**
 * The audit directory can be made and written in, and the active file, if there, is a regular file: a host directory
 * mounted with another owner (or read-only), or a link to /dev/null, is said here, in one line, rather than met by
 * the audit lock or the writer.
 */
export function auditDirectoryProblem (file: string): string | null {
  if (file === '-') return null
  // dirname() drops the slash and checks the directory above: the lock (`<file>.lock`) is then refused, unexplained.
  if (/[\\/]$/.test(file)) return `audit.file: ${file} names a directory: give the file's path in it (${file}audit.jsonl)`
  const dir = dirname(file)
  let made: string[]
  try {
    made = makeDirectories(dir)
  } catch (err) {
    return `audit.file: cannot create the directory ${dir}: ${errorCode(err)}`
  }
  const active = lstatSync(file, { throwIfNoEntry: false })
  const problem = active !== undefined && !active.isFile() ? `audit.file: ${notRegularAuditFile(file)}` : directoryWriteProblem(dir)
  // What was made only to be checked goes (check-config, a reload that start would apply): a directory left there
  // would be one a later mount or chown finds taken. Only while empty: a gateway may have begun to write in it.
  for (const d of made.reverse()) {
    try { rmdirSync(d) } catch { break }
  }
  return problem
}

/**
 * metrics.listen on listen.port, its host and listen.host one address by two names (localhost and 127.0.0.1), which
 * the config cannot tell: found on a free port, listen.host held there while the metrics' host is bound to it.
 */
async function metricsOnListenAddress (config: GatewayConfig): Promise<string | null> {
  const metrics = config.metrics.listen === undefined ? null : hostPort(config.metrics.listen)
  if (metrics === null || metrics.port === 0 || metrics.port !== config.listen.port) return null
  const held: Server[] = []
  try {
    // (a host that cannot be bound is checkListenHost's problem)
    if (await listenProblem(config.listen.host, 0, held) !== null) return null
    const { port } = held[0]!.address() as AddressInfo
    if ((await listenProblem(metrics.host, port))?.includes('EADDRINUSE') !== true) return null
    // (and free once let go: not some other process's port)
    await closeAll(held.splice(0))
    return await listenProblem(metrics.host, port) === null ? METRICS_ON_LISTEN_PORT : null
  } finally {
    await closeAll(held)
  }
}

async function closeAll (servers: Server[]): Promise<void> {
  await Promise.all(servers.map(server => new Promise(resolve => server.close(resolve))))
}

export async function preflight (config: GatewayConfig): Promise<string[]> {
  const problems = [await checkListenHost(config.listen.host), await checkMetricsHost(config.metrics.listen),
    await metricsOnListenAddress(config), auditDirectoryProblem(config.audit.file)]
  return withoutSecrets(problems.filter((p): p is string => p !== null), config)
}

/**
 * What start checks before it builds the gateway, the first problem in one line: its listen addresses with the ports
 * they take (in use by another process, say), the audit directory and file. A start
 * refused after the audit was opened would leave an empty audit file (and its lock, for a moment) behind. Without the
 * config's secrets, as preflight's and reloadPreflight's problems.
 */
export async function startProblem (config: GatewayConfig): Promise<string | null> {
  const problem = await listenersProblem(config) ?? auditDirectoryProblem(config.audit.file)
  return problem === null ? null : withoutSecrets([problem], config)[0]!
}

/** Whether start can listen where its config says, the gateway's and the metrics' addresses with their ports: why not, or null. */
async function listenersProblem (config: GatewayConfig): Promise<string | null> {
  const { host, port } = config.listen
  const metrics = config.metrics.listen === undefined ? null : hostPort(config.metrics.listen)
  const metricsProblem = metrics === null ? null : await listenProblem(metrics.host, metrics.port)
  // Each free alone, the two may still be one address named two ways (localhost and 127.0.0.1), which the config
  // cannot tell: the metrics' listen, after the gateway's own, would fail once the audit is open.
  return await listenProblem(host, port) ?? (metricsProblem === null ? null : `metrics.listen: ${metricsProblem}`) ??
    await metricsOnListenAddress(config)
}

/**
 * The same checks for a reload, of what it changes: a restart applies listen.host, metrics.listen and audit.file, and would refuse
 * one this machine cannot use, so the reload is refused now, while the running gateway still says so. The running
 * values are not checked again: they are in use, and a full audit disk must not hold up a key's revocation.
 */
export async function reloadPreflight (running: GatewayConfig, next: GatewayConfig): Promise<string[]> {
  const problems = [
    next.listen.host === running.listen.host ? null : await checkListenHost(next.listen.host),
    next.metrics.listen === running.metrics.listen ? null : await checkMetricsHost(next.metrics.listen),
    next.listen.host === running.listen.host && next.listen.port === running.listen.port && next.metrics.listen === running.metrics.listen
      ? null
      : await metricsOnListenAddress(next),
    next.audit.file === running.audit.file ? null : auditDirectoryProblem(next.audit.file)
  ]
  return withoutSecrets(problems.filter((p): p is string => p !== null), next)
}
