// JSON the gateway reads and writes again (a body it adds the owner to, an answer or event it takes the owner out
// of) keeps its numbers as they were written. JSON.parse rounds what a double cannot hold (an integer past 2^53, 17
// or more significant digits, an exponent out of range), and JSON.stringify writes the rounded number: a tool
// schema's large integer enum, say, would change on its way through. Only text that holds such a number outside its
// strings is read again, and only an object read so is written with lossless-json's numbers.
import { randomBytes, randomUUID } from 'node:crypto'
import { isSafeNumber, LosslessNumber } from 'lossless-json'

/**
 * Text that may hold a number JSON.parse would change: 16 digits and decimal points in a row (16 significant
 * digits, the point anywhere among them: `123456789012345.6789` as much as `9007199254740993`), or a 3-digit
 * exponent, where a number starts (after a colon, comma or bracket). A quick test of the text; a match inside a
 * string costs a walk of the text between its strings. Ids in hex ("msg_68e1234...") do not match.
 */
const MAYBE_INEXACT_NUMBER = /[:,[]\s*-?(?:[\d.]{16}|\d+(?:\.\d+)?[eE][+-]?\d{3})/

/** A number's text that may be one JSON.parse changes (as above); the others are exact without asking. */
const LONG_NUMBER = /[\d.]{16}|[eE][+-]?\d{3}/

/** Values read with their exact numbers: only these need the exact writer. */
const exactValues = new WeakSet<object>()

const QUOTE = 0x22
const BACKSLASH = 0x5c
const MINUS = 0x2d

/** A character a JSON number may hold past its first one. */
function inNumber (c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || c === 0x2e || c === 0x65 || c === 0x45 || c === 0x2b || c === MINUS
}

/** The index of the quote that ends the string whose opening quote is at `start` (in valid JSON). */
function stringEnd (text: string, start: number): number {
  let end = text.indexOf('"', start + 1)
  for (;;) {
    if (end === -1) return text.length
    let backslashes = 0
    while (text.charCodeAt(end - 1 - backslashes) === BACKSLASH) backslashes++
    if (backslashes % 2 === 0) return end
    end = text.indexOf('"', end + 1)
  }
}

interface MarkedNumbers {
  /** `text` with each number JSON.parse would change made the string `mark` + the number's text */
  text: string
  mark: string
}

/**
 * The numbers of `text` (valid JSON) that JSON.parse would change, each replaced by a string holding a mark made
 * for this call (72 random bits, which no text a client or the upstream sent can hold; none of them sees it), followed
 * by the number's text, or null if there are none.
 * Strings are skipped with indexOf, so a text that is mostly strings (a conversation's messages, a tool's output
 * holding JSON of its own) costs about what JSON.parse does, whatever its strings hold.
 */
function markInexactNumbers (text: string): MarkedNumbers | null {
  const parts: string[] = []
  let mark = ''
  let copied = 0
  for (let i = 0; i < text.length;) {
    const c = text.charCodeAt(i)
    if (c === QUOTE) {
      i = stringEnd(text, i) + 1
      continue
    }
    if (c !== MINUS && !(c >= 0x30 && c <= 0x39)) {
      i++
      continue
    }
    let end = i + 1
    while (end < text.length && inNumber(text.charCodeAt(end))) end++
    const number = text.slice(i, end)
    if (LONG_NUMBER.test(number) && !isSafeNumber(number)) {
      if (mark === '') mark = randomBytes(9).toString('base64url')
      parts.push(text.slice(copied, i), '"', mark, number, '"')
      copied = end
    }
    i = end
  }
  if (mark === '') return null
  parts.push(text.slice(copied))
  return { text: parts.join(''), mark }
}

/** Whether `value` is a string made by markInexactNumbers. */
function isMark (value: unknown, mark: string): value is string {
  return typeof value === 'string' && value.startsWith(mark)
}

/**
 * `value` (JSON.parse of marked text) with each marked string made the LosslessNumber it stands for; walked without
 * recursion (an upstream's answer may nest deeper than the stack goes).
 */
function restoreNumbers (value: object, { mark }: MarkedNumbers): object {
  const number = (marked: string) => new LosslessNumber(marked.slice(mark.length))
  const containers: object[] = [value]
  while (containers.length > 0) {
    const container = containers.pop()
    if (Array.isArray(container)) {
      for (let i = 0; i < container.length; i++) {
        const v: unknown = container[i]
        if (typeof v === 'object' && v !== null) containers.push(v)
        else if (isMark(v, mark)) container[i] = number(v)
      }
    } else {
      const object = container as Record<string, unknown>
      for (const key in object) {
        const v = object[key]
        if (typeof v === 'object' && v !== null) containers.push(v)
        else if (isMark(v, mark)) object[key] = number(v)
      }
    }
  }
  return value
}

/**
 * `text` (already read by JSON.parse as `parsed`) with its numbers kept as written where JSON.parse rounds them,
 * or `parsed` itself. The text is read by JSON.parse again, each such number in it marked (a key given twice: the
 * last, as JSON.parse reads it), not by a parser written in JavaScript: for a body or answer of megabytes, that
 * took the gateway's one thread for a second or more, in which it served no one else.
 */
export function exactJson (text: string, parsed: unknown): unknown {
  if (!MAYBE_INEXACT_NUMBER.test(text)) return parsed
  // (A text that is one number or string alone is kept as JSON.parse reads it: the gateway rewrites only objects.)
  const marked = typeof parsed === 'object' && parsed !== null ? markInexactNumbers(text) : null
  if (marked === null) return parsed
  const exact = restoreNumbers(JSON.parse(marked.text) as object, marked)
  exactValues.add(exact)
  return exact
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
