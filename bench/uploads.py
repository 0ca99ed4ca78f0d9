"""Peak memory of `qubax serve` while it takes one edit of 16 large images (issue 15).

    .venv/bin/python -m bench.uploads [SIDE] [async]

SIDE (default 1000) is each image's width and height: 1000 gives ~3 MB images, 1400 ~6 MB. With
`async`, the edit is sent as a job (`Prefer: respond-async`), and the database's size is reported too.

Starts `qubax serve` with a fresh data folder and a test key, sends one `POST /v1/images/edits` with
16 PNGs of random noise (about 3 MB each: noise does not compress), and reports the server's resident
memory before and its high-water mark after, next to the size of the upload. Test keys make their
picture from the first image, so no upstream is involved: what is measured is taking the upload in,
checking it and answering.
"""

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from PIL import Image

IMAGES = 16
SIDE = int(sys.argv[1]) if len(sys.argv) > 1 else 1000  # 1000x1000 RGB noise: ~3 MB as PNG
QUBAX = Path(sys.executable).parent / "qubax"
AS_JOB = "async" in sys.argv[2:]


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) // 1024
    return fields


def noise(seed: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (SIDE, SIDE), random.Random(seed).randbytes(SIDE * SIDE * 3)).save(out, "PNG")
    return out.getvalue()


@contextlib.contextmanager
def serving() -> Iterator[tuple[str, str, int, Path]]:
    """`qubax serve` on a fresh data folder, healthy: its URL, a test key, its pid and the folder."""
    data = Path(tempfile.mkdtemp(prefix="qubax-uploads-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")} | {"QUBAX_DATA_DIR": str(data)}
    key = subprocess.run([QUBAX, "keys", "create", "--test"], env=env, capture_output=True, text=True, check=True)
    port = 8000 + random.Random().randrange(1000)
    server = subprocess.Popen(
        [QUBAX, "serve", "--port", str(port)], env=env, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url, key.stdout.strip(), server.pid, data
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


def main() -> None:
    with serving() as (url, key, pid, data):
        images = [noise(seed) for seed in range(IMAGES)]
        total = sum(len(image) for image in images) / 2**20
        before = memory(pid)
        files = [("image[]", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
        headers = {"authorization": f"Bearer {key}"}
        started = time.monotonic()
        response = httpx.post(
            f"{url}/v1/images/edits",
            data={"model": "gpt-image-1.5", "prompt": "a grid"},
            files=files,
            headers=headers | ({"prefer": "respond-async"} if AS_JOB else {}),
            timeout=120,
        )
        took = time.monotonic() - started
        after = memory(pid)
        print(f"upload: {IMAGES} images, {total:.1f} MiB in all; answer {response.status_code} in {took:.1f} s")
        print(f"server VmRSS before: {before['VmRSS']} MiB; VmHWM after: {after['VmHWM']} MiB")
        growth = after["VmHWM"] - before["VmRSS"]
        print(f"peak growth: {growth} MiB = {growth / total:.2f}x the upload")
        if AS_JOB:
            time.sleep(5)  # the job runs, and its files go
            job = httpx.get(f"{url}/v1/images/jobs/{response.json()['id']}", headers=headers).json()
            database = sum(path.stat().st_size for path in data.glob("qubax.db*")) / 2**20
            print(f"job {job['status']}; VmHWM then: {memory(pid)['VmHWM']} MiB; database: {database:.1f} MiB")


if __name__ == "__main__":
    main()
