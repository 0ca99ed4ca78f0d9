"""Signed, expiring image URLs: LocalStorage on its own, then through the real app over HTTP."""

import asyncio
import io
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from qubax.app import create_app
from qubax.errors import Forbidden, Gone, NotFound, StorageUnavailable
from qubax.records.storage import HELPER_BYTES, SWEEP_GRACE_SECONDS, LocalStorage, load_secret
from qubax.server.settings import Settings
from tests.conftest import create_key
from tests.server import serve

PNG = b"\x89PNG\r\n\x1a\nnot really a png, but storage does not look"
SECRET = b"s" * 32


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "images", SECRET, ttl_seconds=60)


def split_signed_path(signed: str) -> tuple[str, str, str]:
    """`/images/ID.png?expires=E&signature=S` -> (ID, E, S)."""
    url = httpx.URL(signed)
    assert url.path.startswith("/images/img_") and url.path.endswith(".png")
    return url.path.removeprefix("/images/").removesuffix(".png"), url.params["expires"], url.params["signature"]


def flip_last(text: str) -> str:
    return text[:-1] + ("1" if text[-1] == "0" else "0")


# LocalStorage directly


@pytest.mark.anyio
async def test_put_writes_the_file_and_signed_path_verifies(storage: LocalStorage) -> None:
    image_id = await storage.put(PNG)
    assert image_id.startswith("img_")
    assert storage.path(image_id) == storage.root / f"{image_id}.png"
    assert storage.path(image_id).read_bytes() == PNG

    before = int(time.time())
    signed_id, expires, signature = split_signed_path(storage.signed_path(image_id))
    assert signed_id == image_id
    assert before + 60 <= int(expires) <= int(time.time()) + 60
    assert len(signature) == 64 and set(signature) <= set("0123456789abcdef")
    assert storage.verify(image_id, expires, signature) == storage.path(image_id)


@pytest.mark.anyio
@pytest.mark.parametrize("size", [HELPER_BYTES, HELPER_BYTES + 1], ids=["helper process", "worker thread"])
async def test_an_image_that_cannot_be_written_is_storage_unavailable(storage: LocalStorage, size: int) -> None:
    storage.root.rmdir()  # as a full or read-only disk would, the write fails
    try:
        with pytest.raises(StorageUnavailable):
            await storage.put(b"x" * size)
    finally:
        await storage.close()
    assert not storage.root.exists()


@pytest.mark.anyio
async def test_ids_are_unique(storage: LocalStorage) -> None:
    ids = {await storage.put(PNG) for _ in range(20)}
    assert len(ids) == 20
    assert len(list(storage.root.glob("img_*.png"))) == 20


@pytest.mark.anyio
async def test_tampered_signature_is_forbidden(storage: LocalStorage) -> None:
    image_id, expires, signature = split_signed_path(storage.signed_path(await storage.put(PNG)))
    for forged in (flip_last(signature), signature.upper(), signature[:-1], "", "0" * 64):
        with pytest.raises(Forbidden) as caught:
            storage.verify(image_id, expires, forged)
        assert (caught.value.status_code, caught.value.code) == (403, "invalid_signature")


@pytest.mark.anyio
async def test_tampered_expires_or_image_id_is_forbidden(storage: LocalStorage) -> None:
    image_id, expires, signature = split_signed_path(storage.signed_path(await storage.put(PNG)))
    other_id = await storage.put(PNG)
    with pytest.raises(Forbidden):
        storage.verify(image_id, str(int(expires) + 3600), signature)
    with pytest.raises(Forbidden):
        storage.verify(other_id, expires, signature)
    with pytest.raises(Forbidden):  # the same secret elsewhere signs differently
        LocalStorage(storage.root, b"t" * 32, 60).verify(image_id, expires, signature)


@pytest.mark.parametrize("expires", ["", "abc", "-5", "1e12", " 123", "123 ", "0x10", "1.5"])
def test_non_numeric_expires_is_forbidden(storage: LocalStorage, expires: str) -> None:
    with pytest.raises(Forbidden):
        storage.verify("img_abc", expires, storage.sign("img_abc", 10**10))


@pytest.mark.parametrize(
    ("expires", "signature"),
    [
        ("²", "0" * 64),  # str.isdigit() accepts it, int() does not
        ("9" * 5000, "0" * 64),  # int() refuses strings over 4300 digits
        (str(10**10), "é" * 64),  # hmac.compare_digest refuses non-ASCII str
    ],
    ids=["superscript-digit", "5000-digits", "non-ascii-signature"],
)
def test_hostile_query_values_are_forbidden_not_crashes(storage: LocalStorage, expires: str, signature: str) -> None:
    with pytest.raises(Forbidden):
        storage.verify("img_abc", expires, signature)


@pytest.mark.anyio
async def test_expired_url_is_gone(storage: LocalStorage) -> None:
    image_id = await storage.put(PNG)
    past = int(time.time()) - 10
    with pytest.raises(Gone) as caught:
        storage.verify(image_id, str(past), storage.sign(image_id, past))
    assert (caught.value.status_code, caught.value.code) == (410, "expired")
    with pytest.raises(Forbidden):  # a forged expired URL learns nothing about expiry
        storage.verify(image_id, str(past), flip_last(storage.sign(image_id, past)))


@pytest.mark.anyio
async def test_valid_signature_for_a_deleted_file_is_not_found(storage: LocalStorage) -> None:
    image_id, expires, signature = split_signed_path(storage.signed_path(await storage.put(PNG)))
    storage.path(image_id).unlink()
    with pytest.raises(NotFound) as caught:
        storage.verify(image_id, expires, signature)
    assert caught.value.status_code == 404


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.anyio
async def test_sweep_removes_only_images_older_than_the_ttl(storage: LocalStorage) -> None:
    old = [await storage.put(PNG) for _ in range(2)]
    fresh = await storage.put(PNG)
    almost = await storage.put(PNG)
    unrelated = storage.root / "notes.txt"
    unrelated.write_text("keep me")
    for image_id in old:
        age(storage.path(image_id), 61 + SWEEP_GRACE_SECONDS)
    age(storage.path(almost), 50)
    age(unrelated, 10_000)

    assert await storage.sweep() == 2
    assert [storage.path(i).exists() for i in old] == [False, False]
    assert storage.path(fresh).exists() and storage.path(almost).exists()
    assert unrelated.read_text() == "keep me"
    assert await storage.sweep() == 0


@pytest.mark.anyio
async def test_a_job_s_upload_is_copied_in_opened_as_a_real_file_and_deleted(storage: LocalStorage) -> None:
    upload = io.BytesIO(os.urandom(3 * 1024 * 1024 + 5))  # a few blocks of the copy, and a bit
    upload.seek(100)  # kept from its start, wherever the upload was left
    name = await storage.put_file(upload, "png", "job_abc")
    assert name.startswith("img_job_abc_") and name.endswith(".png")
    assert stat.S_IMODE((storage.root / name).stat().st_mode) == 0o600
    with await storage.open_file(name) as file:
        assert file.fileno() >= 0 and file.read() == upload.getvalue()
    await storage.delete([name, "img_job_abc_gone.png"])
    with pytest.raises(NotFound):
        await storage.open_file(name)


def test_load_secret_creates_a_private_file_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    secret = load_secret(data_dir)
    path = data_dir / "signing.key"
    assert len(secret) == 32
    assert path.read_bytes() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(data_dir) == secret
    assert load_secret(tmp_path / "elsewhere") != secret


# Through the real app


def generate_url(base_url: str, key: str) -> str:
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"model": "flux-1-schnell", "prompt": "a cat", "size": "256x256", "response_format": "url"},
        headers={"authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    url: str = response.json()["data"][0]["url"]
    return url


def assert_error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, code)
    assert error["message"]
    return error


@pytest.mark.local_storage_only  # with S3 and no public URL, links are presigned by the bucket
def test_signed_url_serves_the_png(base_url: str, test_key: str) -> None:
    url = generate_url(base_url, test_key)
    assert url.startswith(base_url + "/images/img_")
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    cache = response.headers["cache-control"]
    assert cache.startswith("private, max-age=")
    assert 3590 <= int(cache.removeprefix("private, max-age=")) <= 3600


@pytest.mark.local_storage_only  # ditto; test_s3.py checks our links served from a bucket
def test_one_changed_signature_character_is_403(base_url: str, test_key: str) -> None:
    url = httpx.URL(generate_url(base_url, test_key))
    forged = url.copy_set_param("signature", flip_last(url.params["signature"]))
    error = assert_error(httpx.get(forged), 403, "invalid_signature")
    assert "signature" in error["message"]
    assert_error(httpx.get(url.copy_with(query=None)), 403, "invalid_signature")


@pytest.mark.parametrize("path", ["/images/..%2Fsigning.key", "/images/img_x.jpg", "/images/signing.key"])
def test_names_that_are_not_images_are_404(base_url: str, settings: Settings, path: str) -> None:
    response = httpx.get(base_url + path)
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert (settings.data_dir / "signing.key").read_bytes() not in response.content


@pytest.mark.local_storage_only
def test_expired_url_is_410(base_url: str, settings: Settings, test_key: str) -> None:
    image_id, _, _ = split_signed_path(httpx.URL(generate_url(base_url, test_key)).raw_path.decode())
    assert (settings.images_dir / f"{image_id}.png").is_file()
    storage = LocalStorage(settings.images_dir, (settings.data_dir / "signing.key").read_bytes(), 60)
    past = int(time.time()) - 1
    params = {"expires": str(past), "signature": storage.sign(image_id, past)}
    error = assert_error(httpx.get(f"{base_url}/images/{image_id}.png", params=params), 410, "expired")
    assert "expired" in error["message"]


def test_sweeper_deletes_expired_images(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", image_ttl_seconds=5, sweep_interval_seconds=0.2)
    key = create_key(settings, test=True)
    with serve(create_app(settings)) as base_url:
        url = generate_url(base_url, key)
        image_id, _, _ = split_signed_path(httpx.URL(url).raw_path.decode())
        path = settings.images_dir / f"{image_id}.png"
        assert path.is_file()
        assert httpx.get(url).status_code == 200
        age(path, 3600)
        deadline = time.monotonic() + 10
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not path.exists()


@pytest.mark.sqlite_only
@pytest.mark.local_storage_only
def test_the_data_folder_and_what_it_holds_are_the_service_users_alone(
    settings: Settings, base_url: str, test_key: str
) -> None:
    body = {"model": "flux-1-schnell", "prompt": "a private cat", "response_format": "url"}
    answer = httpx.post(f"{base_url}/v1/images/generations", json=body, headers={"authorization": f"Bearer {test_key}"})
    assert answer.status_code == 200
    [image] = list(settings.images_dir.glob("img_*"))
    modes = {
        path.name: stat.S_IMODE(path.stat().st_mode)
        for path in (settings.data_dir, settings.data_dir / "qubax.db", settings.images_dir, image)
    }
    assert modes == {"data": 0o700, "qubax.db": 0o600, "images": 0o700, image.name: 0o600}

    async def put_big() -> str:  # over the helper process's size: written in a worker thread
        storage = LocalStorage(settings.images_dir, b"s" * 32, 60)
        try:
            return await storage.put(b"x" * (300 * 1024))
        finally:
            await storage.close()

    big = settings.images_dir / f"{asyncio.run(put_big())}.png"
    assert stat.S_IMODE(big.stat().st_mode) == 0o600
