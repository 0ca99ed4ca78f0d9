"""Generated images in an S3 bucket (AWS S3, Cloudflare R2, MinIO...), through one aiobotocore client.

Endpoint, region and credentials come from the standard AWS variables and profiles, which botocore reads
itself: `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`...
"""

import asyncio
import contextlib
import datetime
import logging
import tempfile
from collections.abc import AsyncIterator, Collection, Iterator
from typing import TYPE_CHECKING, BinaryIO

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from qubax.errors import NotFound, QubaxError, StorageUnavailable, UpstreamError
from qubax.records.storage import SWEEP_GRACE_SECONDS, SignedUrls, new_image_id, swept

if TYPE_CHECKING:  # the stubs are a development dependency
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef, ObjectIdentifierTypeDef

logger = logging.getLogger("qubax.s3")
PART_BYTES = 8 * 1024 * 1024  # what a job's upload is sent to the bucket in (S3's parts: 5 MiB at least)
# A bucket that does not answer must cost a request seconds, not minutes: botocore's defaults (60 s to
# connect, 60 s per read, retries with backoff) would hold it far longer.
CONFIG = AioConfig(
    signature_version="s3v4",  # everywhere: botocore still presigns us-east-1 with SigV2, which R2 refuses
    connect_timeout=5,
    read_timeout=30,
    retries={"mode": "standard", "max_attempts": 2},
)


@contextlib.asynccontextmanager
async def connect() -> AsyncIterator["S3Client"]:
    """The one S3 client the app uses for its whole life."""
    async with get_session().create_client("s3", config=CONFIG) as client:
        yield client


class S3Storage(SignedUrls):
    """Images as objects under a prefix. Links are presigned S3 URLs, unless the operator set a public
    address of ours (a CDN in front of the nodes): then they are our own signed URLs, which any node
    serves by reading the object."""

    def __init__(
        self, client: "S3Client", bucket: str, prefix: str, secret: bytes, ttl_seconds: int, own_links: bool
    ) -> None:
        super().__init__(secret, ttl_seconds)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.own_links = own_links

    def key(self, image_id: str, ext: str) -> str:
        return f"{self.prefix}{image_id}.{ext}"

    async def put(self, data: bytes, ext: str = "png", job_id: str | None = None) -> str:
        image_id = new_image_id(job_id)
        with translated("save the image"):
            await self.client.put_object(
                Bucket=self.bucket, Key=self.key(image_id, ext), Body=data, ContentType=f"image/{ext}"
            )
        return image_id

    async def put_file(self, file: BinaryIO, ext: str, job_id: str) -> str:
        """A part of `PART_BYTES` at a time (one `put_object` for a smaller file), read in a worker thread."""
        name = f"{new_image_id(job_id)}.{ext}"
        key, kind = self.prefix + name, f"image/{ext}"
        await asyncio.to_thread(file.seek, 0)
        part = await asyncio.to_thread(file.read, PART_BYTES)
        with translated("keep the uploaded files"):
            if len(part) < PART_BYTES:
                await self.client.put_object(Bucket=self.bucket, Key=key, Body=part, ContentType=kind)
            else:
                await self.put_parts(key, kind, part, file)
        return name

    async def put_parts(self, key: str, kind: str, part: bytes, file: BinaryIO) -> None:
        """A multipart upload of `part` and the rest of `file`."""
        bucket = self.bucket
        upload_id = (await self.client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=kind))["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            while part:
                number = len(parts) + 1
                sent = await self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part
                )
                parts.append({"ETag": sent["ETag"], "PartNumber": number})
                part = await asyncio.to_thread(file.read, PART_BYTES)
            await self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:  # or the bucket keeps (and bills) the parts sent
            await asyncio.shield(self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))
            raise

    async def open_file(self, name: str) -> BinaryIO:
        """The object copied into a temporary file (gone once closed), a block at a time."""
        copy = await asyncio.to_thread(tempfile.TemporaryFile)
        try:
            with translated("read the uploaded files"):
                try:
                    response = await self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)
                except self.client.exceptions.NoSuchKey as exc:
                    raise NotFound(f"The stored file {name} is gone.") from exc
                async with response["Body"] as body:
                    async for block in body.iter_chunks(PART_BYTES):
                        await asyncio.to_thread(copy.write, block)
            await asyncio.to_thread(copy.seek, 0)
        except BaseException:
            copy.close()
            raise
        return copy

    async def delete(self, names: Collection[str]) -> None:
        if names:  # at most 17 (an edit's images and mask): one request
            with translated("delete the uploaded files"):
                keys: list[ObjectIdentifierTypeDef] = [{"Key": self.prefix + name} for name in names]
                await self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    async def link(self, image_id: str, ext: str, public_url: str) -> str:
        if self.own_links:
            return await super().link(image_id, ext, public_url)
        with translated("sign a link"):  # signing is local, but may first fetch credentials
            return await self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key(image_id, ext)}, ExpiresIn=self.ttl_seconds
            )

    async def open(self, image_id: str, ext: str, expires: str, signature: str) -> bytes:
        self.check(image_id, expires, signature)
        with translated("read the image"):
            try:
                response = await self.client.get_object(Bucket=self.bucket, Key=self.key(image_id, ext))
            except self.client.exceptions.NoSuchKey as exc:
                raise NotFound("Image not found.") from exc
            async with response["Body"] as body:  # images are a few MB at most: one read
                return await body.read()

    async def ready(self) -> None:
        with translated("reach the bucket"):
            await self.client.head_bucket(Bucket=self.bucket)

    async def sweep(self, forgotten_jobs: Collection[str] = ()) -> int:
        """Delete objects older than the TTL (their URLs have all expired), and those of the forgotten
        jobs; returns how many."""
        age = datetime.timedelta(seconds=self.ttl_seconds + SWEEP_GRACE_SECONDS)
        cutoff = datetime.datetime.now(datetime.UTC) - age
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}img_")
        removed = 0
        with translated("sweep expired images"):
            async for page in pages:
                old: list[ObjectIdentifierTypeDef] = [
                    {"Key": item["Key"]}
                    for item in page.get("Contents", [])
                    if swept(item["Key"][len(self.prefix) :], item["LastModified"] < cutoff, forgotten_jobs)
                ]
                if old:  # a page lists at most 1000 keys, as many as one request may delete
                    deleted = await self.client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": old, "Quiet": True}
                    )
                    removed += len(old) - len(deleted.get("Errors", []))
        return removed


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """botocore's failures as ours: the bucket unreachable or overloaded is a 503, a refusal a 502."""
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        logger.warning("S3 could not %s: %s", action, exc)
        raise storage_error(action, exc) from exc


def storage_error(action: str, exc: ClientError | BotoCoreError) -> QubaxError:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        if status < 500 and status != 429:
            return UpstreamError(f"The image store refused to {action} ({code or status}).")
    elif not isinstance(exc, BotoConnectionError | HTTPClientError):
        return UpstreamError(f"The image store could not {action} ({type(exc).__name__}).")
    message = f"The image store is unavailable, so the server could not {action}; try again shortly."
    return StorageUnavailable(message)
