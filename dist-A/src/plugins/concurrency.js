// Bounded load (503): at most limits.maxInFlight calls at the upstream at once, all clients together, and at most
// rateLimit.maxConcurrent for one client where it is set. Past either, the call is answered 503 overloaded with
// retry-after at once, instead of queueing without bound behind a slow upstream. A call holds its place from here
// (ownership lookup included) until its response closes, finished or not.
import fp from 'fastify-plugin';
import { OverloadedError } from '../errors.js';
import { whenClosed } from '../http/response.js';
function overloaded(forClient) {
    const err = new OverloadedError(forClient ? ' for this client' : '');
    err.headers = { 'retry-after': '1' };
    return err;
}
export default fp(async function concurrency(app, { maxInFlight }) {
    let inFlight = 0;
    const perClient = new Map();
    app.addHook('preHandler', (request, reply, done) => {
        const client = request.client;
        if (request.operation === null || client === null) {
            done();
            return;
        }
        const mine = perClient.get(client.id) ?? 0;
        const cap = client.rateLimit.maxConcurrent;
        if (inFlight >= maxInFlight()) {
            done(overloaded(false));
            return;
        }
        if (cap !== undefined && mine >= cap) {
            done(overloaded(true));
            return;
        }
        inFlight++;
        perClient.set(client.id, mine + 1);
        whenClosed(reply.raw, () => {
            inFlight--;
            const left = (perClient.get(client.id) ?? 1) - 1;
            if (left === 0)
                perClient.delete(client.id);
            else
                perClient.set(client.id, left);
        });
        done();
    });
}, { name: 'concurrency', dependencies: ['body'] });
//# sourceMappingURL=concurrency.js.map