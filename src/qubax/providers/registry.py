"""Every provider we can route to, in one table; adding one means one module and one entry here."""

import httpx

from qubax.providers import Provider, ProviderInfo, Upstream
from qubax.providers.bfl import BFL
from qubax.providers.openai import OpenAI
from qubax.providers.together import Together
from qubax.settings import Settings

PROVIDERS: dict[str, ProviderInfo] = {
    "bfl": ProviderInfo(BFL, "BFL_API_KEY", "bfl_api_key", "bfl_base_url"),
    "together": ProviderInfo(Together, "TOGETHER_API_KEY", "together_api_key", "together_base_url"),
    "openai": ProviderInfo(OpenAI, "OPENAI_API_KEY", "openai_api_key", "openai_base_url"),
}


def build_providers(settings: Settings, http: httpx.AsyncClient) -> dict[str, Provider]:
    """Adapters for the providers whose credential is set; the others stay off."""
    providers: dict[str, Provider] = {}
    for name, info in PROVIDERS.items():
        secret = getattr(settings, info.key_field)
        if secret is not None and secret.get_secret_value():
            base_url = str(getattr(settings, info.base_url_field)).rstrip("/")
            upstream = Upstream(http, base_url, secret.get_secret_value(), settings.poll_interval_seconds)
            providers[name] = info.build(upstream)
    return providers
