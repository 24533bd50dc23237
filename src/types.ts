// Request fields the plugins declare and share. Each field has one owner (named below); the others only read it.
import type { AddressInfo } from 'node:net'
import type { ClientConfig, GatewayConfig } from './config.js'
import type { GatewayError } from './errors.js'
import type { Operation } from './operations.js'
import type { ResponseFacts } from './responses/usage.js'
import type { AuditObserver, ResponseWatch } from './plugins/audit.js'
import type { AnswerReader } from './plugins/proxy.js'
import type { HealthDetails } from './plugins/health.js'
import type { ConfigChange } from './reload.js'
import type { RateLimitResult } from './stores/rate-limit-store.js'

export interface UpstreamFacts {
  status: number
  ms: number
  requestId: string | null
}

/** An upstream call as it goes: set before its first attempt, updated by each. */
export interface UpstreamProgress {
  /** the line that answered (its index in upstream.baseUrls as the call found it); null until one did */
  line: number | null
  /** that line's host (and port): what names it across a reload that changes upstream.baseUrls */
  host: string | null
  attempts: number
  /** the current attempt's request got a connection and went out: without an answer, the upstream may have it */
  sent: boolean
}

declare module 'fastify' {
  interface FastifyRequest {
    /** plugins/router.ts: which of the eight operations this is; null for /healthz and unmatched paths */
    operation: Operation | null
    /** plugins/auth.ts: the client the key belongs to, once the key is checked */
    client: ClientConfig | null
    /** plugins/auth.ts: which of the client's keys it was (null for the single-key form) */
    keyId: string | null
    /**
     * plugins/auth.ts: an expired key's client and key id, for the audit record alone; the call is refused as if
     * the key were unknown, and `client` stays null
     */
    expiredKey: { clientId: string, keyId: string | null } | null
    /** plugins/rate-limit.ts: the token taken for this call */
    rateLimit: RateLimitResult | null
    /** plugins/body.ts: size of the request body read and accepted */
    bodyBytes: number
    /**
     * plugins/body.ts: the JSON body as parsed (undefined when there was none); numbers a JavaScript number cannot
     * hold exactly are LosslessNumbers (http/json.ts), so that serializeBody writes them back as they came
     */
    parsedBody: unknown
    /** plugins/body.ts, replaced by plugins/ownership.ts when it adds the owner: the bytes sent upstream */
    upstreamBody: Buffer | null
    /** plugins/ownership.ts: the id of what a create call made, read from its answer */
    createdId: string | null
    /** plugins/ownership.ts: the owner of the conversation this call is on; null when unknown or unowned */
    ownerId: string | null
    /**
     * plugins/ownership.ts: an item the call's body named by id and was refused (item_not_found,
     * item_reference_not_allowed), for the audit record's itemId; null otherwise
     */
    refusedItemId: string | null
    /** plugins/proxy.ts (addAnswerRewrite): how a 2xx JSON answer is rewritten before the client sees it */
    rewriteAnswer: ((body: unknown) => unknown) | null
    /** plugins/proxy.ts (addEventRewrite): the same for each event of a 2xx event stream */
    rewriteEvent: ((data: unknown) => unknown) | null
    /** plugins/proxy.ts (observeAnswer): what reads a 2xx JSON answer passed on unchanged, once it is whole */
    observeAnswer: AnswerReader[] | null
    /** plugins/responses.ts: model, stream, response id and tokens of a Responses call (null on other routes) */
    responseFacts: ResponseFacts | null
    /** plugins/rate-limit.ts: the client's token budget as it stood before this call (response.create only) */
    tokenBudget: RateLimitResult | null
    /** plugins/proxy.ts: what the upstream answered, when it did */
    upstream: UpstreamFacts | null
    /** plugins/proxy.ts: the line that answered (null if none did), how many attempts the call took, whether it was sent */
    upstreamCall: UpstreamProgress | null
    /** app.ts error handler: the gateway's own error this call was answered with */
    refusal: GatewayError | null
    /** plugins/audit.ts: when the call came and how its answer went, for its record (null for unaudited routes) */
    auditWatch: ResponseWatch | null
  }
  interface FastifyInstance {
    /** plugins/audit.ts: 'unavailable' from a failed audit write until one succeeds again (for /healthz, /readyz) */
    auditState (): 'ok' | 'unavailable'
    /** plugins/audit.ts: true while API calls are refused with 503 audit_unavailable (onFailure "closed") */
    auditRefuses (): boolean
    /** plugins/audit.ts: audit records lost since the start (not written in time, or still waiting at close) */
    auditLost (): number
    /** plugins/audit.ts: reopen the audit file (SIGUSR2, after an outside logrotate) */
    auditReopen (): void
    /** plugins/audit.ts: be told of each audit record as it is written (metrics) */
    onAuditRecord (observer: AuditObserver): void
    /** plugins/metrics.ts, with metrics.listen: where the metrics listener listens (null before it does) */
    metricsAddress (): AddressInfo | null
    /** app.ts: the config in force (what a reload applied, with the restart-only sections as started) */
    currentConfig (): GatewayConfig
    /** app.ts: apply a reloaded config to the running gateway; in-flight calls are not disturbed */
    applyConfig (next: GatewayConfig): ConfigChange
    /** app.ts: a reload was refused (the running config stays in force), until one is applied */
    reloadRefused (): void
    /** app.ts: shutdown, once accepting has stopped: close the connections with no call under way */
    closeUnusedConnections (): void
    /** app.ts: the client connections with a call under way (or an answer still being sent) */
    callsInFlight (): number
    /** app.ts: end of a shutdown's grace: close every client connection and abort every upstream call */
    abortInFlight (): void
    /** plugins/proxy.ts: end of a shutdown's grace: end each event stream being passed on with an error event, and
     * answer each POST at the upstream whose answer has not begun (503 gateway_shutting_down); says whether there was one */
    tellCallsInFlight (): boolean
    /** plugins/health.ts: a shutdown has begun; /readyz answers 503 draining from now on */
    startDraining (): void
    /** plugins/health.ts: /healthz's body with its details (the audit, the store, each upstream line), for operators */
    healthDetails (): HealthDetails
  }
  interface FastifyContextConfig {
    /** routes outside the API (health): no key, no audit */
    internal?: boolean
  }
}
