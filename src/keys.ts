// The one place that turns a gateway key into what the config stores: the lowercase hex sha256 digest.
import { createHash, randomBytes } from 'node:crypto'

export const KEY_PREFIX = 'ogw_'

/**
 * A key as generateKey makes it, anywhere in a text: a client that put its key in a URL (arguments swapped).
 * Each character may come percent-encoded (`ogw%5F...`), as a URL may spell it and the upstream would read it, and
 * encoded more than once (`ogw%255F...`, an encoder run over a URL already encoded), which a reader decoding as often
 * reads as the key.
 */
const KEY_IN_TEXT = /(?:o|%(?:25)*6[Ff])(?:g|%(?:25)*67)(?:w|%(?:25)*77)(?:_|%(?:25)*5[Ff])(?:[A-Za-z0-9_-]|%(?:25)*[0-9A-Fa-f]{2}){43}/g

/** Whether the text may hold a key at all: `ogw_`, or a percent-escape (cheap; most URLs have neither). */
function mayHoldKey (text: string): boolean {
  return text.includes(KEY_PREFIX) || text.includes('%')
}

/** Whether `text` holds something shaped like a gateway key, written out or percent-encoded. */
export function holdsKey (text: string): boolean {
  if (!mayHoldKey(text)) return false
  KEY_IN_TEXT.lastIndex = 0
  return KEY_IN_TEXT.test(text)
}

/** `text` with every key-shaped part withheld: what the audit and the log may keep of a URL the client sent. */
export function withoutKeys (text: string): string {
  return mayHoldKey(text) ? text.replace(KEY_IN_TEXT, `${KEY_PREFIX}[withheld]`) : text
}

export function keyDigest (key: string): string {
  return createHash('sha256').update(key, 'utf8').digest('hex')
}

/** 32 random bytes, base64url: 256 bits of entropy, safe in a header and a shell. */
export function generateKey (): string {
  return KEY_PREFIX + randomBytes(32).toString('base64url')
}
