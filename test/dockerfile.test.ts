// The image contract, read from the Dockerfile itself (no Docker engine here; ../shared/tools/container-check
// builds and runs it for real). These are the properties the issues ask of the runtime image.
import { readFileSync } from 'node:fs'
import t from 'tap'

const stages = readFileSync('Dockerfile', 'utf8')
  .replace(/\\\n/g, ' ')
  .split('\n')
  .filter(line => line.trim() !== '' && !line.trim().startsWith('#'))
  .join('\n')
  .split(/^FROM /m)
  .slice(1)
const runtime = 'FROM ' + stages.at(-1)!

t.test('every stage builds on node:24-slim, and there is a separate build stage', async t => {
  t.ok(stages.length >= 2, 'multi-stage')
  for (const stage of stages) t.match(stage, /^node:24-slim\b/)
})

t.test('the runtime image installs production dependencies only and no build tools', async t => {
  t.match(runtime, /npm ci [^\n]*--omit=dev/)
  t.notMatch(runtime, /apt-get|build-essential|python3|g\+\+|\bmake\b/)
  t.notMatch(runtime, /COPY\s+(\.\s|src\b|test\b|tsconfig)/, 'no sources, tests or the whole context')
  t.match(runtime, /COPY --from=\S+ \S*dist/, 'compiled code comes from the build stage')
})

t.test('it runs as the non-root node user, exposes 8080, checks health without curl, exec-form CMD', async t => {
  t.match(runtime, /^USER node$/m)
  t.match(runtime, /^EXPOSE 8080$/m)
  t.match(runtime, /^HEALTHCHECK .*CMD \["node"/m)
  t.notMatch(runtime, /curl|wget/)
  t.match(runtime, /^CMD \["node", "dist\/cli\.js", "start"\]$/m)
})
