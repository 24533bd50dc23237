// The audit file series: which files belong to it, in which order, and how to read them line by line.
//
// The series of `audit.file: ./audit/audit.jsonl` is the active file `audit.jsonl` plus every closed file beside
// it whose name starts with `audit.jsonl.` or `audit.jsonl-`: the gateway's own rotated files
// (`audit.jsonl.<UTC time of rotation>.<first seq>`, `.gz` when compressed) and an outside logrotate's
// (`audit.jsonl.1`, `audit.jsonl-20250101.gz`, ...). Files are ordered by the seq of their first record, never
// by name, so any naming scheme works; the active file comes last. Lock and temporary files are not part of it,
// and neither is anything that is not a regular file (a FIFO, a device, a symbolic link, a directory): opening a
// FIFO would wait for ever for a writer. Such entries are listed apart, so that each command can say so.
import { constants as fsConstants, createReadStream } from 'node:fs'
import { lstat, open, readdir, type FileHandle } from 'node:fs/promises'
import { basename, dirname, join } from 'node:path'
import { Readable } from 'node:stream'
import { createGunzip } from 'node:zlib'
import { parseChained, type ChainedRecord } from './chain.js'

export const LOCK_SUFFIX = '.lock'
export const TEMP_SUFFIX = '.tmp'
export const GZIP_SUFFIX = '.gz'

/** `20250101T120000Z` */
function compactUtc (ms: number): string {
  return new Date(ms).toISOString().replace(/[-:]/g, '').replace(/\.\d{3}Z$/, 'Z')
}

/** The name a closed file gets: the active name, the UTC time it was closed and its first seq (unique). */
export function rotatedName (file: string, closedAtMs: number, firstSeq: number): string {
  return `${file}.${compactUtc(closedAtMs)}.${firstSeq}`
}

/** A closed file the gateway rotated itself (plain or gzipped), as opposed to one named by another tool. */
export function isOwnRotated (file: string, candidate: string): boolean {
  const rest = candidate.slice(file.length)
  return candidate.startsWith(file) && /^\.\d{8}T\d{6}Z\.\d+(\.gz)?$/.test(rest)
}

export interface SeriesFile {
  path: string
  /** seq of the file's first record; null when it has none that can be read (empty, or not a record) */
  firstSeq: number | null
}

export interface SeriesScan {
  /** the regular files of the series, oldest first (by first seq; the active file last) */
  files: SeriesFile[]
  /** entries named like files of the series that are not regular files (not followed, never opened) */
  irregular: string[]
}

/** The files of the series of `file`, oldest first (by first seq; the active file last). */
export async function seriesFiles (file: string): Promise<SeriesFile[]> {
  return (await scanSeries(file)).files
}

/** The names of the series' members in its directory as it is now: the active file's and the closed files'. */
async function memberNames (file: string): Promise<string[]> {
  const base = basename(file)
  let names: string[]
  try {
    names = await readdir(dirname(file))
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return []
    throw err
  }
  return names.filter(n => n === base || ((n.startsWith(base + '.') || n.startsWith(base + '-')) &&
    !n.endsWith(LOCK_SUFFIX) && !n.endsWith(TEMP_SUFFIX))).sort()
}

/** The regular files of the series of `file`, oldest first (by first seq; the active file last). */
async function ordered (file: string, regular: readonly string[]): Promise<SeriesFile[]> {
  const files = await inSeriesOrder(regular.filter(p => p !== file))
  if (regular.includes(file)) files.push({ path: file, firstSeq: await firstSeqOf(file) })
  return files
}

/** The series of `file`, and the entries named like its files that are not regular files. */
export async function scanSeries (file: string): Promise<SeriesScan> {
  const regular: string[] = []
  const irregular: string[] = []
  for (const name of await memberNames(file)) {
    const path = join(dirname(file), name)
    const st = await lstat(path).catch(() => null) // gone meanwhile: not a member
    if (st?.isFile() === true) regular.push(path)
    else if (st !== null) irregular.push(path)
  }
  return { files: await ordered(file, regular), irregular }
}

/**
 * The seq of a file's first record: lines before it that are not records (edited until they no longer parse) do
 * not move the file out of its place in the series, where verification names them, nor change the name the writer
 * gives it when it rotates.
 */
export async function firstSeqOf (path: string): Promise<number | null> {
  try {
    for await (const line of readLines(path)) {
      const record = parseChained(line)
      if (record !== null) return record.seq
    }
  } catch {
    // unreadable: placed last, where verification names it
  }
  return null
}

/** Files ordered by the seq of their first record (files without one last, then by name). */
export async function inSeriesOrder (paths: readonly string[]): Promise<SeriesFile[]> {
  const files = await Promise.all(paths.map(async path => ({ path, firstSeq: await firstSeqOf(path) })))
  return files.sort((a, b) => (a.firstSeq ?? Infinity) - (b.firstSeq ?? Infinity) || a.path.localeCompare(b.path))
}

/**
 * Opens a file to read it, only when it is a regular file: O_NONBLOCK, so that a FIFO is never waited on (it
 * does nothing to a regular file), then its type is checked.
 */
async function openForRead (file: string): Promise<FileHandle> {
  const fh = await open(file, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK)
  try {
    if ((await fh.stat()).isFile()) return fh
  } catch (err) {
    await fh.close()
    throw err
  }
  await fh.close()
  throw new Error('not a regular file: a FIFO, device, socket or directory')
}

/**
 * Files a command opened as it listed them (pinSeries, pinFiles): readLines reads each through that descriptor, up to the size
 * it had then, whatever happens to its name meanwhile. A running gateway renames its active file when it rotates,
 * and gzips and removes closed ones: read by name later, a file could be another one, or gone, and a trail nobody
 * touched would show a gap. (A CLI process: the descriptors close when it exits.)
 */
const pinned = new Map<string, { fh: FileHandle, size: number }>()

/** Out of file descriptors: the process (EMFILE) or the system (ENFILE). */
const TOO_MANY_OPEN = new Set(['EMFILE', 'ENFILE'])

/**
 * The error for a command that cannot hold every file it reads open at once, said as it is: read by name later, the
 * file it stopped at would be called damaged. Null for any other error.
 */
function tooManyOpen (file: string, err: unknown): AuditReadError | null {
  const code = (err as NodeJS.ErrnoException).code ?? ''
  if (!TOO_MANY_OPEN.has(code)) return null
  return new AuditReadError(file, 0, new Error(`the series has more files than this process may open at once (${code}): ` +
    'raise its limit (ulimit -n), or name fewer files (oldest first)'), false)
}

/**
 * Whether a gateway writes a file now (the active file of a series whose lock is fresh): a reader may see one of its
 * writes part-way (the file grows a page at a time), so such a file is read up to its last whole line, the rest being
 * the next run's.
 */
export type BeingWritten = (path: string) => Promise<boolean>

/** The size a file pinned at `size` is read up to (see BeingWritten). */
async function pinnedSize (path: string, fh: FileHandle, size: number, beingWritten: BeingWritten): Promise<number> {
  return !path.endsWith(GZIP_SUFFIX) && await beingWritten(path) ? await wholeLinesEnd(fh, size) : size
}

/**
 * Opens `paths` now, to be read as they are now (see pinned); one that cannot be opened is read by name later, but
 * for the want of descriptors (tooManyOpen), which stops the command (the files this call opened closed again).
 */
export async function pinFiles (paths: readonly string[], beingWritten: BeingWritten): Promise<void> {
  const opened: string[] = []
  for (const path of paths) {
    if (pinned.has(path)) continue
    try {
      const fh = await openForRead(path)
      pinned.set(path, { fh, size: await pinnedSize(path, fh, (await fh.stat()).size, beingWritten) })
      opened.push(path)
    } catch (err) {
      const tooMany = tooManyOpen(path, err)
      if (tooMany === null) continue // read by name later, which says what is wrong with it
      await Promise.all(opened.map(async p => { await pinned.get(p)?.fh.close(); pinned.delete(p) }))
      throw tooMany
    }
  }
}

/** Listings of the directory a rotation may come between before pinSeries gives up (one a second is a busy gateway). */
const PIN_ATTEMPTS = 20

/** The end of the last whole line in the first `size` bytes of a file: `size` itself when it ends with a newline. */
async function wholeLinesEnd (fh: FileHandle, size: number): Promise<number> {
  for (let end = size; end > 0;) {
    const length = Math.min(64 * 1024, end)
    const { buffer } = await fh.read(Buffer.alloc(length), 0, length, end - length)
    const nl = buffer.lastIndexOf(0x0a)
    if (nl !== -1) return end - length + nl + 1
    end -= length
  }
  return 0
}

/**
 * The series of `file` as it stands at one moment, its regular files opened then (pinned), for a command that reads
 * it beside a running gateway. Between listing the directory and opening the files, the gateway may rotate (rename
 * its active file and open a new one at its path) or gzip a closed file and remove it: the files opened would miss
 * the renamed file's records, or one would be gone. So once they are open the directory is listed again, and all is
 * done again until both listings name the same files, each still the one opened under its name.
 */
export async function pinSeries (file: string, beingWritten: BeingWritten): Promise<SeriesScan> {
  for (let attempt = 1; ; attempt++) {
    const opened = new Map<string, { fh: FileHandle, size: number, ino: number, dev: number }>()
    const closeAll = async () => { await Promise.all([...opened.values()].map(async ({ fh }) => { await fh.close() })) }
    try {
      const names = await memberNames(file)
      const irregular: string[] = []
      for (const path of names.map(name => join(dirname(file), name))) {
        const st = await lstat(path).catch(() => null) // gone meanwhile: the second listing shows it
        if (st !== null && !st.isFile()) irregular.push(path)
        if (st?.isFile() !== true) continue
        try {
          const fh = await openForRead(path)
          opened.set(path, { fh, ...(await fh.stat()) })
        } catch (err) {
          if (TOO_MANY_OPEN.has((err as NodeJS.ErrnoException).code ?? '')) throw err
          // gone meanwhile (the second listing shows it), or cannot be read: read by name later, which says why
        }
      }
      const moved = (await memberNames(file)).join('\n') !== names.join('\n') ||
        !(await Promise.all([...opened].map(async ([path, f]) => {
          const now = await lstat(path).catch(() => null)
          return now?.ino === f.ino && now.dev === f.dev
        }))).every(Boolean)
      if (!moved) {
        for (const [path, { fh, size }] of opened) {
          pinned.set(path, { fh, size: await pinnedSize(path, fh, size, beingWritten) })
        }
        const regular = names.map(name => join(dirname(file), name)).filter(p => !irregular.includes(p))
        return { files: await ordered(file, regular), irregular }
      }
    } catch (err) {
      await closeAll()
      throw tooManyOpen(file, err) ?? err
    }
    await closeAll()
    if (attempt === PIN_ATTEMPTS) {
      throw new AuditReadError(file, 0, new Error(`the series changed each of the ${PIN_ATTEMPTS} times it was listed; try again`))
    }
  }
}

/** The first `size` bytes of a file, read by position in 64 KiB chunks (less, if it was cut short meanwhile). */
async function * chunksOf (fh: FileHandle, size: number): AsyncGenerator<Buffer> {
  for (let position = 0; position < size;) {
    const length = Math.min(64 * 1024, size - position)
    const { bytesRead, buffer } = await fh.read(Buffer.allocUnsafe(length), 0, length, position)
    if (bytesRead === 0) return
    position += bytesRead
    yield buffer.subarray(0, bytesRead)
  }
}

/** The file's bytes (gunzipped for a .gz) and the stream reading the file itself, to close when done. */
function rawStream (file: string, fh: FileHandle, pinnedSize?: number): { input: Readable, bytes: Readable } {
  // A pinned file is read from its start each time, by position, up to its pinned size, and its descriptor stays
  // open for the next reader (an fs stream closes its descriptor when destroyed, whatever autoClose says).
  const input: Readable = pinnedSize === undefined
    ? createReadStream(file, { fd: fh })
    : Readable.from(chunksOf(fh, pinnedSize), { objectMode: false })
  if (!file.endsWith(GZIP_SUFFIX)) return { input, bytes: input }
  const gunzip = createGunzip()
  input.on('error', (err: Error) => gunzip.destroy(err))
  return { input, bytes: input.pipe(gunzip) }
}

/** A file of the series that cannot be read (on), with where: verify, query and start say so, not a stack. */
export class AuditReadError extends Error {
  /** `ofTheFile`: the cause is the file's (a compressed one is then said to be cut short or damaged), not the process's */
  constructor (readonly file: string, readonly line: number, cause: unknown, ofTheFile = true) {
    const reason = (cause as NodeJS.ErrnoException).code ?? (cause as Error).message
    super(`cannot read audit file ${file} ${line === 0 ? '' : `after line ${line} `}(${reason})` +
      (ofTheFile && file.endsWith(GZIP_SUFFIX) ? ': a compressed file cut short or damaged' : ''))
    this.name = 'AuditReadError'
  }
}

/** How a file read by readLines ended: set once its last line has been read. */
export interface LineEnd {
  /** the last line had no newline after it (torn by a crash, or still being written) */
  unterminated: boolean
}

/**
 * The lines of a file, plain or gzipped, streamed: split on bytes, decoded per line, so memory holds one line
 * and a multi-byte character split across chunks stays whole. The text after the last newline (a torn last
 * line) is yielded too; a final newline yields nothing more, and `end` (when given) says which it was. A file
 * that cannot be read throws AuditReadError.
 */
export async function * readLines (file: string, end?: LineEnd): AsyncGenerator<string> {
  /** the parts of the line not finished yet: joined once, at its newline, so a long line is copied once */
  let rest: Buffer[] = []
  let lines = 0
  const pin = pinned.get(file)
  let fh: FileHandle
  try {
    fh = pin?.fh ?? await openForRead(file)
  } catch (err) {
    throw new AuditReadError(file, 0, err)
  }
  const { input, bytes } = rawStream(file, fh, pin?.size)
  const chunks = (bytes as AsyncIterable<Buffer>)[Symbol.asyncIterator]()
  try {
    for (;;) {
      let next: IteratorResult<Buffer>
      try {
        next = await chunks.next()
      } catch (err) {
        throw new AuditReadError(file, lines, err)
      }
      if (next.done === true) break
      const buf = next.value
      let start = 0
      let nl: number
      while ((nl = buf.indexOf(0x0a, start)) !== -1) {
        lines++
        if (rest.length === 0) {
          yield buf.toString('utf8', start, nl)
        } else {
          rest.push(buf.subarray(start, nl))
          const line = Buffer.concat(rest)
          rest = []
          yield line.toString('utf8')
        }
        start = nl + 1
      }
      if (start < buf.length) rest.push(buf.subarray(start))
    }
  } finally {
    await chunks.return?.()
    input.destroy() // a reader that stops early closes the file (a gunzip stopping leaves the file stream open)
  }
  if (end !== undefined) end.unterminated = rest.length > 0
  if (rest.length > 0) yield Buffer.concat(rest).toString('utf8')
}

/** Why a file cannot be read from its start (AuditReadError), or null when its first chunk reads. */
export async function readProblem (file: string): Promise<AuditReadError | null> {
  try {
    for await (const _line of readLines(file)) break // eslint-disable-line no-unreachable-loop
    return null
  } catch (err) {
    if (err instanceof AuditReadError) return err
    throw err
  }
}

/**
 * Whether a file has whole lines and no record among them (overwritten, gzipped twice, not a file of the series):
 * it has no first seq, and is put last. A crash leaves at most one line, without its newline: not this.
 */
export async function holdsNoRecord (file: string): Promise<boolean> {
  const end: LineEnd = { unterminated: false }
  let lines = 0
  try {
    for await (const line of readLines(file, end)) {
      if (parseChained(line) !== null) return false
      lines++
    }
  } catch {
    return false // unreadable: readProblem says so
  }
  return lines > (end.unterminated ? 1 : 0)
}

/** The first line of a file (at most 1 MiB of it), or null for an empty or unreadable file. */
export async function firstLine (file: string): Promise<string | null> {
  try {
    for await (const line of readLines(file)) return line.slice(0, 1 << 20)
  } catch {
    return null
  }
  return null
}

export interface Tail {
  /** size of the file in bytes */
  size: number
  /** the last newline-terminated line, if any */
  lastLine: string | null
  /** text after the last newline: a torn line, or a whole record whose newline was never written */
  unterminated: string | null
}

/** The end of a plain file, read backwards in growing windows until a whole line is found. */
export async function readTail (file: string): Promise<Tail> {
  const fh = await openForRead(file)
  try {
    const { size } = await fh.stat()
    if (size === 0) return { size, lastLine: null, unterminated: null }
    let window = Math.min(size, 64 * 1024)
    for (;;) {
      const buf = Buffer.alloc(window)
      await fh.read(buf, 0, window, size - window)
      const lastNl = buf.lastIndexOf(0x0a)
      const unterminated = lastNl === buf.length - 1 ? null : buf.toString('utf8', lastNl + 1)
      if (lastNl === -1 && window === size) return { size, lastLine: null, unterminated }
      const prevNl = lastNl <= 0 ? -1 : buf.lastIndexOf(0x0a, lastNl - 1)
      if (lastNl !== -1 && (prevNl !== -1 || window === size)) {
        return { size, lastLine: buf.toString('utf8', prevNl + 1, lastNl), unterminated }
      }
      window = Math.min(size, window * 4)
    }
  } finally {
    await fh.close()
  }
}

/** The last chained record of a file, plain (read from the end) or gzipped (read through). */
export async function lastRecord (file: string): Promise<ChainedRecord | null> {
  if (!file.endsWith(GZIP_SUFFIX)) {
    const tail = await readTail(file)
    return parseChained(tail.unterminated ?? '') ?? parseChained(tail.lastLine ?? '')
  }
  let last: ChainedRecord | null = null
  for await (const line of readLines(file)) last = parseChained(line) ?? last
  return last
}
