"""Memory per request in flight (issue 27 item 2): the floor, its FastAPI twin (`bench/floor.py`), Qubax and
LiteLLM proxy under the same slow load.

    .venv/bin/python -m bench.memory [--light 4000] [--heavy 200] [--duration 20] [--delay 5]
                                     [--targets floor,fastapi,qubax,litellm]

Two loads against the fake OpenAI upstream (`bench/upstream.py`) holding every generation `--delay` seconds:
`--light` requests in flight with the light payload (a 6 KB answer), and `--heavy` in flight with the heavy
one (a 1.57 MB PNG, a 2.09 MB `b64_json` answer), Qubax also in `url` mode (default storage: files in its
data folder). Each target is started fresh per load, warmed up by a few requests, and its process tree's
resident memory (helpers included) read at idle; then wrk holds the load for `--duration` seconds (the
set-up of `bench/realistic.py`) while a thread samples the tree's RSS every 50 ms. Per load and target:
memory per request in flight ((peak - idle) / in flight), the peak, CPU per 1,000 answered requests, p50 and
p99 above the upstream's delay, and each gateway's ratios to the floor. Results go to bench/results/memory.json.
"""

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench import deps, loadgen, procs, realistic, targets
from bench.__main__ import check, qubax_source

RESULTS = deps.BENCH_DIR / "results" / "memory.json"
WARMUP_CONNECTIONS = 8  # a few requests: imports, pools and helper processes started, little memory kept
Start = Callable[[str], AbstractContextManager[targets.Server]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--light", type=int, default=4000, help="in flight, light payload (default 4000; 0: none)")
    parser.add_argument("--heavy", type=int, default=200, help="in flight, heavy payload (default 200; 0: none)")
    parser.add_argument("--duration", type=int, default=20, help="seconds of load per run, whole (default 20)")
    parser.add_argument("--delay", type=float, default=5.0, help="seconds the upstream takes (default 5)")
    parser.add_argument("--targets", default="floor,fastapi,qubax,litellm", help="comma-separated (default: all)")
    args = parser.parse_args()
    args.targets = args.targets.split(",")
    return args


def loads(args: argparse.Namespace) -> Iterator[tuple[str, int, list[tuple[str, str]]]]:
    """(payload, in flight, [(target, response_format)]) in the order they run."""
    wanted = [name for name in ("floor", "fastapi", "qubax", "litellm") if name in args.targets]
    light = [(name, "b64_json") for name in wanted]
    if args.light:  # 0 leaves a load out
        yield "light", args.light, light
    if args.heavy:
        yield "heavy", args.heavy, light + ([("qubax", "url")] if "qubax" in wanted else [])


def measure(
    server: targets.Server, mode: str, in_flight: int, wrk: str, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    request = {**realistic.REQUEST, "response_format": mode}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"}
    url = f"{server.base}/v1/images/generations"
    problem = check(*procs.post(url, json.dumps(request).encode(), headers), mode)
    if problem:
        return {"error": f"check before loading failed: {problem}"}
    script = loadgen.lua_script(workdir / "warmup.lua", json.dumps(request), headers)
    loadgen.run(wrk, url, script, WARMUP_CONNECTIONS, args.delay + 1, "60s")
    time.sleep(1.0)  # the warm-up's last answers written out
    idle = procs.tree_rss_kib([server.proc.pid, *procs.descendants(server.proc.pid)])
    with procs.PeakTreeRss(server.proc.pid) as peak:
        row = realistic.measure(server, wrk, workdir, in_flight, args, request)
    above = peak.kib - idle
    return {
        **row,
        "idle_tree_rss_kib": idle,
        "peak_tree_rss_kib": peak.kib,
        "peak_above_idle_kib": above,
        "kib_per_request_in_flight": round(above / in_flight, 1),
        "p50_above_delay_s": round(row["p50_ms"] / 1000 - args.delay, 2) if row["p50_ms"] else None,
        "p99_above_delay_s": round(row["p99_ms"] / 1000 - args.delay, 2) if row["p99_ms"] else None,
    }


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each gateway's memory per request in flight, peak and peak above idle, over the floor's."""
    floor = rows.get("floor", {})
    keys = ("kib_per_request_in_flight", "peak_tree_rss_kib", "peak_above_idle_kib")
    return {
        name: {key: round(row[key] / floor[key], 2) for key in keys if floor.get(key) and row.get(key) is not None}
        for name, row in rows.items()
        if name != "floor" and "error" not in row and "error" not in floor
    }


def show(name: str, row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"    {name:<16} {row['error']}", flush=True)
        return
    sockets = ", ".join(f"{kind} {count}" for kind, count in row["socket_errors"].items()) or "none"
    print(
        f"    {name:<16} {row['kib_per_request_in_flight']:>7.1f} KiB/request  idle "
        f"{row['idle_tree_rss_kib'] / 1024:.0f} MiB  peak {row['peak_tree_rss_kib'] / 1024:.0f} MiB  "
        f"{row['rps']:.1f} req/s = {row['of_possible']:.2f} of possible  p50/p99 +{row['p50_above_delay_s']}/"
        f"+{row['p99_above_delay_s']} s  CPU {row['cpu_s_per_1000']} s/1000  non-2xx {row['non_2xx']}  "
        f"sockets: {sockets}",
        flush=True,
    )


def run_load(
    payload: str,
    in_flight: int,
    wanted: list[tuple[str, str]],
    starts: dict[str, Start],
    wrk: str,
    workdir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    print(f"  {payload} payload, {in_flight} in flight, upstream {args.delay:g} s", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    with targets.upstream(payload, workdir, delay=args.delay) as up:
        for name, mode in wanted:
            label = name if mode == "b64_json" else f"{name}-{mode}"
            try:
                if name not in starts:
                    raise RuntimeError(args.litellm_note)
                with starts[name](up.base) as server:
                    rows[label] = measure(server, mode, in_flight, wrk, workdir, args)
            except Exception as exc:  # one target failing (LiteLLM at thousands in flight) must not end the run
                rows[label] = {"error": f"{type(exc).__name__}: {exc}"}
            show(label, rows[label])
    found = ratios(rows)
    for name, ratio in found.items():
        print(f"    {name} / floor: " + ", ".join(f"{key} {value}" for key, value in ratio.items()), flush=True)
    return {"payload": payload, "in_flight": in_flight, "targets": rows, "ratios_to_floor": found}


def main() -> None:
    args = parse_args()
    deps.ensure_bench_packages()
    wrk = deps.ensure_wrk()
    litellm_exe, litellm_note, _ = deps.ensure_litellm() if "litellm" in args.targets else (None, "not asked", 0)
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    workdir = Path(tempfile.mkdtemp(prefix="qubax-memory-"))
    catalog = workdir / "catalog.toml"
    catalog.write_text(f"[providers.openai]\nconcurrency = {realistic.CAP}\n")
    starts: dict[str, Start] = {
        "floor": lambda base: targets.floor(base, workdir),
        "fastapi": lambda base: targets.floor(base, workdir, "fastapi"),
        "qubax": lambda base: targets.qubax(base, workdir, settings={"QUBAX_CATALOG": str(catalog)}),
    }
    if litellm_exe is not None:
        starts["litellm"] = lambda base: targets.litellm(litellm_exe, base, workdir)
    args.litellm_note = litellm_note
    print(litellm_note, flush=True)
    try:
        runs = [run_load(*load, starts, wrk, workdir, args) for load in loads(args) if load[1] > 0]
    finally:  # url mode leaves a gigabyte of images in Qubax's data folders
        shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "qubax_source": qubax_source(),
        "settings": {"delay_s": args.delay, "duration_s": args.duration, "litellm": litellm_note},
        "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
        "loads": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
