"""Masking secrets out of text we did not write (an upstream's error message, an exception's text)
before it is logged or stored: every secret the operator configured, and anything shaped like one.

Upstreams echo credentials back ("Incorrect API key provided: sk-…"), and not every compatible host
masks them as OpenAI does; a log or a database row is read by more people than the key's owner."""

import os
import re
import urllib.parse
from collections.abc import Iterable

from qubax.providers.registry import PROVIDERS, credentials
from qubax.server.settings import Settings

MASK = "[masked]"
SHORTEST_SECRET = 6  # configured values shorter than this would mask ordinary words
TOKEN = r"[A-Za-z0-9_+=\-]"
SHAPES = re.compile(
    # Kept as they are: UUIDs (task and request ids, which operators need to look things up).
    r"(?P<uuid>\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b)"
    # The value after an authorization scheme, or after a secret's name and `=` or `:`.
    r"|(?P<name>(?i:\b(?:bearer|basic)\s+|\b(?:token|key|api[_-]?key|apikey|secret|password|passwd|signature"
    r"|sig|access[_-]?token)\b[\"']?(?:\s*[:=]\s*[\"']?|\s+(?=\S*\d))))[^\s\"'&,;]+"
    # Well-known key prefixes (OpenAI, Replicate, Hugging Face, GitHub, Groq, xAI, AWS, ours).
    r"|\b(?:sk-|sk_|rk_|pk_|r8_|hf_|ghp_|gsk_|xai-|qbx_live_|qbx_test_|AKIA)[A-Za-z0-9_\-*]{4,}"
    # A long run of key characters mixing letters and digits: random tokens look like this, words do not.
    rf"|(?<!{TOKEN})(?={TOKEN}*[0-9])(?={TOKEN}*[A-Za-z]){TOKEN}{{20,}}(?!{TOKEN})"
)


class Mask:
    """Call it on foreign text: each configured secret and each secret-shaped string becomes MASK."""

    def __init__(self, secrets: Iterable[str]) -> None:
        known = sorted({s for s in secrets if len(s) >= SHORTEST_SECRET}, key=len, reverse=True)
        self.known = re.compile("|".join(map(re.escape, known))) if known else None

    def __call__(self, text: str) -> str:
        if self.known is not None:
            text = self.known.sub(MASK, text)
        return SHAPES.sub(masked, text)


def masked(match: re.Match[str]) -> str:
    if match["uuid"]:
        return match["uuid"]
    return (match["name"] or "") + MASK


def configured_secrets(settings: Settings) -> list[str]:
    """Every secret this process was given: upstream keys, the admin token, the signing secret,
    passwords in service URLs, and the AWS secret key botocore will read."""
    found = [key for name in PROVIDERS for key in credentials(settings, name)]
    for secret in (settings.admin_token, settings.signing_secret, settings.replicate_webhook_secret):
        if secret is not None:
            found.append(secret.get_secret_value())
    for url in (settings.database_url, settings.redis_url):
        password = urllib.parse.urlsplit(url or "").password  # as written in the URL: percent-encoded
        if password:
            found += [password, urllib.parse.unquote(password)]
    for variable in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(variable):
            found.append(os.environ[variable])
    return found
