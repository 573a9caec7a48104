"""`python -m pgherd.worker`: one worker process, started by the supervisor."""

from __future__ import annotations

import argparse
import sys

from .main import run_worker_process


def main() -> int:
    p = argparse.ArgumentParser(prog="pgherd-worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--bus", required=True, help="the supervisor's private runtime directory")
    args = p.parse_args()
    return run_worker_process(args.index, args.bus)


if __name__ == "__main__":
    sys.exit(main())
