"""Only the optional C extension; everything else is in pyproject.toml.

pgherd.shared.wire._scan speeds up the fast path's byte scans (see shared/wire/scan.py).
optional=True: without a C compiler or Python's headers, the install goes on without it
and pgherd uses the Python scans.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("pgherd.shared.wire._scan", ["shared/wire/_scan.c"], optional=True)])
