// Body checks (415, 413, 400), after every cheaper check has passed. @fastify/http-proxy's own parsers hand the
// raw stream on (no size limit, no JSON check), so they are off (proxyPayloads: false) and this plugin reads every
// body itself, up to limits.bodyBytes, checks it is JSON and keeps the exact bytes (request.upstreamBody) for the
// upstream call (a parsed object or a Buffer given to reply-from would be re-serialised by it). The limit is read per call, not fixed in
// Fastify's parser when the plugin is registered, so a config reload changes it.
import type { IncomingHttpHeaders } from 'node:http'
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import {
  InvalidJsonError, JsonTooDeepError, JsonWithBomError, NotUtf8Error, quoted, RequestTooLargeError, UnknownParameterError,
  UnsupportedContentEncodingError, UnsupportedMediaTypeError, UnsupportedTransferEncodingError
} from '../errors.js'
import { exactJson, stringifyExact } from '../http/json.js'
import { overridesRoute, shownName, type Action, type Operation } from '../operations.js'

export interface BodyOptions {
  /** the largest body, read per call (limits.bodyBytes) */
  bodyBytes: () => number
}

/** A body is JSON when it says so (any case, parameters allowed) or says nothing; anything else is refused. */
export function isJsonMediaType (header: string | undefined): boolean {
  if (header === undefined) return true
  const type = header.split(';', 1)[0]!.trim().toLowerCase()
  return type === 'application/json'
}

/**
 * The client waits for `100 Continue` before it sends its body. Not an HTTP/1.0 one, whose expectation a server must
 * ignore and to which it must send no 1xx (RFC 9110 §10.1.1, §15.2): such a client reads a 100 as its answer.
 */
export function waitsForContinue (request: FastifyRequest): boolean {
  return request.raw.httpVersionMinor >= 1 && request.headers.expect?.toLowerCase() === '100-continue'
}

/** The request announces a body (a length above zero, or chunked framing). */
export function hasBody (headers: IncomingHttpHeaders): boolean {
  const length = headers['content-length']
  return headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')
}

/**
 * The request's body cannot be read: Node's parser refuses a Transfer-Encoding whose last coding is not chunked
 * (`identity`, `gzip`) once the headers are read, so nothing after them on the connection can be read either.
 */
export function bodyUnreadable (headers: IncomingHttpHeaders): boolean {
  const transfer = headers['transfer-encoding']
  return transfer !== undefined && !/(?:^|,)[ \t]*chunked[ \t]*$/i.test(transfer)
}

/**
 * Reads a body of at most `limit` bytes, as Fastify's own `parseAs: 'buffer'` does (a stream error is a 400 unless
 * it says otherwise), with the limit given per call. Past it, the rest is left to the error handler to discard.
 */
function readLimited (payload: NodeJS.ReadableStream, limit: number, done: (err: Error | null, body?: Buffer) => void): void {
  const chunks: Buffer[] = []
  let size = 0
  const stop = () => {
    payload.removeListener('data', onData)
    payload.removeListener('end', onEnd)
    payload.removeListener('error', onEnd)
  }
  function onData (chunk: Buffer | string) {
    const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk
    size += buf.length
    if (size > limit) {
      stop()
      done(new RequestTooLargeError(String(limit)))
      return
    }
    chunks.push(buf)
  }
  function onEnd (err?: Error & { statusCode?: number }) {
    stop()
    if (err != null) {
      if (!(typeof err.statusCode === 'number' && err.statusCode >= 400)) err.statusCode = 400
      done(err)
      return
    }
    done(null, Buffer.concat(chunks, size))
  }
  payload.on('data', onData)
  payload.on('end', onEnd)
  payload.on('error', onEnd)
  payload.resume()
}

/**
 * The deepest nesting of arrays and objects a body may have: far beyond any OpenAI request, and far short of what
 * recursive code (JSON.stringify of a create body with its owner added, the upstream's own parser) takes before its
 * stack runs out. JSON.parse itself takes any depth.
 */
export const MAX_BODY_DEPTH = 256

/** Whether a parsed body nests arrays and objects more than `max` levels deep; walked without recursion. */
export function nestsDeeper (value: unknown, max: number): boolean {
  const values: unknown[] = [value]
  const depths: number[] = [1]
  while (values.length > 0) {
    const v = values.pop()
    const depth = depths.pop()!
    if (typeof v !== 'object' || v === null) continue
    if (depth > max) return true
    for (const key in v) {
      values.push((v as Record<string, unknown>)[key])
      depths.push(depth + 1)
    }
  }
  return false
}

/**
 * A body changed from a client's (`from`, as parsed) as JSON for the upstream, with any number JSON.parse would
 * have rounded written back as the client sent it (http/json.ts).
 */
export function serializeBody (value: unknown, from: unknown): Buffer {
  return Buffer.from(stringifyExact(value, from))
}

const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/**
 * A body's top-level key an upstream framework would read in place of what the route says: as the call's method, or
 * as an id the path carries (operations.ts overridesRoute); or null.
 */
function methodOverride (op: Operation | null, body: unknown): string | null {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) return null
  for (const key in body) {
    if (overridesRoute(op, key)) return shownName(key)
  }
  return null
}

/** Fastify's `bodyless` methods: it reads no body for them, whatever the headers say. */
const UNPARSED: ReadonlySet<string> = new Set(['GET', 'HEAD', 'TRACE'])

/**
 * Calls whose API takes no body: a body sent with one is read and checked like any other (it is JSON, within the
 * limit), but not passed on. Nothing in it was checked for what it names (a `conversation` of another team, keys the
 * gateway keeps), and the upstream has no use for it.
 */
const TAKES_NO_BODY: ReadonlySet<Action> = new Set<Action>(['conversation.delete', 'item.delete', 'response.delete', 'response.cancel'])

export default fp<BodyOptions>(async function body (app, { bodyBytes }) {
  app.decorateRequest('bodyBytes', 0)
  app.decorateRequest('parsedBody', undefined)
  app.decorateRequest('upstreamBody', null)

  // Before a byte of the body is read: framing (501), coding and media type (415), declared size (413). Only then
  // is a client that waits for `100 Continue` told to send its body. Fastify reads no body for a GET (UNPARSED): one
  // sent all the same is read to its end here, within the limit, and dropped (not parsed), before anything goes
  // upstream. Passed on at once, a call whose body then broke its framing had been served upstream while its client
  // got 400 "malformed HTTP", or its 200 before the body was even whole.
  app.addHook('preParsing', (request, reply, payload, done) => {
    checkDeclared(request, reply)
    if (!UNPARSED.has(request.method) || !hasBody(request.headers)) {
      done(null, payload)
      return
    }
    readLimited(payload, bodyBytes(), (err, buf) => {
      if (buf !== undefined) request.bodyBytes = buf.length // (read and dropped, as a delete's is: in bytesIn)
      done(err, payload)
    })
  })

  function checkDeclared (request: FastifyRequest, reply: FastifyReply): void {
    const headers = request.headers
    if (!hasBody(headers)) return
    const transfer = headers['transfer-encoding']
    // Node's parser insists on chunked last; any coding before it (gzip, chunked) would be ignored, not decoded.
    if (transfer !== undefined && transfer.trim().toLowerCase() !== 'chunked') {
      throw new UnsupportedTransferEncodingError(quoted(transfer))
    }
    const coding = headers['content-encoding']
    if (coding !== undefined && coding.trim().toLowerCase() !== 'identity') {
      throw new UnsupportedContentEncodingError(quoted(coding))
    }
    const type = headers['content-type']
    if (!isJsonMediaType(type)) throw new UnsupportedMediaTypeError(quoted(String(type)))
    const limit = bodyBytes()
    if (Number(headers['content-length']) > limit) throw new RequestTooLargeError(String(limit))
    if (waitsForContinue(request)) reply.raw.writeContinue()
  }

  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', (request, payload, done) => {
    readLimited(payload, bodyBytes(), (err, buf) => {
      if (err !== null) done(err, undefined)
      else parse(request, buf!, done)
    })
  })

  function parse (request: FastifyRequest, buf: Buffer, done: (err: Error | null, body?: unknown) => void): void {
    // An empty body is no body, whatever the headers said (the Python SDK sends Content-Type: application/json
    // with nothing after it on DELETE): nothing of it goes upstream.
    if (buf.length === 0) {
      done(null, undefined)
      return
    }
    let text: string
    try {
      // fatal: bytes that are not UTF-8 are refused, not silently replaced and then forwarded as they were;
      // ignoreBOM: a BOM stays in the text, where JSON.parse refuses it, as the upstream would. Said apart from
      // bad JSON: a client in another charset (ISO-8859-1) sends valid JSON, in bytes that are not UTF-8.
      text = UTF8.decode(buf)
    } catch {
      done(new NotUtf8Error(), undefined)
      return
    }
    try {
      request.parsedBody = exactJson(text, JSON.parse(text))
    } catch {
      // (Said apart: editors and .NET's UTF8 encoding write one before JSON that any validator passes, and "not valid
      // JSON" alone sends the client looking for a fault in what it can see.)
      done(text.charCodeAt(0) === 0xfeff ? new JsonWithBomError() : new InvalidJsonError(), undefined)
      return
    }
    // Each level takes two bytes at least: a shorter body cannot be too deep, and is not walked.
    if (buf.length > 2 * MAX_BODY_DEPTH && nestsDeeper(request.parsedBody, MAX_BODY_DEPTH)) {
      done(new JsonTooDeepError(String(MAX_BODY_DEPTH)), undefined)
      return
    }
    request.bodyBytes = buf.length
    const operation = request.operation
    if (operation !== null && TAKES_NO_BODY.has(operation.action)) {
      done(null, undefined)
      return
    }
    // A key that an upstream framework would take for the method (operations.ts overridesRoute): a POST body
    // saying `"_method": "DELETE"` would be a delete to it, unchecked for the delete scope; or for an id the path
    // carries (`"conversation_id"`; on an update, `"conversation"`), unchecked for its owner.
    const override = methodOverride(operation, request.parsedBody)
    if (override !== null) {
      const err = new UnknownParameterError(override)
      err.param = override
      done(err, undefined)
      return
    }
    // The exact bytes go upstream from request.upstreamBody (plugins/proxy.ts): reply-from is given no body of
    // its own to encode or stream, which it would only do for nothing.
    request.upstreamBody = buf
    done(null, undefined)
  }
}, { name: 'body' })
