import t from 'tap'
import { formatDuration } from '../src/plugins/rate-limit.js'
import { MemoryStore } from '../src/stores/memory.js'

const RULE = { requestsPerMinute: 60, burst: 5 } // one token a second

function clock (start = 1_000_000) {
  let now = start
  return { now: () => now, tick: (ms: number) => { now += ms } }
}

t.test('a full bucket serves exactly burst calls, then refuses with the time to the next token', async t => {
  const c = clock()
  const store = new MemoryStore({ now: c.now })
  const results = []
  for (let i = 0; i < 6; i++) results.push(await store.take('a', RULE))
  t.same(results.map(r => r.allowed), [true, true, true, true, true, false])
  t.same(results.map(r => r.remaining), [4, 3, 2, 1, 0, 0])
  t.equal(results[5]!.retryAfterMs, 1000)
  t.equal(results[5]!.limit, 60)
  t.equal(results[4]!.resetMs, 5000, 'five seconds until full again')
})

t.test('tokens come back at requestsPerMinute and never above burst', async t => {
  const c = clock()
  const store = new MemoryStore({ now: c.now })
  for (let i = 0; i < 5; i++) await store.take('a', RULE)
  c.tick(999)
  t.equal((await store.take('a', RULE)).allowed, false, 'not before a full second')
  c.tick(1)
  t.equal((await store.take('a', RULE)).allowed, true, 'one token after one second')
  c.tick(60 * 60_000)
  t.equal((await store.peek('a', RULE)).remaining, 5, 'an hour idle refills to burst, not beyond')
})

t.test('concurrent takes cannot overdraw a bucket', async t => {
  const store = new MemoryStore({ now: clock().now })
  const results = await Promise.all(Array.from({ length: 50 }, () => store.take('a', RULE)))
  t.equal(results.filter(r => r.allowed).length, 5)
})

t.test('a clock that jumps backwards neither refills nor locks out', async t => {
  const c = clock()
  const store = new MemoryStore({ now: c.now })
  for (let i = 0; i < 5; i++) await store.take('a', RULE)
  c.tick(-3_600_000)
  t.equal((await store.take('a', RULE)).allowed, false, 'no burst granted by going back')
  c.tick(3_600_000 + 1000)
  t.equal((await store.take('a', RULE)).allowed, true, 'one second of real time later, a token')
})

t.test('peek reads without taking, and clients have separate buckets', async t => {
  const store = new MemoryStore({ now: clock().now })
  await store.take('a', RULE)
  t.equal((await store.peek('a', RULE)).remaining, 4)
  t.equal((await store.peek('a', RULE)).remaining, 4)
  t.equal((await store.peek('b', RULE)).remaining, 5)
})

t.test('the LRU is bounded: past max, the least recent bucket is forgotten (it comes back full)', async t => {
  const store = new MemoryStore({ max: 2, now: clock().now })
  for (let i = 0; i < 5; i++) await store.take('a', RULE)
  await store.take('b', RULE)
  await store.take('c', RULE)
  t.equal((await store.peek('a', RULE)).remaining, 5)
  t.equal((await store.peek('c', RULE)).remaining, 4)
})

t.test('by default every client of a large config keeps its buckets: 10,000 clients with token budgets (20,000 buckets), a drained one stays drained', async t => {
  // A bucket forgotten comes back full: a drained client of a slow limit would get a fresh burst just because
  // 10,000 others called since (issue 13's scale: 10,000 configured clients), or because a reload rewrote theirs.
  const store = new MemoryStore({ now: clock().now })
  const slow = { requestsPerMinute: 1, burst: 1 }
  t.equal((await store.take('team-0', slow)).allowed, true)
  for (let i = 1; i < 10_000; i++) {
    await store.take(`team-${i}`, RULE)
    await store.charge(`tokens:team-${i}`, RULE, 1)
  }
  t.equal((await store.take('team-0', slow)).allowed, false, 'still drained')
})

t.test('cost takes several tokens at once or none; a cost above burst is never granted', async t => {
  const c = clock()
  const store = new MemoryStore({ now: c.now })
  t.match(await store.take('a', RULE, 3), { allowed: true, remaining: 2 })
  const refused = await store.take('a', RULE, 3)
  t.match(refused, { allowed: false, remaining: 2, retryAfterMs: 1000 }, 'one token missing: one second')
  t.match(await store.take('a', RULE, 2), { allowed: true, remaining: 0 })
  c.tick(60_000)
  t.equal((await store.take('a', RULE, 6)).allowed, false, 'burst is 5')
  t.equal((await store.peek('a', RULE)).remaining, 5, 'and it took nothing')
  t.throws(() => store.take('a', RULE, -1), RangeError)
})

t.test('charge never refuses and may go into debt; takes wait until refill covers the debt and the cost', async t => {
  const c = clock()
  const store = new MemoryStore({ now: c.now })
  t.match(await store.charge('a', RULE, 8), { allowed: true, remaining: 0 }, 'five tokens, eight charged: three in debt')
  t.match(await store.charge('a', RULE, 1), { allowed: true, remaining: 0 }, 'charging in debt still succeeds')
  const refused = await store.take('a', RULE)
  t.match(refused, { allowed: false, retryAfterMs: 5000 }, 'four in debt, one to take: five seconds')
  t.equal(refused.resetMs, 9000, 'nine seconds to full')
  c.tick(4999)
  t.equal((await store.take('a', RULE)).allowed, false)
  c.tick(1)
  t.equal((await store.take('a', RULE)).allowed, true)
  t.throws(() => store.charge('a', RULE, Number.POSITIVE_INFINITY), RangeError)
})

t.test('reset durations use OpenAI\'s format', async t => {
  t.same([0, 20, 999, 1000, 1001, 59_000, 60_000, 360_000, 3_723_000].map(formatDuration),
    ['0ms', '20ms', '999ms', '1s', '2s', '59s', '1m0s', '6m0s', '1h2m3s'])
})
