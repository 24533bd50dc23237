// Responses calls (403 model_not_allowed; 400 invalid_type for a model that is not a string), after the body
// check: a client with a `models` list may only ask for a model that matches it, before anything goes upstream. For every response route, what the call was about and what
// it cost (model, stream, response id, tokens) is gathered from the request and the answer as it passes, for the
// audit record and the token budget (plugins/rate-limit.ts charges it when the call ends).
import fp from 'fastify-plugin'
import {
  BackgroundNotAllowedError, ContainerNotAllowedError, CredentialsInBodyError, cutShort, InvalidModelTypeError, InvalidStreamTypeError, ModelNotAllowedError,
  ModelRequiredError, quoted,
  UnknownParameterError
} from '../errors.js'
import { holdsKey } from '../keys.js'
import { streamsRetrieve, type Action } from '../operations.js'
import { folded, isObject, otherCaseKey } from '../ownership/owners.js'
import { modelAllowed, newFacts, observeEvent, observeResponse } from '../responses/usage.js'
import { addAnswerRewrite, addEventRewrite } from './proxy.js'

/** The keys of a create's body that the checks here read by their exact names. */
export const CHECKED_KEYS = ['model', 'stream', 'background', 'tools'] as const
/** The keys of each tool that namedContainer reads by their exact names, and those of a tool's `environment`. */
const TOOL_KEYS = ['type', 'container', 'environment']
export const ENVIRONMENT_KEYS = ['type', 'container_id']

/**
 * Where a create's tools name a container by id: a code interpreter's (`"container": "cntr_..."`, anything but an
 * object such as `{ "type": "auto" }`; its type in any case), or the hosted shell's (`"environment": { "type": "container_reference",
 * "container_id": "cntr_..." }`, or a `container_id` without its type); or a key read here in another case (then an
 * unknown parameter, as at the top level). The upstream runs the call's code or commands in that container, with
 * every file in it, across the one account all teams share; a container carries no metadata to own it by, so no
 * check can say whose it is.
 */
function namedContainer (tools: unknown): { param: string, otherCase: boolean } | null {
  if (!Array.isArray(tools)) return null
  for (const [i, tool] of tools.entries()) {
    const { type, container, environment } = (tool ?? {}) as { type?: unknown, container?: unknown, environment?: unknown }
    const otherCase = otherCaseKey(tool, TOOL_KEYS, `tools[${i}].`) ?? otherCaseKey(environment, ENVIRONMENT_KEYS, `tools[${i}].environment.`)
    if (otherCase !== null) return { param: cutShort(otherCase, 200), otherCase: true }
    // (isObject: not a number kept exactly, http/json.ts, which is an object of its own but names no auto mode; its
    // type read as a case-blind upstream reads it: `Code_Interpreter` is the code interpreter to it)
    if (typeof type === 'string' && folded(type) === 'code_interpreter' && container != null && !isObject(container)) return { param: `tools[${i}].container`, otherCase: false }
    const { type: kind, container_id: id } = (environment ?? {}) as { type?: unknown, container_id?: unknown }
    if (kind === 'container_reference' || id != null) return { param: `tools[${i}].environment`, otherCase: false }
  }
  return null
}

/** The calls answered with a response object (the streamed ones with its events). */
const ANSWERS_A_RESPONSE: ReadonlySet<Action> = new Set<Action>(['response.create', 'response.retrieve', 'response.cancel'])

export default fp(async function responses (app) {
  app.decorateRequest('responseFacts', null)

  app.addHook('preHandler', (request, _reply, done) => {
    const op = request.operation
    const client = request.client
    if (op === null || client === null || !op.action.startsWith('response.')) {
      done()
      return
    }
    const body = request.parsedBody as { model?: unknown, stream?: unknown, background?: unknown } | undefined
    const creating = op.action === 'response.create'
    const model = creating ? body?.model : undefined
    // (null for a create's `stream` that is no boolean, refused below: whether it asked for one cannot be said)
    const stream = creating
      ? (body?.stream === undefined || body.stream === null ? false : typeof body.stream === 'boolean' ? body.stream : null)
      : streamsRetrieve(op)
    // Made before the refusals below: a refused create is audited with the model it asked for (audit query --model
    // finds who asked for one outside their list). A call refused here is never charged: nothing went upstream.
    const facts = newFacts(op.responseId, stream, typeof model === 'string' ? model : null)
    request.responseFacts = facts
    // `Model`, `Background`: nothing to OpenAI, but the model or background an upstream that ignores case would
    // read, past the checks below (ownership.ts refuses the keys its own checks read in the same way).
    const otherCase = creating ? otherCaseKey(body, CHECKED_KEYS) : null
    if (otherCase !== null) {
      const err = new UnknownParameterError(cutShort(otherCase, 200))
      err.param = cutShort(otherCase, 200)
      done(err)
      return
    }
    if (model !== undefined && typeof model !== 'string') {
      done(new InvalidModelTypeError())
      return
    }
    if (stream === null) {
      done(new InvalidStreamTypeError())
      return
    }
    // A key passed as the model (two settings swapped) would go upstream as it came, and come back in its answer
    // ("The model ... does not exist"): keys never leave the gateway, in a URL, a header, an id or here.
    if (typeof model === 'string' && holdsKey(model)) {
      const err = new CredentialsInBodyError()
      err.param = 'model'
      done(err)
      return
    }
    // Without `model` a stored prompt picks it, which the gateway cannot see: a key limited to some models names one.
    if (creating && client.models !== undefined && model === undefined) {
      done(new ModelRequiredError())
      return
    }
    if (model !== undefined && !modelAllowed(model, client.models)) {
      done(new ModelNotAllowedError(quoted(model)))
      return
    }
    // A background response reports its usage to a later retrieve, not to this call, which alone is charged.
    // Any value but false or none counts: an upstream that reads loosely takes "true" or 1 for true.
    const background = body?.background
    if (creating && background !== undefined && background !== null && background !== false &&
      client.rateLimit.tokensPerMinute !== undefined) {
      done(new BackgroundNotAllowedError())
      return
    }
    const named = creating && !client.scopes.includes('admin') ? namedContainer((body as { tools?: unknown } | undefined)?.tools) : null
    if (named !== null) {
      const err = named.otherCase ? new UnknownParameterError(named.param) : new ContainerNotAllowedError()
      err.param = named.param
      done(err)
      return
    }
    // A streamed generation in the foreground ends with a last event of its own (a background one may also end by
    // being cancelled from elsewhere, which has none).
    if (creating && stream === true && (background === undefined || background === null || background === false)) facts.mustEnd = true
    // Only a response object says anything of the call (its usage, a failure): the answers that are one are read as
    // JSON. A delete's (void to the SDKs: OpenAI documents a 200 with no content) and an input items listing (as long
    // as the items are) pass as they come.
    if (ANSWERS_A_RESPONSE.has(op.action)) addAnswerRewrite(request, answer => { observeResponse(facts, answer); return answer })
    addEventRewrite(request, event => { observeEvent(facts, event); return event })
    done()
  })
}, { name: 'responses', dependencies: ['body'] })
