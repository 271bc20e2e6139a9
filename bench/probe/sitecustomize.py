"""
A measurement probe for the servers under test, loaded through
``PYTHONPATH=bench/probe`` when ``BENCH_GC_LOG`` names a file.

It appends one line per garbage-collector pass of generation 2, or of any
generation that took more than 5 ms: ``<unix time at the end> <generation>
<milliseconds>``. It only observes (``gc.callbacks``); what the collector
does is unchanged.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

_PATH = os.environ.get("BENCH_GC_LOG")
_SLOW_S = 0.005

if _PATH:
    _log = open(_PATH, "a", buffering=1)
    _started = [0.0]

    def _observe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        took = time.perf_counter() - _started[0]
        if info["generation"] == 2 or took > _SLOW_S:
            _log.write(f"{time.time():.3f} {info['generation']} {took * 1000:.1f}\n")

    gc.callbacks.append(_observe)
