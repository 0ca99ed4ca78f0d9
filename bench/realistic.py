"""Realistic load (issue 24, finding 13): many requests in flight against an upstream that takes its time.

    .venv/bin/python -m bench.realistic [--in-flight 1000,4000] [--duration 33] [--delay 5]

The fake OpenAI upstream (`bench/upstream.py`, light payload) holds every generation `--delay` seconds.
Qubax routes `dall-e-3` to it with the OpenAI cap raised in a catalog file so that it allows every request
in flight; nothing else is set. wrk keeps `--in-flight` connections busy, one request each at a time, for
`--duration` seconds. Each load runs against the fake alone (the control: what wrk and the fake reach on
this machine), then Qubax with its defaults, then Qubax with the old defaults set explicitly
(QUBAX_UPSTREAM_CONNECTIONS=256, QUBAX_MAX_CONNECTIONS=1024) as the baseline, in the same run.

Per run: throughput against the possible (in-flight / delay; and against what a run of this length can
complete from a cold start, where nothing ends before the first `delay`), p50 and p99, Qubax's CPU per
1,000 answered requests, wrk's socket errors (a connection Qubax closes at once shows as a read error,
one refused by the kernel as a connect error), non-2xx answers, the waits Qubax logged, and its peak RSS.
Everything is on loopback and bounded: a few runs of `--duration` seconds each. Results also go to
bench/results/realistic.json.
"""

import argparse
import json
import math
import os
import resource
import tempfile
from pathlib import Path
from typing import Any

from bench import deps, loadgen, procs, targets

BASELINE = {"QUBAX_UPSTREAM_CONNECTIONS": "256", "QUBAX_MAX_CONNECTIONS": "1024"}
REQUEST = {"model": "dall-e-3", "prompt": "a cat", "size": "1024x1024", "response_format": "b64_json"}
CAP = 10_000  # the OpenAI route's cap in the catalog (the most it takes): above every load here
RESULTS = deps.BENCH_DIR / "results" / "realistic.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.realistic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", default="1000,4000", help="comma-separated loads (default 1000,4000)")
    parser.add_argument("--duration", type=int, default=33, help="seconds per run, whole (default 33)")
    parser.add_argument("--delay", type=float, default=5.0, help="seconds the upstream takes (default 5)")
    args = parser.parse_args()
    args.in_flight = [int(count) for count in args.in_flight.split(",")]
    return args


def measure(
    server: targets.Server,
    wrk: str,
    workdir: Path,
    in_flight: int,
    args: argparse.Namespace,
    request: dict[str, str] = REQUEST,
) -> dict[str, Any]:
    """One wrk run of `args.duration` seconds at `in_flight` connections (`args.delay`: the upstream's)."""
    body = json.dumps(request)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"}
    script = loadgen.lua_script(workdir / "realistic.lua", body, headers)
    load_before = os.getloadavg()[0]
    cpu_before = procs.cpu_seconds(server.proc.pid)
    # wrk's own timeout well past the slowest answer seen (25 s at the old defaults), so none is cut short.
    result = loadgen.run(wrk, f"{server.base}/v1/images/generations", script, in_flight, args.duration, "60s")
    cpu = procs.cpu_seconds(server.proc.pid) - cpu_before
    answered = result["requests"] - result["non_2xx"]
    possible = in_flight / args.delay
    cold = in_flight * math.floor(args.duration / args.delay) / args.duration  # nothing ends before `delay`
    log = server.log.read_text(errors="replace")
    return {
        **result,
        "possible_rps": possible,
        "of_possible": round(result["rps"] / possible, 3),
        "of_cold_start_possible": round(result["rps"] / cold, 3),
        "cpu_s_per_1000": round(1000 * cpu / answered, 2) if answered else None,
        "connection_waits_logged": log.count("for a connection ("),
        "slot_waits_logged": log.count("for a slot ("),
        "tracebacks": log.count("Traceback (most recent call last)"),
        "peak_rss_mib": round(procs.memory_kib(server.proc.pid)["VmHWM"] / 1024),
        # Others' work on this machine takes CPU from all of it: the 1-minute load average around the run.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def show(name: str, in_flight: int, row: dict[str, Any]) -> None:
    sockets = ", ".join(f"{kind} {count}" for kind, count in row["socket_errors"].items())
    print(
        f"  {in_flight:>5} in flight, {name:<12} {row['rps']:>7.1f} req/s = {row['of_possible']:.2f} of "
        f"{row['possible_rps']:.0f} ({row['of_cold_start_possible']:.2f} of a cold start's best)  "
        f"p50 {row['p50_ms'] / 1000:.1f} s  p99 {row['p99_ms'] / 1000:.1f} s  "
        f"CPU {row['cpu_s_per_1000']} s/1000  non-2xx {row['non_2xx']}  sockets: {sockets or 'none'}  "
        f"waits logged: {row['connection_waits_logged']} connection, {row['slot_waits_logged']} slot  "
        f"RSS {row['peak_rss_mib']} MiB  load {row['load_average'][0]}-{row['load_average'][1]}",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    deps.ensure_bench_packages()
    wrk = deps.ensure_wrk()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # wrk and the fake inherit it; Qubax raises its own
    workdir = Path(tempfile.mkdtemp(prefix="qubax-realistic-"))
    catalog = workdir / "catalog.toml"
    catalog.write_text(f"[providers.openai]\nconcurrency = {CAP}\n")
    runs: list[dict[str, Any]] = []
    print(f"file-descriptor limit {soft} -> {hard}; data in {workdir}", flush=True)
    with targets.upstream("light", workdir, delay=args.delay) as upstream:
        for in_flight in args.in_flight:
            row = measure(upstream, wrk, workdir, in_flight, args)  # the control: what wrk and the fake reach alone
            show("upstream", in_flight, row)
            runs.append({"in_flight": in_flight, "qubax": None, **row})
            for name, settings in (("defaults", {}), ("old defaults", BASELINE)):
                variables = {"QUBAX_CATALOG": str(catalog), **settings}
                with targets.qubax(upstream.base, workdir, settings=variables) as server:
                    row = measure(server, wrk, workdir, in_flight, args)
                show(name, in_flight, row)
                runs.append({"in_flight": in_flight, "qubax": name, "settings": settings, **row})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"delay_s": args.delay, "duration_s": args.duration, "runs": runs}, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
