/** Top-level sections a reload cannot change in a running process. */
export const RESTART_ONLY = ['listen', 'trustProxy', 'log', 'store', 'ownership', 'audit', 'metrics'];
/** Top-level sections a reload applies at once. */
export const RELOADABLE = ['upstream', 'limits', 'clients', 'shutdown'];
/** The config to run with after a reload, and what changed. */
export function reloaded(running, next) {
    const needRestart = RESTART_ONLY.flatMap(key => changedPaths(running[key], next[key], key));
    const applied = RELOADABLE.flatMap(key => key === 'clients'
        ? clientChanges(running.clients, next.clients)
        : changedPaths(running[key], next[key], key));
    const kept = Object.fromEntries(RESTART_ONLY.map(key => [key, running[key]]));
    return { applied, needRestart, config: Object.freeze({ ...next, ...kept }) };
}
function isObject(value) {
    return value !== null && typeof value === 'object' && !Array.isArray(value);
}
/** Paths of the leaves that differ; a list is one leaf. */
export function changedPaths(a, b, path) {
    if (isObject(a) && isObject(b)) {
        const keys = [...new Set([...Object.keys(a), ...Object.keys(b)])];
        return keys.flatMap(k => changedPaths(a[k], b[k], `${path}.${k}`));
    }
    return JSON.stringify(a) === JSON.stringify(b) ? [] : [path];
}
/** Clients by id: added, removed, or the keys of one that changed (`clients[team-a].keys`). */
function clientChanges(before, after) {
    const old = new Map(before.map(c => [c.id, c]));
    const now = new Map(after.map(c => [c.id, c]));
    const out = [];
    for (const [id, client] of now) {
        const was = old.get(id);
        out.push(...(was === undefined ? [`clients[${id}] (added)`] : changedPaths(was, client, `clients[${id}]`)));
    }
    for (const id of old.keys())
        if (!now.has(id))
            out.push(`clients[${id}] (removed)`);
    return out;
}
//# sourceMappingURL=reload.js.map