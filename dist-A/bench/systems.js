// The processes the bench measures: each system (upstream, bare proxy, gateway) forked into its own process,
// its memory read from /proc/<pid>/status, and every one of them ended, however the bench ends.
import { fork } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
const CHILD = join(dirname(fileURLToPath(import.meta.url)), 'child.js');
const running = new Set();
process.on('exit', () => { for (const child of running)
    child.kill('SIGKILL'); });
export async function startSystem(message) {
    const child = fork(CHILD, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    running.add(child);
    let stopping = false;
    const exited = new Promise(resolve => child.once('exit', (code, signal) => {
        running.delete(child);
        if (!stopping) {
            system.exit = `exited with code ${code}, signal ${signal}`;
            console.error(`bench: the ${message.system} process ${system.exit}`);
        }
        resolve();
    }));
    const system = {
        name: message.system,
        url: '',
        pid: child.pid,
        exit: null,
        async stop() {
            stopping = true;
            if (child.connected)
                child.disconnect(); // the child exits when the parent lets go of it
            const kill = setTimeout(() => child.kill('SIGKILL'), 5000);
            await exited;
            clearTimeout(kill);
        }
    };
    const answer = await new Promise((resolve, reject) => {
        child.once('message', resolve);
        child.once('exit', () => reject(new Error(`the ${message.system} process ended before it listened`)));
        child.send(message);
    });
    if ('error' in answer)
        throw new Error(`the ${message.system} process failed to start:\n${answer.error}`);
    system.url = answer.url;
    return system;
}
/** The process's memory from /proc (Linux), or null where there is none. */
export function memoryOf(pid) {
    try {
        const status = readFileSync(`/proc/${pid}/status`, 'utf8');
        const kib = (field) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
        return { rss: kib('VmRSS'), peak: kib('VmHWM') };
    }
    catch {
        return null;
    }
}
/** Linux's USER_HZ: /proc/<pid>/stat counts CPU time in these ticks (100 a second on every mainstream arch). */
const TICKS_PER_SECOND = 100;
/**
 * CPU time the process has used so far, all its threads (user + system), in µs, from /proc (Linux); null where
 * there is none. Its resolution is one tick (10 ms): about 1 % or less of what a system uses in one of the bench's
 * runs (5 s, a second of CPU or more).
 */
export function cpuTimeOf(pid) {
    try {
        const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
        // The fields after the command name, which is in parentheses and may hold spaces: utime and stime are the
        // 14th and 15th fields of the line, the 12th and 13th after the name.
        const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        const ticks = Number(fields[11]) + Number(fields[12]);
        return Number.isFinite(ticks) ? ticks * 1e6 / TICKS_PER_SECOND : null;
    }
    catch {
        return null;
    }
}
/** Restarts the process's peak RSS from its current RSS (Linux ≥ 4.0), so the next peak is that of one run. */
export function resetPeak(pid) {
    try {
        writeFileSync(`/proc/${pid}/clear_refs`, '5');
    }
    catch {
        // no /proc: the peak stays the one since the process started
    }
}
//# sourceMappingURL=systems.js.map