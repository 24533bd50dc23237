// Calls to OhMyGPT across its lines: which line, how long, and whether a failed attempt may be sent again.
// - One undici Pool per line (verified TLS, `connectTimeoutMs`, `maxConnections`, `bodyTimeoutMs` between chunks).
// - A call's deadline for response headers (`timeoutMs`) runs from the moment it is handed over: the wait for a
//   pooled connection and every retry count inside it.
// - Retries never duplicate work: GET and DELETE may go to the next line after a connection failure, a connect
//   timeout or a 502/503; a POST only when its connection failed before any byte of it was sent. At most
//   `retries` extra attempts, each on another line. A 429 is never retried, and with one line, or once the
//   retries are spent, the upstream's answer passes through as it is.
// - A client that hangs up aborts the call at once (`whenClientGone`), closing the upstream connection.
// - A reload hands new settings to `update`: calls under way finish where they started (see Lines below), and
//   `destroy` aborts every call still in flight (the end of a shutdown's grace).
// Both the proxy (as reply-from's undici dispatcher) and the ownership lookups call through here.
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { rootCertificates } from 'node:tls';
import { Pool } from 'undici';
import { LineHealth } from './lines.js';
/** A call that got no answer to pass on. The message is for the operational log, never for a client. */
export class UpstreamFailure extends Error {
    kind;
    attempts;
    line;
    constructor(kind, message, attempts, line) {
        super(message);
        this.kind = kind;
        this.attempts = attempts;
        this.line = line;
        this.name = 'UpstreamFailure';
        this.stack = `${this.name}: ${message}`; // where in the gateway it was noticed says nothing; the message does
    }
}
/** Connection failures that happen before any byte of the request is written: safe to send elsewhere. */
const NOTHING_SENT = new Set([
    'ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EADDRNOTAVAIL', 'UND_ERR_CONNECT_TIMEOUT',
    'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'CERT_HAS_EXPIRED',
    'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'ERR_TLS_CERT_ALTNAME_INVALID', 'CERT_NOT_YET_VALID', 'ERR_SSL_WRONG_VERSION_NUMBER'
]);
const RESETS = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET', 'UND_ERR_CLOSED']);
const DESCRIPTIONS = {
    ECONNREFUSED: 'connection refused',
    ENOTFOUND: 'host not found',
    EAI_AGAIN: 'host not found',
    UND_ERR_CONNECT_TIMEOUT: 'connect timeout',
    UND_ERR_HEADERS_TIMEOUT: 'no response headers in time',
    ECONNRESET: 'connection reset',
    UND_ERR_SOCKET: 'connection closed by the upstream'
};
function codeOf(err) {
    const e = err;
    return String(e.code ?? e.cause?.code ?? 'error');
}
function classify(code) {
    if (code === 'UND_ERR_HEADERS_TIMEOUT')
        return 'timeout';
    if (NOTHING_SENT.has(code))
        return 'nothing-sent';
    if (RESETS.has(code))
        return 'reset';
    return 'other';
}
const IDEMPOTENT = new Set(['GET', 'HEAD', 'DELETE']);
/**
 * undici takes an EventEmitter with an `aborted` flag as a request's signal, as well as an AbortSignal; this one
 * costs a fraction of an AbortController, and there is one per upstream call.
 */
class CallSignal extends EventEmitter {
    aborted = false;
    abort() {
        if (this.aborted)
            return;
        this.aborted = true;
        this.emit('abort');
    }
}
/** What the pools are built from: a change in any of these needs new pools. */
const POOL_SETTINGS = ['baseUrls', 'connectTimeoutMs', 'timeoutMs', 'bodyTimeoutMs', 'maxConnections', 'caFile'];
/** What the lines' health is kept by: with these unchanged, a reload keeps which lines are down. */
const HEALTH_SETTINGS = ['baseUrls', 'failureThreshold', 'cooldownMs'];
function sameSettings(a, b, keys) {
    return keys.every(k => JSON.stringify(a[k]) === JSON.stringify(b[k]));
}
function newPools(settings) {
    return { lines: buildLines(settings), calls: 0, retired: false };
}
function buildLines(settings) {
    const ca = settings.caFile === undefined ? undefined : [...rootCertificates, readFileSync(settings.caFile, 'utf8')];
    return settings.baseUrls.map(url => {
        const base = new URL(url);
        return {
            url,
            prefix: base.pathname.replace(/\/+$/, ''),
            // Certificates are always verified: reply-from would build its own agent with rejectUnauthorized: false.
            pool: new Pool(base.origin, {
                connections: settings.maxConnections,
                headersTimeout: settings.timeoutMs,
                bodyTimeout: settings.bodyTimeoutMs,
                connect: { timeout: settings.connectTimeoutMs, rejectUnauthorized: true, ...(ca === undefined ? {} : { ca }) }
            })
        };
    });
}
export class Upstream {
    #current;
    /** retired pools not closed yet */
    #retired = new Set();
    #log;
    #destroyed = false;
    constructor(settings, log) {
        this.#log = log;
        this.#current = { settings, health: this.#health(settings), pools: newPools(settings) };
    }
    #health(settings) {
        return new LineHealth(settings.baseUrls, {
            failureThreshold: settings.failureThreshold,
            cooldownMs: settings.cooldownMs,
            onChange: (status, previous) => { this.#logChange(status, previous); }
        });
    }
    /**
     * New settings (a config reload), for the calls that start from now on. Calls under way finish on the lines
     * they started on: nothing in flight fails. New pools are built only when what they are built from changed
     * (lines, timeouts, pool size, CA); the lines' health is kept while the lines and its own settings are the
     * same. Throws (and changes nothing) when the new pools cannot be built (an unreadable caFile).
     */
    update(settings) {
        const old = this.#current;
        const health = sameSettings(old.settings, settings, HEALTH_SETTINGS) ? old.health : this.#health(settings);
        if (sameSettings(old.settings, settings, POOL_SETTINGS)) {
            this.#current = { settings, health, pools: old.pools };
            return;
        }
        this.#current = { settings, health, pools: newPools(settings) };
        old.pools.retired = true;
        this.#retired.add(old.pools);
        if (old.pools.calls === 0)
            void this.#closeRetired(old.pools);
    }
    async #closeRetired(pools) {
        try {
            await Promise.all(pools.lines.map(l => l.pool.close()));
        }
        catch (err) {
            if (!this.#destroyed)
                this.#log.warn({ err }, 'closing the previous upstream connections failed');
        }
        finally {
            this.#retired.delete(pools);
        }
    }
    statuses() {
        return this.#current.health.statuses();
    }
    /** At least one line is up, or due for its trial call. */
    get available() {
        return this.#current.health.statuses().some(s => s.state === 'up' || (s.state === 'down' && s.retryInMs === 0));
    }
    async call(call) {
        const settled = this.#current;
        const pools = settled.pools;
        pools.calls++;
        try {
            return await this.#call(settled, call);
        }
        finally {
            if (--pools.calls === 0 && pools.retired)
                void this.#closeRetired(pools);
        }
    }
    async #call({ settings, health, pools }, call) {
        const started = performance.now();
        // One signal per call, raised by whichever comes first: the deadline or the client leaving.
        const signal = new CallSignal();
        let stoppedBy = null;
        const timer = setTimeout(() => { stoppedBy ??= 'deadline'; signal.abort(); }, settings.timeoutMs);
        call.whenClientGone?.(() => { stoppedBy ??= 'client'; signal.abort(); });
        const tried = new Set();
        let index = health.pick(tried);
        try {
            if (index === null)
                throw new UpstreamFailure('unavailable', 'every upstream line is down; not trying', 0, null);
            for (;;) {
                tried.add(index);
                if (call.progress !== undefined)
                    call.progress.attempts = tried.size;
                const line = pools.lines[index];
                let answer;
                try {
                    const res = await line.pool.request({
                        path: line.prefix + call.path, method: call.method, headers: call.headers, body: call.body, signal
                    });
                    answer = { statusCode: res.statusCode, headers: res.headers, body: res.body, line: index, attempts: tried.size, ms: 0 };
                }
                catch (err) {
                    const stopped = stoppedBy === 'client' ? 'the client hung up' : this.#destroyed ? 'aborted at the end of the shutdown grace' : null;
                    const failure = attemptFailed(health, stopped, index, err, stoppedBy === 'deadline');
                    const next = failure === null ? null : retryLine(settings, health, call, tried, failure);
                    if (failure === null || next === null)
                        throw finalFailure(settings, stopped, index, tried.size, err, stoppedBy === 'deadline');
                    this.#log.warn({ line: index, code: codeOf(err), retryOn: next }, `upstream line ${index} failed (${describe(err)}); retrying on line ${next}`);
                    index = next;
                    continue;
                }
                if (answer.statusCode === 502 || answer.statusCode === 503) {
                    health.failed(index);
                    const next = IDEMPOTENT.has(call.method) ? retryLine(settings, health, call, tried, 'reset') : null;
                    if (next !== null) {
                        answer.body.on('error', () => { }).destroy(); // thrown away: its abort is no one's error
                        this.#log.warn({ line: index, status: answer.statusCode, retryOn: next }, `upstream line ${index} answered ${answer.statusCode}; retrying on line ${next}`);
                        index = next;
                        continue;
                    }
                }
                else {
                    health.succeeded(index);
                }
                answer.ms = Math.round(performance.now() - started);
                return answer;
            }
        }
        finally {
            clearTimeout(timer);
        }
    }
    #logChange(status, previous) {
        const fields = { line: status.index, url: status.url, state: status.state, previous };
        if (status.state === 'down') {
            this.#log.warn({ ...fields, failures: status.failures, retryInMs: status.retryInMs }, `upstream line ${status.index} skipped for ${status.retryInMs} ms after ${status.failures} failures in a row`);
        }
        else if (status.state === 'up') {
            this.#log.info(fields, `upstream line ${status.index} restored`);
        }
        else {
            this.#log.info(fields, `upstream line ${status.index} on trial`);
        }
    }
    #pools() {
        return [this.#current.pools, ...this.#retired].flatMap(p => p.lines.map(line => line.pool));
    }
    /** Closes every pool once its in-flight calls are done (and does nothing after destroy()). */
    async close() {
        if (this.#destroyed)
            return;
        await Promise.all(this.#pools().map(p => p.close()));
    }
    /** Aborts whatever is still in flight, on current and retired lines alike, and closes every pool. */
    async destroy() {
        if (this.#destroyed)
            return;
        this.#destroyed = true;
        await Promise.all(this.#pools().map(p => p.destroy()));
    }
}
/**
 * Books a failed attempt against its line; null when the failure says nothing of the line (the call was stopped:
 * the client left or the gateway aborted it; or the call's own deadline passed).
 */
function attemptFailed(health, stopped, index, err, deadlinePassed) {
    if (stopped !== null) {
        health.released(index);
        return null;
    }
    health.failed(index);
    if (deadlinePassed)
        return null;
    return classify(codeOf(err));
}
/** The next line for a retry, or null when this failure may not be retried or nothing is left to try. */
function retryLine(settings, health, call, tried, failure) {
    if (tried.size > settings.retries)
        return null;
    const safe = failure === 'nothing-sent' || (IDEMPOTENT.has(call.method) && failure === 'reset');
    return safe ? health.pick(tried) : null;
}
function finalFailure(settings, stopped, index, attempts, err, deadlinePassed) {
    const where = `upstream line ${index}`;
    // aborted: there is no one to answer (plugins/proxy.ts sends nothing); the call is audited as aborted
    if (stopped !== null)
        return new UpstreamFailure('aborted', `${where}: ${stopped}`, attempts, index);
    if (deadlinePassed || codeOf(err) === 'UND_ERR_HEADERS_TIMEOUT') {
        return new UpstreamFailure('timeout', `${where}: no response headers within ${settings.timeoutMs} ms`, attempts, index);
    }
    return new UpstreamFailure('unavailable', `${where}: ${describe(err)}`, attempts, index);
}
function describe(err) {
    const code = codeOf(err);
    return `${DESCRIPTIONS[code] ?? err.message ?? 'error'} (${code})`;
}
/**
 * Reads a whole answer body, up to `maxBytes`; a longer one is an error. With `deadlineMs`, so is one not whole
 * within it (the body is then destroyed).
 */
export function readBody(body, maxBytes, deadlineMs) {
    return new Promise((resolve, reject) => {
        const chunks = [];
        let size = 0;
        const timer = deadlineMs === undefined
            ? undefined
            : setTimeout(() => { fail(new Error(`upstream answer not whole within ${deadlineMs} ms`)); }, deadlineMs);
        const fail = (err) => {
            clearTimeout(timer);
            body.destroy();
            reject(err);
        };
        body.on('data', (chunk) => {
            size += chunk.length;
            if (size > maxBytes) {
                fail(new Error(`upstream answer over ${maxBytes} bytes`));
                return;
            }
            chunks.push(chunk);
        });
        body.once('end', () => {
            clearTimeout(timer);
            resolve(Buffer.concat(chunks, size));
        });
        body.once('error', fail);
    });
}
//# sourceMappingURL=client.js.map