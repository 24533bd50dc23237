// Route match, the first check: a path outside the eight operations is 404, a known path with another method
// is 405 with Allow (a probe's path too: POST /healthz). It runs as an onRequest hook for matched and unmatched routes alike, on the raw target.
// Requests Node would refuse or answer on its own before any check (a missing Host, an Expect header, CONNECT)
// are handed to this same path, so they get the envelope, a request id and an audit record like the rest.
import type { IncomingMessage, ServerResponse } from 'node:http'
import { isIPv6, type Socket } from 'node:net'
import type { Duplex } from 'node:stream'
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import {
  CredentialsInQueryError, CredentialsInUrlError, cutShort, ExpectationFailedError, HeadersTooLargeError, InvalidHostError, MethodNotAllowedError,
  MissingHostError, quoted, UnknownRouteError, UpgradeNotSupportedError
} from '../errors.js'
import { holdsKey, withoutKeys } from '../keys.js'
import { closesConnection, lastAnswerDue } from '../http/response.js'
import { hasBody, waitsForContinue } from './body.js'
import { credentialParam, matchOperation, rawPath } from '../operations.js'

/** The path as the client sent it, cut short: error messages echo it (a key withheld first, so none shows in part). */
function shown (url: string): string {
  const path = withoutKeys(rawPath(url))
  return path.length > 200 ? `${cutShort(path, 200)}…` : path
}

/**
 * The most headers a request may have. Node puts only the first ones of a request in `headers` (1000 by default)
 * and drops the rest without a word, Content-Length or Content-Type among them: a body would be read off the wire
 * and never seen. The header block's size (16 KiB) lets more than that through, so the count is checked too.
 */
const MAX_REQUEST_HEADERS = 1000

/** What is read and thrown away of a CONNECT's connection while its answer waits behind others (a tunnel's bytes). */
const CONNECT_DISCARD_BYTES = 64 * 1024

/**
 * A Host value as RFC 9112 §3.2 has it: a host (RFC 3986: a reg-name, which an IPv4 address is too, or an IP literal
 * in brackets) and an optional port; empty for a target without an authority (RFC 9110 §7.2).
 */
const HOST = /^(?:\[([^\]]*)\]|(?:[\w.~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::\d*)?$/
const IP_FUTURE = /^v[0-9A-Fa-f]+\.[\w.~!$&'()*+,;=:-]+$/

function validHost (host: string): boolean {
  const match = HOST.exec(host)
  if (match === null) return false
  const literal = match[1]
  return literal === undefined || isIPv6(literal) || IP_FUTURE.test(literal)
}

/**
 * Whether a request has more than one Host header, or one that is not valid (RFC 9112 §3.2: a server must answer
 * either with 400). Node keeps the first of two in `headers` and drops the other without a word, so they are counted
 * in `rawHeaders`: a length compare a header, and a lower-casing for the few of four letters. A valid Host is
 * remembered (clients send the same one on every call): the next call with it is one string compare.
 */
function badHost (raw: string[], known: { host: string | null }): boolean {
  let host: string | undefined
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!
    if (name.length !== 4 || name.toLowerCase() !== 'host') continue
    if (host !== undefined) return true
    host = raw[i + 1]!
  }
  if (host === undefined || host === known.host) return false
  if (!validHost(host)) return true
  known.host = host
  return false
}

export interface RouterOptions {
  /** the server's response class (http.createServer's ServerResponse option), for the CONNECT requests made here */
  Response: typeof ServerResponse
}

export default fp<RouterOptions>(async function router (app, { Response }) {
  app.decorateRequest('operation', null)
  /** the Host value last found valid */
  const known = { host: null as string | null }

  // Callback style (it runs on every call); a thrown refusal is the hook's error.
  app.addHook('onRequest', (request, reply, done) => {
    route(request, reply)
    done()
  })

  /** Whether an Upgrade header offers HTTP/2 over cleartext and nothing else. */
  function offersOnlyH2c (upgrade: string): boolean {
    return upgrade.split(',').every(protocol => protocol.trim().toLowerCase() === 'h2c')
  }

  function route (request: FastifyRequest, reply: FastifyReply): void {
    // Node hands an Upgrade request to the request handler when nobody listens for 'upgrade'. Node 20 and 24 go
    // on reading the connection after it (a request pipelined behind one is served), but a connection that asked to
    // switch protocols is not one to keep: whatever the answer, it closes after it (the README says so), and no call
    // pipelined behind it is served (one let through went upstream, and its answer was lost with the connection).
    // A call with nothing to come that asks for 100 Continue gets none (there is no body to wait for), and Node closes a
    // connection whose Expect it answered without one: no call pipelined behind it is served either.
    if (request.headers.upgrade !== undefined || (waitsForContinue(request) && !hasBody(request.headers))) {
      reply.header('connection', 'close')
      closesConnection(reply.raw, request.raw.socket)
    }
    if (request.routeOptions.config.internal === true) return
    const expect = request.headers.expect
    if (expect !== undefined && expect.toLowerCase() !== '100-continue') {
      throw new ExpectationFailedError(quoted(expect))
    }
    if (request.raw.rawHeaders.length > 2 * MAX_REQUEST_HEADERS) throw new HeadersTooLargeError()
    if (request.headers.host === undefined && request.raw.httpVersion === '1.1') throw new MissingHostError()
    if (badHost(request.raw.rawHeaders, known)) throw new InvalidHostError()
    const match = matchOperation(request.method, request.originalUrl)
    if (match.kind === 'operation') {
      request.operation = match.operation
      // The proxy speaks plain HTTP only. An offer of HTTP/2 over cleartext (h2c: curl --http2, Java's HttpClient
      // on http://) may be ignored (RFC 9110 §7.8): that call is served over HTTP/1.1. Any other switch (WebSocket)
      // is refused.
      const upgrade = request.headers.upgrade
      if (upgrade !== undefined && !offersOnlyH2c(upgrade)) throw new UpgradeNotSupportedError()
      const credential = credentialParam(match.operation.query)
      if (credential !== null) {
        const err = new CredentialsInQueryError(JSON.stringify(credential))
        err.param = credential
        throw err
      }
      // A key where an id (or a query value) goes would be sent upstream as it came.
      if (holdsKey(request.originalUrl)) throw new CredentialsInUrlError()
      return
    }
    if (match.kind === 'method_not_allowed') {
      reply.header('allow', match.allow)
      throw new MethodNotAllowedError(request.method, shown(request.originalUrl))
    }
    // Another method on a probe's path (/healthz, /readyz, /metrics when served here): the path exists, GET it.
    if (app.hasRoute({ method: 'GET', url: rawPath(request.originalUrl) })) {
      reply.header('allow', 'GET, HEAD')
      throw new MethodNotAllowedError(request.method, shown(request.originalUrl))
    }
    throw new UnknownRouteError(request.method, shown(request.originalUrl))
  }

  // Node reads the limit when a connection opens: every request on it keeps this many headers, and one with more
  // is refused above (rawHeaders has them all).
  app.server.maxHeadersCount = MAX_REQUEST_HEADERS

  // Node gives CONNECT to a 'connect' listener or silently drops the connection. Hand it to the ordinary
  // request path instead, so it gets the same 404/405 answer and audit record as any other unknown call.
  app.server.on('connect', (req: IncomingMessage, socket: Duplex) => {
    // The server's own class: it counts the body bytes the audit record reports (bytesOut).
    const res = new Response(req)
    res.shouldKeepAlive = false
    // Node takes its own 'error' listener off a socket it hands to 'connect': a write to a client gone (EPIPE,
    // ECONNRESET) would be an uncaught error, the end of the process. An error ends in 'close', handled below.
    socket.on('error', noop)
    // Pipelined behind calls still being answered (Node hands it over all the same), it is answered after them, in
    // order: given the socket at once, it threw out of Node's parser (the socket has an answer) and ended the
    // process. Until then its answer waits, as any pipelined call's does (closeWithConnection).
    const ahead = lastAnswerDue(socket as Socket)
    if (ahead === null) res.assignSocket(socket as Socket)
    else {
      ahead.once('finish', () => { if (socket.writable) res.assignSocket(socket as Socket) })
      // Node reads no more of a socket it hands over: a client that hangs up meanwhile would go unseen, and the
      // calls ahead run on to their deadlines. It is read on, what comes thrown away (a tunnel's first bytes, which
      // no answer here opens; past a bound, the connection is cut), and its end ends the calls on it, as Node ends
      // the calls of a connection whose client hangs up.
      let discarded = 0
      socket.on('data', (chunk: Buffer) => {
        discarded += chunk.length
        if (discarded > CONNECT_DISCARD_BYTES) socket.destroy()
      })
      socket.once('end', () => { socket.destroy() })
      // The connection gone before its turn: the call is over unanswered (audited as abandoned by its client). Once
      // it has the socket, Node says so itself.
      socket.once('close', () => { if (res.socket === null && !res.writableFinished) res.emit('close') })
    }
    res.once('finish', () => {
      res.detachSocket(socket as Socket)
      socket.end()
      res.emit('close') // Node's own responses do this; the audit record is written on it
    })
    app.server.emit('request', req, res)
  })

  // Node answers `Expect: 100-continue` with 100 before any check and an unknown Expect with a bare 417. Both
  // go through the ordinary path instead: the body plugin sends the 100 once every earlier check has passed,
  // and the hook above refuses an unknown expectation in the envelope.
  app.server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => app.server.emit('request', req, res))
  app.server.on('checkExpectation', (req: IncomingMessage, res: ServerResponse) => app.server.emit('request', req, res))

  // Reached only by a target the matcher accepted but Fastify's router did not (none is known); stay closed.
  app.setNotFoundHandler(async (request) => {
    throw new UnknownRouteError(request.method, shown(request.originalUrl))
  })
}, { name: 'router' })

function noop (): void {}
