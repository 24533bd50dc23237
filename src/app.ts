// buildApp(config): the gateway as a Fastify instance, with no process concerns, so tests build it directly.
// Plugins are registered in request order, and their hooks run in that order:
// request id → route (404/405) → audit writable (503, with audit.onFailure "closed") → key (401) → rate limit (429)
// → ids and query (400) → scope (403) → body (415/413/400) → model (403) → concurrency (503) → ownership (404) → proxy
// → one audit record when the response closes.
// The config in force lives in one place here: plugins read what a reload may change through getters, and
// `app.applyConfig(next)` swaps it (reload.ts says which keys it applies and which need a restart).
import Fastify, { type FastifyBaseLogger, type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { withoutSecrets, type GatewayConfig } from './config.js'
import {
  envelope, HeadersTooLargeError, InternalError, InvalidRequestError, isGatewayError, RequestTimeoutError,
  type GatewayError
} from './errors.js'
import { openAuditWriter, type AuditWriter } from './audit/writer.js'
import { reloaded, type ConfigChange } from './reload.js'
import { createAppLogger, DebugRequestLogController, keepAccepting, lazyChildLogger, PeerLogThrottle } from './logging.js'
import audit, { auditGate, markMalformed } from './plugins/audit.js'
import auth from './plugins/auth.js'
import body, { bodyUnreadable, hasBody, waitsForContinue } from './plugins/body.js'
import health from './plugins/health.js'
import metrics, { metricsEnabled } from './plugins/metrics.js'
import ownership from './plugins/ownership.js'
import proxy from './plugins/proxy.js'
import { IssuedItems } from './ownership/issued.js'
import { OwnerCache } from './ownership/owners.js'
import rateLimit, { reapplyLimits } from './plugins/rate-limit.js'
import requestId, { newRequestId, REQUEST_ID_HEADER } from './plugins/request-id.js'
import router from './plugins/router.js'
import scope from './plugins/scope.js'
import responses from './plugins/responses.js'
import concurrency from './plugins/concurrency.js'
import { ClientDirectory } from './clients.js'
import { Upstream } from './upstream/client.js'
import { trustedProxies, UNKNOWN_PEER } from './http/address.js'
import { Connections, timeoutCheckIntervalMs } from './http/connections.js'
import { answersDue, closeWithConnection, countingResponseClass, hasWaitingBehind, isCounting, responseHolding } from './http/response.js'
import { rawPath } from './operations.js'
import { MemoryStore } from './stores/memory.js'
import type { RateLimitStore } from './stores/rate-limit-store.js'
import { RedisStore } from './stores/redis.js'
import './types.js'

export interface AppDependencies {
  /** operational log; default: pino to stdout at config.log.level */
  logger?: FastifyBaseLogger
  /** audit writer; default: one opened on config.audit */
  auditWriter?: AuditWriter
  /** HMAC key for the audit chain (AUDIT_HMAC_KEY, read by the process); plain sha256 without it */
  auditHmacKey?: string
  rateLimitStore?: RateLimitStore
  /** conversation owners; default: an in-memory cache sized by config.ownership */
  ownerCache?: OwnerCache
}

/** Stands in for a target the router cannot take; the original stays in request.originalUrl. */
const UNROUTABLE_TARGET = '/.unroutable'

/**
 * find-my-way decodes the whole path before routing, and Fastify answers itself, before any hook (no request id,
 * no audit record, its own error shape), a malformed escape (`%zz`) and an absolute-form target it cannot take
 * (`http://host/path#fragment`, no host, a host it cannot parse: FST_ERR_BAD_URL, quoting the whole target, a
 * key in it too). Route such a target to nowhere instead; the gateway's hooks then judge the original, where a
 * `%` can never pass the id rule, and a target not in origin form (`/...`) is never a route.
 */
function routableUrl (req: IncomingMessage): string {
  const url = req.url ?? '/'
  if (url.charCodeAt(0) !== 0x2f) return UNROUTABLE_TARGET // (not '/')
  if (!url.includes('%')) return url // nothing to decode: the common case costs one scan
  try {
    decodeURIComponent(rawPath(url))
    return url
  } catch {
    return UNROUTABLE_TARGET
  }
}

/** Why Node's parser refused a request, in words for the operational log. */
const PARSER_REFUSALS: Record<string, string> = {
  ERR_HTTP_REQUEST_TIMEOUT: 'request not received in time (slow headers or body)',
  HPE_HEADER_OVERFLOW: 'headers over the size limit',
  // As llhttp uses them (Node 20 and 24): a second Content-Length is UNEXPECTED_CONTENT_LENGTH, and a
  // Content-Length beside Transfer-Encoding is INVALID_TRANSFER_ENCODING, as is a coding list not ending in chunked.
  HPE_UNEXPECTED_CONTENT_LENGTH: 'Content-Length given more than once',
  HPE_INVALID_TRANSFER_ENCODING: 'invalid Transfer-Encoding, or one together with Content-Length',
  HPE_INVALID_CHUNK_SIZE: 'invalid chunk size',
  HPE_INVALID_CONTENT_LENGTH: 'invalid Content-Length',
  HPE_LF_EXPECTED: 'bare LF or CR line ending',
  HPE_CR_EXPECTED: 'bare LF or CR line ending',
  HPE_INVALID_URL: 'invalid bytes in the request target',
  HPE_CLOSED_CONNECTION: 'bytes after a request that asked to close the connection',
  HPE_INVALID_HEADER_TOKEN: 'invalid header',
  HPE_INVALID_METHOD: 'invalid method',
  HPE_INVALID_VERSION: 'invalid HTTP version'
}

/**
 * Malformed HTTP that Node's parser refuses: answered in OpenAI's envelope like every other gateway error, and
 * logged at warn with the peer and the reason (throttled per peer), since these are how smuggling and slowloris
 * attempts show. When the request had already been handed over (a bad chunk in its body), its audit record says
 * what was sent.
 */
function clientErrorHandler (throttle: PeerLogThrottle) {
  return function onClientError (this: FastifyInstance, err: NodeJS.ErrnoException, socket: Socket) {
    if (err.code === 'ECONNRESET' || socket.destroyed) return
    // The client closed its side before its request was whole (an SDK call aborted or timed out mid-upload): a
    // hang-up, not malformed HTTP. Nothing to answer; the call on it is audited as aborted.
    if (err.code === 'HPE_INVALID_EOF_STATE') {
      socket.destroy()
      return
    }
    const inFlight = responseHolding(socket)
    // The refused bytes are the body of the call being read, or a call after every one on the connection. They
    // are answered only when that call is the connection's one call now: an answer written ahead of another
    // call's would be taken by the client for that call's (HTTP answers in order). After calls read whole, those
    // are answered first (below). Otherwise the connection is closed without a word, and each call on it is
    // audited as what it was, aborted.
    // Bytes refused while the body of a call already answered is thrown away are that call's: it has its answer.
    const answerable = inFlight === null
      ? discarding.get(socket)?.complete !== false
      : !inFlight.req.complete && !hasWaitingBehind(inFlight, socket)
    const answering = socket.writable && answerable && !inFlight?.headersSent
    // The call's own id, which its audit record has; or, when no call was under way, a fresh one, which only the log
    // line below holds: the id a client finds in its answer leads to one or the other.
    const id = answering ? (inFlight !== null && isCounting(inFlight) ? inFlight.requestId : null) ?? newRequestId() : null
    const peer = socket.remoteAddress ?? UNKNOWN_PEER
    const held = throttle.admit(peer)
    if (held !== null) {
      const reason = PARSER_REFUSALS[err.code ?? ''] ?? 'malformed HTTP'
      this.log.warn({ peer, code: err.code, reason, ...(id !== null ? { reqId: id } : {}), ...(held > 0 ? { heldBack: held } : {}) },
        'request refused by the HTTP parser')
    }
    // Bytes after a call that asked to close (`Connection: close`, HTTP/1.0): RFC 9112 §9.6 has that call answered, nothing
    // after it processed, and the connection closed, which Node does after the answer. Cut now, the call (perhaps done
    // upstream already) would lose its answer and be audited as a client that hung up. Nothing more is read.
    if (err.code === 'HPE_CLOSED_CONNECTION' && inFlight !== null) {
      socket.pause()
      return
    }
    // Bytes refused behind calls read whole (a request Node cannot parse pipelined behind them, what a Content-Length
    // too short left of a body, the broken body of a call pipelined behind them): the calls read whole are
    // answered, in order, and the connection closes after the last of them; nothing more is read, and a call whose
    // body broke is not answered (its 400 cannot go ahead of their answers: it is audited aborted). Cut at once,
    // a call done upstream lost its answer, and one whose answer was on its way was audited as sent.
    const due = answersDue(socket)
    if (due[0]?.req.complete === true) {
      const broken = due.findIndex(res => !res.req.complete)
      for (const res of broken === -1 ? [] : due.slice(broken)) res.destroy()
      socket.pause()
      closeAfter(due[broken === -1 ? due.length - 1 : broken - 1]!, socket)
      return
    }
    if (id !== null) {
      const error = err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? new RequestTimeoutError()
        : err.code === 'HPE_HEADER_OVERFLOW' ? new HeadersTooLargeError() : new InvalidRequestError('malformed HTTP.')
      const body = JSON.stringify(envelope(error))
      if (inFlight) markMalformed(inFlight, error.statusCode, Buffer.byteLength(body))
      // (as x-request-id too, which the SDKs read into their error, as for every answer of the gateway's)
      socket.write(`HTTP/1.1 ${error.statusCode} ${STATUS_CODES[error.statusCode]}\r\n` +
        `${REQUEST_ID_HEADER}: ${id}\r\nx-request-id: ${id}\r\nContent-Type: application/json; charset=utf-8\r\n` +
        `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`)
    }
    // The call's answer is written whole already (a refusal made before its body was read, whose body then broke its
    // framing in the same read): it goes out before the connection closes, and the call is recorded as what it was
    // (denied, invalid), not as a client that hung up.
    if (inFlight !== null && inFlight.writableEnded && !inFlight.writableFinished) {
      socket.pause()
      const close = () => { socket.destroy(err) }
      inFlight.once('finish', close)
      inFlight.once('close', close)
      return
    }
    socket.destroy(err)
  }
}

/**
 * Closes `socket` once `res` is written whole: Node ends the connection after an answer that is its last (`_last`,
 * which Connection: close sets) instead of handing the socket to an answer waiting behind it (one destroyed, whose
 * refusal would then be recorded as sent). An answer not begun says so; one on its way is made the last all the same.
 */
function closeAfter (res: ServerResponse, socket: Socket): void {
  if (!res.headersSent) res.shouldKeepAlive = false
  else (res as ServerResponse & { _last: boolean })._last = true
  if (res.writableFinished) socket.destroySoon()
}

/**
 * After an early answer, a body may still be coming: the rest is read and thrown away (so the connection can serve
 * the next request) for at most this long and this many bytes, then the connection is closed. The bytes are many
 * enough that a client uploading its whole body before it reads (curl, an SDK) still gets to read a 413.
 */
const DISCARD_BODY_MS = 5_000
/** At the end of a shutdown's grace: how long the upstream waits for the client connections to close first. */
const ABORT_CLOSE_WAIT_MS = 1_000
const DISCARD_BODY_BYTES = 64 * 1024 * 1024
/** Per connection, the last call answered before its body was read (discardTheRestOfTheBody): until that body is
 * whole, what arrives on the connection is still that call's. */
const discarding = new WeakMap<Socket, IncomingMessage>()

export async function buildApp (config: GatewayConfig, deps: AppDependencies = {}): Promise<FastifyInstance> {
  // Counts body bytes for the audit and cuts off a client that stops reading (listen.sendTimeoutMs).
  const responseClass = countingResponseClass(config.listen.sendTimeoutMs)
  const app = Fastify({
    loggerInstance: deps.logger ?? createAppLogger(config.log.level),
    logController: new DebugRequestLogController(),
    // Each request's child logger is made only if it writes a line (most calls write none).
    childLoggerFactory: lazyChildLogger,
    genReqId: newRequestId,
    requestIdHeader: false,
    // The body limit is limits.bodyBytes, read per call by plugins/body.ts (a reload changes it).
    exposeHeadRoutes: false,
    // A request that comes on a kept-alive connection after accepting stopped (SIGTERM) is served and audited
    // like any other, with `Connection: close`, within the shutdown's grace; not given Fastify's bare 503.
    return503OnClosing: false,
    // The audit ip and the count of failed keys per address believe X-Forwarded-For only from these.
    trustProxy: config.trustProxy === false ? false : trustedProxies(config.trustProxy),
    keepAliveTimeout: config.listen.keepAliveTimeoutMs,
    requestTimeout: config.listen.requestTimeoutMs,
    // Ids are checked by our own rule (operations.ts), which must decide before the router could answer
    // 414 for a param over find-my-way's default 100 characters. 16 KiB is Node's whole header limit.
    routerOptions: { maxParamLength: 16_384 },
    rewriteUrl: routableUrl,
    // Node would answer these itself, bare: a missing Host (400) and an unknown Expect (417) go through the
    // gateway's checks instead, for the envelope, a request id and an audit record (plugins/router.ts).
    http: {
      ServerResponse: responseClass,
      requireHostHeader: false,
      // Given here too: Node checks headersTimeout against requestTimeout when Fastify makes the server, before it
      // sets requestTimeout itself, so a headersTimeoutMs past Node's default (5 minutes) would refuse to start.
      requestTimeout: config.listen.requestTimeoutMs,
      headersTimeout: config.listen.headersTimeoutMs,
      connectionsCheckingInterval: timeoutCheckIntervalMs(config.listen.headersTimeoutMs)
    },
    clientErrorHandler: clientErrorHandler(new PeerLogThrottle())
  })

  let current = config
  // Whether the last reload (SIGHUP, --watch) was applied; a refused one leaves the process running a config its
  // file no longer says, which the next start would refuse: gateway_config_last_reload_successful.
  let lastReloadApplied = true
  // listen.maxConnections, kept by closing an idle kept-alive connection before refusing a new one (http/connections.ts).
  const connections = new Connections(config.listen.maxConnections)
  // Before Fastify's own listener: a call refused at once is answered within that listener, and the connection's
  // pipelined calls must be known by then.
  app.server.prependListener('request', (req: IncomingMessage, res: ServerResponse) => {
    if (lingering.has(req.socket)) res.destroy()
    connections.used(req)
    closeWithConnection(res, req.socket)
  })
  // (Once listening: before it, an 'error' is the listen's own, a port taken, which stops the start.)
  app.addHook('onListen', (done) => { keepAccepting(app.server, app.log, 'the listener'); done() })
  app.setErrorHandler(errorHandler(config))
  app.decorateRequest('refusal', null)

  const directory = new ClientDirectory(config.clients)
  const apiKey = () => current.upstream.apiKey
  await app.register(requestId)
  // The store before the audit: a start it refuses (a wrong password, a read-only replica) leaves the audit directory
  // as it found it, with no empty audit.jsonl.
  const store = deps.rateLimitStore ?? await rateLimitStoreFor(config.store, app.log)
  let auditWriter: AuditWriter | undefined
  let upstream: Upstream
  try {
    auditWriter = deps.auditWriter ?? await openAuditWriter({
      ...config.audit, hmacKey: deps.auditHmacKey, log: app.log
    })
    await app.register(audit, { writer: auditWriter, onFailure: config.audit.onFailure })
    // (It reads upstream.caFile again: a mounted secret replaced since the config was read can fail here.)
    upstream = new Upstream(config.upstream, app.log)
    app.addHook('onClose', async () => { await upstream.close() })
    if (metricsEnabled(config.metrics)) {
      await app.register(metrics, {
        ...config.metrics,
        isClient: id => directory.hasClient(id),
        lastReloadApplied: () => lastReloadApplied,
        tokenRefusals: () => upstream.refusedToken.total,
        writer: auditWriter,
        headersTimeoutMs: config.listen.headersTimeoutMs
      })
    }
    await app.register(health, { upstream, store, storeRefuses: config.store.onFailure === 'closed', token: config.metrics.token })
    await app.register(router, { Response: responseClass })
    await app.register(auditGate)
    await app.register(auth, { directory, failuresPerMinute: () => current.limits.authFailuresPerMinute })
    await app.register(rateLimit, { store, currentClient: id => directory.client(id) })
    await app.register(scope)
    await app.register(body, { bodyBytes: () => current.limits.bodyBytes })
    await app.register(responses)
    await app.register(concurrency, { maxInFlight: () => current.limits.maxInFlight })
    // Shared through Redis when the buckets are: an item one replica handed out may come back to another.
    const issued = new IssuedItems({ max: config.ownership.cacheSize, shared: store instanceof RedisStore ? store : null, log: app.log })
    app.addHook('onClose', async () => { issued.close() })
    await app.register(ownership, {
      upstream,
      apiKey,
      unowned: () => config.ownership.unowned,
      cache: deps.ownerCache ?? new OwnerCache({
        max: config.ownership.cacheSize, ttlMs: config.ownership.cacheTtlMs, missingTtlMs: config.ownership.notFoundTtlMs
      }),
      issued
    })
    await app.register(proxy, { upstream, apiKey })
  } catch (err) {
    // A start that fails once the audit is open leaves nothing behind: not the audit lock (the next start would be
    // refused as a second gateway on the series), not the store's connection, not the upstream pools. The plugins
    // registered already close what they were given in app.close(); the writer's and the store's closes may run twice.
    await app.close().catch(() => {})
    await auditWriter?.close()
    await store.close()
    throw err
  }

  app.decorate('currentConfig', () => current)
  app.decorate('applyConfig', (next: GatewayConfig): ConfigChange => {
    const { config: merged, applied, needRestart } = reloaded(current, next)
    // A CA file renewed in place (a mounted secret) is a change its unchanged path does not show.
    if (upstream.caChanged(merged.upstream)) applied.push('upstream.caFile (contents)')
    // First what can fail (new pools read the CA file): a failure leaves everything as it was. The token is read
    // per call (apiKey above); Upstream.update builds new pools only when what they are built from changed.
    if (applied.some(path => path.startsWith('upstream.'))) upstream.update(merged.upstream)
    directory.update(merged.clients)
    reapplyLimits(store, current.clients, merged.clients, app.log)
    current = merged
    lastReloadApplied = true
    return { applied, needRestart }
  })
  app.decorate('reloadRefused', () => { lastReloadApplied = false })
  // A connection with no call under way (never used, between calls, or a call not yet whole) carries nothing to
  // wait for, yet Node's close() closes only those idle between calls, and only once: the drain closes the rest,
  // and those that fall idle later (after a call whose answer had begun before accepting stopped).
  app.server.on('connection', (socket: Socket) => { connections.opened(socket) })
  // (An answer still being flushed to a slow client has ended in Node's eyes: it is left to finish.)
  const unused = (socket: Socket) => !socket.destroyed && responseHolding(socket) === null && socket.writableLength === 0
  app.decorate('closeUnusedConnections', () => {
    // A call sent on a connection just fallen idle (after an answer begun before accepting stopped, which could not
    // say Connection: close) may be in the kernel, not read yet: the event loop reads sockets after its timers, a
    // drain's sweep among them. Closing the connection then would cut that call with no answer and no record. Those
    // still unused after a whole turn of the loop, reads included, are closed.
    const candidates = [...connections].filter(unused)
    if (candidates.length === 0) return
    setImmediate(() => {
      setImmediate(() => { for (const socket of candidates) if (unused(socket)) socket.destroy() })
    })
  })
  // Node's close() closes the connections idle between calls at once, in the same race (the drain's first close):
  // they are closed as above instead.
  app.server.closeIdleConnections = () => { app.closeUnusedConnections() }
  // A connection that is not unused holds a call: under way, or its answer still being flushed.
  app.decorate('callsInFlight', () => [...connections].filter(socket => !socket.destroyed && !unused(socket)).length)
  app.decorate('abortInFlight', () => {
    // Clients first: each call is then audited as aborted (the client got no complete answer), not as an
    // upstream failure; their upstream requests stop with them, and whatever is left upstream is cut. A
    // response's 'close' (when its record is made) comes once its socket has closed, later in the event loop:
    // the upstream is cut after that (or after a second at most), or a stream's upstream error would come first
    // and its record would blame the upstream.
    const closing = [...connections].map(socket => new Promise(resolve => { socket.once('close', resolve) }))
    // A stream is told first why it ends, a POST at the upstream that it is not to be sent again (plugins/proxy.ts).
    // Node writes an answer's chunk to its socket on the next tick (it corks the socket until then): the connections
    // are closed on the next turn of the event loop.
    const closeAll = () => { app.server.closeAllConnections() }
    if (app.tellCallsInFlight()) setImmediate(closeAll)
    else closeAll()
    const cut = setTimeout(() => { void upstream.destroy() }, ABORT_CLOSE_WAIT_MS)
    void Promise.all(closing).then(() => {
      clearTimeout(cut)
      void upstream.destroy()
    })
  })
  return app
}

/**
 * The store config.store names; the rate-limit plugin closes it when the app closes. Which it is goes to the log once:
 * a replica left on memory:// by mistake looks like one on the shared Redis until its limits are found not to hold.
 * Of a Redis URL, its host, port and database alone (never its user or password; README: the URL is never logged).
 */
async function rateLimitStoreFor (store: GatewayConfig['store'], log: FastifyBaseLogger): Promise<RateLimitStore> {
  if (store.url === 'memory://') {
    log.info('rate-limit and ownership store: memory://, this process alone (replicas do not share its buckets or notes)')
    return new MemoryStore()
  }
  const connected = await RedisStore.connect({ url: store.url, timeoutMs: store.timeoutMs, onFailure: store.onFailure, keyPrefix: store.keyPrefix, log })
  const { protocol, host, pathname } = new URL(store.url)
  const db = pathname === '' || pathname === '/' ? '/0' : pathname
  log.info(withoutSecrets([`rate-limit and ownership store: Redis at ${protocol}//${host}${db}`], { store })[0])
  return connected
}

/** Upstream headers about the upstream's body (content-type and -length Fastify drops on an error itself). */
const UPSTREAM_BODY_HEADERS = ['content-encoding', 'etag', 'last-modified', 'cache-control'] as const

/** The one place any error becomes OpenAI's envelope. Unknown errors are logged and answered generically. */
function errorHandler (config: GatewayConfig) {
  return function handle (error: FastifyError, request: FastifyRequest, reply: FastifyReply) {
    const err = toGatewayError(error)
    request.refusal = err
    if (err.statusCode >= 500 && !isGatewayError(error)) {
      request.log.error({ err: error }, 'unhandled error')
    }
    // (Checked on the headers: a request without a body may not be marked complete yet when a hook refuses it.)
    if (hasBody(request.headers) && !request.raw.complete) {
      // Node reads nothing more after an Upgrade request, nor after one whose body's framing it refuses: the
      // connection cannot carry another request after it. Any other body still coming is discarded, within bounds.
      if (request.headers.upgrade !== undefined || bodyUnreadable(request.headers)) {
        reply.header('connection', 'close')
      } else {
        discardTheRestOfTheBody(request, reply, Math.min(DISCARD_BODY_MS, config.listen.requestTimeoutMs), config.listen.keepAliveTimeoutMs)
        // A client that asked before sending its body (Expect: 100-continue) and was refused will not send it
        // (unless it went ahead without waiting): the connection cannot carry another request after this one.
        if (waitsForContinue(request) && err.statusCode !== 413) reply.header('connection', 'close')
      }
    } else if (request.headers.upgrade === undefined) {
      // A body refused once read to its end (invalid JSON): Fastify asks to close the connection all the same,
      // which would lose the answer to a call pipelined behind it. Nothing is left to discard: keep it.
      undoFastifyClose(reply, config.listen.keepAliveTimeoutMs)
    }
    // An answer of the gateway's own can replace an upstream answer it would not pass on: none of the headers
    // that described that body (reply-from set them already) describes this one.
    for (const name of UPSTREAM_BODY_HEADERS) reply.removeHeader(name)
    if (err.headers) reply.headers(err.headers)
    // The SDKs read x-request-id into the error they raise (request_id, requestID): for an answer of the gateway's
    // own, that is the gateway's id, which the audit record holds. An upstream's, when it answered, stays.
    if (!reply.hasHeader('x-request-id')) reply.header('x-request-id', request.id)
    reply.code(err.statusCode).type('application/json; charset=utf-8').send(envelope(err))
  }
}

/**
 * Takes back the `Connection: close` Fastify sets on a body error, by saying what Node would have said: removing
 * the header would stop Node from writing its own, so an HTTP/1.0 client that asked for keep-alive would not be
 * told the connection stays open (and would wait for its close), nor any client that Node is closing it (a 413 to
 * a caller still waiting for its 100 Continue). Without Fastify's header there is nothing to take back.
 */
function undoFastifyClose (reply: FastifyReply, keepAliveTimeoutMs: number): void {
  if (reply.getHeader('connection') === undefined) return
  // (Node also closes a connection whose Expect: 100-continue it answers without having sent the 100: writeHead.)
  const raw = reply.raw as typeof reply.raw & { _expect_continue?: boolean, _sent100?: boolean }
  if (!raw.shouldKeepAlive || (raw._expect_continue === true && raw._sent100 !== true)) {
    reply.header('connection', 'close')
    return
  }
  reply.header('connection', 'keep-alive')
  reply.header('keep-alive', `timeout=${Math.floor(keepAliveTimeoutMs / 1000)}`)
}

/**
 * Node closes a connection whose answer ends it as soon as the answer is written, with the rest of the body unread:
 * the kernel then resets the connection, and a client still uploading (Python's urllib, PHP's streams: they say
 * Connection: close on every call and read only once the body is sent) gets a broken pipe instead of its answer.
 * Here the answer is followed by the end of the gateway's side, the body still coming is read (and thrown away by
 * discardTheRestOfTheBody, which cuts off a client past its bounds), and the socket is closed once it is whole.
 * Node's parser refuses anything after a request that asked to close, so no further call starts on it.
 */
function closeOnceTheBodyIsRead (raw: IncomingMessage): void {
  const socket = raw.socket
  const destroySoon = socket.destroySoon
  socket.destroySoon = function (this: Socket) {
    socket.destroySoon = destroySoon
    if (raw.complete) {
      destroySoon.call(this)
      return
    }
    lingering.add(this)
    this.end()
    raw.once('end', () => { this.destroy() })
  }
}

/**
 * Connections whose answer closed them, still reading the rest of a body (closeOnceTheBodyIsRead). A request that
 * did not ask to close (a refused Expect: 100-continue) leaves Node's parser reading calls after its body: one read
 * there is over before it starts, like a call pipelined behind an answer that closes its connection.
 */
const lingering = new WeakSet<Socket>()

function toGatewayError (error: FastifyError): GatewayError {
  if (isGatewayError(error)) return error
  const status = error.statusCode ?? 500
  if (status >= 400 && status < 500) return new InvalidRequestError('malformed request.')
  return new InternalError()
}

/**
 * Fastify asks to close the connection on a body error, but closing while the client still uploads makes it see a
 * reset instead of the answer. Keep the connection, let Node discard the rest of the body, and cut off a client
 * that is still sending after `withinMs` or DISCARD_BODY_BYTES, whichever comes first (a client dribbling a
 * body after a 401 would otherwise hold its socket for as long as it likes).
 */
function discardTheRestOfTheBody (request: FastifyRequest, reply: FastifyReply, withinMs: number, keepAliveTimeoutMs: number) {
  undoFastifyClose(reply, keepAliveTimeoutMs)
  const raw = request.raw
  // When the connection closes after this answer (the client asked for it: Connection: close, HTTP/1.0; or it
  // waited, or should have, for a 100 Continue it never got), it closes only once the body is read, within the
  // same bounds. (Nothing happens here when Node keeps the connection.)
  if (!reply.raw.shouldKeepAlive || waitsForContinue(request)) closeOnceTheBodyIsRead(raw)
  // Read (and counted) from the refusal on, not from its answer's end: Node drops the body of a request no one read
  // once its answer is written, unseen (IncomingMessage._dump: no 'data' after it), which no count could bound.
  let discarded = 0
  let cutOff: (() => void) | null = null
  const count = (chunk: Buffer) => {
    discarded += chunk.length
    if (discarded > DISCARD_BODY_BYTES) cutOff?.()
  }
  raw.on('data', count)
  raw.once('end', () => { raw.off('data', count) })
  reply.raw.once('finish', () => {
    if (raw.complete) return
    const socket = raw.socket
    if (socket !== null) discarding.set(socket, raw)
    cutOff = () => { socket?.destroy() }
    if (discarded > DISCARD_BODY_BYTES) {
      cutOff()
      return
    }
    const timer = setTimeout(cutOff, withinMs).unref()
    raw.once('end', () => { clearTimeout(timer) })
    raw.once('close', () => { clearTimeout(timer) })
  })
}
