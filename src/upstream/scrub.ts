// The upstream token never comes back to a client, even when the upstream writes it into an answer (an error
// message quoting the key it was given, as some OpenAI-compatible services do). Answers the gateway reads whole
// (every error answer, and the JSON answers it rewrites) have each occurrence replaced by REDACTED: as the token
// is written, and as a JSON string escapes it. Answers streamed through (a 2xx list of items, a stream of
// events) are not read, and not searched.
import { brotliDecompressSync, gunzipSync, inflateRawSync, inflateSync } from 'node:zlib'

export const REDACTED = '[redacted]'
const REDACTED_BYTES = Buffer.from(REDACTED)

let cachedToken = ''
let cachedNeedles: Buffer[] = []

/** The token's spellings as bytes: as it is, and as JSON.stringify escapes it (when that differs). */
function needles (token: string): Buffer[] {
  if (token !== cachedToken) {
    const escaped = JSON.stringify(token).slice(1, -1)
    cachedNeedles = [...new Set([token, escaped])].filter(s => s !== '').map(s => Buffer.from(s))
    cachedToken = token
  }
  return cachedNeedles
}

/** `body` with every spelling of `token` replaced, or `body` itself when it holds none. */
export function withoutToken (body: Buffer, token: string): Buffer {
  let out = body
  for (const needle of needles(token)) {
    let at = out.indexOf(needle)
    if (at === -1) continue
    const parts: Buffer[] = []
    let from = 0
    while (at !== -1) {
      parts.push(out.subarray(from, at), REDACTED_BYTES)
      from = at + needle.length
      at = out.indexOf(needle, from)
    }
    parts.push(out.subarray(from))
    out = Buffer.concat(parts)
  }
  return out
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
