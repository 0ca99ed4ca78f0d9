"""The tables and ratios printed at the end, from the results dict that is also written as JSON."""

from typing import Any

Goal = tuple[str, float]
# label, numerator target, denominator target, metric, and the goal for each payload that has one:
# issue 25's for Qubax against the floor, issue 4's for url against b64_json.
RATIOS: list[tuple[str, str, str, str, dict[str, Goal]]] = [
    ("Qubax/floor req/s", "qubax", "floor", "rps", {"light": (">=", 0.45), "heavy": (">=", 0.8)}),
    ("Qubax/floor p99", "qubax", "floor", "p99_ms", {"light": ("<=", 1.5), "heavy": ("<=", 1.5)}),
    ("FastAPI/floor req/s", "fastapi", "floor", "rps", {}),
    ("Qubax/FastAPI req/s", "qubax", "fastapi", "rps", {}),
    ("Qubax url/b64 req/s", "qubax-url", "qubax", "rps", {"light": (">=", 0.7), "heavy": (">=", 0.7)}),
    ("Qubax/LiteLLM req/s", "qubax", "litellm", "rps", {}),
    ("Qubax/LiteLLM p99", "qubax", "litellm", "p99_ms", {}),
    ("LiteLLM/floor req/s", "litellm", "floor", "rps", {}),
    ("floor/upstream req/s", "floor", "upstream", "rps", {}),
]


def ratios(payload: str, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label, top, bottom, metric, goals in RATIOS:
        a, b = rows.get(top, {}).get(metric), rows.get(bottom, {}).get(metric)
        if a is None or b is None or b == 0:
            continue
        value = a / b
        entry: dict[str, Any] = {"value": round(value, 3)}
        if payload in goals:
            op, limit = goals[payload]
            entry["goal"] = f"{op} {limit}"
            entry["met"] = value >= limit if op == ">=" else value <= limit
        out[label] = entry
    return out


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    head = (
        f"  {'target':<11}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'MB/s':>9}{'errors':>8}{'resp KB':>9}"
        f"{'CPU ms/req':>12}"
    )
    lines = [head, "  " + "-" * (len(head) - 2)]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"  {name:<11}unavailable: {row['error']}")
            continue
        kb = row.get("response_bytes", 0) / 1000
        lines.append(
            f"  {name:<11}{fmt(row['rps']):>10}{fmt(row['p50_ms'], 2):>10}{fmt(row['p99_ms'], 2):>10}"
            f"{fmt(row['mb_per_s']):>9}{row['errors']:>8}{fmt(kb):>9}{fmt(row['server_cpu_ms_per_request'], 3):>12}"
        )
        if row["errors"]:
            lines.append(f"  {'':<11}errors: non-2xx {row['non_2xx']}, sockets {row['socket_errors']}")
    return lines


def render(results: dict[str, Any]) -> str:
    s, src = results["settings"], results["qubax_source"]
    lines = [
        f"machine: {results['machine']['cpus']} CPUs ({results['machine']['cpu_model']}), "
        f"Python {results['machine']['python']}, load average at start "
        f"{results['machine']['load_avg_at_start'][0]:.2f} (other work on the machine makes numbers noisier)",
        f"wrk -t1 -c{s['connections']} -d{s['duration_s']:g}s --latency --timeout {s['wrk_timeout']}, "
        f"after a {s['warmup_s']:g}s warm-up run per target; the floor and Qubax alternate over "
        f"{s.get('rounds', 1)} rounds",
        f"LiteLLM: {results['litellm']['note']}",
        f"url-mode images in {results['disk']['images_dir']}: creating a 4.5 KB file there takes "
        f"{results['disk']['file_create_us']} us",
        f"Qubax: commit {src['commit']}, uncommitted changes under src/: {', '.join(src['src_changes']) or 'none'}"
        + (f" (diff sha256 {src['src_diff_sha256']})" if src["src_diff_sha256"] else ""),
    ]
    for payload, result in results["payloads"].items():
        lines += ["", f"== {payload} payload ({result['description']}) =="]
        if "error" in result:
            lines.append(f"  failed: {result['error']}")
            continue
        lines += table(result["targets"])
        rounds = [
            f"{name} {' / '.join(map(fmt, row['rounds_rps']))}"
            for name, row in result["targets"].items()
            if len(row.get("rounds_rps", ())) > 1
        ]
        if rounds:
            lines.append("  req/s in each round (the table shows each target's median round): " + "; ".join(rounds))
        lines.append("  ratios:")
        for label, entry in result["ratios"].items():
            goal = f"   goal {entry['goal']}: {'met' if entry['met'] else 'MISSED'}" if "goal" in entry else ""
            lines.append(f"    {label:<22}{entry['value']:>8.2f}{goal}")
        memory = ", ".join(f"{name} {kib / 1024:.0f}" for name, kib in result.get("peak_rss_kib", {}).items())
        if memory:
            lines.append(f"  peak RSS after the runs, MiB: {memory}")
        lines += [
            f"  {name} log: {log_line(summary)}"
            for name, summary in result.get("server_logs", {}).items()
            if summary["statuses"] or summary["tracebacks"]
        ]
    rss = results.get("qubax_peak_rss")
    if rss:
        lines += ["", f"== Qubax memory, heavy payload, {rss['connections']} connections, {rss['duration_s']:g}s =="]
        if "error" in rss:
            lines.append(f"  failed: {rss['error']}")
        else:
            lines.append(f"  idle after start: VmRSS {rss['idle_rss_kib'] / 1024:.0f} MiB")
            for mode in ("b64_json", "url"):
                run = rss[mode]
                lines.append(
                    f"  after {mode:<8} run: VmHWM {run['vm_hwm_kib'] / 1024:.0f} MiB "
                    f"({fmt(run.get('rps'))} req/s, p99 {fmt(run.get('p99_ms'), 2)} ms, "
                    f"{run.get('errors', run.get('error', '-'))} errors)"
                )
        if "server_log" in rss:
            lines.append(f"  Qubax log: {log_line(rss['server_log'])}")
    return "\n".join(lines)


def log_line(summary: dict[str, Any]) -> str:
    """What a server's own log says: the statuses it answered (warm-ups included) and its tracebacks."""
    statuses = ", ".join(f"{count} x {status}" for status, count in summary["statuses"].items())
    return f"statuses {statuses or 'not logged'}; {summary['tracebacks']} tracebacks ({summary['path']})"
