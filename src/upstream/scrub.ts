// The upstream token never comes back to a client, even when the upstream writes it into an answer (an error
// message quoting the key it was given, as some OpenAI-compatible services do). Taken out, each occurrence
// replaced by REDACTED:
// - from the response headers the client gets (and the upstream request id the audit keeps);
// - from answers the gateway reads whole: every error answer, and the JSON answers it rewrites. Searched as bytes
//   (the token as written, and as JSON.stringify escapes it); a JSON answer that holds any backslash escape is
//   also searched string by string once parsed, whatever escapes spell the token (`\/`, `\u0073`);
// - from each JSON event of a 2xx event stream (Responses), string by string.
// Other 2xx answers streamed through (a list of items) are not read, and not searched. The tokens
// searched for are the one in force and the few before it: an answer to a call sent before a rotation may quote
// the token it was sent with.
import { brotliDecompressSync, gunzipSync, inflateRawSync, inflateSync } from 'node:zlib'

export const REDACTED = '[redacted]'
const REDACTED_BYTES = Buffer.from(REDACTED)
/** Tokens remembered: the one in force and those before it (one rotation's overlap needs two). */
const REMEMBERED_TOKENS = 4
/**
 * Shorter tokens are not searched for: replacing every `x` or `abc` would mangle answers, and a token that short
 * is no secret to keep (no real OhMyGPT token is; the tests' placeholder tokens are).
 */
export const MIN_SCRUBBED_LENGTH = 8
const BACKSLASH = 0x5c

interface Needle {
  token: string
  /** the token's spellings as bytes: as it is, and as JSON.stringify escapes it (when that differs) */
  bytes: Buffer[]
}

function needle (token: string): Needle {
  const escaped = JSON.stringify(token).slice(1, -1)
  return { token, bytes: [...new Set([token, escaped])].map(s => Buffer.from(s)) }
}

function replaceBytes (body: Buffer, find: Buffer): Buffer {
  let at = body.indexOf(find)
  if (at === -1) return body
  const parts: Buffer[] = []
  let from = 0
  while (at !== -1) {
    parts.push(body.subarray(from, at), REDACTED_BYTES)
    from = at + find.length
    at = body.indexOf(find, from)
  }
  parts.push(body.subarray(from))
  return Buffer.concat(parts)
}

export class TokenScrubber {
  readonly #current: () => string
  /** newest first */
  #needles: Needle[] = []

  constructor (current: () => string) {
    this.#current = current
  }

  /** The token to send a call with now. Remembered, so that an answer quoting it is scrubbed after a rotation. */
  token (): string {
    const token = this.#current()
    if (this.#needles[0]?.token !== token && token.length >= MIN_SCRUBBED_LENGTH) {
      this.#needles = [needle(token), ...this.#needles.filter(n => n.token !== token)].slice(0, REMEMBERED_TOKENS)
    }
    return token
  }

  /** The tokens to search for (this runs for each header of every answer: no array is made). */
  #all (): readonly Needle[] {
    this.token()
    return this.#needles
  }

  /** `text` with every token replaced, or `text` itself when it holds none. */
  text (text: string): string {
    for (const { token } of this.#all()) if (text.includes(token)) text = text.replaceAll(token, REDACTED)
    return text
  }

  /** `body` with every spelling of every token replaced as bytes, or `body` itself when it holds none. */
  bytes (body: Buffer): Buffer {
    let out = body
    for (const n of this.#all()) for (const find of n.bytes) out = replaceBytes(out, find)
    return out
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
      const out: Record<string, unknown> = {}
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
