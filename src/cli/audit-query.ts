// `ohmygpt-gateway audit query [FILTERS] [--limit N] [--format jsonl|table] [--config FILE] [FILES...]`: the
// records that match every filter given, oldest first, over the whole series (rotated and gzipped files
// included), streamed. One table (FLAGS) defines the flags: it builds the parser, the filters and the usage text.
import { once } from 'node:events'
import { parseArgs } from 'node:util'
import type { Writable } from 'node:stream'
import { lineTime, queryFiles, type AuditFields, type Filter } from '../audit/query.js'
import { isTime } from '../config.js'
import { ACTIONS } from '../operations.js'
import { OUTCOMES } from '../plugins/audit.js'
import { auditAddress } from '../http/address.js'
import { auditFiles, CONFIG_OPTION, UsageError } from './common.js'

interface Flag {
  value: string
  help: string
  /** the filter the flag's value makes; throws UsageError for a value that can never be right */
  filter?: (value: string, now: number) => Filter
}

/** `--client x` keeps records whose `field` is exactly x. */
function exact (field: string, allowed?: readonly string[]): Flag['filter'] {
  return (value) => {
    if (allowed !== undefined && !allowed.includes(value)) throw new UsageError(`"${value}" is not one of: ${allowed.join(', ')}`)
    return { needle: JSON.stringify(value), test: r => r[field] === value }
  }
}

const AGE = /^(\d+)([smhd])$/
const UNIT_MS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }

/** A date and time of day with no offset (no Z, no +hh:mm). */
const NO_OFFSET = /^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$/

/** An ISO 8601 time (UTC unless it says otherwise), or an age before now (`15m`, `24h`, `7d`), as ms since the epoch. */
export function parseTime (value: string, now: number): number {
  const age = AGE.exec(value)
  // An age past what a date can hold (10^8 days) is no time either.
  if (age !== null) return checked(value, now - Number(age[1]) * UNIT_MS[age[2]!]!)
  // The trail's times are UTC: a time of day with no offset is read as UTC too (Date.parse would take local time,
  // with a T or with a space between date and time).
  // isTime: Date.parse takes a day its month does not have for one of the next (2025-02-30 as March 2).
  const utc = NO_OFFSET.test(value) ? `${value.replace(' ', 'T')}Z` : value
  return checked(value, /^\d{4}-\d{2}-\d{2}/.test(utc) && isTime(utc) ? Date.parse(utc) : NaN)
}

function checked (value: string, ms: number): number {
  if (Number.isNaN(new Date(ms).getTime())) throw new UsageError(`"${value}" is not a time: give an ISO 8601 time (2025-01-31T12:00:00Z) or an age (15m, 24h, 7d)`)
  return ms
}

function timeOf (record: AuditFields): number {
  return typeof record.time === 'string' ? Date.parse(record.time) : NaN
}

/** Keeps records whose time is in [from, to), looking at the raw line first (ISO UTC times sort as text). */
function timeRange (from: number, to: number): Filter {
  const iso = (ms: number) => Number.isFinite(ms) ? new Date(ms).toISOString() : null
  const low = iso(from)
  const high = iso(to)
  return {
    quick: line => {
      const time = lineTime(line)
      return time === null || ((low === null || time >= low) && (high === null || time < high))
    },
    test: r => timeOf(r) >= from && timeOf(r) < to
  }
}

/**
 * `--client none`: the calls made with no client's key (clientId null), which the metrics count as client "none"
 * (an id no client may have), so that a spike of gateway_denied_total{client="none"} is found in the trail by its label.
 * `--owner none` likewise: the calls on no team's object (ownerId null).
 */
const NO_CLIENT = 'none'

/** `--client x` keeps records whose `field` (a client id) is exactly x; `--client none`, those where it is null. */
function clientId (field: string): (value: string) => Filter {
  return (value) => {
    if (value !== NO_CLIENT) return exact(field)!(value, 0)
    return { needle: `"${field}":null`, test: r => r[field] === null }
  }
}

export const FLAGS = {
  client: {
    value: 'ID',
    help: `calls made with this client's key (clients[].id); ${NO_CLIENT}: with no client's key (the metrics' client="${NO_CLIENT}")`,
    filter: clientId('clientId')
  },
  owner: {
    value: 'ID',
    help: `calls on objects this client owns (ownerId), another team's refused ones included: --owner team-a --outcome denied; ${NO_CLIENT}: on no team's object (a create, a call refused before its owner was known)`,
    filter: clientId('ownerId')
  },
  ip: {
    value: 'ADDRESS',
    help: 'calls from this client address, however it is spelled (::ffff:203.0.113.9 as 203.0.113.9, the record\'s ip): --ip 203.0.113.9 --client none, whose keys a 429 too_many_auth_failures refused',
    // (the records write an address one way, http/address.ts: the operator's spelling, copied from elsewhere, is made that one)
    filter: (value, now) => exact('ip')!(auditAddress(value), now)
  },
  action: { value: 'ACTION', help: `calls of this action: ${[...ACTIONS, 'unknown'].join(', ')}`, filter: exact('action', [...ACTIONS, 'unknown']) },
  conversation: { value: 'ID', help: 'calls on this conversation (conv_...)', filter: exact('conversationId') },
  item: { value: 'ID', help: 'calls on this item (msg_...)', filter: exact('itemId') },
  response: {
    value: 'ID',
    help: 'calls on this response (resp_...), and creates that continue it (previous_response_id), refused ones included',
    filter: (value) => ({ needle: JSON.stringify(value), test: r => r.responseId === value || r.previousResponseId === value })
  },
  request: {
    value: 'ID',
    help: 'the call with this request id: the gateway\'s (gw_..., an SDK error\'s request_id) or the upstream\'s (upstreamRequestId)',
    filter: (value) => ({ needle: JSON.stringify(value), test: r => r.requestId === value || r.upstreamRequestId === value })
  },
  model: { value: 'MODEL', help: 'Responses calls for this model (gpt-4o-mini)', filter: exact('model') },
  status: {
    value: 'CODE',
    help: 'calls answered with this HTTP status (404), or status class (4xx)',
    filter: (value) => {
      const m = /^([1-5])(xx|\d\d)$/.exec(value)
      if (m === null) throw new UsageError(`"${value}" is not a status: give a code (404) or a class (4xx)`)
      if (m[2] === 'xx') {
        const low = Number(m[1]) * 100
        return { test: r => typeof r.status === 'number' && r.status >= low && r.status < low + 100 }
      }
      const code = Number(value)
      return { needle: `"status":${code}`, test: r => r.status === code }
    }
  },
  outcome: { value: 'OUTCOME', help: `calls with this outcome: ${OUTCOMES.join(', ')}`, filter: exact('outcome', OUTCOMES) },
  since: {
    value: 'TIME',
    help: 'records at or after TIME: ISO 8601 (2025-01-31T12:00:00Z; UTC when it gives no offset) or an age (15m, 24h, 7d)',
    filter: (value, now) => timeRange(parseTime(value, now), Infinity)
  },
  until: {
    value: 'TIME',
    help: 'records before TIME (same forms as --since)',
    filter: (value, now) => timeRange(-Infinity, parseTime(value, now))
  },
  limit: { value: 'N', help: 'stop after the first N matching records' },
  format: { value: 'FORMAT', help: 'jsonl (default: the records as written) or table (for people)' },
  config: { value: 'FILE', help: 'config file (else $GATEWAY_CONFIG, else config/gateway.yaml): the series of its audit.file' }
} satisfies Record<string, Flag>

export const QUERY_USAGE = 'audit query [OPTIONS] [FILES...]\n' + Object.entries(FLAGS)
  .map(([name, f]) => `    --${`${name} ${f.value}`.padEnd(22)} ${f.help}`).join('\n')

/** Table columns: heading, record field, width. */
const COLUMNS: Array<[string, string, number]> = [
  // owner: whose conversation or response the call was on (`-` for none): a denied read of team-a's conversation by
  // team-b reads as such, not as team-b's. The ids' columns as wide as OpenAI's ids (conv_, resp_ and 48 hex digits:
  // 53 characters; msg_ and 48: 52).
  ['time', 'time', 24], ['client', 'clientId', 14], ['owner', 'ownerId', 14], ['action', 'action', 21], ['status', 'status', 6],
  ['outcome', 'outcome', 14], ['model', 'model', 22], ['conversation', 'conversationId', 53], ['item', 'itemId', 53],
  ['response', 'responseId', 53], ['ip', 'ip', 15], ['request', 'requestId', 35]
]

/**
 * A row: each cell at its column, a longer one whole (an id is copied from here), the cells after it one space on,
 * and back at their columns as soon as a shorter cell leaves room.
 */
function tableRow (cells: string[]): string {
  let row = ''
  let column = 0
  for (const [i, text] of cells.entries()) {
    row = i === 0 ? text : `${row.padEnd(column - 1)} ${text}`
    column += COLUMNS[i]![2] + 1
  }
  return row.trimEnd() + '\n'
}

/**
 * Characters a table cell shows escaped (`\u000a`), not as themselves: line breaks, which would start a row of the
 * caller's making, terminal escapes (ESC), which could hide or rewrite what follows, and the other control and
 * format characters (bidi overrides reorder what is shown), and spaces, which would shift the columns after them (no
 * column's value has one). A record holds text a client chose (an item id its body named), which the JSON lines
 * escape and a table must too.
 */
const UNPRINTABLE = /[\p{Cc}\p{Cf}\p{Z}]/gu

function cell (value: unknown): string {
  if (value === null || value === undefined) return '-'
  return String(value).replace(UNPRINTABLE, c => `\\u${c.codePointAt(0)!.toString(16).padStart(4, '0')}`)
}

/** Writes to stdout, waiting when it is full; false once the reader is gone (`| head`). */
function writer (out: Writable): (text: string) => Promise<boolean> {
  let gone = false
  out.on('error', () => { gone = true })
  return async (text) => {
    if (gone) return false
    // The reader going while the query waits for 'drain' is an 'error' (EPIPE), which rejects once(): the end.
    // The wait that loses the race is called off: left behind, each wait for a slow reader would leave a listener.
    if (!out.write(text)) {
      const done = new AbortController()
      await Promise.race([once(out, 'drain', { signal: done.signal }), once(out, 'close', { signal: done.signal })])
        .catch(() => { gone = true })
        .finally(() => { done.abort() })
    }
    return !gone
  }
}

export interface QueryArgs {
  filters: Filter[]
  limit: number
  format: 'jsonl' | 'table'
  config?: string
  files: string[]
  help: boolean
}

/**
 * `--limit -1` as `--limit=-1`: Node's parser takes a value that starts with a dash for a forgotten one ("argument is
 * ambiguous"), where the flag's own check says what it takes. Only a dash and a digit: no option is named so.
 */
function withNegativeValues (args: string[]): string[] {
  const out: string[] = []
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!
    const next = args[i + 1]
    if (arg === '--') return [...out, ...args.slice(i)] // files from here on
    if (arg.startsWith('--') && Object.hasOwn(FLAGS, arg.slice(2)) && next !== undefined && /^-\d/.test(next)) {
      out.push(`${arg}=${next}`)
      i++
    } else {
      out.push(arg)
    }
  }
  return out
}

/** The command line, checked: every flag from FLAGS, each filter built from its value. */
export function parseQueryArgs (args: string[], now: number): QueryArgs {
  const options = Object.fromEntries(Object.keys(FLAGS).map(name => [name, { type: 'string' as const }]))
  const { values, positionals } = parseArgs({
    args: withNegativeValues(args), options: { ...options, ...CONFIG_OPTION, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true
  }) as { values: Partial<Record<keyof typeof FLAGS, string>> & { help?: boolean }, positionals: string[] }
  const filters: Filter[] = []
  for (const [name, flag] of Object.entries(FLAGS) as Array<[keyof typeof FLAGS, Flag]>) {
    const value = values[name]
    if (value === undefined || flag.filter === undefined) continue
    try {
      filters.push(flag.filter(value, now))
    } catch (err) {
      throw new UsageError(`--${name}: ${(err as Error).message}`)
    }
  }
  const limit = values.limit === undefined ? Infinity : /^\d+$/.test(values.limit) ? Number(values.limit) : NaN
  if (Number.isNaN(limit)) throw new UsageError('--limit: give a whole number')
  const format = values.format ?? 'jsonl'
  if (format !== 'jsonl' && format !== 'table') throw new UsageError('--format: jsonl or table')
  return { filters, limit, format, config: values.config, files: positionals, help: values.help === true }
}

export async function auditQuery (args: string[]): Promise<void> {
  const query = parseQueryArgs(args, Date.now())
  if (query.help) {
    console.log(`usage: ohmygpt-gateway ${QUERY_USAGE}`)
    return
  }
  const files = await auditFiles(query.config, query.files)
  const print = writer(process.stdout)
  const table = query.format === 'table'
  if (table) await print(tableRow(COLUMNS.map(c => c[0])))
  const result = await queryFiles(files, query.filters, query.limit, (record, line) =>
    print(table ? tableRow(COLUMNS.map(c => cell(record[c[1]]))) : line + '\n'))
  if (result.skipped > 0) {
    console.error(`note: ${result.skipped} line(s) that are not audit records were skipped; run audit verify`)
  }
}
