// Ids (400) → scope (403), after the key and the rate limit: every authenticated call, invalid or out of scope
// ones included, has taken its token by now. Ids are checked on the raw path segment (operations.ts).
import fp from 'fastify-plugin';
import { InsufficientScopeError, InvalidIdError } from '../errors.js';
import { invalidId } from '../operations.js';
export default fp(async function scope(app) {
    app.addHook('onRequest', (request, _reply, done) => {
        const operation = request.operation;
        const client = request.client;
        if (operation === null || client === null) {
            done();
            return;
        }
        const param = invalidId(operation);
        if (param !== null) {
            const err = new InvalidIdError(param);
            err.param = param;
            done(err);
            return;
        }
        if (!client.scopes.includes(operation.scope)) {
            done(new InsufficientScopeError(operation.scope, operation.action));
            return;
        }
        done();
    });
}, { name: 'scope', dependencies: ['rate-limit'] });
//# sourceMappingURL=scope.js.map