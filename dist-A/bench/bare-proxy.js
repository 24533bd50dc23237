// The yardstick: the floor of the gateway's own stack, Fastify + @fastify/http-proxy registered plainly (its
// default undici pool and parsers, no logger), doing the one thing a gateway cannot skip: swapping the client's
// Authorization header for the upstream token. Frozen on purpose: never tune it, never slow it; the gateway is
// measured against it.
import Fastify from 'fastify';
import httpProxy from '@fastify/http-proxy';
export async function startBareProxy({ upstreamUrl, token }) {
    const app = Fastify();
    await app.register(httpProxy, {
        upstream: upstreamUrl,
        replyOptions: {
            rewriteRequestHeaders: (_request, headers) => ({ ...headers, authorization: `Bearer ${token}` })
        }
    });
    await app.listen({ host: '127.0.0.1', port: 0 });
    return { url: `http://127.0.0.1:${app.server.address().port}` };
}
//# sourceMappingURL=bare-proxy.js.map