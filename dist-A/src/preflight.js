// What a config needs from the machine it runs on, checked before anything starts: the listen address can be
// bound and the audit file's directory can be created. `check-config` reports these with the schema's problems;
// `start` meets the same conditions as one clear line (server.ts).
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, resolve } from 'node:path';
/** The gateway cannot start on this machine with this config: said in one line, without a stack. */
export class StartupError extends Error {
}
/** Why an address cannot be listened on, in words. */
const LISTEN_ERRORS = {
    EADDRNOTAVAIL: 'the address is not one of this machine\'s',
    ENOTFOUND: 'the host name does not resolve',
    EAI_AGAIN: 'the host name does not resolve',
    EADDRINUSE: 'the port is in use',
    EACCES: 'permission denied (ports below 1024 need privileges)'
};
export function describeListenError(host, port, err) {
    return `cannot listen on ${host}:${port}: ${LISTEN_ERRORS[err.code ?? ''] ?? err.message} (${err.code ?? 'error'})`;
}
/** Binds host on a free port and lets go: the host is usable if that works (the port itself may be taken later). */
function checkListenHost(host) {
    return new Promise(resolve => {
        const server = createServer();
        server.once('error', (err) => { resolve(`listen.host: ${describeListenError(host, 0, err)}`); });
        server.listen(0, host, () => server.close(() => { resolve(null); }));
    });
}
/**
 * `mkdir -p`, one missing directory at a time. Node's own recursive mkdir never returns where creating a directory
 * answers ENOENT although its parent exists (anywhere under /proc): it retries for ever at full CPU. Here that
 * answer is an error like any other.
 */
export function makeDirectories(dir) {
    const missing = [];
    let at = resolve(dir);
    for (; !existsSync(at); at = dirname(at)) {
        missing.unshift(at);
        if (dirname(at) === at)
            break;
    }
    // What is there already (the root at least) must be a directory: the one asked for (EEXIST, as mkdir -p says)
    // or one above it.
    if (!statSync(at).isDirectory()) {
        throw Object.assign(new Error(`${at} is not a directory`), { code: missing.length === 0 ? 'EEXIST' : 'ENOTDIR' });
    }
    for (const d of missing) {
        try {
            mkdirSync(d);
        }
        catch (err) {
            // Made meanwhile by someone else: fine if it is a directory.
            if (err.code !== 'EEXIST' || !statSync(d).isDirectory())
                throw err;
        }
    }
}
export function auditDirectoryProblem(file) {
    if (file === '-')
        return null;
    try {
        makeDirectories(dirname(file));
        return null;
    }
    catch (err) {
        const e = err;
        return `audit.file: cannot create the directory ${dirname(file)}: ${e.code ?? e.message}`;
    }
}
export async function preflight(config) {
    const problems = [await checkListenHost(config.listen.host), auditDirectoryProblem(config.audit.file)];
    return problems.filter((p) => p !== null);
}
//# sourceMappingURL=preflight.js.map