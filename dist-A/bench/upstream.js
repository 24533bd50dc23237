// The bench's upstream: answers the four Conversations routes of the mix with fixed JSON over keep-alive, and
// does nothing else, so that what the proxies in front of it cost is what the bench sees. It checks the upstream
// token (a proxy that failed to swap it gets 401s, which the bench counts as errors). A conversation's owner,
// `metadata.gateway_owner`, is read from its id (`conv_<client id>`), so every bench client owns the
// conversation it uses, however many clients there are.
import { createServer } from 'node:http';
export const ITEM_ID = 'msg_bench';
export const OWNER_PREFIX = 'conv_';
const ITEM = { type: 'message', id: ITEM_ID, status: 'completed', role: 'user', content: [{ type: 'input_text', text: 'Hello from the bench' }] };
const ITEMS = JSON.stringify({ object: 'list', data: [ITEM], first_id: ITEM_ID, last_id: ITEM_ID, has_more: false });
const UNAUTHORIZED = JSON.stringify({ error: { message: 'Incorrect API key provided.', type: 'invalid_request_error', param: null, code: 'invalid_api_key' } });
const NOT_FOUND = JSON.stringify({ error: { message: 'Not found.', type: 'invalid_request_error', param: null, code: null } });
function conversation(id) {
    return JSON.stringify({
        id, object: 'conversation', created_at: 1741900000, metadata: { gateway_owner: id.slice(OWNER_PREFIX.length) }
    });
}
/** The answer to one request: GET/DELETE conversation-or-item answer the conversation, items routes the list. */
function answer(method, url) {
    const [, v1, conversations, id, items, itemId, extra] = url.split('?', 1)[0].split('/');
    if (v1 !== 'v1' || conversations !== 'conversations' || id === undefined || extra !== undefined)
        return [404, NOT_FOUND];
    if (items === undefined && method === 'GET')
        return [200, conversation(id)];
    if (items !== 'items')
        return [404, NOT_FOUND];
    if (itemId === undefined && (method === 'GET' || method === 'POST'))
        return [200, ITEMS];
    if (itemId !== undefined && method === 'DELETE')
        return [200, conversation(id)];
    return [404, NOT_FOUND];
}
export async function startUpstream({ token, delayMs = 0 }) {
    const authorization = `Bearer ${token}`;
    const server = createServer((req, res) => {
        const [status, body] = req.headers.authorization === authorization ? answer(req.method, req.url ?? '/') : [401, UNAUTHORIZED];
        const send = () => {
            res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'x-request-id': 'req_bench' });
            res.end(body);
        };
        req.resume(); // read (and drop) any request body, then answer
        req.once('end', delayMs > 0 ? () => setTimeout(send, delayMs) : send);
    });
    await new Promise(resolve => server.listen(0, '127.0.0.1', resolve));
    return { url: `http://127.0.0.1:${server.address().port}` };
}
//# sourceMappingURL=upstream.js.map