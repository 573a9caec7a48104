"""Running pgbench against the targets in alternating rounds, and summing up each cell with medians."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .pgbench import parse_summary, pgbench_argv, read_logs
from .procs import TreeSampler, tree_cpu_seconds
from .setup import HOST, USER, Target, client_env

# pgbench -T counts from before its clients log in, and 500 clients take about 3 s to log in
# directly on 2 cores (fork + SCRAM), more through a proxy: -T gets this much per client on top of
# the duration (int(): 500 clients +8 s, 50 clients +0 s).
CONNECT_SECONDS_PER_CLIENT = 0.016
# pgbench gets its -T plus this long, plus CONNECT_TIMEOUT_PER_CLIENT per client, before it is
# killed as stuck.
RUN_GRACE = 60
CONNECT_TIMEOUT_PER_CLIENT = 0.2
# The steady window (first to last transaction) must cover this fraction of the duration for the
# CPU figure to come from it; otherwise the whole run's CPU is used (and the result says so).
MIN_WINDOW_FRACTION = 0.5
# How often the bench checks whether pgbench has finished (20 Hz: negligible CPU).
WAIT_POLL = 0.05
# Figures whose median over rounds is reported per target and cell.
MEDIAN_FIELDS = (
    "tps", "lat_mean_ms", "lat_p99_ms", "proxy_cpu_us_per_tx", "postgres_cpu_us_per_tx",
    "pgbench_cpu_us_per_tx", "proxy_peak_rss_mb", "other_cpu_pct", "interrupt_cpu_pct", "steal_cpu_pct",
)

LABELS = {
    "select-only": "pgbench -S (select only)",
    "tpcb-like": "pgbench TPC-B-like",
    "kv-lookup": "sharded key lookup",
    "cross-shard-topn": "cross-shard ORDER BY … LIMIT 10",
}


@dataclass
class Workload:
    key: str
    builtin: str | None = None
    script: Path | None = None

    @property
    def label(self) -> str:
        return LABELS.get(self.key, self.key)


@dataclass
class Context:
    """What every run needs to know."""

    pgbench: str
    workdir: Path
    postgres_root: psutil.Process | None
    sampling_rate: float = 1.0
    failures_detailed: bool = True
    total_runs: int = 0
    done_runs: int = 0
    runs: list[dict] = field(default_factory=list)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _per_tx(seconds: float | None, transactions: int | None) -> float | None:
    if seconds is None or not transactions:
        return None
    return seconds / transactions * 1e6


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_with_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float | None]:
    """Wait for proc up to timeout; return (exit code or None if it timed out, its CPU seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None, None
        time.sleep(WAIT_POLL)


def connect_allowance(clients: int) -> int:
    """Seconds added to pgbench -T so that many clients can log in and still run `duration` seconds."""
    return int(clients * CONNECT_SECONDS_PER_CLIENT)


def _status(code: int | None, summary, clients: int, timeout: float) -> str:
    if code is None:
        return f"timed out after {timeout:g} s (killed)"
    if summary.ok:
        return "ok"
    if summary.aborted_clients:
        return f"{summary.aborted_clients}/{clients} clients aborted"
    if summary.tps is None:
        return f"failed (exit {code})" if code else "no transactions ran"
    return f"exit {code}"


def run_once(ctx: Context, target: Target, workload: Workload, mode: str, clients: int, duration: int,
             round_no: int = 0) -> dict:
    """One pgbench run against target, with the proxy's CPU and RSS and Postgres's CPU around it."""
    logdir = ctx.workdir / "pgbench-logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    prefix = logdir / "tx"
    threads = max(1, min(clients, os.cpu_count() or 1))
    seconds = duration + connect_allowance(clients)
    argv = pgbench_argv(
        ctx.pgbench, host=HOST, port=target.port, user=USER, dbname=target.dbname, mode=mode, clients=clients,
        threads=threads, duration=seconds, builtin=workload.builtin, script=workload.script, log_prefix=prefix,
        sampling_rate=ctx.sampling_rate, failures_detailed=ctx.failures_detailed,
    )
    timeout = seconds + RUN_GRACE + CONNECT_TIMEOUT_PER_CLIENT * clients
    out_path, err_path = logdir / "stdout", logdir / "stderr"
    root = target.root
    proxy0 = tree_cpu_seconds(root) if root is not None else None
    pg0 = tree_cpu_seconds(ctx.postgres_root) if ctx.postgres_root is not None else None
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine0 = machine_cpu_seconds()
    t0 = time.monotonic()
    with TreeSampler(root) as sampler, out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=client_env(),
                                start_new_session=True)
        try:
            code, client_cpu = _wait_with_rusage(proc, timeout)
        except BaseException:  # Ctrl-C: take pgbench down with us
            _kill_group(proc)
            proc.wait()
            raise
        if code is None:
            _kill_group(proc)
            proc.wait()
    wall = time.monotonic() - t0
    machine1 = machine_cpu_seconds()
    busy = {k: machine1[k] - machine0[k] for k in machine0}
    proxy1 = tree_cpu_seconds(root) if root is not None else None
    pg1 = tree_cpu_seconds(ctx.postgres_root) if ctx.postgres_root is not None else None
    summary = parse_summary(out_path.read_text(errors="replace"), err_path.read_text(errors="replace"), code)
    latency = read_logs(prefix)
    tx = summary.processed
    proxy_cpu = proxy1 - proxy0 if proxy0 is not None and proxy1 is not None else None
    pg_cpu = pg1 - pg0 if pg0 is not None and pg1 is not None else None
    # The proxy's CPU per transaction in the steady part of the run: from the first transaction to
    # the last, which leaves out logging in (SCRAM for 500 clients is seconds of CPU) and shutting down.
    steady = None
    if root is not None and latency.ends:
        window = sampler.cpu_between(latency.ends[0], latency.ends[-1])
        if window is not None:
            cpu, ta, tb = window
            count = latency.ended_between(ta, tb) / ctx.sampling_rate
            if tb - ta >= MIN_WINDOW_FRACTION * duration and count > 0:
                steady = {"cpu_s": cpu, "seconds": tb - ta, "transactions": count, "tps": count / (tb - ta)}
    # Process CPU the machine spent on anything but this run's proxy, Postgres and pgbench (other
    # jobs, and the bench itself, which only sleeps and samples): how noisy the run was.
    other = busy["process"] - sum(x for x in (proxy_cpu, pg_cpu, client_cpu) if x is not None)
    capacity = wall * (os.cpu_count() or 1)
    run = {
        "target": target.key, "workload": workload.key, "mode": mode, "clients": clients, "round": round_no,
        "started": started, "duration_s": duration, "pgbench_T_s": seconds, "wall_s": round(wall, 3),
        "threads": threads,
        "status": _status(code, summary, clients, timeout),
        "tps": summary.tps,
        "transactions": tx,
        "failed": summary.failed,
        "aborted_clients": summary.aborted_clients,
        "errors": summary.errors,
        "connection_time_ms": summary.connection_time_ms,
        "lat_mean_ms": latency.mean_ms,
        "lat_p50_ms": latency.p50_ms,
        "lat_p99_ms": latency.p99_ms,
        "lat_max_ms": latency.max_ms,
        "pgbench_latency_avg_ms": summary.latency_avg_ms,
        "logged_transactions": latency.transactions,
        "proxy_cpu_us_per_tx": (steady["cpu_s"] / steady["transactions"] * 1e6 if steady
                                else _per_tx(proxy_cpu, tx)),
        "proxy_cpu_window": "steady" if steady else ("whole run" if root is not None else None),
        "proxy_cpu_steady": steady,
        "proxy_cpu_s_whole_run": proxy_cpu,
        "proxy_cpu_us_per_tx_whole_run": _per_tx(proxy_cpu, tx),
        "postgres_cpu_us_per_tx": _per_tx(pg_cpu, tx),
        "pgbench_cpu_us_per_tx": _per_tx(client_cpu, tx),
        "proxy_peak_rss_mb": sampler.peak_rss / 2**20 if root is not None else None,
        "proxy_processes": sampler.processes if root is not None else None,
        "other_cpu_pct": max(0.0, other) / capacity * 100 if capacity > 0 else None,
        "interrupt_cpu_pct": busy["interrupt"] / capacity * 100 if capacity > 0 else None,
        "steal_cpu_pct": busy["steal"] / capacity * 100 if capacity > 0 else None,
        "summary": summary.as_dict(),
        "argv": argv,
    }
    if code is None or summary.tps is None:
        run["stdout_tail"] = out_path.read_text(errors="replace")[-1000:]
        run["stderr_tail"] = err_path.read_text(errors="replace")[-2000:]
    ctx.runs.append(run)
    return run


def machine_cpu_seconds() -> dict[str, float]:
    """CPU seconds all cores have spent since boot: in processes, in interrupts, stolen by the host."""
    t = psutil.cpu_times()
    return {
        "process": t.user + t.nice + t.system,
        "interrupt": getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0),  # loopback TCP work lands here
        "steal": getattr(t, "steal", 0.0),  # a virtual machine's CPU taken by its host
    }


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def progress(ctx: Context, run: dict, target: Target) -> None:
    ctx.done_runs += 1
    cpu = run["proxy_cpu_us_per_tx"]
    line = (
        f"[{ctx.done_runs}/{ctx.total_runs}] {run['workload']} -M {run['mode']} -c {run['clients']} "
        f"round {run['round'] + 1}  {target.key:<15} {_fmt(run['tps']):>8} tps  "
        f"p99 {_fmt(run['lat_p99_ms'], 2)} ms" + (f"  {cpu:.1f} µs CPU/tx" if cpu is not None else "")
    )
    if run["status"] != "ok":
        line += f"  [{run['status']}" + (f": {run['errors'][0]}" if run["errors"] else "") + "]"
    print(line, flush=True)


def run_cell(ctx: Context, targets: list[Target], workload: Workload, mode: str, clients: int, *, rounds: int,
             duration: int, ratio_pairs: list[tuple[str, str]]) -> dict:
    """rounds × targets runs, alternating targets (the starting target rotates each round)."""
    runs: dict[str, list[dict]] = {t.key: [] for t in targets}
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for target in order:
            run = run_once(ctx, target, workload, mode, clients, duration, r)
            runs[target.key].append(run)
            progress(ctx, run, target)
    per_target = {}
    for key, rs in runs.items():
        summary = {f: _median([x[f] for x in rs]) for f in MEDIAN_FIELDS}
        summary["failed"] = sum(x["failed"] or 0 for x in rs)
        summary["aborted_clients"] = max((x["aborted_clients"] for x in rs), default=0)
        summary["statuses"] = sorted({x["status"] for x in rs})
        summary["ok"] = all(x["status"] == "ok" for x in rs)
        summary["errors"] = sorted({e for x in rs for e in x["errors"]})[:5]
        summary["processes"] = max((x["proxy_processes"] or 0 for x in rs), default=0) or None
        summary["rounds"] = len(rs)
        per_target[key] = summary
    ratios = {}
    for a, b in ratio_pairs:
        if a not in runs or b not in runs:
            continue
        tps = [x["tps"] / y["tps"] for x, y in zip(runs[a], runs[b]) if x["tps"] and y["tps"]]
        cpu = [x["proxy_cpu_us_per_tx"] / y["proxy_cpu_us_per_tx"] for x, y in zip(runs[a], runs[b])
               if x["proxy_cpu_us_per_tx"] and y["proxy_cpu_us_per_tx"]]
        ratios[f"{a}/{b}"] = {"tps": _median(tps), "cpu_per_tx": _median(cpu)}
    return {
        "workload": workload.key, "label": workload.label, "mode": mode, "clients": clients, "rounds": rounds,
        "duration_s": duration, "targets": per_target, "ratios": ratios,
    }


def warm_up(ctx: Context, targets: list[Target], workload: Workload, seconds: int, clients: int = 10) -> None:
    """A short run per target first, so pools are open and caches warm before anything counts."""
    if seconds <= 0:
        return
    for target in targets:
        run = run_once(ctx, target, workload, "simple", clients, seconds)
        ctx.runs.pop()  # not a measurement
        state = "ok" if run["status"] == "ok" else run["status"] + (f": {run['errors'][0]}" if run["errors"] else "")
        print(f"  warm-up {target.key:<15} {_fmt(run['tps']):>8} tps  ({state})", flush=True)
