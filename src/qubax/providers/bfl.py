"""Black Forest Labs (api.bfl.ai): one async task per image, each polled until it yields a signed URL."""

import urllib.parse
from typing import Any

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import EncodedInputs, encode_inputs
from qubax.providers import GeneratedImage, ProviderInfo, aspect_ratio
from qubax.providers.adapter import Adapter
from qubax.providers.batches import fan_out
from qubax.providers.failures import DETAIL_CHARS, billed
from qubax.routing.request import ImageRequest

NAME, PROVIDER = "bfl", "Black Forest Labs"
ULTRA = "flux-pro-1.1-ultra"  # takes an aspect ratio instead of width/height
KONTEXT = ("flux-kontext-pro", "flux-kontext-max")  # so do these; they take up to 4 input images
FILL = "flux-pro-1.0-fill"  # paints into its one image where the mask is white, at the image's size
# FLUX.2 (`flux-2-pro`, `-max`, `-flex`, `-klein-4b`, `-klein-9b`; docs.bfl.ai API reference, 2026-12):
# width and height (multiples of 16, up to 4 MP), up to 8 reference images (klein: 4), safety_tolerance
# 0-5, jpeg or png; flex adds `steps` and `guidance`. The answer carries `cost` and `output_mp` as well.
FLUX2 = "flux-2-"
FLUX2_MAX_SAFETY = 5
INPUT_FIELDS = ("input_image", *(f"input_image_{i}" for i in range(2, 9)))
# BFL answers with a polling URL on whichever cluster took the task; only its own hosts get the key.
KEY_HOSTS = ("bfl.ai", "*.bfl.ai")
# Signed result URLs: current delivery hosts and the older Azure blob store.
DELIVERY_HOSTS = ("delivery.*.bfl.ai", "*.bfl.ai", "bfldeliveryprod.blob.core.windows.net")
MODERATED = ("Request Moderated", "Content Moderated")
# Callbacks: `webhook_url` in the submission (BFL's OpenAPI: every model's input takes `webhook_url` and
# `webhook_secret`); the answer is then `AsyncWebhookResponse` (`id`, `status`, `webhook_url`), and BFL
# POSTs the task's result to the URL when it ends. Its own signature (from `webhook_secret`) is presented
# differently by different BFL sources, so we send none and rely on the secret in the URL.


class BFL(Adapter):
    name, label = NAME, PROVIDER

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        inputs = await encode_inputs(request.images, request.mask, fill=model == FILL)
        payload = body(request, model, inputs)
        # BFL has no `n`: one task per image, all at once.
        return await fan_out(self._one(payload, model) for _ in range(request.n))

    async def _one(self, payload: dict[str, Any], model: str) -> list[GeneratedImage]:
        task = self.resumable(model, 1)  # BFL cannot cancel a task: one a dead node started is waited on
        # A task counts against the key's concurrency cap from submission until its result is in.
        async with self.upstream.lease(task) as key:
            headers = {"x-key": key, "accept": "application/json"}
            if task is None:
                task = await self._submit(payload, model, headers)
                await self.accepted(key, model, 1, task)
            polling_url = task["polling_url"]
            with billed():
                sample = await self.poll(lambda: self._check(polling_url, headers), task.get("callback"))
        with billed():
            # Delivery URLs are pre-signed: download() sends no key.
            return [GeneratedImage(await self.download(sample))]

    async def _submit(self, payload: dict[str, Any], model: str, headers: dict[str, str]) -> dict[str, Any]:
        """The task's handle: its polling URL, and its callback's reference when it has one."""
        url = f"{self.upstream.base_url}/v1/{model}"
        handle: dict[str, Any] = {}
        if (callback := self.callback()) is not None:
            handle["callback"] = callback.ref
            payload = payload | {"webhook_url": callback.url}
        response = await self.send("POST", url, headers=headers, json=payload, submission=True)
        task = self.checked_json(response)
        polling_url = task.get("polling_url")
        if callback is not None and polling_url is None and isinstance(task.get("id"), str):
            # BFL's answer to a submission with a webhook (`AsyncWebhookResponse`) may lack it.
            polling_url = f"{self.upstream.base_url}/v1/get_result?id={urllib.parse.quote(task['id'])}"
        if not task.get("id") or not isinstance(polling_url, str):
            # Without an id there is no task of ours to be billed for: another route may take the work.
            raise UpstreamError(f"{PROVIDER} answered the submission without a task id or polling_url.", failover=True)
        if not self.trusted(polling_url, KEY_HOSTS):
            raise UpstreamError(f"{PROVIDER} returned a polling URL on a host we do not send the key to.")
        return handle | {"polling_url": polling_url}

    async def _check(self, polling_url: str, headers: dict[str, str]) -> str | None:
        """The sample URL once the task is Ready, None while Pending; raise for every other outcome."""
        response = await self.send("GET", polling_url, headers=headers)
        if response.status_code == 404:
            raise UpstreamError(f"{PROVIDER} no longer knows the task (404).")
        result = self.checked_json(response)
        status = result.get("status")
        if status == "Pending":  # BFL's own SDK treats only this as in progress
            return None
        if status == "Ready":
            sample = result.get("result")
            sample = sample.get("sample") if isinstance(sample, dict) else None
            if not isinstance(sample, str) or not sample:
                raise UpstreamError(f"{PROVIDER} reported the task Ready but gave no image URL.")
            return sample
        if status in MODERATED:
            raise ContentPolicyViolation()
        if status == "Error":
            detail = str(result.get("details") or "(no details)")[:DETAIL_CHARS]
            raise TaskFailed(f"{PROVIDER} failed to generate the image.", detail=detail)
        if status == "Task not found":
            raise UpstreamError(f"{PROVIDER} no longer knows the task (Task not found).")
        detail = f"status {str(status)[:80]!r}"
        raise UpstreamError(f"{PROVIDER} reported an unknown task status.", detail=detail)


def body(request: ImageRequest, model: str, inputs: EncodedInputs | None = None) -> dict[str, Any]:
    # PNG keeps the caller's PNG conversion lossless; BFL's default is JPEG.
    payload: dict[str, Any] = {"prompt": request.prompt, "output_format": request.output_format or "png"}
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.safety_tolerance is not None:
        payload["safety_tolerance"] = request.safety_tolerance
    if model.startswith(FLUX2):
        return payload | flux2_fields(request, inputs)
    if model == ULTRA or model in KONTEXT:
        payload["aspect_ratio"] = aspect_ratio(request.width, request.height)
    elif model != FILL:  # Fill makes its image's size
        payload |= {"width": request.width, "height": request.height}
    if inputs is None:
        return payload
    encoded = [text for _, text in inputs.images]
    if model == FILL:
        return payload | {"image": encoded[0], "mask": inputs.mask}
    return payload | dict(zip(INPUT_FIELDS, encoded, strict=False))


def flux2_fields(request: ImageRequest, inputs: EncodedInputs | None) -> dict[str, Any]:
    """FLUX.2's size, its reference images and flex's tuning; jpeg or png (webp is made from png)."""
    fields: dict[str, Any] = {"width": request.width, "height": request.height}
    fields["output_format"] = "jpeg" if request.output_format == "jpeg" else "png"
    if request.safety_tolerance is not None:
        fields["safety_tolerance"] = min(request.safety_tolerance, FLUX2_MAX_SAFETY)
    tuning = {"steps": request.steps, "guidance": request.guidance}
    fields |= {name: value for name, value in tuning.items() if value is not None}
    if inputs is not None:
        fields |= dict(zip(INPUT_FIELDS, (text for _, text in inputs.images), strict=False))
    return fields


# BFL allows 24 active tasks per key by default.
INFO = ProviderInfo(
    name=NAME,
    build=BFL,
    credential="BFL_API_KEY",
    base_url="https://api.bfl.ai",
    concurrency=24,
    delivery_hosts=DELIVERY_HOSTS,
    callbacks=True,
)
