// Every error the gateway itself answers with. Each has an HTTP status, the OpenAI error `type` and a stable
// `code`; the error handler in app.ts is the one place that turns any error into OpenAI's envelope.
// The README's error table mirrors this list.
import createError from '@fastify/error'
import { withoutKeys } from './keys.js'

export interface GatewayError extends Error {
  statusCode: number
  code: string
  type: string
  param: string | null
  /** what the audit record says of a call answered with this error */
  outcome: ErrorOutcome
  /** (a header the upstream wrote twice, passed on with its answer's retry hints, as its lines) */
  headers?: Record<string, string | string[]>
}

type ErrorType = 'invalid_request_error' | 'permission_error' | 'requests' | 'tokens' | 'server_error'

/** The audit outcomes a gateway-made answer can have (plugins/audit.ts adds those of proxied and aborted calls). */
export type ErrorOutcome = 'invalid' | 'denied' | 'rate_limited' | 'upstream_rate_limited' | 'upstream_error' | 'unavailable' | 'error'

function outcomeOf (status: number, type: ErrorType): ErrorOutcome {
  if (status === 401 || status === 403) return 'denied'
  if (status === 429) return 'rate_limited'
  if (status === 502 || status === 504) return 'upstream_error'
  if (status === 503) return 'unavailable'
  if (type === 'server_error') return 'error'
  return 'invalid'
}

interface Options {
  /** the parameter OpenAI names for this error */
  param?: string
  outcome?: ErrorOutcome
  /** headers every answer with this error carries */
  headers?: Record<string, string>
}

function define (code: string, status: number, type: ErrorType, message: string, options: Options = {}) {
  const Base = createError(code, message, status)
  const outcome = options.outcome ?? outcomeOf(status, type)
  return class extends Base {
    readonly type = type
    readonly outcome = outcome
    param: string | null = options.param ?? null
    headers?: Record<string, string | string[]> = options.headers === undefined ? undefined : { ...options.headers }
    constructor (...args: unknown[]) {
      super(...args)
      this.code = code // @fastify/error upper-cases codes; OpenAI's are lower snake case
      // @fastify/error names the class after the code; keep the name stable for logs.
      this.name = 'GatewayError'
    }
  }
}

export const InvalidIdError = define('invalid_id', 400, 'invalid_request_error',
  'Invalid %s: it must match ^[A-Za-z0-9_-]{1,200}$.')
export const InvalidJsonError = define('invalid_json', 400, 'invalid_request_error',
  'The request body is not valid JSON.')
export const JsonWithBomError = define('invalid_json', 400, 'invalid_request_error',
  'The request body begins with a byte order mark (U+FEFF), which JSON sent over a network may not have (RFC 8259 §8.1): send it without one.')
export const NotUtf8Error = define('invalid_json', 400, 'invalid_request_error',
  'The request body is not UTF-8: send JSON encoded as UTF-8, whatever charset the Content-Type names.')
export const JsonTooDeepError = define('invalid_json', 400, 'invalid_request_error',
  'The request body nests arrays and objects more than %s levels deep.')
export const InvalidRequestError = define('invalid_request', 400, 'invalid_request_error',
  'The request could not be understood: %s')
export const UnknownParameterError = define('unknown_parameter', 400, 'invalid_request_error',
  "Unknown parameter: '%s'.")
// (its argument: gateway_owner, the key the gateway keeps the owner in, or __proto__, which a reader in JavaScript
// copying the metadata by assignment takes for its prototype: plugins/ownership.ts)
export const ReservedMetadataKeyError = define('reserved_metadata_key', 400, 'invalid_request_error',
  'The metadata key "%s" is reserved by the gateway.', { param: 'metadata' })
export const MetadataLimitError = define('metadata_limit', 400, 'invalid_request_error',
  'Metadata can have at most 15 keys through this gateway (OpenAI allows 16; the gateway keeps one).', { param: 'metadata' })
export const InvalidMetadataError = define('invalid_metadata', 400, 'invalid_request_error',
  'The request body must be a JSON object and its metadata an object of strings (keys of at most 64 characters, values of at most 512).', { param: 'metadata' })
export const UpgradeNotSupportedError = define('upgrade_not_supported', 400, 'invalid_request_error',
  'Protocol upgrades (WebSocket) are not supported by this gateway.')
export const CredentialsInQueryError = define('credentials_in_query', 400, 'invalid_request_error',
  'The query string holds a credential (%s). This gateway takes its key only as "Authorization: Bearer <key>", and passes no credential upstream.')
export const CredentialsInUrlError = define('credentials_in_url', 400, 'invalid_request_error',
  'The URL holds a gateway key. This gateway takes its key only as "Authorization: Bearer <key>", and passes no credential upstream: check the id passed where the key went.')
export const CredentialsInBodyError = define('credentials_in_body', 400, 'invalid_request_error',
  'The request body holds a gateway key where an id or the model goes. This gateway takes its key only as "Authorization: Bearer <key>", and passes no credential upstream: check the value passed where the key went.')
export const MissingHostError = define('missing_host', 400, 'invalid_request_error',
  'The request has no Host header, which HTTP/1.1 requires.')
export const InvalidHostError = define('invalid_host', 400, 'invalid_request_error',
  'The request has more than one Host header, or one that is not a host with an optional port.')
export const InvalidApiKeyError = define('invalid_api_key', 401, 'invalid_request_error',
  'Incorrect or missing API key. Send your gateway key as "Authorization: Bearer <key>".')
export const InvalidModelTypeError = define('invalid_type', 400, 'invalid_request_error',
  "Invalid type for 'model': expected a string.", { param: 'model' })
// OpenAI's `stream` is a boolean or null; an upstream that reads loosely would take "true" or 1 for true.
export const InvalidStreamTypeError = define('invalid_type', 400, 'invalid_request_error',
  "Invalid type for 'stream': expected a boolean.", { param: 'stream' })
// (its arguments: the parameter, and what OpenAI takes there)
export const InvalidListTypeError = define('invalid_type', 400, 'invalid_request_error',
  "Invalid type for '%s': expected %s.")
export const ModelRequiredError = define('model_not_allowed', 403, 'invalid_request_error',
  'This key may only use some models: name one in "model" (a stored prompt\'s own model cannot be checked).',
  { param: 'model', outcome: 'denied' })
export const BackgroundNotAllowedError = define('background_not_allowed', 403, 'invalid_request_error',
  'Background responses are not available to a key with a token budget: their usage could not be charged.',
  { param: 'background', outcome: 'denied' })
export const ContainerNotAllowedError = define('container_not_allowed', 403, 'invalid_request_error',
  'A container named by id (a code interpreter\'s, or a shell tool\'s container_reference) is not available to this key: containers are not owned by a team, so it could be another team\'s, with its files. Use "container": {"type": "auto"} (an active container in the response\'s context is reused), or "environment": {"type": "container_auto"}.',
  { outcome: 'denied' })
export const ItemContainerNotAllowedError = define('container_not_allowed', 403, 'invalid_request_error',
  'An item names a container (a code interpreter call\'s container_id, or a shell call\'s container_reference) that the gateway did not hand to this key in an output item of its own responses: containers are not owned by a team, so it could be another team\'s, with its files. Pass back the items your responses gave you as they came.',
  { outcome: 'denied' })
export const ModelNotAllowedError = define('model_not_allowed', 403, 'invalid_request_error',
  'The model %s is not allowed for this key.', { param: 'model', outcome: 'denied' })
export const InsufficientScopeError = define('insufficient_scope', 403, 'permission_error',
  'This key lacks the "%s" scope required for %s.')
export const UnknownRouteError = define('unknown_route', 404, 'invalid_request_error',
  'Unknown route: %s %s. This gateway serves only the /v1/conversations and /v1/responses routes.')
// Another client's conversation and one that does not exist get the same answer, byte for byte: only the audit
// tells them apart.
export const ConversationNotFoundError = define('conversation_not_found', 404, 'invalid_request_error',
  "Conversation with id '%s' not found.", { param: 'conversation_id' })
export const ConversationNotOwnedError = define('conversation_not_found', 404, 'invalid_request_error',
  "Conversation with id '%s' not found.", { param: 'conversation_id', outcome: 'denied' })
// An item named by id that the gateway handed to another client is refused as one it knows nothing of: only the
// audit tells them apart.
const ITEM_NOT_FOUND = 'No item with id \'%s\' was found in this conversation.'
export const ItemNotFoundError = define('item_not_found', 404, 'invalid_request_error', ITEM_NOT_FOUND)
export const ItemNotOwnedError = define('item_not_found', 404, 'invalid_request_error', ITEM_NOT_FOUND, { outcome: 'denied' })
const ITEM_REFERENCE_NOT_ALLOWED = 'Items can be named by id (item_reference) only in a call on a conversation of yours (a response created with `conversation`, or items added to one); give the item itself instead.'
export const ItemReferenceOutsideConversationError = define('item_reference_not_allowed', 400, 'invalid_request_error', ITEM_REFERENCE_NOT_ALLOWED)
export const ItemReferenceNotOwnedError = define('item_reference_not_allowed', 400, 'invalid_request_error', ITEM_REFERENCE_NOT_ALLOWED,
  { outcome: 'denied' })
export const TooManyItemReferencesError = define('item_reference_not_allowed', 400, 'invalid_request_error',
  'Too many items named by id (item_reference) in %s: at most %s per call.')
export const ResponseNotFoundError = define('response_not_found', 404, 'invalid_request_error',
  "Response with id '%s' not found.", { param: 'response_id' })
export const ResponseNotOwnedError = define('response_not_found', 404, 'invalid_request_error',
  "Response with id '%s' not found.", { param: 'response_id', outcome: 'denied' })
// 400, not 404: OpenAI answers a previous_response_id it cannot find so (the SDKs' BadRequestError), and clients that
// start again with the whole context on it (its conversation-state guide) tell it by that status and code.
export const PreviousResponseNotFoundError = define('previous_response_not_found', 400, 'invalid_request_error',
  "Previous response with id '%s' not found.", { param: 'previous_response_id' })
export const PreviousResponseNotOwnedError = define('previous_response_not_found', 400, 'invalid_request_error',
  "Previous response with id '%s' not found.", { param: 'previous_response_id', outcome: 'denied' })
export const MethodNotAllowedError = define('method_not_allowed', 405, 'invalid_request_error',
  'Method %s is not allowed on %s.')
export const RequestTooLargeError = define('request_too_large', 413, 'invalid_request_error',
  'The request body is larger than the %s bytes this gateway accepts.')
export const UnsupportedMediaTypeError = define('unsupported_media_type', 415, 'invalid_request_error',
  'Unsupported Content-Type %s: send application/json.')
export const UnsupportedContentEncodingError = define('unsupported_media_type', 415, 'invalid_request_error',
  'Content-Encoding %s is not supported: send the JSON body uncompressed.')
export const ExpectationFailedError = define('expectation_failed', 417, 'invalid_request_error',
  'Expect: %s is not supported; only Expect: 100-continue is.')
export const UnsupportedTransferEncodingError = define('unsupported_transfer_encoding', 501, 'invalid_request_error',
  'Transfer-Encoding %s is not supported: send the body with Content-Length or Transfer-Encoding: chunked.')
export const RequestTimeoutError = define('request_timeout', 408, 'invalid_request_error',
  'The request was not received in time.')
export const HeadersTooLargeError = define('request_header_too_large', 431, 'invalid_request_error',
  'The request headers are too large.')
export const TokensRateLimitError = define('rate_limit_exceeded', 429, 'tokens',
  'Rate limit reached for client %s on tokens per min (TPM): Limit %s. Please try again in %s.')
export const TooManyAuthFailuresError = define('too_many_auth_failures', 429, 'requests',
  'Too many requests with an invalid API key from this address. Please try again in %s.', { outcome: 'denied' })
export const OverloadedError = define('overloaded', 503, 'server_error',
  'The gateway is at its limit of concurrent calls%s. Please try again shortly.')
export const RateLimitExceededError = define('rate_limit_exceeded', 429, 'requests',
  'Rate limit reached for client %s. Please try again in %s.')
export const UpstreamRateLimitedError = define('rate_limit_exceeded', 429, 'requests',
  'The upstream account\'s rate limit was reached. Please try again in the time retry-after says.', { outcome: 'upstream_rate_limited' })
export const UpstreamUnavailableError = define('upstream_unavailable', 502, 'server_error',
  'The upstream API could not be reached. Please try again later.')
// x-should-retry: false, as the SDKs retry every 5xx: a retry meets the same token, refused the same way.
export const UpstreamAuthError = define('upstream_auth_failed', 502, 'server_error',
  'The upstream API refused the gateway\'s own credentials; your key is fine. The gateway\'s operators are told.',
  { headers: { 'x-should-retry': 'false' } })
// A stream asked for (a generation's, a background one's, a retrieve's) that the upstream answered whole (a relay that
// ignores `stream: true`): the SDKs would read no event from it and end the client's loop quietly, as if nothing had
// been said. A generation is made and charged already: not to be sent again.
// (Its argument: NOT_STREAMED_RESPONSE with the id of the response a create's answer holds, NOT_STREAMED_RETRIEVED
// with that of the one a retrieve's holds, or NOT_STREAMED_OTHER for JSON that holds none.)
export const UpstreamNotStreamedError = define('upstream_not_streamed', 502, 'server_error',
  'The upstream answered this streamed request whole, as JSON, not as an event stream: %s',
  { headers: { 'x-should-retry': 'false' } })
export const NOT_STREAMED_RESPONSE = (id: string) => `the response (${id}) was generated. Retrieve it, or send the request without stream.`
export const NOT_STREAMED_RETRIEVED = (id: string) => `it held the response (${id}). Retrieve it without stream.`
export const NOT_STREAMED_OTHER = 'it held no response (an error of the upstream\'s own?). Send the request without stream to see its answer.'
// The end of a shutdown's grace came while a POST sent upstream (a generation, items added) was still waiting for its
// answer: cut with its connection, it would be a connection error to the SDKs, which send it again (to another
// replica), and the upstream would do it twice. Answered instead (plugins/proxy.ts, with x-should-retry: false).
export const GatewayShuttingDownError = define('gateway_shutting_down', 503, 'server_error',
  'The gateway is shutting down and its grace for calls in flight is over: this call went upstream and may have been done there, but its answer did not come in time.')
// An owner lookup's 4xx that the call itself would have been answered with (a 402 of the shared balance spent, a 403
// of a region refused): its status, type, code and message are the upstream's (plugins/ownership.ts sets them).
export const UpstreamRefusedError = define('upstream_refused', 403, 'invalid_request_error', '%s', { outcome: 'upstream_error' })
export const UpstreamTimeoutError = define('upstream_timeout', 504, 'server_error',
  'The upstream API did not answer in time.')
const STORE_UNAVAILABLE = 'The rate-limit store is unavailable, so this call cannot be admitted. Please try again shortly.'
// The SDKs' own backoff (about 0.5 s, then 1 s) gives up before a Redis stall of 2-3 s is over (a failover's pause, a
// restart); the gateway finds Redis again within about a second of its return (stores/redis.ts). Two waits of 2 s
// outlast such a stall. Safe to send again: the call never reached the upstream.
const STORE_RETRY = { headers: { 'retry-after': '2' } }
export const RateLimitStoreUnavailableError = define('rate_limit_store_unavailable', 503, 'server_error', STORE_UNAVAILABLE, STORE_RETRY)
// A call naming another team's item while Redis cannot say whose the items it names are gets the answer one naming an
// unknown item gets then: only the audit tells them apart (plugins/ownership.ts).
export const StoreUnavailableNotOwnedError = define('rate_limit_store_unavailable', 503, 'server_error', STORE_UNAVAILABLE,
  { ...STORE_RETRY, outcome: 'denied' })
export const AuditUnavailableError = define('audit_unavailable', 503, 'server_error',
  'The gateway cannot write its audit trail right now, so it serves no API calls. Please try again later.')
// metrics.listen's own listener: the API's unknown_route message would point a scraper at /v1/conversations.
export const MetricsUnknownRouteError = define('unknown_route', 404, 'invalid_request_error',
  'Unknown route: this listener (metrics.listen) serves only GET (and HEAD) /metrics and /healthz.')
export const MetricsUnauthorizedError = define('invalid_metrics_token', 401, 'invalid_request_error',
  'Missing or wrong metrics token. Send it as "Authorization: Bearer <token>".')
export const InternalError = define('internal_error', 500, 'server_error',
  'The gateway failed to handle this request.')

/** A wait as a `retry-after` header gives it: whole seconds, at least 1. */
export function retryAfterSeconds (ms: number): string {
  return String(Math.max(1, Math.ceil(ms / 1000)))
}

/**
 * The longest wait the SDKs are left to retry after. The Node SDK (openai 6.x) sleeps whatever retry-after (or
 * retry-after-ms) says before it sends a call again, however long: a call would hang for as long, twice. The Python
 * SDK gives up by itself past two minutes. Past this, both are told not to retry and raise their error at once,
 * retry-after still saying when to come back.
 */
export const SDK_RETRY_WAIT_MS = 60_000

/** `retry-after` for a wait of `ms`, and `x-should-retry: false` when it is longer than SDK_RETRY_WAIT_MS. */
export function retryAfter (ms: number): Record<string, string> {
  const headers: Record<string, string> = { 'retry-after': retryAfterSeconds(ms) }
  if (ms > SDK_RETRY_WAIT_MS) headers['x-should-retry'] = 'false'
  return headers
}

export function isGatewayError (err: unknown): err is GatewayError {
  return err instanceof Error && (err as GatewayError).name === 'GatewayError'
}

export interface OpenAIErrorBody {
  error: { message: string, type: string, param: string | null, code: string }
}

/**
 * `text` cut to at most `max` UTF-16 units, never between the two halves of a character outside the Basic
 * Multilingual Plane (an emoji): a half alone is no text (JSON spells it `\ud83d`, and Python cannot print it).
 */
export function cutShort (text: string, max: number): string {
  if (text.length <= max) return text
  const last = text.charCodeAt(max - 1)
  return text.slice(0, last >= 0xd800 && last <= 0xdbff ? max - 1 : max)
}

/**
 * A value the client sent (a header, a model), as an error message quotes it: any key in it withheld before it is
 * cut short, so that no part of one shows, in JSON quotes.
 */
export function quoted (value: string): string {
  return JSON.stringify(cutShort(withoutKeys(value), 100))
}

/**
 * The answer a client gets. A message or param that quotes what the client sent (a path, a header, a parameter's
 * name, a model) keeps no gateway key, as the log and the audit keep none: a key-shaped part is withheld.
 */
export function envelope (err: GatewayError): OpenAIErrorBody {
  const param = err.param === null ? null : withoutKeys(err.param)
  return { error: { message: withoutKeys(err.message), type: err.type, param, code: err.code } }
}
