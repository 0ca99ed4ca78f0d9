"""Image bytes as an upstream delivers them: inline base64, or a URL downloaded only from where the
provider delivers from (no SSRF through upstream data)."""

import binascii
from typing import Any

import pybase64

from qubax.errors import UpstreamError
from qubax.providers import Upstream
from qubax.providers.hosts import trusted
from qubax.providers.transport import send


def decode_b64(text: Any, provider: str) -> bytes:
    """Image bytes from an upstream's inline base64 field."""
    try:
        # pybase64 (SIMD) decodes big images far faster than the standard library (bench/README.md).
        data = pybase64.b64decode(text, validate=True) if isinstance(text, str | bytes) else b""
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise UpstreamError(f"{provider} returned image data that is not valid base64.")
    return data


async def download(upstream: Upstream, provider: str, url: Any) -> bytes:
    """Fetch a result URL, but only from where the provider delivers from (no SSRF via upstream data)."""
    if not isinstance(url, str) or not trusted(url, upstream.delivery_hosts, upstream.base_url):
        raise UpstreamError(f"{provider} returned a result URL from a host we do not download from.")
    try:
        response = await send(upstream.http, provider, "GET", url, headers={"user-agent": "qubax"})
    except UpstreamError as exc:
        exc.message = f"Downloading the image from {provider} failed: {exc.message}"
        exc.detail = exc.detail and f"Downloading the image from {provider} failed: {exc.detail}"
        raise
    if response.status_code != 200:
        # 403/404/410 mean the signed URL expired or never existed: asking again cannot help.
        busy = response.status_code == 429 or response.status_code >= 500
        raise UpstreamError(f"Downloading the image from {provider} failed ({response.status_code}).", retryable=busy)
    return response.content
