// Body checks (415, 413, 400), after every cheaper check has passed. @fastify/http-proxy's own parsers hand the
// raw stream on (no size limit, no JSON check), so they are off (proxyPayloads: false) and this plugin reads every
// body itself, up to limits.bodyBytes, checks it is JSON and passes the exact bytes on as a stream
// (a parsed object or a Buffer would be re-serialised by reply-from).
import type { IncomingHttpHeaders } from 'node:http'
import { Readable } from 'node:stream'
import fp from 'fastify-plugin'
import { InvalidJsonError, UnsupportedMediaTypeError } from '../errors.js'

export interface BodyOptions {
  bodyBytes: number
}

/** A body is JSON when it says so (any case, parameters allowed) or says nothing; anything else is refused. */
export function isJsonMediaType (header: string | undefined): boolean {
  if (header === undefined) return true
  const type = header.split(';', 1)[0]!.trim().toLowerCase()
  return type === 'application/json'
}

function hasBody (headers: IncomingHttpHeaders): boolean {
  const length = headers['content-length']
  return headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')
}

const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

export default fp<BodyOptions>(async function body (app, { bodyBytes }) {
  app.decorateRequest('bodyBytes', 0)

  // Before a byte of the body is read.
  app.addHook('preParsing', async (request) => {
    if (!hasBody(request.headers)) return
    const type = request.headers['content-type']
    if (!isJsonMediaType(type)) throw new UnsupportedMediaTypeError(JSON.stringify(String(type).slice(0, 100)))
  })

  app.removeAllContentTypeParsers()
  app.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit: bodyBytes }, (request, raw, done) => {
    const buf = raw as Buffer
    // An empty body is no body, whatever the headers said (the Python SDK sends Content-Type: application/json
    // with nothing after it on DELETE): nothing of it goes upstream.
    if (buf.length === 0) {
      done(null, undefined)
      return
    }
    try {
      // fatal: bytes that are not UTF-8 are refused, not silently replaced and then forwarded as they were;
      // ignoreBOM: a BOM stays in the text, where JSON.parse refuses it, as the upstream would.
      JSON.parse(UTF8.decode(buf))
    } catch {
      done(new InvalidJsonError(), undefined)
      return
    }
    request.bodyBytes = buf.length
    done(null, Readable.from([buf], { objectMode: false }))
  })
}, { name: 'body' })
