import { performance } from 'node:perf_hooks';
import { Readable } from 'node:stream';
import fp from 'fastify-plugin';
import { AuditUnavailableError } from '../errors.js';
import { matchOperation, rawPath } from '../operations.js';
import { isCounting, whenClosed } from '../http/response.js';
import { outputTokens } from '../responses/usage.js';
/** The status recorded for a call whose client hung up before any status was sent (nginx's convention). */
export const CLIENT_CLOSED_REQUEST = 499;
/**
 * Node found the request malformed after it was handed over (a bad chunk in the body): the gateway answered
 * on the socket itself, so the response never finishes through Fastify.
 */
export function markMalformed(res, status, bodyBytes) {
    if (!isCounting(res))
        return;
    res.rawStatus = status;
    res.bodyBytes = bodyBytes;
}
function rawStatus(res) {
    return isCounting(res) ? res.rawStatus : 0;
}
function outcomeOf(request, reply, watch) {
    if (rawStatus(reply.raw) !== 0)
        return 'invalid';
    if (!reply.raw.writableFinished)
        return watch.upstreamStreamFailed ? 'upstream_error' : 'aborted';
    if (request.refusal !== null)
        return request.refusal.outcome;
    if (request.upstream !== null) {
        if (request.upstream.status === 429)
            return 'upstream_rate_limited'; // the shared account's limit, not the client's
        return request.upstream.status >= 500 ? 'upstream_error' : 'ok';
    }
    return 'error';
}
/** Whether any of the response reached the client's connection (not one still waiting behind a pipelined one). */
function reachedClient(res) {
    return res.headersSent && !(isCounting(res) && res.queued);
}
/** The status the client actually received: none sent is 499, as nginx logs a client that closed first. */
function statusSent(reply) {
    return rawStatus(reply.raw) || (reachedClient(reply.raw) ? reply.statusCode : CLIENT_CLOSED_REQUEST);
}
/**
 * The operation of a call whose record is made before the router saw it (a call over before it started: read
 * after an answer that closed its connection). Null for an unknown route, as the router would have it.
 */
function routedLate(request) {
    if (request.routeOptions.config.internal === true)
        return null;
    const match = matchOperation(request.method, request.originalUrl);
    return match.kind === 'operation' ? match.operation : null;
}
/**
 * The call's record. Its keys are written in sorted order, with the chain's seq and prevHash in their places (left
 * undefined here, set when the record is sealed): the sealed line is then JSON.stringify's plain output
 * (audit/chain.ts), the cheapest way to write the record's canonical JSON, once per call.
 */
function buildRecord(request, reply, watch) {
    const op = request.operation ?? routedLate(request);
    const facts = request.responseFacts;
    const upstream = request.upstream;
    const call = request.upstreamCall;
    const userAgent = request.headers['user-agent'];
    return {
        action: op?.action ?? 'unknown',
        attempts: call?.attempts ?? 0,
        bytesIn: request.bodyBytes,
        bytesOut: isCounting(reply.raw) && !reply.raw.queued ? reply.raw.bodyBytes : 0,
        clientId: request.client?.id ?? null,
        conversationId: op?.action === 'conversation.create' ? request.createdId : op?.conversationId ?? null,
        durationMs: Math.round(performance.now() - watch.start),
        inputTokens: facts?.inputTokens ?? null,
        ip: watch.ip,
        itemId: op?.itemId ?? null,
        keyId: request.keyId,
        method: request.method,
        model: facts?.model ?? null,
        outcome: outcomeOf(request, reply, watch),
        outputTokens: facts === null ? null : outputTokens(facts),
        ownerId: request.ownerId,
        path: rawPath(request.originalUrl).slice(0, 2048),
        prevHash: undefined,
        requestId: request.id,
        responseId: facts?.responseId ?? null,
        seq: undefined,
        status: statusSent(reply),
        stream: facts?.stream ?? null,
        time: new Date().toISOString(),
        upstreamLine: call?.line ?? null,
        upstreamMs: upstream?.ms ?? null,
        upstreamRequestId: upstream?.requestId ?? null,
        userAgent: typeof userAgent === 'string' ? userAgent.slice(0, 512) : null
    };
}
export default fp(async function audit(app, { writer, onFailure }) {
    const observers = [];
    app.decorate('onAuditRecord', (observer) => { observers.push(observer); });
    app.decorate('auditState', () => writer.available ? 'ok' : 'unavailable');
    app.decorate('auditReopen', () => { writer.reopen(); });
    app.decorate('auditRefuses', () => onFailure === 'closed' && !writer.available);
    app.decorateRequest('auditWatch', null);
    // Callback-style hooks: they run on every call, and a promise per hook per call costs.
    app.addHook('onRequest', (request, reply, done) => {
        if (request.routeOptions.config.internal !== true) {
            // Body bytes are counted by the response itself (http/response.ts).
            const watch = { start: performance.now(), ip: request.ip, upstreamStreamFailed: false };
            request.auditWatch = watch;
            // 'close' comes exactly once for every response, finished or not; the record is built on it. (on, not once:
            // with one 'close' per response, once's wrapper would be one more object per call for nothing; the same
            // holds for the other per-call 'close' listeners.)
            whenClosed(reply.raw, () => {
                const record = buildRecord(request, reply, watch);
                writer.write(record);
                for (const observe of observers)
                    observe(record);
            });
        }
        done();
    });
    // A streamed answer that fails on the upstream's side (a reset mid-body) is told apart from a client leaving:
    // the client's leaving closes the response first, and the record is written then.
    app.addHook('onSend', (request, _reply, payload, done) => {
        const watch = request.auditWatch;
        if (watch !== null && payload instanceof Readable) {
            payload.once('error', () => { watch.upstreamStreamFailed = true; });
        }
        done(null, payload);
    });
    app.addHook('onClose', async () => { await writer.close(); });
}, { name: 'audit' });
/**
 * With audit.onFailure "closed", an API call made while the audit cannot be written gets 503 audit_unavailable
 * right after its route is matched, before its key, body or the upstream: no call goes unrecorded. Its own
 * record (outcome `unavailable`) waits in the writer's buffer, or is counted as lost.
 */
export const auditGate = fp(async function auditGate(app) {
    app.addHook('onRequest', (request, _reply, done) => {
        if (request.operation !== null && app.auditRefuses()) {
            done(new AuditUnavailableError());
            return;
        }
        done();
    });
}, { name: 'audit-gate', dependencies: ['audit', 'router'] });
//# sourceMappingURL=audit.js.map