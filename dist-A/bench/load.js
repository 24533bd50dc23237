// The load generator: wrk (C, one epoll thread, far cheaper per request than a Node client) replaying a request
// list through bench/mix.lua. Installed with apt-get when it is missing and we may; otherwise autocannon, which
// runs in this Node process and competes with the servers for the cores: a rough guide only (said loudly).
import { spawn, spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import autocannon from 'autocannon';
import { loud } from './report.js';
const MIX_SCRIPT = join(dirname(fileURLToPath(import.meta.url)), '../../bench/mix.lua');
function hasWrk() {
    return spawnSync('wrk', ['--version']).error === undefined;
}
function aptInstallWrk() {
    if (process.getuid?.() !== 0 || spawnSync('apt-get', ['--version']).error !== undefined)
        return false;
    const install = () => spawnSync('apt-get', ['install', '-y', '--no-install-recommends', 'wrk'], { stdio: 'inherit', env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } }).status === 0;
    console.log('bench: wrk is missing; installing it: apt-get install -y wrk');
    if (install())
        return true;
    spawnSync('apt-get', ['update'], { stdio: 'inherit' });
    return install();
}
/** wrk with `threads` threads where it can be had (unless autocannon is asked for), else autocannon. */
export function loadGenerator(tmpDir, threads, forceAutocannon) {
    if (!forceAutocannon && (hasWrk() || (aptInstallWrk() && hasWrk()))) {
        return { name: 'wrk', run: options => runWrk(options, tmpDir, threads) };
    }
    loud('bench: wrk is not available (BENCH_GENERATOR=autocannon, or it could not be installed): falling back to\n' +
        'autocannon, which runs inside this Node process and takes CPU from the servers it measures.\n' +
        'Treat these numbers as a rough guide only; install wrk (apt-get install wrk) to decide by them.');
    return { name: 'autocannon', run: runAutocannon };
}
const listFiles = new WeakMap();
let listCount = 0;
/** The request list as mix.lua reads it, written once per list. */
function listFile(requests, tmpDir) {
    let file = listFiles.get(requests);
    if (file === undefined) {
        file = join(tmpDir, `requests-${++listCount}.tsv`);
        writeFileSync(file, requests.map(r => `${r.method}\t${r.path}\t${r.authorization}\t${r.body}\n`).join(''));
        listFiles.set(requests, file);
    }
    return file;
}
async function runWrk(o, tmpDir, wrkThreads) {
    const threads = Math.min(wrkThreads, o.connections);
    const args = [`-t${threads}`, `-c${o.connections}`, `-d${o.seconds}s`, `--timeout`, `${o.timeoutSeconds ?? 10}s`,
        '-s', MIX_SCRIPT, o.url, listFile(o.requests, tmpDir), String(threads), String(o.offset ?? 0)];
    const child = spawn('wrk', args, {
        stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, WRK_COUNT_STATUS: o.countStatus === true ? '1' : '0' }
    });
    let out = '';
    child.stdout.on('data', (chunk) => { out += chunk.toString(); });
    child.stderr.on('data', (chunk) => { out += chunk.toString(); });
    const code = await new Promise(resolve => child.on('close', resolve));
    const line = out.split('\n').find(l => l.startsWith('BENCH_RESULT '));
    if (code !== 0 || line === undefined)
        throw new Error(`wrk ${args.join(' ')} failed (exit ${code}):\n${out}`);
    const r = JSON.parse(line.slice('BENCH_RESULT '.length));
    return {
        requests: r.requests,
        reqPerSec: r.requests / (r.durationUs / 1e6),
        p50Ms: r.p50Us / 1000,
        p99Ms: r.p99Us / 1000,
        errors: Object.values(r.errors).reduce((a, b) => a + b, 0),
        errorKinds: r.errors,
        statuses: r.statuses
    };
}
async function runAutocannon(o) {
    let i = o.offset ?? 0;
    const result = await autocannon({
        url: o.url,
        connections: o.connections,
        duration: o.seconds,
        timeout: o.timeoutSeconds ?? 10,
        requests: [{
                setupRequest: (request) => {
                    const next = o.requests[i++ % o.requests.length];
                    const headers = { authorization: next.authorization };
                    if (next.body !== '')
                        headers['content-type'] = 'application/json';
                    return { ...request, method: next.method, path: next.path, headers, body: next.body === '' ? undefined : next.body };
                }
            }]
    });
    const statuses = Object.fromEntries(Object.entries(result.statusCodeStats ?? {}).map(([s, v]) => [s, v.count ?? 0]));
    return {
        requests: result.requests.total,
        reqPerSec: result.requests.total / result.duration,
        p50Ms: result.latency.p50,
        p99Ms: result.latency.p99,
        errors: result.non2xx + result.errors + result.timeouts,
        errorKinds: { non2xx: result.non2xx, connection: result.errors, timeout: result.timeouts },
        statuses
    };
}
//# sourceMappingURL=load.js.map