import { parseConfig } from '../src/config.js';
import { startServer } from '../src/server.js';
export async function startGateway({ config }) {
    const app = await startServer(parseConfig(config, {}, '(bench)'));
    return { url: `http://127.0.0.1:${app.server.address().port}` };
}
//# sourceMappingURL=gateway.js.map