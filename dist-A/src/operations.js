export const API_PREFIX = '/v1';
export const ID_PATTERN = /^[A-Za-z0-9_-]{1,200}$/;
const SCOPE_OF = { GET: 'read', POST: 'write', DELETE: 'delete' };
function resource(route, actions) {
    const methods = {};
    for (const [method, action] of Object.entries(actions)) {
        methods[method] = { action, scope: SCOPE_OF[method] };
    }
    return { route, segments: route.slice(1).split('/'), methods };
}
export const RESOURCES = [
    resource('/conversations', { POST: 'conversation.create' }),
    resource('/conversations/:conversation_id', { GET: 'conversation.retrieve', POST: 'conversation.update', DELETE: 'conversation.delete' }),
    resource('/conversations/:conversation_id/items', { GET: 'item.list', POST: 'item.create' }),
    resource('/conversations/:conversation_id/items/:item_id', { GET: 'item.retrieve', DELETE: 'item.delete' }),
    resource('/responses', { POST: 'response.create' }),
    resource('/responses/:response_id', { GET: 'response.retrieve', DELETE: 'response.delete' }),
    resource('/responses/:response_id/cancel', { POST: 'response.cancel' }),
    resource('/responses/:response_id/input_items', { GET: 'response.input_items' })
];
/** Every action the gateway can record, in table order (audit query, metrics labels). */
export const ACTIONS = RESOURCES.flatMap(r => Object.values(r.methods).map(m => m.action));
/** The path part of a request target, as sent. */
export function rawPath(url) {
    const q = url.indexOf('?');
    return q === -1 ? url : url.slice(0, q);
}
/** The resource whose shape these segments have (literals equal, any segment where an id goes). */
function shapeOf(rest) {
    outer: for (const resource of RESOURCES) {
        const segments = resource.segments;
        if (segments.length !== rest.length)
            continue;
        for (let i = 0; i < segments.length; i++) {
            const segment = segments[i];
            if (segment.charCodeAt(0) !== 0x3a /* : */ && segment !== rest[i])
                continue outer;
        }
        return resource;
    }
    return null;
}
/** The id in the segment where `:param` goes, if the resource has one. */
function idAt(resource, rest, param) {
    const at = resource.segments.indexOf(param);
    return at === -1 ? null : rest[at];
}
export function matchOperation(method, url) {
    const path = rawPath(url);
    if (!path.startsWith(API_PREFIX + '/'))
        return { kind: 'unknown' };
    const rest = path.slice(API_PREFIX.length + 1).split('/');
    // One rule for every empty segment (a trailing slash, `//`): such a path is none of the routes.
    if (rest.includes(''))
        return { kind: 'unknown' };
    const resource = shapeOf(rest);
    if (resource === null)
        return { kind: 'unknown' };
    const op = resource.methods[method];
    if (op === undefined)
        return { kind: 'method_not_allowed', allow: Object.keys(resource.methods).join(', ') };
    return {
        kind: 'operation',
        operation: {
            action: op.action,
            scope: op.scope,
            conversationId: idAt(resource, rest, ':conversation_id'),
            itemId: idAt(resource, rest, ':item_id'),
            responseId: idAt(resource, rest, ':response_id')
        }
    };
}
/** The first id of the operation that is not acceptable, with the parameter name OpenAI uses for it. */
export function invalidId(op) {
    if (op.conversationId !== null && !ID_PATTERN.test(op.conversationId))
        return 'conversation_id';
    if (op.itemId !== null && !ID_PATTERN.test(op.itemId))
        return 'item_id';
    if (op.responseId !== null && !ID_PATTERN.test(op.responseId))
        return 'response_id';
    return null;
}
//# sourceMappingURL=operations.js.map