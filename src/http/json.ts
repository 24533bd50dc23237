// JSON the gateway reads and writes again (a body it adds the owner to, an answer or event it takes the owner out
// of) keeps its numbers as they were written. JSON.parse rounds what a double cannot hold (an integer past 2^53, 17
// or more significant digits, an exponent out of range), and JSON.stringify writes the rounded number: a tool
// schema's large integer enum, say, would change on its way through. Only text that may hold such a number is read
// again with lossless-json (its reader and writer are slower), and only an object read so is written with it.
import { randomUUID } from 'node:crypto'
import { isSafeNumber, LosslessNumber, parse as parseLossless } from 'lossless-json'

/**
 * Text that may hold a number JSON.parse would change: 16 digits and decimal points in a row (16 significant
 * digits, the point anywhere among them: `123456789012345.6789` as much as `9007199254740993`), or a 3-digit
 * exponent, where a number starts (after a colon, comma or bracket). A quick test of the text; a match inside a
 * string only costs a second reading. Ids in hex ("msg_68e1234...") do not match, so answers full of them are read
 * once.
 */
const MAYBE_INEXACT_NUMBER = /[:,[]\s*-?(?:[\d.]{16}|\d+(?:\.\d+)?[eE][+-]?\d{3})/

/** lossless-json's number reader: a plain number where it is exact, a LosslessNumber (its text) where not. */
function exactNumber (text: string): number | LosslessNumber {
  return isSafeNumber(text) ? Number(text) : new LosslessNumber(text)
}

/** Values read by lossless-json: only these need its writer. */
const exactValues = new WeakSet<object>()

/**
 * `text` (already read by JSON.parse as `parsed`) with its numbers kept as written where JSON.parse rounds them,
 * or `parsed` itself. lossless-json refuses a key given twice, which JSON.parse takes (the last wins): such a
 * text keeps JSON.parse's reading.
 */
export function exactJson (text: string, parsed: unknown): unknown {
  if (!MAYBE_INEXACT_NUMBER.test(text)) return parsed
  try {
    const exact = parseLossless(text, null, exactNumber)
    if (typeof exact === 'object' && exact !== null) exactValues.add(exact)
    return exact
  } catch {
    return parsed
  }
}

/** JSON.parse of `text`, with exactJson's numbers. Throws as JSON.parse does. */
export function parseExact (text: string): unknown {
  return exactJson(text, JSON.parse(text))
}

/**
 * `value`, changed from `from` (as exactJson or parseExact read it), as JSON text, with any number JSON.parse
 * would have rounded written back as it came.
 */
export function stringifyExact (value: unknown, from: unknown): string {
  const exact = typeof from === 'object' && from !== null && exactValues.has(from)
  return exact ? stringifyWithExactNumbers(value) : JSON.stringify(value)
}

/**
 * JSON.stringify, with each LosslessNumber written as its text. lossless-json's own writer is JavaScript walking
 * every value: for a 4 MiB body (the default body limit) of small numbers, about 1 s in which the gateway serves
 * no one else, on every such call of a client. Here V8's writer does the work: each LosslessNumber is written as
 * a string holding a mark made for this call (a random UUID, which no text a client or the upstream sent can
 * hold), and then each quoted mark is replaced by the number's text (about 0.15 s for the same body).
 */
function stringifyWithExactNumbers (value: unknown): string {
  const numbers: string[] = []
  const mark = randomUUID()
  const text = JSON.stringify(value, (_key, v: unknown) => v instanceof LosslessNumber ? `${mark}${numbers.push(v.value) - 1}` : v) as string | undefined
  if (text === undefined) return 'null'
  if (numbers.length === 0) return text
  return text.replace(new RegExp(`"${mark}(\\d+)"`, 'g'), (_, i: string) => numbers[Number(i)]!)
}
