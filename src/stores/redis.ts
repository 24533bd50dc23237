// Buckets shared by every replica, in Redis. One Lua script refills and takes (or charges) atomically on the
// server, so replicas racing for the same client's last token cannot overdraw it. The script reads the clock
// from Redis itself (TIME): every replica's call is judged by the one server clock, so skew between the
// replicas' own clocks can neither refill a bucket early nor hold it back.
//
// Redis down or slow never holds an answer longer than `timeoutMs`: commands time out, nothing waits in an
// offline queue, and while disconnected a call fails at once. Then `onFailure` decides: `open` serves the call
// from a local in-memory bucket, `closed` refuses it (StoreUnavailableError → 503). The client reconnects by
// itself, also away from a node that a failover turned read-only, and asks Redis something every second, calls or
// none, so that a Redis that stops answering is found out without a call; the outage is logged once when it starts, at
// most once per WARN_INTERVAL_MS while it lasts, and once when it ends. Only error messages are logged: an
// error object can carry the command's arguments, and the handshake's arguments hold the password.
import { randomUUID } from 'node:crypto'
import { Redis, ReplyError } from 'ioredis'
import type { SharedNotes } from '../ownership/issued.js'
import { withoutSecrets } from '../config.js'
import { StartupError } from '../preflight.js'
import { MemoryStore } from './memory.js'
import {
  checkCost, describe, StoreUnavailableError, TOKEN_EPSILON, type BucketRule, type RateLimitResult, type RateLimitStore
} from './rate-limit-store.js'

export type OnFailure = 'open' | 'closed'

export interface StoreLogger {
  warn (obj: object, msg: string): void
  info (obj: object, msg: string): void
}

export interface RedisStoreOptions {
  /** redis://[[user]:password@]host[:port][/db] or rediss://… */
  url: string
  timeoutMs: number
  onFailure: OnFailure
  /** before every key (store.keyPrefix): deployments on one Redis keep their buckets apart; default KEY_PREFIX */
  keyPrefix?: string
  log: StoreLogger
}

/** Every key the gateway writes starts with this (or store.keyPrefix), so it can share a Redis with others. */
export const KEY_PREFIX = 'ogw:rl:'
/** At most one "still unavailable" warning per this interval, however many calls fail. */
export const WARN_INTERVAL_MS = 10_000
/** Reconnect attempts back off up to this, so a Redis that is back is found again within about a second. */
const RECONNECT_MAX_MS = 1_000
/** A TCP connect (or TLS handshake) that takes longer is given up and tried again. */
const CONNECT_TIMEOUT_MS = 2_000
/** A connection with commands outstanding and no byte back for this long is dropped and made again. */
const STALL_MS = 2_000
/**
 * Redis is asked something this often while connected, with or without calls (see #beat): while it refuses the
 * bucket script, the script again; else a PING, which a Redis that has stopped answering leaves unanswered.
 */
const HEARTBEAT_MS = 1_000
/** The probe's key: `@` is in no client id, so it is no client's bucket. It expires a second after each probe. */
const PROBE_KEY = '@probe'
const PROBE_RULE: BucketRule = { requestsPerMinute: 60, burst: 1 }
/** What the start and the heartbeat say of an ACL user that may not run the script, or the notes' SET or MGET. */
const NOT_PERMITTED_USER = 'the user given in it may not run what the gateway needs'
/**
 * How long a process's mark in Redis lives (see #lostMark), set again at each connection: a process that has been
 * connected this long without a drop gets one needless rewrite of its notes at its next drop; a mark of a process
 * gone expires.
 */
const MARK_TTL_MS = 30 * 24 * 60 * 60 * 1000

/**
 * KEYS[1]: the bucket, a hash {tokens, at, rpm, burst}. ARGV: mode (take | charge | peek), requestsPerMinute, burst,
 * and the cost (take) or amount (charge), TOKEN_EPSILON. Returns {allowed 1|0, tokens as text (fractions kept)}.
 * The same arithmetic as refill() and take/charge in memory.ts. The time since the last write refills at the rate
 * and up to the burst the bucket was written with (`rpm`, `burst`; a bucket without them, written by an older
 * gateway, at the caller's), then the caller's burst caps it: replicas reloaded in turn, the second finds the bucket
 * the first wrote under the new limits, and its own call under the old ones must not refill that time at the old
 * rate (a lowered rate would hand out a fresh burst). `at` becomes the server's `now` on every write,
 * so a server clock stepped backwards refills nothing and locks nobody out (a lowered burst still caps the tokens,
 * as refill() does). The key expires when the bucket would be full again: an expired bucket and a full one are the
 * same, so Redis holds only buckets in use.
 * The TTL stops at 1e12 ms (31 years): a deeper debt would overflow PEXPIRE, and a script that fails after its
 * HSET would leave the key without any TTL.
 */
const BUCKET_SCRIPT = `
if redis.replicate_commands then redis.replicate_commands() end
local mode = ARGV[1]
local perMs = tonumber(ARGV[2]) / 60000
local burst = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local epsilon = tonumber(ARGV[5])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at', 'rpm', 'burst')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
else
  local wasPerMs = (tonumber(state[3]) or tonumber(ARGV[2])) / 60000
  local wasBurst = tonumber(state[4]) or burst
  tokens = math.min(burst, math.min(wasBurst, tokens + math.max(0, now - at) * wasPerMs))
end
if mode == 'peek' then
  return { tokens + epsilon >= 1 and 1 or 0, string.format('%.17g', tokens) }
end
local allowed = 1
if mode == 'charge' then
  tokens = tokens - n
elseif tokens + epsilon >= n then
  tokens = tokens - n
else
  allowed = 0
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', now, 'rpm', ARGV[2], 'burst', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.min(math.ceil((burst - tokens) / perMs) + 1000, 1e12))
return { allowed, string.format('%.17g', tokens) }
`

/** A first connection refused with one of these (the user or password in store.url) is never accepted by reconnecting. */
const AUTH_REFUSED = /^(?:WRONGPASS|NOAUTH)\b/
/**
 * What ioredis's reader says of an answer that is not RESP (`Unknown RESP type 72 "H"`: an HTTP server's answer),
 * with the byte it met. A server that answers so is no Redis, and never will be by reconnecting: a wrong port.
 */
const NOT_RESP = /^Unknown RESP type (\d+)/

/**
 * A TLS certificate refused (rediss://): Node's codes for a chain it cannot verify against its roots (and
 * NODE_EXTRA_CA_CERTS, read at start), a name the certificate is not for, or one out of its dates. Reconnecting
 * meets the same certificate.
 */
const CERT_REFUSED = new Set([
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'CERT_UNTRUSTED', 'CERT_SIGNATURE_FAILURE', 'INVALID_CA', 'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID', 'HOSTNAME_MISMATCH', 'ERR_TLS_CERT_ALTNAME_INVALID'
])

/**
 * A certificate refused for itself, whoever signed it: Node's code for a verification error it has no name of its
 * own for, such as "EE certificate key too weak" (a key under what OpenSSL's security level allows: RSA under 2048
 * bits on Node 24, the Docker image's runtime, under 1024 on Node 20). Reconnecting meets it too.
 */
const CERT_REFUSED_ITSELF = 'UNSPECIFIED'

/** A connection the server closed (or reset) under the client. */
const HUNG_UP = /\b(?:EPIPE|ECONNRESET)\b|Connection is closed/

/** The byte a non-RESP answer started with, as a reader can take it: `"H"`, or `0x16` (a TLS server's alert). */
function firstByte (code: number): string {
  return code > 0x20 && code < 0x7f ? JSON.stringify(String.fromCharCode(code)) : `0x${code.toString(16).padStart(2, '0')}`
}
/** An ACL refusal: of a command itself (NOPERM), or of one a script calls, or of a key outside the user's patterns. */
const NOT_PERMITTED = /^NOPERM\b|can't run this command|no permissions to access/
const CLUSTER_SLOTS = 16_384

/** How many hash slots the node marked `myself` in a CLUSTER NODES answer serves itself. */
function slotsServed (nodes: string): number {
  const mine = nodes.split('\n').map(line => line.split(' ')).find(fields => fields[2]?.split(',').includes('myself'))
  let served = 0
  for (const range of mine?.slice(8) ?? []) {
    const [first, last = first] = range.split('-').map(Number)
    if (Number.isInteger(first) && Number.isInteger(last)) served += last! - first! + 1 // ("[slot->-node]": migrating, not counted)
  }
  return served
}

type Mode = 'take' | 'charge' | 'peek'
interface BucketCommand {
  ogwBucket (key: string, mode: Mode, requestsPerMinute: number, burst: number, n: number, epsilon: number): Promise<[number, string]>
}

/**
 * Logs an outage when it starts and once when it ends, with at most one warning per WARN_INTERVAL_MS however
 * many calls fail or outages flap. An outage that starts within the interval of the last warning (a blip right
 * after another) is not warned about, and then neither is its end.
 */
class OutageLog {
  readonly #log: StoreLogger
  readonly #consequence: string
  #since: number | null = null
  #warned = false
  #lastWarning = -Infinity
  #failedCalls = 0

  constructor (log: StoreLogger, onFailure: OnFailure) {
    this.#log = log
    this.#consequence = onFailure === 'open'
      ? 'serving from local in-memory buckets (not shared between replicas)'
      : 'refusing calls with 503 rate_limit_store_unavailable'
  }

  failed (reason: string, call: boolean): void {
    const now = Date.now()
    if (call) this.#failedCalls++
    this.#since ??= now
    if (now - this.#lastWarning < WARN_INTERVAL_MS) return
    this.#lastWarning = now
    this.#warned = true
    this.#log.warn({ reason, failedCalls: this.#failedCalls, downMs: now - this.#since },
      `rate-limit store unavailable: ${this.#consequence}`)
  }

  recovered (): void {
    if (this.#since === null) return
    if (this.#warned) {
      this.#log.info({ failedCalls: this.#failedCalls, downMs: Date.now() - this.#since },
        'rate-limit store recovered: buckets are shared again')
    }
    this.#since = null
    this.#warned = false
    this.#failedCalls = 0
  }
}

export class RedisStore implements RateLimitStore, SharedNotes {
  readonly #redis: Redis & BucketCommand
  readonly #fallback = new MemoryStore()
  readonly #onFailure: OnFailure
  readonly #keyPrefix: string
  readonly #url: string
  readonly #timeoutMs: number
  readonly #outage: OutageLog
  readonly #log: StoreLogger
  /** The heartbeat's probe found the user may not run the script (#refusedAsked): said once. */
  #toldNotPermitted = false
  /** This connection's SELECT was refused: the client would go on in database 0, perhaps another deployment's. */
  #noSuchDb = false
  /** Redis answered the last call with an error (OOM under noeviction, no EVALSHA for this user...); see available(). */
  #refusing = false
  readonly #heartbeat: NodeJS.Timeout
  /** the heartbeat's question is unanswered: one at a time, however long Redis takes */
  #asking = false
  /** A READONLY answer has asked for a new connection; the others on this one need not ask again. */
  #leavingReadOnly = false
  /**
   * connect() is still judging the first connection: a failure of it is held, not logged as an outage ("serving from
   * local in-memory buckets"), since it may refuse the start instead.
   */
  #judging = true
  #heldFailure: string | null = null
  /** A connection was ready once: a later one that finds this process's mark gone tells #emptied (see onEmptied). */
  #connectedBefore = false
  readonly #emptied: Array<() => void> = []
  /** This process's mark (`@` is in no client id): Redis holds it while it keeps what it was given. */
  readonly #mark = `@mark:${randomUUID()}`

  /**
   * Connects, waiting at most until the first connection succeeds or fails. A Redis that is down does not stop the
   * start (it may come back); one that answers, and can never hold the buckets as given, does (StartupError): it
   * refuses the credentials in store.url, or their ACL user may not run what the gateway needs, or it is a read-only
   * replica, or a Redis Cluster node that does not serve every slot itself. Those would otherwise start a gateway whose every call is refused (closed) or served from
   * local buckets only (open), said only in warnings.
   */
  static async connect (options: RedisStoreOptions): Promise<RedisStore> {
    const store = new RedisStore(options)
    const problem = await store.#firstConnection()
    if (problem !== null) {
      await store.close()
      throw new StartupError(`store.url: ${problem}`)
    }
    store.#judged()
    return store
  }

  /** The start goes on: a failure of the first connection was an outage after all, and is said as one. */
  #judged (): void {
    this.#judging = false
    if (this.#heldFailure === null) return
    this.#outage.failed(this.#heldFailure, false)
    if (this.available()) this.#outage.recovered()
  }

  private constructor ({ url, timeoutMs, onFailure, keyPrefix = KEY_PREFIX, log }: RedisStoreOptions) {
    this.#onFailure = onFailure
    this.#keyPrefix = keyPrefix
    this.#url = url
    this.#timeoutMs = timeoutMs
    this.#outage = new OutageLog(log, onFailure)
    this.#log = log
    this.#redis = new Redis(url, {
      // No commandTimeout: #deadline bounds every call (ioredis's timer would fire before an answer waiting in the
      // socket is read, see there). A hung connection is given up by socketTimeout.
      // A call while disconnected fails at once instead of queueing, and is never sent again later: a late
      // answer to a rate-limit question is worthless.
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      autoResendUnfulfilledCommands: false,
      retryStrategy: times => Math.min(times * 100, RECONNECT_MAX_MS),
      connectTimeout: CONNECT_TIMEOUT_MS,
      socketTimeout: STALL_MS,
      // close() ends the socket, and destroys it this long after unless it closed: one Redis closed already (down)
      // never closes again, and ioredis's default 2 s held a stopping gateway that long past its drain. Nothing is
      // waited for at close: every call is over.
      disconnectTimeout: 0,
      // After a failover the old primary stays up as a read-only replica and keeps this connection: without a
      // new one, made to the address that now leads to the new primary, every call would fail until a restart.
      // The failed call is not sent again (1, not 2). Asked once per connection: every call of a burst meets the
      // READONLY node, and ioredis adds a close listener and a timer to the socket for each reconnect asked for.
      reconnectOnError: err => {
        if (!err.message.startsWith('READONLY') || this.#leavingReadOnly) return false
        this.#leavingReadOnly = true
        return 1
      },
      // Each call is written at once. Auto-pipelining holds calls made while an earlier batch waits for its answer,
      // so under a burst that keeps this process busy they go out late and miss their deadline with Redis healthy
      // (see #deadline); it bought no throughput on loopback (about 31,000 takes/s at 32 concurrent calls, either way).
      enableAutoPipelining: false,
      scripts: { ogwBucket: { lua: BUCKET_SCRIPT, numberOfKeys: 1 } }
    }) as Redis & BucketCommand
    this.#redis.on('connect', () => { this.#noSuchDb = false })
    this.#redis.on('close', () => { this.#leavingReadOnly = false })
    this.#redis.on('error', (err: unknown) => {
      const reason = this.#reasonOf(err)
      if (reason.includes('DB index is out of range')) this.#noSuchDb = true
      if (this.#judging) this.#heldFailure = reason
      else this.#outage.failed(reason, false)
    })
    this.#redis.on('ready', () => {
      // (A Redis refusing the script still refuses it on a new connection: the probe that finds it taking it says so.)
      if (!this.#judging && this.available()) this.#outage.recovered()
      const reconnected = this.#connectedBefore
      this.#connectedBefore = true
      void this.#lostMark().then(lost => { if (reconnected && lost) this.#emptied.forEach(listener => { listener() }) })
    })
    this.#heartbeat = setInterval(() => { this.#beat() }, HEARTBEAT_MS).unref()
  }

  /**
   * What an error of the connection says, as the log and a start's problem quote it: without store.url's password.
   * A server may quote what it was sent (Redis, where AUTH and HELLO are renamed away: "unknown command 'auth', with
   * args beginning with: 'usr' 'the-password'"), and ioredis sends the password in its handshake.
   */
  #reasonOf (err: unknown): string {
    return withoutSecrets([err instanceof Error ? err.message : String(err)], { store: { url: this.#url } })[0]!
  }

  /** Why this Redis can never hold the buckets (see connect), or null: connected, or not (yet) reachable. */
  async #firstConnection (): Promise<string | null> {
    const connected = () => this.#redis.status === 'ready'
    if (!connected()) {
      const failure = await new Promise<unknown>(resolve => {
        const done = (err?: unknown) => {
          // A server that hung up on the handshake (a server that is no Redis answers and closes, and a write of the
          // handshake may fail before its answer is read): the next attempt, within the wait, may say why.
          if (err !== undefined && HUNG_UP.test(this.#reasonOf(err)) && this.#redis.status !== 'end') return
          clearTimeout(timer)
          this.#redis.off('ready', done).off('error', done)
          resolve(err ?? null)
        }
        const timer = setTimeout(done, CONNECT_TIMEOUT_MS)
        this.#redis.on('ready', done).on('error', done)
      })
      const reason = failure === null ? null : this.#reasonOf(failure)
      if (reason !== null && AUTH_REFUSED.test(reason)) {
        return `Redis refused the user or password given in it (${reason})`
      }
      const code = String((failure as { code?: unknown } | null)?.code)
      if (CERT_REFUSED.has(code)) {
        return `its server's TLS certificate was refused (${reason}): add the CA that signed it with ` +
          'NODE_EXTRA_CA_CERTS, or give the host name it is for'
      }
      if (code === CERT_REFUSED_ITSELF) {
        return `its server's TLS certificate was refused (${reason}), whatever CA signed it: give the server one with a ` +
          'stronger key (RSA of 2048 bits or more: Node 24 refuses less)'
      }
      const notResp = reason === null ? null : NOT_RESP.exec(reason)
      if (notResp !== null) {
        return `it leads to a server that does not speak Redis's protocol (its answer began with ${firstByte(Number(notResp[1]))}): ` +
          'give the Redis server\'s address and port'
      }
      if (!connected()) return null
    }
    return await this.#notOneServer() ?? await this.#notPermitted()
  }

  /**
   * The user in store.url may not run what every call runs (an ACL user without EVALSHA, or without a command the
   * script calls: TIME, HMGET, HSET, PEXPIRE), or the notes' SET and MGET: why, or null. Asked once, on the probe's
   * key; any other answer (an OOM under noeviction, Redis gone again) is an outage, not a refusal of the config. A
   * refusal of the script (OOM) is one from the start: said, and probed by the heartbeat, as a call's would be, so
   * that /readyz does not let calls in to find it out.
   */
  async #notPermitted (): Promise<string | null> {
    const key = this.#keyPrefix + PROBE_KEY
    // Each asked whatever the one before answered: Redis checks what a user may run before its memory, so a Redis
    // full at start (the script refused, OOM) still tells whether the user may run the notes' SET and MGET. (The
    // commands the script calls it checks only as it runs them: the heartbeat's probe finds those out, see #beat.)
    const asks = [() => this.#probe(), () => this.#redis.mget(key), () => this.#redis.set(`${key}:note`, '1', 'PX', 1000, 'NX')]
    for (const ask of asks) {
      try {
        await ask()
      } catch (err) {
        const reason = this.#reasonOf(err)
        if (NOT_PERMITTED.test(reason)) return `${NOT_PERMITTED_USER} (${reason})`
        if (!(err instanceof ReplyError)) return null // (Redis gone again: an outage, and nothing known against it)
        if (!this.#refusing) this.#heldFailure = reason
        this.#refused()
      }
    }
    return null
  }

  /** A read-only replica, or a cluster node that leaves some slots to other nodes: why, or null. */
  async #notOneServer (): Promise<string | null> {
    let info: string
    try {
      info = await this.#redis.info() // (bounded: a Redis that stops answering loses its connection, see STALL_MS)
    } catch {
      return null // a user not allowed INFO, or a Redis gone again: nothing known against it
    }
    if (/^role:slave\b/m.test(info)) {
      return 'it leads to a read-only replica (role: slave), which refuses every bucket write: give the primary\'s address'
    }
    if (!/^cluster_enabled:1\b/m.test(info)) return null
    let nodes: string
    try {
      nodes = String(await this.#redis.call('CLUSTER', 'NODES'))
    } catch {
      return null // a user not allowed CLUSTER, or a Redis gone again: nothing known against it (not "0 slots")
    }
    const served = slotsServed(nodes)
    if (served === CLUSTER_SLOTS) return null // (a cluster of one shard: every key is this node's)
    return `it leads to a Redis Cluster node serving ${served} of the ${CLUSTER_SLOTS} slots: the calls of every client ` +
      'whose bucket another node holds would be refused (MOVED); give one Redis server, not a cluster'
  }

  /**
   * The script's answer, or null when Redis failed and the call is to be served locally (`open`, unless `shared`: only
   * Redis's answer will do).
   */
  async #run (mode: Mode, key: string, rule: BucketRule, n: number, shared = false): Promise<{ allowed: boolean, tokens: number } | null> {
    try {
      if (this.#noSuchDb) throw new Error('ERR DB index is out of range (the database in store.url)')
      const [allowed, tokens] = await this.#deadline(
        this.#redis.ogwBucket(this.#keyPrefix + key, mode, rule.requestsPerMinute, rule.burst, n, TOKEN_EPSILON))
      this.#outage.recovered()
      this.#accepted()
      return { allowed: allowed === 1, tokens: Number(tokens) }
    } catch (err) {
      const reason = this.#reasonOf(err)
      if (err instanceof ReplyError) this.#refused()
      this.#outage.failed(reason, true)
      if (this.#onFailure === 'closed' || shared) throw new StoreUnavailableError(reason)
      return null
    }
  }

  /**
   * The answer within timeoutMs of the call, or a rejection, whatever ioredis does with the command (a connection
   * still handshaking, a hung one). The command itself may still go out and run later; its answer is then ignored.
   * The deadline judges Redis, not this process: a burst of calls can keep the event loop busy past timeoutMs while
   * Redis answers at once, and timers run before sockets are read, so every call of the burst would fall back
   * (open: each replica grants the client its burst again) or be refused (closed: 503 with Redis healthy). When the
   * timer fires, the rejection waits for setImmediate, which runs after the loop has read the sockets that are
   * ready: an answer already there wins.
   */
  #deadline<T> (answer: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined
    let immediate: NodeJS.Immediate | undefined
    const late = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => {
        immediate = setImmediate(() => { reject(new Error(`Command timed out: no answer from Redis within ${this.#timeoutMs} ms`)) })
      }, this.#timeoutMs)
    })
    answer.catch(() => {}) // a command given up on may still fail later: not an unhandled rejection
    return Promise.race([answer, late]).finally(() => {
      clearTimeout(timer)
      clearImmediate(immediate)
    })
  }

  async take (key: string, rule: BucketRule, cost = 1): Promise<RateLimitResult> {
    checkCost(cost)
    const shared = await this.#run('take', key, rule, cost)
    if (shared === null) return await this.#fallback.take(key, rule, cost)
    return describe(shared.tokens, rule, shared.allowed, cost)
  }

  async charge (key: string, rule: BucketRule, amount: number): Promise<RateLimitResult> {
    checkCost(amount, 'amount')
    const shared = await this.#run('charge', key, rule, amount)
    if (shared === null) return await this.#fallback.charge(key, rule, amount)
    return describe(shared.tokens, rule, true)
  }

  /** Written in Redis, or refused; with `open`, the local bucket a call falls back to meanwhile is written too. */
  async rewrite (key: string, rule: BucketRule): Promise<void> {
    try {
      await this.#run('charge', key, rule, 0, true)
    } catch (err) {
      if (this.#onFailure === 'open') this.#fallback.rewrite(key, rule)
      throw err
    }
  }

  async peek (key: string, rule: BucketRule): Promise<RateLimitResult> {
    const shared = await this.#run('peek', key, rule, 0)
    if (shared === null) return await this.#fallback.peek(key, rule)
    return describe(shared.tokens, rule, shared.allowed)
  }

  /**
   * A note other replicas read (ownership/issued.ts), written only if there is none under `key` (the first
   * writer keeps it). Not queued while disconnected (there is no offline queue): it fails at once, and the
   * caller writes it again later (ownership/issued.ts).
   */
  async note (key: string, value: string, ttlMs: number): Promise<void> {
    if (this.#noSuchDb) throw new Error('ERR DB index is out of range (the database in store.url)')
    await this.#deadline(this.#redis.set(this.#keyPrefix + key, value, 'PX', ttlMs, 'NX'))
  }

  /** Notes by key (null where none), within store.timeoutMs like every other call. */
  async recall (keys: readonly string[]): Promise<Array<string | null>> {
    if (this.#noSuchDb) throw new Error('ERR DB index is out of range (the database in store.url)')
    return await this.#deadline(this.#redis.mget(keys.map(key => this.#keyPrefix + key)))
  }

  onEmptied (listener: () => void): void {
    this.#emptied.push(listener)
  }

  /**
   * Whether Redis has lost this process's mark since the last connection set it (restarted without persistence,
   * flushed, the key evicted): then it may have lost every note too. Sets it again. A connection merely dropped and
   * made again (a network blip, a failover to a replica that has the data) finds it, and nothing is written again.
   * A read that is not answered says "lost": writing the notes again is never wrong (NX), only work. The read alone
   * decides: a Redis that refuses the write (full under noeviction, a user without SET) has kept the mark all the
   * same, and would refuse the notes too, each second, for nothing (their own writes say it refuses them).
   */
  async #lostMark (): Promise<boolean> {
    if (this.#noSuchDb) return true // (nothing written to the database the client fell back to)
    const key = this.#keyPrefix + this.#mark
    let kept: string | null | undefined
    try {
      [kept] = await this.#deadline(this.#redis.mget(key))
    } catch {
      return true
    }
    await this.#deadline(this.#redis.set(key, '1', 'PX', MARK_TTL_MS)).catch(() => {})
    return kept === null
  }

  /** Redis takes writes: it has not refused the bucket script since it last ran it (see #refused). */
  takingNotes (): boolean {
    return !this.#refusing
  }

  /**
   * Redis answered with an error: it is connected but refuses the script (a write under maxmemory with the default
   * noeviction policy, a user without EVALSHA...). Every call would fail the same way, so the store is unavailable
   * until Redis runs the script again. With onFailure closed that takes the replica out of rotation, where no call
   * comes to find Redis healthy again: the heartbeat asks with the script until it does.
   */
  #refused (): void {
    this.#refusing = true
  }

  /** The bucket script, a charge of nothing on the probe's key (no client's bucket). */
  async #probe (): Promise<unknown> {
    return await this.#redis.ogwBucket(this.#keyPrefix + PROBE_KEY, 'charge', PROBE_RULE.requestsPerMinute, PROBE_RULE.burst, 0, TOKEN_EPSILON)
  }

  #accepted (): void {
    this.#refusing = false
  }

  /**
   * Asks Redis something while connected, calls or none. A Redis that stops answering (paused, stuck in a long
   * command) leaves only a question outstanding unanswered, and only then is its connection dropped (socketTimeout):
   * without this, a replica with no calls yet (just started, or out of rotation) would stay available, and ready,
   * until its first call was refused. While Redis refuses the script, the question is the script (on a key that is
   * no client's bucket), whose answer ends the refusal.
   */
  #beat (): void {
    if (this.#asking || this.#redis.status !== 'ready') return // (a lost connection: the reconnect finds out)
    this.#asking = true
    const asked = this.#refusing
      ? this.#probe().then(() => {
        this.#outage.recovered() // (a replica out of rotation gets no call that would say so)
        this.#accepted()
      }, (err: unknown) => { this.#refusedAsked(err) })
      : this.#redis.ping()
    asked.catch(() => {}).finally(() => { this.#asking = false })
  }

  /**
   * The probe refused: by an ACL, once Redis ran the script, for a user the start could not check (the script
   * refused as OOM then, before Redis looked at the commands it calls), said once, as the start would have said
   * it: no call is served from Redis until the user is given them. Any other refusal is the outage going on.
   */
  #refusedAsked (err: unknown): void {
    const reason = this.#reasonOf(err)
    if (!NOT_PERMITTED.test(reason) || this.#toldNotPermitted) return
    this.#toldNotPermitted = true
    this.#outage.failed(reason, false)
    this.#log.warn({ reason }, `store.url: ${NOT_PERMITTED_USER}: give it what the README lists ` +
      '(Redis was full when the gateway started, and could not be asked then)')
  }

  /**
   * Connected, and Redis runs the bucket script. A Redis that answers slowly while connected still counts as
   * available (its calls time out one by one); a lost connection is retried by the client on its own, and a
   * refusing Redis is probed, so this turns true again without any call.
   */
  available (): boolean {
    return this.#redis.status === 'ready' && !this.#noSuchDb && !this.#refusing
  }

  async close (): Promise<void> {
    clearInterval(this.#heartbeat)
    this.#redis.disconnect()
    await this.#fallback.close()
  }
}
