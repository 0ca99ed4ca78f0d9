"""Webhook targets: the users choose them and our nodes send to them, so a target must be https on a
public address. It is checked when a job names it, and again on every connection (by the resolver,
so a name that later resolves to a private address is refused too), unless the operator allows its
host (`QUBAX_WEBHOOK_ALLOWED_HOSTS`)."""

import asyncio
import base64
import contextlib
import fnmatch
import ipaddress
import secrets
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from qubax.errors import InvalidRequest
from qubax.records import tables
from qubax.server.settings import host_patterns


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes one: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def allowed(host: str, patterns: str | None) -> bool:
    """Whether the operator lets webhooks reach this host whatever it is (QUBAX_WEBHOOK_ALLOWED_HOSTS)."""
    return any(fnmatch.fnmatchcase(host.lower(), name) for name in host_patterns(patterns))


# IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits: a NAT64 translator
# (RFC 6052's well-known prefix) or the host itself (RFC 4291's deprecated IPv4-compatible form) sends on
# to it. RFC 8215's local-use NAT64 prefix may carry it elsewhere, and is never a public target.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def public(address: str) -> bool:
    """Whether an address is global, and so is every IPv4 address it leads to."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip in LOCAL_NAT64:
        return False
    return all(one.is_global and not one.is_multicast for one in [ip, *carried(ip)])


def carried(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses that an IPv6 address reaches, mapped, translated or tunnelled (6to4, Teredo's
    client): Python's `is_global` judges only the IPv6 address."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [one for one in found if one is not None]


async def check_target(url: str, patterns: str | None) -> str:
    """A job's webhook target as given, or a 400 naming `webhook_url`."""
    try:
        parts = urlsplit(url)
        port = parts.port  # a ValueError when out of range or not a number
    except ValueError as exc:  # e.g. "Port out of range 0-65535"
        raise InvalidRequest(f"webhook_url is not a valid URL: {exc}.", param="webhook_url") from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host or len(url) > 2000:
        raise InvalidRequest("webhook_url must be an absolute https URL.", param="webhook_url")
    if port == 0:
        raise InvalidRequest("webhook_url's port must be between 1 and 65535.", param="webhook_url")
    if allowed(host, patterns):
        return url
    if parts.scheme != "https":
        raise InvalidRequest("webhook_url must be an https URL.", param="webhook_url")
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InvalidRequest(f"webhook_url's host {host!r} does not resolve.", param="webhook_url") from None
    if not all(public(str(entry[4][0])) for entry in found):
        raise InvalidRequest(
            f"webhook_url's host {host!r} is a loopback, private or link-local address; webhooks go to public "
            "hosts only (the operator may allow a host with QUBAX_WEBHOOK_ALLOWED_HOSTS).",
            param="webhook_url",
        )
    return url


def check_literal(host: str, patterns: str | None) -> None:
    """Refuse (OSError) a host written as an address that is not public: connections to an address go
    past the resolver, which checks every name."""
    with contextlib.suppress(ValueError):  # not an address: a name
        if not allowed(host, patterns) and not public(host.strip("[]")):
            raise OSError(f"{host} is not a public address")


class PublicResolver(AbstractResolver):
    """The system's resolver, refusing every name that resolves to a non-public address (unless allowed):
    the check is made on the addresses actually connected to."""

    def __init__(self, patterns: str | None) -> None:
        self.patterns = patterns
        self.resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.resolver.resolve(host, port, family)
        if not allowed(host, self.patterns) and not all(public(entry["host"]) for entry in found):
            raise OSError(f"{host} resolves to a non-public address")
        return found

    async def close(self) -> None:
        await self.resolver.close()


def configure(key: tables.ApiKey, url: str | None, rotate: bool) -> str | None:
    """Set a key's default target (None: none) and, when asked or when it has none yet, a new signing
    secret: returned to be shown once; None when the secret did not change."""
    key.webhook_url = url
    if rotate or (url is not None and key.webhook_secret is None):
        key.webhook_secret = new_secret()
        return key.webhook_secret
    return None
