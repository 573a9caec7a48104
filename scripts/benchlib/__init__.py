"""The benchmark harness behind scripts/bench: pgherd against PgBouncer and Postgres, in one run.

Modules: `pgbench` (running pgbench and reading its output and logs; pure parsing lives there so
it can be unit-tested), `procs` (starting services, CPU and RSS of process trees), `setup`
(Postgres, PgBouncer and pgherd for a run), `workloads` (the alternating rounds), `microbench`
(route decisions per second), `idle` (RSS per idle client), `machine` (what we ran on), `report`
(JSON, markdown, PNG) and `main` (the command line). See docs/benchmarks.md.
"""
