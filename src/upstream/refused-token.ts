// The upstream answering 401: it refuses the gateway's own token (upstream.apiKey), revoked or mistyped. Then it
// refuses every call, so a line per call would flood the log (hundreds a second under load) and bury the rest.
// The first refusal of a token is logged at error at once; then at most one line per REFUSED_LOG_INTERVAL_MS while
// refusals go on, each saying how many calls were refused since the line before. A new token (a reload) whose
// first call is refused is logged at once: that is news, not more of the same.
import type { FastifyBaseLogger } from 'fastify'

export const REFUSED_LOG_INTERVAL_MS = 10_000

export class RefusedTokenLog {
  #token: string | null = null
  #lastLine = -Infinity
  /** refusals not told yet: since the last line */
  #untold = 0
  readonly #now: () => number

  constructor (now: () => number = Date.now) {
    this.#now = now
  }

  /** A call was refused with `token` (the one in force now); `log` is the call's logger (its request id). */
  refused (log: FastifyBaseLogger, token: string): void {
    const now = this.#now()
    if (token !== this.#token) {
      this.#token = token
      this.#lastLine = -Infinity
      this.#untold = 0
    }
    this.#untold++
    if (now - this.#lastLine < REFUSED_LOG_INTERVAL_MS) return
    const refusedCalls = this.#untold
    const first = this.#lastLine === -Infinity
    this.#lastLine = now
    this.#untold = 0
    log.error({ upstreamStatus: 401, refusedCalls },
      first
        ? 'the upstream refused the gateway\'s token (upstream.apiKey)'
        : `the upstream refused the gateway's token (upstream.apiKey): ${refusedCalls} calls since the last line`)
  }
}
