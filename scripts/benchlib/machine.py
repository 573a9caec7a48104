"""What the bench ran on: CPU, memory, kernel, and the versions of everything measured."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import psutil


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_revision(repo: Path) -> str | None:
    """The checked-out commit, read from .git without running git (None if not a checkout)."""
    git = repo / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        path = git / ref
        if path.exists():
            return path.read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def describe(versions: dict[str, str | None], repo: Path, load_at_start: tuple[float, ...] | None = None) -> dict:
    vm = psutil.virtual_memory()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model(),
        "memory_gb": round(vm.total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in (load_at_start or os.getloadavg())],
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "pgherd": _dist("pgherd"),
        "pgherd_revision": source_revision(repo),
        "trio": _dist("trio"),
        "pglast": _dist("pglast"),
        "psutil": _dist("psutil"),
        **versions,
    }
