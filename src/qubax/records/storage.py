"""Where generated images live (the `Storage` protocol), local disk (`LocalStorage`), and our own signed,
expiring image URLs, which any node holding the secret can check."""

import asyncio
import contextlib
import hmac
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from qubax.errors import Forbidden, Gone, NotFound, ServiceUnavailable, StorageUnavailable
from qubax.records import file_writer
from qubax.records.writers import WriteFailed, WriterProcess
from qubax.server.settings import Settings

logger = logging.getLogger("qubax")
SECRET_BYTES = 32
# The sweeper waits this long past the TTL, so an image never vanishes before its URL expires.
SWEEP_GRACE_SECONDS = 5


class Storage(Protocol):
    """What the app needs from a place to keep images: local disk, or an S3 bucket (`qubax.s3`)."""

    async def put(self, data: bytes, ext: str = "png", job_id: str | None = None) -> str:
        """Keep the image; returns its new id. A job's image is kept as long as the job (`sweep`)."""
        ...

    async def link(self, image_id: str, ext: str, public_url: str) -> str:
        """A URL that serves the image until the TTL runs out; `public_url` is our own address."""
        ...

    async def open(self, image_id: str, ext: str, expires: str, signature: str) -> Path | bytes:
        """The image one of our signed URLs points to, as a file to send or its bytes; raises when the
        URL is forged or expired, or the image is gone."""
        ...

    async def sweep(self, forgotten_jobs: Collection[str] = ()) -> int:
        """Delete the images whose URLs have all expired, except jobs' images, which go with their job:
        those of the `forgotten_jobs`. Returns how many."""
        ...

    async def ready(self) -> None:
        """Raise `ServiceUnavailable` when the store cannot be used now (for /healthz and the start)."""
        ...

    async def put_file(self, file: BinaryIO, ext: str, job_id: str) -> str:
        """Keep a job's upload, copied from `file` in blocks (never whole in memory), as long as the job
        at most (`sweep`); returns its name, `{id}.{ext}`."""
        ...

    async def open_file(self, name: str) -> BinaryIO:
        """A file kept with `put_file`, open for reading, a real file (with a descriptor); raises
        `NotFound` when it is gone."""
        ...

    async def delete(self, names: Collection[str]) -> None:
        """Delete files kept with `put_file`; those already gone are no matter."""
        ...


def signing_secret(settings: Settings) -> bytes:
    """`QUBAX_SIGNING_SECRET` when set (every node behind one address must share it), else this data
    folder's own secret."""
    if settings.signing_secret is not None:
        return settings.signing_secret.get_secret_value().encode()
    return load_secret(settings.data_dir)


def load_secret(data_dir: Path) -> bytes:
    """The URL-signing secret, created once per data folder and readable only by its owner."""
    path = data_dir / "signing.key"
    if not path.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Write aside, then link into place: a reader never sees a half-written (weak) secret, and of
        # two nodes starting at once the second simply adopts the first one's secret.
        fd, temporary = tempfile.mkstemp(dir=data_dir, prefix=".signing-")  # created with mode 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_bytes(SECRET_BYTES))
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
    secret = path.read_bytes()
    if len(secret) < SECRET_BYTES:
        raise RuntimeError(f"{path} holds a secret shorter than {SECRET_BYTES} bytes; delete it to make a new one.")
    return secret


# An image's file name in our links, `/images/{id}.{ext}`: the id `new_image_id` makes, and the format.
IMAGE_NAME = re.compile(r"(img_[A-Za-z0-9_-]{1,64})\.(png|jpeg|webp)")


IMAGE_LINK = re.compile(rf"/{IMAGE_NAME.pattern}(?:\?|$)")  # one of our image links, wherever served


async def relink(answer: dict[str, Any], storage: "Storage", public_url: str) -> None:
    """Sign anew the image links of a stored ImagesResponse (as JSON) told again later: the first ones
    may have expired."""
    for item in answer.get("data", []):
        if isinstance(item.get("url"), str) and (link := IMAGE_LINK.search(item["url"])):
            item["url"] = await storage.link(link[1], link[2], public_url)


def new_image_id(job_id: str | None = None) -> str:
    """A new image's id; a job's names the job (`JOB_IMAGE`)."""
    return "img_" + (f"{job_id}_" if job_id else "") + secrets.token_urlsafe(18)


JOB_IMAGE = re.compile(r"img_(job_[A-Za-z0-9]+)_")  # a job's image: the job's id (`tables.new_id`'s form) first


def swept(name: str, expired: bool, forgotten_jobs: Collection[str]) -> bool:
    """Whether the sweep removes an image: a job's once the job is forgotten (a client reading the job
    late still gets its images), any other once its URLs have all `expired`."""
    job = JOB_IMAGE.match(name)
    return expired if job is None else job[1] in forgotten_jobs


class SignedUrls:
    """Our own image URLs, `/images/{id}.{ext}?expires=..&signature=..`, signed with an HMAC."""

    def __init__(self, secret: bytes, ttl_seconds: int) -> None:
        self.secret = secret
        self.ttl_seconds = ttl_seconds

    def sign(self, image_id: str, expires: int) -> str:
        message = f"{image_id}:{expires}".encode()
        return hmac.digest(self.secret, message, "sha256").hex()  # one call into OpenSSL, not `hmac.new`

    def signed_path(self, image_id: str, ext: str = "png") -> str:
        """The path and query of a URL that serves the image until the TTL runs out."""
        expires = int(time.time()) + self.ttl_seconds
        return f"/images/{image_id}.{ext}?expires={expires}&signature={self.sign(image_id, expires)}"

    async def link(self, image_id: str, ext: str, public_url: str) -> str:
        return public_url + self.signed_path(image_id, ext)

    def check(self, image_id: str, expires: str, signature: str) -> None:
        """Raise when the URL is forged or expired."""
        well_formed = expires.isascii() and expires.isdigit() and len(expires) <= 12 and signature.isascii()
        if not well_formed or not hmac.compare_digest(self.sign(image_id, int(expires)), signature):
            raise Forbidden("Invalid image URL signature.", code="invalid_signature")
        if int(expires) < time.time():
            raise Gone("This image URL has expired. Generate the image again or request b64_json.")


class FileWriter:
    """Writes files off the event loop: small ones through a helper process (`writers.py` says why),
    big ones in asyncio's worker threads, where the pipe's extra copies would cost more than the
    hand-over saves (bench/README.md)."""

    def __init__(self) -> None:
        self.helper = WriterProcess("qubax.records.file_writer")

    async def write(self, path: str, data: bytes) -> None:
        if len(data) > HELPER_BYTES:
            await asyncio.to_thread(write_file, path, data)
            return
        try:
            await self.helper.call(file_writer.frame(path, data))
        except WriteFailed as exc:
            raise OSError(f"Writing {os.path.basename(path)} failed: {exc}") from exc

    async def close(self) -> None:
        await self.helper.close()


HELPER_BYTES = 256 * 1024  # files up to this size go through the helper process


SYNC_DATA = getattr(os, "fdatasync", os.fsync)  # macOS has only fsync


def write_file(path: str, data: bytes) -> None:
    """Write a big image, on disk before its link goes out, and then out of the page cache: it is read
    once or twice at most. Kept cached, each file cost the kernel ever more CPU as the cache grew, far
    more than synced and dropped (bench/README.md); the sync waits in a worker thread."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
        file.write(data)
        file.flush()
        SYNC_DATA(file.fileno())
        if hasattr(os, "posix_fadvise"):  # not on macOS
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def copy_file(file: BinaryIO, path: Path) -> None:
    """`file` from its start into a new file at `path`, a block at a time, on disk before this returns."""
    file.seek(0)
    try:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            shutil.copyfileobj(file, out, COPY_BLOCK)
            out.flush()
            SYNC_DATA(out.fileno())
    except OSError:
        path.unlink(missing_ok=True)  # no half file behind
        raise


COPY_BLOCK = 1024 * 1024


def delete_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class LocalStorage(SignedUrls):
    def __init__(self, root: Path, secret: bytes, ttl_seconds: int) -> None:
        super().__init__(secret, ttl_seconds)
        self.root = root
        self.folder = str(root)
        self.writer = FileWriter()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def put(self, data: bytes, ext: str = "png", job_id: str | None = None) -> str:
        image_id = new_image_id(job_id)
        try:
            # A string, not `self.path()`: building a `Path` is measurably dearer (bench/README.md).
            await self.writer.write(f"{self.folder}/{image_id}.{ext}", data)
        except OSError as exc:  # the disk is full, say: the client hears why, not the folder's path
            logger.warning("could not save an image in %s: %s", self.folder, exc)
            raise StorageUnavailable(
                "The server could not save the image: its image storage is full or not writable. Try again shortly."
            ) from exc
        return image_id

    async def close(self) -> None:
        await self.writer.close()

    async def put_file(self, file: BinaryIO, ext: str, job_id: str) -> str:
        name = f"{new_image_id(job_id)}.{ext}"
        try:
            await asyncio.to_thread(copy_file, file, self.root / name)
        except OSError as exc:
            logger.warning("could not keep an upload in %s: %s", self.folder, exc)
            raise StorageUnavailable(
                "The server could not keep the uploaded files: its image storage is full or not writable. "
                "Try again shortly."
            ) from exc
        return name

    async def open_file(self, name: str) -> BinaryIO:
        try:
            return await asyncio.to_thread(open, self.root / name, "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"The stored file {name} is gone.") from exc

    async def delete(self, names: Collection[str]) -> None:
        await asyncio.to_thread(delete_files, [self.root / name for name in names])

    def path(self, image_id: str, ext: str = "png") -> Path:
        return self.root / f"{image_id}.{ext}"

    async def open(self, image_id: str, ext: str, expires: str, signature: str) -> Path:
        return self.verify(image_id, expires, signature, ext)

    def verify(self, image_id: str, expires: str, signature: str, ext: str = "png") -> Path:
        """The file a signed URL points to; raises when the URL is forged, expired or the file is gone."""
        self.check(image_id, expires, signature)
        path = self.path(image_id, ext)
        if not path.is_file():
            raise NotFound("Image not found.")
        return path

    async def sweep(self, forgotten_jobs: Collection[str] = ()) -> int:
        """Delete images older than the TTL (their URLs have all expired), and those of the forgotten
        jobs; returns how many."""
        return await asyncio.to_thread(self._sweep, forgotten_jobs)

    async def ready(self) -> None:
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise ServiceUnavailable(f"The image folder {self.folder} is not writable.", retry_after=5)

    def _sweep(self, forgotten_jobs: Collection[str]) -> int:
        cutoff = time.time() - self.ttl_seconds - SWEEP_GRACE_SECONDS
        removed = 0
        for path in self.root.glob("img_*"):
            try:
                if swept(path.name, path.stat().st_mtime < cutoff, forgotten_jobs):
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # another node's sweep got there first
                continue
        return removed
