// The audit writer: takes records from the gateway and gets them into the trail without ever blocking a request.
//
// The interface the gateway uses, and all of it:
//
//   write(record: object): void      never throws, never blocks: the record is buffered and written with the
//                                    others of the next FLUSH_AFTER_MS, in one write, off the event loop
//   readonly available: boolean      false from a failed write until a write succeeds again (a full buffer is
//                                    a failed write); with audit.onFailure "closed" the gateway then answers
//                                    503 audit_unavailable
//   stats(): { written, failed, lost }   records written, write attempts that failed, records dropped
//   reopen(): void                   close and reopen the file (SIGUSR2, after an outside logrotate moved it)
//   close(): Promise<void>           write what is buffered, fsync, close, release the lock (bounded in time)
//
// Open it with `openAuditWriter(options)`: it takes the series' lock, reads the end of the trail to continue
// its chain (reporting and marking a torn last line), and opens the active file.
//
// Records are buffered in a bounded queue and written by one serial worker, so at most one write is in flight
// and everything that arrives meanwhile goes into the next one. When a write fails the records stay queued and
// the write is retried every RETRY_MS (reopening the file, which may have been replaced); when the queue is full
// a new record is dropped, counted as lost, and an `audit.lost` chain event saying how many is written as soon
// as writing works again. The file is watched: removed or replaced by another tool, it is reopened within
// WATCH_MS, and records written meanwhile into a removed file are written again into the new one, unless the
// series still holds them (the file was compressed or copied before it was removed).
//
// `audit.file: "-"` writes bare JSON lines to stdout: no chain, no rotation, no lock, no fsync.
import { constants as fsConstants } from 'node:fs'
import { lstat, open, readdir, rename, stat, unlink, type FileHandle } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { pipeline } from 'node:stream/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Writable } from 'node:stream'
import { createGzip } from 'node:zlib'
import {
  chainHasher, expectedHash, GENESIS, lineDigest, parseChained, seal, type ChainedRecord, type ChainEvent, type ChainHead,
  type Hasher
} from './chain.js'
import { makeDirectories, notRegularAuditFile } from '../preflight.js'
import { acquireLock, type AuditLock } from './lock.js'
import {
  AuditReadError, firstLine, firstSeqOf, GZIP_SUFFIX, isOwnRotated, lastRecord, readLines, readProblem, readTail, rotatedName,
  scanSeries, seriesFiles, TEMP_SUFFIX, type SeriesFile
} from './series.js'

export type FsyncMode = 'off' | 'interval' | 'every'

export interface RotateOptions {
  /** rotate before a write would take the active file past this size */
  maxBytes?: number
  /** rotate at the first write of a new UTC day */
  daily: boolean
  /** closed files kept (oldest removed first, and the removal recorded in the chain); 0 keeps all */
  keep: number
  /** gzip closed files */
  gzip: boolean
}

export interface AuditLog {
  info (obj: object, msg: string): void
  warn (obj: object, msg: string): void
  error (obj: object, msg: string): void
}

export interface AuditWriterOptions {
  /** the active file, or "-" for stdout */
  file: string
  fsync: FsyncMode
  rotate: RotateOptions
  /** HMAC-SHA256 key for the chain; plain sha256 without it */
  hmacKey?: string
  log: AuditLog
  /** where "-" writes; default process.stdout */
  stdout?: Writable
  /** most records waiting to be written before new ones are dropped; default MAX_PENDING */
  maxPending?: number
  /** only said in the log when writing fails: what the gateway does meanwhile */
  onFailure?: 'closed' | 'open'
  /** the clock (ms since the epoch), for daily rotation and event times */
  now?: () => number
}

export interface AuditStats {
  /** records written (chain events not counted) */
  written: number
  /** write attempts that failed (each retry counts) */
  failed: number
  /** records dropped: the buffer was full, or the writer was closed */
  lost: number
}

export interface AuditWriter {
  write (record: object): void
  readonly available: boolean
  stats (): AuditStats
  reopen (): void
  close (): Promise<void>
}

/** Records waiting at most: about 5 MB of typical records, a few seconds of a busy gateway's traffic. */
export const MAX_PENDING = 10_000
/** Records per write at most. */
const MAX_BATCH = 1_000
/**
 * A record waits at most this long for others to share its write (fewer, larger writes: each one is a hop to a
 * libuv thread and back, which under load cost more than the write itself), or until FLUSH_RECORDS are waiting.
 */
const FLUSH_AFTER_MS = 10
const FLUSH_RECORDS = 256
/** A failed write is retried this often. */
export const RETRY_MS = 500
/** How often the file is checked for removal or replacement, and how often `fsync: interval` syncs. */
export const WATCH_MS = 1_000
/** close() waits this long for a stuck destination (a full pipe, a hung disk) before counting records lost. */
const CLOSE_DEADLINE_MS = 5_000
/** close() then lets a gzip of a closed file finish for at most this long. */
const HOUSEKEEPING_DEADLINE_MS = 10_000
/** Lines kept to rewrite into a new file when the old one turns out to have been removed: about WATCH_MS worth. */
const MAX_REPLAY_BYTES = 32 * 1024 * 1024
/** While records are being lost, say so in the log at most this often. */
const LOST_LOG_EVERY_MS = 10_000

/** Where records go: a file with a chain, or a stream without. */
interface Sink {
  /** Writes records in order; says how many made it, and the error that stopped the rest. */
  write (records: object[]): Promise<{ written: number, error?: Error }>
  reopen (): Promise<void>
  /** Every WATCH_MS: notice a removed or replaced file, fsync when due; says what failed, if anything. */
  tick (): Promise<Error | undefined>
  /** wait for background work (gzip) */
  settle (): Promise<void>
  /**
   * fsync and close; no chain event is added after this. `unwritten`: records (or the word of records lost) that
   * the chain did not get: its lock is left for the next start to say an unclean stop, as after a crash.
   */
  close (unwritten: boolean): Promise<void>
  /** records sealed already and held to be written again (from a removed file) while the destination fails */
  unwritten (): number
}

function errorSummary (err: unknown): { code?: string, message: string } {
  const e = err as NodeJS.ErrnoException
  return { code: e?.code, message: e?.message ?? String(err) }
}

function withDeadline<T> (promise: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<'timeout'>(resolve => { timer = setTimeout(() => resolve('timeout'), ms) })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

/** The buffer, the failure state and the serial worker; the sink does the I/O. */
class Writer implements AuditWriter {
  private readonly pending: object[] = []
  /** chain events (lost, torn) waiting to be written ahead of the records */
  private readonly events: object[] = []
  /** the sink is closed: nothing more goes into the chain */
  private sinkClosed = false
  private readonly counts: AuditStats = { written: 0, failed: 0, lost: 0 }
  private lostSinceEvent = { count: 0, firstAt: 0, lastAt: 0 }
  private lostLoggedAt = 0
  private ok = true
  private downSince = 0
  private closed = false
  private closing: Promise<void> | null = null
  private scheduled: NodeJS.Timeout | null = null
  private flushQueued = false
  private tickQueued = false
  private retryTimer: NodeJS.Timeout | null = null
  private readonly watchTimer: NodeJS.Timeout
  private worker: Promise<void> = Promise.resolve()
  private sink!: Sink

  constructor (
    private readonly log: AuditLog,
    private readonly maxPending: number,
    private readonly now: () => number,
    private readonly onFailureHint: string
  ) {
    this.watchTimer = setInterval(() => {
      if (this.tickQueued) return
      this.tickQueued = true
      void this.run(async () => {
        this.tickQueued = false
        const error = await this.sink.tick()
        if (error !== undefined) this.failed(error)
      })
    }, WATCH_MS).unref()
  }

  attach (sink: Sink): void { this.sink = sink }

  get available (): boolean { return this.ok }

  stats (): AuditStats { return { ...this.counts } }

  write (record: object): void {
    if (this.closed) return this.drop('the audit writer is closed')
    if (this.pending.length >= this.maxPending) return this.drop('the audit buffer is full')
    this.pending.push(record)
    this.schedule()
  }

  /** A chain event from the sink (a torn line at start): written ahead of the next records. */
  addEvent (event: ChainEvent): void {
    this.events.push(event)
    this.schedule()
  }

  /**
   * Closed files beyond rotate.keep: on the serial worker, the chain records their removal first, and only once
   * that record is written are the files removed. A close, a crash or a failed write in between leaves files for
   * the next start to prune, never a gap in the series that nothing in the chain explains.
   */
  prune (event: ChainEvent, files: readonly string[]): Promise<void> {
    return this.run(async () => {
      if (this.sinkClosed) return
      const { written, error } = await this.sink.write([event])
      if (error !== undefined) this.failed(error)
      if (written !== 1) return
      for (const file of files) await unlink(file)
      this.log.info({ files }, 'audit: removed closed files beyond rotate.keep')
    })
  }

  reopen (): void {
    if (this.closed) return
    void this.run(async () => {
      await this.sink.reopen()
      await this.flush()
    })
  }

  close (): Promise<void> {
    this.closing ??= this.shutdown()
    return this.closing
  }

  private async shutdown (): Promise<void> {
    this.closed = true
    clearInterval(this.watchTimer)
    if (this.scheduled !== null) clearTimeout(this.scheduled)
    this.scheduled = null
    if (this.retryTimer !== null) clearTimeout(this.retryTimer)
    // A failed write is tried again every RETRY_MS, as while running, until the deadline is near: a destination
    // that comes back meanwhile (a path fixed, space freed) takes the records instead of their being lost at once.
    const giveUpAt = performance.now() + CLOSE_DEADLINE_MS - RETRY_MS
    const flushAll = async () => {
      while (this.holdsUnwritten()) {
        if (await this.flush()) continue
        if (performance.now() >= giveUpAt) return
        await sleep(RETRY_MS)
      }
    }
    // What is waiting goes out first; then housekeeping under way (a gzip, a pruning, perhaps started by that very
    // flush) finishes if it can, so that a pruning's record goes into the chain with it; one cut short is done
    // again at the next start. Then the file is closed.
    let finished = await withDeadline(this.run(flushAll), CLOSE_DEADLINE_MS)
    await this.settleHousekeeping()
    if (finished !== 'timeout') {
      finished = await withDeadline(this.run(async () => {
        await flushAll()
        await this.sink.close(this.holdsUnwritten())
        this.sinkClosed = true
      }), CLOSE_DEADLINE_MS)
    }
    if (finished === 'timeout') this.log.error({}, 'audit: the destination did not take the last records in time')
    // The last flush may have rotated: its gzip gets the same chance (its pruning waits for the next start).
    await this.settleHousekeeping()
    // (with the records of a removed file still held to be written again: sealed, and lost as much)
    const n = this.pending.length + this.sink.unwritten()
    if (n > 0) {
      this.pending.length = 0
      this.counts.lost += n
      this.log.error({ lost: n, total: this.counts.lost }, 'audit: records could not be written before closing and are lost')
    }
  }

  /** Records, chain events or a loss not yet said that the destination has not taken. */
  private holdsUnwritten (): boolean {
    return this.pending.length > 0 || this.events.length > 0 || this.lostSinceEvent.count > 0 || this.sink.unwritten() > 0
  }

  /**
   * Waits, within HOUSEKEEPING_DEADLINE_MS, for the gzip and pruning of closed files under way. Past it the close
   * goes on without them (a slow disk must not hold the exit): a gzip cut short leaves its partial file, which the
   * next start removes before it compresses the file again; said in the log.
   */
  private async settleHousekeeping (): Promise<void> {
    if (await withDeadline(this.sink.settle(), HOUSEKEEPING_DEADLINE_MS) === 'timeout') {
      this.log.warn({}, `audit: compressing or pruning closed files took over ${HOUSEKEEPING_DEADLINE_MS} ms; closing without ` +
        'waiting for it (the next start finishes it)')
    }
  }

  /** Runs a task on the serial worker: one at a time, in order. */
  private run (task: () => Promise<unknown>): Promise<void> {
    const next = this.worker.then(task).then(() => {}, (err: unknown) => {
      this.log.error({ err: errorSummary(err) }, 'audit: unexpected writer error')
    })
    this.worker = next
    return next
  }

  /**
   * A write of what is waiting: queued now once FLUSH_RECORDS wait, else FLUSH_AFTER_MS from now (nothing when a
   * write is queued already, or a retry or the close will write them).
   */
  private schedule (): void {
    if (this.flushQueued || this.retryTimer !== null || this.closed) return
    if (this.pending.length >= FLUSH_RECORDS) this.flushSoon()
    else this.scheduled ??= setTimeout(() => { this.flushSoon() }, FLUSH_AFTER_MS).unref()
  }

  /** The scheduled write, queued on the worker now. */
  private flushSoon (): void {
    if (this.scheduled !== null) clearTimeout(this.scheduled)
    this.scheduled = null
    this.flushQueued = true
    void this.run(async () => {
      this.flushQueued = false
      await this.flush()
    })
  }

  /** Writes one batch; true when it (or nothing) was written, false when the write failed. */
  private async flush (): Promise<boolean> {
    if (this.lostSinceEvent.count > 0) {
      const { count, firstAt, lastAt } = this.lostSinceEvent
      this.events.push({
        time: new Date(this.now()).toISOString(), event: 'audit.lost', count,
        firstAt: new Date(firstAt).toISOString(), lastAt: new Date(lastAt).toISOString()
      } satisfies ChainEvent)
      this.lostSinceEvent = { count: 0, firstAt: 0, lastAt: 0 }
    }
    // With nothing to write, a retry still tries the destination (opening the file again, writing what it holds to
    // write again), to learn it works.
    if (this.pending.length === 0 && this.events.length === 0 && this.ok && this.sink.unwritten() === 0) return true
    const events = this.events.length
    const batch = [...this.events, ...this.pending.slice(0, MAX_BATCH)]
    const { written, error } = await this.sink.write(batch)
    const eventsWritten = Math.min(written, events)
    this.events.splice(0, eventsWritten)
    this.pending.splice(0, written - eventsWritten)
    this.counts.written += written - eventsWritten
    if (error !== undefined) {
      this.failed(error)
      return false
    }
    this.recovered()
    if (this.pending.length > 0 || this.events.length > 0) this.schedule()
    return true
  }

  private failed (err: Error): void {
    this.counts.failed++
    if (this.ok) {
      this.ok = false
      this.downSince = this.now()
      this.log.error({ err: errorSummary(err) }, `audit: records cannot be written; ${this.onFailureHint}; retrying every ${RETRY_MS} ms`)
    }
    if (this.retryTimer === null && !this.closed) {
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null
        void this.run(() => this.flush())
      }, RETRY_MS).unref()
    }
  }

  private recovered (): void {
    if (this.ok) return
    this.ok = true
    this.log.warn({ downMs: this.now() - this.downSince, lost: this.counts.lost }, 'audit: writing works again')
  }

  private drop (reason: string): void {
    const now = this.now()
    this.counts.lost++
    if (this.lostSinceEvent.count === 0) this.lostSinceEvent.firstAt = now
    this.lostSinceEvent.count++
    this.lostSinceEvent.lastAt = now
    if (this.ok && !this.closed) {
      this.ok = false
      this.downSince = now
      this.log.error({ reason }, `audit: a record was lost: ${reason}; ${this.onFailureHint}`)
    } else if (now - this.lostLoggedAt >= LOST_LOG_EVERY_MS) {
      this.log.error({ reason, total: this.counts.lost }, 'audit: records are being lost')
    } else {
      return
    }
    this.lostLoggedAt = now
  }
}

/** Bare JSON lines to a stream (stdout): one write in flight, and a stuck reader is a failed write, not a hang. */
class StreamSink implements Sink {
  private broken: Error | null = null

  constructor (private readonly stream: Writable) {
    // Without a listener an EPIPE on stdout would crash the process; the failed write reports it instead.
    stream.on('error', (err: Error) => { this.broken = err })
  }

  async write (records: object[]): Promise<{ written: number, error?: Error }> {
    if (this.broken !== null) return { written: 0, error: this.broken }
    if (records.length === 0) return { written: 0 }
    const text = records.map(r => JSON.stringify(r)).join('\n') + '\n'
    const error = await new Promise<Error | null | undefined>(resolve => { this.stream.write(text, resolve) })
    return error ? { written: 0, error } : { written: records.length }
  }

  async reopen (): Promise<void> {}
  async tick (): Promise<undefined> { return undefined }
  async settle (): Promise<void> {}
  async close (): Promise<void> {}
  unwritten (): number { return 0 }
}

function utcDay (ms: number): string {
  return new Date(ms).toISOString().slice(0, 10)
}

interface Resume {
  head: ChainHead
  /** the active file's first record's seq, for the name it gets when rotated */
  fileFirstSeq: number | null
  /** the active file ends without a newline: write one before anything else */
  needsNewline: boolean
  /** a torn last line: of the active file, or (`file`, its name) of the newest closed file the chain goes on from */
  torn: { line: number, sha256: string, file?: string } | null
  /** the last record of the active file, when its end was clean */
  last: ChainedRecord | null
}

export class AuditStartError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'AuditStartError'
  }
}

/**
 * Where the chain stands: the last record of the active file, or of the newest closed file when the active one
 * is empty or missing. A last line without its newline that is not a record (the previous writer stopped
 * mid-line) is reported as torn; a newline-ended one, which no crash leaves, is refused; so is a file of records
 * without chain fields (an older gateway's), rather than silently restarted.
 */
async function resumePoint (file: string): Promise<Resume> {
  let head: ChainHead | null = null
  let fileFirstSeq: number | null = null
  let needsNewline = false
  let torn: Resume['torn'] = null
  let last: ChainedRecord | null = null
  const active = await lstat(file).catch(() => null)
  if (active !== null && !active.isFile()) throw new AuditStartError(notRegular(file).message)
  if (active !== null) {
    const tail = await readTail(file)
    const clean = tail.unterminated === null ? parseChained(tail.lastLine ?? '') : null
    if (clean !== null) {
      head = { seq: clean.seq, hash: clean.hash }
      last = clean
    } else if (tail.size > 0) {
      // Rare (a crash, a full disk): read the file through to find its last record and count lines.
      let lines = 0
      let lastLine: string | null = null
      let lastChained: ChainHead | null = null
      let unchained = 0
      for await (const line of readLines(file)) {
        lines++
        lastLine = line
        const r = parseChained(line)
        if (r !== null) lastChained = { seq: r.seq, hash: r.hash }
        else if (line.startsWith('{')) unchained++
      }
      if (lastChained === null && unchained > 0) {
        throw new AuditStartError(`audit file ${file} holds records without a hash chain (written by an older gateway). ` +
          `Move it out of the series (e.g. mv ${file} ${dirname(file)}/pre-chain-${basename(file)}) and start again.`)
      }
      needsNewline = tail.unterminated !== null
      if (parseChained(lastLine ?? '') === null) {
        // The writer writes whole lines: a crash mid-write leaves a last line without its newline, and only such
        // a line is taken for torn. A whole last line that is not a record was written by someone else; sealing
        // it as torn would let an edit (or a cut tail) pass verification.
        if (!needsNewline) {
          throw new AuditStartError(`audit file ${file} ends with a whole line (line ${lines}) that is not an audit record: a crash never ` +
            'leaves one (the gateway writes whole lines), so the file was edited or a line was added. Check the series ' +
            `(ohmygpt-gateway audit verify), move ${file} out of it (keep it as evidence), and start again.`)
        }
        torn = { line: lines, sha256: lineDigest(lastLine ?? '') }
      }
      head = lastChained
    }
    // (Its first record's, not its first line's: a file whose first line was edited would be named by the next record
    // written when it rotates, the name the file after it gets, whose rotation in the same second would replace it.)
    if (tail.size > 0) fileFirstSeq = await firstSeqOf(file)
  }
  if (head === null) {
    // The chain goes on from the newest closed file, which must be read to its end. One that cannot be read
    // at all has no first seq and would be passed over: the chain would fork behind it.
    const closed = (await seriesFiles(file)).filter(f => f.path !== file)
    let unreadable: AuditReadError | null = null
    for (const f of closed) if (f.firstSeq === null) unreadable ??= await readProblem(f.path)
    const newest = closed.filter(f => f.firstSeq !== null).at(-1)
    try {
      if (unreadable !== null) throw unreadable
      last = newest === undefined ? null : await lastRecord(newest.path)
    } catch (err) {
      if (!(err instanceof AuditReadError)) throw err
      throw new AuditStartError(`${err.message}. The hash chain cannot go on from a file it cannot read: check the series ` +
        '(ohmygpt-gateway audit verify), move the damaged file out of it, and start again.')
    }
    if (newest !== undefined && !newest.path.endsWith(GZIP_SUFFIX)) {
      // A crash tore its last line, and the file was moved (an outside rotation) before this start: the record
      // saying so opens the new file, naming it.
      torn = await tornEnd(newest.path)
    }
    if (newest !== undefined && last === null) {
      // It has records (a first seq) but does not end with one: its last line was edited or added. Going on from
      // seq 1 would start a second chain in the series.
      throw new AuditStartError(`audit file ${newest.path}, the newest closed file of the series, does not end with an audit ` +
        'record: a line was edited or added after it was closed. The hash chain cannot go on from it: check the series ' +
        '(ohmygpt-gateway audit verify), move the file out of it (keep it as evidence), and start again.')
    }
    head = last === null ? GENESIS : { seq: last.seq, hash: last.hash }
  }
  return { head, fileFirstSeq, needsNewline, torn, last }
}

/** The torn last line (no newline, not a record) of a closed plain file, with its number and the file's name. */
async function tornEnd (file: string): Promise<Resume['torn']> {
  const tail = await readTail(file)
  if (tail.unterminated === null || parseChained(tail.unterminated) !== null) return null
  let line = 0
  for await (const _text of readLines(file)) line++
  return { line, sha256: lineDigest(tail.unterminated), file: basename(file) }
}

/**
 * Opens the active file for appending, only when it is a regular file: not through a symbolic link (a link to
 * /dev/null would swallow every record while each write succeeds), and without waiting on a FIFO that nobody
 * reads (O_NONBLOCK, which does nothing to a regular file). The caller checks the type with fstat.
 */
function openRegular (file: string): Promise<FileHandle> {
  const { O_APPEND, O_CREAT, O_WRONLY, O_NOFOLLOW, O_NONBLOCK } = fsConstants
  return open(file, O_APPEND | O_CREAT | O_WRONLY | O_NOFOLLOW | O_NONBLOCK, 0o666).catch((err: NodeJS.ErrnoException) => {
    throw err.code === 'ELOOP' || err.code === 'ENXIO' ? notRegular(file) : err
  })
}

function notRegular (file: string): Error {
  return new Error(`audit file ${notRegularAuditFile(file)}`)
}

/**
 * Replaces a closed file by its gzip; nothing to do when it is gone already (removed by rotate.keep meanwhile, its
 * gzip queued behind the pruning). Both files are opened before any byte flows: a stream opens its file in the
 * background, so with a source found missing the pipeline failed while the temp file was still being created, and
 * the unlink that should remove it could come first (a partial gzip left behind by a clean close).
 */
async function gzipFile (file: string): Promise<void> {
  const target = file + GZIP_SUFFIX
  const temp = target + TEMP_SUFFIX
  let source: FileHandle
  try {
    source = await open(file, 'r')
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
    throw err
  }
  let out: FileHandle
  try {
    out = await open(temp, 'w')
  } catch (err) {
    await source.close()
    throw err
  }
  try {
    // (Each stream closes its file when it ends or fails.)
    await pipeline(source.createReadStream(), createGzip(), out.createWriteStream())
  } catch (err) {
    await unlink(temp).catch(() => {})
    throw err
  }
  const fh = await open(temp, 'r+')
  try { await fh.sync() } finally { await fh.close() }
  await rename(temp, target)
  await unlink(file)
}

/** What tells a file changed: its inode, size and modification time. */
function fileVersion (st: { ino: number, size: number, mtimeMs: number }): string {
  return `${st.ino}:${st.size}:${st.mtimeMs}`
}

/** The active file of a chained series, its rotation and its housekeeping (gzip, keep). */
class FileSink implements Sink {
  private fh: FileHandle | null = null
  private ino = 0
  private dev = 0
  private size = 0
  /** a write failed part-way: the file may end in part of a line, cut it back to `size` before writing */
  private dirty = false
  private unsynced = false
  /** the last fsync failed: writes count as failed until one succeeds */
  private syncFailed = false
  private fileDay = ''
  private fileFirstSeq: number | null
  private needsNewline: boolean
  /** lines written since the file was last seen in place, to write again if it turns out to have been removed */
  private recent: Buffer[] = []
  private recentBytes = 0
  private replay: Buffer[] = []
  private housekeeping: Promise<void> = Promise.resolve()
  private closing = false

  constructor (
    private readonly file: string,
    private head: ChainHead,
    resume: Resume,
    private readonly opts: {
      hasher: Hasher
      fsync: FsyncMode
      rotate: RotateOptions
      log: AuditLog
      lock: AuditLock
      now: () => number
      /** records the removal of closed files in the chain, then removes them (Writer.prune) */
      prune: (event: ChainEvent, files: readonly string[]) => Promise<void>
    }
  ) {
    this.fileFirstSeq = resume.fileFirstSeq
    this.needsNewline = resume.needsNewline
  }

  /** Opens the active file at start: a file that cannot even be opened stops the start. */
  async start (): Promise<void> {
    try {
      await this.openActive()
    } catch (err) {
      const { code, message } = errorSummary(err)
      throw new AuditStartError(code === undefined ? message : `cannot open audit file ${this.file}: ${code}`)
    }
    this.housekeep(null)
  }

  private async openActive (): Promise<void> {
    makeDirectories(dirname(this.file)) // (a few stat calls, at start and on a reopen)
    const fh = await openRegular(this.file)
    try {
      const st = await fh.stat()
      if (!st.isFile()) throw notRegular(this.file)
      // The same file after a write failed part-way: keep the size of its whole lines, to cut the rest off.
      if (!this.dirty || st.ino !== this.ino || st.dev !== this.dev) {
        this.size = st.size
        this.dirty = false
      }
      this.ino = st.ino
      this.dev = st.dev
      if (st.size === 0) {
        this.fileFirstSeq = null
        this.fileDay = ''
        this.needsNewline = false
      } else {
        this.fileDay = utcDay(st.mtimeMs)
      }
      for (const buf of this.replay) await this.appendRaw(fh, buf)
      if (this.fileFirstSeq === null && this.replay.length > 0) {
        // The file starts with the records written again: its rotated name must give the first of them. Named by
        // the next seq instead, it would get the name of the file after it, whose rotation in the same second
        // replaces it, and the records written again would be lost after all.
        const first = this.replay[0]!
        this.fileFirstSeq = parseChained(first.toString('utf8', 0, first.indexOf(0x0a)))?.seq ?? null
        this.fileDay = utcDay(this.opts.now())
      }
    } catch (err) {
      await fh.close().catch(() => {})
      throw err
    }
    this.replay = []
    this.fh = fh
  }

  /**
   * Writes bytes at the end of the file. Returns how many went in; on a failure part-way (a disk filling up),
   * the error comes with the count, and the file is marked to be cut back before the next write.
   */
  private async append (fh: FileHandle, buf: Buffer): Promise<{ bytes: number, error?: Error }> {
    let offset = 0
    try {
      while (offset < buf.length) offset += (await fh.write(buf, offset)).bytesWritten
      return { bytes: offset }
    } catch (err) {
      return { bytes: offset, error: err as Error }
    }
  }

  /** The first `bytes` of `buf` are in the file for good. */
  private accepted (buf: Buffer, bytes: number): void {
    if (bytes === 0) return
    const kept = buf.subarray(0, bytes)
    this.size += bytes
    this.unsynced = true
    this.recent.push(kept)
    this.recentBytes += bytes
    while (this.recentBytes > MAX_REPLAY_BYTES && this.recent.length > 1) this.recentBytes -= this.recent.shift()!.length
  }

  /**
   * Appends sealed lines; returns how many are in the file whole. A write that fails part-way keeps the whole
   * lines it got in (the chain moves on to the last of them), so a disk that frees up a little is used a little.
   */
  private async appendLines (lines: Array<{ line: string, head: ChainHead }>, now: number): Promise<{ count: number, error?: Error }> {
    const prefix = this.needsNewline ? '\n' : ''
    const buf = Buffer.from(prefix + lines.map(l => l.line).join('\n') + '\n')
    const { bytes, error } = await this.append(this.fh!, buf)
    let count = lines.length
    let whole = buf.length
    if (error !== undefined) {
      count = 0
      whole = prefix.length
      while (count < lines.length && whole + Buffer.byteLength(lines[count]!.line) + 1 <= bytes) {
        whole += Buffer.byteLength(lines[count]!.line) + 1
        count++
      }
      // Not one whole line: the newline before the first (after a torn line) is cut off with the rest, so the file
      // never ends in a newline-ended torn line, which the next start would refuse as an edit.
      if (count === 0) whole = 0
      if (bytes > whole) this.dirty = true
    }
    this.accepted(buf, whole)
    if (whole >= prefix.length && whole > 0) this.needsNewline = false
    if (count > 0) {
      if (this.fileFirstSeq === null) {
        this.fileFirstSeq = lines[0]!.head.seq
        this.fileDay = utcDay(now)
      }
      this.head = lines[count - 1]!.head
    }
    return { count, error }
  }

  /** Writes raw bytes (lines already sealed, written again into a new file): all of them, or an error. */
  private async appendRaw (fh: FileHandle, buf: Buffer): Promise<void> {
    const { bytes, error } = await this.append(fh, buf)
    if (error !== undefined) {
      if (bytes > 0) this.dirty = true
      throw error
    }
    this.accepted(buf, bytes)
  }

  private async closeActive (): Promise<void> {
    const fh = this.fh
    this.fh = null
    if (fh === null) return
    if (this.dirty) await this.cutBack(fh).catch(() => {})
    try {
      if (this.unsynced) await fh.datasync()
      this.unsynced = false
    } finally {
      await fh.close()
    }
  }

  async write (records: object[]): Promise<{ written: number, error?: Error }> {
    let written = 0
    try {
      if (this.fh === null) await this.openActive()
      if (this.dirty) await this.cutBack(this.fh!)
      const now = this.opts.now()
      // A file that ends in a torn line is not closed before the record acknowledging it is in (verify looks for
      // the two in the same file).
      const torn = this.needsNewline
      if (this.opts.rotate.daily && this.size > 0 && this.fileDay !== utcDay(now) && !torn) await this.rotate(now)
      let head = this.head
      let lines: Array<{ line: string, head: ChainHead }> = []
      let bytes = 0
      const maxBytes = this.opts.rotate.maxBytes
      const commit = async () => {
        if (lines.length === 0) return
        const { count, error } = await this.appendLines(lines, now)
        written += count
        if (error !== undefined) throw error
        lines = []
        bytes = 0
      }
      for (const record of records) {
        if (torn && lines.length === 1 && written === 0) {
          // The acknowledgement is in: the rotation put off for it happens now.
          await commit()
          if (this.opts.rotate.daily && this.fileDay !== utcDay(now)) await this.rotate(now)
        }
        const sealed = seal(record, head, this.opts.hasher)
        const lineBytes = Buffer.byteLength(sealed.line) + 1
        if (maxBytes !== undefined && this.size + bytes + lineBytes > maxBytes && this.size + bytes > 0 && !(torn && lines.length === 0)) {
          await commit()
          await this.rotate(now)
        }
        lines.push(sealed)
        bytes += lineBytes
        head = sealed.head
      }
      await commit()
      if (this.opts.fsync === 'every' || this.syncFailed) await this.sync()
      return { written }
    } catch (err) {
      // The file may have been replaced or gone bad: the next attempt opens the path again.
      await this.closeActive().catch(() => {})
      return { written, error: err as Error }
    }
  }

  /** Cuts off the part of a line a failed write left at the end, so that the file ends with a whole record. */
  private async cutBack (fh: FileHandle): Promise<void> {
    const st = await fh.stat()
    if (st.isFile() && st.size !== this.size) await fh.truncate(this.size)
    this.dirty = false
  }

  /** fsync; what it did not get to disk stays unsynced, and is tried again at the next write or tick. */
  private async sync (): Promise<void> {
    if (this.fh === null || !this.unsynced) return
    try {
      await this.fh.datasync()
    } catch (err) {
      this.syncFailed = true
      throw err
    }
    this.unsynced = false
    this.syncFailed = false
  }

  private async rotate (now: number): Promise<void> {
    // Moved or removed by an outside tool since the last watch (it looks once a second): the file is no longer at
    // the path to be renamed, and its records stay where that tool put them, or are written again (removed).
    const current = await this.atPath()
    if (current !== 'same') {
      await this.followOutsideRotation(current, await this.unlinked())
      return
    }
    await this.closeActive()
    const target = rotatedName(this.file, now, this.fileFirstSeq ?? this.head.seq + 1)
    try {
      await rename(this.file, target)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err
      // Gone since that look (the close's fsync takes a while): moved or removed, it cannot be told now. Its
      // records are written again unless the series holds them (a file moved into the series does).
      await this.followOutsideRotation('removed', true)
      return
    }
    this.recent = []
    this.recentBytes = 0
    this.opts.log.info({ file: target }, 'audit: rotated')
    await this.openActive()
    this.housekeep(target)
  }

  /** gzip and keep, in the background: a slow gzip never holds up a write. */
  private housekeep (closedFile: string | null): void {
    const { gzip, keep } = this.opts.rotate
    if (!gzip && keep === 0) return
    this.housekeeping = this.housekeeping.then(async () => {
      if (gzip) {
        // At start: files a stopped gateway left half done (a plain rotated file, a partial .gz).
        const plain = closedFile !== null
          ? [closedFile]
          : (await seriesFiles(this.file)).map(f => f.path).filter(p => isOwnRotated(this.file, p) && !p.endsWith(GZIP_SUFFIX))
        if (closedFile === null) {
          const dir = dirname(this.file)
          const partial = (await readdir(dir)).filter(n => n.startsWith(basename(this.file) + '.') && n.endsWith(GZIP_SUFFIX + TEMP_SUFFIX))
          for (const name of partial) await unlink(join(dir, name)).catch(() => {})
        }
        for (const p of plain) await this.gzipKeepingLast(p)
      }
      // Pruning is recorded in the chain, so once the file is closed it waits for the next start.
      if (keep > 0 && !this.closing) await this.prune(keep)
    }).catch((err: unknown) => {
      this.opts.log.error({ err: errorSummary(err) }, 'audit: housekeeping of closed files failed')
    })
  }

  /** Removes the oldest closed files beyond `keep`, and records in the chain what was removed and up to where. */
  private async prune (keep: number): Promise<void> {
    // Only files that can be closed files of this chain count and go: one whose first seq is not below the active
    // file's first (or is no record at all) was not closed by it. Counted, such a file (put there by anyone who can
    // write the directory, no key needed) would push the chain's newest closed files out, and the pruned record,
    // quoting its first record, would make verify accept the series once it is removed, with its history gone;
    // left alone, verify names it instead.
    // (The active file's first seq read after the listing: a write meanwhile may have rotated, and the file it
    // closed, listed, would otherwise count as not of the chain.)
    const files = (await seriesFiles(this.file)).filter(f => f.path !== this.file)
    const activeFirst = this.fileFirstSeq ?? this.head.seq + 1
    const candidates = files.filter(f => f.firstSeq !== null && f.firstSeq < activeFirst)
    // No more of them than keep: none goes, whichever are links; the walk, which reads each gzipped file through
    // once per process, is spared (a start finds as many closed files as the last pruning left).
    const closed = candidates.length > keep ? await this.chainFiles(candidates) : candidates
    // (Files past the active one's first seq are foreign whatever the walk found; the others are said only once the
    // walk found the chain: it finds none when the file rotated since the listing.)
    const foreign = files.filter(f => !closed.includes(f) && (closed.length > 0 || f.firstSeq === null || f.firstSeq >= activeFirst))
    if (foreign.length > 0) {
      this.opts.log.warn({ files: foreign.map(f => basename(f.path)) },
        'audit: files named like the series that are not links of its chain (records beyond it, or copies of its files) are left out of rotate.keep')
    }
    const remove = closed.slice(0, Math.max(0, closed.length - keep))
    const oldestKept = closed[remove.length]
    if (remove.length === 0 || oldestKept === undefined) return
    const first = parseChained(await firstLine(oldestKept.path) ?? '')
    if (first === null) {
      this.opts.log.error({ file: oldestKept.path }, 'audit: not pruning: the oldest kept file does not start with a record')
      return
    }
    await this.opts.prune({
      time: new Date(this.opts.now()).toISOString(), event: 'audit.pruned', files: remove.map(f => basename(f.path)),
      throughSeq: first.seq - 1, throughHash: first.prevHash
    }, remove.map(f => f.path))
  }

  /** Last records of closed files read for chainFiles, by path, valid while the file is unchanged. */
  private readonly lastRecords = new Map<string, { version: string, last: ChainedRecord | null }>()

  /**
   * The closed files that are links of the chain, oldest first: walked back from the active file, each one's last
   * record the one the file after it links to (seq and hash). Copies of the chain's files, or of their first lines,
   * planted beside it hold records of the chain too, and seqs below the active file's: counted, they would push its
   * real files out, with a pruned record the chain signs. Empty when the walk cannot start (a rotation since the
   * listing, an active file that does not start with a record): nothing is pruned this time.
   */
  private async chainFiles (candidates: SeriesFile[]): Promise<SeriesFile[]> {
    let link: ChainHead | null = this.head
    if (this.fileFirstSeq !== null) {
      const first = parseChained(await firstLine(this.file) ?? '')
      link = first === null || first.seq !== this.fileFirstSeq ? null : { seq: first.seq - 1, hash: first.prevHash }
    }
    const lasts = new Map<SeriesFile, ChainedRecord | null>()
    for (const file of candidates) lasts.set(file, await this.lastRecordOf(file.path))
    const chain: SeriesFile[] = []
    while (link !== null && link.seq > 0) {
      const { seq, hash } = link
      // Of the files ending with the record the link names, the one reaching furthest back (the lowest first seq:
      // candidates are in that order). Pieces cut from a closed file and planted beside it end with that record too:
      // taken one by one, they made the chain longer than it is, and keep pruned its oldest files before their time.
      const file = candidates.find(f => !chain.includes(f) && f.firstSeq! <= seq && lasts.get(f)?.seq === seq && lasts.get(f)?.hash === hash)
      if (file === undefined) break
      const first = parseChained(await firstLine(file.path) ?? '')
      if (first === null) break
      chain.unshift(file)
      link = { seq: first.seq - 1, hash: first.prevHash }
    }
    // (Only files still there are remembered: one entry per rotation would add up.)
    for (const path of this.lastRecords.keys()) if (!candidates.some(f => f.path === path)) this.lastRecords.delete(path)
    return chain
  }

  /**
   * gzipFile, remembering the file's last record for the gzip (read from the plain file's end: the gzip could only be
   * read through to find it, which the pruning's walk would do at every rotation).
   */
  private async gzipKeepingLast (file: string): Promise<void> {
    const last = this.opts.rotate.keep > 0 ? await lastRecord(file).catch(() => undefined) : undefined
    await gzipFile(file)
    if (last === undefined) return
    const gzipped = file + GZIP_SUFFIX
    const st = await stat(gzipped).catch(() => null)
    if (st !== null) this.lastRecords.set(gzipped, { version: fileVersion(st), last })
  }

  private async lastRecordOf (path: string): Promise<ChainedRecord | null> {
    const version = fileVersion(await stat(path))
    const known = this.lastRecords.get(path)
    if (known?.version === version) return known.last
    let last: ChainedRecord | null
    try {
      last = await lastRecord(path)
    } catch (err) {
      // A file that cannot be read to its end (a gzipped copy cut short, damaged on disk) is no link it can be shown
      // to be: left out, as a copy is, it stops no pruning of the chain's files. (Not remembered: the cause may be
      // the process's, gone by the next rotation.)
      if (err instanceof AuditReadError) return null
      throw err
    }
    this.lastRecords.set(path, { version, last })
    return last
  }

  async reopen (): Promise<void> {
    // Removed rather than moved (rm, then the signal): what went into it is written again, as the watch would.
    const current = this.fh === null ? 'same' : await this.atPath()
    if (current !== 'same') {
      await this.followOutsideRotation(current, await this.unlinked(), true).catch(() => {}) // a failure shows at the next write
      this.opts.log.info({ file: this.file }, 'audit: reopened')
      return
    }
    await this.closeActive().catch(() => {})
    this.recent = []
    this.recentBytes = 0
    await this.openActive().catch(() => {}) // a failure shows at the next write, which retries
    this.opts.log.info({ file: this.file }, 'audit: reopened')
  }

  async tick (): Promise<Error | undefined> {
    if (this.opts.fsync === 'interval') {
      try {
        await this.sync()
      } catch (err) {
        return err as Error
      }
    }
    if (this.fh === null) return undefined
    const current = await this.atPath()
    if (current === 'same') {
      this.recent = []
      this.recentBytes = 0
      return undefined
    }
    try {
      await this.followOutsideRotation(current, await this.unlinked())
    } catch (err) {
      return err as Error
    }
    return undefined
  }

  /** Whether the open file was removed (no name left), rather than moved or replaced. */
  private async unlinked (): Promise<boolean> {
    return (await this.fh!.stat()).nlink === 0
  }

  /** What is at the path now: the open file itself, another file, or nothing. */
  private async atPath (): Promise<'same' | 'replaced' | 'removed'> {
    let current: { ino: number, dev: number }
    try {
      current = await stat(this.file)
    } catch {
      return 'removed'
    }
    return current.ino === this.ino && current.dev === this.dev ? 'same' : 'replaced'
  }

  /**
   * The file written is no longer at the path (moved, removed or replaced by something else): open the path anew,
   * first writing again the records that went into it if it was `removed` (and the series holds them nowhere else).
   * `signalled`: a SIGUSR2 asked for it, the end of a logrotate run (which moved the file, and may have gzipped it or
   * made an empty one at the path): that is no warning, unless records had to be written again.
   */
  private async followOutsideRotation (current: 'replaced' | 'removed', removed: boolean, signalled = false): Promise<void> {
    const lost = removed ? await this.notInSeries(this.recent) : []
    this.replay = lost.length === 0 ? [] : [Buffer.from(lost.join('\n') + '\n')]
    this.recent = []
    this.recentBytes = 0
    if (!signalled || lost.length > 0) {
      // Nothing at the path, the file still named elsewhere: moved (`mv`), not removed.
      const what = current === 'removed' && !removed ? 'moved' : current
      this.opts.log.warn({ file: this.file, rewritten: lost.length },
        `audit: the file was ${what} by something else; reopening it` +
        (lost.length > 0 ? ' and writing again the records that went into the removed file' : ''))
    }
    await this.closeActive().catch(() => {})
    await this.openActive()
  }

  /**
   * The lines written lately into a file that is now removed, less those still in the series: a file removed
   * after being copied or compressed (logrotate's `compress` gzips the moved file and unlinks it at once) holds
   * them still, and writing them again would put them in the series twice. Only records above the highest seq
   * in the other files of the series are written again.
   */
  private async notInSeries (recent: readonly Buffer[]): Promise<string[]> {
    const lines = Buffer.concat(recent).toString('utf8').split('\n').filter(l => l !== '')
    let present = 0
    // A closed file gzipped meanwhile (its plain file removed between the listing and the read) is no failure:
    // the series is listed again.
    for (let attempt = 1; ; attempt++) {
      try {
        const newest = (await seriesFiles(this.file)).filter(f => f.path !== this.file && f.firstSeq !== null).at(-1)
        present = newest === undefined ? 0 : (await lastRecord(newest.path))?.seq ?? 0
        break
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT' && attempt < 3) continue
        // Better twice (verify shows it) than lost.
        this.opts.log.error({ err: errorSummary(err) }, 'audit: cannot read the series to see which records the removed file held')
        break
      }
    }
    return lines.filter(l => (parseChained(l)?.seq ?? Infinity) > present)
  }

  async settle (): Promise<void> {
    // A step under way can add another (a pruning's record rotates the file, whose gzip follows): wait for all.
    let seen: Promise<void>
    do {
      seen = this.housekeeping
      await seen
    } while (seen !== this.housekeeping)
  }

  unwritten (): number {
    return this.replay.reduce((n, buf) => n + buf.toString('latin1').split('\n').length - 1, 0)
  }

  async close (unwritten: boolean): Promise<void> {
    this.closing = true
    try {
      await this.closeActive()
    } finally {
      await (unwritten ? this.opts.lock.leave() : this.opts.lock.release())
    }
  }
}

export async function openAuditWriter (opts: AuditWriterOptions): Promise<AuditWriter> {
  const now = opts.now ?? Date.now
  const hint = opts.onFailure === 'open'
    ? 'calls are still served (audit.onFailure: open), and records that do not fit the buffer are lost'
    : 'API calls are refused with 503 audit_unavailable until a write succeeds (audit.onFailure: closed)'
  if (opts.file === '-') {
    opts.log.warn({}, 'audit: records go to stdout (audit.file "-"): no hash chain, no rotation, no lock, no fsync')
    const writer = new Writer(opts.log, opts.maxPending ?? MAX_PENDING, now, hint)
    writer.attach(new StreamSink(opts.stdout ?? process.stdout))
    return writer
  }
  makeDirectories(dirname(opts.file))
  let stale: ChainEvent | null = null
  const lock = await acquireLock(opts.file, holder => {
    opts.log.warn({ holder }, 'audit: taking over a stale lock left by a gateway that is gone')
    stale = { time: new Date(now()).toISOString(), event: 'audit.unclean_stop', pid: holder?.pid ?? null, host: holder?.host ?? null, since: holder?.since ?? null }
  }, (path, remade) => {
    if (remade) opts.log.warn({ lock: path }, `audit: the lock file ${path} was removed by something else; made again`)
    else opts.log.error({ lock: path }, `audit: the lock file ${path} was removed by something else, and another process made it again: ` +
      'two gateways may be writing this series')
  })
  try {
    const resume = await resumePoint(opts.file)
    for (const path of (await scanSeries(opts.file)).irregular) {
      if (path === opts.file) continue // refused above
      opts.log.warn({ file: path }, 'audit: not a regular file, though named like a file of the series: left out of it ' +
        '(audit verify fails on it; move it away)')
    }
    const hasher = chainHasher(opts.hmacKey)
    if (resume.last !== null && expectedHash(resume.last, hasher) !== resume.last.hash) {
      opts.log.warn({ file: opts.file, seq: resume.last.seq },
        `audit: the last record does not verify ${opts.hmacKey === undefined ? 'without an HMAC key' : 'with this AUDIT_HMAC_KEY'} ` +
        '(key added, removed or changed, or the record was edited); the chain goes on from it, and verify will show where')
    }
    const writer = new Writer(opts.log, opts.maxPending ?? MAX_PENDING, now, hint)
    const sink = new FileSink(opts.file, resume.head, resume, {
      hasher,
      fsync: opts.fsync,
      rotate: opts.rotate,
      log: opts.log,
      lock,
      now,
      prune: async (event, files) => { await writer.prune(event, files) }
    })
    writer.attach(sink)
    if (resume.torn !== null) {
      opts.log.warn({ file: resume.torn.file === undefined ? opts.file : join(dirname(opts.file), resume.torn.file), line: resume.torn.line },
        'audit: the last line of the file is torn (the previous writer stopped mid-record); it is kept, and a record saying so starts a new segment')
      writer.addEvent({ time: new Date(now()).toISOString(), event: 'audit.torn_line', ...resume.torn })
    }
    if (stale !== null) writer.addEvent(stale)
    opts.log.info({ file: opts.file, seq: resume.head.seq + 1, fsync: opts.fsync, hmac: opts.hmacKey !== undefined },
      resume.head.seq === 0 ? 'audit: starting a new hash chain' : 'audit: continuing the hash chain')
    await sink.start()
    return writer
  } catch (err) {
    // (A stale lock taken over is put back: the next start says the unclean stop this one could not write.)
    await lock.giveBack()
    throw err
  }
}
