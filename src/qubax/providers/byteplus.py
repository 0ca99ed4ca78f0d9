"""BytePlus ModelArk (ark.ap-southeast.bytepluses.com/api/v3): Seedream through its OpenAI-shaped,
synchronous `POST /images/generations`, one image a call."""

from typing import Any

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import EncodedInputs, encode_inputs
from qubax.providers import GeneratedImage, ProviderInfo
from qubax.providers.adapter import Adapter
from qubax.providers.batches import fan_out, whole_batch
from qubax.providers.failures import DETAIL_CHARS, billed
from qubax.providers.replies import Reply
from qubax.routing.request import ImageRequest

NAME, PROVIDER = "byteplus", "BytePlus ModelArk"
# Result URLs are on ModelArk's object storage (TOS); the configured base host (a proxy, a fake) is trusted too.
DELIVERY_HOSTS = ("*.bytepluses.com", "*.volces.com")
# ModelArk's error codes for content its checks refuse: InputTextSensitiveContentDetected,
# OutputImageSensitiveContentDetected, SensitiveContentDetected.Violence, InputImageRiskDetection, ...
REFUSAL_MARKS = ("SensitiveContent", "RiskDetection")


class ModelArk(Adapter):
    name, label = NAME, PROVIDER

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        # ModelArk's batch mode (`sequential_image_generation: auto`) makes as many images as the model
        # decides, up to max_images: exactly n images are only sure by one call an image.
        inputs = await encode_inputs(request.images, None, fill=False)
        payload = body(request, model, inputs)
        return await fan_out(self._call(payload) for _ in range(request.n))

    async def _call(self, payload: dict[str, Any]) -> list[GeneratedImage]:
        url = f"{self.upstream.base_url}/images/generations"
        async with self.upstream.lease() as key:
            headers = {"authorization": f"Bearer {key}"}
            response = await self.send("POST", url, headers=headers, json=payload)
        if response.status_code == 400 and refused(error_of(reply_json(response))):
            raise ContentPolicyViolation()
        items = self.checked_json(response).get("data")
        if not isinstance(items, list) or not items:
            raise UpstreamError(f"{PROVIDER} returned no list of images.", failover=True)
        with billed():
            images = [await self._image(item) for item in items[:1]]
        return whole_batch(images, 1, PROVIDER)

    async def _image(self, item: Any) -> GeneratedImage:
        if not isinstance(item, dict):
            raise UpstreamError(f"{PROVIDER} returned an image entry that is not an object.")
        if isinstance(item.get("error"), dict):
            # An image ModelArk failed to make is not billed (its `usage.generated_images` leaves it out).
            if refused(item["error"]):
                raise ContentPolicyViolation()
            detail = str(item["error"].get("message") or item["error"].get("code"))[:DETAIL_CHARS]
            raise TaskFailed(f"{PROVIDER} failed to generate the image.", detail=detail)
        if item.get("b64_json") is not None:
            return self.inline_image(item["b64_json"])
        # Only reached when ModelArk ignores response_format=b64_json; download() refuses foreign hosts.
        return GeneratedImage(await self.download(item.get("url")))


def body(request: ImageRequest, model: str, inputs: EncodedInputs | None) -> dict[str, Any]:
    # b64_json because result URLs expire (24 hours) and would need a second fetch anyway. ModelArk's
    # watermark is on unless asked off: off unless the client asked for it.
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "size": request.size,  # the catalog keeps sizes within ModelArk's pixel and aspect-ratio bounds
        "sequential_image_generation": "disabled",
        "response_format": "b64_json",
        "watermark": request.watermark,
    }
    if inputs is not None:  # data URIs: ModelArk takes them wherever it takes an image URL
        uris = inputs.data_uris()
        payload["image"] = uris[0] if len(uris) == 1 else uris
    return payload


def reply_json(response: Reply) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def error_of(answer: Any) -> Any:
    return answer.get("error") if isinstance(answer, dict) else None


def refused(error: Any) -> bool:
    """Whether ModelArk's error object is its content checks refusing the prompt, an input or the image."""
    code = error.get("code") if isinstance(error, dict) else None
    return isinstance(code, str) and any(mark in code for mark in REFUSAL_MARKS)


# The cap keeps bursts from becoming 429s (ModelArk limits images per minute per account).
INFO = ProviderInfo(
    name=NAME,
    build=ModelArk,
    credential="ARK_API_KEY",
    base_url="https://ark.ap-southeast.bytepluses.com/api/v3",
    concurrency=20,
    delivery_hosts=DELIVERY_HOSTS,
)
