// The client's address as the audit, the log and the failed-key count take it. With trustProxy, Fastify's
// request.ip is the X-Forwarded-For entry the first untrusted hop added, and proxy-addr takes any text there: a
// trusted proxy that passes a client's own header on (rather than appending the peer to it) lets the client write
// `garbage`, 300 characters, or a new value on every call into the audit record's `ip` and escape
// limits.authFailuresPerMinute, counted per address. An entry that is not an IP address stands for nothing: the
// peer's address (the trusted proxy) is taken instead, so that such calls are counted together and recorded as
// coming through it.
import { isIP } from 'node:net'
import type { FastifyRequest } from 'fastify'

/** The longest address kept: an IPv6 address with a zone (`fe80::1%eth0`), with room. */
const MAX_ADDRESS = 64

export function clientIp (request: FastifyRequest): string {
  const ip = request.ip
  const peer = request.socket.remoteAddress
  if (ip === peer || (ip.length <= MAX_ADDRESS && isIP(ip) !== 0)) return ip
  return peer ?? ip.slice(0, MAX_ADDRESS)
}
