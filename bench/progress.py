"""
Progress lines on stderr, each stamped with the seconds since the run began.
"""

from __future__ import annotations

import sys
import time

__all__ = ["elapsed", "progress"]

# Imported by ``python -m bench`` before it does anything else, so this is the
# run's start.
_STARTED = time.monotonic()


def elapsed() -> float:
    """
    Seconds since the run began.
    """
    return time.monotonic() - _STARTED


def progress(text: str) -> None:
    print(f"[{elapsed():7.1f}s] {text}", file=sys.stderr, flush=True)
