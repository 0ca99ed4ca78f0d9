"""Replicate (api.replicate.com): one prediction per call, answered at once under `Prefer: wait` or polled."""

import asyncio
from typing import Any

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import EncodedInputs, encode_inputs
from qubax.providers import GeneratedImage, ProviderInfo, aspect_ratio
from qubax.providers.adapter import Adapter, Callback
from qubax.providers.batches import batch_sizes, fan_out, whole_batch
from qubax.providers.failures import DETAIL_CHARS, billed
from qubax.routing.request import ImageRequest

NAME, PROVIDER = "replicate", "Replicate"
MAX_SCHNELL_OUTPUTS = 4  # flux-schnell's num_outputs is 1-4; pro and ultra make one image per prediction
KEY_HOSTS = ("api.replicate.com", "*.replicate.com")  # where urls.get and urls.cancel may take the key
DELIVERY_HOSTS = ("replicate.delivery", "*.replicate.delivery")
RUNNING = ("starting", "processing")
MODERATED_WORDS = ("nsfw", "flagged", "sensitive")  # "flagged as sensitive (E005)", "… contained NSFW content"
KONTEXT_MAX_SAFETY = 2  # Replicate's Kontext takes no higher safety_tolerance with an input image
FORMATS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}  # ours -> Replicate's names
# FLUX.2 (replicate.com/black-forest-labs/flux-2-pro, -max, -flex API pages, 2026-12): `aspect_ratio`
# "custom" with width and height (256-2048), `input_images` (a list: 8 for pro and max, 10 for flex),
# safety_tolerance 1-5; flex takes `steps` and `guidance`. One image per prediction.
FLUX2 = "black-forest-labs/flux-2-"
# Seedream (replicate.com/bytedance/seedream-4 and -4.5 API pages, 2026-12): `size` "custom" with width and
# height (1024-4096 each), else "2K"/"4K" and an `aspect_ratio`; `image_input` (a list: 10 for 4, 14 for 4.5).
SEEDREAM = "bytedance/seedream-"
SEEDREAM_RATIOS = ("1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3", "21:9")
SEEDREAM_SIDES = range(1024, 4097)
# Callbacks: `webhook` and `webhook_events_filter: ["completed"]` in the create body (Replicate's webhooks
# docs); the POST carries the prediction object, signed per Standard Webhooks with the account's secret
# (`QUBAX_REPLICATE_WEBHOOK_SECRET`, checked where set) besides the secret in the URL.


class Replicate(Adapter):
    name, label = NAME, PROVIDER

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        inputs = await encode_inputs(request.images, request.mask, fill="fill" in model)
        per_call = MAX_SCHNELL_OUTPUTS if "schnell" in model else 1
        counts = batch_sizes(request.n, per_call)
        return await fan_out(self._prediction(body(request, model, count, inputs), model, count) for count in counts)

    async def _prediction(self, payload: dict[str, Any], model: str, count: int) -> list[GeneratedImage]:
        prediction = self.resumable(model, count)  # created by a node that died: waited on, not made again
        # A prediction counts against the key's concurrency cap from creation until it is finished.
        async with self.upstream.lease(prediction) as key:
            headers = {"authorization": f"Bearer {key}"}
            if prediction is None:
                callback = self.callback()
                prediction = await self._create(payload | webhook(callback), model, headers)
                prediction["callback"] = callback.ref if callback else None  # what `_settle` waits on
                if prediction.get("status") in RUNNING and isinstance(prediction.get("urls"), dict):
                    note = {"status": "starting", "urls": prediction["urls"], "callback": prediction["callback"]}
                    await self.accepted(key, model, count, note)
            with billed():
                outputs = await self._settle(prediction, headers)
        with billed():
            images = [GeneratedImage(await self._fetch(output)) for output in outputs[:count]]
        return whole_batch(images, count, PROVIDER)  # the safety checker drops flagged images from the list

    async def _create(self, payload: dict[str, Any], model: str, headers: dict[str, str]) -> dict[str, Any]:
        url = f"{self.upstream.base_url}/models/{model}/predictions"
        # Replicate holds the request up to `wait` seconds (1-60) for the prediction to end, which saves
        # polling; the whole submission must still fit in its timeout.
        wait = max(1, min(60, int(self.upstream.http.timeouts.submit / 2)))
        headers = headers | {"prefer": f"wait={wait}"}
        return self.checked_json(await self.send("POST", url, headers=headers, json=payload, submission=True))

    async def _settle(self, prediction: dict[str, Any], headers: dict[str, str]) -> list[str]:
        """The output URIs once the prediction succeeded; raise for every other end."""
        if (done := outcome(prediction)) is not None:
            return done
        urls = prediction["urls"] if isinstance(prediction.get("urls"), dict) else {}
        get_url, cancel_url = urls.get("get"), urls.get("cancel")
        if not isinstance(get_url, str) or not self.trusted(get_url, KEY_HOSTS):
            raise UpstreamError(f"{PROVIDER} returned no prediction URL on a host we send the key to.")
        try:
            return await self.poll(lambda: self._check(get_url, headers), prediction.get("callback"))
        except asyncio.CancelledError:
            await self._cancel(cancel_url, headers)  # stop paying for work nobody waits for
            raise

    async def _check(self, url: str, headers: dict[str, str]) -> list[str] | None:
        return outcome(self.checked_json(await self.send("GET", url, headers=headers)))

    async def _cancel(self, url: Any, headers: dict[str, str]) -> None:
        if self.trusted(url, KEY_HOSTS):
            await self.cancel("POST", url, headers)

    async def _fetch(self, output: str) -> bytes:
        if output.startswith("data:"):
            header, _, payload = output.partition(",")
            return self.decode_b64(payload if header.endswith(";base64") else None)
        return await self.download(output)


def webhook(callback: Callback | None) -> dict[str, Any]:
    """The fields that have Replicate call us once, when the prediction ends."""
    return {} if callback is None else {"webhook": callback.url, "webhook_events_filter": ["completed"]}


def outcome(prediction: dict[str, Any]) -> list[str] | None:
    """The output URIs of a succeeded prediction, None while it runs; raise for every other status."""
    status = prediction.get("status")
    if status in RUNNING:
        return None
    if status == "succeeded":
        output = prediction.get("output")
        outputs = [output] if isinstance(output, str) else output
        if not isinstance(outputs, list) or not all(isinstance(item, str) for item in outputs):
            raise UpstreamError(f"{PROVIDER} reported the prediction succeeded but gave no output URIs.")
        return outputs
    error = str(prediction.get("error") or "")[:DETAIL_CHARS]
    if status == "failed" and any(word in error.lower() for word in MODERATED_WORDS):
        raise ContentPolicyViolation()
    if status == "failed":
        raise TaskFailed(f"{PROVIDER} failed to generate the image.", detail=error or "(no error given)")
    if status in ("canceled", "aborted"):
        raise TaskFailed(f"{PROVIDER} reports the prediction {status}.")
    detail = f"status {str(status)[:80]!r}"
    raise UpstreamError(f"{PROVIDER} reported an unknown prediction status.", detail=detail)


def body(request: ImageRequest, model: str, count: int, inputs: EncodedInputs | None = None) -> dict[str, Any]:
    # PNG keeps the caller's PNG conversion lossless; Replicate's default is webp (jpg for ultra).
    fmt = FORMATS.get(request.output_format or "png", "png")
    payload: dict[str, Any] = {"prompt": request.prompt, "output_format": fmt}
    if request.seed is not None:
        payload["seed"] = request.seed
    ratio = aspect_ratio(request.width, request.height)
    if "schnell" in model:
        megapixels = "0.25" if request.width * request.height <= 400_000 else "1"
        payload |= {"aspect_ratio": ratio, "megapixels": megapixels, "num_outputs": count}
        return {"input": payload | {"num_inference_steps": 4, "go_fast": True}}
    if model.startswith(FLUX2):
        return {"input": payload | flux2_inputs(request, inputs)}
    if model.startswith(SEEDREAM):
        return {"input": seedream_inputs(request, inputs)}
    if request.safety_tolerance is not None:
        payload["safety_tolerance"] = min(max(request.safety_tolerance, 1), 6)  # Replicate takes 1-6
    if "ultra" in model or "kontext" in model or "fill" in model:
        payload["output_format"] = "jpg" if fmt == "jpg" else "png"  # these make jpg or png only
    if "fill" in model:  # Fill makes its image's size
        return {"input": payload | fill_inputs(inputs)}
    if "ultra" not in model and "kontext" not in model:
        return {"input": payload | {"aspect_ratio": "custom", "width": request.width, "height": request.height}}
    payload["aspect_ratio"] = ratio
    if "kontext" in model and inputs is not None:
        payload["input_image"] = inputs.data_uris()[0]  # one image: the catalog route says so
        if "safety_tolerance" in payload:
            payload["safety_tolerance"] = min(payload["safety_tolerance"], KONTEXT_MAX_SAFETY)
    return {"input": payload}


def flux2_inputs(request: ImageRequest, inputs: EncodedInputs | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"aspect_ratio": "custom", "width": request.width, "height": request.height}
    if request.safety_tolerance is not None:
        fields["safety_tolerance"] = min(max(request.safety_tolerance, 1), 5)
    tuning = {"steps": request.steps, "guidance": request.guidance}
    fields |= {name: value for name, value in tuning.items() if value is not None}
    return fields | ({"input_images": inputs.data_uris()} if inputs is not None else {})


def seedream_inputs(request: ImageRequest, inputs: EncodedInputs | None) -> dict[str, Any]:
    """The size asked where Replicate's custom sizes reach it, else the nearest aspect ratio at 2K (4K for
    larger sizes), fitted afterwards. One image, and no output_format or seed: Seedream takes neither."""
    fields: dict[str, Any] = {"prompt": request.prompt, "sequential_image_generation": "disabled", "max_images": 1}
    if request.width in SEEDREAM_SIDES and request.height in SEEDREAM_SIDES:
        fields |= {"size": "custom", "width": request.width, "height": request.height}
    else:
        ratio = aspect_ratio(request.width, request.height, SEEDREAM_RATIOS)
        fields |= {"size": "4K" if request.width * request.height > 2048 * 2048 else "2K", "aspect_ratio": ratio}
    return fields | ({"image_input": inputs.data_uris()} if inputs is not None else {})


def fill_inputs(inputs: EncodedInputs | None) -> dict[str, Any]:
    if inputs is None:
        raise UpstreamError(f"{PROVIDER}'s Fill needs an image and a mask.")
    return {"image": inputs.data_uris()[0], "mask": inputs.mask_uri()}


# The cap keeps bursts from becoming 429s.
INFO = ProviderInfo(
    name=NAME,
    build=Replicate,
    credential="REPLICATE_API_TOKEN",
    base_url="https://api.replicate.com/v1",
    concurrency=50,
    delivery_hosts=DELIVERY_HOSTS,
    callbacks=True,
)
