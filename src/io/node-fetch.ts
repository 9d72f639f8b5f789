/**
 * A fetch for URLs that an image names (Node): every connection it makes is judged on the address it actually
 * goes to, so a name that resolves to a link-local address (169.254.0.0/16, fe80::/10: where cloud metadata
 * services answer) is refused before a byte is sent - whether the URL spells the address (in any of the numeric
 * forms URLs allow; the URL parser normalises them), an IPv4-mapped IPv6 form of it, or a DNS name that resolves
 * to it now (judged at each connection, so a name that changes its answer later is caught then too).
 *
 * undici's Agent (the library behind Node's own fetch) lets a connection's DNS lookup be replaced: a refusal
 * there fails the request before the socket is opened. Addresses written in the URL skip the lookup, so they are
 * judged before the request.
 */
import { lookup as dnsLookup, type LookupAddress, type LookupAllOptions, type LookupOneOptions } from 'node:dns';
import { isIP } from 'node:net';
import { Agent, fetch as undiciFetch } from 'undici';
import { HttpError } from '../qcow2/errors.js';

/** True for 169.254.0.0/16, fe80::/10, and IPv6 forms that embed an IPv4 link-local address. */
export function isLinkLocalAddress(address: string): boolean {
  const bare = address.replace(/^\[|\]$/g, '').replace(/%.*$/, '');
  const family = isIP(bare);
  if (family === 4) return bare.startsWith('169.254.');
  if (family !== 6) return false;
  const words = ipv6Words(bare);
  if (!words) return false;
  if ((words[0]! & 0xffc0) === 0xfe80) return true;
  // ::ffff:a.b.c.d (IPv4-mapped), ::a.b.c.d (IPv4-compatible) and 64:ff9b::a.b.c.d (NAT64) reach the IPv4 address.
  const zeroTo = (n: number) => words.slice(0, n).every((w) => w === 0);
  const embedsV4 = (zeroTo(5) && (words[5] === 0xffff || words[5] === 0)) || (words[0] === 0x64 && words[1] === 0xff9b && words.slice(2, 6).every((w) => w === 0));
  return embedsV4 && words[6] === 0xa9fe;
}

/** The eight 16-bit words of a valid IPv6 address (a trailing dotted IPv4 part becomes two words). */
function ipv6Words(address: string): number[] | undefined {
  let text = address.toLowerCase();
  const dotted = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted.slice(1).map(Number) as [number, number, number, number];
    text = `${text.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head, tail] = text.split('::') as [string, string | undefined];
  const parse = (part: string) => (part === '' ? [] : part.split(':').map((w) => parseInt(w, 16)));
  const first = parse(head);
  const last = tail === undefined ? [] : parse(tail);
  const words = tail === undefined ? first : [...first, ...new Array<number>(8 - first.length - last.length).fill(0), ...last];
  return words.length === 8 && words.every((w) => Number.isInteger(w) && w >= 0 && w <= 0xffff) ? words : undefined;
}

/** A destination refused because it is link-local. */
export class LinkLocalRefusal extends HttpError {}

function refusal(url: string, host: string, address: string): LinkLocalRefusal {
  return new LinkLocalRefusal(url, `${host === address ? 'address' : `host ${host} resolves to`} ${address}, a link-local address (the range of cloud metadata services): refused`);
}

type LookupCallback = (error: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

/** A fetch that refuses link-local destinations (see the header comment). One connection pool per fetch. */
export function linkLocalRefusingFetch(): typeof fetch {
  const agent = new Agent({
    connect: {
      lookup(hostname: string, options: LookupOneOptions | LookupAllOptions, callback: LookupCallback) {
        dnsLookup(hostname, { ...options, all: true }, (error, addresses) => {
          if (error) return callback(error, '');
          const bad = addresses.find((entry) => isLinkLocalAddress(entry.address));
          if (bad) return callback(refusal(`http://${hostname}/`, hostname, bad.address) as unknown as NodeJS.ErrnoException, '');
          if ((options as LookupAllOptions).all) return callback(null, addresses);
          callback(null, addresses[0]!.address, addresses[0]!.family);
        });
      },
    },
  });
  return (async (input: string | URL | Request, init?: RequestInit) => {
    const url = new URL(typeof input === 'string' || input instanceof URL ? input : input.url);
    const host = url.hostname.replace(/^\[|\]$/g, '');
    if (isIP(host) && isLinkLocalAddress(host)) throw refusal(url.href, host, host);
    try {
      return (await undiciFetch(url, { ...(init as object), dispatcher: agent } as Parameters<typeof undiciFetch>[1])) as unknown as Response;
    } catch (error) {
      // The lookup's refusal arrives as the cause of undici's "fetch failed": surface it as it is.
      const cause = (error as { cause?: unknown }).cause;
      if (cause instanceof LinkLocalRefusal) throw new LinkLocalRefusal(url.href, cause.message.replace(/^http:\/\/[^ ]*: /, ''));
      throw error;
    }
  }) as typeof fetch;
}
