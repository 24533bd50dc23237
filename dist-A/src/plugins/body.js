import fp from 'fastify-plugin';
import { InvalidJsonError, RequestTooLargeError, UnsupportedContentEncodingError, UnsupportedMediaTypeError, UnsupportedTransferEncodingError } from '../errors.js';
/** A body is JSON when it says so (any case, parameters allowed) or says nothing; anything else is refused. */
export function isJsonMediaType(header) {
    if (header === undefined)
        return true;
    const type = header.split(';', 1)[0].trim().toLowerCase();
    return type === 'application/json';
}
/** The request announces a body (a length above zero, or chunked framing). */
export function hasBody(headers) {
    const length = headers['content-length'];
    return headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}
/** A client-sent header value as quoted in an error message, cut short. */
function shown(value) {
    return JSON.stringify(String(value).slice(0, 100));
}
/**
 * Reads a body of at most `limit` bytes, as Fastify's own `parseAs: 'buffer'` does (a stream error is a 400 unless
 * it says otherwise), with the limit given per call. Past it, the rest is left to the error handler to discard.
 */
function readLimited(payload, limit, done) {
    const chunks = [];
    let size = 0;
    const stop = () => {
        payload.removeListener('data', onData);
        payload.removeListener('end', onEnd);
        payload.removeListener('error', onEnd);
    };
    function onData(chunk) {
        const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
        size += buf.length;
        if (size > limit) {
            stop();
            done(new RequestTooLargeError(String(limit)));
            return;
        }
        chunks.push(buf);
    }
    function onEnd(err) {
        stop();
        if (err != null) {
            if (!(typeof err.statusCode === 'number' && err.statusCode >= 400))
                err.statusCode = 400;
            done(err);
            return;
        }
        done(null, Buffer.concat(chunks, size));
    }
    payload.on('data', onData);
    payload.on('end', onEnd);
    payload.on('error', onEnd);
    payload.resume();
}
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
export default fp(async function body(app, { bodyBytes }) {
    app.decorateRequest('bodyBytes', 0);
    app.decorateRequest('parsedBody', undefined);
    app.decorateRequest('upstreamBody', null);
    // Before a byte of the body is read: framing (501), coding and media type (415), declared size (413). Only then
    // is a client that waits for `100 Continue` told to send its body.
    app.addHook('preParsing', (request, reply, payload, done) => {
        checkDeclared(request, reply);
        done(null, payload);
    });
    function checkDeclared(request, reply) {
        const headers = request.headers;
        if (!hasBody(headers))
            return;
        const transfer = headers['transfer-encoding'];
        // Node's parser insists on chunked last; any coding before it (gzip, chunked) would be ignored, not decoded.
        if (transfer !== undefined && transfer.trim().toLowerCase() !== 'chunked') {
            throw new UnsupportedTransferEncodingError(shown(transfer));
        }
        const coding = headers['content-encoding'];
        if (coding !== undefined && coding.trim().toLowerCase() !== 'identity') {
            throw new UnsupportedContentEncodingError(shown(coding));
        }
        const type = headers['content-type'];
        if (!isJsonMediaType(type))
            throw new UnsupportedMediaTypeError(shown(type));
        const limit = bodyBytes();
        if (Number(headers['content-length']) > limit)
            throw new RequestTooLargeError(String(limit));
        if (headers.expect?.toLowerCase() === '100-continue')
            reply.raw.writeContinue();
    }
    app.removeAllContentTypeParsers();
    app.addContentTypeParser('*', (request, payload, done) => {
        readLimited(payload, bodyBytes(), (err, buf) => {
            if (err !== null)
                done(err, undefined);
            else
                parse(request, buf, done);
        });
    });
    function parse(request, buf, done) {
        // An empty body is no body, whatever the headers said (the Python SDK sends Content-Type: application/json
        // with nothing after it on DELETE): nothing of it goes upstream.
        if (buf.length === 0) {
            done(null, undefined);
            return;
        }
        try {
            // fatal: bytes that are not UTF-8 are refused, not silently replaced and then forwarded as they were;
            // ignoreBOM: a BOM stays in the text, where JSON.parse refuses it, as the upstream would.
            request.parsedBody = JSON.parse(UTF8.decode(buf));
        }
        catch {
            done(new InvalidJsonError(), undefined);
            return;
        }
        request.bodyBytes = buf.length;
        // The exact bytes go upstream from request.upstreamBody (plugins/proxy.ts): reply-from is given no body of
        // its own to encode or stream, which it would only do for nothing.
        request.upstreamBody = buf;
        done(null, undefined);
    }
}, { name: 'body' });
//# sourceMappingURL=body.js.map