"""
``python -m bench soak``: notifyd for a long run under churn, sampled for
growth (RSS, descriptors, asyncio tasks, event-loop lag) and counted for loss
and duplicates against the table; writes ``docs/soak.md``.

``run.py`` drives it, ``clients.py`` holds the sessions, ``trend.py`` fits
the slopes, ``report.py`` writes the page.
"""
