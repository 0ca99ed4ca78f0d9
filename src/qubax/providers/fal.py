"""fal.ai queue (queue.fal.run): submit, poll the returned status URL, fetch the result, download the images."""

import asyncio
import re
import urllib.parse
from typing import Any

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import EncodedInputs, encode_inputs
from qubax.providers import GeneratedImage, ProviderInfo, aspect_ratio
from qubax.providers.adapter import Adapter
from qubax.providers.batches import batch_sizes, fan_out, whole_batch
from qubax.providers.failures import DETAIL_CHARS, billed
from qubax.providers.replies import Reply
from qubax.routing.request import ImageRequest

NAME, PROVIDER = "fal", "fal.ai"
ULTRA = "fal-ai/flux-pro/v1.1-ultra"  # takes an aspect ratio instead of an image size
ULTRA_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")  # fal's list: no 5:4, 4:5
SCHNELL = "fal-ai/flux/schnell"
# Kontext is one app per way in: `<model>` edits one image, `<model>/multi` several, `<model>/text-to-image` none.
KONTEXT = "/kontext"
FILL = "fal-ai/flux-pro/v1/fill"  # image_url and mask_url (white where to paint)
MAX_PER_REQUEST = 4  # fal takes num_images from 1 to 4
# FLUX.2 (fal.ai/models/fal-ai/flux-2-pro, -max, -flex and their `/edit` apps, 2026-12): one image per
# request (no num_images), image_size {width, height}, safety_tolerance "1"-"5", jpeg or png; an edit
# goes to `<model>/edit` with `image_urls`. Flex's steps and guidance are sent by fal's usual names.
FLUX2 = "fal-ai/flux-2-"
# Seedream (fal.ai/models/fal-ai/bytedance/seedream/v4/text-to-image, .../v4/edit, v4.5 likewise, 2026-12):
# image_size {width, height}, num_images 1-6; an edit goes to `.../edit` with `image_urls` (up to 10).
SEEDREAM, SEEDREAM_TEXT = "fal-ai/bytedance/seedream/", "/text-to-image"
KEY_HOSTS = ("fal.run", "*.fal.run", "*.fal.ai")  # the queue URLs submit returns get the key only here
MEDIA_HOSTS = ("fal.media", "*.fal.media", "*.fal.run", "*.fal.ai")
# Callbacks: `?fal_webhook=<url>` on the queue submission (fal's webhooks docs); when the request ends fal
# POSTs `request_id`, `gateway_request_id`, `status` (OK or ERROR) and `payload` to it. fal signs it with
# ED25519 keys from its JWKS; we rely on the secret in the URL instead, which needs no fetch of fal's keys.
DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.DOTALL)  # what sync_mode answers


class Fal(Adapter):
    name, label = NAME, PROVIDER

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        inputs = await encode_inputs(request.images, request.mask, fill=model == FILL)
        counts = batch_sizes(request.n, 1 if model.startswith(FLUX2) else MAX_PER_REQUEST)
        endpoint = app_for(model, len(request.images))
        return await fan_out(self._request(endpoint, body(request, model, count, inputs), count) for count in counts)

    async def _request(self, endpoint: str, payload: dict[str, Any], count: int) -> list[GeneratedImage]:
        urls = self.resumable(endpoint, count)  # queued by a node that died: waited on, not sent again
        # A request counts against the key's concurrency cap from submission until its result is in.
        async with self.upstream.lease(urls) as key:
            headers = {"authorization": f"Key {key}", "accept": "application/json"}
            if urls is None:
                urls = await self._submit(endpoint, payload, headers)
                await self.accepted(key, endpoint, count, urls)
            with billed():
                await self._wait(urls, headers)
                output = await self._call("GET", urls["response_url"], headers)
        with billed():
            return await self._images(output, count)

    async def _submit(self, endpoint: str, payload: dict[str, Any], headers: dict[str, str]) -> dict[str, str]:
        """The request's handle: its queue URLs, and its callback's reference when it has one."""
        url, handle = f"{self.upstream.base_url}/{endpoint}", {}
        if (callback := self.callback()) is not None:
            handle["callback"] = callback.ref
            url += "?" + urllib.parse.urlencode({"fal_webhook": callback.url})
        queued = await self._call("POST", url, headers, json=payload, submission=True)
        urls = {name: queued.get(name) for name in ("status_url", "response_url", "cancel_url")}
        if not queued.get("request_id") or not all(isinstance(url, str) for url in urls.values()):
            raise UpstreamError(f"{PROVIDER} accepted the request but returned no request_id or queue URLs.")
        if not all(self.trusted(url, KEY_HOSTS) for url in urls.values()):
            raise UpstreamError(f"{PROVIDER} returned a queue URL on a host we do not send the key to.")
        return handle | {name: str(url) for name, url in urls.items()}

    async def _call(self, method: str, url: str, headers: dict[str, str], **kwargs: Any) -> dict[str, Any]:
        """`kwargs` go to `transport.send`."""
        response = await self.send(method, url, headers=headers, **kwargs)
        # fal's content checker refuses on submit, and the response URL repeats the model's own errors.
        if moderated(response):
            raise ContentPolicyViolation()
        return self.checked_json(response)  # a status URL answers 202 while queued or running

    async def _wait(self, urls: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            await self.poll(lambda: self._check(urls["status_url"], headers), urls.get("callback"))
        except asyncio.CancelledError:
            # Nobody will collect the result: take it out of fal's queue.
            await self.cancel("PUT", urls["cancel_url"], headers)
            raise

    async def _check(self, url: str, headers: dict[str, str]) -> bool | None:
        """True once the request is COMPLETED, None while it waits or runs; raise for every other outcome."""
        status = await self._call("GET", url, headers)
        state = status.get("status")
        if state in ("IN_QUEUE", "IN_PROGRESS"):
            return None
        if state != "COMPLETED":
            detail = f"status {str(state)[:80]!r}"
            raise UpstreamError(f"{PROVIDER} reported an unknown request status.", detail=detail)
        if error := status.get("error") or status.get("error_type"):
            raise TaskFailed(f"{PROVIDER} failed to generate the images.", detail=str(error)[:DETAIL_CHARS])
        return True

    async def _images(self, output: dict[str, Any], count: int) -> list[GeneratedImage]:
        entries = output.get("images")
        if not isinstance(entries, list):
            raise UpstreamError(f"{PROVIDER} returned no list of images.")
        flags = output.get("has_nsfw_concepts")
        flagged = {i for i, flag in enumerate(flags) if flag is True} if isinstance(flags, list) else set()
        # fal blacks out what its safety checker flags: such images are never delivered.
        safe = [entry for i, entry in enumerate(entries[:count]) if i not in flagged]
        if flagged and not safe:
            raise ContentPolicyViolation()
        images = await fan_out(self._image(entry) for entry in safe)
        return whole_batch(images, count, PROVIDER)

    async def _image(self, entry: Any) -> list[GeneratedImage]:
        url = entry.get("url") if isinstance(entry, dict) else None
        if isinstance(url, str) and (inline := DATA_URI.fullmatch(url)):
            return [self.inline_image(inline[1])]
        # Media URLs are public: download() sends no key, and only to fal's media hosts.
        return [GeneratedImage(await self.download(url))]


def moderated(response: Reply) -> bool:
    """fal's content checker answers 422 with a FastAPI-style error of type `content_policy_violation`."""
    try:
        detail = response.json().get("detail") if response.status_code == 422 else None
    except (ValueError, AttributeError):
        return False
    items = detail if isinstance(detail, list) else [detail]
    return any(isinstance(item, dict) and item.get("type") == "content_policy_violation" for item in items)


def app_for(model: str, images: int) -> str:
    """The fal app that takes this many input images for the route's model."""
    if model.startswith(FLUX2):
        return f"{model}/edit" if images else model
    if model.startswith(SEEDREAM) and images:
        return model.removesuffix(SEEDREAM_TEXT) + "/edit"
    if model.endswith(KONTEXT) or model.endswith(f"{KONTEXT}/max"):
        return model if images == 1 else f"{model}/{'multi' if images else 'text-to-image'}"
    return model


def body(request: ImageRequest, model: str, count: int, inputs: EncodedInputs | None = None) -> dict[str, Any]:
    # fal takes jpeg or png only; PNG keeps the caller's conversion lossless (and stands in for webp).
    image_format = "jpeg" if request.output_format == "jpeg" else "png"
    payload: dict[str, Any] = {"prompt": request.prompt, "num_images": count, "output_format": image_format}
    if request.seed is not None:
        payload["seed"] = request.seed
    if model.startswith(FLUX2):
        return flux2_body(request, payload, inputs)
    if model.startswith(SEEDREAM):
        return seedream_body(request, count, inputs)
    if model == ULTRA or KONTEXT in model:
        payload["aspect_ratio"] = aspect_ratio(request.width, request.height, ULTRA_RATIOS)
    elif model != FILL:  # Fill makes its image's size
        payload["image_size"] = {"width": request.width, "height": request.height}
        payload["enable_safety_checker"] = True
    if model == SCHNELL:
        payload["num_inference_steps"] = 4  # schnell is distilled for 4 steps
    elif request.safety_tolerance is not None and "flux-pro" in model:
        payload["safety_tolerance"] = str(min(max(request.safety_tolerance, 1), 6))  # fal wants "1" … "6"
    if inputs is None:
        return payload
    # Data URIs: fal takes them wherever it takes a URL, and nothing is left behind in its storage.
    uris = inputs.data_uris()
    if model == FILL:
        return payload | {"image_url": uris[0], "mask_url": inputs.mask_uri()}
    return payload | ({"image_url": uris[0]} if len(uris) == 1 else {"image_urls": uris})


def flux2_body(request: ImageRequest, payload: dict[str, Any], inputs: EncodedInputs | None) -> dict[str, Any]:
    payload = {name: value for name, value in payload.items() if name != "num_images"}
    payload |= {"image_size": {"width": request.width, "height": request.height}, "enable_safety_checker": True}
    if request.safety_tolerance is not None:
        payload["safety_tolerance"] = str(min(max(request.safety_tolerance, 1), 5))
    tuning = {"num_inference_steps": request.steps, "guidance_scale": request.guidance}
    payload |= {name: value for name, value in tuning.items() if value is not None}
    # Data URIs, as for the other models: nothing is left behind in fal's storage.
    return payload | ({"image_urls": inputs.data_uris()} if inputs is not None else {})


def seedream_body(request: ImageRequest, count: int, inputs: EncodedInputs | None) -> dict[str, Any]:
    # Made at the size asked (fal takes Seedream's pixel range); no output_format: Seedream makes its own.
    size = {"width": request.width, "height": request.height}
    payload = {"prompt": request.prompt, "num_images": count, "image_size": size, "enable_safety_checker": True}
    return payload | ({"image_urls": inputs.data_uris()} if inputs is not None else {})


# The cap keeps bursts from becoming 429s.
INFO = ProviderInfo(
    name=NAME,
    build=Fal,
    credential="FAL_KEY",
    base_url="https://queue.fal.run",
    concurrency=40,
    delivery_hosts=MEDIA_HOSTS,
    callbacks=True,
)
