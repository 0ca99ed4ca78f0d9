"""Every provider we can route to; adding one means one module (with its `INFO`) and one line here."""

from typing import Protocol

from pydantic import SecretStr

from qubax.limits.slots import Slots
from qubax.providers import Provider, ProviderInfo, Upstream, bfl, byteplus, fal, google, openai, replicate, together
from qubax.providers.callbacks import Callbacks
from qubax.providers.transport import Http


class Settings(Protocol):
    """What the registry reads of `qubax.server.settings.Settings`, which itself reads each provider's
    variables from this registry: named here, so the two do not import each other."""

    credentials: dict[str, SecretStr]
    base_urls: dict[str, str]
    poll_interval_seconds: float


PROVIDERS: dict[str, ProviderInfo] = {
    bfl.INFO.name: bfl.INFO,
    fal.INFO.name: fal.INFO,
    replicate.INFO.name: replicate.INFO,
    together.INFO.name: together.INFO,
    openai.INFO.name: openai.INFO,
    byteplus.INFO.name: byteplus.INFO,
    google.INFO.name: google.INFO,
}


def default_concurrency() -> dict[str, int]:
    return {name: info.concurrency for name, info in PROVIDERS.items() if info.concurrency is not None}


def credentials(settings: Settings, name: str) -> list[str]:
    """The provider's keys: its variable may hold several, comma-separated, used as a pool."""
    secret = settings.credentials.get(name)
    if secret is None:
        return []
    return [key.strip() for key in secret.get_secret_value().split(",") if key.strip()]


def base_url(settings: Settings, name: str) -> str:
    return settings.base_urls.get(name) or PROVIDERS[name].base_url


def build_providers(
    settings: Settings, http: Http, concurrency: dict[str, int], slots: Slots, callbacks: Callbacks | None = None
) -> dict[str, Provider]:
    """Adapters for the providers with at least one credential; the others stay off. Their keys'
    concurrency caps are counted in `slots`; those that can call back get `callbacks`."""
    providers: dict[str, Provider] = {}
    for name, info in PROVIDERS.items():
        keys = credentials(settings, name)
        if keys:
            upstream = Upstream(
                http,
                base_url(settings, name),
                keys,
                settings.poll_interval_seconds,
                concurrency.get(name),
                slots,
                name,
                info.delivery_hosts,
                callbacks if info.callbacks else None,
            )
            providers[name] = info.build(upstream)
    return providers
