// End to end: the official openai SDK, pointed at a listening gateway, in front of the fake OhMyGPT upstream.
import t, { type Test } from 'tap'
import OpenAI from 'openai'
import { KEYS, startGateway, testConfig } from './fixtures/gateway.js'
import { LIFECYCLE_AUDIT, LIFECYCLE_UPSTREAM_CALLS } from './fixtures/lifecycle.js'
import { startUpstream, UPSTREAM_TOKEN } from './fixtures/upstream.js'

const RATE_HEADERS = ['x-ratelimit-limit-requests', 'x-ratelimit-remaining-requests', 'x-ratelimit-reset-requests']

async function setup (t: Test) {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const gw = await startGateway(t, testConfig(upstream.url))
  const sdk = (key: string) => new OpenAI({ apiKey: key, baseURL: `${gw.url}/v1`, maxRetries: 0 })
  return { upstream, gw, sdk }
}

t.test('all eight Conversations operations round-trip through the gateway with the SDK', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const client = sdk(KEYS.full)

  const created = await client.conversations.create({ metadata: { topic: 'e2e' } })
  t.match(created, { object: 'conversation', metadata: { topic: 'e2e' } })
  t.match(created.id, /^conv_/)

  const added = await client.conversations.items.create(created.id, {
    items: [{ type: 'message', role: 'user', content: 'hello' }, { type: 'message', role: 'user', content: 'again' }]
  })
  t.equal(added.data.length, 2)
  const [first, second] = added.data as Array<{ id: string }>

  const listed = await client.conversations.items.list(created.id)
  t.same(listed.data.map(i => i.id), [second!.id, first!.id], 'newest first, OpenAI\'s default order')

  const item = await client.conversations.items.retrieve(first!.id, { conversation_id: created.id })
  t.match(item, { id: first!.id, type: 'message', content: 'hello' })

  const afterDelete = await client.conversations.items.delete(first!.id, { conversation_id: created.id })
  t.equal(afterDelete.id, created.id)
  const remaining = await client.conversations.items.list(created.id)
  t.same(remaining.data.map(i => i.id), [second!.id], 'the deleted item is gone upstream')

  const updated = await client.conversations.update(created.id, { metadata: { topic: 'changed' } })
  t.same(updated.metadata, { topic: 'changed' })
  const retrieved = await client.conversations.retrieve(created.id)
  t.same(retrieved.metadata, { topic: 'changed' })

  const deleted = await client.conversations.delete(created.id)
  t.same(deleted, { id: created.id, object: 'conversation.deleted', deleted: true })

  // Upstream errors come back as they were, as the SDK's typed error.
  const gone = await client.conversations.retrieve(created.id).catch((e: unknown) => e)
  t.type(gone, OpenAI.NotFoundError)

  t.same(upstream.requests.map(r => `${r.method} ${r.url.replace(created.id, ':c').replace(first!.id, ':i')}`), LIFECYCLE_UPSTREAM_CALLS)

  t.test('the upstream saw its own token on every call and the client key nowhere', async t => {
    for (const r of upstream.requests) {
      const auth = r.rawHeaders.filter((_v, i) => i % 2 === 0 && r.rawHeaders[i]!.toLowerCase() === 'authorization')
      t.equal(auth.length, 1, 'exactly one authorization header')
      t.equal(r.headers.authorization, `Bearer ${UPSTREAM_TOKEN}`)
    }
    t.notOk(upstream.everything().includes(KEYS.full), 'client key absent from URLs, headers and bodies')
  })

  t.test('the audit file holds one correct line per call', async t => {
    const records = gw.audit()
    t.equal(records.length, 10)
    t.same(records.map(r => [r.action, r.method, r.status, r.outcome]), LIFECYCLE_AUDIT)
    const fields = ['time', 'requestId', 'clientId', 'keyId', 'action', 'method', 'path', 'conversationId', 'ownerId', 'itemId',
      'responseId', 'previousResponseId', 'model', 'stream', 'inputTokens', 'outputTokens', 'status', 'outcome', 'durationMs', 'upstreamMs', 'upstreamRequestId', 'upstreamLine', 'upstreamHost', 'attempts', 'bytesIn',
      'bytesOut', 'ip', 'userAgent']
    for (const [i, r] of records.entries()) {
      // In sorted order (the line's canonical JSON); seq and prevHash are set when the writer seals the record.
      t.same(Object.keys(r).filter(k => r[k as keyof typeof r] !== undefined), [...fields].sort(), 'exactly the documented fields')
      t.equal(r.clientId, 'team-full')
      t.equal(r.conversationId, created.id, `${r.action} names the conversation`)
      t.match(r.time, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
      t.match(r.requestId, /^gw_[0-9a-f]{32}$/)
      t.equal(r.ip, '127.0.0.1')
      t.match(r.userAgent, /^OpenAI\/JS/)
      if (i === records.length - 1) {
        // The gateway's own 404, once its owner lookup (one GET upstream, the last of LIFECYCLE_UPSTREAM_CALLS) found none:
        // the lookup's attempt is on the record, its time at the upstream is not.
        t.match(r, { ownerId: null, upstreamMs: null, upstreamRequestId: null, upstreamLine: null, upstreamHost: null, attempts: 1 }, 'answered by the gateway after its lookup')
        continue
      }
      t.equal(r.ownerId, 'team-full', `${r.action} names the owner`)
      t.equal(typeof r.upstreamMs, 'number')
      t.match(r.upstreamRequestId, /^req_/)
      t.match(r, { upstreamLine: 0, attempts: 1 }, 'answered by the one line, first time')
    }
    const itemDelete = records.find(r => r.action === 'item.delete')!
    t.equal(itemDelete.itemId, first!.id)
    t.equal(itemDelete.path, `/v1/conversations/${created.id}/items/${first!.id}`)
    t.ok(records[0]!.bytesIn > 0, 'bytesIn counts the create body')
    t.ok(records.every(r => r.bytesOut > 0), 'bytesOut counts every answer')
    t.equal(new Set(records.map(r => r.requestId)).size, 10, 'one record per request id')
    const raw = JSON.stringify(records)
    t.notOk(raw.includes(KEYS.full) || raw.includes(UPSTREAM_TOKEN), 'no key or token in the audit')
  })
})

t.test('a missing or unknown key gets the SDK AuthenticationError and never reaches the upstream', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const err = await sdk('ogw_not-a-real-key').conversations.create({}).catch((e: unknown) => e)
  t.type(err, OpenAI.AuthenticationError)
  const e = err as InstanceType<typeof OpenAI.AuthenticationError>
  t.equal(e.status, 401)
  t.equal(e.code, 'invalid_api_key')
  t.equal(e.type, 'invalid_request_error')
  t.equal(e.param, null)
  t.match(e.headers?.get('x-gateway-request-id'), /^gw_/)

  const noKey = await fetch(`${gw.url}/v1/conversations/conv_1`)
  t.equal(noKey.status, 401)
  t.equal(upstream.requests.length, 0)
  t.same(gw.audit().map(r => [r.clientId, r.action, r.status, r.outcome, r.upstreamMs]), [
    [null, 'conversation.create', 401, 'denied', null],
    [null, 'conversation.retrieve', 401, 'denied', null]
  ])
})

t.test('a client without the delete scope gets PermissionDeniedError and the upstream sees nothing', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const reader = sdk(KEYS.reader)
  const err = await reader.conversations.items.delete('msg_1', { conversation_id: 'conv_1' }).catch((e: unknown) => e)
  t.type(err, OpenAI.PermissionDeniedError)
  const e = err as InstanceType<typeof OpenAI.PermissionDeniedError>
  t.equal(e.status, 403)
  t.equal(e.code, 'insufficient_scope')
  t.equal(e.type, 'permission_error')
  for (const h of RATE_HEADERS) t.ok(e.headers?.get(h), `403 carries ${h}`)

  const write = await reader.conversations.create({}).catch((e: unknown) => e)
  t.type(write, OpenAI.PermissionDeniedError, 'a read-only key cannot POST either')
  t.equal(upstream.requests.length, 0)
  t.same(gw.audit().map(r => [r.clientId, r.action, r.itemId, r.status, r.outcome]), [
    ['team-reader', 'item.delete', 'msg_1', 403, 'denied'],
    ['team-reader', 'conversation.create', null, 403, 'denied']
  ])
})

t.test('past its burst a client gets RateLimitError with retry-after and the rate headers', async t => {
  const { upstream, gw, sdk } = await setup(t)
  const limited = sdk(KEYS.limited) // 60 per minute, burst 3
  const conv = await limited.conversations.create({})
  const ok = await limited.conversations.retrieve(conv.id).withResponse()
  t.equal(ok.response.headers.get('x-ratelimit-limit-requests'), '60')
  t.equal(ok.response.headers.get('x-ratelimit-remaining-requests'), '1')
  t.match(ok.response.headers.get('x-ratelimit-reset-requests'), /^\d+(ms|s)$/)
  await limited.conversations.retrieve(conv.id)

  const err = await limited.conversations.retrieve(conv.id).catch((e: unknown) => e)
  t.type(err, OpenAI.RateLimitError)
  const e = err as InstanceType<typeof OpenAI.RateLimitError>
  t.equal(e.status, 429)
  t.equal(e.code, 'rate_limit_exceeded')
  t.equal(e.type, 'requests')
  const retryAfter = Number(e.headers?.get('retry-after'))
  t.ok(Number.isInteger(retryAfter) && retryAfter >= 1, 'retry-after is whole seconds, at least 1')
  const retryAfterMs = Number(e.headers?.get('retry-after-ms'))
  t.ok(retryAfterMs > 0 && retryAfterMs <= 1000, 'one token comes back within a second at 60/min')
  t.equal(e.headers?.get('x-ratelimit-remaining-requests'), '0')
  t.equal(e.headers?.get('x-ratelimit-limit-requests'), '60')

  t.equal(upstream.requests.length, 3, 'the limited call never reached the upstream')
  t.same(gw.audit().map(r => [r.status, r.outcome]), [[200, 'ok'], [200, 'ok'], [200, 'ok'], [429, 'rate_limited']])

  const other = await sdk(KEYS.full).conversations.create({})
  t.match(other.id, /^conv_/, 'another client is not limited by this one')
})

t.test('the upstream token never comes back to a client and never reaches the log', async t => {
  const { gw, sdk } = await setup(t)
  const client = sdk(KEYS.full)
  const { data, response } = await client.conversations.create({}).withResponse()
  const everything = JSON.stringify([...response.headers]) + JSON.stringify(data)
  t.notOk(everything.includes(UPSTREAM_TOKEN))
  await client.conversations.retrieve('conv_missing').catch(() => {})
  const logs = gw.logs.join('')
  t.ok(logs.length > 0, 'the gateway did log')
  t.notOk(logs.includes(UPSTREAM_TOKEN), 'no upstream token in the log')
  t.notOk(logs.includes(KEYS.full), 'no client key in the log')
})
