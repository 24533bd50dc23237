// Ownership (404), after the body check and before the proxy: a team sees only the conversations it created.
// Any other client gets 404 conversation_not_found on every id route of a conversation it does not own, exactly as
// if it did not exist, and the upstream is never asked to act on it (only the gateway's own lookup goes there).
// `admin` clients act on every conversation (they still need the operation's own scope). The owner lives in the
// upstream conversation's metadata (ownership/owners.ts); this plugin writes it on create, keeps it on update, and
// takes it out of every conversation object a client receives.
import type { FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import {
  ConversationNotFoundError, ConversationNotOwnedError, InvalidMetadataError, MetadataLimitError,
  ReservedMetadataKeyError, UpstreamTimeoutError, UpstreamUnavailableError
} from '../errors.js'
import type { Action } from '../operations.js'
import {
  createBody, metadataProblem, OwnerCache, ownerOf, updateBody, withoutOwner, type MetadataProblem, type Owner
} from '../ownership/owners.js'
import { readBody, UpstreamFailure, type Upstream } from '../upstream/client.js'
import { clientGone, gatewayHeaders } from './proxy.js'

export interface OwnershipOptions {
  upstream: Upstream
  apiKey: () => string
  unowned: 'deny' | 'allow'
  cache: OwnerCache
}

/** Largest lookup answer read: a conversation object is small. */
const LOOKUP_MAX_BYTES = 1024 * 1024

/** Actions whose answer is a conversation object, which must reach the client without the owner key. */
const ANSWERS_A_CONVERSATION = new Set<Action>(['conversation.create', 'conversation.retrieve', 'conversation.update', 'item.delete'])

function refuseMetadata (problem: MetadataProblem | null): void {
  if (problem === 'reserved') throw new ReservedMetadataKeyError()
  if (problem === 'limit') throw new MetadataLimitError()
  if (problem === 'not_object') throw new InvalidMetadataError()
}

export default fp<OwnershipOptions>(async function ownership (app, opts) {
  const { cache, upstream } = opts
  app.decorateRequest('ownerId', null)
  app.decorateRequest('createdId', null)
  app.decorateRequest('rewriteAnswer', null)

  /** The owner of `id`, from the cache or the upstream; a bad or missing answer fails closed (502/504). */
  async function lookup (id: string, request: FastifyRequest, reply: FastifyReply): Promise<Owner> {
    return await cache.get(id, async () => {
      try {
        const answer = await upstream.call({
          method: 'GET',
          path: `/v1/conversations/${id}`,
          headers: gatewayHeaders(request, opts.apiKey(), { accept: 'application/json' }),
          body: null,
          signal: clientGone(reply)
        })
        const body = await readBody(answer.body, LOOKUP_MAX_BYTES)
        if (answer.statusCode === 404) return 'missing'
        if (answer.statusCode !== 200) throw new Error(`the lookup was answered ${answer.statusCode}`)
        return ownerOf(JSON.parse(body.toString('utf8')), id)
      } catch (err) {
        request.log.warn({ err: { message: (err as Error).message }, conversationId: id }, 'ownership lookup failed')
        if (err instanceof UpstreamFailure && err.kind === 'timeout') throw new UpstreamTimeoutError()
        throw new UpstreamUnavailableError()
      }
    })
  }

  app.addHook('preHandler', async (request, reply) => {
    const op = request.operation
    const client = request.client
    if (op === null || client === null) return
    if (ANSWERS_A_CONVERSATION.has(op.action)) request.rewriteAnswer = withoutOwner

    if (op.action === 'conversation.create') {
      refuseMetadata(metadataProblem(request.parsedBody))
      request.ownerId = client.id
      request.upstreamBody = Buffer.from(JSON.stringify(createBody(request.parsedBody, client.id)))
      request.rewriteAnswer = (answer: unknown) => {
        const id = (answer as { id?: unknown }).id
        if (typeof id === 'string') {
          cache.set(id, client.id)
          request.createdId = id
        }
        return withoutOwner(answer)
      }
      return
    }

    const id = op.conversationId!
    if (op.action === 'conversation.update') refuseMetadata(metadataProblem(request.parsedBody))
    const found = await lookup(id, request, reply)
    if (found === 'missing') throw new ConversationNotFoundError(id)
    request.ownerId = found.owner
    const admin = client.scopes.includes('admin')
    const allowed = admin || found.owner === client.id || (found.owner === null && opts.unowned === 'allow')
    if (!allowed) throw new ConversationNotOwnedError(id)

    if (op.action === 'conversation.update') {
      const merged = updateBody(request.parsedBody, found.owner)
      if (merged !== null) request.upstreamBody = Buffer.from(JSON.stringify(merged))
    } else if (op.action === 'conversation.delete') {
      cache.delete(id)
    }
  })
}, { name: 'ownership', dependencies: ['body'] })
