// The `variants` scenario: what two of the gateway's own choices cost, as the same mix through differently
// configured gateways in one run, rounds interleaved, as ratios to the default gateway:
//   - the owner cache: "default" finds every conversation's owner in its cache (a hit); with a cache that keeps an
//     owner 1 ms (ownership.cacheTtlMs: 1) nearly every call first asks the upstream (a miss);
//   - audit.fsync: off, interval (the default) and every.
// It reports; it asserts nothing.
import { join } from 'node:path';
import { benchClient, gatewayConfig, mixRequests } from './clients.js';
import { fmt, median, table } from './report.js';
import { startSystem } from './systems.js';
const CONNECTIONS = 32;
const VARIANTS = [
    { name: 'default (owner cached, fsync interval)', change: c => c },
    // Concurrent calls on one conversation share a lookup in flight, so "nearly": the p99 shows the extra round trip.
    { name: 'owner cache of 1 ms (lookups)', change: c => ({ ...c, ownership: { cacheTtlMs: 1 } }) },
    { name: 'audit.fsync: off', change: c => ({ ...c, audit: { ...c.audit, fsync: 'off' } }) },
    { name: 'audit.fsync: every', change: c => ({ ...c, audit: { ...c.audit, fsync: 'every' } }) }
];
export async function variants(ctx) {
    const { rounds, seconds, warmupSeconds } = ctx.settings;
    console.log(`\nvariants: the mix at ${CONNECTIONS} connections through gateways that differ in one setting, ` +
        `${rounds} rounds × ${seconds} s each, interleaved`);
    const client = benchClient(0);
    const upstream = await startSystem({ system: 'upstream', options: { token: ctx.token } });
    const gateways = [];
    for (const [i, variant] of VARIANTS.entries()) {
        const config = variant.change(gatewayConfig(upstream.url, ctx.token, [client], join(ctx.tmpDir, `variant-${i}.jsonl`)));
        gateways.push(await startSystem({ system: 'gateway', options: { config } }));
    }
    const requests = mixRequests(`Bearer ${client.key}`, client);
    const runs = VARIANTS.map(() => []);
    try {
        for (const gateway of gateways)
            await ctx.load.run({ url: gateway.url, requests, connections: CONNECTIONS, seconds: warmupSeconds });
        for (let round = 0; round < rounds; round++) {
            const order = round % 2 === 0 ? [...gateways.keys()] : [...gateways.keys()].reverse();
            for (const i of order) {
                const r = await ctx.load.run({ url: gateways[i].url, requests, connections: CONNECTIONS, seconds });
                runs[i].push(r);
                console.log(`  round ${round + 1}, ${VARIANTS[i].name.padEnd(40)} ${fmt.int(r.reqPerSec).padStart(6)} req/s  p99 ${fmt.ms(r.p99Ms)} ms`);
            }
        }
    }
    finally {
        await Promise.all([...gateways.map(g => g.stop()), upstream.stop()]);
    }
    const of = (i, key) => median(runs[i].map(r => r[key]));
    const rows = VARIANTS.map((v, i) => ({
        variant: v.name,
        reqPerSec: of(i, 'reqPerSec'),
        p50Ms: of(i, 'p50Ms'),
        p99Ms: of(i, 'p99Ms'),
        errors: runs[i].reduce((n, r) => n + r.errors, 0),
        throughputRatio: of(i, 'reqPerSec') / of(0, 'reqPerSec'),
        p99Ratio: of(i, 'p99Ms') / of(0, 'p99Ms')
    }));
    console.log('\n' + table([
        ['gateway', 'req/s', 'p50 ms', 'p99 ms', 'errors', 'req/s ÷ default', 'p99 ÷ default'],
        ...rows.map(r => [r.variant, fmt.int(r.reqPerSec), fmt.ms(r.p50Ms), fmt.ms(r.p99Ms), String(r.errors), fmt.ratio(r.throughputRatio), fmt.ratio(r.p99Ratio)])
    ]));
    return rows;
}
//# sourceMappingURL=variants.js.map