// The health of each OhMyGPT line (upstream.baseUrls, in order of preference): a line that fails
// `failureThreshold` times in a row, or half of its last RECENT_CALLS calls while another line is up (one that
// fails every other call never fails twice in a row), is skipped for `cooldownMs`, then given exactly one call
// (half-open) that decides whether it is trusted again (a generation on trial gives its place up once it has a
// connection: see trialConnected). Only calls given the line while it is skipped (its trial) speak for it then: one
// it took before, ending well or badly after, says nothing of its cooldown (see ticket). Pure bookkeeping with an
// injectable clock; upstream/client.ts decides what counts as a failure and asks which line to try next.

export type LineState = 'up' | 'down' | 'half-open'

export interface LineStatus {
  index: number
  /** the line's base URL as configured (no secrets live in it) */
  url: string
  state: LineState
  /** failures in a row */
  failures: number
  /** while down: ms until the line gets its trial call */
  retryInMs: number | null
}

/**
 * What a call given a line holds (LineHealth.ticket): the spell of being skipped it was given the line in, and
 * whether it holds the line's one trial, which only it may give up (released, trialConnected).
 */
export interface Ticket {
  readonly spell: number
  /** which of the line's trials this call is (0: none) */
  readonly trial: number
}

export interface LineHealthOptions {
  failureThreshold: number
  cooldownMs: number
  now?: () => number
  /** told of every change of state, for the log */
  onChange?: (status: LineStatus, previous: LineState) => void
}

/**
 * The calls a line's recent failure rate is judged over. A line that fails at least half of them is skipped when
 * another line is up (its calls then cost an attempt each there, and a POST that fails after it was sent cannot be
 * sent again); the last line up is never skipped for it: half its calls served is better than none.
 */
const RECENT_CALLS = 10

interface Line {
  index: number
  url: string
  failures: number
  /** outcomes of its last RECENT_CALLS calls since it was last restored, true for a failure, oldest first */
  recent: boolean[]
  down: boolean
  /** the times it has been skipped: which spell of being skipped a call's ticket belongs to */
  downs: number
  downUntil: number
  /** the one trial call of a line whose cooldown is over is in flight */
  probing: boolean
  /** the trials it has been given: which one a call's ticket holds, if any */
  trials: number
  /**
   * restored on an answer's headers alone (answered), and no answer read whole since: a failure now (the trial's
   * answer broken off, or silent) is its trial failing, and it sleeps again at once
   */
  unproven: boolean
}

export class LineHealth {
  readonly #lines: Line[]
  readonly #opts: Required<Omit<LineHealthOptions, 'onChange'>> & Pick<LineHealthOptions, 'onChange'>

  constructor (urls: readonly string[], opts: LineHealthOptions) {
    this.#lines = urls.map((url, index) => ({ index, url, failures: 0, recent: [], down: false, downs: 0, downUntil: 0, probing: false, trials: 0, unproven: false }))
    this.#opts = { now: () => performance.now(), ...opts }
  }

  /**
   * Takes over the state of each line of `previous` (a reload's health before) that is also one of these, by its
   * URL (reordered, or beside lines added or removed): a reload does not trust again a line being skipped, nor
   * forget its failures (a new cooldownMs counts from now, where it ends sooner). A trial under way stays with
   * `previous`, whose calls hand their verdicts to it; a line whose cooldown is over gets its trial here from the
   * next call. A URL listed more than once is as many lines: each takes over the one of the same rank among the
   * previous lines of that URL (one of them up, another skipped, stay so).
   */
  takeOver (previous: LineHealth): void {
    const unclaimed = [...previous.#lines]
    for (const line of this.#lines) {
      const at = unclaimed.findIndex(other => other.url === line.url)
      if (at === -1) continue
      const before = unclaimed.splice(at, 1)[0]!
      line.failures = before.failures
      line.recent = [...before.recent]
      line.down = before.down
      line.downs = before.downs
      line.unproven = before.unproven
      // (a shorter cooldownMs shortens the wait for the trial too: an operator may lower it to try a fixed line sooner)
      line.downUntil = Math.min(before.downUntil, this.#opts.now() + this.#opts.cooldownMs)
    }
  }

  /**
   * The line the next attempt should use, skipping those in `tried`: the first line in order of preference that is
   * up, or down with its cooldown over and no trial call in flight (that call becomes its trial). A call that may
   * not be sent again once sent (`mayTrial` false: a POST) is a trial only when no line after it is up: a line that
   * fails it (a reset once the request was out) would lose it, a create or a generation the client may not send
   * again, where another line would have served it; the line's trial waits for the next call that may be sent
   * again (a read, a delete). Null when every line is down: the caller answers at once instead of waiting on a
   * line known to be failing.
   */
  pick (tried: ReadonlySet<number> = new Set(), mayTrial = true): number | null {
    const now = this.#opts.now()
    let due: Line | undefined
    for (const line of this.#lines) {
      if (tried.has(line.index)) continue
      if (!line.down) return line.index
      if (!line.probing && now >= line.downUntil) {
        if (!mayTrial) {
          due ??= line
          continue
        }
        return this.#trial(line)
      }
    }
    return due === undefined ? null : this.#trial(due)
  }

  /**
   * What a call given line `index` (by pick(), in the same tick) hands back with its verdict: a skipped line is
   * restored, put back to sleep or freed for another trial only by a call given it while skipped, in this spell of
   * it (its trial, or a generation that gave its trial place up). A call the line took while it was up, whose
   * answer ends (well, or broken off) once the line is skipped, says nothing of it: else every slow answer or long
   * stream that ends well would restore a line the calls after it found failing, long before its trial.
   */
  ticket (index: number): Ticket {
    const line = this.#lines[index]
    if (line === undefined) return { spell: -1, trial: 0 }
    // (given while up: the spell before the next one, which that call then does not speak in; probing right after
    // pick(): this call is the trial, as onTrial says)
    return { spell: line.downs, trial: line.probing ? line.trials : 0 }
  }

  /**
   * Whether a call with `ticket` speaks for `line`: it is up and proven, or the call was given it in this spell of
   * being skipped or since (its trial, a call after it). Restored but unproven (answered), the line is judged on
   * those alone: a stream it took before it was skipped, broken off or ended well now, says nothing of it as it is.
   */
  #speaks (line: Line, ticket: Ticket): boolean {
    return (!line.down && !line.unproven) || ticket.spell === line.downs
  }

  /** Whether the call with `ticket` holds the line's trial now (not one that gave its place up, nor a trial since). */
  #holdsTrial (line: Line | undefined, ticket: Ticket): line is Line {
    return line?.probing === true && ticket.trial === line.trials
  }

  #trial (line: Line): number {
    line.probing = true
    line.trials++
    this.#changed(line, 'down')
    return line.index
  }

  /**
   * The line sent response headers (anything but a 502/503): a line that was skipped or on trial is trusted again
   * at once (a stream's answer may take minutes), but not yet proven: its count of failures waits for the body, and
   * a failure before an answer is read whole (this one broken off, or gone silent) puts it back to sleep, as a
   * trial that fails before its headers does. Else a line that sends headers and then breaks every answer off
   * would cost failureThreshold calls, not one, each cooldown.
   */
  answered (index: number, ticket: Ticket): void {
    const line = this.#lines[index]
    if (line?.down !== true || !this.#speaks(line, ticket)) return
    const previous = this.#state(line)
    this.#restore(line)
    line.unproven = true
    this.#changed(line, previous)
  }

  /** The line answered whole: trusted again, its count of failures reset. */
  succeeded (index: number, ticket: Ticket): void {
    const line = this.#lines[index]
    if (line === undefined || !this.#speaks(line, ticket)) return
    const previous = this.#state(line)
    line.failures = 0
    line.unproven = false
    this.#restore(line)
    if (previous !== 'up') this.#changed(line, previous)
    else remember(line, false)
  }

  /** Up again, judged afresh. */
  #restore (line: Line): void {
    if (line.down) line.recent = []
    line.down = false
    line.probing = false
  }

  /**
   * The line failed (refused, reset before or during its answer, a quick call timed out, 502/503). A line that is
   * skipped and fails again (its trial call, or a call that gave its trial place up) is put back to sleep.
   */
  failed (index: number, ticket: Ticket): void {
    const line = this.#lines[index]
    if (line === undefined || !this.#speaks(line, ticket)) return
    const previous = this.#state(line)
    line.failures++
    if (!line.down) remember(line, true)
    if (line.down || line.unproven || line.failures >= this.#opts.failureThreshold || (this.#flaky(line) && this.#anotherUp(line))) {
      if (!line.down) line.downs++
      line.down = true
      line.unproven = false
      line.probing = false
      line.downUntil = this.#opts.now() + this.#opts.cooldownMs
      if (previous !== 'down') this.#changed(line, previous)
    }
  }

  /** Whether the line's one trial call is in flight: right after pick(), whether that call is the trial. */
  onTrial (index: number): boolean {
    return this.#lines[index]?.probing === true
  }

  /**
   * The trial call's request has a connection, and its answer takes as long as the model does (a generation: up to
   * upstream.generationTimeoutMs). Holding the trial until then would refuse every other call for that long, so its
   * place is given up: the next call is tried as well, and the first answer decides (a failure puts the line back
   * to sleep, a response restores it).
   */
  trialConnected (index: number, ticket: Ticket): void {
    const line = this.#lines[index]
    if (this.#holdsTrial(line, ticket)) line.probing = false
  }

  /**
   * A call ended without telling anything about the line (the client left): the trial slot it holds is free again
   * (one that gave its place up holds none: the trial since is another call's).
   */
  released (index: number, ticket: Ticket): void {
    const line = this.#lines[index]
    if (this.#holdsTrial(line, ticket)) {
      line.probing = false
      this.#changed(line, 'half-open')
    }
  }

  /** While every line is down: ms until the first of them gets its trial call (0 when one is being tried now). */
  soonestRetryMs (): number {
    const now = this.#opts.now()
    return Math.max(0, Math.min(...this.#lines.map(line => line.probing ? 0 : line.downUntil - now)))
  }

  statuses (): LineStatus[] {
    return this.#lines.map(line => this.#status(line))
  }

  /** Half or more of its last RECENT_CALLS calls failed. */
  #flaky (line: Line): boolean {
    return line.recent.length === RECENT_CALLS && line.recent.filter(Boolean).length * 2 >= RECENT_CALLS
  }

  #anotherUp (line: Line): boolean {
    return this.#lines.some(other => other !== line && !other.down)
  }

  #state (line: Line): LineState {
    return !line.down ? 'up' : line.probing ? 'half-open' : 'down'
  }

  #status (line: Line): LineStatus {
    const state = this.#state(line)
    return {
      index: line.index,
      url: line.url,
      state,
      failures: line.failures,
      retryInMs: state === 'down' ? Math.max(0, Math.ceil(line.downUntil - this.#opts.now())) : null
    }
  }

  #changed (line: Line, previous: LineState): void {
    this.#opts.onChange?.(this.#status(line), previous)
  }
}

function remember (line: Line, failed: boolean): void {
  line.recent.push(failed)
  if (line.recent.length > RECENT_CALLS) line.recent.shift()
}
