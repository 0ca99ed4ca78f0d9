"""Which hosts an upstream's URLs may take us to: with our key (a polling URL), or for a download."""

import fnmatch
from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, the port spelled out; None for anything else."""
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is no number
        return None
    host = (parts.hostname or "").lower()
    return (parts.scheme, host, port) if port is not None and host else None


def trusted(url: str, patterns: Iterable[str], base_url: str) -> bool:
    """Whether a URL an upstream handed us may get our key, or be downloaded: the configured base URL's
    own origin (scheme, host and port alike: the provider, a proxy, or a fake in tests), or https on the
    standard port to a host matching one of the provider's shell-style patterns (`delivery.*.bfl.ai`).
    Never plain http, nor another port of a trusted host."""
    found = origin(url)
    if found is None:
        return False
    if found == origin(base_url):
        return True
    scheme, host, port = found
    return scheme == "https" and port == 443 and any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in patterns)


def base_host(base_url: str) -> str:
    return (urlsplit(base_url).hostname or "").lower()
