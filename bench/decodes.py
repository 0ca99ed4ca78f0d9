"""Peak memory of `qubax serve` while four edits of one large PNG arrive at once (issue 24, finding 3).

    .venv/bin/python -m bench.decodes [SIDE [DEPTH]]

SIDE (default 8000) is the image's width and height, DEPTH (default 16) its bits a sample: an RGBA PNG
of zeros, about half a megabyte at 8000x8000x16. Starts `qubax serve` with a fresh data folder and a
test key, sends four `POST /v1/images/edits` of it at once, and reports the answers and the server's
resident memory before and its high-water mark after (VmRSS, VmHWM from /proc). A test key makes its
picture from the first image, so every such edit decodes it where it fits the decoding budget (past
it, the picture is drawn without it).
"""

import concurrent.futures
import sys
import time
from pathlib import Path

import httpx
from tests.test_edits import zeros_png

from bench.uploads import memory, serving

EDITS = 4
QUBAX = Path(sys.executable).parent / "qubax"


def main() -> None:
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    image = zeros_png(side, side, depth)
    with serving() as (url, key, pid, _):

        def edit(index: int) -> int:
            response = httpx.post(
                f"{url}/v1/images/edits",
                data={"model": "gpt-image-1.5", "prompt": "a sky", "quality": "low"},
                files=[("image", (f"{index}.png", image, "image/png"))],
                headers={"authorization": f"Bearer {key}"},
                timeout=300,
            )
            return response.status_code

        before = memory(pid)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(EDITS) as pool:
            answers = list(pool.map(edit, range(EDITS)))
        took = time.monotonic() - started
        after = memory(pid)
    print(f"{EDITS} edits at once of a {side}x{side} RGBA PNG, {depth} bits a sample ({len(image) / 2**20:.1f} MiB)")
    print(f"answers {answers} in {took:.1f} s")
    print(f"server VmRSS before: {before['VmRSS']} MiB; VmHWM after: {after['VmHWM']} MiB")


if __name__ == "__main__":
    main()
