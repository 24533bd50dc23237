// The upstream token never comes back to a client, even when the upstream writes it into an answer (an error
// message quoting the key it was given, as some OpenAI-compatible services do). Taken out, each occurrence
// replaced by REDACTED:
// - from the response headers the client gets (and the upstream request id the audit keeps);
// - from answers the gateway reads whole: every error answer, and the JSON answers it rewrites. Searched as bytes
//   (the token as written, and as JSON.stringify escapes it); a JSON answer that holds any backslash escape is
//   also searched string by string once parsed, whatever escapes spell the token (`\/`, `\u0073`);
// - from each event of a 2xx event stream (Responses): a JSON event's data string by string, and every event's
//   bytes as written (comments, names and ids, data in plain text);
// - from every other 2xx answer, passed on unchanged otherwise (a list of items): read whole when short (and, as
//   JSON with escapes, string by string too), else searched as it streams through (`stream`: as bytes only).
// The tokens searched for are the one in force and the few before it: an answer to a call sent before a rotation
// may quote the token it was sent with.
import { Transform } from 'node:stream'
import { brotliDecompressSync, gunzipSync, inflateRawSync, inflateSync } from 'node:zlib'

export const REDACTED = '[redacted]'
const REDACTED_BYTES = Buffer.from(REDACTED)
const EMPTY = Buffer.alloc(0)
/** Tokens remembered: the one in force and those before it (one rotation's overlap needs two). */
const REMEMBERED_TOKENS = 4
/**
 * Shorter tokens are not searched for: replacing every `x` or `abc` would mangle answers, and a token that short
 * is no secret to keep (no real OhMyGPT token is; the tests' placeholder tokens are).
 */
export const MIN_SCRUBBED_LENGTH = 8
const BACKSLASH = 0x5c

/** Anything searchable: a string or bytes, with the length and the indexOf both have. */
interface Haystack { length: number, indexOf: (find: never, from: number) => number }

/**
 * The matches of any of `finds` in `text` that start before `until`, left to right, in one pass: at each place the
 * longest spelling that matches there wins, and what was put in is never searched again (a token inside
 * `[redacted]` stays put). As [from, to) spans of the text between them, and where the last match ends.
 */
function matches<T extends Haystack> (text: T, finds: readonly T[], until = text.length): { parts: Array<[number, number]>, end: number } {
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
    if (at === -1 || at >= until) break
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

/** The first place in `text` from `from` on where one of `spellings` could begin: as many of its bytes as `text` has left are there. */
function firstLive (text: Buffer, from: number, spellings: readonly Buffer[]): number {
  for (let at = from; at < text.length; at++) {
    for (const spelling of spellings) {
      if (text[at] !== spelling[0]) continue
      const n = Math.min(spelling.length, text.length - at)
      if (text.compare(spelling, 0, n, at, at + n) === 0) return at
    }
  }
  return text.length
}

/** The spans of `body` with REDACTED between them. */
function joinBytes (body: Buffer, parts: Array<[number, number]>): Buffer {
  return Buffer.concat(parts.flatMap(([from, to], i) => i === 0 ? [body.subarray(from, to)] : [REDACTED_BYTES, body.subarray(from, to)]))
}

export class TokenScrubber {
  readonly #current: () => string
  /** the tokens remembered, newest first */
  #tokens: string[] = []
  /** their spellings as bytes: as written, and as JSON.stringify escapes them */
  #bytes: Buffer[] = []

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
    }
    return token
  }

  /** `text` with every token replaced, or `text` itself when it holds none. */
  text (text: string): string {
    this.token()
    return replaceAll(text, this.#tokens, parts => parts.map(([from, to]) => text.slice(from, to)).join(REDACTED))
  }

  /** `body` with every spelling of every token replaced as bytes, or `body` itself when it holds none. */
  bytes (body: Buffer): Buffer {
    this.token()
    return replaceAll(body, this.#bytes, parts => joinBytes(body, parts))
  }

  /**
   * A stream that passes bytes on with every spelling of every token replaced, however the token is cut between
   * chunks: the end of a chunk that could begin one (`s`, `sk-...` up to a spelling's length less one) is held back
   * until the next chunk or the end; the rest goes on at once. Null when there is nothing to search for (a token
   * too short to be one).
   */
  stream (): Transform | null {
    this.token()
    const spellings = this.#bytes
    if (spellings.length === 0) return null
    const hold = Math.max(...spellings.map(s => s.length)) - 1
    let held: Buffer = EMPTY
    return new Transform({
      transform (chunk: Buffer, _encoding, done) {
        const text = held.length === 0 ? chunk : Buffer.concat([held, chunk])
        // A spelling that starts before `safe` lies whole in `text`: only one starting later can go on in the
        // next chunk. What a match ends past `safe` is passed on with it, and after that what cannot begin one.
        const safe = text.length - hold
        const { parts, end } = matches(text, spellings, safe)
        const cut = firstLive(text, Math.max(safe, end, 0), spellings)
        held = text.subarray(cut)
        if (cut === 0) {
          done()
          return
        }
        parts.push([end, cut])
        done(null, parts.length === 1 ? text.subarray(0, cut) : joinBytes(text, parts))
      },
      flush (done) {
        const { parts, end } = matches(held, spellings)
        parts.push([end, held.length])
        done(null, held.length === 0 ? undefined : parts.length === 1 ? held : joinBytes(held, parts))
      }
    })
  }

  /**
   * A parsed JSON answer with the tokens taken out of every string (and key), or `value` itself when it holds
   * none. Only needed when its text had backslash escapes (`hasEscapes`): without any, `bytes` found them all.
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
    if (decode === undefined) throw new Error(`content-encoding ${coding} cannot be decoded`)
    out = decode(out, maxBytes)
  }
  return out
}
