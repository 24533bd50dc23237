// The token scrubber's matching, on its own: what an answer quoting the token becomes (upstream/scrub.ts).
import t from 'tap'
import { TokenScrubber } from '../src/upstream/scrub.js'

function scrubber (...tokens: string[]): TokenScrubber {
  let current = tokens[0]!
  const scrub = new TokenScrubber(() => current)
  for (const token of tokens) {
    current = token
    scrub.token()
  }
  return scrub
}

t.test('a token that is a prefix of an earlier one: the longer is taken out whole', async t => {
  const scrub = scrubber('sk-old-secret-tail', 'sk-old-se')
  t.equal(scrub.text('a sk-old-secret-tail b sk-old-se c'), 'a [redacted] b [redacted] c')
  t.equal(scrub.bytes(Buffer.from('sk-old-secret-tail|sk-old-se')).toString(), '[redacted]|[redacted]')
})

t.test('a token with a character JSON escapes: its escaped spelling is taken out whole, the JSON stays valid', async t => {
  const token = 'sk-abcdef\\'
  const body = Buffer.from(JSON.stringify({ message: `bad ${token} key` }))
  const out = scrubber(token).bytes(body).toString()
  t.same(JSON.parse(out), { message: 'bad [redacted] key' })
})

t.test('what was put in is not searched again', async t => {
  // An earlier token that is found inside the replacement itself.
  const scrub = scrubber('redacted', 'sk-alpha-token')
  t.equal(scrub.text('x sk-alpha-token y redacted'), 'x [redacted] y [redacted]')
  t.equal(scrub.bytes(Buffer.from('x sk-alpha-token y redacted')).toString(), 'x [redacted] y [redacted]')
})

t.test('a parsed answer keeps every key, "__proto__" included, and is the same object when nothing is taken out', async t => {
  const scrub = scrubber('sk-0123456789')
  const parsed = JSON.parse('{"__proto__":{"note":"sk-0123456789"},"n":1,"list":["a"]}') as object
  t.equal(JSON.stringify(scrub.json(parsed)), '{"__proto__":{"note":"[redacted]"},"n":1,"list":["a"]}')
  const clean = JSON.parse('{"a":{"b":["c"]},"n":1}') as object
  t.equal(scrub.json(clean), clean)
})

t.test('only the last four tokens are remembered', async t => {
  const scrub = scrubber('sk-token-one', 'sk-token-two', 'sk-token-three', 'sk-token-four', 'sk-token-five')
  t.equal(scrub.text('sk-token-one sk-token-two sk-token-five'), 'sk-token-one [redacted] [redacted]')
})

t.test('a header: the token percent-encoded is taken out (the value then decoded), lines that spell it only together are dropped', async t => {
  const scrub = scrubber('sk-abc-123')
  t.equal(scrub.header('https://x/?k=sk%2Dabc%2d123&a=%2F'), 'https://x/?k=[redacted]&a=/')
  t.equal(scrub.header('https://x/?k=sk%252Dabc-123'), 'https://x/?k=[redacted]', 'escaped twice')
  t.equal(scrub.header('https://x/a%2Fb%E2%82%AC'), 'https://x/a%2Fb%E2%82%AC', 'without the token: as it came')
  t.equal(scrub.header('sk%2Dabc-123%0D%0Ax-injected:%201%7F'), '[redacted]%0D%0Ax-injected:%201%7F', 'control characters and spaces stay escaped')
  t.equal(scrub.header(['sk-abc', '-123']), undefined)
  t.same(scrub.header(['sk-abc-123', 'sk%2Dabc']), ['[redacted]', 'sk%2Dabc'])
  t.same(scrub.header(['a', 'a']), ['a', 'a'])
})

/** What `scrub.stream()` makes of `chunks`, as one buffer. */
async function streamed (scrub: TokenScrubber, chunks: Buffer[]): Promise<string> {
  const stream = scrub.stream()!
  const out: Buffer[] = []
  stream.on('data', (chunk: Buffer) => out.push(chunk))
  const ended = new Promise(resolve => stream.once('end', resolve))
  for (const chunk of chunks) stream.write(chunk)
  stream.end()
  await ended
  return Buffer.concat(out).toString()
}

t.test('an answer searched as it streams loses every token however its chunks cut them, as one searched whole does', async t => {
  const scrub = scrubber('sk-old-secret-tail', 'sk-old-se', 'sk-abcdef\\"x')
  const body = Buffer.from(`{"a":"sk-old-secret-tail","b":"sk-old-se",${JSON.stringify({ c: 'sk-abcdef\\"x' }).slice(1, -1)},"d":"sk-old-sesk-old-se"}sk-old-se`)
  const whole = scrub.bytes(body).toString()
  t.notMatch(whole, /sk-/, 'the whole answer searched at once has none left')
  let wrong = 0
  for (let at = 0; at <= body.length; at++) {
    if (await streamed(scrub, [body.subarray(0, at), body.subarray(at)]) !== whole) wrong++
  }
  t.equal(wrong, 0, 'cut in two at every byte: the same as searched whole')
  t.equal(await streamed(scrub, [...body].map(b => Buffer.from([b]))), whole, 'one byte at a time')
  t.equal(await streamed(scrub, [Buffer.from('no token here')]), 'no token here', 'an answer without one is passed as it came')
  t.equal(await streamed(scrub, []), '')
})

t.test('an answer searched as it streams loses a token spelled with JSON escapes, however its chunks cut it', async t => {
  const token = 'sk-abc/def"g\\h-0123'
  const scrub = scrubber(token)
  // Each character as written, or as JSON may escape it: \u0073 (any case), \/, \", \\.
  const spellings = [
    JSON.stringify(token).slice(1, -1),
    '\\u0073k-abc\\/def\\"g\\\\h-0123',
    'sk-abc/def\\u0022g\\u005Ch-012\\u0033',
    [...token].map(c => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join('')
  ]
  for (const spelling of spellings) {
    const body = Buffer.from(`{"a":"x ${spelling} y","b":"\\u0073k-abc"}`)
    t.equal(JSON.parse(body.toString()).a, `x ${token} y`, `(${spelling} is the token once parsed)`)
    const want = '{"a":"x [redacted] y","b":"\\u0073k-abc"}'
    let wrong = 0
    for (let at = 0; at <= body.length; at++) {
      if (await streamed(scrub, [body.subarray(0, at), body.subarray(at)]) !== want) wrong++
    }
    t.equal(wrong, 0, `${spelling}: cut in two at every byte, taken out`)
    t.equal(await streamed(scrub, [...body].map(b => Buffer.from([b]))), want, `${spelling}: one byte at a time`)
    t.equal(scrub.bytes(body).toString(), want, `${spelling}: searched whole`)
    t.equal(scrub.bytes(Buffer.from(`\ufeff${body.toString()}NaN`)).toString(), `\ufeff${want}NaN`, `${spelling}: searched whole, not JSON to JSON.parse`)
  }
})

t.test('a token with no character JSON escapes as itself, in an answer full of other escapes (a tool call\'s JSON arguments): every spelling of it taken out, however its chunks cut it', async t => {
  const token = 'sk-upstream-Tok3n-0123'
  const scrub = scrubber(token)
  const args = JSON.stringify(JSON.stringify({ path: 'C:\\tmp\\x', q: '"quoted"' })).slice(1, -1)
  const spellings = [
    token,
    '\\u0073k-upstream-Tok3n-0123',
    'sk-up\\u0073tream-Tok3n-012\\u0033',
    [...token].map(c => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0').toUpperCase()}`).join('')
  ]
  for (const spelling of spellings) {
    const body = Buffer.from(`{"a":"${args}\\"${spelling}\\"${args}","b":"\\\\${spelling}"}`)
    t.equal(JSON.parse(body.toString()).a, `${JSON.parse(`"${args}"`)}"${token}"${JSON.parse(`"${args}"`)}`, `(${spelling} is the token once parsed)`)
    const want = `{"a":"${args}\\"[redacted]\\"${args}","b":"\\\\[redacted]"}`
    t.equal(scrub.bytes(body).toString(), want, `${spelling}: searched whole`)
    let wrong = 0
    for (let at = 0; at <= body.length; at++) {
      if (await streamed(scrub, [body.subarray(0, at), body.subarray(at)]) !== want) wrong++
    }
    t.equal(wrong, 0, `${spelling}: cut in two at every byte, taken out`)
  }
  const escapesOnly = Buffer.from(`{"a":"${args.repeat(100)}\\u0073k-"}`)
  t.equal(scrub.bytes(escapesOnly), escapesOnly, 'an answer with escapes and no token is passed as it came')
  // A token holding a character JSON escapes as itself (\/ \" \\) is still found spelled so, far from either end.
  const other = 'sk-abc/def"g\\h-0123'
  const long = Buffer.from(`{"a":"${args.repeat(20)} ${JSON.stringify(other).slice(1, -1)} ${args.repeat(20)}"}`)
  t.equal(scrubber(other).bytes(long).toString(), `{"a":"${args.repeat(20)} [redacted] ${args.repeat(20)}"}`, 'a token with \\" in it, spelled \\" in a long answer')
})

t.test('a token too short to search for gives no stream to search with', async t => {
  t.equal(scrubber('short').stream(), null)
})

t.test('a chunk goes on at once, but for an end that could begin a token', async t => {
  const stream = scrubber('sk-old-secret-tail').stream()!
  const out: string[] = []
  stream.on('data', (chunk: Buffer) => out.push(chunk.toString()))
  const flushed = () => new Promise(resolve => setImmediate(resolve))
  stream.write(Buffer.from('{"object":"list","data":['))
  await flushed()
  t.same(out, ['{"object":"list","data":['], 'a chunk that cannot hold the token\'s start, whole')
  stream.write(Buffer.from('{"note":"key sk-old'))
  await flushed()
  t.same(out.at(-1), '{"note":"key ', 'the start of what may be the token is held')
  stream.end(Buffer.from('-secret-tail"}'))
  await flushed()
  t.equal(out.join(''), '{"object":"list","data":[{"note":"key [redacted]"}', 'and taken out once whole')
})

t.test('a token percent-encoded, in part or whole, is taken out searched whole or as it streams, however the chunks cut it', async t => {
  // (a `%` of the token's own, as written or escaped as %25)
  const scrub = scrubber('sk-ab%c-12')
  for (const spelled of ['sk%2Dab%25c-%31%32', 'sk-ab%c-12', '%73k-ab%c%2d12', '%73%6B%2D%61%62%25%63%2D%31%32']) {
    const text = `x ${spelled} y`
    t.equal(scrub.bytes(Buffer.from(text)).toString(), 'x [redacted] y', spelled)
    const wrong = []
    for (let cut = 1; cut < text.length; cut++) {
      if (await streamed(scrub, [Buffer.from(text.slice(0, cut)), Buffer.from(text.slice(cut))]) !== 'x [redacted] y') wrong.push(cut)
    }
    t.same(wrong, [], `${spelled}: cut anywhere`)
  }
  const other = Buffer.from('50% off, a%20b, %73k-ab%c-1')
  t.equal(scrub.bytes(other), other, 'escapes that spell no token: the bytes as they came')
})

t.test('a token whose first escape follows an escaped backslash is taken out and the JSON stays valid, searched whole or as it streams', async t => {
  // `\\u0073k-…` is the text `\u0073k-…` once parsed: every character of the token but its first, as written. It is
  // taken out; the backslash escaping the one it starts with must then escape something, or the JSON is broken
  // (`\[` is no escape: a rewritten answer became a 502, one passed on a decode error in the SDKs).
  const token = 'sk-upstream-TOKEN-0123456789abcdef'
  const scrub = scrubber(token)
  const rest = token.slice(1)
  for (const backslashes of [1, 2, 3, 4, 5]) {
    const before = '\\'.repeat(backslashes)
    const body = Buffer.from(`{"a":"x ${before}u0073${rest} y","b":"${before}u0073${rest}"}`)
    const parsed = JSON.parse(body.toString()) as Record<string, string>
    t.ok(parsed.a!.includes(rest), `(${backslashes} backslashes: the token's characters but the first, once parsed)`)
    const outs = new Set([scrub.bytes(body).toString(), await streamed(scrub, [...body].map(b => Buffer.from([b])))])
    for (let at = 0; at <= body.length; at++) outs.add(await streamed(scrub, [body.subarray(0, at), body.subarray(at)]))
    t.equal(outs.size, 1, `${backslashes} backslashes: searched whole, one byte at a time and cut at every byte alike`)
    const [out] = outs
    let value: Record<string, string> | undefined
    t.doesNotThrow(() => { value = JSON.parse(out!) as Record<string, string> }, `${backslashes} backslashes: still JSON: ${out}`)
    t.notOk(String(JSON.stringify(value)).includes(rest.slice(2)), `${backslashes} backslashes: the token's characters are gone`)
    t.match(value?.a, /^x \\*\[redacted\] y$/, `${backslashes} backslashes: the text around it is kept`)
  }
})

t.test('an answer searched as bytes holds no string or key with the token once parsed, whatever JSON escapes spelled it', async t => {
  // What lets an answer read whole go on without a walk of its parsed strings (plugins/proxy.ts): every spelling a
  // JSON reader takes for the token (each character as written, `\uXXXX` in either case, `\/` `\"` `\\`) is found
  // in the bytes, in a string or a key, beside other escapes.
  let seed = 7
  const random = () => (seed = (seed * 48271) % 2147483647) / 2147483647
  for (const token of ['sk-upstream-TOKEN-0123456789abcdef', 'sk-a/b"c\\d-0123456789']) {
    const scrub = scrubber(token)
    let leaks = 0
    for (let i = 0; i < 2000; i++) {
      const spelled = [...token].map(c => {
        const hex = c.charCodeAt(0).toString(16).padStart(4, '0')
        const r = random()
        if (r < 0.3) return `\\u${r < 0.15 ? hex : hex.toUpperCase()}`
        if (c === '"' || c === '\\' || (c === '/' && r < 0.5)) return `\\${c}`
        return c
      }).join('')
      const around = ['', 'x', '\\n', '\\\\', '\\"', token.slice(0, 4)]
      const [before, after] = [around[i % around.length]!, around[(i >> 3) % around.length]!]
      const text = `{"a":"${before}${spelled}${after}","${before}${spelled}":1,"b":["\\t${spelled}${spelled}"]}`
      const out = JSON.parse(scrub.bytes(Buffer.from(text)).toString()) as Record<string, unknown>
      if (JSON.stringify(out).includes(token) || Object.keys(out).some(key => key.includes(token))) leaks++
    }
    t.equal(leaks, 0, `${JSON.stringify(token)}: no answer of 2000 holds it once parsed`)
  }
})
