// The upstream token never comes back to a client, even when the upstream writes it into an answer (an error
// message quoting the key it was given, as some OpenAI-compatible services do). Taken out, each occurrence
// replaced by REDACTED:
// - from the response headers the client gets (and the upstream request id the audit keeps), and those the log
//   quotes: percent-encoded too (a redirect's location), and spelled across a header's repeated lines;
// - from answers the gateway reads whole: every error answer, and the JSON answers it rewrites. Searched as bytes
//   (the token as written, and, in a text that holds a backslash or a `%`, with any character of it a JSON escape
//   or percent-encoded, as a URL built with it spells it: `\/`, `\u0073`, `%73`), before anything parses them: no
//   string of the parsed answer can then hold it, and it is not walked again string by string (which took a 15 MiB
//   answer some 40 ms, and overflowed the stack on a deep one);
// - from each event of a 2xx event stream (Responses): a JSON event's data string by string, and every event's
//   bytes as written (comments, names and ids, data in plain text);
// - from every other 2xx answer, passed on unchanged otherwise (a list of items): read whole when short (searched
//   as bytes, as above), else searched as it streams through (`stream`, which reads JSON escapes in the token's
//   place as it goes).
// The tokens searched for are the one in force and the few before it: an answer to a call sent before a rotation
// may quote the token it was sent with.
import { Transform } from 'node:stream'
import { brotliDecompressSync, gunzipSync, inflateRawSync, inflateSync } from 'node:zlib'

export const REDACTED = '[redacted]'
const REDACTED_BYTES = Buffer.from(REDACTED)
/**
 * What replaces a spelling that starts with an escape whose backslash is itself escaped (`\\u0073k-…`, the text
 * `\u0073k-…` once parsed: the token's characters but its first, as written): the escaping backslash before it then
 * escapes this one, so the JSON stays valid (`\\[redacted]`, read as `\[redacted]`).
 */
const ESCAPED_REDACTED_BYTES = Buffer.from(`\\${REDACTED}`)
const EMPTY = Buffer.alloc(0)
/** Tokens remembered: the one in force and those before it (one rotation's overlap needs two). */
const REMEMBERED_TOKENS = 4
/**
 * Shorter tokens are not searched for: replacing every `x` or `abc` would mangle answers, and a token that short
 * is no secret to keep (no real OhMyGPT token is; the tests' placeholder tokens are).
 */
export const MIN_SCRUBBED_LENGTH = 8
const BACKSLASH = 0x5c
const PERCENT = 0x25

/** Anything searchable: a string or bytes, with the length and the indexOf both have. */
interface Haystack { length: number, indexOf: (find: never, from: number) => number }

/**
 * The matches of any of `finds` in `text`, left to right, in one pass: at each place the longest spelling that
 * matches there wins, and what was put in is never searched again (a token inside `[redacted]` stays put). As
 * [from, to) spans of the text between them, and where the last match ends.
 */
function matches<T extends Haystack> (text: T, finds: readonly T[]): { parts: Array<[number, number]>, end: number } {
  const parts: Array<[number, number]> = []
  let from = 0
  for (;;) {
    let at = -1
    let size = 0
    for (const find of finds) {
      const i = text.indexOf(find as never, from)
      if (i !== -1 && (at === -1 || i < at || (i === at && find.length > size))) {
        at = i
        size = find.length
      }
    }
    if (at === -1) break
    parts.push([from, at])
    from = at + size
  }
  return { parts, end: from }
}

/** `text` with every match of any of `finds` replaced, by `join` given the spans between them; `text` itself with none. */
function replaceAll<T extends Haystack> (text: T, finds: readonly T[], join: (parts: Array<[number, number]>) => T): T {
  const { parts, end } = matches(text, finds)
  if (parts.length === 0) return text
  parts.push([end, text.length])
  return join(parts)
}

/** No spelling of a token starts here. */
const NONE = -1
/** The text ends before it can tell whether one does. */
const PARTIAL = -2
const HEX_DIGITS = new Int8Array(256).fill(-1)
for (const [i, digit] of [...'0123456789abcdef'].entries()) {
  HEX_DIGITS[digit.charCodeAt(0)] = i
  HEX_DIGITS[digit.toUpperCase().charCodeAt(0)] = i
}

/**
 * The number the `count` hex digits (either case) at `from` write: NONE when one is no hex digit, `out` when the text
 * ends first.
 */
function hexAt (text: Buffer, from: number, count: number, out: number): number {
  let code = 0
  for (let i = from; i < from + count; i++) {
    if (i >= text.length) return out
    const digit = HEX_DIGITS[text[i]!]!
    if (digit === -1) return NONE
    code = code * 16 + digit
  }
  return code
}

/**
 * Where `char` (a byte of a token: printable ASCII) spelled as a JSON escape ends, at the backslash at `at`:
 * `\u0073` (hex in either case), or `\/`, `\"`, `\\` for those three.
 */
function escapeEnd (text: Buffer, at: number, char: number, out: number): number {
  if (at + 1 >= text.length) return out
  const next = text[at + 1]!
  if (next === char && (char === 0x2f || char === 0x22 || char === BACKSLASH)) return at + 2
  if (next !== 0x75) return NONE
  const code = hexAt(text, at + 2, 4, out)
  return code < 0 ? code : code === char ? at + 6 : NONE
}

/**
 * Where `char` (a byte of a token) spelled percent-encoded ends, at the `%` at `at`: `%73` (hex in either case), as a
 * URL built with the token spells it.
 */
function percentEnd (text: Buffer, at: number, char: number, out: number): number {
  const code = hexAt(text, at + 1, 2, out)
  return code < 0 ? code : code === char ? at + 3 : NONE
}

/** The later of two ends; PARTIAL when either cannot tell yet (more text could make it the longer). */
function longer (a: number, b: number): number {
  return a === PARTIAL || b === PARTIAL ? PARTIAL : Math.max(a, b)
}

/**
 * Where a spelling of `token` from its character `k` on, starting at `at` in `text`, ends: each character as
 * written, as a JSON escape (escapeEnd) or percent-encoded (percentEnd). NONE, or `out` when the text ends first.
 */
function spellingEnd (text: Buffer, at: number, token: string, k: number, out: number): number {
  for (; k < token.length; k++) {
    if (at >= text.length) return out
    const char = token.charCodeAt(k)
    const byte = text[at]!
    if (byte !== BACKSLASH && byte !== PERCENT) {
      if (byte !== char) return NONE
      at++
      continue
    }
    const escaped = byte === PERCENT ? percentEnd(text, at, char, out) : escapeEnd(text, at, char, out)
    // A backslash or percent sign of the token's own, as written, or escaped (`\\`, `%25`): both are tried.
    if (char === byte) {
      return longer(spellingEnd(text, at + 1, token, k + 1, out), escaped < 0 ? escaped : spellingEnd(text, escaped, token, k + 1, out))
    }
    if (escaped < 0) return escaped
    at = escaped
  }
  return at
}

/**
 * The spans of `body` with REDACTED between them; `escaped` holds the index of each span that follows a spelling
 * starting after an odd run of backslashes (ESCAPED_REDACTED_BYTES there).
 */
function joinBytes (body: Buffer, parts: Array<[number, number]>, escaped?: ReadonlySet<number>): Buffer {
  return Buffer.concat(parts.flatMap(([from, to], i) => i === 0
    ? [body.subarray(from, to)]
    : [escaped?.has(i) === true ? ESCAPED_REDACTED_BYTES : REDACTED_BYTES, body.subarray(from, to)]))
}

/**
 * Whether the backslashes right before `at` (none before `from`, where a replacement ends; before the text's start,
 * `oddBefore` says) are an odd run: the backslash at `at` is then escaped by them, not the start of an escape.
 */
function escapedAt (text: Buffer, at: number, from: number, oddBefore: boolean): boolean {
  let i = at - 1
  while (i >= from && text[i] === BACKSLASH) i--
  const odd = (at - 1 - i) % 2 === 1
  return i < 0 ? odd !== oddBefore : odd
}

/** Whether `text`, passed on after text whose trailing backslashes were an odd run when `oddBefore`, ends in one. */
function endsInOddBackslashes (text: Buffer, oddBefore: boolean): boolean {
  return escapedAt(text, text.length, 0, oddBefore)
}

/**
 * A search of `text` (after text whose trailing backslashes were an odd run when `oddBefore`): the text with every
 * spelling found replaced, up to where it ends too soon to tell (nowhere when `final`), and the rest.
 */
type Search = (text: Buffer, final: boolean, oddBefore?: boolean) => [Buffer, Buffer]

/**
 * What searches bytes for every spelling of `tokens` (printable ASCII, as the config requires): each character as
 * written, as a JSON escape (`\u0073`, `\/`) or percent-encoded (`%73`, as in a URL built with the token). The searcher gives the text with every spelling found replaced, up
 * to the first place where the text ends too soon to tell (none when `final`), and the rest.
 */
function spellingSearch (tokens: readonly string[]): Search {
  // Where a spelling can start (in increasing order, each looked at once): where a token is found as written
  // (indexOf, quick), a place less than a token's length before a backslash or a `%` (the first character it escapes
  // is within the token), and a place near the end of what has come so far (a spelling the next chunk may end).
  const literals = tokens.map(token => Buffer.from(token))
  const maxLength = Math.max(...tokens.map(token => token.length))
  const maxSpelling = 6 * maxLength // every character as `\uXXXX`
  // A backslash is part of a spelling only as an escape of one of a token's characters: `\u` for any, `\/`, `\"`,
  // `\\` (or a backslash as written) only for those three. With tokens holding none of them (`sk-...`), only `\u`
  // is looked for: an answer full of `\"` (a tool call's JSON arguments, code) is then searched at indexOf's pace,
  // not with a search and a look per escape, which took a 10 MiB one about 250 ms in which the gateway served no one.
  const escapes = tokens.some(token => /[\\/"]/.test(token)) ? BACKSLASH : Buffer.from('\\u')
  const isStart = new Uint8Array(256)
  isStart[BACKSLASH] = 1
  isStart[PERCENT] = 1
  for (const token of tokens) isStart[token.charCodeAt(0)] = 1
  // A `%` is looked at only as the escape of one of the tokens' characters: text full of `%` (`50%`, `%20`) is then
  // searched at indexOf's pace too.
  const inTokens = new Uint8Array(256)
  for (const token of tokens) for (let i = 0; i < token.length; i++) inTokens[token.charCodeAt(i)] = 1
  return (text: Buffer, final: boolean, oddBefore = false): [Buffer, Buffer] => {
    const out = final ? NONE : PARTIAL
    const firstStart = (from: number, to: number): number => {
      while (from < to && isStart[text[from]!] === 0) from++
      return from
    }
    // the next place each is found from `look` on (found again only once `look` is past it)
    const nextOf = (find: Buffer | number, found: number, look: number): number => {
      if (found >= look) return found
      const at = text.indexOf(find, look)
      return at === -1 ? text.length : at
    }
    /** the next `%` from `look` on that escapes a character of the tokens, or that the text ends too soon after */
    const nextPercent = (found: number, look: number): number => {
      if (found >= look) return found
      for (let at = text.indexOf(PERCENT, look); at !== -1; at = text.indexOf(PERCENT, at + 1)) {
        const code = hexAt(text, at + 1, 2, PARTIAL)
        if (code === PARTIAL || (code >= 0 && inTokens[code] === 1)) return at
      }
      return text.length
    }
    const found = literals.map(() => -1)
    let backslash = -1
    let percent = -1
    const tail = Math.max(0, text.length - maxSpelling)
    const parts: Array<[number, number]> = []
    let escaped: Set<number> | undefined
    let from = 0
    let look = 0
    let at: number
    for (;;) {
      at = text.length
      for (let i = 0; i < literals.length; i++) {
        found[i] = nextOf(literals[i]!, found[i]!, look)
        at = Math.min(at, found[i]!)
      }
      backslash = nextOf(escapes, backslash, look)
      percent = nextPercent(percent, look)
      const escape = Math.min(backslash, percent)
      if (escape < at) at = firstStart(Math.max(look, escape - maxLength + 1), escape)
      if (Math.max(look, tail) < at) at = firstStart(Math.max(look, tail), at)
      if (at === text.length) break
      let end = NONE
      for (const token of tokens) end = longer(end, spellingEnd(text, at, token, 0, out))
      if (end === PARTIAL) break
      if (end === NONE) {
        look = at + 1
        continue
      }
      parts.push([from, at])
      if (text[at] === BACKSLASH && escapedAt(text, at, from, oddBefore)) (escaped ??= new Set()).add(parts.length)
      from = look = end
    }
    parts.push([from, at])
    const done = parts.length > 1 ? joinBytes(text, parts, escaped) : at === text.length ? text : text.subarray(0, at)
    return [done, text.subarray(at)]
  }
}

export class TokenScrubber {
  readonly #current: () => string
  /** the tokens remembered, newest first */
  #tokens: string[] = []
  /** their spellings as bytes: as written, and as JSON.stringify escapes them */
  #bytes: Buffer[] = []
  /** what finds them spelled with any JSON escapes; null while there is no token to search for */
  #search: Search | null = null

  constructor (current: () => string) {
    this.#current = current
  }

  /** The token to send a call with now. Remembered, so that an answer quoting it is scrubbed after a rotation. */
  token (): string {
    const token = this.#current()
    if (this.#tokens[0] !== token && token.length >= MIN_SCRUBBED_LENGTH) {
      this.#tokens = [token, ...this.#tokens.filter(t => t !== token)].slice(0, REMEMBERED_TOKENS)
      const spellings = new Set(this.#tokens.flatMap(t => [t, JSON.stringify(t).slice(1, -1)]))
      this.#bytes = [...spellings].map(t => Buffer.from(t))
      this.#search = spellingSearch(this.#tokens)
    }
    return token
  }

  /** `text` with every token replaced, or `text` itself when it holds none. */
  text (text: string): string {
    this.token()
    return replaceAll(text, this.#tokens, parts => parts.map(([from, to]) => text.slice(from, to)).join(REDACTED))
  }

  /**
   * An upstream header's value (one line, or its repeated lines) with every token replaced, as the client and the log
   * may have it. A value that holds a token percent-encoded (a URL's query, escaped once or more) goes decoded, the
   * token replaced; any other as it came. Undefined for lines that spell a token only together: each passed on alone,
   * the token would go in halves.
   */
  header (value: string): string
  header (value: string | string[]): string | string[] | undefined
  header (value: string | string[]): string | string[] | undefined {
    if (typeof value === 'string') return this.#headerLine(value)
    const lines = value.map(line => this.#headerLine(line))
    const joined = lines.join('')
    return this.#headerLine(joined) === joined ? lines : undefined
  }

  #headerLine (line: string): string {
    const clean = this.text(line)
    if (!clean.includes('%')) return clean
    const decoded = percentDecoded(clean)
    const decodedClean = this.text(decoded)
    return decodedClean === decoded ? clean : decodedClean
  }

  /**
   * `body` with every spelling of every token replaced as bytes, or `body` itself when it holds none: as written,
   * and, in a text with a backslash or a `%`, with any character of it a JSON escape (`\u0073`, `\/`) or
   * percent-encoded (`%73`), whether or not the text parses as JSON here. A client's reader may take what JSON.parse refuses: the SDKs read a body that
   * starts with a byte order mark, Python's reads NaN.
   */
  bytes (body: Buffer): Buffer {
    this.token()
    if (this.#search !== null && (hasEscapes(body) || body.includes(PERCENT))) return this.#search(body, true)[0]
    return replaceAll(body, this.#bytes, parts => joinBytes(body, parts))
  }

  /**
   * A stream that passes bytes on with every token replaced, however it is spelled (as written, any character of
   * it as a JSON escape: `\u0073`, `\/`, or percent-encoded: `%73`) and however it is cut between chunks: the end
   * of a chunk that could begin one (`s`, `sk-...`, `\u00`, `%7`) is held back until the next chunk or the end; the rest goes on at once. Null when
   * there is nothing to search for (a token too short to be one).
   */
  stream (): Transform | null {
    this.token()
    const search = this.#search
    if (search === null) return null
    let held: Buffer = EMPTY
    // whether what has gone on ends in an odd run of backslashes (the next byte is escaped by it)
    let oddBefore = false
    let started = false
    return new Transform({
      transform (chunk: Buffer, _encoding, done) {
        const text = held.length === 0 ? chunk : Buffer.concat([held, chunk])
        if (!started) {
          // (its first two bytes tell)
          if (text.length < 2) {
            held = text
            done()
            return
          }
          if (isWideText(text)) {
            done(new Error(WIDE_TEXT))
            return
          }
          started = true
        }
        const [out, rest] = search(text, false, oddBefore)
        held = rest
        oddBefore = endsInOddBackslashes(out, oddBefore)
        if (out.length === 0) done()
        else done(null, out)
      },
      flush (done) {
        const [out] = search(held, true, oddBefore)
        done(null, out.length === 0 ? undefined : out)
      }
    })
  }

  /**
   * A parsed JSON answer with the tokens taken out of every string (and key), or `value` itself when it holds
   * none. Only needed when its text had backslash escapes (`hasEscapes`), for a value the gateway parses before
   * its bytes are searched (a streamed event).
   */
  json (value: unknown): unknown {
    const walk = (v: unknown): unknown => {
      if (typeof v === 'string') return this.text(v)
      if (v === null || typeof v !== 'object') return v
      if (Array.isArray(v)) {
        const items = v.map(walk)
        return items.some((item, i) => item !== v[i]) ? items : v
      }
      let changed = false
      // No prototype: a "__proto__" key (JSON.parse makes it an own property) stays a key.
      const out = Object.create(null) as Record<string, unknown>
      for (const [k, item] of Object.entries(v)) {
        const key = this.text(k)
        const next = walk(item)
        if (key !== k || next !== item) changed = true
        out[key] = next
      }
      return changed ? out : v
    }
    return walk(value)
  }
}

/**
 * A printable ASCII character but space percent-encoded (`%2D`, `%2d`): each of a token's may be, in a URL (a token
 * is made of those alone). No other is decoded: a header's value never gets a line break (`%0D%0A`) it did not have.
 */
const PERCENT_ASCII = /%(2[1-9A-Fa-f]|[3-6][0-9A-Fa-f]|7[0-9A-Ea-e])/g
/** Escaped more often than this (`%252D` is twice), a URL is no one's: what is left is kept as it is. */
const PERCENT_ROUNDS = 4

/** `text` with its percent-encoded ASCII characters decoded, as often as they were encoded (up to PERCENT_ROUNDS). */
function percentDecoded (text: string): string {
  for (let round = 0; round < PERCENT_ROUNDS; round++) {
    const next = text.replace(PERCENT_ASCII, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)))
    if (next === text) break
    text = next
  }
  return text
}

export const WIDE_TEXT = 'the answer is in UTF-16 or UTF-32, which is not searched for the token'

/**
 * Whether bytes read as UTF-16 or UTF-32 to a JSON reader that tells the encoding from them, as Python's does (and
 * so the Python SDK; RFC 4627's rule): a byte order mark of either, or a zero byte among the first two. The token is
 * searched for in UTF-8 (and ASCII), in which each of its characters is one byte: such an answer cannot be searched,
 * and is not passed on.
 */
export function isWideText (body: Buffer): boolean {
  if (body.length < 2) return false
  const [a, b] = [body[0], body[1]]
  return a === 0 || b === 0 || (a === 0xfe && b === 0xff) || (a === 0xff && b === 0xfe)
}

export const FOREIGN_CHARSET = 'the answer\'s content-type names a charset other than UTF-8, in which the token is not searched for'
/** Charsets a client decodes the bytes in as the gateway searches them: UTF-8, and ASCII within it. */
const SEARCHED_CHARSETS = new Set(['utf-8', 'utf8', 'us-ascii', 'ascii'])

/**
 * Whether a Content-Type names a charset other than UTF-8 (or US-ASCII). A client that decodes by it (the Python
 * SDK reads an error answer's text so, and any answer not JSON) could read the token where the gateway, searching
 * the bytes as UTF-8, found none: `+AHM-k-...` is `sk-...` in UTF-7, and ISO-2022-JP's escape sequences decode to
 * nothing between its characters.
 */
export function hasForeignCharset (contentType: string | string[] | undefined): boolean {
  const type = Array.isArray(contentType) ? contentType.join(';') : contentType ?? ''
  for (const [, extended, charset] of type.matchAll(/;\s*charset(\*[^=;]*)?\s*=\s*("[^"]*"|[^;]*)/gi)) {
    // RFC 2231's form (`charset*=utf-8''utf-7`, `charset*0=utf; charset*1=-7`), which Python's email parser (httpx's)
    // reads as the charset: no upstream writes UTF-8 so, and its pieces alone do not say the charset.
    if (extended !== undefined) return true
    if (!SEARCHED_CHARSETS.has(charset!.replace(/^"|"$/g, '').trim().toLowerCase())) return true
  }
  return false
}

/** Whether a JSON text holds any backslash escape (only then can a string's value differ from its bytes). */
export function hasEscapes (body: Buffer): boolean {
  return body.includes(BACKSLASH)
}

const DECODERS: Record<string, (buf: Buffer, maxBytes: number) => Buffer> = {
  gzip: (buf, max) => gunzipSync(buf, { maxOutputLength: max }),
  'x-gzip': (buf, max) => gunzipSync(buf, { maxOutputLength: max }),
  // HTTP's deflate is zlib-wrapped; some servers send it raw.
  deflate: (buf, max) => {
    try {
      return inflateSync(buf, { maxOutputLength: max })
    } catch {
      return inflateRawSync(buf, { maxOutputLength: max })
    }
  },
  br: (buf, max) => brotliDecompressSync(buf, { maxOutputLength: max })
}

/**
 * An answer's bytes as the client would read them once decoded, for searching: `body` itself without a
 * content-encoding. Throws for an encoding the gateway cannot decode, or bytes that do not decode (the answer is
 * then not passed on: it could not be searched).
 */
export function decodedBody (body: Buffer, contentEncoding: string | string[] | undefined, maxBytes: number): Buffer {
  const codings = (Array.isArray(contentEncoding) ? contentEncoding.join(',') : contentEncoding ?? '')
    .split(',').map(c => c.trim().toLowerCase()).filter(c => c !== '' && c !== 'identity')
  let out = body
  // Applied in the order listed: undone last to first.
  for (const coding of codings.reverse()) {
    const decode = DECODERS[coding]
    // (Not named: the header is the upstream's text, which may quote the token, and this message is logged.)
    if (decode === undefined) throw new Error('the answer\'s content-encoding cannot be decoded (gzip, deflate and br can)')
    out = decode(out, maxBytes)
  }
  return out
}
