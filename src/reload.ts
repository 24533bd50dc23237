// What a config reload changes: which keys a running gateway takes over at once, and which keep their running
// value until a restart because they are fixed when the process starts (the listening socket and its timeouts,
// the audit file, the rate-limit store's connection, the ownership cache, the logger, the metrics listener).
// Pure: app.ts applies the result. Only key paths are reported, never values (the upstream token is one).
import type { ClientConfig, GatewayConfig } from './config.js'

/** Top-level sections a reload cannot change in a running process. */
export const RESTART_ONLY = ['listen', 'trustProxy', 'log', 'store', 'ownership', 'audit', 'metrics'] as const
/** Top-level sections a reload applies at once. */
export const RELOADABLE = ['upstream', 'limits', 'clients', 'shutdown'] as const

export interface ConfigChange {
  /** changed keys now in force: `upstream.apiKey`, `limits.bodyBytes`, `clients[team-b] (added)` */
  applied: string[]
  /** changed keys that keep their running value until the process restarts: `listen.port` */
  needRestart: string[]
}

/** The config to run with after a reload, and what changed. */
export function reloaded (running: GatewayConfig, next: GatewayConfig): ConfigChange & { config: GatewayConfig } {
  const needRestart = RESTART_ONLY.flatMap(key => changedPaths(running[key], next[key], key))
  const applied = RELOADABLE.flatMap(key => key === 'clients'
    ? clientChanges(running.clients, next.clients)
    : changedPaths(running[key], next[key], key))
  const kept = Object.fromEntries(RESTART_ONLY.map(key => [key, running[key]]))
  return { applied, needRestart, config: Object.freeze({ ...next, ...kept }) }
}

function isObject (value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value)
}

/** Paths of the leaves that differ; a list is one leaf. */
export function changedPaths (a: unknown, b: unknown, path: string): string[] {
  if (isObject(a) && isObject(b)) {
    const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])]
    return keys.flatMap(k => changedPaths(a[k], b[k], `${path}.${k}`))
  }
  return JSON.stringify(a) === JSON.stringify(b) ? [] : [path]
}

/** Clients by id: added, removed, or the keys of one that changed (`clients[team-a].keys`). */
function clientChanges (before: readonly ClientConfig[], after: readonly ClientConfig[]): string[] {
  const old = new Map(before.map(c => [c.id, c]))
  const now = new Map(after.map(c => [c.id, c]))
  const out: string[] = []
  for (const [id, client] of now) {
    const was = old.get(id)
    out.push(...(was === undefined ? [`clients[${id}] (added)`] : changedPaths(was, client, `clients[${id}]`)))
  }
  for (const id of old.keys()) if (!now.has(id)) out.push(`clients[${id}] (removed)`)
  return out
}
