// The two pino loggers: the operational log (redacted, to stdout) and the audit log (bare JSONL records).
import { pino, type LoggerOptions } from 'pino'

/** Anything that could carry key material, wherever it turns up in a log object. */
export const REDACT_PATHS = [
  'req.headers.authorization', 'req.headers["x-api-key"]', 'req.headers["api-key"]', 'req.headers.cookie',
  'headers.authorization', 'headers["x-api-key"]', 'headers["api-key"]', 'headers.cookie',
  'res.headers["set-cookie"]', 'apiKey', '*.apiKey', 'upstream.apiKey', 'key', '*.key'
]

export function appLoggerOptions (level: string): LoggerOptions {
  return { level, redact: { paths: REDACT_PATHS, censor: '[redacted]' } }
}

export interface AuditWriter {
  write (record: object): void
  /** flush what is buffered and close the file (on shutdown) */
  close (): void
}

/**
 * Audit records as JSON lines through pino's destination (sonic-boom). A pino logger is not used for the records
 * themselves: a record must hold exactly its documented fields, with no level, pid or hostname, and pino cannot
 * write a line without its level field cleanly. Writes are synchronous, so a record is on disk by the time its
 * response is done; "-" writes to stdout.
 */
export function createAuditWriter (file: string, onError: (err: Error) => void): AuditWriter {
  const destination = pino.destination({ dest: file === '-' ? 1 : file, mkdir: true, sync: true })
  // A failed write (disk full, file gone read-only) must not take the gateway down: it is reported to the
  // operational log, and the gateway keeps serving.
  destination.on('error', onError)
  return {
    write (record) { destination.write(JSON.stringify(record) + '\n') },
    close () {
      // Writes are synchronous, so nothing is buffered unless a write failed; data that could not be written
      // is dropped here rather than retried forever.
      if (file !== '-') destination.destroy()
    }
  }
}
