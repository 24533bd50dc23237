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
