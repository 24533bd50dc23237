// The operational log: pino, redacted, to stdout, without ever blocking the gateway. (The audit trail has its own
// writer: src/audit/writer.ts.)
import type { Writable } from 'node:stream'
import type { LoggerOptions } from 'pino'

/** Anything that could carry key material, wherever it turns up in a log object. */
export const REDACT_PATHS = [
  'req.headers.authorization', 'req.headers["x-api-key"]', 'req.headers["api-key"]', 'req.headers.cookie',
  'headers.authorization', 'headers["x-api-key"]', 'headers["api-key"]', 'headers.cookie',
  'res.headers["set-cookie"]', 'apiKey', '*.apiKey', 'upstream.apiKey', 'key', '*.key'
]

/** Log bytes allowed to wait for a stdout that nobody reads before new lines are dropped. */
const MAX_WAITING_LOG_BYTES = 1024 * 1024

/**
 * Lines to stdout through Node's own stream: asynchronous for a pipe, so a full pipe (a log shipper that stopped
 * reading) cannot freeze the event loop the way pino's synchronous destination would, bounded so that it cannot
 * fill memory either, and with no synchronous flush at exit that could hang on that pipe.
 */
export function nonBlockingLines (out: Writable, limit = MAX_WAITING_LOG_BYTES): { write (line: string): void } {
  return {
    write (line) {
      if (out.writableLength <= limit) out.write(line)
    }
  }
}

export function appLoggerOptions (level: string, out: Writable = process.stdout): LoggerOptions & { stream: { write (line: string): void } } {
  return { level, redact: { paths: REDACT_PATHS, censor: '[redacted]' }, stream: nonBlockingLines(out) }
}
