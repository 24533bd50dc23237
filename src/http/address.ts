// The client's address as the audit, the log and the failed-key count take it. With trustProxy, Fastify's
// request.ip is the X-Forwarded-For entry the first untrusted hop added, and proxy-addr takes any text there: a
// trusted proxy that passes a client's own header on (rather than appending the peer to it) lets the client write
// `garbage`, 300 characters, or a new value on every call into the audit record's `ip` and escape
// limits.authFailuresPerMinute, counted per address. An entry that is not an IP address stands for nothing: the
// peer's address (the trusted proxy) is taken instead, so that such calls are counted together and recorded as
// coming through it. Some proxies write the client's port beside its address (Azure Application Gateway:
// `203.0.113.9:5678`, `[2001:db8::5]:443`), which is not an address either, but names one: the address is taken
// and the port dropped, so that such clients are counted and recorded apart, as behind any other proxy. A proxy
// between two trusted ones may be written so too (`203.0.113.9:5678, 10.0.0.5:443`): its address is what trustProxy
// is asked about (trustedProxies), or proxy-addr would stop at that entry and take the proxy for the client.
// An address is then written one way (canonical): an IPv4 address as IPv4 however it came (`::ffff:203.0.113.9`,
// as a dual-stack listener sees an IPv4 peer, `::FFFF:cb00:7109`), an IPv6 address lowercase and compressed, with
// no zone. A new spelling of one address is then no fresh failed-key count, and `audit query --ip` finds all of
// its calls.
import { lookup } from 'node:dns/promises'
import { isIP, SocketAddress } from 'node:net'
import proxyAddr from '@fastify/proxy-addr'
import type { FastifyRequest } from 'fastify'

/** The longest address kept: an IPv6 address with a zone (`fe80::1%eth0`), with room. */
const MAX_ADDRESS = 64

/** `address:port` (IPv4) or `[address]` with or without `:port` (IPv6): the address. Bounded, so linear. */
const WITH_PORT = /^(?:(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}|\[([0-9A-Za-z:.%_-]{1,64})\](?::\d{1,5})?)$/

function isAddress (text: string): boolean {
  return text.length <= MAX_ADDRESS && isIP(text) !== 0
}

/** A dual-stack listener's IPv4 peer, the common case: its IPv4 address without asking for the canonical form. */
const MAPPED_IPV4 = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/

/** `address` (an IP address) written one way. */
function canonical (address: string): string {
  if (!address.includes(':') || isIP(address) !== 6) return address
  const mapped = MAPPED_IPV4.exec(address)
  if (mapped !== null) return mapped[1]!
  let v6: string
  try {
    v6 = new SocketAddress({ address, family: 'ipv6' }).address
  } catch {
    return address // (isIP and the parser behind SocketAddress are two readers: one they part on is kept as it came)
  }
  return MAPPED_IPV4.exec(v6)?.[1] ?? v6
}

/**
 * An address as the audit writes it (`audit query --ip` finds a record by it): an IP address in its one spelling,
 * anything else as given.
 */
export function auditAddress (text: string): string {
  return isAddress(text) ? canonical(text) : text
}

/** The address an X-Forwarded-For entry written with a port (`ip:port`, `[ipv6]:port`, `[ipv6]`) names, or undefined. */
function withoutPort (entry: string): string | undefined {
  const withPort = WITH_PORT.exec(entry)
  const address = withPort?.[1] ?? withPort?.[2]
  return address !== undefined && isAddress(address) ? address : undefined
}

/**
 * Fastify's trustProxy for the configured list: proxy-addr's own test, asked about an entry's address when it came
 * with a port. (An entry that names no address is trusted by nothing, as before: the chain is believed up to it.)
 */
export function trustedProxies (list: readonly string[]): (address: string, hop: number) => boolean {
  const trusted = proxyAddr.compile([...list])
  return (address, hop) => trusted(isIP(address) !== 0 ? address : withoutPort(address) ?? address, hop)
}

/**
 * What stands for the client's address when there is none to read: the client reset its connection before anything
 * asked for it (the kernel then no longer tells the peer of the socket, and Node's `remoteAddress` is undefined).
 */
export const UNKNOWN_PEER = 'unknown'

export function clientIp (request: FastifyRequest): string {
  const ip = request.ip as string | undefined // (see UNKNOWN_PEER)
  const peer = request.socket.remoteAddress
  if (ip === undefined) return peer === undefined ? UNKNOWN_PEER : canonical(peer)
  if (ip === peer || isAddress(ip)) return canonical(ip)
  const address = withoutPort(ip)
  if (address !== undefined) return canonical(address)
  return peer === undefined ? ip.slice(0, MAX_ADDRESS) : canonical(peer)
}

/**
 * The address a listener binds for `host` (listen.host, metrics.listen's, and preflight's checks of them): as given,
 * but `localhost`, to which Node's listen would give the first address the name resolves to, alone (::1 on most
 * machines with IPv6), is the IPv4 loopback when the name gives it: what the image's health check and the README's
 * examples call (`http://127.0.0.1:8080`), and where a client naming localhost also reaches it (it tries each
 * address). One address: Fastify's listen on each would serve the others without the gateway's connection handling.
 * A name that does not resolve is left to the listen, which says so.
 */
export async function listenAddress (host: string): Promise<string> {
  if (host !== 'localhost') return host
  const addresses = await lookup(host, { all: true }).catch(() => [])
  return (addresses.find(a => a.address === '127.0.0.1') ?? addresses[0])?.address ?? host
}
