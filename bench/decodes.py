"""Peak memory of `qubax serve` while four edits of one large PNG arrive at once (issue 24, finding 3).

    .venv/bin/python -m bench.decodes [SIDE [DEPTH]]

SIDE (default 8000) is the image's width and height, DEPTH (default 16) its bits a sample: an RGBA PNG
of zeros, about half a megabyte at 8000x8000x16. Starts `qubax serve` with a fresh data folder and a
test key, sends four `POST /v1/images/edits` of it at once, and reports the answers and the server's
resident memory before and its high-water mark after (VmRSS, VmHWM from /proc). A test key makes its
picture from the first image, so every such edit decodes it where nothing refuses it first.
"""

import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tests.test_edits import zeros_png

EDITS = 4
QUBAX = Path(sys.executable).parent / "qubax"


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) // 1024
    return fields


def main() -> None:
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    image = zeros_png(side, side, depth)
    data = Path(tempfile.mkdtemp(prefix="qubax-decodes-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")} | {"QUBAX_DATA_DIR": str(data)}
    key = subprocess.run([QUBAX, "keys", "create", "--test"], env=env, capture_output=True, text=True, check=True)
    port = 8000 + random.Random().randrange(1000)
    server = subprocess.Popen(
        [QUBAX, "serve", "--port", str(port)], env=env, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"

    def edit(index: int) -> int:
        response = httpx.post(
            f"{url}/v1/images/edits",
            data={"model": "gpt-image-1.5", "prompt": "a sky", "quality": "low"},
            files=[("image", (f"{index}.png", image, "image/png"))],
            headers={"authorization": f"Bearer {key.stdout.strip()}"},
            timeout=300,
        )
        return response.status_code

    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        before = memory(server.pid)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(EDITS) as pool:
            answers = list(pool.map(edit, range(EDITS)))
        took = time.monotonic() - started
        after = memory(server.pid)
        print(
            f"{EDITS} edits at once of a {side}x{side} RGBA PNG, {depth} bits a sample ({len(image) / 2**20:.1f} MiB)"
        )
        print(f"answers {answers} in {took:.1f} s")
        print(f"server VmRSS before: {before['VmRSS']} MiB; VmHWM after: {after['VmHWM']} MiB")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


if __name__ == "__main__":
    main()
