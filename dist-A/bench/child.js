/** Loads only the system's own modules, so that a process's memory is that of its system alone. */
async function start(message) {
    switch (message.system) {
        case 'upstream': return (await import('./upstream.js')).startUpstream(message.options);
        case 'bare': return (await import('./bare-proxy.js')).startBareProxy(message.options);
        case 'gateway': return (await import('./gateway.js')).startGateway(message.options);
    }
}
const send = process.send?.bind(process);
if (send === undefined) {
    console.error('bench/child: started by bench/run.ts only (it needs an IPC channel)');
    process.exit(1);
}
process.on('disconnect', () => process.exit(0));
process.once('message', (message) => {
    start(message).then(({ url }) => send({ url }), (err) => send({ error: err instanceof Error ? err.stack ?? err.message : String(err) }));
});
export {};
//# sourceMappingURL=child.js.map