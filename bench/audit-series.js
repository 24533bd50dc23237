// node bench/audit-series.js DIR [N]: writes N (1,000,000) gateway-shaped audit records through the real writer
// (after `npm run build`) into DIR/audit.jsonl, rotated at 64 MiB and gzipped, to time `audit verify` and
// `audit query` on a series of that size:
//   time node dist/cli.js audit verify DIR/audit.jsonl*
//   time node dist/cli.js audit query --conversation conv_4242 --item msg_77 --action item.delete DIR/audit.jsonl*
// Records: 50 clients, 10,000 conversations, one item.delete in twenty, one minute apart per 1,000 records.
import { join } from 'node:path'
import { openAuditWriter } from '../dist/audit/writer.js'

const [dir, count] = process.argv.slice(2)
if (dir === undefined) throw new Error('usage: node bench/audit-series.js DIR [N]')
const N = Number(count ?? 1_000_000)
const start = Date.UTC(2025, 0, 1)
const writer = await openAuditWriter({
  file: join(dir, 'audit.jsonl'), fsync: 'off', rotate: { maxBytes: 64 * 1024 * 1024, daily: false, keep: 0, gzip: true },
  log: { info () {}, warn () {}, error (o, m) { console.error(m, o) } }, maxPending: 1e7
})
const ACTIONS = ['conversation.retrieve', 'item.list', 'item.retrieve', 'item.create']
for (let i = 0; i < N; i++) {
  const del = i % 20 === 0
  writer.write({
    time: new Date(start + i * 60).toISOString(), requestId: `gw_${String(i).padStart(32, '0')}`,
    clientId: `team-${i % 50}`, action: del ? 'item.delete' : ACTIONS[i % 4], method: del ? 'DELETE' : 'GET',
    path: `/v1/conversations/conv_${i % 10_000}/items/msg_${i % 1000}`, conversationId: `conv_${i % 10_000}`,
    itemId: `msg_${i % 1000}`, status: i % 97 === 0 ? 404 : 200, outcome: i % 97 === 0 ? 'invalid' : 'ok',
    durationMs: 12, upstreamMs: 10, upstreamRequestId: `req_${i}`, bytesIn: 0, bytesOut: 812,
    ip: `10.0.${i % 256}.7`, userAgent: 'OpenAI/Python 1.99.0'
  })
  if (i % 5000 === 4999) await new Promise(resolve => setImmediate(resolve))
  while (writer.stats().written < i - 50_000) await new Promise(resolve => setTimeout(resolve, 5))
}
await writer.close()
console.log(writer.stats())
