// `ohmygpt-gateway audit verify [--config FILE] [--head HASH] [FILES...]`: check the hash chain over the whole series.
// Exit 0 printing `ok: N records, chain intact, head <hash>` (and a note per torn line, loss or pruning the chain
// records); exit 1 naming the file, line and seq of the first bad record. With --head (a head published earlier),
// the series passes only when that hash is the hash of one of its verified records: the end was not cut off.
import { parseArgs } from 'node:util'
import { chainHasher } from '../audit/chain.js'
import { verifySeries } from '../audit/verify.js'
import { auditFiles, auditHmacKey, CONFIG_OPTION, UsageError } from './common.js'

const HEAD = /^[0-9a-f]{64}$/

export async function auditVerify (args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args, options: { ...CONFIG_OPTION, head: { type: 'string' } }, allowPositionals: true, strict: true
  })
  const head = values.head?.toLowerCase()
  if (head !== undefined && !HEAD.test(head)) throw new UsageError('--head takes a record hash: 64 hexadecimal characters')
  const hasher = chainHasher(auditHmacKey(process.env))
  const result = await verifySeries(await auditFiles(values.config, positionals), hasher, { head })
  if (result.ok) {
    console.log(`ok: ${result.records} records, chain intact, head ${result.head}`)
    for (const note of result.notes) console.log(`note: ${note}`)
    return
  }
  console.error(`FAILED: ${result.file}:${result.line}${result.seq === null ? '' : ` (seq ${result.seq})`}: ${result.reason}`)
  process.exitCode = 1
}
