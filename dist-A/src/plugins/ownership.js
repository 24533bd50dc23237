import fp from 'fastify-plugin';
import { then, whenAnswered } from '../answer.js';
import { ConversationNotFoundError, ConversationNotOwnedError, InvalidMetadataError, MetadataLimitError, PreviousResponseNotFoundError, PreviousResponseNotOwnedError, ReservedMetadataKeyError, ResponseNotFoundError, ResponseNotOwnedError, UpstreamTimeoutError, UpstreamUnavailableError } from '../errors.js';
import { ID_PATTERN } from '../operations.js';
import { createBody, metadataProblem, ownerOf, updateBody, withoutOwner } from '../ownership/owners.js';
import { readBody, UpstreamFailure } from '../upstream/client.js';
import { addAnswerRewrite, addEventRewrite, clientGone, gatewayHeaders } from './proxy.js';
/** Largest lookup answer read: a conversation or response object is small. */
const LOOKUP_MAX_BYTES = 1024 * 1024;
/** Actions whose answer is an owned object, which must reach the client without the owner key. */
const ANSWERS_AN_OWNED_OBJECT = new Set([
    'conversation.create', 'conversation.retrieve', 'conversation.update', 'item.delete',
    'response.create', 'response.retrieve', 'response.cancel'
]);
/** The answers for an object that does not exist and for someone else's: the same to the client, not to the audit. */
const REFUSALS = {
    conversation: [ConversationNotFoundError, ConversationNotOwnedError],
    response: [ResponseNotFoundError, ResponseNotOwnedError],
    previous_response: [PreviousResponseNotFoundError, PreviousResponseNotOwnedError]
};
function refuseMetadata(problem) {
    if (problem === 'reserved')
        throw new ReservedMetadataKeyError();
    if (problem === 'limit')
        throw new MetadataLimitError();
    if (problem === 'not_object')
        throw new InvalidMetadataError();
}
/** The conversation a response is to be created in: `conversation` as a string id or `{ id }`. */
function conversationParam(body) {
    const value = body?.conversation;
    if (typeof value === 'string')
        return value;
    const id = value?.id;
    return typeof id === 'string' ? id : undefined;
}
function previousResponseParam(body) {
    const value = body?.previous_response_id;
    return typeof value === 'string' ? value : undefined;
}
export default fp(async function ownership(app, opts) {
    const { cache, upstream } = opts;
    app.decorateRequest('ownerId', null);
    app.decorateRequest('createdId', null);
    /** The owner of `id`: at once from the cache (no promise on the common path), else from the upstream. */
    function lookup(kind, id, request, reply) {
        if (!ID_PATTERN.test(id))
            return 'missing'; // nothing with such an id can exist, or be asked about
        const cached = cache.get(kind, id);
        if (cached !== undefined)
            return cached;
        // A client gone while earlier checks were answered: no lookup for it (its call ends here, audited already).
        if (reply.raw.destroyed)
            throw new UpstreamUnavailableError();
        const callerGone = clientGone(reply);
        // The lookup may be shared with other callers of the same object: it is stopped only once all have gone, and
        // a caller that goes gets a 502 of its own (its call is over, audited as aborted).
        return cache.lookUp(kind, id, whenAbandoned => lookUpstream(kind, id, request, whenAbandoned), leave => { callerGone(() => { leave(new UpstreamUnavailableError()); }); });
    }
    /** The owner of `id` as the upstream object says; a bad or missing answer fails closed (502/504). */
    async function lookUpstream(kind, id, request, whenAbandoned) {
        try {
            const answer = await upstream.call({
                method: 'GET',
                path: `/v1/${kind}s/${id}`,
                headers: gatewayHeaders(request, opts.apiKey(), { accept: 'application/json' }),
                body: null,
                whenClientGone: whenAbandoned
            });
            const body = await readBody(answer.body, LOOKUP_MAX_BYTES);
            if (answer.statusCode === 404)
                return 'missing';
            if (answer.statusCode !== 200)
                throw new Error(`the lookup was answered ${answer.statusCode}`);
            return ownerOf(JSON.parse(body.toString('utf8')), id, kind);
        }
        catch (err) {
            // Every caller gone is not a failed lookup worth a line; their calls are over and audited anyway.
            if (!(err instanceof UpstreamFailure && err.kind === 'aborted')) {
                // (JSON.parse's message quotes the start of the text, an upstream answer that may quote the token.)
                const message = err instanceof SyntaxError ? 'the answer is not JSON' : err.message;
                request.log.warn({ err: { message }, [`${kind}Id`]: id }, 'ownership lookup failed');
            }
            if (err instanceof UpstreamFailure && err.kind === 'timeout')
                throw new UpstreamTimeoutError();
            throw new UpstreamUnavailableError();
        }
    }
    /** Looks `id` up and lets the call on only if `client` may act on it (else throws); gives its owner. */
    function authorize(kind, refusal, id, client, request, reply) {
        const decide = (found) => {
            const [Missing, NotYours] = REFUSALS[refusal];
            if (found === 'missing')
                throw new Missing(id);
            request.ownerId = found.owner; // the audit names whom a refused call was after
            const allowed = client.scopes.includes('admin') || found.owner === client.id ||
                (found.owner === null && opts.unowned() === 'allow');
            if (!allowed)
                throw new NotYours(id);
            return found.owner;
        };
        return then(lookup(kind, id, request, reply), decide);
    }
    /** The created object's id is remembered as the client's, before the client sees it without the owner key. */
    function rememberCreated(kind, request, client) {
        return (object) => {
            const id = object?.id;
            if (typeof id === 'string' && request.createdId === null) {
                cache.set(kind, id, client.id);
                request.createdId = id;
            }
            return object;
        };
    }
    /** A create: its owner goes into the body's metadata, and the new object's id into the cache. */
    function prepareCreate(kind, request, client) {
        request.ownerId = client.id;
        request.upstreamBody = Buffer.from(JSON.stringify(createBody(request.parsedBody, client.id)));
        const remember = rememberCreated(kind, request, client);
        addAnswerRewrite(request, remember);
        addEventRewrite(request, event => {
            const response = event?.response;
            if (response !== undefined)
                remember(response);
            return event;
        });
    }
    /** The check for one call: done at once when every owner it needs is cached, else a promise. */
    function check(request, reply) {
        const op = request.operation;
        const client = request.client;
        if (op === null || client === null)
            return;
        if (ANSWERS_AN_OWNED_OBJECT.has(op.action)) {
            addAnswerRewrite(request, withoutOwner);
            addEventRewrite(request, withoutOwner);
        }
        if (op.action === 'conversation.create') {
            refuseMetadata(metadataProblem(request.parsedBody));
            prepareCreate('conversation', request, client);
            return;
        }
        if (op.action === 'response.create') {
            refuseMetadata(metadataProblem(request.parsedBody));
            const conversation = conversationParam(request.parsedBody);
            const previous = previousResponseParam(request.parsedBody);
            return (async () => {
                if (conversation !== undefined)
                    await authorize('conversation', 'conversation', conversation, client, request, reply);
                if (previous !== undefined)
                    await authorize('response', 'previous_response', previous, client, request, reply);
                prepareCreate('response', request, client);
            })();
        }
        if (op.responseId !== null) {
            const responseId = op.responseId;
            return then(authorize('response', 'response', responseId, client, request, reply), () => {
                if (op.action === 'response.delete')
                    cache.delete('response', responseId);
            });
        }
        const id = op.conversationId;
        if (op.action === 'conversation.update')
            refuseMetadata(metadataProblem(request.parsedBody));
        return then(authorize('conversation', 'conversation', id, client, request, reply), owner => {
            if (op.action === 'conversation.update') {
                const merged = updateBody(request.parsedBody, owner);
                if (merged !== null)
                    request.upstreamBody = Buffer.from(JSON.stringify(merged));
            }
            else if (op.action === 'conversation.delete') {
                cache.delete('conversation', id);
            }
        });
    }
    // Callback style: with the owner cached (nearly every call), no promise is made.
    app.addHook('preHandler', (request, reply, done) => {
        whenAnswered(() => check(request, reply), () => { done(); }, err => { done(err); });
    });
}, { name: 'ownership', dependencies: ['body'] });
//# sourceMappingURL=ownership.js.map