"""Generated images on local disk, served through signed, expiring URLs."""

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

import anyio

from qubax.errors import Forbidden, Gone, NotFound


def load_secret(data_dir: Path) -> bytes:
    """The URL-signing secret, created once per data folder and readable only by its owner."""
    path = data_dir / "signing.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(32))
    return path.read_bytes()


class LocalStorage:
    def __init__(self, root: Path, secret: bytes, ttl_seconds: int) -> None:
        self.root = root
        self.secret = secret
        self.ttl_seconds = ttl_seconds
        root.mkdir(parents=True, exist_ok=True)

    async def put(self, png: bytes) -> str:
        image_id = "img_" + secrets.token_urlsafe(18)
        await anyio.Path(self.path(image_id)).write_bytes(png)
        return image_id

    def path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.png"

    def sign(self, image_id: str, expires: int) -> str:
        message = f"{image_id}:{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def signed_path(self, image_id: str) -> str:
        """The path and query of a URL that serves the image until the TTL runs out."""
        expires = int(time.time()) + self.ttl_seconds
        return f"/images/{image_id}.png?expires={expires}&signature={self.sign(image_id, expires)}"

    def verify(self, image_id: str, expires: str, signature: str) -> Path:
        """The file a signed URL points to; raises when the URL is forged, expired or the file is gone."""
        if not expires.isdigit() or not hmac.compare_digest(self.sign(image_id, int(expires)), signature):
            raise Forbidden("Invalid image URL signature.", code="invalid_signature")
        if int(expires) < time.time():
            raise Gone("This image URL has expired. Generate the image again or request b64_json.")
        path = self.path(image_id)
        if not path.is_file():
            raise NotFound("Image not found.")
        return path

    async def sweep(self) -> int:
        """Delete images older than the TTL (their URLs have all expired); returns how many."""
        return await anyio.to_thread.run_sync(self._sweep)

    def _sweep(self) -> int:
        cutoff = time.time() - self.ttl_seconds
        removed = 0
        for path in self.root.glob("img_*.png"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # another node's sweep got there first
                continue
        return removed
