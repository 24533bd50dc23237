// `ohmygpt-gateway audit verify [--config FILE] [FILES...]`: check the hash chain over the whole series.
// Exit 0 printing `ok: N records, chain intact, head <hash>` (and a note per torn line, loss or pruning the chain
// records); exit 1 naming the file, line and seq of the first bad record.
import { parseArgs } from 'node:util'
import { chainHasher } from '../audit/chain.js'
import { verifySeries } from '../audit/verify.js'
import { auditFiles, auditHmacKey, CONFIG_OPTION } from './common.js'

export async function auditVerify (args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({ args, options: CONFIG_OPTION, allowPositionals: true, strict: true })
  const hasher = chainHasher(auditHmacKey(process.env))
  const result = await verifySeries(await auditFiles(values.config, positionals), hasher)
  if (result.ok) {
    console.log(`ok: ${result.records} records, chain intact, head ${result.head}`)
    for (const note of result.notes) console.log(`note: ${note}`)
    return
  }
  console.error(`FAILED: ${result.file}:${result.line}${result.seq === null ? '' : ` (seq ${result.seq})`}: ${result.reason}`)
  process.exitCode = 1
}
