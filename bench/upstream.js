// Bench child: the fake OhMyGPT upstream, alone in its own process and event loop.
import { startFakeOhMyGPT } from '../dist/demo/fake-ohmygpt.js'
import { serveChild } from './child.js'

serveChild(async ({ apiKey }) => {
  const { url } = await startFakeOhMyGPT({ apiKey, host: '127.0.0.1', port: 0 })
  return { url }
})
