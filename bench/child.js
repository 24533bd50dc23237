// What the two bench children share: wait for the parent's start message, start the server, report its URL,
// answer memory samples, and die with the parent (when the IPC channel closes) so no process outlives a run.

/** How often the child samples its own RSS, so the parent can ask for the peak since its last question. */
const SAMPLE_MS = 50

/**
 * @param {(options: any) => Promise<{ url: string }>} start  starts the server from the parent's options
 */
export function serveChild (start) {
  if (typeof process.send !== 'function') {
    console.error('bench child: run me through bench/run.js (I need an IPC channel)')
    process.exit(1)
  }
  let peak = process.memoryUsage.rss()
  setInterval(() => { peak = Math.max(peak, process.memoryUsage.rss()) }, SAMPLE_MS).unref()

  process.on('disconnect', () => process.exit(0))
  process.on('message', (message) => {
    if (message.type === 'start') {
      start(message.options).then(
        ({ url }) => process.send({ type: 'ready', url }),
        (err) => process.send({ type: 'failed', error: err instanceof Error ? err.stack : String(err) })
      )
    } else if (message.type === 'memory') {
      if (message.gc === true && typeof globalThis.gc === 'function') globalThis.gc()
      const { rss, heapUsed } = process.memoryUsage()
      process.send({ type: 'memory', seq: message.seq, rss, peak: Math.max(peak, rss), heapUsed })
      peak = rss // the next answer's peak is the highest value since this question
    }
  })
}
