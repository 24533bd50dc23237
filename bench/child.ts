// Entry of every server process the bench forks: one system per process, so none shares an event loop with
// another or with the load generator. The parent sends what to start; the child answers with its URL, and
// exits when the parent lets go of it (or dies), so no process outlives a run.
import type { BareProxyOptions } from './bare-proxy.js'
import type { UpstreamOptions } from './upstream.js'

export type StartMessage =
  | { system: 'upstream', options: UpstreamOptions }
  | { system: 'bare', options: BareProxyOptions }
  | { system: 'gateway', options: { config: unknown } }

export type ChildMessage = { url: string } | { error: string }

/** Loads only the system's own modules, so that a process's memory is that of its system alone. */
async function start (message: StartMessage): Promise<{ url: string }> {
  switch (message.system) {
    case 'upstream': return (await import('./upstream.js')).startUpstream(message.options)
    case 'bare': return (await import('./bare-proxy.js')).startBareProxy(message.options)
    case 'gateway': return (await import('./gateway.js')).startGateway(message.options)
  }
}

const send = process.send?.bind(process)
if (send === undefined) {
  console.error('bench/child: started by bench/run.ts only (it needs an IPC channel)')
  process.exit(1)
}
process.on('disconnect', () => process.exit(0))
process.once('message', (message: StartMessage) => {
  start(message).then(
    ({ url }) => send({ url } satisfies ChildMessage),
    (err: unknown) => send({ error: err instanceof Error ? err.stack ?? err.message : String(err) } satisfies ChildMessage)
  )
})
