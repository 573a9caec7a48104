"""Logging setup shared by the supervisor and workers: one line per event, to stderr."""

from __future__ import annotations

import logging
import os
import sys

# Format: time, level, process role and logger, message. Journald adds its own
# timestamp, but plain terminals and files need one.
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("PGHERD_LOG_LEVEL") or os.environ.get("RUST_LOG") or "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        level = "INFO"
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
