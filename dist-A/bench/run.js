// npm run bench [scenario ...]: the instrument performance is decided by. Scenarios (argv, or BENCH_SCENARIOS,
// comma-separated; default `compare`):
//   compare     upstream directly vs the bare proxy vs the gateway, the same mix, interleaved rounds
//   variants    the gateway against itself: owner cache hit vs a lookup on every call, audit.fsync off/interval/every
//   clients     10,000 configured clients, ~1M requests spread over them: gateway RSS after warm-up and at the end
//   wrong-keys  100,000 distinct unknown keys: gateway RSS before and after
//   slow        5,000 concurrent calls to an upstream that answers after 1 s: outcomes, crash or not, peak RSS
//   all         all of the above
// Settings (environment) are listed in SETTINGS below and in the README ("Performance").
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { compare, printComparison } from './compare.js';
import { loadGenerator } from './load.js';
import { loud } from './report.js';
import { manyClients, slowUpstream, wrongKeys } from './scenarios.js';
import { variants } from './variants.js';
const ROOT = join(dirname(fileURLToPath(import.meta.url)), '../..');
const RESULTS_FILE = join(ROOT, 'bench', 'results.json');
const SCENARIOS = ['compare', 'variants', 'clients', 'wrong-keys', 'slow'];
function positive(name, fallback, integer = true) {
    const raw = process.env[name];
    if (raw === undefined || raw === '')
        return fallback;
    const value = Number(raw);
    if (!(value > 0) || (integer && !Number.isInteger(value)))
        throw new Error(`${name} must be a positive ${integer ? 'integer' : 'number'}, got "${raw}"`);
    return value;
}
function scenarios() {
    const asked = process.argv.length > 2 ? process.argv.slice(2) : (process.env.BENCH_SCENARIOS ?? 'compare').split(',');
    if (asked.includes('all'))
        return [...SCENARIOS];
    for (const s of asked) {
        if (!SCENARIOS.includes(s))
            throw new Error(`unknown scenario "${s}"; one of: ${SCENARIOS.join(', ')}, all`);
    }
    return asked;
}
const SETTINGS = {
    scenarios: scenarios(),
    /** compare: seconds per measured run, warm-up seconds per system, rounds, connection counts */
    seconds: positive('BENCH_SECONDS', 5, false),
    warmupSeconds: positive('BENCH_WARMUP_SECONDS', 2, false),
    rounds: positive('BENCH_ROUNDS', 3),
    connections: (process.env.BENCH_CONNECTIONS ?? '1,32,256').split(',').map(c => {
        const n = Number(c);
        if (!Number.isInteger(n) || n < 1)
            throw new Error(`BENCH_CONNECTIONS: "${c}" is not a connection count`);
        return n;
    }),
    /** wrk threads: one is plenty against a Node server on loopback and costs the least CPU */
    threads: positive('BENCH_THREADS', 1),
    /** BENCH_GENERATOR=autocannon: use the fallback even where wrk is available */
    forceAutocannon: process.env.BENCH_GENERATOR === 'autocannon',
    /** clients / wrong-keys: the load runs in phases this long, with a memory sample after each */
    phaseSeconds: positive('BENCH_PHASE_SECONDS', 15, false),
    clients: positive('BENCH_CLIENTS', 10_000),
    clientsRequests: positive('BENCH_CLIENTS_REQUESTS', 1_000_000),
    wrongKeys: positive('BENCH_WRONG_KEYS', 100_000),
    slowCalls: positive('BENCH_SLOW_CALLS', 5_000),
    slowDelayMs: positive('BENCH_SLOW_DELAY_MS', 1_000)
};
function revision() {
    try {
        const rev = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' }).trim();
        const dirty = execFileSync('git', ['status', '--porcelain', '--', 'src', 'bench'], { cwd: ROOT, encoding: 'utf8' }).trim() !== '';
        return dirty ? `${rev}+dirty` : rev;
    }
    catch {
        return null;
    }
}
async function main() {
    const tmpDir = mkdtempSync(join(tmpdir(), 'ohmygpt-gateway-bench-'));
    process.on('exit', () => rmSync(tmpDir, { recursive: true, force: true }));
    const ctx = { settings: SETTINGS, load: loadGenerator(tmpDir, SETTINGS.threads, SETTINGS.forceAutocannon), tmpDir, token: `sk-bench-${randomBytes(16).toString('hex')}` };
    const machine = `node ${process.version}, ${cpus().length} × ${cpus()[0]?.model.trim() ?? 'unknown CPU'}, ` +
        `load average ${loadavg().map(l => l.toFixed(2)).join(' ')} at the start`;
    console.log(`ohmygpt-gateway bench (${SETTINGS.scenarios.join(', ')}): ${machine}; load from ${ctx.load.name}`);
    const results = {
        date: new Date().toISOString(), revision: revision(), machine, generator: ctx.load.name, settings: SETTINGS,
        units: 'latency in milliseconds, memory (RSS) in bytes'
    };
    let failed = 0;
    for (const scenario of SETTINGS.scenarios) {
        if (scenario === 'compare') {
            const { connections, rounds, seconds, warmupSeconds } = SETTINGS;
            console.log(`\ncompare: the mix (GET conversation, list items, POST items, DELETE item) at ${connections.join(', ')} ` +
                `connections, ${rounds} rounds × ${seconds} s per system (after ${warmupSeconds} s of warm-up each)`);
            const comparison = await compare(ctx);
            results.compare = comparison;
            console.log();
            printComparison(comparison);
            failed += comparison.rows.reduce((n, r) => n + r.errors, 0) + comparison.warmupErrors;
        }
        else if (scenario === 'variants') {
            const rows = await variants(ctx);
            results.variants = rows;
            failed += rows.reduce((n, r) => n + r.errors, 0);
        }
        else if (scenario === 'clients') {
            const many = await manyClients(ctx);
            results.clients = many;
            failed += many.errors;
        }
        else if (scenario === 'wrong-keys') {
            results.wrongKeys = await wrongKeys(ctx);
        }
        else {
            results.slow = await slowUpstream(ctx);
        }
    }
    results.loadAverageAtEnd = loadavg();
    writeFileSync(RESULTS_FILE, JSON.stringify(results, null, 2) + '\n');
    console.log(`\nload average at the end: ${loadavg().map(l => l.toFixed(2)).join(' ')}; results: ${RESULTS_FILE}`);
    if (ctx.load.name !== 'wrk')
        loud('measured with autocannon, not wrk: a rough guide only (see above)');
    if (failed > 0) {
        loud(`${failed} requests failed (answers of 400 or more, connection errors or timeouts): these numbers measure\n` +
            `errors, not the systems. The bench fails. Details per run in ${RESULTS_FILE}.`);
        return 1;
    }
    return 0;
}
for (const signal of ['SIGINT', 'SIGTERM'])
    process.once(signal, () => process.exit(130));
main().then(code => process.exit(code), (err) => {
    console.error(`bench: ${err instanceof Error ? err.stack : String(err)}`);
    process.exit(1);
});
//# sourceMappingURL=run.js.map