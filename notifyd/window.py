"""
Reading a window: every row committed between the watermark and a new
snapshot, in ``seq`` order and in pages.

The first page fixes the window's end snapshot and clock (and carries the
window's read/delete events, the withdrawals of what expired since the
previous window's clock, and the unread counts delivery asked for); every
page leaves out rows already past their ``expire_at`` at that one clock. A full first
page is followed by the rest of the window through one server-side cursor,
in pages that grow up to ``_MAX_PAGE_GROWTH`` times the first. A read that
fails part-way is resumed after the last row handed over, so no row is
handed over twice. Under load the next window's first page can be asked for
before the current one is routed (:meth:`WindowReader.prefetch`). What a
window reads is changed here and in its SQL (:mod:`notifyd.db`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator, Sequence
from datetime import datetime

from .cursor import Snapshot
from .db import Database, Window

__all__ = ["WindowReader"]

# Each later page of a window is twice the size of the one before, up to this
# many times fetch_batch: fewer round trips for a large INSERT, with the rows
# held at once still bounded.
_MAX_PAGE_GROWTH = 16


def _page_sizes(first: int) -> Iterator[int]:
    size = first
    while True:
        size = min(2 * size, _MAX_PAGE_GROWTH * first)
        yield size


class WindowReader:
    """
    Reads windows for delivery, one at a time.
    """

    def __init__(self, database: Database, *, fetch_batch: int) -> None:
        self._db = database
        self._fetch_batch = fetch_batch
        # A window whose rest failed part-way: (its end, the last seq handed
        # over, its clock).
        self._unfinished: tuple[Snapshot, int, datetime | None] | None = None
        # The next window's first page, already asked for: (its base and
        # sweep start, the query).
        self._prefetch: tuple[tuple[Snapshot, datetime | None], asyncio.Future[Window]] | None = (
            None
        )
        # Whether the current window's first page came from a prefetch (it
        # then has no unread counts for users who joined since).
        self.first_prefetched = False

    @property
    def resuming(self) -> bool:
        """
        Whether the next read finishes a window an earlier read started.
        """
        return self._unfinished is not None

    @property
    def prefetching(self) -> bool:
        """
        Whether the next window's first page has been asked for.
        """
        return self._prefetch is not None

    async def pages(
        self, base: Snapshot, count_users: Sequence[str], swept_to: datetime | None = None
    ) -> AsyncGenerator[Window, None]:
        """
        The pages of the window after ``base``, with the withdrawals of what
        expired after ``swept_to``; the last one is marked
        complete. Resumes an unfinished window instead, from where it
        stopped (its first page is not given again). Use with
        :func:`contextlib.aclosing`, and take every page: a page counts as
        handed over once the next one is asked for.
        """
        if self._unfinished is None:
            prefetched = self._take_prefetch(base, swept_to)
            self.first_prefetched = prefetched is not None
            if prefetched is None:
                first = await self._db.window(
                    base, limit=self._fetch_batch, count_users=count_users, swept_to=swept_to
                )
            else:
                first = await prefetched
            yield first
            if first.complete:
                return
            # A full page: rows[-1] exists.
            end, after_seq, clock = first.end, first.rows[-1]["seq"], first.clock
            self._unfinished = (end, after_seq, clock)
        else:
            end, after_seq, clock = self._unfinished
        rest = self._db.window_rest(
            base, end, after_seq=after_seq, pages=_page_sizes(self._fetch_batch), clock=clock
        )
        async with contextlib.aclosing(rest) as pages:
            async for window in pages:
                yield window
                if window.rows:
                    self._unfinished = (end, window.rows[-1]["seq"], clock)
        self._unfinished = None

    def prefetch(self, base: Snapshot, swept_to: datetime | None = None) -> None:
        """
        Ask for the first page of the window after ``base`` (withdrawing
        what expired after ``swept_to``) now, so its round trip overlaps the
        routing of the current one.
        """
        self.drop_prefetch()
        self._prefetch = (
            (base, swept_to),
            asyncio.ensure_future(
                self._db.window(base, limit=self._fetch_batch, swept_to=swept_to)
            ),
        )

    def drop_prefetch(self) -> None:
        """
        Abandon a prefetched read (its rows are read again from the
        watermark, so nothing is lost).
        """
        if self._prefetch is not None:
            future = self._prefetch[1]
            self._prefetch = None
            future.cancel()
            future.add_done_callback(_consume)

    def _take_prefetch(
        self, base: Snapshot, swept_to: datetime | None
    ) -> asyncio.Future[Window] | None:
        """
        The prefetched read of the window starting at ``base`` and
        ``swept_to``, if any.
        """
        if self._prefetch is not None and self._prefetch[0] == (base, swept_to):
            future = self._prefetch[1]
            self._prefetch = None
            return future
        self.drop_prefetch()
        return None


def _consume(future: asyncio.Future[Window]) -> None:
    if not future.cancelled():
        future.exception()
