// Server-Sent Events passed through one event at a time: each event goes out as soon as its blank line has
// arrived (nothing is buffered whole). The event's data (its `data:` lines joined with newlines, as the SSE spec
// has a client do) is handed to `rewrite` when it is JSON; `rewrite` may return another object (the gateway takes
// its owner key out) or the same one, and then the event's bytes pass as they came (a rewritten one keeps its
// numbers as they came: http/json.ts). Lines end with LF, CRLF or CR (all three are SSE). An event whose data is
// not JSON (`data: [DONE]`), comments and other fields are not rewritten; every event, whatever it holds, goes
// out through `passing` (the gateway takes the upstream token out of its bytes: upstream/scrub.ts).
import { Transform, type TransformCallback } from 'node:stream'
import { parseExact, stringifyExact } from '../http/json.js'

export type EventRewrite = (data: unknown) => unknown

const LF = 0x0a
const CR = 0x0d
const COLON = 0x3a
const LINE_END = /\r\n$|\n$|\r$/
/**
 * What each piece of an event held (a line, or the part of one a chunk brought) costs beyond its bytes: an object
 * of its own in the heap and its place in an array, about 130 bytes (measured on Node 20). Counted against the
 * event's bound with its bytes, so that the bound holds for memory: 16 MiB of two-byte lines held by bytes alone
 * was 8 million pieces, over 1 GiB for one stream.
 */
const PIECE_COST = 128

export class SseRewriter extends Transform {
  readonly #rewrite: EventRewrite
  /** pushed before the stream is destroyed with the error a rewrite threw (an event the gateway refuses to pass) */
  readonly #failedEvent: Buffer | null
  /** the whole lines of an event whose blank line has not come yet, each with its line ending */
  #event: Buffer[] = []
  /** the start of a line whose ending has not come yet */
  #line: Buffer[] = []
  /** the last chunk ended with CR: an LF that starts the next one ends the same line */
  #afterCR = false
  /** what the event under way holds (its bytes, and PIECE_COST a piece), and the most it may hold (an upstream
   * that never ends its event) */
  #held = 0
  readonly #maxEventBytes: number
  /**
   * How long an event may take from its first byte to its blank line: the client sees nothing of an event until
   * it is whole, and an upstream that drips one in (never silent for bodyTimeoutMs) would hold it for hours.
   */
  readonly #maxEventMs: number
  #eventClock: NodeJS.Timeout | null = null
  /** each whole event's bytes on their way out, rewritten or not */
  readonly #passing: (event: Buffer) => Buffer
  /**
   * Asked when the upstream has ended the stream, once every whole event has passed: null when the stream may end
   * there, else the event to end it with (it lacks its last event), after which the stream fails. An event the
   * upstream left without its blank line is then not passed on: a client drops it unread (SSE), so it cannot be
   * the stream's last event.
   */
  readonly #unfinished: () => Buffer | null
  /** cut(): nothing more goes out */
  #cut = false

  constructor (rewrite: EventRewrite, failedEvent: Buffer | null = null, maxEventBytes = Infinity, maxEventMs = Infinity,
    passing: (event: Buffer) => Buffer = event => event, unfinished: () => Buffer | null = () => null) {
    super()
    this.#rewrite = rewrite
    this.#passing = passing
    this.#unfinished = unfinished
    this.#failedEvent = failedEvent
    this.#maxEventBytes = maxEventBytes
    this.#maxEventMs = maxEventMs
  }

  /**
   * Ends what goes out with `event`, at an event boundary (an event under way is never passed on in part), and lets
   * nothing through after it: a stream the gateway itself ends (the end of a shutdown's grace). False when the
   * stream is over already.
   */
  cut (event: Buffer): boolean {
    if (this.#cut || this.destroyed || this.writableEnded) return false
    this.#cut = true
    this.#stopEventClock()
    this.push(event)
    return true
  }

  // A rewrite that throws fails the stream (after `failedEvent`): thrown out of a pipe's write, it would be uncaught.
  override _transform (chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    if (this.#cut) {
      done()
      return
    }
    try {
      this.#take(chunk)
    } catch (err) {
      this.#fail(err as Error, done)
      return
    }
    if (this.#held > 0 && this.#eventClock === null && this.#maxEventMs !== Infinity) this.#startEventClock()
    done()
  }

  #startEventClock (): void {
    this.#eventClock = setTimeout(() => {
      this.#eventClock = null
      if (this.destroyed) return
      if (this.#failedEvent !== null) this.push(this.#failedEvent)
      this.destroy(new Error(`an event not whole within ${this.#maxEventMs} ms of its first byte`))
    }, this.#maxEventMs).unref()
  }

  #stopEventClock (): void {
    if (this.#eventClock !== null) clearTimeout(this.#eventClock)
    this.#eventClock = null
  }

  override _destroy (err: Error | null, done: (err: Error | null) => void): void {
    this.#stopEventClock()
    done(err)
  }

  override _flush (done: TransformCallback): void {
    this.#stopEventClock()
    if (this.#cut) {
      done()
      return
    }
    const unfinished = this.#unfinished()
    if (unfinished !== null) {
      this.push(unfinished)
      done(new Error('the upstream ended the stream before its last event'))
      return
    }
    try {
      if (this.#line.length > 0) this.#event.push(Buffer.concat(this.#line))
      if (this.#event.length > 0) this.push(this.#passing(this.#rewritten(this.#event)))
    } catch (err) {
      this.#fail(err as Error, done)
      return
    }
    done()
  }

  #fail (err: Error, done: TransformCallback): void {
    if (this.#failedEvent !== null) this.push(this.#failedEvent)
    done(err)
  }

  #take (chunk: Buffer): void {
    let start = 0
    if (this.#afterCR && chunk.length > 0 && chunk[0] === LF) {
      // The LF of a CRLF split across chunks: part of the line already ended.
      const last = this.#event.length
      if (last > 0) this.#event[last - 1] = Buffer.concat([this.#event[last - 1]!, chunk.subarray(0, 1)])
      else this.push(chunk.subarray(0, 1))
      start = 1
    }
    this.#afterCR = false
    for (let i = start; i < chunk.length; i++) {
      const byte = chunk[i]
      if (byte !== LF && byte !== CR) continue
      let end = i + 1
      if (byte === CR) {
        if (end === chunk.length) this.#afterCR = true
        else if (chunk[end] === LF) end++
      }
      this.#line.push(chunk.subarray(start, end))
      this.#held += end - start + PIECE_COST
      this.#endLine()
      start = end
      i = end - 1
    }
    if (start < chunk.length) {
      this.#line.push(chunk.subarray(start))
      this.#held += chunk.length - start + PIECE_COST
    }
    if (this.#held > this.#maxEventBytes) throw new Error(`an event holding more than ${this.#maxEventBytes} bytes (its lines, ${PIECE_COST} bytes a piece)`)
  }

  #endLine (): void {
    const line = this.#line.length === 1 ? this.#line[0]! : Buffer.concat(this.#line)
    this.#line = []
    // A comment between events (`:` and anything, the keep-alive the SSE spec suggests every 15 s or so, sent
    // without a blank line after it) is no part of an event: it goes on at once, so that it keeps the client's
    // connection alive too, and no event is under way (a model that reasons for minutes behind keep-alive lines
    // is not taken for an upstream dripping one event in).
    if (this.#event.length === 0 && line[0] === COLON) {
      this.push(this.#passing(line))
      this.#held = 0
      this.#stopEventClock()
      return
    }
    this.#event.push(line)
    if (isBlank(line)) {
      this.push(this.#passing(this.#rewritten(this.#event)))
      this.#event = []
      this.#held = 0
      this.#stopEventClock()
    }
  }

  /** One whole event: its bytes as they came, or with its data rewritten (as one `data:` line). */
  #rewritten (lines: Buffer[]): Buffer {
    const raw = lines.length === 1 ? lines[0]! : Buffer.concat(lines)
    const texts = lines.map(l => l.toString('utf8').replace(LINE_END, ''))
    const data = texts.filter(t => t.startsWith('data:')).map(t => t.startsWith('data: ') ? t.slice(6) : t.slice(5))
    if (data.length === 0) return raw
    const joined = data.join('\n')
    if (!joined.trimStart().startsWith('{')) return raw
    let parsed: unknown
    try {
      parsed = parseExact(joined)
    } catch {
      return raw
    }
    const rewritten = this.#rewrite(parsed)
    if (rewritten === parsed) return raw
    let wrote = false
    const out: string[] = []
    for (const text of texts) {
      if (!text.startsWith('data:')) out.push(`${text}\n`)
      else if (!wrote) {
        out.push(`data: ${stringifyExact(rewritten, parsed)}\n`)
        wrote = true
      }
    }
    return Buffer.from(out.join(''))
  }
}

function isBlank (line: Buffer): boolean {
  return line.length === 1 || (line.length === 2 && line[0] === CR && line[1] === LF)
}
