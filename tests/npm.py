"""
Packages from npm for the tests that run real JavaScript libraries
(node-postgres, Vue): installed once per set of versions into a cache
directory (``NOTIFYD_TEST_NPM_DIR``, default ``~/.cache/notifyd-tests/npm``)
and reused by later runs.

Without npm, or when the install fails (no registry), the calling test is
skipped, and fails under CI (:func:`tests.conftest.missing_tool`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from .conftest import TIMEOUT, missing_tool

__all__ = ["node_modules"]


def _cache_root() -> Path:
    configured = os.environ.get("NOTIFYD_TEST_NPM_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "notifyd-tests" / "npm"


def node_modules(*packages: str) -> Path:
    """
    The ``node_modules`` directory holding ``packages`` (npm specs such as
    ``pg@8``), installing them first if this set was never installed.
    """
    npm = shutil.which("npm")
    if npm is None:
        missing_tool("npm is not installed: apt-get install npm")
    key = hashlib.sha256(" ".join(sorted(packages)).encode()).hexdigest()[:16]
    prefix = _cache_root() / key
    prefix.mkdir(parents=True, exist_ok=True)
    done = prefix / ".installed"
    # Several test processes may ask at once: one installs, the others wait.
    with open(prefix / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(prefix),
                 *packages],
                capture_output=True, text=True, timeout=30 * TIMEOUT,
            )  # fmt: skip
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                missing_tool(f"npm install {' '.join(packages)} failed: {last}")
            done.write_text(" ".join(packages) + "\n")
    return prefix / "node_modules"
