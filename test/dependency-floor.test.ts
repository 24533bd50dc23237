// The dependency floor (test/fixtures/dependency-floor.ts) checked against what is really installed, plus the
// proof that the checker can fail: synthetic `npm ls` trees with copies below the floor, nested ones included.
// `npm audit` is not usable here (the registry's audit endpoint is unreachable), so this is the check.
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import {
  DEPENDENCY_FLOOR,
  checkFloor,
  acceptedRisks,
  checkVersion,
  collectInstalled,
  compareVersions,
  formatViolation,
  parseVersion,
  type NpmLsNode,
  type PackageFloor
} from './fixtures/dependency-floor.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))

function floorOf (name: string): PackageFloor {
  const pkg = DEPENDENCY_FLOOR.find((p) => p.name === name)
  if (pkg === undefined) throw new Error(`no floor for ${name}`)
  return pkg
}

function minOf (name: string, line: number): string {
  const l = floorOf(name).lines.find((x) => x.line === line)
  if (l === undefined) throw new Error(`no ${line}.x line for ${name}`)
  return l.minVersion
}

/** A tree shaped like `npm ls --all --json` output, every floored package at (or above) its floor. */
function healthyTree (): NpmLsNode {
  return {
    name: 'ohmygpt-gateway',
    version: '0.1.0',
    dependencies: {
      fastify: {
        version: minOf('fastify', 5),
        dependencies: { '@fastify/proxy-addr': { version: minOf('@fastify/proxy-addr', 5) } }
      },
      '@fastify/http-proxy': {
        version: minOf('@fastify/http-proxy', 11),
        dependencies: {
          '@fastify/reply-from': {
            version: minOf('@fastify/reply-from', 12),
            dependencies: { undici: { version: '7.99.0' } }
          }
        }
      },
      undici: { version: minOf('undici', 7) },
      tap: {
        version: '21.8.0',
        dependencies: { 'node-gyp': { version: '12.4.0', dependencies: { undici: { version: minOf('undici', 6) } } } }
      }
    }
  }
}

let liveTree: NpmLsNode | undefined
function installedTree (): NpmLsNode {
  if (liveTree !== undefined) return liveTree
  // `npm ls` exits non-zero on extraneous / invalid / missing packages but still prints the tree: parse stdout.
  const res = spawnSync('npm', ['ls', '--all', '--json'], {
    cwd: ROOT,
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
    env: { ...process.env, npm_config_loglevel: 'silent' }
  })
  if (res.error !== undefined) throw res.error
  if (res.stdout.trim() === '') throw new Error(`npm ls printed nothing (exit ${String(res.status)}): ${res.stderr}`)
  liveTree = JSON.parse(res.stdout) as NpmLsNode
  return liveTree
}

t.test('every installed copy of a floored package, nested ones included, is at or above its floor', async (t) => {
  const violations = checkFloor(installedTree())
  for (const v of violations) t.fail(formatViolation(v), { violation: v })
  t.equal(violations.length, 0, 'no installed copy is below the dependency floor')
})

t.test('a copy below the floor passes only on recorded mitigations, each printed and backed by a test file', async (t) => {
  for (const risk of acceptedRisks(installedTree())) {
    t.comment(`accepted until a fixed release is installable: ${risk.package}@${risk.version} lacks ${risk.advisory.id} ` +
      `(fixed in ${risk.advisory.fixedIn}); mitigated: ${risk.mitigation.how}; test: ${risk.mitigation.test}`)
    t.ok(existsSync(risk.mitigation.test), `${risk.advisory.id}: its mitigation test ${risk.mitigation.test} exists`)
  }
  const proxyFloor = DEPENDENCY_FLOOR.find((p) => p.name === '@fastify/http-proxy')!
  const unmitigated = structuredClone(proxyFloor)
  for (const line of unmitigated.lines) for (const a of line.advisories) delete a.mitigation
  t.ok(checkVersion(unmitigated, '11.6.3'), 'without the mitigations the same version fails')
})

t.test('every package in the floor table is found in the installed tree', async (t) => {
  const installed = collectInstalled(installedTree(), new Set(DEPENDENCY_FLOOR.map((p) => p.name)))
  for (const pkg of DEPENDENCY_FLOOR) {
    const copies = installed.filter((c) => c.name === pkg.name)
    if (!pkg.expectInstalled) {
      t.comment(`${pkg.name}: not expected to be installed (${copies.length} cop${copies.length === 1 ? 'y' : 'ies'} found)`)
      continue
    }
    t.ok(copies.length > 0, `${pkg.name} is installed (${copies.map((c) => c.version).join(', ') || 'none'})`)
  }
})

t.test('the installed tree includes the nested undici 6.x under tap, and the walk finds it', async (t) => {
  const undici = collectInstalled(installedTree(), new Set(['undici']))
  const majors = new Set(undici.map((c) => parseVersion(c.version)?.major))
  t.ok(majors.has(7), 'undici 7.x is installed')
  t.ok(majors.has(6), 'a nested undici 6.x is installed and found')
  const six = undici.find((c) => parseVersion(c.version)?.major === 6)
  t.ok(six !== undefined && six.paths.every((p) => p.split(' > ').length > 2), 'the 6.x copy is reported with its nested path')
})

t.test('the floor table is consistent: each line floor is the highest fixed version of its advisories', async (t) => {
  for (const pkg of DEPENDENCY_FLOOR) {
    t.ok(pkg.lines.length > 0, `${pkg.name} lists at least one major line`)
    for (const line of pkg.lines) {
      t.ok(parseVersion(line.minVersion)?.major === line.line, `${pkg.name} ${line.line}.x floor ${line.minVersion} is in its line`)
      t.ok(line.advisories.length > 0, `${pkg.name} ${line.line}.x names the advisories its floor is for`)
      const highest = line.advisories.map((a) => a.fixedIn).sort(compareVersions).at(-1)
      t.equal(line.minVersion, highest, `${pkg.name} ${line.line}.x floor is the highest fixedIn`)
      for (const a of line.advisories) {
        t.match(a.id, /^(GHSA(-[23456789cfghjmpqrvwx]{4}){3}|CVE-\d{4}-\d{4,})$/, `${a.id} is a GHSA or CVE id`)
        if (a.cve !== undefined) t.match(a.cve, /^CVE-\d{4}-\d{4,}$/, `${a.id} has a well-formed CVE id`)
        t.ok(parseVersion(a.fixedIn)?.major === line.line, `${a.id} is fixed inside the ${line.line}.x line`)
      }
    }
  }
})

t.test('a tree with every package at its floor has no violations', async (t) => {
  t.same(checkFloor(healthyTree()), [])
})

t.test('an installed undici below its line\'s floor, nested under another package, fails and names GHSA-9fm3-97px-rjf6', async (t) => {
  const tree = healthyTree()
  const replyFrom = tree.dependencies?.['@fastify/http-proxy']?.dependencies?.['@fastify/reply-from']
  if (replyFrom?.dependencies === undefined) throw new Error('fixture shape')
  replyFrom.dependencies.undici = { version: '7.30.0' }
  const [v, ...rest] = checkFloor(tree)
  t.equal(rest.length, 0, 'exactly one violation')
  t.equal(v?.package, 'undici')
  t.equal(v?.version, '7.30.0')
  t.equal(v?.reason, 'below-floor')
  t.equal(v?.path, 'ohmygpt-gateway > @fastify/http-proxy@' + minOf('@fastify/http-proxy', 11) +
    ' > @fastify/reply-from@' + minOf('@fastify/reply-from', 12) + ' > undici@7.30.0')
  t.same(v?.advisoryIds, ['GHSA-9fm3-97px-rjf6'], 'only the advisory 7.30.0 lacks the fix for')
  t.match(formatViolation(v!), /undici@7\.30\.0 at .*reply-from.* needs undici >=7\.30\.1 \(7\.x\) for GHSA-9fm3-97px-rjf6/)
})

t.test('an installed undici@7.0.0 nested deep fails and names every 7.x advisory from the decompression chain on', async (t) => {
  const tree = healthyTree()
  const gyp = tree.dependencies?.tap?.dependencies?.['node-gyp']
  if (gyp === undefined) throw new Error('fixture shape')
  gyp.dependencies = { foo: { version: '1.0.0', dependencies: { undici: { version: '7.0.0' } } } }
  const [v] = checkFloor(tree)
  t.equal(v?.version, '7.0.0')
  t.equal(v?.path, 'ohmygpt-gateway > tap@21.8.0 > node-gyp@12.4.0 > foo@1.0.0 > undici@7.0.0')
  t.ok(v?.advisoryIds.includes('GHSA-g9mf-h72j-4rw9'), 'names GHSA-g9mf-h72j-4rw9 (fixed in 7.18.2)')
  t.ok(v?.advisoryIds.includes('GHSA-w293-vg96-wgc3'), 'names GHSA-w293-vg96-wgc3 (fixed in 7.29.1)')
  t.ok(v?.advisoryIds.includes('GHSA-9fm3-97px-rjf6'), 'names GHSA-9fm3-97px-rjf6 (fixed in 7.30.1)')
})

t.test('a nested undici 6.x below the 6.x floor fails against the 6.x floor, not the 7.x one', async (t) => {
  const v = checkVersion(floorOf('undici'), '6.29.0')
  t.equal(v?.reason, 'below-floor')
  t.equal(v?.requiredFloor, 'undici >=6.29.1 (6.x)')
  t.same(v?.advisoryIds, ['GHSA-9fm3-97px-rjf6'])
  t.equal(checkVersion(floorOf('undici'), '6.29.1'), null, '6.29.1 is at the 6.x floor and passes')
})

t.test('a fastify@5.0.0 at the top level fails and names the content-type bypass advisories', async (t) => {
  const tree = healthyTree()
  tree.dependencies!.fastify!.version = '5.0.0'
  const [v, ...rest] = checkFloor(tree)
  t.equal(rest.length, 0)
  t.equal(v?.path, 'ohmygpt-gateway > fastify@5.0.0')
  t.equal(v?.requiredFloor, 'fastify >=5.12.6 (5.x)')
  for (const id of ['GHSA-mg2h-6x62-wpwc', 'GHSA-jx2c-rxcm-jvmq', 'GHSA-247c-9743-5963', 'GHSA-389g-gv7q-r4x8']) {
    t.ok(v?.advisoryIds.includes(id), `names ${id}`)
  }
})

t.test('a version from a major line older than any listed line fails (fastify 4.x, undici 5.x, proxy-addr 4.x)', async (t) => {
  const f4 = checkVersion(floorOf('fastify'), '4.29.1')
  t.equal(f4?.reason, 'no-fixed-release-in-line')
  t.equal(f4?.requiredFloor, 'fastify >=5.12.6 (5.x)')
  t.ok(f4?.advisoryIds.includes('GHSA-p68q-wchp-6fh7'), 'names GHSA-p68q-wchp-6fh7')
  const u5 = checkVersion(floorOf('undici'), '5.29.0')
  t.equal(u5?.reason, 'no-fixed-release-in-line')
  t.equal(u5?.requiredFloor, 'undici >=6.29.1 (6.x)')
  const pa = checkVersion(floorOf('@fastify/proxy-addr'), '4.1.0')
  t.same(pa?.advisoryIds, ['CVE-2026-92395'])
})

t.test('@fastify/http-proxy and @fastify/reply-from below their floors fail and name the proxy advisories', async (t) => {
  // 11.5.0 lacks fixes that have no mitigation (the prefix escapes of 11.6.0), so it fails, naming every fix it lacks.
  const hp = checkVersion(floorOf('@fastify/http-proxy'), '11.5.0')
  t.equal(hp?.reason, 'below-floor')
  t.same(hp?.advisoryIds, ['GHSA-mx7v-qhg9-2mvv', 'GHSA-7hrw-592w-9wh2', 'GHSA-qv33-689p-2xq5', 'CVE-2026-120213', 'GHSA-6fhg-8r33-fcww', 'GHSA-q659-79j2-32h5', 'GHSA-29w6-p7r8-xmf9', 'GHSA-7mjf-mp6r-87p8', 'GHSA-w3r4-6w5h-3vrc'])
  const rf = checkVersion(floorOf('@fastify/reply-from'), '12.6.1')
  t.same(rf?.advisoryIds, ['GHSA-gwhp-pf74-vj37', 'GHSA-v574-6498-x57v', 'GHSA-j425-jw94-m29r', 'GHSA-vp2r-3vgv-32g9'])
})

t.test('a prerelease of the floor version is below the floor', async (t) => {
  const v = checkVersion(floorOf('undici'), '7.30.1-rc.1')
  t.equal(v?.reason, 'below-floor')
  t.same(v?.advisoryIds, ['GHSA-9fm3-97px-rjf6'])
})

t.test('versions at or above the floor pass, including a major newer than every listed line', async (t) => {
  for (const pkg of DEPENDENCY_FLOOR) {
    for (const line of pkg.lines) {
      t.equal(checkVersion(pkg, line.minVersion), null, `${pkg.name}@${line.minVersion} passes`)
      const p = parseVersion(line.minVersion)!
      t.equal(checkVersion(pkg, `${p.major}.${p.minor}.${p.patch + 1}`), null, `${pkg.name} one patch above passes`)
      t.equal(checkVersion(pkg, `${p.major}.${p.minor + 1}.0`), null, `${pkg.name} one minor above passes`)
    }
  }
  t.equal(checkVersion(floorOf('undici'), '9.0.0'), null, 'undici 9.x (newer than every listed line) is not flagged')
  t.equal(checkVersion(floorOf('undici'), '7.30.1+build.5'), null, 'build metadata does not lower a version')
})

t.test('a version that is not semver fails instead of passing silently', async (t) => {
  const v = checkVersion(floorOf('fastify'), 'github:fastify/fastify#main')
  t.equal(v?.reason, 'unparseable-version')
})

t.test('copies are de-duplicated by package@version, keeping every path', async (t) => {
  const tree: NpmLsNode = {
    name: 'root',
    dependencies: {
      a: { version: '1.0.0', dependencies: { undici: { version: '7.1.0' } } },
      b: { version: '1.0.0', dependencies: { undici: { version: '7.1.0' } } },
      undici: { version: '7.1.0' },
      c: { version: '1.0.0', dependencies: { undici: { missing: true } } }
    }
  }
  const violations = checkFloor(tree)
  t.equal(violations.length, 1, 'one violation for undici@7.1.0')
  t.same(violations[0]?.paths, ['root > a@1.0.0 > undici@7.1.0', 'root > b@1.0.0 > undici@7.1.0', 'root > undici@7.1.0'])
  t.match(formatViolation(violations[0]!), /and 2 more paths/)
})

t.test('compareVersions orders versions like semver, prereleases below their release', async (t) => {
  const ordered = [
    '1.0.0-alpha', '1.0.0-alpha.1', '1.0.0-alpha.beta', '1.0.0-beta', '1.0.0-beta.2', '1.0.0-beta.11',
    '1.0.0-rc.1', '1.0.0', '1.0.1', '1.2.0', '1.10.0', '2.0.0-0', '2.0.0', '10.0.0'
  ]
  for (let i = 0; i < ordered.length; i++) {
    for (let j = 0; j < ordered.length; j++) {
      const a = ordered[i]!
      const b = ordered[j]!
      t.equal(compareVersions(a, b), Math.sign(i - j), `${a} vs ${b}`)
    }
  }
  t.equal(compareVersions('1.0.0+build.1', '1.0.0'), 0, 'build metadata is ignored')
  t.throws(() => compareVersions('1.0', '1.0.0'), TypeError)

  // Cross-check with the semver package when it is resolvable from the project root (it comes with tap/fastify;
  // it is not a direct dependency, so it is loaded by require and not imported).
  let semver: { compare(a: string, b: string): number } | undefined
  try {
    semver = createRequire(import.meta.url)('semver') as { compare(a: string, b: string): number }
  } catch {
    semver = undefined
  }
  if (semver === undefined) {
    t.comment('semver is not resolvable here; cross-check skipped')
    return
  }
  const sample = [...ordered, '5.12.6', '5.12.5', '7.30.1-rc.1', '7.30.1', '7.30.2', '6.29.1', '12.8.1', '11.6.10', '11.6.9']
  for (const a of sample) {
    for (const b of sample) t.equal(compareVersions(a, b), semver.compare(a, b), `agrees with semver: ${a} vs ${b}`)
  }
})
