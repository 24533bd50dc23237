// The image contract, read from the Dockerfile itself (no Docker engine here; ../shared/tools/container-check
// builds and runs it for real). These are the properties the issues ask of the runtime image.
import { existsSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { parse } from 'yaml'

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

t.test('the compose files and the README mount the gateway\'s config directory, not the file: a reload must see a config saved by rename', async t => {
  // A bind mount of one file holds the inode it was given. A file saved by rename (sed -i, most editors) is a new
  // inode on the host, which the container never sees: SIGHUP then reloads the old text ("nothing to apply") and
  // a key revoked in the file keeps working. A mounted directory shows the new file. (Checked by hand with mount
  // --bind: after sed -i on the host, the file mount showed the old text and the revoked key got 404, the
  // directory mount the new one and 401.)
  for (const file of ['docker-compose.yml', 'docker-compose.replicas.yml']) {
    const services = (parse(readFileSync(file, 'utf8'), { merge: true }) as { services: Record<string, { build?: string, environment?: Record<string, string>, volumes?: string[] }> }).services
    for (const [name, service] of Object.entries(services).filter(([, s]) => s.build === '.')) {
      const configFile = service.environment?.GATEWAY_CONFIG ?? '/app/config/gateway.yaml'
      const mount = (service.volumes ?? []).map(v => v.split(':')).find(([, target]) => configFile === target || configFile.startsWith(`${target}/`))
      t.ok(mount, `${file} ${name}: ${configFile} is mounted`)
      t.not(mount?.[1], configFile, `${file} ${name}: the mount is the config's directory, not the file`)
      t.ok(mount !== undefined && statSync(mount[0]!).isDirectory(), `${file} ${name}: its source is a directory`)
      t.ok(mount !== undefined && existsSync(join(mount[0]!, configFile.slice(mount[1]!.length))), `${file} ${name}: the file is in it`)
    }
  }
  const readme = readFileSync('README.md', 'utf8')
  const fileMounts = [...readme.matchAll(/-v "?\$PWD\/[^\s"]*\.ya?ml:[^\s"]*"?/g)].map(m => m[0])
  t.same(fileMounts, [], 'no docker run line of the README mounts a config file on its own')
})

t.test('the compose files run the gateway under an init: a stop sent while Node itself starts is not lost', async t => {
  // As PID 1 without an init, a SIGTERM that comes before the bin's first line of JavaScript (src/start-signals.ts)
  // finds Node's default, which the kernel does not apply to PID 1: the stop is dropped, and `docker stop` waits its
  // whole stop_grace_period.
  for (const file of ['docker-compose.yml', 'docker-compose.replicas.yml']) {
    const services = (parse(readFileSync(file, 'utf8'), { merge: true }) as { services: Record<string, { build?: string, init?: boolean }> }).services
    const gateways = Object.entries(services).filter(([, s]) => s.build === '.')
    t.ok(gateways.length > 0, `${file}: a gateway service`)
    for (const [name, service] of gateways) t.equal(service.init, true, `${file} ${name}: init: true`)
  }
})

t.test('the compose files give every gateway the audit HMAC key from the environment, and no other service', async t => {
  // Without AUDIT_HMAC_KEY the chain is plain sha256, which whoever can write the audit volume can recompute after
  // an edit (README: Guarantees); a compose file that does not pass it leaves a platform team no way to set it.
  for (const file of ['docker-compose.yml', 'docker-compose.replicas.yml']) {
    const services = (parse(readFileSync(file, 'utf8'), { merge: true }) as { services: Record<string, { build?: string, environment?: Record<string, string> }> }).services
    for (const [name, service] of Object.entries(services)) {
      const key = service.environment?.AUDIT_HMAC_KEY
      if (service.build === '.') t.match(key, /^\$\{AUDIT_HMAC_KEY(:-)?\}$/, `${file} ${name}: from the environment`)
      else t.equal(key, undefined, `${file} ${name}: not given the key`)
    }
  }
})
