// What a Responses call was about and what it cost, gathered from its request and from its answer (one JSON
// object, or the events of a stream as they pass): for the audit record and the client's token budget.

export interface ResponseFacts {
  model: string | null
  /** whether the call asked for a stream; null for a create whose `stream` is no boolean (refused) */
  stream: boolean | null
  responseId: string | null
  inputTokens: number | null
  outputTokens: number | null
  /** output deltas seen (text, a function call's arguments, reasoning...), for a stream cut off before its usage came */
  deltas: number
  /** the output's text as tokens, about 4 bytes each, for a final response that came without its usage */
  outputEstimate: number
  /** the stream must end with a last event of its own (a generation's in the foreground) */
  mustEnd: boolean
  /** one of the events a response's stream ends with has passed (a stream of any call) */
  ended: boolean
  /**
   * How the upstream said, in a 2xx answer, that the call failed: a stream's own `error` event, or a failed response
   * (`response.failed`, or an answer or last event whose response has `status: "failed"`), with the error's code;
   * null when it did not. The first such event counts.
   */
  failure: { event: 'error' | 'response.failed', code: string | null } | null
}

export function newFacts (responseId: string | null, stream: boolean | null, model: string | null = null): ResponseFacts {
  return { model, stream, responseId, inputTokens: null, outputTokens: null, deltas: 0, outputEstimate: 0, mustEnd: false, ended: false, failure: null }
}

/**
 * The events a generation's stream ends with, one of them always (OpenAI's Responses streaming): the response done,
 * failed or cut short, or an error.
 */
const LAST_EVENTS = new Set(['response.completed', 'response.failed', 'response.incomplete', 'error'])

function count (value: unknown): number | null {
  return typeof value === 'number' && Number.isFinite(value) && value >= 0 ? value : null
}

/**
 * Takes what a response object says (id, model, and its usage when `final`) into the facts; the object is not
 * changed.
 */
export function observeResponse (facts: ResponseFacts, object: unknown, final = true): void {
  const response = object as { object?: unknown, id?: unknown, model?: unknown, usage?: unknown, status?: unknown, error?: unknown, output?: unknown } | null
  if (response?.object !== 'response') return
  if (facts.responseId === null && typeof response.id === 'string') facts.responseId = response.id
  if (facts.model === null && typeof response.model === 'string') facts.model = response.model
  if (!final) return
  // A failed response, streamed or not (a generation answered 200 with `status: "failed"`), is the upstream saying
  // the call failed, as a stream's `response.failed` is.
  if (facts.failure === null && response.status === 'failed') {
    const code = codeOf(response.error)
    facts.failure = { event: 'response.failed', code: typeof code === 'string' ? code : null }
  }
  const usage = response.usage as { input_tokens?: unknown, output_tokens?: unknown } | null | undefined
  if (usage !== null && typeof usage === 'object') {
    facts.inputTokens = count(usage.input_tokens) ?? facts.inputTokens
    facts.outputTokens = count(usage.output_tokens) ?? facts.outputTokens
  }
  // A finished response without its usage (a relay that drops it): the output it holds is charged all the same,
  // as a stream's deltas are, else a budget would hold back only the input. (One still queued or under way, as a
  // background response's retrieve shows it, has no usage yet.)
  if (facts.outputTokens === null && response.status !== 'queued' && response.status !== 'in_progress') {
    facts.outputEstimate = Math.ceil(outputBytes(response.output) / 4)
  }
}

/**
 * The bytes of text a response's output holds: what its model wrote (message text and refusals, a function or
 * tool call's arguments or input, reasoning and its summary). Not a generated image's base64 `result`, which is
 * not text (an image is charged some thousand tokens, not a token per 4 bytes of it), nor ids and types.
 */
function outputBytes (output: unknown): number {
  if (!Array.isArray(output)) return 0
  let bytes = 0
  const text = (value: unknown): void => { if (typeof value === 'string') bytes += Buffer.byteLength(value) }
  const parts = (list: unknown): void => {
    if (!Array.isArray(list)) return
    for (const part of list) {
      text((part as { text?: unknown } | null)?.text)
      text((part as { refusal?: unknown } | null)?.refusal)
    }
  }
  for (const item of output) {
    const i = item as { content?: unknown, summary?: unknown, arguments?: unknown, input?: unknown } | null
    parts(i?.content)
    parts(i?.summary)
    text(i?.arguments)
    text(i?.input)
  }
  return bytes
}

/**
 * Takes one streamed event into the facts: the response object it carries, or one more output delta. Usage only
 * from the event the stream ends with: the response of an earlier one is not done (OpenAI's has no usage yet;
 * another service's zeros there would otherwise stand for the input of a stream the client then leaves).
 */
export function observeEvent (facts: ResponseFacts, event: unknown): void {
  const e = event as { type?: unknown, response?: unknown, code?: unknown, error?: unknown } | null
  // Every kind of output streams as deltas of its own (`response.function_call_arguments.delta`,
  // `response.reasoning_summary_text.delta`...): a client could read a long function call and leave before the end.
  if (typeof e?.type === 'string' && e.type.endsWith('.delta')) facts.deltas++
  const last = LAST_EVENTS.has(e?.type as string)
  if (last) facts.ended = true
  if (e?.response !== undefined) observeResponse(facts, e.response, last)
  if (facts.failure === null && (e?.type === 'error' || e?.type === 'response.failed')) {
    // OpenAI's error event has its code at the top (some services put it in an `error` object); a failed
    // response has it in the response's `error`.
    const code = e.type === 'error' ? e.code ?? codeOf(e.error) : codeOf((e.response as { error?: unknown } | null | undefined)?.error)
    facts.failure = { event: e.type, code: typeof code === 'string' ? code : null }
  }
}

function codeOf (error: unknown): unknown {
  return (error as { code?: unknown } | null | undefined)?.code
}

/**
 * The audit outcome of an answer the upstream gave as a 2xx that failed, a stream or not (null for one that did not): the
 * upstream failed mid-answer, `upstream_error`, or met the shared account's limit, `upstream_rate_limited`, as a
 * 5xx or a 429 would have said. A failed response counts for the call that generates it (`creating`), not for a
 * retrieve (streamed or not) or a cancel of a response that failed before: that call did what it was asked.
 */
export function failureOutcome (facts: ResponseFacts, creating: boolean): 'upstream_error' | 'upstream_rate_limited' | null {
  const failure = facts.failure
  if (failure === null || (failure.event === 'response.failed' && !creating)) return null
  return failure.code === 'rate_limit_exceeded' ? 'upstream_rate_limited' : 'upstream_error'
}

/**
 * Output tokens as known: the answer's usage when it came; for a stream cut off before, the deltas seen (OpenAI
 * streams text about a token a delta, so this is an estimate, and the budget is charged with it rather than with
 * nothing); for a response that ended without its usage, its output's text at about 4 bytes a token, or the deltas
 * that streamed it if more.
 */
export function outputTokens (facts: ResponseFacts): number | null {
  return facts.outputTokens ?? (Math.max(facts.deltas, facts.outputEstimate) || null)
}

/**
 * What a call is charged: its usage; for a generation the upstream may have taken on whose usage never came, the
 * input estimated from the bytes sent, about 4 a token (OpenAI's rule of thumb): else a client could hang up early
 * and spend any input for nothing. Taken on: a 2xx answer began (a stream cut off, even at its first event), or
 * no answer came to a request that was sent (the client hung up while the model worked, or the call timed out).
 * The context a previous response or a conversation adds is not seen, so this is a floor.
 */
export function tokensUsed (facts: ResponseFacts, takenOn: boolean, sentBytes: number): number {
  const input = facts.inputTokens ?? (takenOn ? Math.ceil(sentBytes / 4) : 0)
  return input + (outputTokens(facts) ?? 0)
}

/**
 * Whether `model` matches a model glob: `*` any run of characters (slashes too: model ids are not paths), `?` one.
 * Matched in at most glob x model steps, with no backtracking regular expression: a model string is the client's,
 * up to the body limit, and `^.*gpt.*mini.*$` takes quadratic time on one that nearly matches.
 */
function globMatch (glob: string, model: string): boolean {
  let g = 0
  let m = 0
  let star = -1 // the glob position after the last `*` seen, and the model position it was tried from
  let from = 0
  while (m < model.length) {
    const c = glob[g]
    if (c === '*') {
      star = ++g
      from = m
    } else if (g < glob.length && (c === '?' || c === model[m])) {
      g++
      m++
    } else if (star !== -1) {
      g = star // let the last `*` take one more character
      m = ++from
    } else {
      return false
    }
  }
  while (glob[g] === '*') g++
  return g === glob.length
}

/** Whether `model` is one the client may use: any model when it has no list. */
export function modelAllowed (model: string, allowed: readonly string[] | undefined): boolean {
  return allowed === undefined || allowed.some(glob => globMatch(glob, model))
}
