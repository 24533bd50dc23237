// The upstream answering 401: it refuses the gateway's own token (upstream.apiKey), revoked or mistyped. Then it
// refuses every call, so a line per call would flood the log (hundreds a second under load) and bury the rest.
// The first refusal of a token is logged at error at once; then at most one line per REFUSED_LOG_INTERVAL_MS while
// refusals go on, each saying how many calls were refused since the line before. A new token (a reload) whose
// first call is refused is logged at once: that is news, not more of the same.
import type { FastifyBaseLogger } from 'fastify'
import { EveryInterval } from '../logging.js'

export const REFUSED_LOG_INTERVAL_MS = 10_000

export class RefusedTokenLog {
  #token: string | null = null
  /** refusals since start, of any token (gateway_upstream_token_refused_total) */
  total = 0
  #lines: EveryInterval
  readonly #now: () => number

  constructor (now: () => number = Date.now) {
    this.#now = now
    this.#lines = new EveryInterval(REFUSED_LOG_INTERVAL_MS, now)
  }

  /** A call was refused with `token` (the one in force now); `log` is the call's logger (its request id). */
  refused (log: FastifyBaseLogger, token: string): void {
    this.total++
    if (token !== this.#token) {
      this.#token = token
      this.#lines = new EveryInterval(REFUSED_LOG_INTERVAL_MS, this.#now)
    }
    const line = this.#lines.admit()
    if (line === null) return
    const refusedCalls = line.held + 1 // (this call's too)
    log.error({ upstreamStatus: 401, refusedCalls },
      line.first
        ? 'the upstream refused the gateway\'s token (upstream.apiKey)'
        : `the upstream refused the gateway's token (upstream.apiKey): ${refusedCalls} calls since the last line`)
  }
}
