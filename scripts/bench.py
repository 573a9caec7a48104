"""Benchmark pgherd against PgBouncer and a direct Postgres connection (run through scripts/bench).

The harness lives in scripts/benchlib/; docs/benchmarks.md says what it measures and how to read it.
"""

from __future__ import annotations

import sys

from benchlib.main import main

if __name__ == "__main__":
    sys.exit(main())
