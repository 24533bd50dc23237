// The audit hash chain: the one definition that the writer, `audit verify` and `audit query` share.
//
// Every record in a file series carries `seq` (1, 2, 3, ... over the whole series), `prevHash` (the previous
// record's `hash`; 64 zeros for the first) and `hash`:
//
//   hash = sha256(prevHash + "\n" + JCS(record without its hash field))
//
// JCS is RFC 8785 canonical JSON (the `canonicalize` package). A line is that JSON with `hash` appended last, and
// verification accepts no other spelling of it (linkProblem): `audit query` searches the text. With an HMAC key
// (AUDIT_HMAC_KEY, read by the process and passed down), HMAC-SHA256 with that key replaces sha256: whoever can
// write the files cannot re-forge the chain without it.
//
// Records are opaque JSON objects: the chain works for any fields. Besides the gateway's per-call records, the
// writer adds a few chain events of its own, told apart by an `event` field (see ChainEvent below).
import { createHash, createHmac, hash } from 'node:crypto'
import canonicalize from 'canonicalize'

export const GENESIS_HASH = '0'.repeat(64)

/** Where a chain stands: the last record's seq and hash (seq 0 and GENESIS_HASH before the first record). */
export interface ChainHead {
  seq: number
  hash: string
}

export const GENESIS: ChainHead = Object.freeze({ seq: 0, hash: GENESIS_HASH })

/** Computes a record's hash from the previous hash and the record's canonical JSON (without `hash`). */
export type Hasher = (prevHash: string, canonicalBody: string) => string

/** sha256, or HMAC-SHA256 when a key is given. The key is kept inside the closure, never on an object. */
export function chainHasher (hmacKey?: string): Hasher {
  if (hmacKey === undefined) {
    // The one-shot hash: no Hash object per record (this runs once per audited call).
    return (prevHash, body) => hash('sha256', `${prevHash}\n${body}`, 'hex')
  }
  return (prevHash, body) => createHmac('sha256', hmacKey).update(prevHash).update('\n').update(body).digest('hex')
}

/** Shortest HMAC key accepted: 32 characters, e.g. `openssl rand -hex 32` gives 64. */
export const MIN_HMAC_KEY_LENGTH = 32

/**
 * Why an AUDIT_HMAC_KEY value cannot be used, or null when it can. Never echoes the key. Whitespace and control
 * characters are refused, as in the config's secrets: a secret file's trailing newline, which an orchestrator
 * passes on and a shell's $(cat key) drops, would make every record of the chain fail to verify with the key.
 */
export function hmacKeyProblem (key: string): string | null {
  if (/[\s\p{Cc}]/u.test(key)) return 'AUDIT_HMAC_KEY must not contain whitespace or control characters (a trailing newline from a secret file?)'
  return key.length < MIN_HMAC_KEY_LENGTH
    ? `AUDIT_HMAC_KEY is too short (${key.length} characters; at least ${MIN_HMAC_KEY_LENGTH}, e.g. openssl rand -hex 32)`
    : null
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g

/** A UTF-16 surrogate as it stands in JSON.stringify's output: raw (a pair), or escaped (a lone one). */
const SURROGATE = /[\uD800-\uDFFF]|\\u[dD][89a-fA-F]/

/** Keys V8 keeps as array indices, ahead of every other key whatever their order: they take the general path. */
const INDEX_KEY = /^(?:0|[1-9]\d{0,9})$/

/**
 * JCS of a flat record (every value a string without surrogates, a finite number, a boolean or null; undefined left
 * out), as the gateway's call records are: keys sorted by UTF-16 code units, each value as JSON.stringify writes
 * it, which for these values is what RFC 8785 prescribes. Null for anything else, which takes the general path.
 * The audit writes one record per call, so this runs on the hot path: a record whose keys already stand in sorted
 * order (plugins/audit.ts builds its records so) is written by JSON.stringify's fast path, in one native call
 * without a key list, which costs less than half as much.
 */
function flatCanonicalJson (value: Record<string, unknown>): string | null {
  const order = keyOrder(value)
  if (order === null) return null
  for (const key of order.sorted) {
    const v = value[key]
    const type = typeof v
    if (type === 'number' ? !Number.isFinite(v) : type === 'object' ? v !== null : type !== 'string' && type !== 'boolean' && type !== 'undefined') return null
  }
  // Otherwise a key list as the replacer: JSON.stringify writes exactly these keys, in this order.
  const json = order.inOrder ? JSON.stringify(value) : JSON.stringify(value, order.sorted)
  // Text beyond the BMP, or a broken surrogate (which JSON.stringify escapes and JCS refuses), takes the general
  // path, which judges it: one scan of the result instead of one per value.
  return SURROGATE.test(json) ? null : json
}

interface KeyOrder {
  sorted: string[]
  /** the object's own order is already the sorted one */
  inOrder: boolean
}

let lastKeys: string[] = []
let lastOrder: KeyOrder | null = null

/**
 * The record's keys sorted, and whether they already stood so; null when a key is an array index. Call records
 * all have the same keys, so the last answer is kept and reused.
 */
function keyOrder (value: Record<string, unknown>): KeyOrder | null {
  const keys = Object.keys(value)
  if (keys.length === lastKeys.length && keys.every((k, i) => k === lastKeys[i])) return lastOrder
  const sorted = [...keys].sort()
  lastKeys = keys
  lastOrder = keys.some(k => INDEX_KEY.test(k)) ? null : { sorted, inOrder: sorted.every((k, i) => k === keys[i]) }
  return lastOrder
}

/**
 * RFC 8785 canonical JSON. JCS refuses lone surrogates (they are not Unicode text); a record holding one (it can
 * only come from a bug) is still written, with each lone surrogate replaced by U+FFFD, rather than lost.
 */
export function canonicalJson (value: object): string {
  const flat = flatCanonicalJson(value as Record<string, unknown>)
  if (flat !== null) return flat
  try {
    return canonicalize(value) as string
  } catch {
    return canonicalize(JSON.parse(JSON.stringify(value),
      (_k, v: unknown) => typeof v === 'string' ? v.replace(LONE_SURROGATE, '\uFFFD') : v)) as string
  }
}

export interface Sealed {
  /** the record as one JSON line, without the newline */
  line: string
  head: ChainHead
}

/**
 * Links a record to the chain: the line holds the record's own fields plus seq, prevHash and hash (any of these
 * three in the record itself are replaced). The line is the canonical body with `hash` appended, so the record
 * is serialized once.
 */
export function seal (record: object, prev: ChainHead, hasher: Hasher): Sealed {
  const seq = prev.seq + 1
  // A record that has seq and prevHash keys already keeps them where they stand (in sorted order, the fast path
  // above); a hash of its own is taken out.
  const chained: Record<string, unknown> = { ...record, seq, prevHash: prev.hash }
  if (Object.hasOwn(chained, 'hash')) delete chained.hash
  const body = canonicalJson(chained)
  const hash = hasher(prev.hash, body)
  return { line: `${body.slice(0, -1)},"hash":"${hash}"}`, head: { seq, hash } }
}

/** A parsed line that carries the chain fields. */
export interface ChainedRecord {
  seq: number
  prevHash: string
  hash: string
  [field: string]: unknown
}

const HEX64 = /^[0-9a-f]{64}$/

/** The parsed record if the text is a JSON object with well-formed seq, prevHash and hash; otherwise null. */
export function parseChained (text: string): ChainedRecord | null {
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch {
    return null
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return null
  const r = value as Record<string, unknown>
  if (!Number.isSafeInteger(r.seq) || (r.seq as number) < 1) return null
  if (typeof r.prevHash !== 'string' || !HEX64.test(r.prevHash)) return null
  if (typeof r.hash !== 'string' || !HEX64.test(r.hash)) return null
  return r as ChainedRecord
}

/** The hash a record should carry, recomputed from its content. */
export function expectedHash (record: ChainedRecord, hasher: Hasher): string {
  return hasher(record.prevHash, canonicalJson({ ...record, hash: undefined }))
}

/** linkProblem's reason for a record whose hash does not match its content (verify tells a change of key from it). */
export const EDITED = 'hash does not match the record\'s content: the record was edited'

/**
 * What is wrong with `record` (read from the line `text`) as the successor of `prev`, or null when it links, its
 * hash holds and the line is spelled exactly as the writer writes it (seal). The hash alone would accept any
 * spelling of the same data (`"team\u002da"`, `4.03e2`, a key given twice); `audit query` searches the text, so a
 * line spelled otherwise could hide from it. Only the writer's own spelling passes. `first`: the first record a
 * verification reads (seq 1, or the first left after rotate.keep pruned the series, or of the files named), where a
 * wrong or missing AUDIT_HMAC_KEY fails first: said there as a possible cause.
 */
export function linkProblem (record: ChainedRecord, text: string, prev: ChainHead, hasher: Hasher, first = false): string | null {
  if (record.seq > prev.seq + 1) {
    const missing = record.seq - prev.seq - 1
    return `seq jumps from ${prev.seq} to ${record.seq}: ${missing} record${missing === 1 ? ' was' : 's were'} deleted before this one, ` +
      'or records were reordered (moved after it)'
  }
  if (record.seq <= prev.seq) {
    return `seq ${record.seq} after seq ${prev.seq}: a record was inserted here or records were reordered`
  }
  if (record.prevHash !== prev.hash) {
    return 'prevHash does not match the previous record\'s hash: a record was replaced, inserted or reordered'
  }
  const body = canonicalJson({ ...record, hash: undefined })
  if (record.hash !== hasher(record.prevHash, body)) {
    return EDITED + (first ? ' (or the series was written with another AUDIT_HMAC_KEY, or with none)' : '')
  }
  if (text !== `${body.slice(0, -1)},"hash":"${record.hash}"}`) {
    return 'the line is not spelled as the gateway writes it (same data, other text): the record was edited'
  }
  return null
}

/** The sha256 of a line's text, as chain events quote lines that are not records. */
export function lineDigest (text: string): string {
  return createHash('sha256').update(text).digest('hex')
}

// Chain events: records the writer itself adds to the chain, so that what happened to the trail is in the trail.
export type ChainEvent =
  /**
   * the last line of a file was torn (the writer stopped mid-record); it is kept, and this record follows it, in the
   * same file, or first in the next one, naming the torn one in `file` (moved by an outside rotation meanwhile)
   */
  | { time: string, event: 'audit.torn_line', line: number, sha256: string, file?: string }
  /**
   * the gateway writing before stopped without closing (killed, its container or host gone: its lock was left behind,
   * and taken over), or closed with records it could not write (a full disk: it left its lock so that this is said):
   * the records of calls it answered in its last moments, or while writing failed, not yet written, are lost with it
   */
  | { time: string, event: 'audit.unclean_stop', pid: number | null, host: string | null, since: string | null }
  /** records dropped because they could not be written in time (buffer full); counted, and said here */
  | { time: string, event: 'audit.lost', count: number, firstAt: string, lastAt: string }
  /** rotated files removed by `audit.rotate.keep`: the records up to `throughSeq`/`throughHash` are gone on purpose */
  | { time: string, event: 'audit.pruned', files: string[], throughSeq: number, throughHash: string }

export function isChainEvent (record: Record<string, unknown>): boolean {
  return typeof record.event === 'string' && record.event.startsWith('audit.')
}
