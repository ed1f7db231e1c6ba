"""Image URLs for the OpenAI adapter: off by default; when the operator turns it on, guarded against SSRF.

A URL is fetched only if all of these hold, checked in this order for the URL and again for every redirect target:
1. the scheme is http or https, with no user:password part;
2. the host is on the allow-list (`url_fetch_allow_hosts`; `*.example.com` also matches its subdomains);
3. the host resolves, and EVERY address it resolves to is public: loopback, private, link-local (cloud metadata
   at 169.254.169.254), shared, reserved, multicast and unspecified addresses are refused, including IPv4 inside
   IPv6 (::ffff:a.b.c.d, 64:ff9b::/96), unless the operator exempts a network (`url_fetch_allow_networks`);
4. the connection goes to the address that was checked (the URL's host stays in Host and TLS SNI), so a second
   DNS answer cannot swap in another address between the check and the connection (DNS rebinding).
The whole request's downloads run under one time cap, each body under a byte cap (Content-Length is checked first,
then the bytes as they stream); no proxy from the environment is used.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from service.errors import ServiceError
from service.settings import Settings

__all__ = ["FetchPolicy", "UrlFetcher", "UrlRefusedError", "address_is_public"]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlRefusedError(ServiceError):
    """An image URL we will not fetch, or whose fetch failed; `code` says which (url_*)."""

    http_status = 422

    def __init__(self, message: str, *, code: str, index: int | None = None, http_status: int = 422) -> None:
        super().__init__(message if index is None else f"input[{index}]: {message}")
        self.code = code
        self.http_status = http_status
        self.param = "input" if index is None else f"input[{index}]"


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_is_public(ip: IPAddress, exempt: Sequence[IPNetwork] = ()) -> bool:
    """True for a globally routable unicast address (or one inside an exempt network)."""
    ip = _embedded_ipv4(ip)
    if any(ip in net for net in exempt if net.version == ip.version):
        return True
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: tuple[str, ...]
    exempt_networks: tuple[IPNetwork, ...] = ()
    max_bytes: int = 10 << 20
    timeout_s: float = 5.0
    max_redirects: int = 3

    @classmethod
    def from_settings(cls, s: Settings) -> FetchPolicy:
        return cls(
            allow_hosts=tuple(h.strip().lower().rstrip(".") for h in s.url_fetch_allow_hosts),
            exempt_networks=tuple(ipaddress.ip_network(n, strict=False) for n in s.url_fetch_allow_networks),
            max_bytes=s.url_fetch_max_bytes,
            timeout_s=s.url_fetch_timeout_s,
            max_redirects=s.url_fetch_max_redirects,
        )

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allow_hosts:
            if pattern.startswith("*."):
                if host == pattern[2:] or fnmatch.fnmatchcase(host, pattern):
                    return True
            elif host == pattern:
                return True
        return False


async def _system_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class UrlFetcher:
    def __init__(
        self, policy: FetchPolicy, *, resolve: Resolver = _system_resolve, verify: ssl.SSLContext | bool = True
    ) -> None:
        self.policy = policy
        self._resolve = resolve
        self._verify = verify  # certificates are checked against the URL's host name (TLS SNI), not the address

    async def fetch_all(self, urls: Sequence[tuple[int, str]]) -> dict[int, bytes]:
        """{input index: bytes} for (index, url) pairs, downloaded concurrently under the policy's time cap."""
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                bodies = await asyncio.gather(*(self.fetch(url, i) for i, url in urls))
        except TimeoutError:
            raise UrlRefusedError(
                f"image URLs took longer than {self.policy.timeout_s:g}s to download", code="url_fetch_timeout"
            ) from None
        return {i: body for (i, _), body in zip(urls, bodies, strict=True)}

    async def fetch(self, url: str, index: int | None = None) -> bytes:
        async with httpx.AsyncClient(
            trust_env=False, follow_redirects=False, timeout=self.policy.timeout_s, verify=self._verify
        ) as http:
            for _hop in range(self.policy.max_redirects + 1):
                target, headers, extensions = await self._check(url, index)
                try:
                    async with http.stream("GET", target, headers=headers, extensions=extensions) as response:
                        if response.is_redirect:
                            location = response.headers.get("location", "")
                            url = urljoin(url, location)
                            continue
                        if response.status_code != 200:
                            raise UrlRefusedError(
                                f"{_safe(url)} answered HTTP {response.status_code}",
                                code="url_fetch_failed",
                                index=index,
                            )
                        return await self._read_capped(response, url, index)
                except httpx.HTTPError as exc:
                    raise UrlRefusedError(
                        f"cannot download {_safe(url)}: {type(exc).__name__}", code="url_fetch_failed", index=index
                    ) from None
        raise UrlRefusedError(
            f"more than {self.policy.max_redirects} redirects", code="url_too_many_redirects", index=index
        )

    async def _check(self, url: str, index: int | None) -> tuple[str, dict[str, str], dict[str, object]]:
        """The URL to connect to (the checked address in place of the host), its Host header and TLS SNI."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise UrlRefusedError(
                f"only http(s) URLs are fetched, not {parts.scheme or 'a bare path'}",
                code="url_not_allowed",
                index=index,
            )
        if parts.username or parts.password:
            raise UrlRefusedError("URLs with credentials are refused", code="url_not_allowed", index=index)
        host = (parts.hostname or "").lower()
        if not host or not self.policy.host_allowed(host):
            raise UrlRefusedError(
                f"host {host or '(none)'!r} is not on the URL allow-list (url_fetch_allow_hosts)",
                code="url_not_allowed",
                index=index,
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UrlRefusedError("the URL's port is not a number", code="url_not_allowed", index=index) from None
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await self._resolve(host, port)]
            except (OSError, ValueError) as exc:
                raise UrlRefusedError(
                    f"cannot resolve {host!r} ({exc})", code="url_fetch_failed", index=index
                ) from None
        if not addresses:
            raise UrlRefusedError(f"{host!r} has no address", code="url_fetch_failed", index=index)
        for ip in addresses:
            if not address_is_public(ip, self.policy.exempt_networks):
                raise UrlRefusedError(
                    f"host {host!r} resolves to a private, loopback or link-local address; refused",
                    code="url_private_address",
                    index=index,
                )
        ip = addresses[0]
        netloc = f"[{ip}]" if ip.version == 6 else str(ip)
        target = parts._replace(netloc=f"{netloc}:{port}").geturl()
        default_port = 443 if parts.scheme == "https" else 80
        headers = {"Host": host if port == default_port else f"{host}:{port}", "Accept-Encoding": "identity"}
        extensions: dict[str, object] = {"sni_hostname": host} if parts.scheme == "https" else {}
        return target, headers, extensions

    async def _read_capped(self, response: httpx.Response, url: str, index: int | None) -> bytes:
        cap = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise UrlRefusedError(
                f"{_safe(url)} is {int(declared)} bytes; the limit is {cap}",
                code="url_too_large",
                index=index,
                http_status=413,
            )
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > cap:
                raise UrlRefusedError(
                    f"{_safe(url)} is over the {cap}-byte limit", code="url_too_large", index=index, http_status=413
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _safe(url: str) -> str:
    """The URL without its query (which may carry tokens), for messages and logs."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl()
