// The extra scenarios (not in the default run): what the gateway's memory does with many clients, with many
// wrong keys, and what it does with thousands of calls held open by a slow upstream. They report; they assert
// nothing.
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Agent, request } from 'undici';
import { benchClient, gatewayConfig, mixRequests, wrongKey } from './clients.js';
import { fmt, median } from './report.js';
import { memoryOf, resetPeak, startSystem } from './systems.js';
import { OWNER_PREFIX } from './upstream.js';
const CONNECTIONS = 32;
async function gatewayBehind(ctx, clients, upstreamDelayMs = 0) {
    const upstream = await startSystem({ system: 'upstream', options: { token: ctx.token, delayMs: upstreamDelayMs } });
    const config = gatewayConfig(upstream.url, ctx.token, clients, join(ctx.tmpDir, `audit-${Date.now()}.jsonl`));
    const gateway = await startSystem({ system: 'gateway', options: { config } });
    return { upstream, gateway, stop: () => Promise.all([gateway.stop(), upstream.stop()]) };
}
/** Walks on through the request list in runs of phaseSeconds until `total` requests were answered. */
async function walk(ctx, gateway, requests, total, countStatus = false) {
    const samples = [];
    const statuses = {};
    let done = 0;
    let errors = 0;
    while (done < total) {
        const r = await ctx.load.run({
            url: gateway.url, requests, connections: CONNECTIONS, seconds: ctx.settings.phaseSeconds, offset: done, countStatus
        });
        if (gateway.exit !== null)
            throw new Error(`the gateway ${gateway.exit}`);
        done += r.requests;
        errors += r.errors;
        for (const [status, n] of Object.entries(r.statuses))
            statuses[status] = (statuses[status] ?? 0) + n;
        samples.push({ requests: done, rss: memoryOf(gateway.pid)?.rss ?? null });
        console.log(`  ${done} requests, ${fmt.int(r.reqPerSec)} req/s, gateway RSS ${fmt.mib(samples.at(-1).rss)} MiB` +
            (countStatus ? `, answers ${JSON.stringify(r.statuses)}` : r.errors > 0 ? `, ${r.errors} ERRORS` : ''));
    }
    return { samples, statuses, errors, requests: done };
}
function drift(from, to) {
    return from === null || to === null ? null : to / from - 1;
}
const percent = (n) => n === null ? 'n/a' : `${n >= 0 ? '+' : ''}${(n * 100).toFixed(1)} %`;
/** (a) Many configured clients, traffic spread over all of them: is the gateway's RSS flat after warm-up? */
export async function manyClients(ctx) {
    const { clients: count, clientsRequests } = ctx.settings;
    console.log(`\nmany clients: ${count} configured clients, the mix spread over all of them, ${clientsRequests} requests`);
    const clients = Array.from({ length: count }, (_, k) => benchClient(k));
    const { gateway, stop } = await gatewayBehind(ctx, clients);
    const requests = clients.flatMap(c => mixRequests(`Bearer ${c.key}`, c));
    const run = await walk(ctx, gateway, requests, clientsRequests);
    const peak = memoryOf(gateway.pid)?.peak ?? null;
    await stop();
    // Warmed up once every client has made each of its calls at least once.
    const warm = run.samples.find(s => s.requests >= requests.length) ?? run.samples.at(-1);
    const end = run.samples.at(-1);
    // Single samples move with the garbage collector's timing; the range of all samples after warm-up shows how much.
    const warmRss = run.samples.filter(s => s.requests >= warm.requests && s.rss !== null).map(s => s.rss);
    const result = {
        clients: count, requests: run.requests, errors: run.errors, samples: run.samples,
        rssAfterWarmup: warm.rss, rssAfterWarmupAtRequests: warm.requests, rssAtEnd: end.rss, peakRss: peak,
        drift: drift(warm.rss, end.rss), rssRangeAfterWarmup: { min: Math.min(...warmRss), max: Math.max(...warmRss) }
    };
    console.log(`  RSS after warm-up (${warm.requests} requests): ${fmt.mib(warm.rss)} MiB; at the end: ` +
        `${fmt.mib(end.rss)} MiB (${percent(result.drift)}); every sample since warm-up within ` +
        `${fmt.mib(result.rssRangeAfterWarmup.min)}–${fmt.mib(result.rssRangeAfterWarmup.max)} MiB; ` +
        `peak ${fmt.mib(peak)} MiB; errors ${run.errors}`);
    return result;
}
/** (b) Many distinct wrong keys: does the gateway keep anything per unknown key? */
export async function wrongKeys(ctx) {
    const count = ctx.settings.wrongKeys;
    console.log(`\nwrong keys: twice ${count} distinct unknown keys (the second batch new ones), each sent at least once`);
    const client = benchClient(0);
    const { gateway, stop } = await gatewayBehind(ctx, [client]);
    await ctx.load.run({
        url: gateway.url, requests: mixRequests(`Bearer ${client.key}`, client), connections: CONNECTIONS, seconds: ctx.settings.warmupSeconds
    });
    const before = memoryOf(gateway.pid)?.rss ?? null;
    resetPeak(gateway.pid);
    const batch = (from) => Array.from({ length: count }, (_, k) => ({
        method: 'GET', path: `/v1/conversations/${OWNER_PREFIX}${client.id}`, authorization: `Bearer ${wrongKey(from + k)}`, body: ''
    }));
    // The first batch also warms the heap up on this path; state kept per key would show as growth in the second.
    const first = await walk(ctx, gateway, batch(0), count, true);
    const middle = memoryOf(gateway.pid)?.rss ?? null;
    const second = await walk(ctx, gateway, batch(count), count, true);
    const after = memoryOf(gateway.pid);
    await stop();
    const statuses = {};
    for (const run of [first, second])
        for (const [status, n] of Object.entries(run.statuses))
            statuses[status] = (statuses[status] ?? 0) + n;
    const result = {
        keys: 2 * count, requests: first.requests + second.requests, statuses, rssBefore: before, rssAfterFirst: middle,
        rssAfter: after?.rss ?? null, peakRss: after?.peak ?? null, drift: drift(middle, after?.rss ?? null)
    };
    console.log(`  RSS before: ${fmt.mib(before)} MiB; after the first ${count} keys: ${fmt.mib(middle)} MiB; after ${count} more: ` +
        `${fmt.mib(result.rssAfter)} MiB (${percent(result.drift)} over the second batch); peak ${fmt.mib(result.peakRss)} MiB; answers ${JSON.stringify(statuses)}`);
    return result;
}
/** (c) Thousands of concurrent calls held by a slow upstream: completed, refused, failed, and the gateway's memory. */
export async function slowUpstream(ctx) {
    const { slowCalls: calls, slowDelayMs } = ctx.settings;
    console.log(`\nslow upstream: ${calls} concurrent calls, each on its own connection, upstream answers after ${slowDelayMs} ms`);
    const client = benchClient(0);
    const { gateway, stop } = await gatewayBehind(ctx, [client], slowDelayMs);
    const [get] = mixRequests(`Bearer ${client.key}`, client);
    resetPeak(gateway.pid);
    // One connection per call; bounded so that the scenario always ends.
    const agent = new Agent({ connections: null, headersTimeout: 120_000, bodyTimeout: 120_000, connectTimeout: 30_000 });
    const started = performance.now();
    const outcomes = await Promise.all(Array.from({ length: calls }, async () => {
        const t0 = performance.now();
        try {
            const res = await request(gateway.url + get.path, { headers: { authorization: get.authorization }, dispatcher: agent });
            await res.body.text();
            return { outcome: String(res.statusCode), ms: performance.now() - t0 };
        }
        catch (err) {
            return { outcome: err.code ?? err.name, ms: performance.now() - t0 };
        }
    }));
    const seconds = (performance.now() - started) / 1000;
    await agent.close();
    const peak = memoryOf(gateway.pid)?.peak ?? null;
    const alive = gateway.exit === null;
    const health = alive ? (await fetch(`${gateway.url}/healthz`).then(r => r.status, () => 'unreachable')) : 'not running';
    await stop();
    const counts = {};
    for (const { outcome } of outcomes)
        counts[outcome] = (counts[outcome] ?? 0) + 1;
    const ms = outcomes.map(o => o.ms);
    const result = {
        calls, upstreamDelayMs: slowDelayMs, outcomes: counts, seconds, crashed: !alive, healthAfter: health,
        latencyMs: { min: Math.min(...ms), median: median(ms), max: Math.max(...ms) }, peakRss: peak
    };
    console.log(`  outcomes ${JSON.stringify(counts)} in ${seconds.toFixed(1)} s; per call ${fmt.int(result.latencyMs.min)}` +
        `/${fmt.int(result.latencyMs.median)}/${fmt.int(result.latencyMs.max)} ms (min/median/max); ` +
        `gateway ${alive ? 'alive' : `CRASHED (${gateway.exit})`}, /healthz after: ${health}; peak RSS ${fmt.mib(peak)} MiB`);
    return result;
}
//# sourceMappingURL=scenarios.js.map