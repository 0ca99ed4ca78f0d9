"""Images in S3: the storage on its own, then through the real app and the `openai` SDK, always against
moto's S3 server on loopback (whatever --storage says)."""

import contextlib
import datetime
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import SecretStr, ValidationError

from qubax.app import create_app
from qubax.errors import Forbidden, Gone, NotFound, ServiceUnavailable, UpstreamError
from qubax.records import s3, tables
from qubax.records.s3 import S3Storage
from qubax.records.storage import SWEEP_GRACE_SECONDS, LocalStorage, SignedUrls
from qubax.server.services import open_storage
from qubax.server.settings import Settings
from tests.conftest import create_key, eventually
from tests.postgres import free_port
from tests.s3 import create_bucket, running_moto, s3_environment
from tests.server import serve
from tests.stack import rows, running_stack
from tests.test_generation import png_size

PNG = b"\x89PNG\r\n\x1a\nnot really a png, but storage does not look"
SECRET = b"s" * 32
SHARED_SECRET = "a shared secret, at least 32 characters long"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with running_moto() as url:
        yield url


@pytest.fixture
def bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the standard AWS variables pointing at moto."""
    for name, value in s3_environment(endpoint).items():
        monkeypatch.setenv(name, value)
    name = f"t-{uuid.uuid4().hex[:20]}"
    create_bucket(endpoint, name)
    return name


@pytest.fixture
def s3_settings(settings: Settings, bucket: str) -> Settings:
    settings.storage_url = f"s3://{bucket}/images"
    return settings


@contextlib.asynccontextmanager
async def bucket_storage(bucket: str, own_links: bool = False) -> AsyncIterator[S3Storage]:
    async with s3.connect() as client:
        yield S3Storage(client, bucket, "/images/", SECRET, 60, own_links)


def age(bucket: str, key: str, seconds: float) -> None:
    """Backdate an object, as os.utime backdates a file: moto's server runs in this process."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    stored = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[bucket].keys[key]
    stored.last_modified -= datetime.timedelta(seconds=seconds)


def split(url: str) -> tuple[str, str, str]:
    """Our `/images/ID.png?expires=E&signature=S` -> (ID, E, S)."""
    parsed = httpx.URL(url)
    image_id = parsed.path.removeprefix("/images/").removesuffix(".png")
    return image_id, parsed.params["expires"], parsed.params["signature"]


# Choosing the storage


@pytest.mark.anyio
async def test_the_storage_url_picks_the_storage(settings: Settings, bucket: str, tmp_path: Path) -> None:
    settings.storage_url = None
    async with open_storage(settings) as storage:
        assert isinstance(storage, LocalStorage) and storage.root == settings.images_dir
        assert storage.secret == (settings.data_dir / "signing.key").read_bytes()
    settings.storage_url, settings.signing_secret = f"file://{tmp_path}/my%20pics", SecretStr(SHARED_SECRET)
    async with open_storage(settings) as storage:
        assert isinstance(storage, LocalStorage) and storage.root == tmp_path / "my pics"
        assert storage.secret == SHARED_SECRET.encode()
    settings.storage_url, settings.public_url = f"s3://{bucket}/a/b/", "https://cdn.example"
    async with open_storage(settings) as storage:
        assert isinstance(storage, S3Storage)
        assert (storage.bucket, storage.key("img_x", "png"), storage.own_links) == (bucket, "a/b/img_x.png", True)
    for wrong in ("s3:///images", "ftp://host/images", "file://host/images"):
        settings.storage_url = wrong
        with pytest.raises(ValueError, match="QUBAX_STORAGE_URL"):
            async with open_storage(settings):
                pass


def test_a_short_signing_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUBAX_SIGNING_SECRET", "x" * 31)
    with pytest.raises(ValidationError, match="signing_secret"):
        Settings()


# S3Storage directly


@pytest.mark.anyio
async def test_put_stores_an_object_and_the_presigned_link_downloads_it(endpoint: str, bucket: str) -> None:
    async with bucket_storage(bucket) as storage:
        image_id = await storage.put(PNG)
        assert image_id.startswith("img_")
        stored = await storage.client.head_object(Bucket=bucket, Key=f"images/{image_id}.png")
        assert stored["ContentType"] == "image/png"

        link = await storage.link(image_id, "png", "https://ignored.example")
        assert link.startswith(f"{endpoint}/{bucket}/images/{image_id}.png?")
        url = httpx.URL(link)
        assert (url.params["X-Amz-Algorithm"], url.params["X-Amz-Expires"]) == ("AWS4-HMAC-SHA256", "60")
        async with httpx.AsyncClient() as http:
            download = await http.get(link)
        assert (download.status_code, download.content) == (200, PNG)
        assert download.headers["content-type"] == "image/png"


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1000, s3.PART_BYTES * 2 + 1])
async def test_a_job_s_upload_goes_to_the_bucket_in_parts_and_comes_back_as_a_file(bucket: str, size: int) -> None:
    """One `put_object` for a small upload, a multipart upload of `PART_BYTES` parts for a large one."""
    upload = io.BytesIO(os.urandom(size))
    async with bucket_storage(bucket) as storage:
        name = await storage.put_file(upload, "jpeg", "job_abc")
        head = await storage.client.head_object(Bucket=bucket, Key=f"images/{name}")
        assert (head["ContentLength"], head["ContentType"]) == (size, "image/jpeg")
        assert ("-3" in head["ETag"]) == (size > s3.PART_BYTES)  # a multipart object's ETag counts its parts
        with await storage.open_file(name) as file:
            assert file.fileno() >= 0 and file.read() == upload.getvalue()
        await storage.delete([name])
        with pytest.raises(NotFound):
            await storage.open_file(name)
        listed = await storage.client.list_multipart_uploads(Bucket=bucket)
        assert listed.get("Uploads", []) == []


@pytest.mark.anyio
async def test_own_links_are_read_back_from_the_bucket_and_checked(bucket: str) -> None:
    async with bucket_storage(bucket, own_links=True) as storage:
        image_id = await storage.put(PNG, "webp")
        link = await storage.link(image_id, "webp", "https://cdn.example")
        assert link.startswith(f"https://cdn.example/images/{image_id}.webp?expires=")
        parsed = httpx.URL(link)
        expires, signature = parsed.params["expires"], parsed.params["signature"]
        assert await storage.open(image_id, "webp", expires, signature) == PNG

        with pytest.raises(Forbidden):
            await storage.open(image_id, "webp", expires, signature[:-1] + ("1" if signature[-1] == "0" else "0"))
        with pytest.raises(Forbidden):  # another node with another secret
            await S3Storage(storage.client, bucket, "images", b"t" * 32, 60, True).open(
                image_id, "webp", expires, signature
            )
        past = int(time.time()) - 1
        with pytest.raises(Gone):
            await storage.open(image_id, "webp", str(past), storage.sign(image_id, past))
        with pytest.raises(NotFound):  # signed, but never stored (or swept)
            await storage.open(image_id, "png", expires, signature)


@pytest.mark.anyio
async def test_sweep_deletes_only_images_older_than_the_ttl(bucket: str) -> None:
    async with bucket_storage(bucket) as storage:
        old = [await storage.put(PNG) for _ in range(3)]
        fresh = await storage.put(PNG)
        almost = await storage.put(PNG)
        for image_id in old:
            age(bucket, f"images/{image_id}.png", 61 + SWEEP_GRACE_SECONDS)
        age(bucket, f"images/{almost}.png", 50)
        for key in ("images/notes.txt", f"elsewhere/{old[0]}.png"):  # not ours to delete
            await storage.client.put_object(Bucket=bucket, Key=key, Body=b"keep me")
            age(bucket, key, 10_000)

        assert await storage.sweep() == 3
        listed = await storage.client.list_objects_v2(Bucket=bucket)
        left = {item["Key"] for item in listed.get("Contents", [])}
        assert left == {f"images/{fresh}.png", f"images/{almost}.png", "images/notes.txt", f"elsewhere/{old[0]}.png"}
        assert await storage.sweep() == 0


@pytest.mark.anyio
async def test_an_unreachable_store_is_a_503_and_a_missing_bucket_a_502(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bucket_storage(f"{bucket}-missing") as storage:
        with pytest.raises(UpstreamError) as refused:
            await storage.put(PNG)
        assert refused.value.status_code == 502 and "NoSuchBucket" in refused.value.message
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    async with bucket_storage(bucket) as storage:
        with pytest.raises(ServiceUnavailable) as unreachable:
            await storage.put(PNG)
        assert unreachable.value.status_code == 503 and unreachable.value.headers["retry-after"] == "5"
        with pytest.raises(ServiceUnavailable):
            await storage.sweep()


# Through the real app


def test_url_responses_are_presigned_and_download_from_the_bucket(s3_settings: Settings, bucket: str) -> None:
    key = create_key(s3_settings, test=True)
    with serve(create_app(s3_settings)) as base_url:
        client = openai.OpenAI(api_key=key, base_url=base_url + "/v1", max_retries=0)
        response = client.images.generate(model="flux-1-schnell", prompt="a cat", n=2, size="512x256")
    urls = [item.url or "" for item in response.data]
    assert all(httpx.URL(url).path.startswith(f"/{bucket}/images/img_") for url in urls)
    assert all("X-Amz-Signature=" in url for url in urls)
    downloads = [httpx.get(url) for url in urls]  # our app is gone: the bucket serves them
    assert [d.status_code for d in downloads] == [200, 200]
    assert [png_size(d.content) for d in downloads] == [(512, 256)] * 2
    assert not s3_settings.images_dir.exists()


def test_with_a_public_url_any_node_serves_what_another_stored(s3_settings: Settings) -> None:
    s3_settings.signing_secret = SecretStr(SHARED_SECRET)
    key = create_key(s3_settings, test=True)
    # The second node shares the bucket and the secret, not the data folder (nor its signing.key).
    other = s3_settings.model_copy(update={"data_dir": s3_settings.data_dir.parent / "other-node"})
    with serve(create_app(other)) as other_url:
        s3_settings.public_url = other_url  # the address clients are given: here, straight to the other node
        with serve(create_app(s3_settings)) as base_url:
            client = openai.OpenAI(api_key=key, base_url=base_url + "/v1", max_retries=0)
            url = client.images.generate(model="flux-1-schnell", prompt="a cat", size="256x256").data[0].url or ""
        assert url.startswith(other_url + "/images/img_")
        served = httpx.get(url)  # the storing node has stopped
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/png"
        assert served.headers["cache-control"].startswith("private, max-age=")
        assert png_size(served.content) == (256, 256)

        image_id, expires, signature = split(url)
        tampered = httpx.get(httpx.URL(url).copy_set_param("signature", signature[::-1]))
        assert tampered.status_code == 403
        assert tampered.json()["error"]["code"] == "invalid_signature"
        past = int(time.time()) - 1
        sign = SignedUrls(SHARED_SECRET.encode(), 60).sign
        expired = httpx.get(
            f"{other_url}/images/{image_id}.png", params={"expires": past, "signature": sign(image_id, past)}
        )
        assert expired.status_code == 410
        assert set(expired.json()["error"]) == {"message", "type", "param", "code"}
        missing = httpx.get(f"{other_url}/images/{image_id}.jpeg", params={"expires": expires, "signature": signature})
        assert missing.status_code == 404
    assert not (other.data_dir / "signing.key").exists()


def test_the_sweeper_deletes_expired_objects(s3_settings: Settings, bucket: str) -> None:
    s3_settings.image_ttl_seconds, s3_settings.sweep_interval_seconds = 5, 0.2
    key = create_key(s3_settings, test=True)
    with serve(create_app(s3_settings)) as base_url:
        client = openai.OpenAI(api_key=key, base_url=base_url + "/v1", max_retries=0)
        url = client.images.generate(model="flux-1-schnell", prompt="a cat", size="256x256").data[0].url or ""
        assert httpx.get(url).status_code == 200
        age(bucket, httpx.URL(url).path.removeprefix(f"/{bucket}/"), 3600)

        def gone() -> None:
            assert httpx.get(url).status_code == 404

        eventually(gone, seconds=10)


def test_an_unreachable_store_is_an_openai_error_and_nothing_is_charged(
    s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with running_stack(s3_settings, providers=("bfl",)) as stack:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            stack.live.images.generate(model="flux-1.1-pro", prompt="a cat", size="256x256")
        assert time.monotonic() - started < 10  # our own retry and timeout settings bound it, not botocore's
        health = httpx.get(stack.url + "/healthz")
        assert health.status_code == 503 and "image store is unavailable" in health.json()["error"]["message"]
    error = caught.value
    assert (error.status_code, error.code, error.type) == (503, "storage_unavailable", "service_unavailable_error")
    assert "image store" in error.message
    assert error.response.headers["retry-after"] == "5"
    [generation] = rows(s3_settings, tables.Generation)
    assert (generation.outcome, generation.images, generation.cost_micros) == ("storage_unavailable", 0, 0)
    assert [(a.upstream, a.outcome) for a in rows(s3_settings, tables.Attempt)] == [("bfl", "ok")]


def test_qubax_serve_will_not_start_on_an_unreachable_store(s3_settings: Settings, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")}
    env |= {
        "QUBAX_DATA_DIR": str(tmp_path / "data"),
        "QUBAX_STORAGE_URL": s3_settings.storage_url or "",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
    }
    qubax = str(Path(sys.executable).parent / "qubax")
    done = subprocess.run([qubax, "serve"], env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"Error: QUBAX_STORAGE_URL='{s3_settings.storage_url}': cannot use the image store")
    assert "Could not connect to the endpoint URL" in lines[0]
