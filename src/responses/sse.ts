// Server-Sent Events passed through one event at a time: each event goes out as soon as its blank line has
// arrived (nothing is buffered whole), and the JSON in its `data:` line is handed to `rewrite`, which may return
// another object (the gateway takes its owner key out of response objects) or the same one (the bytes pass as they
// came). Lines that are not JSON (`data: [DONE]`, comments, `event:`, `id:`, `retry:`) pass untouched.
import { Transform, type TransformCallback } from 'node:stream'

export type EventRewrite = (data: unknown) => unknown

const NEWLINE = 0x0a

export class SseRewriter extends Transform {
  readonly #rewrite: EventRewrite
  /** bytes of an event whose blank line has not come yet */
  #pending: Buffer[] = []

  constructor (rewrite: EventRewrite) {
    super()
    this.#rewrite = rewrite
  }

  override _transform (chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    let start = 0
    for (let i = chunk.indexOf(NEWLINE); i !== -1; i = chunk.indexOf(NEWLINE, i + 1)) {
      const line = chunk.subarray(start, i + 1)
      start = i + 1
      if (isBlank(line)) {
        this.#pending.push(line)
        this.push(this.#event(Buffer.concat(this.#pending)))
        this.#pending = []
      } else {
        this.#pending.push(line)
      }
    }
    if (start < chunk.length) this.#pending.push(chunk.subarray(start))
    done()
  }

  override _flush (done: TransformCallback): void {
    if (this.#pending.length > 0) this.push(this.#event(Buffer.concat(this.#pending)))
    done()
  }

  /** One whole event, with each JSON data line rewritten where `rewrite` changed it. */
  #event (bytes: Buffer): Buffer {
    const text = bytes.toString('utf8')
    let changed = false
    const lines = text.split('\n').map(line => {
      if (!line.startsWith('data:')) return line
      const payload = line.slice(5).replace(/\r$/, '').trimStart()
      if (!payload.startsWith('{')) return line
      let data: unknown
      try {
        data = JSON.parse(payload)
      } catch {
        return line
      }
      const rewritten = this.#rewrite(data)
      if (rewritten === data) return line
      changed = true
      return `data: ${JSON.stringify(rewritten)}`
    })
    return changed ? Buffer.from(lines.join('\n')) : bytes
  }
}

function isBlank (line: Buffer): boolean {
  return line.length === 1 || (line.length === 2 && line[0] === 0x0d)
}
