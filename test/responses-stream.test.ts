// A Responses stream relayed under load: a burst of small events (a long finished response retrieved as a stream,
// which the upstream replays as fast as the network allows) is passed on in bounded slices, written together, and
// no faster than the client reads; every byte still goes through as it came.
import { once } from 'node:events'
import t from 'tap'
import OpenAI from 'openai'
import { SLICE_EVENTS, SseRewriter } from '../src/responses/sse.js'
import { until } from './fixtures/client.js'
import { KEYS, startGateway, testConfig } from './fixtures/gateway.js'
import { startUpstream } from './fixtures/upstream.js'

/** `count` small delta events, as one chunk: what a socket read brings of a fast replay. */
function burst (count: number): Buffer {
  return Buffer.from(Array.from({ length: count }, (_, i) =>
    `event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":${i},"item_id":"msg_1","output_index":0,"content_index":0,"delta":"x"}\n\n`
  ).join(''))
}

const eventsIn = (bytes: Buffer): number => bytes.toString('latin1').split('\n\n').length - 1

t.test('a burst of small events is handed over in bounded slices: work queued meanwhile (another client\'s call) runs before the burst is through', async t => {
  const events = 10 * SLICE_EVENTS + 7
  const input = burst(events)
  // Every rewrite looks at the event, as the gateway's checks do, and changes nothing.
  let rewritten = 0
  const rewriter = new SseRewriter(data => { rewritten++; return data })
  const out: Buffer[] = []
  let passed = 0
  rewriter.on('data', (chunk: Buffer) => { out.push(chunk); passed += eventsIn(chunk) })
  // Other work of the event loop: what had passed each time it got its turn.
  const seenByOtherWork: number[] = []
  let over = false
  const otherWork = () => {
    seenByOtherWork.push(passed)
    if (!over) setImmediate(otherWork)
  }
  setImmediate(otherWork)
  rewriter.end(input)
  await once(rewriter, 'end')
  over = true
  seenByOtherWork.push(passed)

  t.equal(Buffer.concat(out).toString('latin1'), input.toString('latin1'), 'every byte went through as it came')
  t.equal(rewritten, events, 'every event was checked')
  t.ok(seenByOtherWork[0]! < events, `other work ran before the burst was through (at event ${seenByOtherWork[0]} of ${events})`)
  const slices = seenByOtherWork.map((n, i) => n - (seenByOtherWork[i - 1] ?? 0))
  t.ok(Math.max(...slices) <= SLICE_EVENTS, `at most ${SLICE_EVENTS} events between two turns of other work (slices: ${slices.join(' ')})`)
  t.ok(out.length <= Math.ceil(events / SLICE_EVENTS) + 1, `written together, a piece a slice, not one a event (${out.length} pieces for ${events} events)`)
})

t.test('a client that does not read holds the burst back: the rewriter takes no more than it can pass on, and the rest follows as the client reads', async t => {
  const events = 50 * SLICE_EVENTS
  const input = burst(events)
  const rewriter = new SseRewriter(data => data)
  const accepted = rewriter.write(input)
  rewriter.end()
  // Turns of the event loop in which nothing reads the rewriter.
  for (let i = 0; i < 50; i++) await new Promise(resolve => setImmediate(resolve))
  t.equal(accepted, false, 'the writer is told to wait')
  t.ok(rewriter.readableLength < input.length / 4,
    `what waits for the client is bounded (${rewriter.readableLength} of ${input.length} bytes), not the whole burst`)
  const out: Buffer[] = []
  for await (const chunk of rewriter) out.push(chunk as Buffer)
  t.equal(Buffer.concat(out).toString('latin1'), input.toString('latin1'), 'then every byte, in order')
})

/** A delta event of exactly `bytes` bytes. */
function eventOf (bytes: number, i: number): Buffer {
  const head = `event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":${i},"delta":"`
  const tail = '"}\n\n'
  return Buffer.from(head + 'x'.repeat(bytes - head.length - tail.length) + tail)
}

t.test('an event held while the client does not read is not taken for one the upstream drips in: its rest waits on the client, and the stream goes on once it reads', async t => {
  const maxEventMs = 50
  const failed = Buffer.from('event: error\ndata: {"type":"error"}\n\n')
  const rewriter = new SseRewriter(data => data, failed, Infinity, maxEventMs)
  const errors: Error[] = []
  rewriter.on('error', (err: Error) => errors.push(err))
  // What waits for the client comes just short of what the rewriter holds for it, in a first slice; then a few
  // events more fill it, and the upstream's last event follows them, split: its first half ends that read, its
  // second half waits behind it (nothing more is taken while nobody reads).
  const size = Math.floor(rewriter.readableHighWaterMark * 0.95 / SLICE_EVENTS)
  const first = Buffer.concat(Array.from({ length: SLICE_EVENTS }, (_, i) => eventOf(size, i)))
  const more = Buffer.concat(Array.from({ length: 10 }, (_, i) => eventOf(size, SLICE_EVENTS + i)))
  const last = Buffer.from('event: response.completed\ndata: {"type":"response.completed"}\n\n')
  rewriter.write(first)
  rewriter.write(Buffer.concat([more, last.subarray(0, 20)]))
  rewriter.write(last.subarray(20))
  // The client reads nothing for several times maxEventMs (the upstream's stream still open).
  await new Promise(resolve => setTimeout(resolve, 6 * maxEventMs))
  rewriter.end()
  const out: Buffer[] = []
  for await (const chunk of rewriter) out.push(chunk as Buffer)
  t.same(errors, [], 'the stream was not failed')
  t.equal(Buffer.concat(out).toString('latin1'), Buffer.concat([first, more, last]).toString('latin1'), 'every event, the last one whole')
})

t.test('an upstream that breaks off during a burst: the whole events that came before the break still pass, slices waiting included, then the error event, and the stream fails', async t => {
  const rewriter = new SseRewriter(data => data)
  const input = burst(20 * SLICE_EVENTS)
  const cutInTwo = Buffer.from('event: response.output_text.delta\ndata: {"type":"resp')
  rewriter.write(input)
  rewriter.write(cutInTwo)
  const broken = Buffer.from('event: error\ndata: {"type":"error","code":"upstream_unavailable"}\n\n')
  // The break comes while most of the burst waits for its turn. (Read as the gateway's answer reads it: flowing.)
  rewriter.breakOff(broken, new Error('other side closed'))
  const out: Buffer[] = []
  rewriter.on('data', (chunk: Buffer) => out.push(chunk))
  const [err] = await once(rewriter, 'error').catch((e: unknown) => [e])
  t.equal(Buffer.concat(out).toString('latin1'), input.toString('latin1') + broken.toString('latin1'),
    'every whole event, then the error event; nothing of the event the break cut in two')
  t.match(err, { message: 'other side closed' }, 'then the stream fails: never ended cleanly as if whole')
})

t.test('a shutdown that cuts a stream whose upstream has ended while most of its burst still waits for its turn: the client is told, after whole events, and the stream is not ended as if whole', async t => {
  const rewriter = new SseRewriter(data => data)
  const input = burst(20 * SLICE_EVENTS)
  rewriter.write(input)
  rewriter.end()
  // A few turns of the event loop: a slice or so has gone out, the rest waits (the client reads nothing meanwhile).
  for (let i = 0; i < 3; i++) await new Promise(resolve => setImmediate(resolve))
  const shutdown = Buffer.from('event: error\ndata: {"type":"error","code":"gateway_shutting_down"}\n\n')
  t.equal(rewriter.cut(shutdown), true, 'the stream is still going out: it is told why it ends')
  const out: Buffer[] = []
  rewriter.on('data', (chunk: Buffer) => out.push(chunk))
  let ended = false
  rewriter.on('end', () => { ended = true })
  await until('the shutdown event', () => Buffer.concat(out).toString('latin1').endsWith(shutdown.toString('latin1')))
  const sent = Buffer.concat(out).toString('latin1').slice(0, -shutdown.length)
  t.ok(input.toString('latin1').startsWith(sent) && sent.endsWith('\n\n'), 'whole events of the burst, in order, before it')
  t.ok(eventsIn(Buffer.from(sent)) < 20 * SLICE_EVENTS, 'not the whole burst: nothing more goes out once it is cut')
  for (let i = 0; i < 5; i++) await new Promise(resolve => setImmediate(resolve))
  t.equal(ended, false, 'never ended cleanly: its connection is closed after the event')
  rewriter.destroy()
})

t.test('events split anywhere across chunks, CRLF and CR line endings, comments between them: the same bytes come out, in slices', async t => {
  const events = 3 * SLICE_EVENTS
  const lines = Array.from({ length: events }, (_, i) => {
    const nl = ['\n', '\r\n', '\r'][i % 3]!
    return `: keep-alive${nl}event: response.output_text.delta${nl}data: {"type":"response.output_text.delta","sequence_number":${i},"delta":"y"}${nl}${nl}`
  }).join('')
  const input = Buffer.from(lines)
  let rewritten = 0
  const rewriter = new SseRewriter(data => { rewritten++; return data })
  const out: Buffer[] = []
  rewriter.on('data', (chunk: Buffer) => out.push(chunk))
  // Cut into chunks of every size from 1 to 97 bytes: a CRLF, a line and an event are cut in every place.
  for (let at = 0, size = 1; at < input.length; at += size, size = size % 97 + 1) rewriter.write(input.subarray(at, at + size))
  rewriter.end()
  await once(rewriter, 'end')
  t.equal(Buffer.concat(out).toString('latin1'), input.toString('latin1'))
  t.equal(rewritten, events)
})

t.test('a stream in UTF-16, its first bytes cut apart, fails at its start with the failed event and nothing of it; one of a single byte goes on', async t => {
  const failed = Buffer.from('event: error\ndata: {}\n\n')
  const rewriter = new SseRewriter(data => data, failed)
  const out: Buffer[] = []
  rewriter.on('data', (chunk: Buffer) => out.push(chunk))
  const input = Buffer.from(': keep-alive\n\ndata: {"type":"x"}\n\n', 'utf16le')
  for (let at = 0; at < input.length; at++) rewriter.write(input.subarray(at, at + 1))
  rewriter.end()
  const [err] = await once(rewriter, 'error') as [Error]
  t.match(err.message, /UTF-16/)
  t.equal(Buffer.concat(out).toString(), failed.toString())

  const single = new SseRewriter(data => data)
  const bytes: Buffer[] = []
  single.on('data', (chunk: Buffer) => bytes.push(chunk))
  single.end(Buffer.from('x'))
  await once(single, 'end')
  t.equal(Buffer.concat(bytes).toString(), ':x', 'as a line without data: a comment')
})

t.test('a stream that begins with a UTF-8 byte order mark, cut at each byte, has its first event read as an event (the SSE spec ignores the mark)', async t => {
  const rewriter = new SseRewriter(data => ({ ...(data as object), rewritten: true }))
  const out: Buffer[] = []
  rewriter.on('data', (chunk: Buffer) => out.push(chunk))
  const input = Buffer.from('\uFEFFdata: {"type":"response.created"}\n\ndata: {"type":"x"}\n\n')
  for (let at = 0; at < input.length; at++) rewriter.write(input.subarray(at, at + 1))
  rewriter.end()
  await once(rewriter, 'end')
  t.equal(Buffer.concat(out).toString(), 'data: {"type":"response.created","rewritten":true}\n\ndata: {"type":"x","rewritten":true}\n\n')
})

t.test('a long burst relayed with the SDK: a client that leaves part-way releases the upstream, audited aborted with the deltas it was sent; one that reads on gets every event in order', async t => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const client = new OpenAI({ apiKey: KEYS.full, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  const events = 20 * SLICE_EVENTS
  const created = 'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"m","output":[],"metadata":{"gateway_owner":"team-full"}}}\n\n'
  const completed = 'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1","object":"response","status":"completed","model":"m","output":[],"usage":{"input_tokens":1,"output_tokens":2560,"total_tokens":2561}}}\n\n'
  let upstreamClosed = 0
  // The whole burst in one write, as a replay comes; then the end, unless held open.
  let hold = true
  upstream.respond = (_req, res) => {
    res.on('close', () => { upstreamClosed++ })
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.write(created + burst(events).toString())
    if (!hold) res.end(completed)
  }

  const controller = new AbortController()
  const part = await client.responses.create({ model: 'gpt-4o', input: 'hi', stream: true }, { signal: controller.signal })
  let seen = 0
  for await (const event of part) if (event.type === 'response.output_text.delta' && ++seen === 10) controller.abort()
  await until('the upstream to see its stream closed', () => upstreamClosed === 1)
  await until('the audit record', () => gw.audit().length === 1)
  const record = gw.audit()[0]!
  t.match(record, { outcome: 'aborted', status: 200, stream: true })
  t.ok(record.outputTokens !== null && record.outputTokens >= 10 && record.outputTokens < events,
    `charged the deltas that went out before it left (${record.outputTokens}), not the whole burst`)

  hold = false
  const whole = await client.responses.create({ model: 'gpt-4o', input: 'hi', stream: true })
  const sequence: number[] = []
  for await (const event of whole) if (event.type === 'response.output_text.delta') sequence.push(event.sequence_number)
  t.same(sequence, Array.from({ length: events }, (_, i) => i), 'every delta, in order')
  await until('the audit record', () => gw.audit().length === 2)
  t.match(gw.audit()[1], { outcome: 'ok', status: 200, outputTokens: 2560 })
})
