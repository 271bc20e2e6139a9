"""
How long to wait before retrying: the one exponential backoff behind every
retry loop (reconnecting to Postgres, re-reading a window, a webhook's next
attempt, restarting a sink).
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]

# Doublings past this change nothing (any maximum is reached long before)
# and would overflow the float.
_MAX_DOUBLINGS = 60


def backoff_delay(attempt: int, *, initial: float, maximum: float, jitter: float = 1.0) -> float:
    """
    Seconds to wait before retry number ``attempt`` (1, 2, ...): ``initial``
    doubled with each attempt, at most ``maximum``; 0 for ``attempt`` below 1.

    ``jitter`` (0 to 1) is the share of that delay drawn at random: at 1,
    "full jitter", the wait is anywhere between 0 and the delay, so many
    clients cut off together do not come back together; at 0 it is exactly
    the delay.
    """
    if attempt < 1:
        return 0.0
    delay = min(maximum, initial * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))
    if jitter <= 0:
        return delay
    return delay - random.uniform(0, delay * min(jitter, 1.0))
