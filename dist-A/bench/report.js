// Small helpers to summarise rounds and print them as aligned plain-text tables.
export function median(values) {
    const sorted = [...values].sort((a, b) => a - b);
    const mid = Math.floor(sorted.length / 2);
    return sorted.length % 2 === 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}
export function spread(values) {
    return { median: median(values), min: Math.min(...values), max: Math.max(...values) };
}
export const fmt = {
    int: (n) => String(Math.round(n)),
    ms: (n) => n.toFixed(2),
    mib: (n) => n === null ? 'n/a' : (n / 1024 / 1024).toFixed(1),
    us: (n) => n === null ? 'n/a' : n.toFixed(0),
    ratio: (n) => Number.isFinite(n) ? n.toFixed(2) : 'n/a',
    spread: (s) => `${fmt.ratio(s.median)} (${fmt.ratio(s.min)}–${fmt.ratio(s.max)})`
};
/** Columns aligned: those listed in `left` to the left, the rest (numbers) to the right. */
export function table(rows, left = [0]) {
    const widths = rows[0].map((_, i) => Math.max(...rows.map(r => r[i].length)));
    return rows.map(r => r.map((cell, i) => left.includes(i) ? cell.padEnd(widths[i]) : cell.padStart(widths[i])).join('  ').trimEnd())
        .join('\n');
}
export function loud(message) {
    const bar = '!'.repeat(100);
    console.error(`\n${bar}\n${message.split('\n').map(l => `!! ${l}`).join('\n')}\n${bar}\n`);
}
//# sourceMappingURL=report.js.map