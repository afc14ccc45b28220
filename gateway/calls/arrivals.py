"""ArrivalLog: when each stretch of a channel's call time arrived at the gateway.

It answers "when did the audio at call time *t* reach us?", which turns an STT final's
``end_ms`` into the latency users feel: from the end of speech arriving to the final turn. One
mark per ``step`` samples in a fixed ring (two flat arrays: a few KiB per channel whatever the
call's length), so only the recent past is known; older positions answer with the oldest mark.
Sans-I/O: the caller passes the times in.
"""

from __future__ import annotations

from array import array


class ArrivalLog:
    """Marks ``(position, time)`` at most once per ``step`` samples; ``capacity`` marks kept."""

    __slots__ = ("_step", "_cap", "_pos", "_time", "_count", "_next", "_latest")

    def __init__(self, step: int, capacity: int = 400) -> None:
        if step <= 0 or capacity <= 0:
            raise ValueError("step and capacity must be positive")
        self._step = step
        self._cap = capacity
        self._pos = array("q", bytes(8 * capacity))
        self._time = array("d", bytes(8 * capacity))
        self._count = 0  # marks ever written; the newest is at (count - 1) % cap
        self._next = 0  # the position at which the next mark is due
        self._latest: float | None = None  # the time of the latest mark() call

    def mark(self, position: int, now: float) -> None:
        """Audio up to sample ``position`` (exclusive) has arrived by ``now``."""
        self._latest = now
        if position < self._next:
            return
        slot = self._count % self._cap
        self._pos[slot] = position
        self._time[slot] = now
        self._count += 1
        self._next = position + self._step

    def arrival_of(self, position: int) -> float | None:
        """When the audio at sample ``position`` had arrived: the time of the first mark at or
        beyond it (at most ``step`` samples later), the oldest kept mark if ``position`` is
        older than the ring, the latest :meth:`mark` call's time if it is beyond every kept
        mark, None before the first mark."""
        count = self._count
        if count == 0:
            return self._latest
        cap = self._cap
        oldest = max(0, count - cap)
        lo, hi = oldest, count  # binary search over the mark sequence (positions increase)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._pos[mid % cap] < position:
                lo = mid + 1
            else:
                hi = mid
        if lo == count:
            return self._latest
        return self._time[lo % cap]
