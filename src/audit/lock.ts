// One writer per audit file series: a lock file beside the active file (`audit.jsonl.lock`) holding the writer's
// pid, host and start time. A second gateway on the same series is refused with a message saying who holds it.
// A lock whose process is gone (same host, pid not running) is stale and taken over. A lock from another host
// cannot be checked from here and is refused: two hosts writing one series through a shared volume would
// interleave two chains. (proper-lockfile locks by mtime refresh and records no pid; this is the pid lock the
// trail needs, and small.)
import { hostname } from 'node:os'
import { open, readFile, unlink } from 'node:fs/promises'
import { resolve } from 'node:path'
import { LOCK_SUFFIX } from './series.js'

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
}

export interface AuditLock {
  path: string
  release (): Promise<void>
}

/** Locks held by this process: a second writer in the same process is refused like one in another. */
const heldHere = new Set<string>()

function isRunning (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM' // it exists, it is just not ours to signal
  }
}

async function readHolder (path: string): Promise<Holder | null> {
  try {
    const h = JSON.parse(await readFile(path, 'utf8')) as Partial<Holder>
    return typeof h.pid === 'number' && typeof h.host === 'string' ? { pid: h.pid, host: h.host, since: String(h.since) } : null
  } catch {
    return null // vanished, or left empty by a writer that died while creating it: stale
  }
}

/**
 * Takes the lock of the series whose active file is `file`, or throws AuditLockError naming the holder.
 * `onStale` is told when a dead holder's lock is taken over.
 */
export async function acquireLock (file: string, onStale: (holder: Holder | null) => void): Promise<AuditLock> {
  const path = resolve(file + LOCK_SUFFIX)
  const me: Holder = { pid: process.pid, host: hostname(), since: new Date().toISOString() }
  if (heldHere.has(path)) {
    throw new AuditLockError(`audit file ${file} is already written by this process (lock ${path}): give each gateway its own audit.file`)
  }
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fh = await open(path, 'wx')
      try {
        await fh.writeFile(JSON.stringify(me) + '\n')
      } finally {
        await fh.close()
      }
      heldHere.add(path)
      return {
        path,
        async release () {
          heldHere.delete(path)
          const holder = await readHolder(path)
          if (holder?.pid === me.pid && holder.host === me.host) await unlink(path).catch(() => {})
        }
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
    }
    const holder = await readHolder(path)
    if (holder !== null && holder.host !== me.host) {
      throw new AuditLockError(`audit file ${file} is locked by pid ${holder.pid} on host ${holder.host} since ${holder.since} ` +
        `(lock ${path}). Each gateway needs its own audit.file (e.g. audit-\${HOSTNAME}.jsonl); if that gateway is gone, delete the lock file.`)
    }
    // Our own pid in a lock we do not hold here is a previous life of this container (pid 1 again): stale.
    if (holder !== null && holder.pid !== me.pid && isRunning(holder.pid)) {
      throw new AuditLockError(`audit file ${file} is in use by another gateway process (pid ${holder.pid}, since ${holder.since}; ` +
        `lock ${path}). Each gateway needs its own audit.file (e.g. audit-\${HOSTNAME}.jsonl).`)
    }
    onStale(holder)
    await unlink(path).catch(() => {})
  }
  throw new AuditLockError(`could not take the audit lock ${path}: another process keeps re-creating it`)
}
