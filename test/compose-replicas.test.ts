// What docker-compose.replicas.yml and its config files promise, read from the files themselves (no Docker
// engine here; the nginx config was also checked with `nginx -t` and run in front of two gateway processes).
import { existsSync, readFileSync } from 'node:fs'
import t from 'tap'
import { parse } from 'yaml'
import { loadConfig } from '../src/config.js'

interface Service {
  image?: string
  build?: string
  command?: string[]
  environment?: Record<string, string>
  volumes?: string[]
  ports?: string[]
  depends_on?: Record<string, { condition: string }>
}
const compose = parse(readFileSync('docker-compose.replicas.yml', 'utf8'), { merge: true }) as
  { services: Record<string, Service>, volumes: Record<string, unknown> }
const services = compose.services
const gateways = Object.entries(services).filter(([, s]) => s.build === '.')
const nginxConf = readFileSync('config/nginx-replicas.conf', 'utf8').replace(/#.*$/gm, '')

function mounts (s: Service): Array<{ source: string, target: string }> {
  return (s.volumes ?? []).map(v => { const [source, target] = v.split(':'); return { source: source!, target: target! } })
}

t.test('two gateway replicas, each with its own audit volume and name, reading one mounted config', async t => {
  t.equal(gateways.length, 2)
  const volumes = new Set<string>()
  const names = new Set<string>()
  for (const [name, s] of gateways) {
    const env = s.environment ?? {}
    const config = mounts(s).find(m => env.GATEWAY_CONFIG?.startsWith(`${m.target}/`))
    t.ok(config && existsSync(config.source + env.GATEWAY_CONFIG!.slice(config.target.length)),
      `${name}: GATEWAY_CONFIG is a file of this repository, in a mounted directory`)
    const audit = mounts(s).find(m => m.target === '/app/audit')
    t.ok(audit && audit.source in compose.volumes, `${name}: /app/audit is a named volume`)
    volumes.add(audit!.source)
    names.add(env.REPLICA!)
    t.match(env, { OHMYGPT_API_KEY: /OHMYGPT_API_KEY/, REDIS_PASSWORD: /REDIS_PASSWORD/ }, 'secrets from the environment')
    t.equal(s.depends_on?.redis?.condition, 'service_healthy')
  }
  t.equal(volumes.size, 2, 'no two replicas share an audit volume')
  t.equal(names.size, 2, 'no two replicas share an audit file name')
})

t.test('the example replica config is valid, shares buckets through the compose Redis and names its audit after the replica', async t => {
  const config = loadConfig('config/replica.yaml', { OHMYGPT_API_KEY: 'sk-x', REDIS_PASSWORD: 'p%40ss', REPLICA: 'gateway-2' })
  const store = new URL(config.store.url)
  t.equal(store.protocol, 'redis:')
  t.ok(store.hostname in services, 'the Redis host is a service of the compose file')
  t.equal(store.password, 'p%40ss')
  t.equal(config.audit.file, './audit/gateway-2.jsonl', 'under /app/audit, the volume')
  t.equal(config.listen.port, 8080)
})

t.test('nginx balances over exactly the gateway services, on the port they listen on, and publishes 8080', async t => {
  const lb = Object.values(services).find(s => s.image?.startsWith('nginx'))!
  t.ok(lb, 'an nginx service')
  const conf = mounts(lb).find(m => m.target === '/etc/nginx/nginx.conf')
  t.equal(conf?.source, './config/nginx-replicas.conf')
  const servers = [...nginxConf.matchAll(/^\s*server\s+([\w.-]+):(\d+)/gm)].map(m => `${m[1]}:${m[2]}`)
  t.same(servers.sort(), gateways.map(([name]) => `${name}:8080`).sort())
  t.match(nginxConf, /^\s*listen 8080;/m)
  t.same(lb.ports, ['8080:8080'])
  for (const [name] of gateways) t.equal(lb.depends_on?.[name]?.condition, 'service_healthy')
  t.notMatch(nginxConf, /proxy_next_upstream[^;]*(timeout|http_5|non_idempotent)/, 'no retry on the other replica after a timeout or a 5xx')
  t.notMatch(nginxConf, /proxy_intercept_errors\s+on/, 'replica answers pass through untouched')
})

t.test('the audit names the caller behind nginx: nginx sets X-Forwarded-For to its peer, and only the replicas\' private network is trusted for it', async t => {
  // Without it every record's `ip` is nginx's, and one address guessing keys makes every caller's wrong key a 429.
  // Set, not appended: an X-Forwarded-For the caller sent would otherwise be believed too (the replicas trust the
  // whole private range nginx sits in). Checked by hand with nginx 1.22 in front of a gateway: a caller on
  // 127.0.0.2 sending X-Forwarded-For: 6.6.6.6 was audited as 127.0.0.2.
  t.match(nginxConf, /^\s*proxy_set_header\s+X-Forwarded-For\s+\$remote_addr;/m)
  t.notMatch(nginxConf, /\$proxy_add_x_forwarded_for/)
  const config = loadConfig('config/replica.yaml', { OHMYGPT_API_KEY: 'sk-x', REDIS_PASSWORD: 'p', REPLICA: 'gateway-1' })
  t.same(config.trustProxy, ['uniquelocal'], 'nginx\'s address on the compose network')
  for (const [name, service] of gateways) t.same(service.ports ?? [], [], `${name} publishes no port: only nginx reaches it`)
})

t.test('Redis keeps no data on disk and needs the password', async t => {
  const redis = services.redis!
  const command = (redis.command ?? []).join(' ')
  t.match(command, /--save '' --appendonly no/)
  t.match(command, /--requirepass "\$\$REDIS_PASSWORD"/, 'the shell in the container expands it (compose turns $$ into $)')
  t.match(redis.environment, { REDISCLI_AUTH: /REDIS_PASSWORD/ })
})

/** An nginx duration (`75s`, `10m`, `620`) in ms. */
function nginxMs (value: string): number {
  const m = /^(\d+)(ms|s|m|h)?$/.exec(value)
  if (m === null) throw new Error(`not an nginx duration: ${value}`)
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 'ms' | 's' | 'm' | 'h' ?? 's']
}

t.test('nginx waits on a replica longer than the replica waits on a generation, so a slow model is not a 503 nginx makes up', async t => {
  // A non-streamed POST /v1/responses has its headers only when the model is done, and a stream may be quiet for
  // as long between events: the replica allows upstream.generationTimeoutMs for each. nginx cutting it sooner
  // answers 503 gateway_unavailable ("no replica is reachable") while the generation goes on upstream, and the
  // SDKs retry a 503: a second generation, charged twice.
  const config = loadConfig('config/replica.yaml', { OHMYGPT_API_KEY: 'sk-x', REDIS_PASSWORD: 'p', REPLICA: 'gateway-1' })
  const read = /^\s*proxy_read_timeout\s+(\S+);/m.exec(nginxConf)
  t.ok(read, 'proxy_read_timeout is set')
  t.ok(nginxMs(read![1]!) > config.upstream.generationTimeoutMs,
    `proxy_read_timeout ${read![1]} is longer than upstream.generationTimeoutMs (${config.upstream.generationTimeoutMs} ms)`)
})

t.test('a body over nginx\'s own limit gets OpenAI\'s envelope, not nginx\'s HTML page', async t => {
  // client_max_body_size is refused by nginx itself, before any replica sees the call.
  const page = /^\s*error_page\s+([\d\s]+)=\s*(@\w+);/gm
  const to413 = [...nginxConf.matchAll(page)].find(m => m[1]!.split(/\s+/).includes('413'))
  t.ok(to413, 'error_page names 413')
  const location = new RegExp(`location ${to413?.[2]} \\{([\\s\\S]*?)\\n\\s*\\}`).exec(nginxConf)?.[1] ?? ''
  const body = /return 413 '([^']*)'/.exec(location)?.[1]
  t.ok(body, 'answered 413 with a body of its own')
  t.match(JSON.parse(body ?? '{}'), { error: { code: 'request_too_large', type: 'invalid_request_error', param: null, message: String } })
  t.match(location, /default_type application\/json;/)
})
