"""The SSRF guard: a webhook URL may only reach public addresses (loopback and private ones too when
`webhooks.allow_private` is on, for local use and tests; cloud metadata addresses never; only the
networks of `webhooks.allow_only` when that is set). Checked at
submit when the name resolves, and again at every delivery, which then connects to the very address
that was checked (no second lookup an attacker could answer differently)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from api.http.errors import InvalidRequest
from shared import aio
from shared.settings import WebhookSettings

# Cloud metadata services: refused whatever allow_private says.
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
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
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


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


def check_address(address: str, policy: WebhookSettings) -> None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip in _METADATA:
        raise UnsafeUrl(f"{ip} is a cloud metadata address")
    private_ok = policy.allow_private and (ip.is_loopback or ip.is_private) and not ip.is_multicast
    if not ip.is_global and not private_ok:
        kind = (
            "loopback"
            if ip.is_loopback
            else "link-local"
            if ip.is_link_local
            else "multicast"
            if ip.is_multicast
            else "private"
            if ip.is_private
            else "reserved"
        )
        raise UnsafeUrl(f"{ip} is a {kind} address")
    if policy.allow_only and not any(ip in ipaddress.ip_network(n, strict=False) for n in policy.allow_only):
        raise UnsafeUrl(f"{ip} is outside webhooks.allow_only")


async def _resolve(host: str, port: int) -> list[str]:
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await aio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def target(url: str, policy: WebhookSettings) -> Target:
    """The URL's first address, once every address its host resolves to has passed the guard."""
    scheme, host, port, path = parse(url)
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
