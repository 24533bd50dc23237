// The default scenario: the same mix against the upstream directly, the bare proxy and the gateway, in rounds
// interleaved between them (upstream, bare, gateway, then gateway, bare, upstream, ...) so that a change in the
// machine's speed hits all three alike. The gateway is judged by its ratios to the bare proxy in the same rounds.
import { withoutOwner } from '../src/ownership/owners.js';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { benchClient, gatewayConfig, mixRequests } from './clients.js';
import { fmt, spread, median, table } from './report.js';
import { cpuTimeOf, memoryOf, resetPeak, startSystem } from './systems.js';
const SYSTEMS = ['upstream', 'bare', 'gateway'];
/** Between two runs: the last run's sockets close and its garbage is collected before the next one starts. */
const PAUSE_MS = 1000;
export async function compare(ctx) {
    const { settings, load } = ctx;
    const client = benchClient(0);
    const auditFile = join(ctx.tmpDir, 'audit.jsonl');
    const upstream = await startSystem({ system: 'upstream', options: { token: ctx.token } });
    const bare = await startSystem({ system: 'bare', options: { upstreamUrl: upstream.url, token: ctx.token } });
    const gateway = await startSystem({
        system: 'gateway', options: { config: gatewayConfig(upstream.url, ctx.token, [client], auditFile) }
    });
    const targets = {
        upstream: { system: upstream, requests: mixRequests(`Bearer ${ctx.token}`, client) },
        bare: { system: bare, requests: mixRequests(`Bearer ${client.key}`, client) },
        gateway: { system: gateway, requests: mixRequests(`Bearer ${client.key}`, client) }
    };
    await checkAnswers(Object.values(targets));
    let warmupErrors = 0;
    for (const name of SYSTEMS) {
        const { system, requests } = targets[name];
        warmupErrors += (await load.run({ url: system.url, requests, connections: 32, seconds: settings.warmupSeconds })).errors;
    }
    const runs = [];
    for (const connections of settings.connections) {
        for (let round = 0; round < settings.rounds; round++) {
            for (const name of round % 2 === 0 ? SYSTEMS : [...SYSTEMS].reverse()) {
                const { system, requests } = targets[name];
                await sleep(PAUSE_MS);
                resetPeak(system.pid);
                const cpuBefore = cpuTimeOf(system.pid);
                const result = await load.run({ url: system.url, requests, connections, seconds: settings.seconds });
                const cpuAfter = cpuTimeOf(system.pid);
                if (system.exit !== null)
                    throw new Error(`the ${name} process ${system.exit}`);
                const run = {
                    system: name,
                    connections,
                    round,
                    ...result,
                    peakRss: memoryOf(system.pid)?.peak ?? null,
                    cpuUsPerRequest: cpuBefore === null || cpuAfter === null || result.requests === 0
                        ? null
                        : (cpuAfter - cpuBefore) / result.requests
                };
                runs.push(run);
                console.log(`  ${String(connections).padStart(3)} connections, round ${round + 1}, ${name.padEnd(8)} ` +
                    `${fmt.int(run.reqPerSec).padStart(6)} req/s  p50 ${fmt.ms(run.p50Ms)} ms  p99 ${fmt.ms(run.p99Ms)} ms` +
                    `  CPU ${fmt.us(run.cpuUsPerRequest)} µs/req` +
                    (run.errors > 0 ? `  ${run.errors} ERRORS ${JSON.stringify(run.errorKinds)}` : ''));
            }
        }
    }
    const auditRecords = readFileSync(auditFile, 'utf8').split('\n').length - 1;
    await Promise.all([gateway.stop(), bare.stop(), upstream.stop()]);
    return { ...summarise(runs, settings.connections), warmupErrors, auditRecords, runs };
}
/** An answer as a client sees it through the gateway, which keeps the owner key of a conversation to itself. */
function asSeenByClients(text) {
    try {
        return JSON.stringify(withoutOwner(JSON.parse(text)));
    }
    catch {
        return text;
    }
}
/** Before any load: every request of the mix succeeds on every system, with the same answer. */
async function checkAnswers(targets) {
    for (let i = 0; i < targets[0].requests.length; i++) {
        const answers = await Promise.all(targets.map(async ({ system, requests }) => {
            const { method, path, authorization, body } = requests[i];
            const headers = { authorization };
            if (body !== '')
                headers['content-type'] = 'application/json';
            const res = await fetch(system.url + path, { method, headers, body: body === '' ? undefined : body });
            const text = await res.text();
            if (!res.ok)
                throw new Error(`${system.name}: ${method} ${path} answered ${res.status}: ${text.slice(0, 500)}`);
            return asSeenByClients(text);
        }));
        if (new Set(answers).size !== 1) {
            const { method, path } = targets[0].requests[i];
            throw new Error(`the systems answer ${method} ${path} differently:\n${answers.join('\n')}`);
        }
    }
}
function summarise(runs, connectionCounts) {
    const of = (system, connections) => runs.filter(r => r.system === system && r.connections === connections);
    const rows = connectionCounts.flatMap(connections => SYSTEMS.map(system => {
        const mine = of(system, connections);
        const peaks = mine.map(r => r.peakRss).filter(p => p !== null);
        const cpu = mine.map(r => r.cpuUsPerRequest);
        return {
            connections,
            system,
            reqPerSec: median(mine.map(r => r.reqPerSec)),
            p50Ms: median(mine.map(r => r.p50Ms)),
            p99Ms: median(mine.map(r => r.p99Ms)),
            errors: mine.reduce((n, r) => n + r.errors, 0),
            peakRss: peaks.length > 0 ? Math.max(...peaks) : null,
            cpuUsPerRequest: cpu.every(c => c !== null) ? median(cpu) : null
        };
    }));
    // Ratios pair the gateway and the bare proxy of the same round, which ran next to each other.
    const perRound = (connections, f) => {
        const [gateway, bare, upstream] = [of('gateway', connections), of('bare', connections), of('upstream', connections)];
        return spread(gateway.map((g, i) => f(g, bare[i], upstream[i])));
    };
    const ratios = connectionCounts.map(connections => ({
        connections,
        throughput: perRound(connections, (g, b) => g.reqPerSec / b.reqPerSec),
        p99: perRound(connections, (g, b) => g.p99Ms / b.p99Ms),
        cpu: runs.every(r => r.cpuUsPerRequest !== null)
            ? perRound(connections, (g, b) => g.cpuUsPerRequest / b.cpuUsPerRequest)
            : null
    }));
    const addedP50 = connectionCounts.includes(1)
        ? perRound(1, (g, b, u) => (g.p50Ms - u.p50Ms) / (b.p50Ms - u.p50Ms))
        : null;
    return { rows, ratios, addedP50 };
}
export function printComparison(c) {
    const ratioOf = (connections) => c.ratios.find(r => r.connections === connections);
    console.log(table([
        ['conns', 'system', 'req/s', 'p50 ms', 'p99 ms', 'errors', 'peak RSS MiB', 'CPU µs/req', 'gw/bare req/s', 'gw/bare p99',
            'gw/bare CPU'],
        ...c.rows.map(r => {
            const ratios = ratioOf(r.connections);
            const gateway = r.system === 'gateway';
            return [
                String(r.connections), r.system, fmt.int(r.reqPerSec), fmt.ms(r.p50Ms), fmt.ms(r.p99Ms), String(r.errors),
                fmt.mib(r.peakRss), fmt.us(r.cpuUsPerRequest),
                gateway ? fmt.spread(ratios.throughput) : '',
                gateway ? fmt.spread(ratios.p99) : '',
                gateway && ratios.cpu !== null ? fmt.spread(ratios.cpu) : ''
            ];
        })
    ], [1]));
    if (c.addedP50 !== null) {
        console.log(`\none connection: the gateway's added p50 over the direct upstream ÷ the bare proxy's: ${fmt.spread(c.addedP50)}`);
    }
    console.log(`gateway audit records written: ${c.auditRecords}`);
    const verdict = (ok) => ok ? 'met' : 'NOT MET';
    console.log('\ntargets (issue 13), on the median:');
    for (const r of c.ratios.filter(r => r.connections >= 32)) {
        console.log(`  ${r.connections} connections: throughput ≥ 0.90× bare: ${verdict(r.throughput.median >= 0.9)}; ` +
            `p99 ≤ 1.25× bare: ${verdict(r.p99.median <= 1.25)}`);
    }
    if (c.addedP50 !== null)
        console.log(`  1 connection: added p50 ≤ 1.25× bare's: ${verdict(c.addedP50.median <= 1.25)}`);
    console.log(`  zero errors: ${verdict(c.rows.every(r => r.errors === 0) && c.warmupErrors === 0)}`);
}
//# sourceMappingURL=compare.js.map