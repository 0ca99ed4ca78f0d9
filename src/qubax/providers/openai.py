"""Any OpenAI-compatible Images API serving dall-e-3: one synchronous call per image."""

from typing import Any

from qubax.catalog import ImageRequest
from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.providers import GeneratedImage, ProviderInfo, Upstream
from qubax.providers.http import (
    Reply,
    base_host,
    billed,
    check_status,
    decode_b64,
    download,
    error_detail,
    fan_out,
    read_json,
    send,
)

PROVIDER = "OpenAI"
# Where OpenAI served dall-e-3 result URLs from; the configured base host (a proxy, a fake) is trusted too.
DELIVERY_HOSTS = ("oaidalleapiprodscus.blob.core.windows.net",)
MODERATION_CODES = ("content_policy_violation", "moderation_blocked")
NO_CREDIT_CODES = ("insufficient_quota", "billing_hard_limit_reached")


class OpenAI:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.host = base_host(upstream.base_url)

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        # dall-e-3 takes only n=1: one call per image, all at once.
        return await fan_out(self._one(request, model) for _ in range(request.n))

    async def _one(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        url = f"{self.upstream.base_url}/images/generations"
        async with self.upstream.lease() as key:
            headers = {"authorization": f"Bearer {key}"}
            response = await send(self.upstream.http, PROVIDER, "POST", url, headers=headers, json=body(request, model))
        self._raise_for_error(response, model)
        items = read_json(response, PROVIDER).get("data")
        item = items[0] if isinstance(items, list) and items else None
        if not isinstance(item, dict):
            raise TaskFailed(f"{PROVIDER} returned no image.")
        with billed():
            if item.get("b64_json") is not None:
                data = decode_b64(item["b64_json"], PROVIDER)
            else:
                # Only reached when the host ignores response_format=b64_json; download() refuses foreign hosts.
                data = await download(self.upstream, PROVIDER, item.get("url"))
        revised = item.get("revised_prompt")
        return [GeneratedImage(data, revised if isinstance(revised, str) else None)]

    def _raise_for_error(self, response: Reply, model: str) -> None:
        """OpenAI's quirks first (its error `code` says more than the status), then the common mapping."""
        if response.status_code < 300:
            return
        code, detail = error_code(response), error_detail(response)
        # Until 2023 OpenAI sent the safety-system message with `code: null`.
        if code in MODERATION_CODES or (response.status_code == 400 and "safety system" in detail.lower()):
            raise ContentPolicyViolation()
        if response.status_code == 404 or code == "model_not_found":
            # OpenAI shut dall-e-3 down on 2026-05-12; only compatible hosts still serve it.
            raise UpstreamError(
                f"The upstream for this model does not serve {model}.",
                detail=f"the configured OpenAI-compatible host ({self.host}) does not serve it; point "
                f"QUBAX_OPENAI_BASE_URL at a host that does. It said: {detail or 'not found'}",
            )
        if code in NO_CREDIT_CODES:
            # OpenAI says "out of credit" with 429, which must not be retried like a rate limit.
            raise UpstreamError(
                f"{PROVIDER} could not serve the request ({response.status_code}).",
                detail=f"the account is out of credit: {detail}",
                failover=True,
            )
        check_status(response, PROVIDER)


def body(request: ImageRequest, model: str) -> dict[str, Any]:
    # b64_json because OpenAI's result URLs expire after an hour and would need a second fetch anyway.
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "n": 1,
        "size": f"{request.width}x{request.height}",
        "response_format": "b64_json",
    }
    if request.quality is not None:
        payload["quality"] = request.quality
    if request.style is not None:
        payload["style"] = request.style
    return payload


def error_code(response: Reply) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


# The cap keeps bursts from becoming 429s.
INFO = ProviderInfo(
    name="openai",
    build=OpenAI,
    credential="OPENAI_API_KEY",
    base_url="https://api.openai.com/v1",
    concurrency=20,
    delivery_hosts=DELIVERY_HOSTS,
)
