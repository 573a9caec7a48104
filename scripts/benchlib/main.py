"""The command line of scripts/bench: set everything up, run the workloads, write the results."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pgherd.shared.localpg import LocalPgError, PgCluster, make_traversable, remove_cluster_dir

from . import idle, machine, microbench, report
from .procs import BenchError, raise_nofile, serving_processes
from .setup import (DBNAME, HOST, SHARD_DBS, SHARDED_TABLE, SPARE_CONNECTIONS, USER, Target, create_shards,
                    find_pgbench, find_pgbouncer, init_pgbench, run_client, start_pgbouncer, start_pgherd,
                    start_postgres,
                    version_of)
from .workloads import Context, Workload, run_cell, warm_up

REPO = Path(__file__).resolve().parents[2]
ALL_TARGETS = ("pgherd-1w", "pgherd-percore", "pgbouncer", "direct")
ALL_PARTS = ("pgbench", "sharded", "parser", "idle")
MODES = ("simple", "extended", "prepared")
SCRIPTS = ("select-only", "tpcb-like")
# Full run: 2 scripts × 3 modes × 4 client counts × 4 targets × 3 rounds × 5 s ≈ 25 minutes.
FULL = {"duration": 5, "rounds": 3, "clients": "1,10,50,500", "modes": ",".join(MODES),
        "scripts": ",".join(SCRIPTS), "warmup": 2, "parser_seconds": 1.0}
# Quick run (< 2 minutes): -S simple at 10 and 50 clients, 2 rounds × 5 s, all four targets.
QUICK = {"duration": 5, "rounds": 2, "clients": "10,50", "modes": "simple", "scripts": "select-only",
         "warmup": 1, "parser_seconds": 0.3}
QUICK_SKIP = ("sharded", "idle")
SHARDED_CLIENTS = "10,50"
# Ratios computed per cell from same-round runs: (numerator, denominator).
RATIO_PAIRS = [("pgherd-1w", "pgbouncer"), ("pgherd-percore", "pgbouncer"), ("pgherd-1w", "direct"),
               ("pgherd-percore", "direct"), ("pgbouncer", "direct")]
SHARDED_RATIO_PAIRS = [("pgherd-1w", "shard0-direct"), ("pgherd-percore", "shard0-direct")]
# Descriptors the bench and the proxies need beyond their clients (logs, pools, pgbench logs).
SPARE_FDS = 2048
# The machine counts as quiet below this CPU use (all cores, over QUIET_SAMPLE seconds): other jobs
# on the same cores change every figure of the bench.
QUIET_PCT = 15
QUIET_SAMPLE = 2.0
# Consecutive quiet samples needed: a test suite pauses for a second between its tests.
QUIET_SAMPLES = 2
# While waiting, say so every this many seconds.
QUIET_REPORT = 30


class Interrupted(Exception):
    """Ctrl-C or SIGTERM."""


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _csv(text: str, allowed: tuple[str, ...] | None = None, what: str = "value") -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(f"scripts/bench: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in _csv(text)]
    except ValueError:
        raise SystemExit(f"scripts/bench: --{what} takes comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"scripts/bench: --{what} needs at least one integer ≥ 1")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark pgherd against PgBouncer and a direct Postgres connection on this machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Full run (default): pgbench -S and TPC-B-like, -M simple, extended and prepared, 1, 10, 50 and\n"
            "500 clients, 3 rounds x 5 s per target; then the sharded workloads, the parser microbenchmark\n"
            "and 10,000 idle clients (35-40 minutes on 2 cores).\n"
            "--quick: -S -M simple at 10 and 50 clients, 2 rounds x 5 s, and the parser microbenchmark\n"
            "(under 2 minutes). Results: bench-results/<timestamp>/ (results.json, results.md, tps.png);\n"
            "docs/benchmarks.md explains every figure."))
    p.add_argument("--quick", action="store_true", help="a run under two minutes, for checking the hot path")
    p.add_argument("--duration", type=int, help="seconds per pgbench run")
    p.add_argument("--rounds", type=int, help="rounds per cell (targets alternate within a round)")
    p.add_argument("--clients", help="comma-separated client counts (default 1,10,50,500)")
    p.add_argument("--modes", help="comma-separated pgbench -M modes: simple,extended,prepared")
    p.add_argument("--scripts", help="comma-separated builtin scripts: select-only,tpcb-like")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma-separated: {','.join(ALL_TARGETS)}")
    p.add_argument("--skip", default=None, help=f"comma-separated parts to leave out: {','.join(ALL_PARTS)}")
    p.add_argument("--only", default=None, help=f"comma-separated parts to run (instead of --skip): {','.join(ALL_PARTS)}")
    p.add_argument("--warmup", type=int, help="seconds of warm-up per target before measuring")
    p.add_argument("--pool-size", type=int, default=20, help="server connections per pool, for pgherd and PgBouncer")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="general.workers for the per-core pgherd (default: CPU count)")
    p.add_argument("--sharded-clients", default=SHARDED_CLIENTS, help="client counts of the sharded workloads")
    p.add_argument("--sharded-rows", type=int, default=100_000, help="rows of the sharded table (both shards)")
    p.add_argument("--idle-clients", type=int, default=10_000, help="idle clients for the idle-connection test")
    p.add_argument("--parser-seconds", type=float, help="timed seconds per parser microbenchmark case")
    p.add_argument("--log-sampling", type=float, default=1.0,
                   help="fraction of transactions pgbench logs for latency percentiles (default all)")
    p.add_argument("--pgbench", help="pgbench binary (default: PostgreSQL 16's from the pgserver wheel)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install pgbouncer when it is missing")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help=f"first wait up to SECONDS for the machine to be quiet (under {QUIET_PCT}%% CPU busy)")
    p.add_argument("--out", type=Path, help="output directory (default bench-results/<timestamp>/)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.clients = _ints(args.clients, "clients")
    args.modes = _csv(args.modes, MODES, "mode")
    args.scripts = _csv(args.scripts, SCRIPTS, "script")
    args.targets = _csv(args.targets, ALL_TARGETS, "target")
    args.sharded_clients = _ints(args.sharded_clients, "sharded-clients")
    if args.only is not None:
        parts = set(_csv(args.only, ALL_PARTS, "part"))
    else:
        skip = set(_csv(args.skip, ALL_PARTS, "part")) if args.skip is not None else set(QUICK_SKIP if args.quick else ())
        parts = set(ALL_PARTS) - skip
    args.parts = [x for x in ALL_PARTS if x in parts]
    if args.duration < 1 or args.rounds < 1 or args.pool_size < 1 or args.workers < 1:
        raise SystemExit("scripts/bench: --duration, --rounds, --pool-size and --workers must be ≥ 1")
    if not 0 < args.log_sampling <= 1:
        raise SystemExit("scripts/bench: --log-sampling must be within (0, 1]")
    return args


class Bench:
    """One run: everything it started, so that it can all be stopped on the way out."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = dt.datetime.now().astimezone()
        stamp = self.started.strftime("%Y%m%d-%H%M%S")
        self.out = args.out or REPO / "bench-results" / stamp
        self.logdir = self.out / "logs"
        self.workdir = Path(tempfile.mkdtemp(prefix="pgherd-bench-"))
        self.cluster: PgCluster | None = None
        self.services: list = []
        self.notes: list[str] = []
        self.versions: dict[str, str | None] = {}
        self.results: dict = {
            "started": self.started.isoformat(timespec="seconds"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "targets": [], "pgbench": [], "notes": self.notes,
        }
        self.pgbouncer: str | None = None
        self.waited = 0.0  # seconds spent waiting for a quiet machine (not part of the run's time)
        self.busy_at_start: float | None = None  # CPU use of the whole machine just before starting, %
        self.load_at_start: tuple[float, ...] | None = None

    # -- setup ---------------------------------------------------------------------------------

    def check_quiet(self) -> None:
        """Wait (up to --wait-quiet) for other jobs to finish; note it when the machine stays busy."""
        t0 = time.monotonic()
        deadline = t0 + self.args.wait_quiet
        quiet = 0
        said = -QUIET_REPORT
        while True:
            busy = psutil.cpu_percent(interval=QUIET_SAMPLE)
            self.busy_at_start = busy
            self.waited = time.monotonic() - t0
            quiet = quiet + 1 if busy < QUIET_PCT else 0
            self.load_at_start = os.getloadavg()
            if quiet >= QUIET_SAMPLES:
                self.waited = max(0.0, self.waited - QUIET_SAMPLES * QUIET_SAMPLE)  # checking is not waiting
                return
            if time.monotonic() >= deadline:
                self.waited = max(0.0, self.waited - QUIET_SAMPLE)  # the last check was not waiting
                if quiet:
                    return  # quiet now, if not for long: good enough without --wait-quiet
                break
            if not quiet and time.monotonic() - said >= QUIET_REPORT:
                print(f"machine busy ({busy:.0f}% CPU): waiting for it to be quiet …", flush=True)
                said = time.monotonic()
        msg = (f"the machine was busy with other jobs when the bench started ({busy:.0f}% CPU over "
               f"{QUIET_SAMPLE:g} s): figures are noisier than usual; see `other CPU %` per run")
        print(f"warning: {msg}", flush=True)
        self.notes.append(msg)

    def setup(self) -> list[Target]:
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(exist_ok=True)
        print(f"results go to {self.out}", flush=True)
        self.check_quiet()
        make_traversable(self.workdir)  # Postgres and PgBouncer run as `postgres` when we are root
        most = max(a.clients + (a.sharded_clients if "sharded" in a.parts else []))
        nofile = raise_nofile(max(a.idle_clients if "idle" in a.parts else 0, most * 2) + SPARE_FDS)
        self.nofile = nofile
        pgbench = find_pgbench(a.pgbench)
        self.versions["pgbench"] = version_of([pgbench, "--version"])
        self.failures_detailed = not any(f" {v}." in (self.versions["pgbench"] or "") for v in range(9, 15))
        if "pgbouncer" in a.targets or "idle" in a.parts:
            self.pgbouncer, how = find_pgbouncer(install=not a.no_install)
            if self.pgbouncer is None:
                self.notes.append(f"PgBouncer left out: {how}")
                print(f"PgBouncer left out: {how}", flush=True)
            else:
                self.versions["pgbouncer"] = version_of([self.pgbouncer, "--version"])
        max_conn = most + 6 * a.pool_size + SPARE_CONNECTIONS
        self.cluster = start_postgres(self.workdir / "pg", max_connections=max_conn)
        init_pgbench(self.cluster, scale=a.scale, pgbench=pgbench)
        self.versions["postgres"] = self.cluster.sql("SELECT version()")[0][0].split(" on ")[0]
        self.versions["postgres_settings"] = {"max_connections": max_conn, "shared_buffers": "256MB",
                                              "fsync": "off", "synchronous_commit": "off"}
        self.ctx = Context(pgbench=pgbench, workdir=self.workdir, postgres_root=psutil.Process(self.cluster.postmaster_pid()),
                           sampling_rate=a.log_sampling, failures_detailed=self.failures_detailed)
        targets = []
        if "pgbench" in a.parts:
            targets = self.start_targets(sharded=False)
        return targets

    def start_targets(self, sharded: bool) -> list[Target]:
        a = self.args
        cluster = self.cluster
        targets: list[Target] = []
        suffix = "-sharded" if sharded else ""
        for key in a.targets:
            if key == "pgherd-1w":
                t = start_pgherd(self.workdir, self.logdir, key + suffix, "pgherd 1 worker", workers=1,
                                 pool_size=a.pool_size, cluster=cluster, nofile=self.nofile, sharded=sharded)
            elif key == "pgherd-percore":
                if a.workers == 1 and "pgherd-1w" in a.targets:
                    self.notes.append("pgherd per-core left out: this machine has 1 core (same as 1 worker)")
                    continue
                t = start_pgherd(self.workdir, self.logdir, key + suffix, f"pgherd {a.workers} workers",
                                 workers=a.workers, pool_size=a.pool_size, cluster=cluster, nofile=self.nofile,
                                 sharded=sharded)
            elif key == "pgbouncer":
                if sharded or self.pgbouncer is None:
                    continue
                t = start_pgbouncer(self.workdir, self.logdir, key, "PgBouncer", binary=self.pgbouncer,
                                    pool_size=a.pool_size, cluster=cluster, max_clients=max(a.clients) + 100)
            elif key == "direct":
                if sharded:
                    for i, db in enumerate(SHARD_DBS):
                        targets.append(Target(f"shard{i}-direct", f"shard {i} direct", "direct", cluster.port, db))
                    continue
                t = Target("direct", "Postgres direct", "direct", cluster.port, DBNAME)
            else:
                continue
            t.key = key  # the same keys with or without sharding (services and logs keep the suffix)
            if t.service is not None:
                self.services.append(t.service)
            targets.append(t)
        return targets

    def note_workers(self, targets: list[Target]) -> None:
        """Count pgherd's serving processes; say so when fewer run than general.workers asks for."""
        for t in targets:
            if t.kind != "pgherd" or t.root is None:
                continue
            t.workers_running = serving_processes(t.root)
            if t.workers and t.workers_running < t.workers:
                msg = (f"{t.label}: general.workers = {t.workers}, but {t.workers_running} pgherd process(es) "
                       "serve clients: this build does not start several workers, so these figures measure fewer "
                       "workers than the label says")
                t.notes.append(msg)
                if msg not in self.notes:
                    self.notes.append(msg)

    # -- parts ---------------------------------------------------------------------------------

    def run_pgbench(self, targets: list[Target]) -> None:
        a = self.args
        cells_spec = [(s, m, c) for s in a.scripts for m in a.modes for c in a.clients]
        self.ctx.total_runs += len(cells_spec) * len(targets) * a.rounds
        print(f"\n== pgbench: {len(cells_spec)} cells × {len(targets)} targets × {a.rounds} rounds × {a.duration} s",
              flush=True)
        warm_up(self.ctx, targets, Workload("select-only", builtin="select-only"), a.warmup)
        self.note_workers(targets)
        for script, mode, clients in cells_spec:
            cell = run_cell(self.ctx, targets, Workload(script, builtin=script), mode, clients, rounds=a.rounds,
                            duration=a.duration, ratio_pairs=RATIO_PAIRS)
            self.results["pgbench"].append(cell)

    def _psql(self, port: int, dbname: str, sql: str) -> tuple[bool, str]:
        done = run_client([str(self.cluster.bin_dir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                           "-h", HOST, "-p", str(port), "-U", USER, "-d", dbname, "-c", sql], timeout=60, what="psql")
        text = (done.stdout if done.returncode == 0 else done.stderr).strip()
        return done.returncode == 0, text

    def run_sharded(self) -> None:
        """Key lookups and a cross-shard ORDER BY … LIMIT through pgherd, if this pgherd shards."""
        a = self.args
        res: dict = {"workloads": {}, "cells": [], "targets": []}
        self.results["sharded"] = res
        names = ("kv-lookup", "cross-shard-topn")
        pgherd_keys = [k for k in a.targets if k.startswith("pgherd")]
        if not pgherd_keys:
            for n in names:
                res["workloads"][n] = {"skipped": "no pgherd target selected"}
            return
        print("\n== sharded workloads", flush=True)
        create_shards(self.cluster, a.sharded_rows)
        # Capability check with one pgherd first; the others start only when it shards.
        try:
            first = start_pgherd(self.workdir, self.logdir, pgherd_keys[0] + "-sharded", "pgherd (sharded check)",
                                 workers=1, pool_size=a.pool_size, cluster=self.cluster, nofile=self.nofile,
                                 sharded=True)
        except BenchError as e:
            ok, answer = False, f"pgherd did not start with a 2-shard configuration: {e}"
        else:
            self.services.append(first.service)
            ok, answer = self._psql(first.port, first.dbname, "SHOW pgherd.shards")
            first.service.stop()
        if not ok or answer.strip() != str(len(SHARD_DBS)):
            why = f"sharding not available (SHOW pgherd.shards through pgherd: {answer.splitlines()[0] if answer else 'no answer'})"
            print(f"  skipped: {why}", flush=True)
            for n in names:
                res["workloads"][n] = {"skipped": why}
            return
        targets = self.start_targets(sharded=True)
        res["targets"] = [t.describe() for t in targets]
        proxy = [t for t in targets if t.kind == "pgherd"]
        # Sanity: every key must be found through pgherd (each lives on exactly one shard).
        bad = []
        for key in range(1, 21):
            ok, answer = self._psql(proxy[0].port, proxy[0].dbname, f"SELECT v FROM {SHARDED_TABLE} WHERE id = {key}")
            if not ok or not answer:
                bad.append(f"id={key}: {answer or 'no row'}")
        lookup = self.workdir / "kv-lookup.sql"
        lookup.write_text(f"\\set id random(1, {a.sharded_rows})\nSELECT id, v FROM {SHARDED_TABLE} WHERE id = :id;\n")
        topn_sql = f"SELECT id, v FROM {SHARDED_TABLE} ORDER BY v DESC, id LIMIT 10"
        topn = self.workdir / "cross-shard-topn.sql"
        topn.write_text(topn_sql + ";\n")
        runs = []
        if bad:
            res["workloads"]["kv-lookup"] = {"skipped": "pgherd did not find keys that exist: " + "; ".join(bad[:3])}
        else:
            runs.append((Workload("kv-lookup", script=lookup), targets))
        # The merged top 10 must equal what one Postgres holding both shards would return.
        rows = []
        for db in SHARD_DBS:
            ok, answer = self._psql(self.cluster.port, db, topn_sql)
            rows += [tuple(int(x) for x in line.split("|")) for line in answer.splitlines() if line]
        expected = "\n".join(f"{i}|{v}" for i, v in sorted(rows, key=lambda r: (-r[1], r[0]))[:10])
        ok, answer = self._psql(proxy[0].port, proxy[0].dbname, topn_sql)
        if not ok:
            res["workloads"]["cross-shard-topn"] = {"skipped": f"pgherd refused the cross-shard query: {answer.splitlines()[0]}"}
        elif answer != expected:
            res["workloads"]["cross-shard-topn"] = {"skipped": "pgherd returned a wrong cross-shard result",
                                                    "got": answer, "expected": expected}
        else:
            runs.append((Workload("cross-shard-topn", script=topn), [t for t in targets if t.key != "shard1-direct"]))
        for wl, ts in runs:
            self.ctx.total_runs += len(a.modes) * len(a.sharded_clients) * len(ts) * a.rounds
        for wl, ts in runs:
            res["workloads"][wl.key] = {"targets": [t.key for t in ts]}
            for mode in a.modes:
                for clients in a.sharded_clients:
                    res["cells"].append(run_cell(self.ctx, ts, wl, mode, clients, rounds=a.rounds,
                                                 duration=a.duration, ratio_pairs=SHARDED_RATIO_PAIRS))
        for t in targets:
            if t.service is not None:
                t.service.stop()

    def run_idle(self) -> None:
        a = self.args
        n = a.idle_clients
        res: dict = {}
        self.results["idle"] = res
        print(f"\n== idle connections: {n} clients", flush=True)
        if "pgherd-1w" in a.targets or "pgherd-percore" in a.targets:
            t = start_pgherd(self.workdir, self.logdir, "pgherd-idle", "pgherd 1 worker (trust auth)", workers=1,
                             pool_size=a.pool_size, cluster=self.cluster, nofile=self.nofile, auth_type="trust")
            self.services.append(t.service)
            r = idle.measure(t.root, HOST, t.port, USER, t.dbname, n)
            r["label"] = t.label
            res["pgherd-1w"] = r
            t.service.stop()
            self._print_idle(t.label, r)
        if self.pgbouncer is not None and "pgbouncer" in a.targets:
            t = start_pgbouncer(self.workdir, self.logdir, "pgbouncer-idle", "PgBouncer (trust auth)",
                                binary=self.pgbouncer, pool_size=a.pool_size, cluster=self.cluster,
                                max_clients=n + 100, auth_type="trust", plain_password=True)
            self.services.append(t.service)
            r = idle.measure(t.root, HOST, t.port, USER, t.dbname, n)
            r["label"] = t.label
            res["pgbouncer"] = r
            t.service.stop()
            self._print_idle(t.label, r)

    @staticmethod
    def _print_idle(label: str, r: dict) -> None:
        per = r.get("rss_per_client_kb")
        print(f"  {label}: {r.get('clients_connected', 0)} idle clients, "
              + (f"{per:.1f} KiB RSS per client, " if per is not None else "")
              + f"{r.get('status')}" + (f" ({r['errors'][0]})" if r.get("errors") else ""), flush=True)

    # -- output and clean-up -------------------------------------------------------------------

    def write(self, elapsed: float) -> None:
        self.results["elapsed_s"] = round(elapsed - self.waited, 1)
        self.results["waited_for_quiet_s"] = round(self.waited, 1)
        self.results["cpu_busy_at_start_pct"] = self.busy_at_start
        self.results["machine"] = machine.describe(self.versions, REPO, self.load_at_start)
        report.write_json(self.out / "results.json", self.results)
        (self.out / "results.md").write_text(report.markdown(self.results))
        err = report.chart(self.out / "tps.png", self.results) if self.results["pgbench"] else None
        if err:
            self.notes.append(f"chart not drawn: {err}")
            report.write_json(self.out / "results.json", self.results)
        drawn = self.results["pgbench"] and not err
        print(f"\nwrote {self.out}/results.json, results.md" + (", tps.png" if drawn else ""), flush=True)

    def cleanup(self) -> None:
        for s in reversed(self.services):
            try:
                s.stop()
            except Exception as e:  # keep going: everything else must stop too
                print(f"  stopping {s.name}: {e}", flush=True)
        try:
            if self.cluster is not None:
                self.cluster.destroy()
            else:  # interrupted while the cluster was being created
                remove_cluster_dir(self.workdir / "pg")
        except Exception as e:
            print(f"  stopping PostgreSQL: {e}", flush=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    bench = Bench(args)
    t0 = time.monotonic()
    code = 0
    try:
        targets = bench.setup()
        bench.results["targets"] = [t.describe() for t in targets]
        if "pgbench" in args.parts and targets:
            bench.run_pgbench(targets)
            bench.results["targets"] = [t.describe() for t in targets]
        if "sharded" in args.parts:
            bench.run_sharded()
        if "parser" in args.parts:
            print("\n== parser microbenchmark", flush=True)
            bench.results["parser"] = microbench.run(args.parser_seconds)
        if "idle" in args.parts:
            bench.run_idle()
    except Interrupted as e:
        print(f"\n{e}: stopping; results so far are written", flush=True)
        bench.results["interrupted"] = str(e)
        code = 130
    except (BenchError, LocalPgError) as e:
        print(f"\nscripts/bench: {e}", file=sys.stderr, flush=True)
        bench.results["error"] = str(e)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # no second Ctrl-C half-way through cleaning up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping pgherd, PgBouncer and PostgreSQL …", flush=True)
        bench.cleanup()
        if bench.out.exists():
            bench.results["runs"] = bench.ctx.runs if hasattr(bench, "ctx") else []
            try:
                bench.write(time.monotonic() - t0)
            except Exception as e:
                print(f"scripts/bench: writing results failed: {e}", file=sys.stderr, flush=True)
                code = code or 1
    waited = f" (after waiting {bench.waited:.0f} s for a quiet machine)" if bench.waited >= 1 else ""
    print(f"done in {time.monotonic() - t0 - bench.waited:.0f} s{waited}", flush=True)
    return code
