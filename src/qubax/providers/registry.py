"""Every provider we can route to, in one table; adding one means one module and one entry here."""

from qubax.client import Client
from qubax.providers import Provider, ProviderInfo, Upstream
from qubax.providers.bfl import BFL
from qubax.providers.fal import Fal
from qubax.providers.openai import OpenAI
from qubax.providers.replicate import Replicate
from qubax.providers.together import Together
from qubax.settings import Settings
from qubax.slots import Slots

PROVIDERS: dict[str, ProviderInfo] = {
    # BFL allows 24 active tasks per key by default; the others' caps keep bursts from becoming 429s.
    "bfl": ProviderInfo(BFL, "BFL_API_KEY", "bfl_api_key", "bfl_base_url", concurrency=24),
    "fal": ProviderInfo(Fal, "FAL_KEY", "fal_key", "fal_base_url", concurrency=40),
    "replicate": ProviderInfo(Replicate, "REPLICATE_API_TOKEN", "replicate_api_token", "replicate_base_url", 50),
    "together": ProviderInfo(Together, "TOGETHER_API_KEY", "together_api_key", "together_base_url", 20),
    "openai": ProviderInfo(OpenAI, "OPENAI_API_KEY", "openai_api_key", "openai_base_url", 20),
}


def default_concurrency() -> dict[str, int]:
    return {name: info.concurrency for name, info in PROVIDERS.items() if info.concurrency is not None}


def credentials(settings: Settings, name: str) -> list[str]:
    """The provider's keys: its variable may hold several, comma-separated, used as a pool."""
    secret = getattr(settings, PROVIDERS[name].key_field)
    if secret is None:
        return []
    return [key.strip() for key in secret.get_secret_value().split(",") if key.strip()]


def build_providers(settings: Settings, http: Client, concurrency: dict[str, int], slots: Slots) -> dict[str, Provider]:
    """Adapters for the providers with at least one credential; the others stay off. Their keys'
    concurrency caps are counted in `slots`."""
    providers: dict[str, Provider] = {}
    for name, info in PROVIDERS.items():
        keys = credentials(settings, name)
        if keys:
            base_url = str(getattr(settings, info.base_url_field))
            cap = concurrency.get(name)
            upstream = Upstream(http, base_url, keys, settings.poll_interval_seconds, cap, slots, name)
            providers[name] = info.build(upstream)
    return providers
