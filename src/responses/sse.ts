// Server-Sent Events passed through as whole events: each event goes out with the chunk its blank line came in
// (nothing is buffered whole; the events of one chunk go out together, in one write). A burst is passed on in
// slices, between which the event loop serves everyone else, and no faster than the client reads (SLICE_EVENTS).
// The event's data (its `data:` lines joined with newlines, as the SSE spec has a client do) is handed to `rewrite`
// when it is JSON; `rewrite` may return another object (the gateway takes its owner key out) or the same one, and
// then the event's bytes pass as they came (a rewritten one keeps its numbers as they came: http/json.ts). Lines
// end with LF, CRLF or CR (all three are SSE). An event whose data is not JSON (`data: [DONE]`), comments and other
// fields are not rewritten; an event with no data at all (`event: ping`), or only empty data, which the SDKs would
// fail to parse, goes out as comment lines (asComments); a body that is no event but a bare JSON error, an `error`
// event whose data is plain text, none, or an object not OpenAI's error event, and an event of an error object alone
// go out as OpenAI's error event (errorEvent, textError, objectError). Every event, whatever it
// holds, goes out through `passing` (the gateway takes the upstream token out of its bytes: upstream/scrub.ts).
import { Transform, type TransformCallback } from 'node:stream'
import { parseExact, stringifyExact } from '../http/json.js'
import { isObject } from '../ownership/owners.js'
import { isWideText, WIDE_TEXT } from '../upstream/scrub.js'

const UTF8_BOM = Buffer.from([0xef, 0xbb, 0xbf])

/** An event's data, parsed, and its text as it came (before any rewrite). */
export type EventRewrite = (data: unknown, text: string) => unknown

const LF = 0x0a
const CR = 0x0d
const COLON = 0x3a
/**
 * What each piece of an event held (a line, or the part of one a chunk brought) costs beyond its bytes: an object
 * of its own in the heap and its place in an array, about 130 bytes (measured on Node 20). Counted against the
 * event's bound with its bytes, so that the bound holds for memory: 16 MiB of two-byte lines held by bytes alone
 * was 8 million pieces, over 1 GiB for one stream.
 */
const PIECE_COST = 128
/**
 * How much a slice passes on before the rewriter hands the event loop over (setImmediate) to everyone else, events
 * or bytes, whichever comes first. An upstream that replays a long finished response (a streamed retrieve) sends
 * as fast as the network allows: a socket read brings up to 2 MiB at once, 100,000 small events in a few reads,
 * and Node's stream flow would run every event through its checks in one turn (tens of microseconds each: half a
 * second in which no other client is served). A slice of 128 events costs a few milliseconds.
 */
export const SLICE_EVENTS = 128
const SLICE_BYTES = 64 * 1024

export class SseRewriter extends Transform {
  readonly #rewrite: EventRewrite
  /** pushed before the stream is destroyed with the error a rewrite threw (an event the gateway refuses to pass) */
  readonly #failedEvent: Buffer | null
  /**
   * The stream's first byte, until the next tells what the stream is written in: null once told. An event stream is
   * UTF-8 (the SSE spec's only encoding); one in UTF-16 or UTF-32 could not be searched for the token, and its lines
   * would go on as comments that the SDKs skip but the bytes still hold: it is failed at its start.
   */
  #head: Buffer | null = Buffer.alloc(0)
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
   * it is whole, and an upstream that drips one in (never silent for bodyTimeoutMs) would hold it for hours. Time
   * the client leaves what went out unread is not counted against the upstream.
   */
  readonly #maxEventMs: number
  #eventClock: NodeJS.Timeout | null = null
  /** the bytes of whole events (and comments) on their way out, rewritten or not: a slice's at a time */
  readonly #passing: (events: Buffer) => Buffer
  /**
   * Asked when the upstream has ended the stream, once every whole event has passed: null when the stream may end
   * there, else the event to end it with (it lacks its last event), after which the stream fails. An event the
   * upstream left without its blank line is then not passed on: a client drops it unread (SSE), so it cannot be
   * the stream's last event.
   */
  readonly #unfinished: () => Buffer | null
  /**
   * Asked when the upstream has broken the stream off, once every whole event before the break has passed: true when
   * the stream's last event had come, and then it ends cleanly (nothing the client needs was lost: told of a break,
   * an SDK user would take the whole response for a failed one, and generate it again).
   */
  readonly #ended: () => boolean
  /**
   * Told once the stream's last event has passed (`ended`), after which nothing more is taken or goes out: the
   * upstream is let go of and the stream ended there (an upstream that holds its connection open after the answer
   * would otherwise hold the client's stream open too, as long as it is silent for less than its timeout).
   */
  readonly #over: () => void
  /** the stream's last event has passed */
  #lastPassed = false
  /** cut(): nothing more goes out */
  #cut = false
  /** _flush has run: what the stream ends with has gone out */
  #flushed = false
  /** breakOff(): what ends the stream once what came before it has passed */
  #brokenOff: { event: Buffer, err: Error } | null = null
  /** an event or a comment has gone out */
  #passedAny = false
  /** an event (not a comment, nor a blank line alone) has gone out */
  #passedEvent = false
  /** the whole events (and comments) of the slice under way, pushed together when it ends: one write, not one each */
  #out: Buffer[] = []
  /** what the slices since the event loop last had its turn passed on */
  #sliceEvents = 0
  #sliceBytes = 0
  /** the rest of a slice, when the client had not read what went out before it (run as it reads: _read) */
  #whenRead: (() => void) | null = null

  constructor (rewrite: EventRewrite, failedEvent: Buffer | null = null, maxEventBytes = Infinity, maxEventMs = Infinity,
    passing: (events: Buffer) => Buffer = events => events, unfinished: () => Buffer | null = () => null,
    ended: () => boolean = () => false, over: () => void = () => {}) {
    super()
    this.#rewrite = rewrite
    this.#passing = passing
    this.#unfinished = unfinished
    this.#ended = ended
    this.#over = over
    this.#failedEvent = failedEvent
    this.#maxEventBytes = maxEventBytes
    this.#maxEventMs = maxEventMs
  }

  /**
   * Ends what goes out with `event`, at an event boundary (an event under way is never passed on in part), and lets
   * nothing through after it: a stream the gateway itself ends (the end of a shutdown's grace). False when the
   * stream is over already. An upstream that has ended while slices still wait for their turn (or for the client)
   * is not over yet: those slices do not go out, the event does.
   */
  cut (event: Buffer): boolean {
    if (this.#cut || this.#lastPassed || this.destroyed || this.#flushed) return false
    this.#cut = true
    this.#stopEventClock()
    this.push(event)
    return true
  }

  /**
   * A comment line of the gateway's own (`: keep-alive`), which no SDK reads as an event, while none of the upstream's
   * events has gone out and the stream is not over: the answer's headers go out with the first one. An upstream's
   * comment (a relay's `: PROCESSING` at once, then nothing while the model thinks) does not stop them: the client's
   * reads wait for the first event all the same. False otherwise.
   */
  keepAlive (): boolean {
    if (this.#passedEvent || this.#cut || this.#lastPassed || this.destroyed || this.#flushed || this.#brokenOff !== null) return false
    this.push(KEEP_ALIVE)
    return true
  }

  /**
   * The upstream broke the stream off (`err`): the whole events that came before the break still pass, those of
   * slices waiting for their turn included, then `event`, and the stream fails with `err` (never ended cleanly as
   * if whole), unless its last event had come (`ended`). An event the break cut in two is not passed on.
   */
  breakOff (event: Buffer, err: Error): void {
    if (this.#cut || this.#lastPassed || this.destroyed || this.#brokenOff !== null) return
    this.#brokenOff = { event, err }
    if (!this.writableEnded) this.end()
  }

  // A rewrite that throws fails the stream (after `failedEvent`): thrown out of a pipe's write, it would be uncaught.
  override _transform (chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    if (this.#head !== null) {
      const head = this.#head.length === 0 ? chunk : Buffer.concat([this.#head, chunk])
      // (held until its first two bytes came, three when they may begin a UTF-8 byte order mark)
      if (head.length < 2 || (head.length < UTF8_BOM.length && UTF8_BOM.subarray(0, head.length).equals(head))) {
        this.#head = head
        done()
        return
      }
      this.#head = null
      if (isWideText(head)) {
        this.#fail(new Error(WIDE_TEXT), done)
        return
      }
      // A UTF-8 byte order mark at the start is not part of the first line (the SSE spec ignores one): read with
      // it, that line would be no field of an event, and the first event (response.created) would go as a comment.
      chunk = head.subarray(0, UTF8_BOM.length).equals(UTF8_BOM) ? head.subarray(UTF8_BOM.length) : head
    }
    this.#slice(chunk, 0, done)
  }

  /**
   * Passes on the events of `chunk` from `from`, a slice at a time: past a slice's bounds, at an event boundary, the
   * rest waits for the event loop's next turn, and for the client to read what went out when it had not. Until
   * `done`, the upstream's next chunks wait in the writable side, which pauses the upstream once full.
   */
  #slice (chunk: Buffer, from: number, done: TransformCallback): void {
    if (this.#cut || this.#lastPassed || this.destroyed) {
      done()
      return
    }
    let at: number
    try {
      at = this.#take(chunk, from)
    } catch (err) {
      this.#pushOut()
      this.#fail(err as Error, done)
      return
    }
    const readOn = this.#pushOut()
    if (this.#lastPassed) {
      done()
      this.#over()
      return
    }
    if (this.#held > 0 && this.#eventClock === null && this.#maxEventMs !== Infinity) this.#startEventClock()
    if (at === chunk.length && !this.#sliceSpent()) {
      done()
      return
    }
    this.#sliceEvents = 0
    this.#sliceBytes = 0
    const rest = at === chunk.length ? done : () => { this.#slice(chunk, at, done) }
    if (readOn) setImmediate(rest)
    else this.#whenRead = () => { setImmediate(rest) }
  }

  override _read (size: number): void {
    const whenRead = this.#whenRead
    this.#whenRead = null
    if (whenRead !== null) whenRead()
    super._read(size)
  }

  #sliceSpent (): boolean {
    return this.#sliceEvents >= SLICE_EVENTS || this.#sliceBytes >= SLICE_BYTES
  }

  /** The slice's events, as one piece. False when the client has not read what went out before (back-pressure). */
  #pushOut (): boolean {
    const out = this.#out
    if (out.length === 0) return true
    this.#out = []
    return this.push(this.#passing(out.length === 1 ? out[0]! : Buffer.concat(out)))
  }

  #startEventClock (): void {
    this.#eventClock = setTimeout(() => {
      this.#eventClock = null
      if (this.destroyed) return
      // What went out waits for the client, and the rest of the event may wait behind it, untaken: the event is
      // slow on the client's side, not the upstream's (a client that reads nothing is cut by listen.sendTimeoutMs).
      if (this.readableLength >= this.readableHighWaterMark) {
        this.#startEventClock()
        return
      }
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
    this.#flushed = true
    // (a stream of one byte: a line without its ending)
    if (this.#head !== null && this.#head.length > 0) this.#line.push(this.#head)
    this.#stopEventClock()
    // A stream cut is not ended as if whole: its connection is closed after the event (app.abortInFlight).
    if (this.#cut) return
    if (this.#lastPassed) {
      done()
      return
    }
    if (this.#brokenOff !== null) {
      if (this.#ended()) {
        done()
        return
      }
      this.push(this.#brokenOff.event)
      this.#failOnceRead(this.#brokenOff.err, done)
      return
    }
    // An upstream that answered with a bare JSON error under the event-stream type (no event at all): passed on as
    // its error event, which the SDKs raise with the upstream's own message (not taken for a break, nor, for a
    // stream that need not end with a last event, for an empty stream that ended well).
    const bare = this.#passedAny ? null : errorEvent([...this.#event, ...this.#line])
    if (bare !== null) {
      try {
        this.push(this.#passing(this.#rewritten(bare)))
      } catch (err) {
        this.#fail(err as Error, done)
        return
      }
      done()
      return
    }
    const unfinished = this.#unfinished()
    if (unfinished !== null) {
      this.push(unfinished)
      this.#failOnceRead(new Error('the upstream ended the stream before its last event'), done)
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
    this.#failOnceRead(err, done)
  }

  /**
   * Fails the stream with `err` once the client has read what went out before (the event saying why last): a stream
   * failed at once drops what it still holds, and it holds what a client reading slower than a burst came has not
   * taken yet (Node 20 drops it; the SDK then raises a bare "terminated", not the event's APIError). A client that
   * never reads it is cut by listen.sendTimeoutMs.
   */
  #failOnceRead (err: Error, done: TransformCallback): void {
    this.#stopEventClock() // (the event under way fails here, not again on its clock)
    // (No reader yet: a 'data' listener would start the stream flowing into it alone.)
    if (this.readableLength === 0 || this.readableFlowing === null) {
      done(err)
      return
    }
    // ('data' is emitted once a piece has left what the stream holds, read by a pipe or by read())
    const read = () => {
      if (this.readableLength > 0) return
      this.off('data', read)
      done(err)
    }
    this.on('data', read)
  }

  /**
   * Takes `chunk`'s lines from `from` into the event under way, each whole event into the slice's output; stops
   * after a whole event once the slice is spent. Gives where it stopped (the chunk's length once all is taken).
   */
  #take (chunk: Buffer, from: number): number {
    let start = from
    if (this.#afterCR && chunk.length > 0 && chunk[0] === LF) {
      // The LF of a CRLF split across chunks: part of the line already ended.
      const last = this.#event.length
      if (last > 0) this.#event[last - 1] = Buffer.concat([this.#event[last - 1]!, chunk.subarray(0, 1)])
      else this.#out.push(chunk.subarray(0, 1))
      start = 1
    }
    this.#afterCR = false
    // Line ends found with indexOf (native), CR looked for again only once passed: most streams have none.
    let cr = chunk.indexOf(CR, start)
    while (start < chunk.length) {
      let i = chunk.indexOf(LF, start)
      if (cr !== -1 && cr < start) cr = chunk.indexOf(CR, start)
      if (cr !== -1 && (i === -1 || cr < i)) i = cr
      if (i === -1) break
      let end = i + 1
      if (chunk[i] === CR) {
        if (end === chunk.length) this.#afterCR = true
        else if (chunk[end] === LF) end++
      }
      this.#line.push(chunk.subarray(start, end))
      this.#held += end - start + PIECE_COST
      const passed = this.#endLine()
      start = end
      if (this.#lastPassed) return chunk.length
      if (passed && start < chunk.length && this.#sliceSpent()) return start
    }
    if (start < chunk.length) {
      this.#line.push(chunk.subarray(start))
      this.#held += chunk.length - start + PIECE_COST
    }
    if (this.#held > this.#maxEventBytes) throw new Error(`an event holding more than ${this.#maxEventBytes} bytes (its lines, ${PIECE_COST} bytes a piece)`)
    return chunk.length
  }

  /** Ends the line under way: true when that passed an event (or a comment) on. */
  #endLine (): boolean {
    const line = this.#line.length === 1 ? this.#line[0]! : Buffer.concat(this.#line)
    this.#line = []
    // A comment between events (`:` and anything, the keep-alive the SSE spec suggests every 15 s or so, sent
    // without a blank line after it) is no part of an event: it goes on at once, so that it keeps the client's
    // connection alive too, and no event is under way (a model that reasons for minutes behind keep-alive lines
    // is not taken for an upstream dripping one event in).
    if (this.#event.length === 0 && line[0] === COLON) {
      this.#passOn(line)
      return true
    }
    this.#event.push(line)
    if (!isBlank(line)) return false
    this.#passOn(this.#rewritten(this.#event))
    if (this.#event.length > 1) this.#passedEvent = true
    this.#event = []
    // (asked after the rewrite, which has read the event)
    if (this.#ended()) this.#lastPassed = true
    return true
  }

  #passOn (bytes: Buffer): void {
    this.#passedAny = true
    this.#out.push(bytes)
    this.#sliceEvents++
    this.#sliceBytes += bytes.length
    this.#held = 0
    this.#stopEventClock()
  }

  /**
   * One whole event: its bytes as they came, or with its data rewritten (as one `data:` line). Only its `data:`
   * lines are read as text, and the rest only when it is rewritten: this runs for every event of a burst.
   */
  #rewritten (lines: Buffer[]): Buffer {
    const raw = lines.length === 1 ? lines[0]! : Buffer.concat(lines)
    let joined: string | null = null
    for (const line of lines) {
      const value = dataValue(line)
      if (value !== null) joined = joined === null ? value : `${joined}\n${value}`
    }
    if (joined === null) {
      // (a bare JSON error the upstream ended with a blank line, as an event; without one, _flush finds it)
      const bare = this.#passedAny ? null : errorEvent(lines)
      if (bare !== null) return this.#rewritten(bare)
      return this.#textError(lines, '') ?? asComments(lines)
    }
    // Empty data (`data:` alone, `event: ping` with it, a keep-alive `data: `) is no event to the SSE spec either,
    // nor is data of blank lines alone anything the SDKs can read: they would fail parsing it as JSON just the same.
    // (An `error` event so is still the upstream's error, without its text.)
    if (joined.trim() === '') return this.#textError(lines, '') ?? asComments(lines)
    if (!/^\s*\{/.test(joined)) return this.#textError(lines, joined) ?? raw
    let parsed: unknown
    try {
      parsed = parseExact(joined)
    } catch {
      return this.#textError(lines, joined) ?? raw
    }
    const error = this.#objectError(lines, parsed, joined)
    if (error !== null) return error
    const rewritten = this.#rewrite(parsed, joined)
    if (rewritten === parsed) return raw
    let wrote = false
    const out: string[] = []
    for (const line of lines) {
      if (dataValue(line) === null) out.push(`${line.toString('utf8', 0, line.length - endingLength(line))}\n`)
      else if (!wrote) {
        out.push(`data: ${stringifyExact(rewritten, parsed)}\n`)
        wrote = true
      }
    }
    return Buffer.from(out.join(''))
  }

  /**
   * An `error` event whose data is no JSON object (a relay's `event: error` / `data: overloaded`), or none, as
   * OpenAI's error event with that text (a JSON string's value, without its quotes) as its message: both SDKs would
   * fail parsing it (a SyntaxError, a JSONDecodeError, not their APIError), losing the stream without its reason, and
   * as comment lines it would say nothing (a streamed retrieve would end as if well). Null for any other event.
   */
  #textError (lines: Buffer[], text: string): Buffer | null {
    if (!namedError(lines)) return null
    return this.#errorWith(text)
  }

  /**
   * OpenAI's error event with `text` as its message, searched first as the event's bytes would have been
   * (`passing`): once in the JSON string the message becomes, a token the text spells with escapes (`\u0073k-…`)
   * would have its backslashes doubled, and be found no more.
   */
  #errorWith (text: string): Buffer {
    const passed = this.#passing(Buffer.from(text)).toString('utf8')
    return this.#rewritten(errorEventLines({ message: errorText(passed), type: 'server_error', param: null, code: null }, null))
  }

  /**
   * An error in a JSON object that is not OpenAI's error event (`type: "error"`), as that event: an `error` event's
   * (a relay's `{"message": "overloaded"}`, `{"error": "overloaded"}`: both SDKs take it for an event of no type, and
   * a streamed retrieve ends as if well), or an event's that is an error alone (`{"error": {...}}`, which the SDKs
   * raise, but the gateway would take for no last event: audited ok; `{"error": "overloaded"}`, which the Node SDK
   * raises with its JSON quotes). The error object's own fields when it has one, else its message, else the data as
   * written. Null for any other event (OpenAI's error event included).
   */
  #objectError (lines: Buffer[], parsed: unknown, text: string): Buffer | null {
    // (OpenAI's own events, `response.failed` among them, are read by their type, whatever the event is named)
    if (!isObject(parsed) || parsed.type === 'error' || (typeof parsed.type === 'string' && parsed.type.startsWith('response.'))) return null
    const named = namedError(lines)
    if (isObject(parsed.error) && (named || parsed.type === undefined)) return this.#rewritten(errorEventLines(parsed.error, parsed))
    if (!named && (parsed.type !== undefined || typeof parsed.error !== 'string' || parsed.error === '')) return null
    const said = typeof parsed.message === 'string' ? parsed.message : typeof parsed.error === 'string' ? parsed.error : text
    return this.#errorWith(said)
  }
}

/**
 * An error event's message: the value of data that is a JSON string (`data: "overloaded"`), else its text as written.
 * No text, or a string of blanks, says nothing (the Node SDK would make its message of the whole error object): a
 * message of ours.
 */
function errorText (text: string): string {
  if (text.trim() === '') return NO_ERROR_TEXT
  if (!/^\s*"/.test(text)) return text
  try {
    const value: unknown = JSON.parse(text)
    if (typeof value !== 'string') return text
    return value.trim() === '' ? NO_ERROR_TEXT : value
  } catch {
    return text
  }
}

const NO_ERROR_TEXT = 'The upstream API reported an error in the stream without a message.'

/** An `event:` line naming `error` (its value after one optional space, as the SSE spec reads a field). */
const EVENT_ERROR = /^event: ?error(?:\r\n|\r|\n)?$/
/** `event: error` and its line end, CRLF: the longest such line. */
const EVENT_ERROR_BYTES = 14
const LETTER_E = 0x65

/** An event named `error`: asked of every JSON event, so its long lines (its data) are not read as text. */
function namedError (lines: Buffer[]): boolean {
  return lines.some(line => line.length <= EVENT_ERROR_BYTES && line[0] === LETTER_E && EVENT_ERROR.test(line.toString('latin1')))
}

/**
 * The lines of OpenAI's error event (as the Responses API streams it, with the `error` object the SDKs raise) for
 * `held`, when it is an error answer in OpenAI's envelope (`{"error": {...}}`); else null.
 */
function errorEvent (held: Buffer[]): Buffer[] | null {
  const text = Buffer.concat(held).toString('utf8')
  if (!/^\s*\{/.test(text)) return null
  let parsed: unknown
  try {
    // (its numbers as the upstream wrote them, as in every event the gateway writes anew: http/json.ts)
    parsed = parseExact(text)
  } catch {
    return null
  }
  const error = (parsed as { error?: unknown } | null)?.error
  if (!isObject(error)) return null
  return errorEventLines(error, parsed)
}

/** OpenAI's error event for `error` (read from `parsed`, whose numbers it keeps as written: http/json.ts). */
function errorEventLines (error: Record<string, unknown>, parsed: unknown): Buffer[] {
  const { code = null, message = null, param = null } = error as { code?: unknown, message?: unknown, param?: unknown }
  const data = stringifyExact({ type: 'error', code, message, param, error }, parsed)
  return [Buffer.from('event: error\n'), Buffer.from(`data: ${data}\n`), Buffer.from('\n')]
}

/**
 * An event without data (`event: ping`, an upstream's keep-alive), as comment lines without its blank line. The SSE
 * spec has a client dispatch no such event, but both official SDKs do, and parse its empty data as JSON: they throw
 * (SyntaxError, JSONDecodeError) and the stream is lost. As comments its bytes still reach the client (keeping its
 * connection alive, as they were sent to), and no decoder dispatches anything for them. A blank line alone (the one
 * after a keep-alive comment, `: ping` and a blank line) is such an event to the Python SDK once an event had an
 * `id:` (it keeps the last id, and dispatches at a blank line whenever it has one): it goes out as an empty comment.
 */
function asComments (lines: Buffer[]): Buffer {
  if (lines.length === 1 && isBlank(lines[0]!)) return Buffer.concat([COMMENT, lines[0]!])
  const out: Buffer[] = []
  for (const line of lines) {
    if (isBlank(line)) continue
    if (line[0] !== COLON) out.push(COMMENT)
    out.push(line)
  }
  return Buffer.concat(out)
}
const COMMENT = Buffer.from(':')
/** SseRewriter.keepAlive's comment. */
const KEEP_ALIVE = Buffer.from(': keep-alive\n\n')

const DATA = Buffer.from('data:')
const SPACE = 0x20

/** The value of a `data:` line (after `data:` and one space, without its line ending), or null for any other line. */
function dataValue (line: Buffer): string | null {
  if (line.length < DATA.length || DATA.compare(line, 0, DATA.length) !== 0) return null
  const from = line[DATA.length] === SPACE ? DATA.length + 1 : DATA.length
  return line.toString('utf8', from, Math.max(from, line.length - endingLength(line)))
}

/** The bytes of a line's ending: LF, CRLF, CR, or none (the last line of a stream that ends without one). */
function endingLength (line: Buffer): number {
  const last = line[line.length - 1]
  if (last === LF) return line.length > 1 && line[line.length - 2] === CR ? 2 : 1
  return last === CR ? 1 : 0
}

function isBlank (line: Buffer): boolean {
  return line.length === 1 || (line.length === 2 && line[0] === CR && line[1] === LF)
}
