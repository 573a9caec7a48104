"""The `pgherd` command line (PgDog's flags): run or check a configuration."""

from __future__ import annotations

import argparse
import logging
import sys

from pgherd import __version__

log = logging.getLogger("pgherd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgherd",
        description="PostgreSQL pooler, load balancer and sharder (PgDog-compatible configuration).")
    p.add_argument("-c", "--config", default=None, metavar="FILE",
                   help="pgherd.toml (default: ./pgherd.toml; a pgdog.toml works too)")
    p.add_argument("-u", "--users", default=None, metavar="FILE",
                   help="users.toml (default: ./users.toml)")
    p.add_argument("-d", "--database-url", action="append", default=[], metavar="URL",
                   help="postgres://user:pass@host:port/db; replaces [[databases]] and adds the user "
                        "(repeatable)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="number of worker processes (default: general.workers, i.e. CPU cores)")
    p.add_argument("--version", action="version", version=f"pgherd {__version__}")
    p.add_argument("command", nargs="?", choices=["run", "check"], default="run",
                   help="run (default) serves clients; check validates the files and prints them")
    return p


def load(args):
    from pgherd.config import load_config

    env = None
    if args.workers is not None:
        import os
        env = dict(os.environ, PGHERD_WORKERS=str(args.workers))
    return load_config(args.config, args.users, args.database_url, env=env)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pgherd.config import ConfigError, describe
    from pgherd.shared.logs import setup_logging

    setup_logging()
    try:
        config = load(args)
    except ConfigError as exc:
        print(f"pgherd: configuration is invalid ({len(exc.errors)} error(s)):", file=sys.stderr)
        for err in exc.errors:
            print(f"  - {err}", file=sys.stderr)
        return 2
    setup_logging(config.general.log_level)
    if args.command == "check":
        print(describe(config))
        print("configuration OK")
        return 0
    for key in config.unsupported_keys():
        log.warning("config key %s is accepted but not supported yet; it has no effect", key)
    from .main import run_supervisor

    try:
        return run_supervisor(config, lambda: load(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
