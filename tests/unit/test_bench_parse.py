"""The bench's reading of pgbench output: summaries, aborted clients, per-transaction logs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from benchlib.pgbench import (parse_log_lines, parse_summary, percentile, pgbench_argv,  # noqa: E402
                              read_logs)

# pgbench 16.2, -S -M simple -c 10 -j 2 -T 3 through pgherd (copied from a real run).
OK_STDOUT = """\
pgbench (16.2)
transaction type: <builtin: select only>
scaling factor: 10
query mode: simple
number of clients: 10
number of threads: 2
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 39031
number of failed transactions: 0 (0.000%)
latency average = 0.758 ms
initial connection time = 40.943 ms
tps = 13185.645278 (without initial connection time)
"""

# pgbench 16.2, TPC-B -M extended with --failures-detailed.
DETAILED_STDOUT = """\
pgbench (16.2)
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 10
query mode: extended
number of clients: 10
number of threads: 2
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 9778
number of failed transactions: 3 (0.031%)
number of serialization failures: 2 (0.020%)
number of deadlock failures: 1 (0.010%)
latency average = 1.987 ms
latency stddev = 0.512 ms
initial connection time = 75.054 ms
tps = 5033.595051 (without initial connection time)
"""

# -M prepared in transaction pooling: every client aborted (stdout and stderr of a real run,
# including two threads' lines interleaved as pgbench really prints them).
ABORTED_STDOUT = OK_STDOUT.replace("query mode: simple", "query mode: prepared").replace(
    "processed: 39031", "processed: 13397").replace("tps = 13185.645278", "tps = 4509.984784")
ABORTED_STDERR = """\
pgbench: error: ERROR:  prepared statement "P_0" already exists
pgbench:pgbench:  error: ERROR:  prepared statement "P_0" already exists
error: ERROR:  prepared statement "P_0" already exists
pgbench: error: client 5 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: client 6 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: client 0 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: client 5 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: Run was aborted; the above results are incomplete.
"""


def test_summary_of_a_clean_run():
    s = parse_summary(OK_STDOUT, "", 0)
    assert s.ok
    assert s.version == "16.2"
    assert s.transaction_type == "<builtin: select only>"
    assert (s.scaling_factor, s.query_mode, s.clients, s.threads, s.duration_s) == (10, "simple", 10, 2, 3)
    assert s.processed == 39031
    assert s.failed == 0 and s.aborted_clients == 0 and not s.run_aborted and s.errors == []
    assert s.latency_avg_ms == pytest.approx(0.758)
    assert s.latency_stddev_ms is None
    assert s.connection_time_ms == pytest.approx(40.943)
    assert s.tps == pytest.approx(13185.645278)


def test_summary_with_detailed_failures():
    s = parse_summary(DETAILED_STDOUT, "", 0)
    assert s.ok  # failed transactions are counted, not a broken run
    assert s.transaction_type == "<builtin: TPC-B (sort of)>"
    assert (s.failed, s.serialization_failures, s.deadlock_failures) == (3, 2, 1)
    assert s.latency_stddev_ms == pytest.approx(0.512)


def test_aborted_clients_and_errors_are_counted_once():
    s = parse_summary(ABORTED_STDOUT, ABORTED_STDERR, 2)
    assert not s.ok
    assert s.run_aborted
    assert s.aborted_clients == 3  # clients 5, 6 and 0; client 5 is named twice
    assert s.errors == [
        'ERROR: prepared statement "P_0" already exists',
        'ERROR: prepared statement "P_0" does not exist',
    ]
    assert s.tps == pytest.approx(4509.984784)  # reported, but the run is marked as not ok
    assert s.query_mode == "prepared"


def test_transactions_with_a_target_count():
    s = parse_summary("number of transactions actually processed: 950/1000\n", "", 0)
    assert s.processed == 950
    assert s.tps is None and not s.ok


def test_connection_failure_without_summary():
    err = ('pgbench: error: connection to server at "127.0.0.1", port 1 failed: Connection refused\n'
           "pgbench: error: could not create connection for initialization\n")
    s = parse_summary("pgbench (16.2)\n", err, 1)
    assert not s.ok
    assert s.tps is None and s.processed is None
    assert s.errors[0].startswith('connection to server at "127.0.0.1", port 1 failed')
    assert len(s.errors) == 2


def test_errors_are_capped():
    err = "".join(f"pgbench: error: client {i} script 0 aborted in command 0 query 0: ERROR:  boom {i}\n"
                  for i in range(50))
    s = parse_summary("", err, 2)
    assert s.aborted_clients == 50
    assert len(s.errors) == 5


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 50) == 50
    assert percentile(values, 0) == 1
    assert percentile([7], 99) == 7
    assert percentile([], 99) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_log_lines():
    lines = [f"{i % 3} {i} {1000 + i} 0 1795253591 {i}" for i in range(1, 101)]
    lines += ["4 7 failed 0 1795253591 5", "4 8 serialization 0 1795253591 6", "1 9 skipped 0 1795253591 7",
              "1 10 12", ""]  # a cut line and an empty one are ignored
    stats = parse_log_lines(lines)
    assert stats.transactions == 100
    assert stats.failed == 2 and stats.skipped == 1
    assert stats.mean_ms == pytest.approx(1.0505)
    assert stats.p50_ms == pytest.approx(1.050)
    assert stats.p99_ms == pytest.approx(1.099)
    assert stats.max_ms == pytest.approx(1.100)


def test_transaction_end_times():
    # time_epoch and time_us say when each transaction ended; failed ones are not counted.
    lines = ["0 1 100 0 1000 500000", "0 2 100 0 1000 900000", "1 1 100 0 1001 0", "1 2 failed 0 1001 100",
             "1 3 100 0 1002 250000"]
    stats = parse_log_lines(lines)
    assert stats.ends == [1000.5, 1000.9, 1001.0, 1002.25]
    assert stats.ended_between(1000.5, 1001.0) == 2  # (start, end]
    assert stats.ended_between(0, 2000) == 4
    assert stats.ended_between(1003, 1004) == 0
    assert "ends" not in stats.as_dict()


def test_log_lines_with_retries_column():
    # --max-tries adds a retries column; latency is still the third.
    stats = parse_log_lines(["0 1 250 0 1795253591 451359 0", "0 2 750 0 1795253591 451360 1"])
    assert stats.transactions == 2 and stats.mean_ms == pytest.approx(0.5)


def test_no_logged_transactions():
    stats = parse_log_lines([])
    assert stats.transactions == 0 and stats.mean_ms is None and stats.p99_ms is None


def test_read_logs_merges_thread_files(tmp_path):
    (tmp_path / "tx.123").write_text("0 1 1000 0 1 1\n0 2 3000 0 1 2\n")
    (tmp_path / "tx.123.1").write_text("1 1 2000 0 1 1\n")
    (tmp_path / "other.123").write_text("1 1 999999 0 1 1\n")
    stats = read_logs(tmp_path / "tx")
    assert stats.transactions == 3
    assert stats.mean_ms == pytest.approx(2.0)
    assert stats.max_ms == pytest.approx(3.0)


def test_argv():
    argv = pgbench_argv("pgbench", host="127.0.0.1", port=6432, user="bench", dbname="bench", mode="prepared",
                        clients=50, threads=2, duration=5, builtin="select-only", log_prefix=Path("/x/tx"),
                        sampling_rate=0.5)
    assert argv[0] == "pgbench" and argv[-1] == "bench"
    assert ["-M", "prepared"] == argv[argv.index("-M"):argv.index("-M") + 2]
    assert ["-b", "select-only"] == argv[argv.index("-b"):argv.index("-b") + 2]
    assert "-n" in argv and "--log" in argv and "--log-prefix=/x/tx" in argv
    assert "--sampling-rate=0.5" in argv and "--failures-detailed" in argv
    old = pgbench_argv("pgbench", host="h", port=1, user="u", dbname="d", mode="simple", clients=1, threads=1,
                       duration=1, script=Path("s.sql"), failures_detailed=False)
    assert "--failures-detailed" not in old and "--log" not in old and ["-f", "s.sql"] == old[-3:-1]
