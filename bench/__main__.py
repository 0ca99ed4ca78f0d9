"""Gateway overhead benchmark: the fake upstream, the floor, Qubax (b64_json and url) and LiteLLM proxy,
each loaded by wrk with the same settings, per payload. Results print as tables and go to
bench/results/latest.json.

    .venv/bin/python -m bench [--connections 32] [--duration 10] [--rounds 3] [--payload light|heavy|both]
                              [--targets upstream,floor,fastapi,qubax,qubax-url,litellm]
"""

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench import deps, loadgen, procs, report, targets

TARGETS = ("upstream", "floor", "fastapi", "qubax", "qubax-url", "litellm")
REQUEST = {"model": "dall-e-3", "prompt": "a cat", "size": "1024x1024", "response_format": "b64_json"}
DESCRIPTIONS = {"light": "flat single-colour 1024x1024 PNG", "heavy": "grey-noise 1024x1024 PNG"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RSS_CONNECTIONS, RSS_SECONDS = 64, 5.0
RESULTS = deps.BENCH_DIR / "results" / "latest.json"
LOGS = RESULTS.parent / "logs"  # each gateway's own log from the latest run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per target (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of the floor and Qubax; each reports its median"
    )
    parser.add_argument("--payload", choices=["light", "heavy", "both"], default="both")
    parser.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        help="where Qubax stores url-mode images (default: its data folder, under the system temp dir)",
    )
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, default: all")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp folder (servers' logs, Qubax data dirs, wrk scripts)"
    )
    args = parser.parse_args(argv)
    args.targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    return args


def check(status: int, raw: bytes, mode: str) -> str | None:
    """Why one response is not a good answer, or None: 200 and data[0] holds a PNG (b64_json) or a URL."""
    try:
        item = json.loads(raw)["data"][0]
        if mode == "url":
            return None if status == 200 and str(item["url"]).startswith("http") else f"no url in {item}"
        png = base64.b64decode(item["b64_json"][:16])
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return f"status {status}: {raw[:300].decode(errors='replace')}"
    return None if status == 200 and png.startswith(PNG_MAGIC) else f"status {status}, not a PNG"


def measure(
    name: str,
    server: targets.Server,
    mode: str,
    wrk: str,
    workdir: Path,
    connections: int,
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    body = json.dumps({**REQUEST, "response_format": mode})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"}
    url = f"{server.base}/v1/images/generations"
    status, raw = procs.post(url, body.encode(), headers)
    problem = check(status, raw, mode)
    if problem:
        return {"error": f"check before loading failed: {problem}"}
    script = loadgen.lua_script(workdir / f"{name}.lua", body, headers)
    if warmup > 0:
        loadgen.run(wrk, url, script, connections, warmup)
    cpu_before = procs.cpu_seconds(server.proc.pid)
    result = loadgen.run(wrk, url, script, connections, seconds)
    cpu = procs.cpu_seconds(server.proc.pid) - cpu_before
    result["response_bytes"] = len(raw)
    result["server_cpu_ms_per_request"] = round(1000 * cpu / result["requests"], 3) if result["requests"] else None
    print(
        f"  {name:<10} {result['rps']:>10.1f} req/s  p99 {result['p99_ms']} ms  errors {result['errors']}", flush=True
    )
    return result


def run_payload(
    payload: str, args: argparse.Namespace, wrk: str, litellm_exe: Path | None, litellm_note: str, workdir: Path
) -> dict[str, Any]:
    """The upstream alone, then the floor and Qubax (both modes) in alternating rounds, then LiteLLM.

    The floor and Qubax run side by side and take turns, round after round, and each reports its median
    round: this VM's speed drifts by 10-30% from one minute to the next, and one 10 s sample each let a
    slow minute land on either side of the ratio."""
    print(f"{payload} payload", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    peak_rss: dict[str, int] = {}
    logs: dict[str, dict[str, Any]] = {}

    def load(name: str, server: targets.Server, mode: str = "b64_json") -> dict[str, Any]:
        return measure(name, server, mode, wrk, workdir, args.connections, args.duration, args.warmup)

    def gateways(starts: dict[str, Callable[[], AbstractContextManager[targets.Server]]], rounds: int) -> None:
        """Start the wanted gateways together and load their targets in turn, `rounds` times over."""
        wanted = [
            (name, mode, label) for name, mode, label in GATEWAY_TARGETS if label in starts and name in args.targets
        ]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in wanted}
        servers: dict[str, targets.Server] = {}
        try:
            with contextlib.ExitStack() as running:
                for label in dict.fromkeys(label for _, _, label in wanted):
                    servers[label] = running.enter_context(starts[label]())
                for _ in range(rounds):
                    for name, mode, label in wanted:
                        runs[name].append(load(name, servers[label], mode))
                for label, server in servers.items():
                    peak_rss[label] = procs.memory_kib(server.proc.pid)["VmHWM"]
        except Exception as exc:  # one target failing must not end the run
            for name, _, _ in wanted:
                runs[name].append({"error": f"{type(exc).__name__}: {exc}"})
        for name, results in runs.items():
            rows[name] = median_run(results)
        for label, server in servers.items():
            logs[label] = save_log(server.log, f"{payload}-{label}")

    try:
        with targets.upstream(payload, workdir) as up:
            if "upstream" in args.targets:
                rows["upstream"] = load("upstream", up)
            gateways(
                {
                    "floor": lambda: targets.floor(up.base, workdir),
                    "fastapi": lambda: targets.floor(up.base, workdir, "fastapi"),
                    "qubax": lambda: targets.qubax(up.base, workdir, args.images_dir),
                },
                args.rounds,
            )
            if litellm_exe is None:
                if "litellm" in args.targets:
                    rows["litellm"] = {"error": litellm_note}
            else:  # one round: it is far behind, and ~10x slower to measure
                gateways({"litellm": lambda: targets.litellm(litellm_exe, up.base, workdir)}, 1)
    except Exception as exc:
        return {"description": DESCRIPTIONS[payload], "error": f"{type(exc).__name__}: {exc}", "targets": rows}
    ordered = {name: rows[name] for name in TARGETS if name in rows}
    return {
        "description": DESCRIPTIONS[payload],
        "targets": ordered,
        "ratios": report.ratios(payload, ordered),
        "peak_rss_kib": peak_rss,
        "server_logs": logs,
    }


# (target, response_format, the gateway serving it), in the order each round loads them
GATEWAY_TARGETS = (
    ("floor", "b64_json", "floor"),
    ("fastapi", "b64_json", "fastapi"),
    ("qubax", "b64_json", "qubax"),
    ("qubax-url", "url", "qubax"),
    ("litellm", "b64_json", "litellm"),
)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (the lower middle of an even count), with every round's req/s;
    a round that failed is the result."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda run: run["rps"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_rps": [round(run["rps"], 1) for run in runs]}


def save_log(log: Path, name: str) -> dict[str, Any]:
    """Keep a stopped server's log under bench/results/logs/ and summarise it."""
    saved = LOGS / f"{name}.log"
    saved.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log, saved)
    return {**procs.log_summary(saved), "path": str(saved.relative_to(deps.BENCH_DIR.parent))}


def qubax_peak_rss(wrk: str, workdir: Path) -> dict[str, Any]:
    """A fresh Qubax under the heavy payload at 64 connections: its resident memory at idle and at peak."""
    print(f"Qubax memory: heavy payload, {RSS_CONNECTIONS} connections", flush=True)
    result: dict[str, Any] = {"connections": RSS_CONNECTIONS, "duration_s": RSS_SECONDS}
    server_log = None
    try:
        with targets.upstream("heavy", workdir) as up, targets.qubax(up.base, workdir) as server:
            server_log = server.log
            result["idle_rss_kib"] = procs.memory_kib(server.proc.pid)["VmRSS"]
            for mode in ("b64_json", "url"):
                run = measure(f"rss-{mode}", server, mode, wrk, workdir, RSS_CONNECTIONS, RSS_SECONDS, 0)
                result[mode] = {**run, "vm_hwm_kib": procs.memory_kib(server.proc.pid)["VmHWM"]}
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    if server_log is not None:
        result["server_log"] = save_log(server_log, "memory-qubax")
    return result


def file_create_us(folder: Path, files: int = 500) -> float:
    """Wall microseconds to create and write one light image's worth of file in `folder`: what url mode
    pays per image on top of b64_json, however Qubax is written."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    data = os.urandom(4500)
    started = time.perf_counter()
    for index in range(files):
        (probe / f"img_{index}.png").write_bytes(data)
    elapsed = time.perf_counter() - started
    shutil.rmtree(probe, ignore_errors=True)
    return round(elapsed / files * 1e6, 1)


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def stop_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop every server


def qubax_source() -> dict[str, Any]:
    """Which Qubax was measured: the commit, and the files under src/ that differ from it (read-only git)."""

    def git(*argv: str) -> str:
        root = deps.BENCH_DIR.parent
        done = subprocess.run(["git", "--no-optional-locks", *argv], capture_output=True, text=True, cwd=root)
        return done.stdout

    changed = git("status", "--porcelain", "--", "src").splitlines()  # "XY path"
    untracked = [deps.BENCH_DIR.parent / line[3:] for line in changed if line.startswith("??")]
    diff = git("diff", "HEAD", "--", "src") + "".join(p.read_text(errors="replace") for p in untracked if p.is_file())
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip() or None,
        "src_changes": [line[3:] for line in changed],
        "src_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    started = time.monotonic()
    deps.ensure_bench_packages()
    wrk = deps.ensure_wrk()
    litellm_exe, litellm_note, install_s = None, "not requested", 0.0
    if "litellm" in args.targets:
        litellm_exe, litellm_note, install_s = deps.ensure_litellm()
    payloads = ["light", "heavy"] if args.payload == "both" else [args.payload]
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "disk": {"images_dir": str(args.images_dir or tempfile.gettempdir()), "file_create_us": None},
        "qubax_source": qubax_source(),
        "settings": {
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "wrk_timeout": loadgen.WRK_TIMEOUT,
            "targets": args.targets,
        },
        "litellm": {"available": litellm_exe is not None, "note": litellm_note, "install_s": round(install_s, 1)},
        "payloads": {},
    }
    shutil.rmtree(LOGS, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix="qubax-bench-"))  # servers' logs, Qubax data dirs, wrk scripts
    results["disk"]["file_create_us"] = file_create_us(args.images_dir or workdir)
    try:
        for payload in payloads:
            results["payloads"][payload] = run_payload(payload, args, wrk, litellm_exe, litellm_note, workdir)
        if "heavy" in payloads and "qubax" in args.targets:
            results["qubax_peak_rss"] = qubax_peak_rss(wrk, workdir)
    finally:
        if args.keep:
            print(f"kept logs and data in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + report.render(results) + f"\n\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
