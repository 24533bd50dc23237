// Verification of an audit file series against the hash chain (chain.ts): every record links to the one before
// it and its hash matches its content, from the first file to the last. Streams: memory holds one line.
//
// What it accepts besides plain records, because the writer says so in the chain itself:
// - a line that is not a record (torn by a crash), when the next record is an `audit.torn_line` event quoting it;
// - a series that starts after seq 1, when an `audit.pruned` event says the files before it were removed by
//   `audit.rotate.keep`, through exactly that seq and hash.
// Anything else that is not a linked, matching record is reported with its file, line and seq.
//
// The files alone cannot show that records were cut from the end (what is left still links). A head published
// elsewhere can: given one (`head`), verification passes only when it is the hash of a verified record.
import { basename } from 'node:path'
import {
  EDITED, GENESIS, lineDigest, linkProblem, parseChained, type ChainedRecord, type ChainHead, type Hasher
} from './chain.js'
import { AuditReadError, holdsNoRecord, readLines, readProblem, type LineEnd } from './series.js'

export interface VerifyOptions {
  /** a head published earlier: it must be the hash of a record of the series */
  head?: string
}

export type VerifyResult =
  | { ok: true, records: number, head: string, notes: string[] }
  | { ok: false, file: string, line: number, seq: number | null, reason: string }

/** Two records in a row, each linked to the one before it, whose hashes do not match their content. */
const OTHER_KEY = 'hash does not match the record\'s content, nor does the next one\'s, which links to it: from here on the ' +
  'records were written with another AUDIT_HMAC_KEY, or with none, unless each of them was edited'
/** Said after OTHER_KEY past the first record checked. */
const KEY_CHANGED = ' (the key was changed at a restart: the gateway warned of it then)'

interface Torn {
  file: string
  line: number
  sha256: string
  /** no newline after it: what a crash mid-write leaves */
  unterminated: boolean
}

export async function verifySeries (files: readonly string[], hasher: Hasher, opts: VerifyOptions = {}): Promise<VerifyResult> {
  let prev: ChainHead | null = null
  let prevFile = ''
  let lastLine = 0
  /** seq of the record whose hash is the published head, once seen */
  let headSeq: number | null = null
  const end: LineEnd = { unterminated: false }
  let records = 0
  let torn: Torn | null = null
  /** the first record, when the series starts after seq 1: must be explained by an audit.pruned event */
  let start: { file: string, line: number, record: ChainedRecord } | null = null
  const pruned = new Map<number, string>()
  const notes: string[] = []
  const bad = (file: string, line: number, seq: number | null, reason: string): VerifyResult =>
    ({ ok: false, file, line, seq, reason })
  /**
   * A record whose hash does not match its content, judged by the next record: one that verifies makes it an edit;
   * one that fails the same way, the first written under another key (or none).
   */
  let unmatched: { file: string, line: number, seq: number, problem: string } | null = null
  const unmatchedFailure = (next: string | null): VerifyResult => {
    const { file, line, seq, problem } = unmatched!
    if (next?.startsWith(EDITED) !== true) return bad(file, line, seq, EDITED)
    return bad(file, line, seq, OTHER_KEY + (problem === EDITED ? KEY_CHANGED : ''))
  }

  // A file that cannot be read from its start has no first seq: it was put last, and would show as a gap
  // between the others. Say what it is first.
  for (const file of files) {
    const unreadable = await readProblem(file)
    if (unreadable !== null) return bad(file, unreadable.line + 1, null, unreadable.message)
  }
  // Nor has one whose whole lines are none of them records.
  for (const file of files) {
    if (await holdsNoRecord(file)) {
      return bad(file, 1, null, 'this line is not an audit record, and no line of this file is one: the file was overwritten, or is no file of the series')
    }
  }
  for (const file of files) {
    let line = 0
    let inFile = 0
    end.unterminated = false
    try {
      for await (const text of readLines(file, end)) {
        line++
        const record = parseChained(text)
        if (record === null) {
          if (unmatched !== null) return unmatchedFailure(null)
          if (torn !== null) return bad(torn.file, torn.line, null, 'this line is not an audit record')
          torn = { file, line, sha256: lineDigest(text), unterminated: end.unterminated }
          continue
        }
        let problem: string | null
        if (prev === null) {
          if (record.seq !== 1) start = { file, line, record }
          problem = linkProblem(record, text, record.seq === 1 ? GENESIS : { seq: record.seq - 1, hash: record.prevHash }, hasher, true)
        } else {
          problem = linkProblem(record, text, prev, hasher)
          if (problem !== null && inFile === 0 && record.seq > prev.seq + 1) {
            problem = `records are missing between files: ${basename(prevFile)} ends at seq ${prev.seq} and this file starts at ` +
              `seq ${record.seq} (a file, or the end of one, was removed)`
          }
        }
        // A line that is not a record is reported as such, at its own line, unless this record acknowledges it: a
        // record edited until it no longer parses leaves the next one out of line too, and that is not where it was.
        const acknowledges = torn !== null
        if (torn !== null) {
          // The record saying so follows it in its file, or (the file moved by an outside rotation before the
          // restart) opens the next one, naming the torn line's file.
          const sameFile = record.file === undefined && torn.file === file
          const nextFile = record.file === basename(torn.file) && torn.file !== file && torn.unterminated && inFile === 0
          if (record.event !== 'audit.torn_line' || !(sameFile || nextFile) || record.line !== torn.line || record.sha256 !== torn.sha256) {
            return bad(torn.file, torn.line, null, 'this line is not an audit record (edited or inserted, or torn with no record acknowledging it)')
          }
          notes.push(`${file}:${torn.line}: a torn line (the writer stopped mid-record) is kept; seq ${record.seq} says so. ` +
            'The record it was, and any written after it before the stop, may have been lost (a published head, ' +
            'checked with --head, shows whether records are missing)')
          torn = null
        }
        if (unmatched !== null) return unmatchedFailure(problem)
        if (problem?.startsWith(EDITED) === true) unmatched = { file, line, seq: record.seq, problem }
        else if (problem !== null) return bad(file, line, record.seq, problem)
        // The line a torn_line record quotes is kept: one gone is a line removed from the trail. (Unless the record
        // opens what is read, naming the file before it, which rotate.keep may have removed, or was not named.)
        if (record.event === 'audit.torn_line' && !acknowledges && unmatched === null && !(prev === null && record.file !== undefined)) {
          return bad(file, line, record.seq, `this record says line ${String(record.line)}` +
            `${record.file === undefined ? '' : ` of ${String(record.file)}`} was torn by a crash and is kept, but no such line comes ` +
            'before it: the torn line was removed')
        }
        if (record.event === 'audit.pruned') {
          pruned.set(Number(record.throughSeq), String(record.throughHash))
          notes.push(`seq ${record.seq}: files holding records up to seq ${String(record.throughSeq)} were removed by rotate.keep`)
        } else if (record.event === 'audit.unclean_stop') {
          notes.push(`seq ${record.seq}: the gateway writing before it (pid ${String(record.pid)}) stopped without closing, or closed with ` +
            'records it could not write (its log says how many): the records of calls it answered in its last moments, or ' +
            'while writing failed, not yet written, may have been lost')
        } else if (record.event === 'audit.lost') {
          notes.push(`seq ${record.seq}: ${String(record.count)} records were lost between ${String(record.firstAt)} and ${String(record.lastAt)} (not written in time)`)
        }
        if (record.hash === opts.head) headSeq = record.seq
        prev = { seq: record.seq, hash: record.hash }
        prevFile = file
        records++
        inFile++
      }
    } catch (err) {
      if (unmatched !== null) return bad(unmatched.file, unmatched.line, unmatched.seq, unmatched.problem)
      if (err instanceof AuditReadError) return bad(file, err.line + 1, null, err.message)
      throw err
    }
    lastLine = line
  }
  if (unmatched !== null) return bad(unmatched.file, unmatched.line, unmatched.seq, unmatched.problem)
  if (torn !== null && !torn.unterminated) {
    // The writer writes whole lines: a crash leaves at most a last line without its newline, never this.
    return bad(torn.file, torn.line, null, 'the last line is not an audit record, yet it ends with a newline, which a crash never ' +
      'leaves (the gateway writes whole lines): the line was edited or added. The gateway refuses to start on this file')
  }
  if (torn !== null) {
    return bad(torn.file, torn.line, null, 'the last line is not a whole record: torn by a crash (the gateway marks it when it starts ' +
      'again), still being written (run verify again), or edited')
  }
  if (start !== null && pruned.get(start.record.seq - 1) !== start.record.prevHash) {
    return bad(start.file, start.line, start.record.seq, `the series starts at seq ${start.record.seq}, and no audit.pruned record ` +
      'says the files before it were removed on purpose: files are missing from its start')
  }
  if (opts.head !== undefined) {
    if (headSeq === null) {
      const other = '(or the head is from another series, or another AUDIT_HMAC_KEY)'
      // rotate.keep removed the oldest files, on purpose and said in the chain: a head published while they were the
      // series' end went with them. Which of the two it is only the time it was published tells.
      const kept = start?.record
      return bad(files.at(-1) ?? '', lastLine, prev?.seq ?? null, kept === undefined
        ? `the published head ${opts.head} is not the hash of any record of the series: records were cut from its end ${other}`
        : `the published head ${opts.head} is not the hash of any record left in the series. rotate.keep removed the files ` +
          `holding records up to seq ${kept.seq - 1}; the oldest record left, seq ${kept.seq}, was written at ${String(kept.time)}. ` +
          'A head published before then went with those files and cannot be checked any more (check one published since); ' +
          `one published after it means records were cut from the series' end ${other}`)
    }
    const after = (prev?.seq ?? 0) - headSeq
    notes.push(`the published head is the hash of seq ${headSeq}: the trail is whole up to it (${after} record${after === 1 ? '' : 's'} after it)`)
  }
  return { ok: true, records, head: prev?.hash ?? GENESIS.hash, notes }
}
