"""Reading pgbench: its summary on stdout, its errors on stderr, and its per-transaction logs.

Pure functions of text, so they are unit-tested (tests/unit/test_bench_parse.py). Formats are
those of pgbench 15 and 16 (PostgreSQL documentation, "pgbench", sections "Output" and
"Per-Transaction Logging"); older versions print the same summary lines minus the failure
counts, which then read as zero.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

# At most this many distinct error messages are kept per run: enough to say what went wrong.
MAX_ERRORS = 5

_SUMMARY = {
    "version": (re.compile(r"^pgbench \(([^)]+)\)", re.M), str),
    "transaction_type": (re.compile(r"^transaction type: (.+)$", re.M), str),
    "scaling_factor": (re.compile(r"^scaling factor: (\d+)", re.M), int),
    "query_mode": (re.compile(r"^query mode: (\w+)", re.M), str),
    "clients": (re.compile(r"^number of clients: (\d+)", re.M), int),
    "threads": (re.compile(r"^number of threads: (\d+)", re.M), int),
    "duration_s": (re.compile(r"^duration: (\d+) s", re.M), int),
    "failed": (re.compile(r"^number of failed transactions: (\d+)", re.M), int),
    "serialization_failures": (re.compile(r"^number of serialization failures: (\d+)", re.M), int),
    "deadlock_failures": (re.compile(r"^number of deadlock failures: (\d+)", re.M), int),
    "latency_avg_ms": (re.compile(r"^latency average = ([\d.]+) ms", re.M), float),
    "latency_stddev_ms": (re.compile(r"^latency stddev = ([\d.]+) ms", re.M), float),
    "connection_time_ms": (re.compile(r"^initial connection time = ([\d.]+) ms", re.M), float),
    "tps": (re.compile(r"^tps = ([\d.]+)", re.M), float),
}
# "number of transactions actually processed: 123" (-T) or "123/1000" (-t).
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)(?:/(\d+))?", re.M)
# "client 3 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist"
_ABORTED = re.compile(r"client (\d+) script \d+ aborted in command \d+ query \d+: (.*)")
# Other error lines ("pgbench: error: ERROR:  …", "pgbench: error: connection to server … failed").
# Lines of several threads can interleave ("pgbench:pgbench:  error: …"), hence the loose prefix.
_ERROR = re.compile(r"error: (.*)")
_RUN_ABORTED = "Run was aborted"


@dataclass
class PgbenchSummary:
    """What one pgbench run reported (None: the line was missing)."""

    returncode: int | None = None
    version: str | None = None
    transaction_type: str | None = None
    scaling_factor: int | None = None
    query_mode: str | None = None
    clients: int | None = None
    threads: int | None = None
    duration_s: int | None = None
    processed: int | None = None
    failed: int = 0
    serialization_failures: int = 0
    deadlock_failures: int = 0
    latency_avg_ms: float | None = None
    latency_stddev_ms: float | None = None
    connection_time_ms: float | None = None
    tps: float | None = None
    aborted_clients: int = 0
    run_aborted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every client ran to the end and pgbench said so."""
        return self.returncode == 0 and not self.run_aborted and self.aborted_clients == 0 and self.tps is not None

    def as_dict(self) -> dict:
        return asdict(self)


def _clean_error(message: str) -> str:
    """One error message, without the client-specific parts, so equal errors count once."""
    message = message.strip()
    message = re.sub(r"^ERROR:\s+", "ERROR: ", message)
    message = re.sub(r"^FATAL:\s+", "FATAL: ", message)
    return message


def parse_summary(stdout: str, stderr: str = "", returncode: int | None = None) -> PgbenchSummary:
    """Read pgbench's summary (stdout) and its errors (stderr)."""
    s = PgbenchSummary(returncode=returncode)
    for name, (pattern, kind) in _SUMMARY.items():
        m = pattern.search(stdout)
        if m:
            setattr(s, name, kind(m.group(1)))
    m = _PROCESSED.search(stdout)
    if m:
        s.processed = int(m.group(1))
    aborted: set[int] = set()
    errors: list[str] = []

    def note(message: str) -> None:
        message = _clean_error(message)
        if message and message not in errors and len(errors) < MAX_ERRORS:
            errors.append(message)

    for line in stderr.splitlines():
        m = _ABORTED.search(line)
        if m:
            aborted.add(int(m.group(1)))
            note(m.group(2))
            continue
        if _RUN_ABORTED in line:
            s.run_aborted = True
            continue
        m = _ERROR.search(line)
        if m:
            note(m.group(1))
    s.aborted_clients = len(aborted)
    s.errors = errors
    return s


@dataclass
class LatencyStats:
    """Per-transaction latencies from pgbench --log files, in milliseconds."""

    transactions: int = 0  # lines with a latency (successful transactions logged)
    failed: int = 0  # lines marked failed (or serialization/deadlock with --failures-detailed)
    skipped: int = 0  # lines marked skipped (only with --rate and --latency-limit)
    mean_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    # When each logged successful transaction ended (Unix time, seconds), sorted; not in as_dict.
    ends: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["ends"]
        return d

    def ended_between(self, start: float, end: float) -> int:
        """Logged successful transactions that ended in (start, end]."""
        return bisect.bisect_right(self.ends, end) - bisect.bisect_right(self.ends, start)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of sorted values, nearest rank (no interpolation)."""
    if not sorted_values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def parse_log_lines(lines: Iterable[str]) -> LatencyStats:
    """Read --log lines: `client_id transaction_no time script_no time_epoch time_us [...]`.

    `time` is the transaction's latency in microseconds, or `failed` / `serialization` /
    `deadlock` for a failed transaction, or `skipped`; time_epoch and time_us say when it ended.
    """
    latencies: list[int] = []
    ends: list[float] = []
    failed = skipped = 0
    for line in lines:
        parts = line.split()
        if len(parts) < 6:
            continue  # a line cut short (pgbench killed while writing): ignore it
        t = parts[2]
        if t.isdigit():
            latencies.append(int(t))
            if parts[4].isdigit() and parts[5].isdigit():
                ends.append(int(parts[4]) + int(parts[5]) / 1e6)
        elif t == "skipped":
            skipped += 1
        elif t in ("failed", "serialization", "deadlock"):
            failed += 1
    ends.sort()
    stats = LatencyStats(transactions=len(latencies), failed=failed, skipped=skipped, ends=ends)
    if latencies:
        latencies.sort()
        ms = 1 / 1000
        stats.mean_ms = sum(latencies) / len(latencies) * ms
        stats.p50_ms = percentile(latencies, 50) * ms
        stats.p99_ms = percentile(latencies, 99) * ms
        stats.max_ms = latencies[-1] * ms
    return stats


def read_logs(prefix: Path) -> LatencyStats:
    """Latency stats over every log file pgbench wrote for --log-prefix=prefix (one per thread)."""
    files = sorted(prefix.parent.glob(prefix.name + ".*"))

    def lines():
        for path in files:
            with path.open("r", errors="replace") as f:
                yield from f

    return parse_log_lines(lines())


def pgbench_argv(
    pgbench: str, *, host: str, port: int, user: str, dbname: str, mode: str, clients: int, threads: int,
    duration: int, builtin: str | None = None, script: Path | None = None, log_prefix: Path | None = None,
    sampling_rate: float = 1.0, failures_detailed: bool = True,
) -> list[str]:
    """The pgbench command line for one timed run (no vacuum: the tables are vacuumed at setup)."""
    argv = [
        pgbench, "-h", host, "-p", str(port), "-U", user,
        "-M", mode, "-c", str(clients), "-j", str(threads), "-T", str(duration), "-n",
    ]
    if failures_detailed:  # pgbench 15+: failed transactions by kind
        argv.append("--failures-detailed")
    if builtin is not None:
        argv += ["-b", builtin]
    if script is not None:
        argv += ["-f", str(script)]
    if log_prefix is not None:
        argv += ["--log", f"--log-prefix={log_prefix}"]
        if sampling_rate < 1:
            argv.append(f"--sampling-rate={sampling_rate}")
    argv.append(dbname)
    return argv
