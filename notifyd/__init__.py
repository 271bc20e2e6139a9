"""
notifyd: commit-driven real-time push of a Postgres inbox table to the
addressee's WebSocket sessions.
"""

from __future__ import annotations

__version__ = "0.1.0"
