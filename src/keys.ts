// The one place that turns a gateway key into what the config stores: the lowercase hex sha256 digest.
import { createHash, randomBytes } from 'node:crypto'

export const KEY_PREFIX = 'ogw_'

/** A key as generateKey makes it, anywhere in a text: a client that put its key in a URL (arguments swapped). */
const KEY_IN_TEXT = /ogw_[A-Za-z0-9_-]{43}/g

/** Whether `text` holds something shaped like a gateway key. */
export function holdsKey (text: string): boolean {
  if (!text.includes(KEY_PREFIX)) return false
  KEY_IN_TEXT.lastIndex = 0
  return KEY_IN_TEXT.test(text)
}

/** `text` with every key-shaped part withheld: what the audit and the log may keep of a URL the client sent. */
export function withoutKeys (text: string): string {
  return text.includes(KEY_PREFIX) ? text.replace(KEY_IN_TEXT, `${KEY_PREFIX}[withheld]`) : text
}

export function keyDigest (key: string): string {
  return createHash('sha256').update(key, 'utf8').digest('hex')
}

/** 32 random bytes, base64url: 256 bits of entropy, safe in a header and a shell. */
export function generateKey (): string {
  return KEY_PREFIX + randomBytes(32).toString('base64url')
}
