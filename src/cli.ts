#!/usr/bin/env node
// The ohmygpt-gateway bin. For `start`, signals are answered before anything else is loaded (src/start-signals.ts):
// a stop or a SIGHUP that comes while Node loads the gateway's code must be neither lost nor the end of it. Then
// the commands (src/cli/main.ts).
import { answerSignalsWhileStarting } from './start-signals.js'

if (process.argv[2] === 'start') answerSignalsWhileStarting()
const { main } = await import('./cli/main.js')
await main(process.argv.slice(2))
