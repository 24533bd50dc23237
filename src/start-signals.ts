// The signals a gateway answers, and how they are answered before it is built. The bin (src/cli.ts) calls
// answerSignalsWhileStarting() first thing for `start`, before the gateway's code is loaded (under a second, several
// on a busy machine) and its config read. Without it, a stop then would end the process without a word, or be lost
// altogether when the gateway is PID 1 (a container without an init: the kernel gives PID 1 no default action for a
// signal it does not handle, and `docker stop` waits its whole timeout), and a SIGHUP or SIGUSR2 would end it.
// Until startServer takes them over (takeSignalsHeldWhileStarting, as it builds the app):
// - a stop ends the process at once, exit 0, in one log line: nothing is open yet to drain, flush or unlock;
// - SIGHUP, SIGUSR2 and the IGNORED signals are held, for the gateway to answer once it is built.
// This module loads nothing of the gateway: it must be in place before the rest is.
import { hostname } from 'node:os'

export const SHUTDOWN_SIGNALS = ['SIGTERM', 'SIGINT', 'SIGQUIT'] as const
/**
 * Signals that would end the process by default and that the gateway has no use for: logged and ignored, so that
 * none ends it silently. SIGUSR1 would open Node's inspector (a debugger port) on a production process.
 * Not here: SIGKILL and SIGSTOP (cannot be caught); SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS
 * (a crash: running JavaScript after them is not safe); SIGPROF (V8's CPU profiler needs it).
 */
export const IGNORED = ['SIGUSR1', 'SIGALRM', 'SIGVTALRM', 'SIGXCPU', 'SIGXFSZ', 'SIGIO', 'SIGPWR', 'SIGSTKFLT'] as const
/** Every signal the gateway answers: SIGHUP reloads the config, SIGUSR2 reopens the audit file. */
export const ANSWERED = ['SIGHUP', 'SIGUSR2', ...SHUTDOWN_SIGNALS, ...IGNORED] as const

let takeHeld: (() => NodeJS.Signals[]) | null = null

export function answerSignalsWhileStarting (): void {
  const held: NodeJS.Signals[] = []
  const answer = (signal: NodeJS.Signals) => {
    if (!(SHUTDOWN_SIGNALS as readonly NodeJS.Signals[]).includes(signal)) {
      held.push(signal)
      return
    }
    // A line as the operational log (pino) writes it; stdout takes it at once (a file or a pipe).
    process.stdout.write(`${JSON.stringify({
      level: 30, time: Date.now(), pid: process.pid, hostname: hostname(), signal, msg: `${signal}: stopped while starting, before anything was opened`
    })}\n`)
    process.exit(0)
  }
  for (const signal of ANSWERED) process.on(signal, answer)
  takeHeld = () => {
    for (const signal of ANSWERED) process.off(signal, answer)
    return held.splice(0)
  }
}

/** Ends answerSignalsWhileStarting (if it was called): the signals it held, in the order they came. */
export function takeSignalsHeldWhileStarting (): NodeJS.Signals[] {
  const held = takeHeld?.() ?? []
  takeHeld = null
  return held
}
