"""10,000 async jobs on one node (issue 27, item 4): throughput against what the provider's cap allows.

    .venv/bin/python -m bench.jobs [--jobs 10000] [--delay 5] [--cap 1000] [--database sqlite|postgresql]
                                   [--webhooks on|off] [--settings QUBAX_JOB_CONCURRENCY=8,...]

A fake BFL (`bench/bfl_upstream.py`) makes every image in `--delay` seconds. `qubax serve` runs with its
defaults, a fresh data folder, and BFL's concurrency cap raised to `--cap` in a catalog file: at most
`--cap` tasks are in flight upstream, so the best a node can do is cap / delay jobs a second (and, from a
cold start, `--jobs` in ceil(jobs / cap) rounds of `--delay`). The jobs (`flux-1.1-pro`, PNG at its default
size, stored: what BFL answers passes through) are submitted with `Prefer: respond-async` as fast as the
API admits them (aiohttp, `--clients` at once). Their ends are counted in the database itself, not through
the API, so the waiting costs the node nothing; the times come from the jobs' rows (created_at, completed_at).
A few jobs are then read through the API, to check that what they answer holds an image.

Reported: completion time and throughput against the ideal, job latency p50/p99, CPU seconds of the Qubax
process tree per 1,000 jobs (submission included), its peak RSS, failures, what the fake was sent, and the
database's growth (SQLite's files with the WAL, or PostgreSQL's pg_database_size) with each table's rows.
`--database postgresql` starts a throwaway cluster (initdb in a temporary folder, fsync on). Results go to
bench/results/jobs-<database>-webhooks-<on|off>.json.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import deps, procs, targets
from qubax.records import tables

JOB = {"model": "flux-1.1-pro", "prompt": "a fox in the snow", "response_format": "url"}
ENDED = ("succeeded", "failed", "cancelled")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--delay", type=float, default=5.0, help="seconds the upstream takes an image (default 5)")
    parser.add_argument("--cap", type=int, default=1000, help="BFL's concurrency cap in the catalog (default 1000)")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--webhooks", choices=("on", "off"), default="off", help="upstream callbacks to Qubax")
    parser.add_argument("--clients", type=int, default=32, help="submissions at once (default 32)")
    parser.add_argument("--settings", default="", help="more variables for Qubax: NAME=value,NAME=value")
    args = parser.parse_args()
    args.settings = dict(item.split("=", 1) for item in args.settings.split(",") if item)
    return args


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (as tests/postgres.py starts one, but with fsync on) and its URL."""
    found = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if (path / "initdb").exists()]
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql")
    bin_dir = max(found, key=lambda path: int(path.parent.name))
    root = Path(tempfile.mkdtemp(prefix="qubax-jobs-pg-"))  # its own: the postgres user cannot enter `workdir`
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # it refuses to run as root
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", procs.free_port()
    subprocess.run(
        [*as_user, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres"], check=True, capture_output=True
    )
    ctl = [*as_user, bin_dir / "pg_ctl", "-D", data]
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run([*ctl, "-o", options, "-l", root / "log", "-w", "start"], check=True, capture_output=True)
    try:
        base = f"postgresql://postgres@127.0.0.1:{port}"
        subprocess.run(
            [bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "qubax"], check=True
        )
        yield f"{base}/qubax"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def sqlite_size(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in data_dir.glob("qubax.db*"))  # the -wal and -shm with it


async def database_size(engine: AsyncEngine, data_dir: Path) -> int:
    if engine.dialect.name == "sqlite":
        return sqlite_size(data_dir)
    async with engine.connect() as connection:
        return int(await connection.scalar(text("SELECT pg_database_size(current_database())")))


async def row_counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        return {
            name: int(await connection.scalar(select(func.count()).select_from(table)))
            for name, table in tables.Base.metadata.tables.items()
        }


async def submit_all(server: targets.Server, count: int, clients: int) -> tuple[list[str], Counter[int], float]:
    """Every job, `clients` at once: their ids, the statuses answered, and the seconds it took."""
    headers = {"Authorization": f"Bearer {server.api_key}", "Prefer": "respond-async"}
    ids: list[str] = []
    statuses: Counter[int] = Counter()
    todo = iter(range(count))
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(server.base, connector=connector, headers=headers) as http:

        async def client() -> None:
            for _ in todo:
                async with http.post("/v1/images/generations", json=JOB) as response:
                    statuses[response.status] += 1
                    if response.status == 202:
                        ids.append((await response.json())["id"])
                    elif statuses[response.status] <= 3:
                        print(f"  submission answered {response.status}: {(await response.text())[:300]}")

        await asyncio.gather(*(client() for _ in range(clients)))
    return ids, statuses, time.monotonic() - started


async def wait_ended(engine: AsyncEngine, count: int, most_seconds: float) -> None:
    """Until `count` jobs ended, saying how many every few seconds."""
    deadline, shown = time.monotonic() + most_seconds, 0.0
    query = select(tables.ImageJob.status, func.count()).group_by(tables.ImageJob.status)
    while True:
        async with engine.connect() as connection:
            by_status = dict((await connection.execute(query)).all())
        ended = sum(by_status.get(status, 0) for status in ENDED)
        if ended >= count or time.monotonic() > deadline:
            return
        if time.monotonic() - shown >= 5:
            print(f"  {by_status}", flush=True)
            shown = time.monotonic()
        await asyncio.sleep(0.5)


async def timings(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as connection:
        rows = (await connection.execute(select(tables.ImageJob.created_at, tables.ImageJob.completed_at))).all()
    created = [tables.utc(row.created_at).timestamp() for row in rows]
    completed = [tables.utc(row.completed_at).timestamp() for row in rows if row.completed_at is not None]
    latencies = sorted(tables.utc(row.completed_at).timestamp() - tables.utc(row.created_at).timestamp()
                       for row in rows if row.completed_at is not None)  # fmt: skip
    return {
        "span_s": max(completed) - min(created) if completed else None,
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p99_s": round(latencies[int(len(latencies) * 0.99) - 1], 2) if latencies else None,
        "latency_max_s": round(latencies[-1], 2) if latencies else None,
    }


async def check_some(server: targets.Server, ids: list[str]) -> Counter[str]:
    """A few jobs as their key reads them: each should have succeeded with one image link."""
    seen: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with aiohttp.ClientSession(server.base, headers=headers) as http:
        for job_id in ids[:: max(1, len(ids) // 20)]:
            async with http.get(f"/v1/images/jobs/{job_id}") as response:
                job = await response.json()
            data = (job.get("result") or {}).get("data") or []
            seen[
                f"{job.get('status')}, {len(data)} image(s){'' if all(d.get('url') for d in data) else ' without url'}"
            ] += 1
    return seen


async def measure(
    server: targets.Server, upstream: targets.Server, url: str, args: argparse.Namespace
) -> dict[str, Any]:
    engine = create_async_engine(url)
    data_dir = server.log.parent
    try:
        size_before, rows_before = await database_size(engine, data_dir), await row_counts(engine)
        cpu_before = procs.cpu_seconds(server.proc.pid)
        load_before = os.getloadavg()[0]
        ids, statuses, submit_s = await submit_all(server, args.jobs, args.clients)
        print(f"  submitted {len(ids)} in {submit_s:.1f} s ({len(ids) / submit_s:.0f}/s): {dict(statuses)}", flush=True)
        rounds = math.ceil(args.jobs / args.cap)
        await wait_ended(engine, len(ids), most_seconds=3 * rounds * args.delay + 300)
        cpu = procs.cpu_seconds(server.proc.pid) - cpu_before
        load_after = os.getloadavg()[0]
        peak_rss = procs.memory_kib(server.proc.pid)["VmHWM"]
        size_after, rows_after = await database_size(engine, data_dir), await row_counts(engine)
        async with engine.connect() as connection:
            query = select(tables.ImageJob.status, func.count()).group_by(tables.ImageJob.status)
            outcomes = dict((await connection.execute(query)).all())
        timed = await timings(engine)
    finally:
        await engine.dispose()
    checked = await check_some(server, ids)
    async with aiohttp.ClientSession() as http, http.get(f"{upstream.base}/stats") as response:
        upstream_counts = await response.json()
    log = server.log.read_text(errors="replace")
    ideal = args.cap / args.delay
    cold_ideal = args.jobs / (rounds * args.delay)
    throughput = len(ids) / timed["span_s"] if timed["span_s"] else 0.0
    return {
        "submitted": len(ids),
        "submission_statuses": dict(statuses),
        "submission_s": round(submit_s, 1),
        "outcomes": outcomes,
        **{name: round(value, 1) if isinstance(value, float) else value for name, value in timed.items()},
        "throughput_jobs_s": round(throughput, 1),
        "ideal_jobs_s": ideal,
        "cold_start_ideal_jobs_s": round(cold_ideal, 1),
        "of_ideal": round(throughput / ideal, 3),
        "of_cold_start_ideal": round(throughput / cold_ideal, 3),
        "cpu_s": round(cpu, 1),
        "cpu_s_per_1000_jobs": round(1000 * cpu / len(ids), 2) if ids else None,
        "peak_rss_mib": round(peak_rss / 1024),
        "database_bytes": [size_before, size_after],
        "database_growth_bytes_per_job": round((size_after - size_before) / max(1, len(ids))),
        "rows_grown": {
            name: rows_after[name] - rows_before[name] for name in rows_after if rows_after[name] != rows_before[name]
        },
        "rows_after": rows_after,
        "checked_through_api": dict(checked),
        "upstream_requests": upstream_counts,
        "tracebacks": log.count("Traceback (most recent call last)"),
        # The first few, whole: the data folder goes with the run.
        "traceback_texts": ["Traceback" + part[:3000] for part in log.split("Traceback")[1:4]],
        "warnings": log.count(" WARNING "),
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }


@contextlib.contextmanager
def bfl(workdir: Path, delay: float) -> Iterator[targets.Server]:
    port = procs.free_port()
    cmd = [sys.executable, "-m", "bench.bfl_upstream", "--port", str(port), "--delay", str(delay)]
    with targets.running(cmd, "/health", port, workdir / "bfl.log", targets.clean_env({})) as server:
        yield server


def show(args: argparse.Namespace, row: dict[str, Any]) -> None:
    print(
        f"{args.jobs} jobs, {args.database}, webhooks {args.webhooks}, cap {args.cap}, delay {args.delay:g} s: "
        f"done in {row['span_s']} s = {row['throughput_jobs_s']} jobs/s = {row['of_ideal']:.2f} of the ideal "
        f"{row['ideal_jobs_s']:g}/s ({row['of_cold_start_ideal']:.2f} of a cold start's "
        f"{row['cold_start_ideal_jobs_s']}/s); "
        f"latency p50 {row['latency_p50_s']} s p99 {row['latency_p99_s']} s; outcomes {row['outcomes']}; "
        f"CPU {row['cpu_s_per_1000_jobs']} s/1000 jobs; peak RSS {row['peak_rss_mib']} MiB; database "
        f"{row['database_bytes'][0] / 1e6:.1f} -> {row['database_bytes'][1] / 1e6:.1f} MB "
        f"({row['database_growth_bytes_per_job']} B/job), rows grown {row['rows_grown']}; "
        f"upstream {row['upstream_requests']}; "
        f"checked {row['checked_through_api']}; tracebacks {row['tracebacks']}; load {row['load_average']}",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    deps.ensure_bench_packages()
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard := resource.getrlimit(resource.RLIMIT_NOFILE)[1], hard))
    workdir = Path(tempfile.mkdtemp(prefix="qubax-jobs-"))
    catalog = workdir / "catalog.toml"
    catalog.write_text(f"[providers.bfl]\nconcurrency = {args.cap}\n")
    print(f"data in {workdir}; Qubax settings beyond its defaults: {args.settings or 'none'}", flush=True)
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(bfl(workdir, args.delay))
        settings = {
            "QUBAX_CATALOG": str(catalog),
            "BFL_API_KEY": targets.UPSTREAM_KEY,
            "QUBAX_BFL_BASE_URL": upstream.base,
        }
        if args.database == "postgresql":
            settings["QUBAX_DATABASE_URL"] = stack.enter_context(postgres())
        port = procs.free_port()
        if args.webhooks == "on":  # BFL is then given a callback URL under it, and polled only as a fallback
            settings["QUBAX_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
            settings["QUBAX_UPSTREAM_CALLBACKS"] = "true"  # on loopback, where they are otherwise left off
        server = stack.enter_context(
            targets.qubax(upstream.base, workdir, settings={**settings, **args.settings}, port=port)
        )
        url = settings.get("QUBAX_DATABASE_URL", "").replace("postgresql://", "postgresql+asyncpg://")
        url = url or f"sqlite+aiosqlite:///{server.log.parent / 'qubax.db'}"
        row = asyncio.run(measure(server, upstream, url, args))
    show(args, row)
    result = deps.BENCH_DIR / "results" / f"jobs-{args.database}-webhooks-{args.webhooks}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"args": {**vars(args)}, **row}, indent=2))
    print(f"written to {result}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
