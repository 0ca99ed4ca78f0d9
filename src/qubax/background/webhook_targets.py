"""Webhook targets: the users choose them and our nodes send to them, so a target must be https on a
public address. It is checked when a job names it, and again on every connection (by the resolver,
so a name that later resolves to a private address is refused too), unless the operator allows its
host (`QUBAX_WEBHOOK_ALLOWED_HOSTS`)."""

import asyncio
import base64
import contextlib
import fnmatch
import secrets
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from qubax.addresses import public
from qubax.errors import InvalidRequest
from qubax.records import tables
from qubax.server.settings import host_patterns


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes one: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def allowed(host: str, patterns: str | None) -> bool:
    """Whether the operator lets webhooks reach this host whatever it is (QUBAX_WEBHOOK_ALLOWED_HOSTS)."""
    return any(fnmatch.fnmatchcase(host.lower(), name) for name in host_patterns(patterns))


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
