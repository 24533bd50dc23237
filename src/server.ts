// Process concerns only: build the app from a loaded config, listen, and answer signals.
// - SIGTERM, SIGINT, SIGQUIT: shut down. /readyz turns 503 "draining" at once; the gateway keeps serving for
//   shutdown.drainDelayMs (for the load balancer to notice), then stops accepting, closes kept-alive connections
//   after their answer, and gives in-flight calls shutdown.graceMs to finish. The grace is a hard bound: past it,
//   every call still open is aborted (audited aborted) and the process exits 1 once the audit is flushed. It
//   also exits 1 when audit records were lost (the destination did not take them); else 0.
// - SIGHUP (and, with `watch`, a change of the config file): reload the config file. A valid one is applied to the
//   running gateway without disturbing in-flight calls (app.applyConfig); an invalid one is refused in one log
//   line and the running config stays in force.
// - SIGUSR2: reopen the audit file (after an outside logrotate moved it).
// - Signals whose default would end the process without a word are logged and ignored (IGNORED). SIGPIPE is
//   ignored by Node itself (a write to a closed pipe fails with EPIPE instead).
// The lists of signals are in src/start-signals.ts, which answers them before the gateway's code is loaded.
import { lstatSync, readlinkSync, unwatchFile, watch, watchFile } from 'node:fs'
import { basename, dirname, resolve, sep } from 'node:path'
import { performance } from 'node:perf_hooks'
import { setFlagsFromString } from 'node:v8'
import type { FastifyInstance } from 'fastify'
import { buildApp, type AppDependencies } from './app.js'
import { ConfigError, FileTooLargeError, loadConfig, readRegularFile, withoutSecrets, type GatewayConfig } from './config.js'
import { listenAddress } from './http/address.js'
import { closesConnection, hasWaitingBehind } from './http/response.js'
import { EveryInterval } from './logging.js'
import { describeListenError, reloadPreflight, startProblem, StartupError } from './preflight.js'
import { ANSWERED, IGNORED, SHUTDOWN_SIGNALS, takeSignalsHeldWhileStarting } from './start-signals.js'

/** After a complete close, the process exits by itself; if something still holds it (a stdout nobody reads), this. */
const EXIT_GRACE_MS = 2_000
/**
 * Past the grace, the audit flush and the close of what is left are bounded on their own (the audit writer gives a
 * stuck disk 5 s, a gzip under way 10 s); should anything still hold the process after this, it exits anyway.
 */
const AFTER_GRACE_MS = 15_000
/** While draining: how often connections with no call under way are closed. */
const UNUSED_SWEEP_MS = 100
/** Editors save in several steps (write a temp file, rename it over): one reload once the file is quiet this long. */
const WATCH_DEBOUNCE_MS = 200
/** How often --watch also looks at the file itself, through any symlink (see watchConfig). */
const WATCH_POLL_MS = 1000
/** What --watch takes for the text of a config file too large to read (no file that small is too large). */
const TOO_LARGE = '\0(a file too large to be a config)'

/**
 * An ignored signal is logged at most once this long, with how many came since its last line: one may keep coming
 * (SIGXFSZ with every write past the file-size limit, `ulimit -f`: the audit retries a failed write every 500 ms
 * for as long as it fails), and a warn line for each would flood the log.
 */
const IGNORED_LOG_INTERVAL_MS = 60_000
/** What an ignored signal usually means, where the operator may not guess. */
const IGNORED_MEANING: Partial<Record<NodeJS.Signals, string>> = {
  SIGXFSZ: 'a write went past the process\'s file-size limit, ulimit -f',
  SIGXCPU: 'past the process\'s CPU time limit, ulimit -t'
}

/** The handler of IGNORED signals: each logged at warn, at most once an IGNORED_LOG_INTERVAL_MS per signal. */
export function ignoredSignalLogger (
  log: { warn: (fields: Record<string, unknown>, msg: string) => void }, now: () => number = () => performance.now()
): (signal: NodeJS.Signals) => void {
  const lines = new Map<NodeJS.Signals, EveryInterval>()
  return signal => {
    let signalLines = lines.get(signal)
    if (signalLines === undefined) {
      signalLines = new EveryInterval(IGNORED_LOG_INTERVAL_MS, now)
      lines.set(signal, signalLines)
    }
    const line = signalLines.admit()
    if (line === null) return
    const meaning = IGNORED_MEANING[signal]
    const more = line.held
    log.warn(more > 0 ? { signal, alsoIgnored: more } : { signal },
      `${signal}: ignored (${meaning === undefined ? '' : `${meaning}; `}the gateway has no use for it)` +
      (more > 0 ? `, and ${more} more since the last line` : ''))
  }
}

/**
 * V8's allocation-site pretenuring is turned off for the gateway process. V8 watches object and array literals;
 * when most of one literal's objects survive a young-generation GC, later objects from it are allocated straight
 * into the old generation, and that decision is not taken back. Early in a burst, while the young generation is
 * still small, a literal made per call can be judged long-lived that way. From then on each call's object sits
 * in the old generation pointing at the call's young objects (request, reply, buffers), which every young GC must
 * keep and promote: on Node 20, about 10 KB a call, young GCs 7x slower and an old-generation GC every second,
 * a tenth of the main thread. Whether a start falls into it depends on timing: a profiling harness that loaded
 * the gateway with import() did every time; `cli.js start` and the bench did not in the runs measured. Nothing
 * the gateway keeps for long is built per call, so it gains nothing from pretenuring. Each GC reads the flag,
 * so setting it before the first call is enough.
 */
function turnOffPretenuring (): void {
  setFlagsFromString('--no-allocation-site-pretenuring')
}

export interface ServerOptions {
  /** the file the config was loaded from: SIGHUP reloads it (without one, SIGHUP only says there is none) */
  configFile?: string
  /** the environment ${VAR}s are filled from on reload */
  env?: NodeJS.ProcessEnv
  /** also reload when the config file changes */
  watch?: boolean
}

export async function startServer (
  config: GatewayConfig, deps: Pick<AppDependencies, 'auditHmacKey'> = {}, opts: ServerOptions = {}
): Promise<FastifyInstance> {
  turnOffPretenuring()
  // Building the app can take seconds (a Redis that does not answer yet): a SIGHUP or SIGUSR2 meanwhile, or a signal
  // of IGNORED, would end the process by default. They are held, and answered once the handlers below are in place.
  // So is a stop (SIGTERM, SIGINT, SIGQUIT): ended by it, the process would leave the audit lock it has taken, and
  // the next start would wait for the lock's heartbeat and say an unclean stop in the trail. It stops once built.
  const releaseHeld = holdSignals()
  let app: FastifyInstance
  try {
    // Checked before anything is opened: a start refused later would leave an empty audit file behind.
    const problem = await startProblem(config)
    if (problem !== null) throw new StartupError(problem)
    app = await buildApp(config, deps)
  } catch (err) {
    releaseHeld()
    throw err
  }
  let draining = false
  let stoppedAccepting = false
  let listening = false

  // Answers sent once accepting has stopped close their connection, so no kept-alive client lingers. On a
  // connection with pipelined calls waiting, only the last of their answers does, so that each is served (Fastify
  // marks every call that arrives while closing with Connection: close: that is undone for the others).
  app.addHook('onSend', (request, reply, payload, done) => {
    if (stoppedAccepting) {
      const socket = request.raw.socket
      if (hasWaitingBehind(reply.raw, socket)) {
        reply.header('connection', 'keep-alive')
      } else {
        reply.header('connection', 'close')
        closesConnection(reply.raw, socket)
      }
    }
    done(null, payload)
  })

  warnIfNoClients(app, config, 'start')
  // Signals are answered from before the gateway listens: none that comes early may end it or open a debugger.
  const reload = configReloader(app, opts)
  let watcher: { close: () => void } | null = null

  const shutdown = (signal: NodeJS.Signals) => {
    if (draining) {
      app.log.info({ signal }, `${signal}: already shutting down`)
      return
    }
    draining = true
    watcher?.close()
    app.startDraining()
    const { drainDelayMs, graceMs } = app.currentConfig().shutdown
    if (!listening) {
      // (a stop that came while the gateway was being built: it never listens, and closes at once)
      app.log.info({ signal }, `${signal}: shutting down before listening`)
      stopAccepting(app, graceMs, () => { stoppedAccepting = true })
      return
    }
    app.log.info({ signal, drainDelayMs, graceMs },
      `${signal}: shutting down: /readyz answers 503; serving for ${drainDelayMs} ms more, then in-flight calls get ${graceMs} ms`)
    setTimeout(() => { stopAccepting(app, graceMs, () => { stoppedAccepting = true }) }, drainDelayMs)
  }
  for (const signal of SHUTDOWN_SIGNALS) process.on(signal, shutdown)
  process.on('SIGHUP', () => {
    if (draining) app.log.info('SIGHUP: shutting down; the config is not reloaded')
    else reload('SIGHUP')
  })
  process.on('SIGUSR2', () => {
    app.log.info('SIGUSR2: reopening the audit file')
    app.auditReopen()
  })
  const ignored = ignoredSignalLogger(app.log)
  for (const signal of IGNORED) process.on(signal, ignored)
  // A stop among the held signals is answered first: a SIGHUP held with it would reload the config of a gateway
  // that stops before it listens (it is said as not answered); the others come after, in the order they came.
  const held = releaseHeld()
  const stop = held.find(signal => (SHUTDOWN_SIGNALS as readonly NodeJS.Signals[]).includes(signal))
  for (const signal of stop === undefined ? held : [stop, ...held.filter(s => s !== stop)]) process.emit(signal, signal)
  if (draining) return app

  const { host, port } = config.listen
  listening = true
  try {
    // Given `localhost`, Fastify listens on each address the name gives with a server of its own, and the gateway's
    // handling of connections (listen.maxConnections, the drain, CONNECT and Expect, accept errors) is on app.server
    // alone: the gateway listens on one address (listenAddress).
    await app.listen({ host: await listenAddress(host), port })
  } catch (err) {
    await app.close()
    // (a StartupError says which listener already: metrics.listen)
    const problem = err instanceof StartupError ? err.message : describeListenError(host, port, err as NodeJS.ErrnoException)
    throw new StartupError(withoutSecrets([problem], config)[0])
  }
  if (opts.watch === true && opts.configFile !== undefined && !draining) watcher = watchConfig(app, opts.configFile, reload)
  return app
}

/**
 * Holds every signal the gateway answers until the returned function is called; it gives back those that came, in
 * order (those held while the bin started first: src/start-signals.ts), for the real handlers to answer.
 */
function holdSignals (): () => NodeJS.Signals[] {
  const held: NodeJS.Signals[] = []
  const hold = (signal: NodeJS.Signals) => { held.push(signal) }
  // SIGUSR2 too: a logrotate's postrotate may send it while the audit is being opened, and it ends a process by default.
  for (const signal of ANSWERED) process.on(signal, hold)
  held.push(...takeSignalsHeldWhileStarting())
  return () => {
    for (const signal of ANSWERED) process.off(signal, hold)
    return held.splice(0)
  }
}

/** Stops accepting and closes the app, aborting whatever is still in flight after `graceMs`. */
function stopAccepting (app: FastifyInstance, graceMs: number, stopped: () => void): void {
  stopped()
  let aborted = false
  const deadline = setTimeout(() => {
    // The grace bounds the calls. With none left, what still closes (the audit's last records, bounded on its own)
    // is no call aborted.
    const calls = app.callsInFlight()
    aborted = calls > 0
    if (aborted) app.log.warn({ calls }, `shutdown grace of ${graceMs} ms over: aborting the calls still in flight`)
    else app.log.info(`shutdown grace of ${graceMs} ms over, with no call in flight: still closing (the audit's last writes)`)
    app.abortInFlight()
    setTimeout(() => {
      app.log.error(`still not closed ${AFTER_GRACE_MS} ms after the grace; exiting`)
      process.exit(1)
    }, AFTER_GRACE_MS).unref()
  }, graceMs)
  app.log.info('stopped accepting connections; waiting for in-flight calls')
  const closed = app.close()
  // After a turn of the event loop (bytes already arrived are read first), then as connections fall idle.
  const sweep = setInterval(() => { app.closeUnusedConnections() }, UNUSED_SWEEP_MS).unref()
  setImmediate(() => { app.closeUnusedConnections() })
  closed.finally(() => { clearInterval(sweep) }).catch(() => {})
  closed.then(() => {
    clearTimeout(deadline)
    // A trail that misses records is a failed run too: the supervisor sees it in the exit code, not only in the log.
    const lost = app.auditLost()
    if (lost > 0) app.log.error({ lost }, `closed with ${lost} audit record(s) lost (see gateway_audit_records_lost_total)`)
    else app.log.info(aborted ? 'closed, after aborting calls still in flight' : 'closed')
    process.exitCode = aborted || lost > 0 ? 1 : 0
    setTimeout(() => process.exit(), EXIT_GRACE_MS).unref()
  }, (err: unknown) => {
    clearTimeout(deadline)
    app.log.error({ err }, 'error while closing')
    process.exitCode = 1
    setTimeout(() => process.exit(), EXIT_GRACE_MS).unref()
  })
}

/**
 * Reloads the config file into the running app, saying in the log what changed, what needs a restart, or why not.
 * One reload at a time: a second signal while one checks the machine waits for it, so the last file read is the one
 * that runs.
 */
function configReloader (app: FastifyInstance, opts: ServerOptions): (why: string) => void {
  let reloading = Promise.resolve()
  return (why) => {
    reloading = reloading.then(async () => { await reloadConfig(app, opts, why) })
  }
}

async function reloadConfig (app: FastifyInstance, { configFile, env = {} }: ServerOptions, why: string): Promise<void> {
  if (configFile === undefined) {
    app.log.warn(`${why}: there is no config file to reload (this gateway was started from a built-in config)`)
    return
  }
  let next: GatewayConfig
  try {
    next = loadConfig(configFile, env, { reload: true })
    const problems = await reloadPreflight(app.currentConfig(), next)
    if (problems.length > 0) throw new ConfigError(configFile, problems)
  } catch (err) {
    const problems = err instanceof ConfigError ? err.problems : [String(err)]
    app.reloadRefused()
    app.log.error({ problems }, `${why}: config reload refused, the running config stays in force: ${configFile}: ${problems.join('; ')}`)
    return
  }
  let change
  try {
    change = app.applyConfig(next)
  } catch (err) {
    app.reloadRefused()
    app.log.error({ err }, `${why}: config reload failed, the running config stays in force`)
    return
  }
  const { applied, needRestart } = change
  if (applied.length > 0) app.log.info({ applied }, `${why}: config reloaded: ${applied.join(', ')}`)
  else app.log.info(`${why}: config reloaded: nothing to apply`)
  if (needRestart.length > 0) {
    app.log.warn({ needRestart }, `${why}: changed in ${configFile} but applied only by a restart (the running values stay): ${needRestart.join(', ')}`)
  }
  warnIfNoClients(app, next, why)
}

/**
 * A config with no clients is valid (a deployment made before its teams are added by a reload), but more often an
 * empty or misplaced `clients:`: said at warn, since it shows otherwise only as every call's 401.
 */
function warnIfNoClients (app: FastifyInstance, config: GatewayConfig, why: string): void {
  if (config.clients.length === 0) app.log.warn(`${why}: no clients in the config: every API call is refused with 401 until a reload adds one`)
}

/**
 * Watches the config file's directory (an editor or a Kubernetes ConfigMap replaces the file by a rename, which a
 * watch on the file itself would not survive), and reloads once the file's text has changed and stayed quiet for
 * WATCH_DEBOUNCE_MS. Only events on the file's own name count (and, for a file that is a symlink into the same
 * directory, as a ConfigMap's `gateway.yaml -> ..data/gateway.yaml`, on the link's first step): other files in
 * the directory (an audit file written on every call) never delay a reload. A file that is a symlink into another
 * directory changes where no event of this directory tells (as on a file system that sends none): the file is
 * also looked at every WATCH_POLL_MS through its links. A change seen both ways is reloaded once (same text).
 */
function watchConfig (app: FastifyInstance, file: string, reload: (why: string) => void): { close: () => void } | null {
  const path = resolve(file)
  const names = new Set([basename(path)])
  try {
    if (lstatSync(path).isSymbolicLink()) names.add(readlinkSync(path).split(sep)[0]!)
  } catch { /* not there yet: its own name is enough */ }
  // Only a regular file: reading a FIFO would hold the event loop (a SIGHUP then says why it is not reloaded).
  // A file too large to be read whole is reloaded once, to be refused in the log and in /metrics.
  const read = () => {
    try {
      return readRegularFile(path).toString('utf8')
    } catch (err) {
      return err instanceof FileTooLargeError ? TOO_LARGE : null
    }
  }
  let seen = read()
  let timer: NodeJS.Timeout | null = null
  const check = () => {
    timer = null
    const text = read()
    if (text === null || text === seen) return // a file being replaced is briefly absent
    seen = text
    reload(`${basename(path)} changed`)
  }
  const changed = () => {
    if (timer !== null) clearTimeout(timer)
    timer = setTimeout(check, WATCH_DEBOUNCE_MS)
  }
  try {
    const watcher = watch(dirname(path), { persistent: false }, (_event, name) => {
      if (name === null || names.has(name)) changed()
    })
    watcher.on('error', (err) => { app.log.warn({ err }, `no longer watching ${path}; SIGHUP still reloads it`) })
    watchFile(path, { persistent: false, interval: WATCH_POLL_MS }, changed)
    app.log.info({ file: path }, 'watching the config file: a change is reloaded')
    return {
      close: () => {
        watcher.close()
        unwatchFile(path, changed)
        if (timer !== null) clearTimeout(timer)
      }
    }
  } catch (err) {
    app.log.warn({ err }, `cannot watch ${path}; SIGHUP still reloads it`)
    return null
  }
}
