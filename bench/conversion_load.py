"""Plain requests' latency while the same node converts images (issue 27 item 1).

Two fake upstreams (`bench/upstream.py`): the OpenAI-shaped one answers `dall-e-3` with the light PNG
of the size asked (the plain requests: their image passes through untouched); the other serves
Together's route of `flux-1-schnell` with the heavy 1024x1024 noise PNG whatever size is asked, so
each of those requests, asked at 1024x768, is decoded, cropped, scaled and encoded anew (a conversion).
wrk drives the plain requests at `--plain` connections for `--duration` seconds, first alone, then
while a second wrk keeps `--converting` connections busy with conversions; both runs against one
`qubax serve` as shipped. Printed: the plain requests' rate, p50 and p99 alone and under conversion
load (and their ratio: issue 27 asks p99 <= 1.5x), the conversions a second, and Qubax's CPU.

    .venv/bin/python -m bench.conversion_load [--plain 4] [--converting 4] [--duration 15] [--rounds 2]
"""

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import deps, loadgen, procs, targets

PLAIN = {"model": "dall-e-3", "prompt": "a cat", "size": "1024x1024", "response_format": "b64_json"}
CONVERTED = {"model": "flux-1-schnell", "prompt": "a cat", "size": "1024x768", "response_format": "b64_json"}


def load(
    wrk: str, server: targets.Server, workdir: Path, body: dict[str, Any], connections: int, seconds: float
) -> Any:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"}
    script = loadgen.lua_script(workdir / f"{body['model']}.lua", json.dumps(body), headers)
    return loadgen.run(wrk, f"{server.base}/v1/images/generations", script, connections, seconds)


def measure(wrk: str, server: targets.Server, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    pid = server.proc.pid
    cpu = procs.cpu_seconds(pid)
    alone = load(wrk, server, workdir, PLAIN, args.plain, args.duration)
    cpu_alone = procs.cpu_seconds(pid) - cpu
    with ThreadPoolExecutor(2) as both:
        converting = both.submit(load, wrk, server, workdir, CONVERTED, args.converting, args.duration + 2)
        loaded = both.submit(load, wrk, server, workdir, PLAIN, args.plain, args.duration).result()
        conversions = converting.result()
    return {"alone": alone, "loaded": loaded, "conversions": conversions, "cpu_alone_s": cpu_alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", type=int, default=4, help="connections making plain requests")
    parser.add_argument("--converting", type=int, default=4, help="connections making conversions")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    deps.ensure_bench_packages()
    wrk = deps.ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="qubax-conversion-load-"))
    with targets.upstream("light", workdir) as light, targets.upstream("heavy", workdir) as heavy:
        together = {"TOGETHER_API_KEY": targets.UPSTREAM_KEY, "QUBAX_TOGETHER_BASE_URL": f"{heavy.base}/v1"}
        with targets.qubax(light.base, workdir, settings=together) as server:
            for body in (PLAIN, CONVERTED):  # each path warm (helper processes, pools) before measuring
                load(wrk, server, workdir, body, 2, 2)
            for round_ in range(1, args.rounds + 1):
                result = measure(wrk, server, workdir, args)
                alone, loaded, made = result["alone"], result["loaded"], result["conversions"]
                print(
                    f"round {round_}: plain alone {alone['rps']:.0f} req/s, p50 {alone['p50_ms']:.1f} ms, p99 "
                    f"{alone['p99_ms']:.1f} ms; under {made['rps']:.1f} conversions/s: {loaded['rps']:.0f} req/s, "
                    f"p50 {loaded['p50_ms']:.1f} ms, p99 {loaded['p99_ms']:.1f} ms "
                    f"(p99 {loaded['p99_ms'] / alone['p99_ms']:.2f}x); errors {alone['errors']}/{loaded['errors']}"
                    f"/{made['errors']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
