// One writer per audit file series: a lock file beside the active file (`audit.jsonl.lock`) holding the writer's
// pid, host, start time and the machine's boot id. A second gateway on the same series is refused with a message
// saying who holds it. A lock whose process is gone (same host, pid not running) is stale and taken over. A lock
// from another machine cannot be checked from here and is refused: two hosts writing one series through a shared
// volume would interleave two chains. Another host name on this machine (the kernel's boot id says so: a container
// made anew, with a new name, after its predecessor crashed) is judged by the heartbeat alone, under the same clock.
// The holder touches the lock every HEARTBEAT_MS: a pid says nothing across pid namespaces, and two containers with
// the same host name (host networking) each see the other's pid as gone, or as their own (pid 1); a lock judged
// stale by its pid is taken over only once its heartbeat has stopped.
// (proper-lockfile locks by mtime refresh alone and records no pid; this is the lock the trail needs, and small.)
import { randomBytes } from 'node:crypto'
import { hostname } from 'node:os'
import { link, readFile, rename, stat, unlink, utimes, writeFile } from 'node:fs/promises'
import { readFileSync } from 'node:fs'
import { resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { LOCK_SUFFIX, TEMP_SUFFIX } from './series.js'

export class AuditLockError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'AuditLockError'
  }
}

interface Holder {
  pid: number
  host: string
  since: string
  /** the kernel's boot id (Linux): the same for every container of one machine, until it boots again */
  boot?: string
}

/** This machine's boot id, or undefined where there is none to read. */
function bootId (): string | undefined {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'latin1').trim() || undefined
  } catch {
    return undefined
  }
}

export interface AuditLock {
  path: string
  release (): Promise<void>
  /**
   * Lets go of the lock as release() does, but puts back the stale lock it took over, as it was (its holder, its
   * last touch), if it took one over: a start that fails once it holds the lock (the series cannot be gone on from)
   * leaves the unclean stop for the next start to find and say, not lost.
   */
  giveBack (): Promise<void>
  /**
   * Stops touching the lock and leaves it where it is, as a crash does: the next start takes it over once its
   * heartbeat has stopped, and says an unclean stop in the chain (a close that could not write every record).
   */
  leave (): Promise<void>
}

/** A stale lock taken over: its bytes, and when its holder last touched it. */
interface LeftBehind {
  bytes: Buffer
  /** ms since the epoch */
  touched: number
}

/** The lock beside the lock, held while a stale lock is replaced (ending in LOCK_SUFFIX: not a file of the series). */
const TAKEOVER_SUFFIX = '.takeover' + LOCK_SUFFIX
/** How long a process waits for another's takeover before it looks again, and how many times it looks. */
const TAKEOVER_WAIT_MS = 20
const MAX_ATTEMPTS = 100

/** How often a holder touches its lock, and how long after the last touch a lock may be stale. */
const HEARTBEAT_MS = 1_000
const STALE_AFTER_MS = 5_000

/** Locks held by this process: a second writer in the same process is refused like one in another. */
const heldHere = new Set<string>()

function isRunning (pid: number): boolean {
  try {
    process.kill(pid, 0)
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM' // it exists, it is just not ours to signal
  }
  return !isZombie(pid)
}

/**
 * A process that has exited but that its parent has not reaped yet (a gateway killed with SIGKILL, restarted by a
 * supervisor that waits on it a moment later) still takes signal 0. Linux tells it by its state in /proc; where
 * there is no /proc, it counts as running.
 */
function isZombie (pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
    const state = stat.charAt(stat.lastIndexOf(')') + 2) // "pid (comm) S ...": comm may hold spaces and parentheses
    return state === 'Z' || state === 'X'
  } catch {
    return false
  }
}

async function readHolder (path: string): Promise<Holder | null> {
  return holderIn(await readFile(path).catch(() => null))
}

/** Longer than any host name (64 on Linux) or ISO time this gateway writes. */
const HOLDER_FIELD_MAX = 255

/**
 * A lock's text as it may be said in one line: its control characters (a line break would forge a line of the
 * log or of start's one-line error) shown as `?`, at most HOLDER_FIELD_MAX characters. A lock this gateway wrote
 * reads the same through it.
 */
function sayable (text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.slice(0, HOLDER_FIELD_MAX).replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, '?')
}

function holderIn (bytes: Buffer | null): Holder | null {
  try {
    const h = JSON.parse(bytes?.toString('utf8') ?? '') as Partial<Holder>
    // (A pid of 0 or below would ask kill() about a process group, or every process: no lock a gateway wrote.)
    return Number.isSafeInteger(h.pid) && h.pid! > 0 && typeof h.host === 'string'
      ? { pid: h.pid!, host: sayable(h.host), since: sayable(String(h.since)), ...(typeof h.boot === 'string' ? { boot: sayable(h.boot) } : {}) }
      : null
  } catch {
    return null // vanished, or not a lock this gateway writes: stale
  }
}

function sameHolder (a: Holder | null, b: Holder | null): boolean {
  return a === null || b === null ? a === b : a.pid === b.pid && a.host === b.host && a.since === b.since
}

async function mtimeOf (path: string): Promise<number | null> {
  try {
    return (await stat(path)).mtimeMs
  } catch {
    return null
  }
}

/**
 * Whether the lock at `path` is still being touched by a live holder: at once no when its last touch is older than
 * STALE_AFTER_MS, else it is watched until it would be that old. (A crashed gateway's restart waits that long.)
 */
async function heartbeatGoesOn (path: string): Promise<boolean> {
  const before = await mtimeOf(path)
  if (before === null) return false
  const age = Date.now() - before
  if (age >= STALE_AFTER_MS) return false
  await sleep(STALE_AFTER_MS - age + 50)
  return await mtimeOf(path) !== before
}

/** A name beside the lock, of this process alone; ending in TEMP_SUFFIX, never taken for a file of the series. */
function asideName (path: string, what: string): string {
  return `${path}.${process.pid}.${randomBytes(6).toString('hex')}.${what}${TEMP_SUFFIX}`
}

/**
 * Makes the lock, holding `me`, unless it exists. It is written whole under a name of its own, then linked into
 * place: link fails when the lock exists, and no one ever sees it empty.
 */
async function create (path: string, me: Holder): Promise<boolean> {
  const temp = asideName(path, 'new')
  try {
    // (A full disk fails the write once the file is made: it is removed with the rest.)
    await writeFile(temp, JSON.stringify(me) + '\n', { flag: 'wx' })
  } catch (err) {
    await unlink(temp).catch(() => {})
    throw new AuditLockError(`cannot write the audit lock ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`)
  }
  try {
    await link(temp, path)
    return true
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false
    throw err
  } finally {
    await unlink(temp).catch(() => {})
  }
}

/** Holding `path`: runs `task`, then lets go; false (and no task run) when another process holds it. */
async function whileHolding (path: string, me: Holder, task: () => Promise<void>): Promise<boolean> {
  if (!await create(path, me)) return false
  try {
    await task()
  } finally {
    await unlink(path).catch(() => {})
  }
  return true
}

/**
 * Replaces the lock judged stale by ours, under a second lock of its own (`.takeover`), so that of several
 * processes taking over at once one alone removes and makes the lock, and only while it is still the stale one:
 * a lock is only ever removed by its holder or by the one process holding the takeover. Says whether the lock is
 * ours, with what it replaced; null when the takeover was someone else's or the lock was no longer the stale one (ask
 * again).
 */
async function takeOver (path: string, me: Holder, stale: Holder | null): Promise<{ left: LeftBehind | null } | null> {
  const takeover = path + TAKEOVER_SUFFIX
  let ours: { left: LeftBehind | null } | null = null
  const done = await whileHolding(takeover, me, async () => {
    const bytes = await readFile(path).catch(() => null)
    if (!sameHolder(holderIn(bytes), stale)) return
    const touched = await mtimeOf(path)
    await unlink(path).catch(() => {})
    if (await create(path, me)) ours = { left: bytes === null || touched === null ? null : { bytes, touched } }
  })
  if (!done) {
    // Another process is taking over: wait for it, unless it died doing so (then its takeover is stale too).
    // (Gone already, null: ask again at once.)
    const other = await readHolder(takeover)
    if (other !== null && other.host === me.host && (other.pid === me.pid || !isRunning(other.pid))) {
      await unlink(takeover).catch(() => {})
    } else if (other !== null) {
      await sleep(TAKEOVER_WAIT_MS)
    }
  }
  return ours
}

/**
 * Whether a gateway is writing the series of `file` now: its lock is there and was touched by its heartbeat lately
 * (on any host: the lock is read where the files are).
 */
export async function seriesIsBeingWritten (file: string): Promise<boolean> {
  const touched = await mtimeOf(resolve(file + LOCK_SUFFIX))
  return touched !== null && Date.now() - touched < STALE_AFTER_MS
}

/**
 * Takes the lock of the series whose active file is `file`, or throws AuditLockError naming the holder.
 * `onStale` is told when a dead holder's lock is taken over; `onRemoved` when the lock held was removed by something
 * else (a cleanup of the audit directory) and the heartbeat made it again (`remade`), or found another in its place.
 */
export async function acquireLock (file: string, onStale: (holder: Holder | null) => void,
  onRemoved: (lock: string, remade: boolean) => void = () => {}): Promise<AuditLock> {
  const path = resolve(file + LOCK_SUFFIX)
  const me: Holder = { pid: process.pid, host: hostname(), since: new Date().toISOString(), boot: bootId() }
  if (heldHere.has(path)) {
    throw new AuditLockError(`audit file ${file} is already written by this process (lock ${path}): give each gateway its own audit.file`)
  }
  const held = (left: LeftBehind | null = null): AuditLock => {
    heldHere.add(path)
    let released = false
    /** the lock was found to be another process's: said once, and neither touched nor removed from then on */
    let lost = false
    // Touches the lock; a lock gone meanwhile is made again at once: without it a second gateway would start on the
    // series and write it too, forking the chain. One another gateway made in its place before this beat (it started
    // on the series in the gap) is said, and left to it: touched, it would be kept fresh for a gateway that may be
    // gone, and this one would never know.
    const touch = async () => {
      if (lost || released) return
      const holder = await readHolder(path)
      if (holder !== null && !sameHolder(holder, me)) {
        lost = true
        onRemoved(path, false)
        return
      }
      const now = new Date()
      try {
        await utimes(path, now, now)
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || released) return
        let made: boolean
        try {
          made = await create(path, me)
        } catch {
          return // (its directory is gone too: the next beat, once the writer has made it again)
        }
        lost = !made
        onRemoved(path, made)
      }
    }
    let touching = Promise.resolve()
    const heartbeat = setInterval(() => { touching = touching.then(touch) }, HEARTBEAT_MS).unref()
    /** Stops the heartbeat; whether the lock is still ours, to remove or replace. */
    const letGo = async (): Promise<boolean> => {
      clearInterval(heartbeat)
      released = true
      await touching
      heldHere.delete(path)
      const holder = await readHolder(path)
      return holder?.pid === me.pid && holder.host === me.host
    }
    return {
      path,
      async release () {
        if (await letGo()) await unlink(path).catch(() => {})
      },
      async leave () {
        await letGo()
      },
      async giveBack () {
        if (!await letGo()) return
        if (left === null) {
          await unlink(path).catch(() => {})
          return
        }
        // Written whole aside, then renamed over ours: the lock is never missing meanwhile, nor seen in part.
        const temp = asideName(path, 'back')
        try {
          await writeFile(temp, left.bytes, { flag: 'wx' })
          await utimes(temp, left.touched / 1000, left.touched / 1000)
          await rename(temp, path)
        } catch {
          await unlink(path).catch(() => {}) // (a full disk: let go, as release() does)
        } finally {
          await unlink(temp).catch(() => {})
        }
      }
    }
  }
  for (let attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
    if (await create(path, me)) return held()
    const holder = await readHolder(path)
    // Another host name on this machine, in this boot, is another container (Docker names one by its id, Kubernetes
    // by its pod): its pid means nothing here, its heartbeat is judged by the same clock.
    const sameMachine = holder !== null && me.boot !== undefined && holder.boot === me.boot
    if (holder !== null && holder.host !== me.host && !sameMachine) {
      throw new AuditLockError(`audit file ${file} is locked by pid ${holder.pid} on host ${holder.host} since ${holder.since} ` +
        `(lock ${path}). Each gateway needs its own audit.file (e.g. audit-\${HOSTNAME}.jsonl); if that gateway is gone, delete the lock file.`)
    }
    // Our own pid in a lock we do not hold here is a previous life of this container (pid 1 again): stale.
    if (holder !== null && holder.host === me.host && holder.pid !== me.pid && isRunning(holder.pid)) {
      throw new AuditLockError(`audit file ${file} is in use by another gateway process (pid ${holder.pid}, since ${holder.since}; ` +
        `lock ${path}). Each gateway needs its own audit.file (e.g. audit-\${HOSTNAME}.jsonl).`)
    }
    // A lock that names no holder (overwritten, or left empty) is stale only once its heartbeat has stopped too: its
    // holder may be alive, touching it, and would go on writing the series beside the one taking it over.
    if (await heartbeatGoesOn(path)) {
      throw new AuditLockError(holder === null
        ? `audit file ${file} is locked by a lock that names no holder (overwritten or emptied), and it is still being refreshed: ` +
          `another gateway writes the series. Each gateway needs its own audit.file (e.g. audit-\${HOSTNAME}.jsonl); lock ${path}.`
        : `audit file ${file} is locked by pid ${holder.pid} on a host named ${holder.host} ` +
          `${holder.host === me.host ? "(this one's name) " : '(another container of this machine) '}` +
          `since ${holder.since}, and its lock is still being refreshed: another gateway writes it, from a pid namespace of its ` +
          `own${holder.host === me.host ? ' (containers sharing the host name)' : ''}. Each gateway needs its own audit.file (e.g. audit-\${HOSTNAME}.jsonl, with ` +
          `distinct host names); lock ${path}.`)
    }
    const taken = await takeOver(path, me, holder)
    if (taken !== null) {
      onStale(holder)
      return held(taken.left)
    }
  }
  throw new AuditLockError(`could not take the audit lock ${path}: another process keeps re-creating it`)
}
