// GET /metrics in Prometheus text format (prom-client), off unless configured: on its own `metrics.listen`
// host:port, or on the main port behind `metrics.token` (never open on the main port without one). The token
// is compared in constant time, as sha256 digests of equal length.
//
// Per-call counters are derived from each audit record as it is written (the audit plugin's observer), so they
// count exactly what the trail holds, and every label value comes from a bounded set: client ids from the
// config (as reloaded), the fixed action list, the HTTP status (100-599), the outcome words the gateway itself writes.
// Whatever a client sends cannot create a new series.
import { createHash, timingSafeEqual } from 'node:crypto'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import fp from 'fastify-plugin'
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { AuditWriter } from '../audit/writer.js'
import { envelope, type GatewayError, MethodNotAllowedError, MetricsUnauthorizedError, MetricsUnknownRouteError } from '../errors.js'
import { listenAddress } from '../http/address.js'
import { timeoutCheckIntervalMs } from '../http/connections.js'
import { whenClosed } from '../http/response.js'
import { hostPort } from '../config.js'
import { keepAccepting } from '../logging.js'
import { describeListenError, StartupError } from '../preflight.js'
import { ACTIONS } from '../operations.js'
import type { AuditRecord } from './audit.js'
import type { HealthDetails } from './health.js'

export interface MetricsOptions {
  /** "host:port" of a listener of its own; unset: served on the main port (token required) */
  listen?: string
  /** bearer token /metrics asks for */
  token?: string
  /** whether a record's client id is a configured client (else it is counted as `other`) */
  isClient: (id: string) => boolean
  /** false from a refused config reload until one is applied */
  lastReloadApplied: () => boolean
  /** calls the upstream answered 401 to: it refused the gateway's own token */
  tokenRefusals: () => number
  writer: Pick<AuditWriter, 'available' | 'stats'>
  /** listen.headersTimeoutMs: a connection to `listen` must bring its request within it, as on the API listener */
  headersTimeoutMs: number
}

/** Metrics are served when either key is set: a listener of their own, or a token for the main port. */
export function metricsEnabled (config: { listen?: string, token?: string }): boolean {
  return config.listen !== undefined || config.token !== undefined
}

/**
 * Connections the metrics listener keeps at most (Prometheus keeps one per target: a few scrapers need a handful);
 * past it, a new one is refused. Each must bring its request within listen.headersTimeoutMs. Without these bounds,
 * connections opened to this port and left silent would each hold one of the process's file descriptors for Node's
 * default 60 s, and enough of them would leave none for the API listener to accept a call with, or for the audit
 * to open its next file.
 */
export const METRICS_MAX_CONNECTIONS = 64

// Up to upstream.generationTimeoutMs's default: a generation's headers may come only when the model is done, minutes on.
const UPSTREAM_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
const GATEWAY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5]

function digest (value: string): Buffer {
  return createHash('sha256').update(value).digest()
}

/** Whether an Authorization header carries the token (any, without one); the same work whatever is presented. */
export function tokenCheck (token: string | undefined): (header: string | undefined) => boolean {
  if (token === undefined) return () => true
  const want = digest(token)
  return (header) => {
    const presented = /^Bearer +(\S+) *$/i.exec(header ?? '')?.[1] ?? ''
    return timingSafeEqual(digest(presented), want)
  }
}

function gatewayMetrics (opts: MetricsOptions, health: () => HealthDetails) {
  const register = new Registry()
  collectDefaultMetrics({ register })
  const requests = new Counter({
    name: 'gateway_requests_total',
    help: 'API calls, by client, action, HTTP status and audit outcome (one per audit record)',
    labelNames: ['client', 'action', 'status', 'outcome'],
    registers: [register]
  })
  const rateLimited = new Counter({
    name: 'gateway_rate_limited_total', help: 'calls refused with 429 by the client\'s rate limit or token budget', labelNames: ['client'], registers: [register]
  })
  const denied = new Counter({
    name: 'gateway_denied_total',
    help: 'calls refused for who is calling (audit outcome denied): key (401), scope, model or container (403), another team\'s object (404), an output item handed to another team (400, 404), failed keys (429)',
    labelNames: ['client'],
    registers: [register]
  })
  const upstream = new Histogram({
    name: 'gateway_upstream_duration_seconds',
    help: 'from sending a call upstream to the upstream\'s response headers',
    labelNames: ['action'],
    buckets: UPSTREAM_BUCKETS,
    registers: [register]
  })
  const added = new Histogram({
    name: 'gateway_added_duration_seconds',
    help: 'a call\'s time in the gateway: its whole duration less the upstream\'s time to headers (all of it when refused); streamed answers from the upstream are not observed',
    labelNames: ['action'],
    buckets: GATEWAY_BUCKETS,
    registers: [register]
  })
  const inFlight = new Gauge({ name: 'gateway_in_flight_requests', help: 'API calls being served', registers: [register] })
  const { writer } = opts
  /** A counter kept elsewhere, read at each scrape. */
  const counted = (name: string, help: string, count: () => number) => new Counter({
    name,
    help,
    registers: [register],
    collect () {
      this.reset()
      this.inc(count())
    }
  })
  counted('gateway_audit_records_written_total', 'audit records written', () => writer.stats().written)
  counted('gateway_audit_write_failures_total', 'audit write attempts that failed (each retry counts)', () => writer.stats().failed)
  counted('gateway_audit_records_lost_total', 'audit records lost: not written in time (buffer full) or at close', () => writer.stats().lost)
  // The log says it once per 10 s (upstream/refused-token.ts); this counts every refusal since start, across
  // reloads: a token refused even briefly is worth an alert.
  counted('gateway_upstream_token_refused_total',
    'calls the upstream answered with 401: it refused the gateway\'s own token (upstream.apiKey), revoked or mistyped',
    opts.tokenRefusals)
  // eslint-disable-next-line no-new
  new Gauge({
    name: 'gateway_audit_available',
    help: '1 while audit records are being written, 0 from a failed write until one succeeds',
    registers: [register],
    collect () { this.set(writer.available ? 1 : 0) }
  })
  // The rest of /healthz's details, read at each scrape (plugins/health.ts): one series per configured line.
  // eslint-disable-next-line no-new
  new Gauge({
    name: 'gateway_upstream_line_up',
    help: '1 while an upstream line is in use, 0 while it is skipped (down, or on its trial call)',
    labelNames: ['line'],
    registers: [register],
    collect () {
      this.reset()
      for (const line of health().upstream) this.set({ line: String(line.line) }, line.state === 'up' ? 1 : 0)
    }
  })
  // eslint-disable-next-line no-new
  new Gauge({
    name: 'gateway_store_available',
    help: '1 while the rate-limit store answers (always, in memory), 0 while Redis is disconnected or refuses the bucket script',
    registers: [register],
    collect () { this.set(health().store === 'ok' ? 1 : 0) }
  })

  // eslint-disable-next-line no-new
  new Gauge({
    name: 'gateway_config_last_reload_successful',
    help: '1 while the config file as last reloaded is in force (or none was reloaded), 0 from a refused reload until one is applied',
    registers: [register],
    collect () { this.set(opts.lastReloadApplied() ? 1 : 0) }
  })

  const actions = new Set<string>(ACTIONS)
  const clientLabel = (id: string | null) => id === null ? 'none' : opts.isClient(id) ? id : 'other'
  const observe = (r: AuditRecord) => {
    const client = clientLabel(r.clientId)
    const action = actions.has(r.action) ? r.action : 'unknown'
    const status = Number.isInteger(r.status) && r.status >= 100 && r.status <= 599 ? String(r.status) : 'other'
    const outcome = /^[a-z_]{1,32}$/.test(r.outcome) ? r.outcome : 'other'
    requests.inc({ client, action, status, outcome })
    if (outcome === 'rate_limited') rateLimited.inc({ client })
    if (outcome === 'denied') denied.inc({ client })
    if (typeof r.upstreamMs === 'number') upstream.observe({ action }, r.upstreamMs / 1000)
    // A call sent upstream that got no answer (a timeout, a reset) spent its time there, in a share not known: it
    // says nothing of the gateway's own latency, and counted whole it would read as a gateway slowdown. So does a call
    // refused once its ownership lookup had answered (a 404, a later check's 403: the lookup's attempts recorded,
    // its time at the upstream not), and a streamed answer: after its headers the model is still generating, for
    // seconds or minutes.
    const unanswered = r.upstreamMs === null && r.attempts > 0
    const streamed = r.stream === true && r.upstreamMs !== null
    if (typeof r.durationMs === 'number' && !unanswered && !streamed) {
      added.observe({ action }, Math.max(0, r.durationMs - (r.upstreamMs ?? 0)) / 1000)
    }
  }
  return { register, inFlight, observe }
}

export default fp<MetricsOptions>(async function metrics (app, opts) {
  // (the health plugin is registered after this one: its details are read at each scrape)
  const { register, inFlight, observe } = gatewayMetrics(opts, () => app.healthDetails())
  const authorized = tokenCheck(opts.token)
  app.onAuditRecord(observe)

  app.addHook('onRequest', (request, reply, done) => {
    if (request.routeOptions.config.internal !== true) {
      inFlight.inc()
      whenClosed(reply.raw, () => { inFlight.dec() })
    }
    done()
  })

  let server: Server | null = null
  app.decorate('metricsAddress', () => server?.address() as AddressInfo | null ?? null)

  if (opts.listen === undefined) {
    app.route({
      method: ['GET', 'HEAD'], // HEAD: the same answer without a body, as for /healthz
      url: '/metrics',
      config: { internal: true },
      logLevel: 'warn',
      handler: async (request, reply) => {
        if (!authorized(request.headers.authorization)) throw new MetricsUnauthorizedError()
        return reply.type(register.contentType).send(await register.metrics())
      }
    })
    return
  }

  // Its errors in OpenAI's envelope, as every error the gateway makes (its own listener has no error handler).
  const refuse = (res: ServerResponse, err: GatewayError, headers: Record<string, string> = {}) => {
    res.writeHead(err.statusCode, { 'content-type': 'application/json; charset=utf-8', ...headers }).end(JSON.stringify(envelope(err)))
  }
  const answer = (req: IncomingMessage, res: ServerResponse) => {
    const path = (req.url ?? '').split('?')[0]
    // HEAD as GET, which Node answers without the body
    if (path !== '/metrics' && path !== '/healthz') {
      refuse(res, new MetricsUnknownRouteError())
      return
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      refuse(res, new MethodNotAllowedError(req.method, path), { allow: 'GET, HEAD' })
      return
    }
    if (!authorized(req.headers.authorization)) {
      refuse(res, new MetricsUnauthorizedError())
      return
    }
    if (path === '/healthz') {
      // /healthz's details (plugins/health.ts), which the API port shows only to the token
      res.writeHead(200, { 'content-type': 'application/json; charset=utf-8' }).end(JSON.stringify(app.healthDetails()))
      return
    }
    register.metrics().then(text => { res.writeHead(200, { 'content-type': register.contentType }).end(text) },
      () => { res.writeHead(500).end() })
  }
  const { host, port } = hostPort(opts.listen)
  // onReady, so that a port already taken stops the start like the main port would.
  app.addHook('onReady', async () => {
    const { headersTimeoutMs } = opts
    server = createServer({
      headersTimeout: headersTimeoutMs,
      requestTimeout: headersTimeoutMs, // a scrape has no body: its request is its headers
      connectionsCheckingInterval: timeoutCheckIntervalMs(headersTimeoutMs)
    }, answer)
    server.maxConnections = METRICS_MAX_CONNECTIONS
    const address = await listenAddress(host)
    await new Promise<void>((resolve, reject) => {
      // Named as the metrics listener's: the main listener's error would send the operator to the wrong port.
      const refused = (err: NodeJS.ErrnoException) => { reject(new StartupError(`metrics.listen: ${describeListenError(host, port, err)}`)) }
      server!.once('error', refused)
      try {
        server!.listen(port, address, () => { server!.off('error', refused); resolve() })
      } catch (err) {
        refused(err as NodeJS.ErrnoException) // a bad port is thrown, not emitted
      }
    })
    keepAccepting(server, app.log, 'metrics.listen')
    const at = server.address() as AddressInfo
    app.log.info({ address: `${at.address}:${at.port}` }, 'metrics listening')
  })
  // Runs once the main listener has closed and its calls are done (Fastify closes it first). Nothing on this
  // listener is worth waiting for: server.close() alone would wait on a connection that never sent a request (a
  // port scan, a TCP check, a scraper connecting ahead) until Node's timeouts, past the shutdown's grace.
  app.addHook('onClose', async () => {
    if (server === null) return
    const closed = new Promise(resolve => server!.close(resolve))
    server.closeAllConnections()
    await closed
  })
}, { name: 'metrics', dependencies: ['audit'] })
