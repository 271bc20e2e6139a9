"""
Render ``bench/results.json`` as ``docs/performance.md``.
"""

from __future__ import annotations

from .render import render

__all__ = ["render"]
