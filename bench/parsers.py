"""Parsing upstream answers: `qubax.providers.payload` against json, orjson and msgspec (issue 25).

    .venv/bin/python -m bench.parsers [SECONDS [ROUNDS]]

In one process, each parser reads the same bodies, the parsers taking turns for ROUNDS rounds (default
9) of about SECONDS (default 0.1) each; each keeps its best round. The ratios are against `json.loads`
in the same run. Times are this process's CPU time, which a busy machine disturbs least.

The bodies are what upstreams send: an OpenAI-style answer with one or four base64 images of 1 and
4 MB (noise, which PNG does not shrink), the two answers `python -m bench` relays (light: a flat
1024x1024 PNG, a few KB; heavy: a noise one, 1.5 MB), and the small JSON of a submission, a poll and
an error. Each parser's result is checked against json.loads's before it is timed.
"""

import base64
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import orjson

from bench.upstream import make_body
from qubax.providers import payload

MiB = 1024 * 1024


def image_answer(images: int, size: int) -> bytes:
    b64 = base64.b64encode(os.urandom(size)).decode()
    data = [{"b64_json": b64, "revised_prompt": "a red fox in snow"} for _ in range(images)]
    usage = {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210}
    return json.dumps({"created": 1765000000, "data": data, "usage": usage, "quality": "high"}).encode()


BODIES: dict[str, bytes] = {
    "bench light (flat PNG)": make_body(1024, 1024, "light"),
    "bench heavy (noise PNG)": make_body(1024, 1024, "heavy"),
    "1 image, 1 MB": image_answer(1, 1 * MiB),
    "1 image, 4 MB": image_answer(1, 4 * MiB),
    "4 images, 1 MB each": image_answer(4, 1 * MiB),
    "4 images, 4 MB each": image_answer(4, 4 * MiB),
    "BFL submission": b'{"id":"a4c1e6e2-1b7f-4b1e-9d0a-7c1f2a3b4c5d","polling_url":'
    b'"https://api.us1.bfl.ai/v1/get_result?id=a4c1e6e2-1b7f-4b1e-9d0a-7c1f2a3b4c5d","cost":4.0}',
    "Replicate prediction": json.dumps(
        {
            "id": "rrr0e7d7kxrj40cm2a1t0r6g4c",
            "model": "black-forest-labs/flux-schnell",
            "status": "succeeded",
            "input": {"prompt": "a red fox in snow", "num_outputs": 4, "aspect_ratio": "1:1"},
            "output": [f"https://replicate.delivery/xezq/abc{i}/out-{i}.png" for i in range(4)],
            "urls": {
                "get": "https://api.replicate.com/v1/predictions/rrr0e7d7kxrj40cm2a1t0r6g4c",
                "cancel": "https://api.replicate.com/v1/predictions/rrr0e7d7kxrj40cm2a1t0r6g4c/cancel",
            },
            "metrics": {"predict_time": 1.21},
        }
    ).encode(),
    "OpenAI error": b'{"error":{"message":"Your request was rejected as a result of our safety system.",'
    b'"type":"invalid_request_error","param":null,"code":"content_policy_violation"}}',
}


def parsers() -> dict[str, Callable[[bytes], Any]]:
    return {
        "json.loads": json.loads,
        "payload.loads": payload.loads,
        "orjson.loads": orjson.loads,
        "msgspec.json.decode": msgspec.json.Decoder().decode,
    }


def best_of(found: dict[str, Callable[[bytes], Any]], body: bytes, seconds: float, rounds: int) -> dict[str, float]:
    """Seconds per parse for each parser, the best of its rounds (the least disturbed by the rest of the
    machine). The parsers take turns round by round, so a busy moment does not fall on one alone."""
    loops = {name: max(1, int(seconds / max(timed(parse, body, 1), 1e-7))) for name, parse in found.items()}
    best = dict.fromkeys(found, float("inf"))
    for _ in range(rounds):
        for name, parse in found.items():
            best[name] = min(best[name], timed(parse, body, loops[name]) / loops[name])
    return best


def timed(parse: Callable[[bytes], Any], body: bytes, loops: int) -> float:
    """This process's CPU seconds: what a gateway pays, and what other processes disturb least."""
    started = time.process_time()
    for _ in range(loops):
        parse(body)
    return time.process_time() - started


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    found = parsers()
    names = list(found)
    print(f"{'body':<25}{'size':>10}  " + "".join(f"{name:>22}" for name in names))
    for label, body in BODIES.items():
        expected = json.loads(body)
        for name, parse in found.items():
            assert parse(body) == expected, f"{name} parsed {label!r} differently"
        times = best_of(found, body, seconds, rounds)
        base = times["json.loads"]
        cells = "".join(f"{fmt(times[name]):>13} ({base / times[name]:4.2f}x)" for name in names)
        print(f"{label:<25}{len(body) / 1000:>8.0f}KB  {cells}")
    print("\n(x: json.loads's time / the parser's: above 1 is faster than json.loads)")


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    main()
