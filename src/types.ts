// Request fields the plugins declare and share. Each field has one owner (named below); the others only read it.
import type { ClientConfig } from './config.js'
import type { GatewayError } from './errors.js'
import type { Operation } from './operations.js'
import type { RateLimitResult } from './stores/rate-limit-store.js'

export interface UpstreamFacts {
  status: number
  ms: number
  requestId: string | null
}

declare module 'fastify' {
  interface FastifyRequest {
    /** plugins/router.ts: which of the eight operations this is; null for /healthz and unmatched paths */
    operation: Operation | null
    /** plugins/auth.ts: the client the key belongs to, once the key is checked */
    client: ClientConfig | null
    /** plugins/rate-limit.ts: the token taken for this call */
    rateLimit: RateLimitResult | null
    /** plugins/body.ts: size of the request body read and accepted */
    bodyBytes: number
    /** plugins/proxy.ts: what the upstream answered, when it did */
    upstream: UpstreamFacts | null
    /** app.ts error handler: the gateway's own error this call was answered with */
    refusal: GatewayError | null
  }
  interface FastifyContextConfig {
    /** routes outside the API (health): no key, no audit */
    internal?: boolean
  }
}
