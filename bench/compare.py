"""Two versions of Qubax side by side: each served from a git worktree of its commit, in front of the same
fake upstream, loaded in turn (A, B, A, B, …) with the same wrk settings. For deciding between two ways
of doing one thing, where a full run's single floor-relative sample is too noisy.

    .venv/bin/python -m bench.compare HEAD~1 HEAD --payload light --mode url --pairs 4
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import deps, procs, targets
from bench.__main__ import measure


@contextmanager
def version(rev: str, upstream_base: str, workdir: Path) -> Iterator[targets.Server]:
    """`python -m qubax serve` from a worktree of `rev`, with its own data folder and live key."""
    tree = workdir / f"tree-{rev.replace('/', '_').replace('~', '-')}"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
    try:
        data = workdir / f"data-{tree.name}"
        env = targets.qubax_env(upstream_base, data, {"PYTHONPATH": str(tree / "src")})
        created = subprocess.run(
            [sys.executable, "-m", "qubax", "keys", "create"], env=env, capture_output=True, text=True, check=True
        )
        port = procs.free_port()
        cmd = [sys.executable, "-m", "qubax", "serve", "--port", str(port)]
        with targets.running(cmd, "/healthz", port, workdir / f"{tree.name}.log", env) as server:
            server.api_key = created.stdout.strip()
            yield server
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--payload", choices=["light", "heavy"], default="light")
    parser.add_argument("--mode", choices=["b64_json", "url"], default="b64_json")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    wrk = deps.ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="qubax-compare-"))
    with ExitStack() as running:
        upstream = running.enter_context(targets.upstream(args.payload, workdir))
        servers = {rev: running.enter_context(version(rev, upstream.base, workdir)) for rev in (args.a, args.b)}
        results: dict[str, list[dict[str, float]]] = {rev: [] for rev in servers}
        for pair in range(args.pairs):
            for rev, server in servers.items():
                print(f"pair {pair + 1}, {rev}:", end="", flush=True)
                result = measure(rev, server, args.mode, wrk, workdir, args.connections, args.duration, 2.0)
                results[rev].append(result)
    print(f"\n{args.payload} payload, {args.mode}, {args.pairs} alternating pairs of {args.duration:g} s:")
    for rev, runs in results.items():
        rps = [run["rps"] for run in runs]
        cpu = [run["server_cpu_ms_per_request"] for run in runs]
        p99 = [run["p99_ms"] for run in runs]
        print(
            f"  {rev:<12} req/s median {statistics.median(rps):8.1f} ({' / '.join(f'{r:.0f}' for r in rps)})"
            f"  CPU ms/req median {statistics.median(cpu):.3f}  p99 median {statistics.median(p99):.1f} ms"
        )
    a, b = (statistics.median(run["rps"] for run in results[rev]) for rev in (args.a, args.b))
    print(f"  {args.b} / {args.a} req/s: {b / a:.2f}")


if __name__ == "__main__":
    main()
