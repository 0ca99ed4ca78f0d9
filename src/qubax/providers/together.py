"""Together AI (api.together.xyz): synchronous images endpoint, up to four images per call."""

from typing import Any

from qubax.errors import ContentPolicyViolation, UpstreamError
from qubax.providers import GeneratedImage, ProviderInfo
from qubax.providers.adapter import Adapter
from qubax.providers.batches import batch_sizes, fan_out, whole_batch
from qubax.providers.failures import billed, error_detail
from qubax.routing.request import ImageRequest

NAME, PROVIDER = "together", "Together"
MAX_PER_CALL = 4  # Together accepts n from 1 to 4
# Result URLs come from Together's own CDN; the configured base host (a proxy, or a fake) is trusted too.
DELIVERY_HOSTS = ("*.together.ai", "*.together.xyz", "api.together.ai")
# Together answers 422 both for its safety checker and for plain validation failures.
SAFETY_WORDS = ("nsfw", "safety")


class Together(Adapter):
    name, label = NAME, PROVIDER

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        return await fan_out(self._call(request, model, count) for count in batch_sizes(request.n, MAX_PER_CALL))

    async def _call(self, request: ImageRequest, model: str, n: int) -> list[GeneratedImage]:
        url = f"{self.upstream.base_url}/images/generations"
        async with self.upstream.lease() as key:
            headers = {"authorization": f"Bearer {key}"}
            response = await self.send("POST", url, headers=headers, json=body(request, model, n))
        if response.status_code == 422 and any(word in error_detail(response).lower() for word in SAFETY_WORDS):
            raise ContentPolicyViolation()
        items = self.checked_json(response).get("data")
        if not isinstance(items, list):
            raise UpstreamError(f"{PROVIDER} returned no list of images.", failover=True)
        with billed():
            images = [await self._image(item) for item in items[:n]]
        return whole_batch(images, n, PROVIDER)

    async def _image(self, item: Any) -> GeneratedImage:
        if not isinstance(item, dict):
            raise UpstreamError(f"{PROVIDER} returned an image entry that is not an object.")
        if item.get("b64_json") is not None:
            return self.inline_image(item["b64_json"])
        # Only reached when Together ignores response_format=base64; download() refuses foreign hosts.
        return GeneratedImage(await self.download(item.get("url")))


def body(request: ImageRequest, model: str, n: int) -> dict[str, Any]:
    # Inline base64 because result URLs expire; PNG keeps the caller's PNG conversion lossless.
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "width": request.width,
        "height": request.height,
        "n": n,
        "response_format": "base64",
        # Together makes only jpeg and png; anything else is converted from png (lossless) on our side.
        "output_format": "jpeg" if request.output_format == "jpeg" else "png",
    }
    if request.seed is not None:
        payload["seed"] = request.seed
    if "schnell" in model.lower():
        payload["steps"] = 4  # schnell is distilled for 4 steps; Together's default of 20 only costs time
    return payload


# The cap keeps bursts from becoming 429s.
INFO = ProviderInfo(
    name=NAME,
    build=Together,
    credential="TOGETHER_API_KEY",
    base_url="https://api.together.xyz/v1",
    concurrency=20,
    delivery_hosts=DELIVERY_HOSTS,
)
