"""Black Forest Labs (api.bfl.ai): one async task per image, each polled until it yields a signed URL."""

from typing import Any

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.providers import GeneratedImage, Job, Upstream, aspect_ratio
from qubax.providers.http import (
    base_host,
    billed,
    check_status,
    download,
    fan_out,
    may_send_key,
    poll,
    read_json,
    send,
)

PROVIDER = "Black Forest Labs"
ULTRA = "flux-pro-1.1-ultra"  # takes an aspect ratio instead of width/height
# BFL answers with a polling URL on whichever cluster took the task; only its own hosts get the key.
KEY_HOSTS = ("bfl.ai", "*.bfl.ai")
# Signed result URLs: current delivery hosts and the older Azure blob store.
DELIVERY_HOSTS = ("delivery.*.bfl.ai", "*.bfl.ai", "bfldeliveryprod.blob.core.windows.net")
MODERATED = ("Request Moderated", "Content Moderated")


class BFL:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        # The configured base host (a proxy, or a fake in tests) is trusted like BFL's own.
        self.delivery_hosts = (*DELIVERY_HOSTS, base_host(upstream.base_url))

    async def generate(self, job: Job) -> list[GeneratedImage]:
        # BFL has no `n`: one task per image, all at once.
        return await fan_out(self._one(job) for _ in range(job.n))

    async def _one(self, job: Job) -> list[GeneratedImage]:
        # A task counts against the key's concurrency cap from submission until its result is in.
        async with self.upstream.lease() as key:
            headers = {"x-key": key, "accept": "application/json"}
            polling_url = await self._submit(job, headers)
            with billed():
                sample = await poll(lambda: self._check(polling_url, headers), self.upstream.poll_interval)
        with billed():
            # Delivery URLs are pre-signed: download() sends no key.
            return [GeneratedImage(await download(self.upstream.http, PROVIDER, sample, self.delivery_hosts))]

    async def _submit(self, job: Job, headers: dict[str, str]) -> str:
        url = f"{self.upstream.base_url}/v1/{job.model}"
        response = await send(self.upstream.http, PROVIDER, "POST", url, headers=headers, json=body(job))
        check_status(response, PROVIDER)
        task = read_json(response, PROVIDER)
        polling_url = task.get("polling_url")
        if not task.get("id") or not isinstance(polling_url, str):
            # Without an id there is no task of ours to be billed for: another route may take the work.
            raise UpstreamError(f"{PROVIDER} answered the submission without a task id or polling_url.", failover=True)
        if not may_send_key(polling_url, KEY_HOSTS, self.upstream.base_url):
            raise UpstreamError(f"{PROVIDER} returned a polling URL on a host we do not send the key to.")
        return polling_url

    async def _check(self, polling_url: str, headers: dict[str, str]) -> str | None:
        """The sample URL once the task is Ready, None while Pending; raise for every other outcome."""
        response = await send(self.upstream.http, PROVIDER, "GET", polling_url, headers=headers)
        if response.status_code == 404:
            raise UpstreamError(f"{PROVIDER} no longer knows the task (404).")
        check_status(response, PROVIDER)
        result = read_json(response, PROVIDER)
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
            details = result.get("details")
            reason = f": {str(details)[:200]}" if details else "."
            raise TaskFailed(f"{PROVIDER} failed to generate the image{reason}")
        if status == "Task not found":
            raise UpstreamError(f"{PROVIDER} no longer knows the task (Task not found).")
        raise UpstreamError(f"{PROVIDER} reported an unknown task status: {str(status)[:80]!r}.")


def body(job: Job) -> dict[str, Any]:
    # PNG keeps the caller's PNG conversion lossless; BFL's default is JPEG.
    payload: dict[str, Any] = {"prompt": job.prompt, "output_format": job.output_format or "png"}
    if job.seed is not None:
        payload["seed"] = job.seed
    if job.safety_tolerance is not None:
        payload["safety_tolerance"] = job.safety_tolerance
    if job.model == ULTRA:
        payload["aspect_ratio"] = aspect_ratio(job.width, job.height)
    else:
        payload |= {"width": job.width, "height": job.height}
    return payload
