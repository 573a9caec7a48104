"""The bench's output: results.json (every figure), results.md (tables) and tps.png (chart)."""

from __future__ import annotations

import json
from pathlib import Path

# Ratio columns of the headline table: (numerator, denominator, heading).
HEADLINE_RATIOS = (
    ("pgherd-1w", "pgbouncer", "pgherd 1w / PgBouncer"),
    ("pgherd-percore", "pgbouncer", "pgherd per-core / PgBouncer"),
    ("pgherd-1w", "direct", "pgherd 1w / direct"),
    ("pgherd-percore", "direct", "pgherd per-core / direct"),
)


def _f(value, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def _cell_status(summary: dict) -> str:
    if summary["ok"]:
        return ""
    parts = [s for s in summary["statuses"] if s != "ok"]
    return "; ".join(parts)


def _both_ok(cell: dict, a: str, b: str) -> bool:
    return cell["targets"][a]["ok"] and cell["targets"][b]["ok"]


def _broken(cell: dict, a: str, b: str) -> str:
    """Which side of a ratio failed, and how (a ratio of broken runs would mislead)."""
    names = {"pgherd-1w": "pgherd", "pgherd-percore": "pgherd", "pgbouncer": "PgBouncer", "direct": "direct"}
    parts = []
    for k in (a, b):
        t = cell["targets"][k]
        if not t["ok"]:
            parts.append(f"{names.get(k, k)} {_cell_status(t).replace('clients aborted', 'aborted')}")
    return "; ".join(parts)


def headline_table(cells: list[dict], labels: dict[str, str]) -> list[str]:
    present = {k for c in cells for k in c["targets"]}
    ratios = [(a, b, h) for a, b, h in HEADLINE_RATIOS if a in present and b in present]
    cpu_targets = [k for k in ("pgherd-1w", "pgherd-percore", "pgbouncer") if k in present]
    head = ["workload", "-M", "clients"] + [f"tps {h}" for _, _, h in ratios]
    head += [f"CPU µs/tx {labels.get(k, k)}" for k in cpu_targets]
    if "pgherd-1w" in present and "pgbouncer" in present:
        head.append("CPU/tx pgherd 1w / PgBouncer")
    if "pgherd-percore" in present and "pgbouncer" in present:
        head.append("CPU/tx pgherd per-core / PgBouncer")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [c["workload"], c["mode"], str(c["clients"])]
        for a, b, _ in ratios:
            r = c["ratios"].get(f"{a}/{b}", {})
            row.append(_ratio(r.get("tps")) if _both_ok(c, a, b) else "⚠ " + _broken(c, a, b))
        for k in cpu_targets:
            t = c["targets"][k]
            row.append(_f(t["proxy_cpu_us_per_tx"], 1) + ("" if t["ok"] else " ⚠"))
        for a in ("pgherd-1w", "pgherd-percore"):
            if a in present and "pgbouncer" in present:
                r = c["ratios"].get(f"{a}/pgbouncer", {})
                row.append(_ratio(r.get("cpu_per_tx")) if _both_ok(c, a, "pgbouncer") else "⚠ " + _broken(c, a, "pgbouncer"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def cell_table(cells: list[dict], labels: dict[str, str]) -> list[str]:
    head = ["clients", "target", "tps", "mean ms", "p99 ms", "failed tx", "aborted clients",
            "proxy CPU µs/tx", "Postgres CPU µs/tx", "pgbench CPU µs/tx", "proxy peak RSS MB", "proxy procs",
            "other CPU %", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        for key, s in c["targets"].items():
            lines.append("| " + " | ".join([
                str(c["clients"]), labels.get(key, key), _f(s["tps"]), _f(s["lat_mean_ms"], 3), _f(s["lat_p99_ms"], 3),
                str(s["failed"]), str(s["aborted_clients"]), _f(s["proxy_cpu_us_per_tx"], 1),
                _f(s["postgres_cpu_us_per_tx"], 1), _f(s["pgbench_cpu_us_per_tx"], 1), _f(s["proxy_peak_rss_mb"], 1),
                _f(s["processes"]), _f(s["other_cpu_pct"], 1), _cell_status(s) or "ok",
            ]) + " |")
    return lines


def _errors(cells: list[dict], labels: dict[str, str]) -> list[str]:
    out = []
    for c in cells:
        for key, s in c["targets"].items():
            for e in s["errors"]:
                line = f"- {c['workload']} -M {c['mode']} -c {c['clients']}, {labels.get(key, key)}: `{e}`"
                if line not in out:
                    out.append(line)
    return out


def _groups(cells: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["workload"], c["mode"]), []).append(c)
    return groups


def markdown(results: dict) -> str:
    m = results["machine"]
    a = results["settings"]
    labels = {t["key"]: t["label"] for t in results["targets"]}
    labels.update({t["key"]: t["label"] for t in results.get("sharded", {}).get("targets", [])})
    out = [
        f"# pgherd benchmark, {results['started']}",
        "",
        f"- machine: {m['cpu_count']} × {m['cpu_model']}, {m['memory_gb']} GB, Linux {m['kernel']}; "
        + (f"{results['cpu_busy_at_start_pct']:.0f}% CPU busy just before the start, "
           if results.get("cpu_busy_at_start_pct") is not None else "")
        + f"load average {m['load_average_at_start']}",
        f"- software: Python {m['python']}, {m.get('postgres')}, {m.get('pgbouncer') or 'no PgBouncer'}, "
        f"{m.get('pgbench')}, pgherd {m['pgherd']}" + (f" ({m['pgherd_revision'][:12]})" if m.get("pgherd_revision") else ""),
        f"- run: {'quick' if a['quick'] else 'full'}; {a['rounds']} rounds × {a['duration']} s per target and cell, "
        f"targets alternating; pool size {a['pool_size']}; pgbench scale {a['scale']}; "
        f"took {results.get('elapsed_s', 0):.0f} s",
        "- targets: " + "; ".join(
            f"{t['label']} (`{t['key']}`" + (f", {t['workers_running']} worker process(es) seen" if t.get("workers_running") else "")
            + ")" for t in results["targets"]),
    ]
    for note in results.get("notes", []):
        out.append(f"- note: {note}")
    cells = results["pgbench"]
    if cells:
        out += ["", "## Headline: ratios (median over rounds of same-round ratios)", ""]
        out += headline_table(cells, labels)
        if any(not s["ok"] for c in cells for s in c["targets"].values()):
            out += ["", "⚠: a run of this cell did not complete cleanly (aborted clients, pgbench errors, "
                    "timeouts): no ratio is given, and the CPU figure covers only the transactions that ran."]
        out.append("")
        out += ["## pgbench, medians over rounds", ""]
        for (workload, mode), group in _groups(cells).items():
            out += [f"### {group[0]['label']}, -M {mode}", ""]
            out += cell_table(group, labels)
            out.append("")
        errs = _errors(cells, labels)
        if errs:
            out += ["Errors reported by pgbench (distinct messages):", "", *errs, ""]
    sh = results.get("sharded")
    if sh:
        out += ["## Sharded workloads", ""]
        for name, w in sh.get("workloads", {}).items():
            if w.get("skipped"):
                out.append(f"- {name}: skipped: {w['skipped']}")
        if sh.get("cells"):
            out.append("")
            for (workload, mode), group in _groups(sh["cells"]).items():
                out += [f"### {group[0]['label']}, -M {mode}", ""]
                out += cell_table(group, labels)
                out.append("")
                for c in group:
                    rs = ", ".join(f"{k} {_ratio(v['tps'])}" for k, v in c["ratios"].items())
                    if rs:
                        out.append(f"- -c {c['clients']} tps ratios: {rs}")
                out.append("")
        out.append("")
    p = results.get("parser")
    if p:
        out += ["## Parser microbenchmark", "", f"Implementation: {p['implementation']}", "",
                "| statement | case | per second | µs each | decision |", "|---|---|---|---|---|"]
        for case, r in p["cases"].items():
            kind, hit = case.split("/")
            out.append(f"| {kind} ({r['statement_bytes']} bytes) | {hit} | {_f(r['per_second'])} | "
                       f"{_f(r['us_per_call'], 2)} | {r.get('decision', '')} |")
        out.append("")
    idle = results.get("idle")
    if idle:
        out += ["## Idle connections", "",
                "| target | clients | RSS before MB | RSS idle MB | RSS per client KiB | USS per client KiB | logins/s | status |",
                "|---|---|---|---|---|---|---|---|"]
        for key, r in idle.items():
            if "clients_requested" not in r:
                out.append(f"| {key} | — | — | — | — | — | — | {r.get('status')} |")
                continue
            out.append(
                f"| {r.get('label', key)} | {r.get('clients_connected', 0)}/{r['clients_requested']} | {_f(r.get('rss_before_mb'), 1)} | "
                f"{_f(r.get('rss_idle_mb'), 1)} | {_f(r.get('rss_per_client_kb'), 1)} | {_f(r.get('uss_per_client_kb'), 1)} | "
                f"{_f(r.get('logins_per_second'))} | {r.get('status')} |")
        out.append("")
    return "\n".join(out) + "\n"


def chart(path: Path, results: dict) -> str | None:
    """tps by clients, one panel per workload and mode, one line per target. Returns an error or None."""
    cells = results["pgbench"]
    if not cells:
        return "no pgbench cells"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError as e:
        return f"matplotlib is not installed ({e}): install the bench extra"
    labels = {t["key"]: t["label"] for t in results["targets"]}
    groups = list(_groups(cells).items())
    cols = min(3, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, ((workload, mode), group) in zip(axes.flat, groups):
        clients = [c["clients"] for c in group]
        for key in group[0]["targets"]:
            tps = [c["targets"][key]["tps"] for c in group]
            line, = ax.plot(clients, [t if t is not None else float("nan") for t in tps], marker="o",
                            label=labels.get(key, key))
            bad = [(c["clients"], c["targets"][key]["tps"]) for c in group
                   if not c["targets"][key]["ok"] and c["targets"][key]["tps"] is not None]
            if bad:
                ax.plot(*zip(*bad), linestyle="none", marker="x", markersize=10, color=line.get_color())
        if len(set(clients)) > 1:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(clients)
        ax.set_xticklabels([str(c) for c in clients])
        ax.set_title(f"{group[0]['label']}, -M {mode}", fontsize=10)
        ax.set_xlabel("clients")
        ax.set_ylabel("tps (median)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    m = results["machine"]
    fig.suptitle(f"pgherd bench {results['started']}, {m['cpu_count']} cores\n"
                 "(× = failed transactions or aborted clients)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
