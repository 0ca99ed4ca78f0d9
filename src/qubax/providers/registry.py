"""Every provider we can route to; adding one means one module (with its `INFO`) and one line here."""

from collections.abc import Mapping

from qubax.providers import Provider, ProviderInfo, Upstream, bfl, fal, openai, replicate, together
from qubax.providers.http import Http
from qubax.settings import Settings
from qubax.slots import Slots

PROVIDERS: dict[str, ProviderInfo] = {
    bfl.INFO.name: bfl.INFO,
    fal.INFO.name: fal.INFO,
    replicate.INFO.name: replicate.INFO,
    together.INFO.name: together.INFO,
    openai.INFO.name: openai.INFO,
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


def connection_limit(settings: Settings, concurrency: Mapping[str, int]) -> int:
    """How many upstream connections may be open at once: the operator's `QUBAX_UPSTREAM_CONNECTIONS`,
    or else the configured providers' caps added up (each key's cap times its keys), so that no request
    a provider would take waits for a connection. 0 (no cap) when a configured provider has no cap, or
    none is configured."""
    if settings.upstream_connections is not None:
        return settings.upstream_connections
    total = 0
    for name in PROVIDERS:
        keys, cap = credentials(settings, name), concurrency.get(name)
        if keys and cap is None:
            return 0
        total += len(keys) * (cap or 0)
    return total


def build_providers(settings: Settings, http: Http, concurrency: dict[str, int], slots: Slots) -> dict[str, Provider]:
    """Adapters for the providers with at least one credential; the others stay off. Their keys'
    concurrency caps are counted in `slots`."""
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
            )
            providers[name] = info.build(upstream)
    return providers
