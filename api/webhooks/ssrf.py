"""The SSRF guard: a webhook URL may only reach public addresses (loopback and private ones too when
`webhooks.allow_private` is on, for local use and tests; link-local, unspecified, multicast, reserved
and cloud metadata addresses never; only the networks of `webhooks.allow_only` when that is set).
Every spelling of an address is judged as the address it names: an IPv4 literal in any form
inet_aton reads (`2130706433`, `0177.0.0.1`, `0x7f.1`, a trailing dot) is read here, not left to the
resolver, and an IPv6 address that carries an IPv4 one (IPv4-mapped, IPv4-compatible, NAT64, 6to4,
Teredo) is judged as the IPv4 address(es) it carries. Checked at submit when the name resolves, and
again at every delivery, which then connects to the very address that was checked (no second lookup
an attacker could answer differently)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from api.http.errors import InvalidRequest
from shared import aio
from shared.settings import WebhookSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services: refused whatever allow_private says, in whatever form they are written.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (RFC 4291 §2.5.5.1)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix (RFC 6052)
# Local-use NAT64 (RFC 8215): a network's own translator, whose prefix length within the /48 we cannot
# know; so it is private, and every RFC 6052 reading of it is looked at for metadata addresses.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_NAT64_LOCAL_LENGTHS = (48, 56, 64, 96)
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")  # "this host": Linux connects 0.0.0.0 to itself
# What inet_aton reads: one to four parts, each decimal, octal (leading 0) or hex (0x). Anything else
# is a name; checked first because the C inet_aton also takes "1.2.3.4 anything".
_INET_ATON = re.compile(r"(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}")
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")  # a last label like this makes the host an IPv4 literal
_ALLOWABLE = frozenset({"loopback", "private"})  # the kinds that webhooks.allow_private allows

ALLOW_PRIVATE_ENV = "INFERQ_WEBHOOKS__ALLOW_PRIVATE"
ALLOW_PRIVATE_HINT = f" (set {ALLOW_PRIVATE_ENV}=true to allow private receivers)"
REFUSED = "{address} is {kind}{hint}"  # e.g. "127.0.0.1 is a loopback address (set …)"
REFUSED_CARRIED = "{address} carries {ipv4}, {kind}{hint}"  # judged as the IPv4 address inside
LOCALHOST_KIND = "a loopback name"  # localhost and *.localhost (RFC 6761), whatever they resolve to
OUTSIDE_ALLOW_ONLY = "{address} is outside webhooks.allow_only"
NOT_IPV4 = "{host} is not a valid IPv4 address"
RESOLVE_TIMEOUT_SECONDS = 2.0
MAX_URL_CHARS = 2048


class UnsafeUrl(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # with its query
    address: str  # the checked IP to connect to

    @property
    def url(self) -> str:
        """The URL with the checked address in place of the name."""
        ip = ipaddress.ip_address(self.address)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal keeps its brackets
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse(url: str) -> tuple[str, str, int, str]:
    if len(url) > MAX_URL_CHARS:
        raise UnsafeUrl(f"the URL is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("the URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise UnsafeUrl("the URL must not carry credentials")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path


def ip_literal(host: str) -> str | None:
    """The address `host` spells if it is an IP literal, in any form inet_aton reads too (decimal,
    octal, hex, fewer than four parts, a trailing dot); None for a name. A host whose last label is a
    number but that is no IPv4 address (`1.2.3.256`, `1.2.3.4.5`) is refused, as browsers refuse it,
    rather than left to a resolver that might read it some other way."""
    name = host.lower().removesuffix(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _NUMBER.fullmatch(name.rsplit(".", 1)[-1]):
        return None
    if _INET_ATON.fullmatch(name):
        try:
            return socket.inet_ntoa(socket.inet_aton(name))
        except OSError:
            pass
    raise UnsafeUrl(NOT_IPV4.format(host=host))


def carried_ipv4(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries, where its packets end up (mapped, compatible, NAT64)
    or pass through (6to4's relay; Teredo's server and client): none for any other address."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ()
    if ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are IPv6's own
        return (ipaddress.IPv4Address(ip.packed[12:]),)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo  # (server, client), the client's address already un-obfuscated
    return ()


def _nat64_local_readings(ip: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """Every IPv4 address a local-use NAT64 address could carry (RFC 6052 §2.2: the u octet, bits
    64-71, carries nothing)."""
    if ip not in _NAT64_LOCAL:
        return ()
    octets = ip.packed[:8] + ip.packed[9:]
    return tuple(
        ipaddress.IPv4Address(ip.packed[12:] if n == 96 else octets[n // 8 : n // 8 + 4])
        for n in _NAT64_LOCAL_LENGTHS
    )


def _kind(ip: IPAddress) -> str | None:
    """The kind of address `ip` is when it is not a public one; None for a public one."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:  # Python counts most of 224.0.0.0/4 as global
        return "multicast"
    if ip in _NAT64_LOCAL or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "private"
    if ip.is_reserved or ip in _THIS_NETWORK:
        return "reserved"
    if ip.is_private:
        return "private"
    return None if ip.is_global else "reserved"  # e.g. 100.64.0.0/10, carrier-grade NAT


def _refusal(address: IPAddress, judged: IPAddress, kind: str) -> UnsafeUrl:
    text = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"
    hint = ALLOW_PRIVATE_HINT if kind in _ALLOWABLE else ""
    if judged == address:
        return UnsafeUrl(REFUSED.format(address=address, kind=text, hint=hint))
    return UnsafeUrl(REFUSED_CARRIED.format(address=address, ipv4=judged, kind=text, hint=hint))


def check_address(address: str, policy: WebhookSettings) -> None:
    """Refuse `address` (an IP, perhaps with a %zone) unless webhooks may go to it. An IPv6 address
    that carries IPv4 ones is judged as those (all of them); metadata addresses in any form, and a
    local-use NAT64 address that could carry a link-local one, are refused even with allow_private."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    carried = carried_ipv4(ip)
    for seen in (ip, *carried):
        if seen in _METADATA:
            raise _refusal(ip, seen, "cloud metadata")
    for reading in _nat64_local_readings(ip):
        if reading in _METADATA or reading.is_link_local:
            raise _refusal(ip, reading, "cloud metadata" if reading in _METADATA else "link-local")
    for judged in carried or (ip,):
        kind = _kind(judged)
        if kind is not None and not (policy.allow_private and kind in _ALLOWABLE):
            raise _refusal(ip, judged, kind)
    if policy.allow_only:
        networks = [ipaddress.ip_network(n, strict=False) for n in policy.allow_only]
        inside = any(ip in n for n in networks)
        if not inside and not (carried and all(any(c in n for n in networks) for c in carried)):
            raise UnsafeUrl(OUTSIDE_ALLOW_ONLY.format(address=ip))


def _is_localhost(host: str) -> bool:
    name = host.removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")


async def _resolve(host: str, port: int) -> list[str]:
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    # "name." and "name" are the same host; /etc/hosts only knows the second.
    lookup = loop.getaddrinfo(host.removesuffix("."), port, type=socket.SOCK_STREAM)
    infos = await aio.wait_for(lookup, RESOLVE_TIMEOUT_SECONDS)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def target(url: str, policy: WebhookSettings) -> Target:
    """The URL's first address, once every address its host resolves to has passed the guard."""
    scheme, host, port, path = parse(url)
    if _is_localhost(host) and not policy.allow_private:
        raise UnsafeUrl(REFUSED.format(address=host, kind=LOCALHOST_KIND, hint=ALLOW_PRIVATE_HINT))
    try:
        addresses = await _resolve(host, port)
    except (OSError, TimeoutError) as exc:
        raise UnsafeUrl(f"{host} does not resolve ({exc})") from None
    if not addresses:
        raise UnsafeUrl(f"{host} does not resolve")
    for address in addresses:
        check_address(address, policy)
    return Target(scheme, host, port, path, addresses[0])


async def check_at_submit(url: str, policy: WebhookSettings, param: str) -> None:
    """400 for a URL the guard refuses; a name that does not resolve yet is checked at delivery."""
    try:
        await target(url, policy)
    except UnsafeUrl as exc:
        if "does not resolve" in str(exc):
            return
        raise InvalidRequest(f"{param} is refused: {exc}", param=param, code="unsafe_url") from None
