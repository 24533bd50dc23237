// Reading the trail back: the records of a file series that pass a filter, oldest first, streamed file by file
// (plain or gzipped), so a query over months of records holds one line at a time. Chain events (audit.lost, ...)
// are the trail's own bookkeeping, not calls, and are left out; lines that are not chained records are counted
// and skipped (`audit verify` says what they are).
import { isChainEvent, parseChained } from './chain.js'
import { readLines } from './series.js'

export type AuditFields = Record<string, unknown>

export interface Filter {
  /** a string every matching line contains (a JSON-quoted value), to skip parsing lines that cannot match */
  needle?: string
  /** a cheap look at the raw line: false only when it cannot match, to skip parsing it */
  quick?: (line: string) => boolean
  test (record: AuditFields): boolean
}

export interface QueryResult {
  matched: number
  /** lines skipped because they are not chained records */
  skipped: number
}

/**
 * Calls `emit` with each matching record and its line as written, until `limit` records matched. `emit` may
 * return a promise (to wait for a slow stdout); false stops the query.
 */
export async function queryFiles (
  files: readonly string[], filters: readonly Filter[], limit: number,
  emit: (record: AuditFields, line: string) => boolean | Promise<boolean>
): Promise<QueryResult> {
  const needles = filters.flatMap(f => f.needle === undefined ? [] : [f.needle])
  const quick = filters.flatMap(f => f.quick === undefined ? [] : [f.quick])
  const result: QueryResult = { matched: 0, skipped: 0 }
  if (limit <= 0) return result
  for (const file of files) {
    for await (const line of readLines(file)) {
      if (!needles.every(n => line.includes(n)) || !quick.every(q => q(line))) continue
      const record = parseChained(line)
      if (record === null) {
        if (line !== '') result.skipped++
        continue
      }
      if (isChainEvent(record) || !filters.every(f => f.test(record))) continue
      result.matched++
      if (!await emit(record, line) || result.matched >= limit) return result
    }
  }
  return result
}

const TIME_FIELD = '"time":"'
const ISO_UTC_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/

/**
 * The `time` of a line as written by the gateway (ISO 8601 UTC with milliseconds, which sort as text), read
 * without parsing the line; null when it is not there in that form.
 */
export function lineTime (line: string): string | null {
  const at = line.indexOf(TIME_FIELD)
  if (at === -1) return null
  const time = line.slice(at + TIME_FIELD.length, at + TIME_FIELD.length + 24)
  return ISO_UTC_MS.test(time) ? time : null
}
