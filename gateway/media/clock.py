"""ChannelClock: one channel's audio placed on the call clock.

Invariant: t = 0 is the call's first media. Each channel places audio by the source's media
timestamp, never by arrival time. Gaps are filled with codec silence, late duplicates dropped and
counted, so sample index == call time on every channel.

Positions and durations are integers in samples of the channel's rate on the call clock. The
clock works on encoded bytes (any codec with a fixed sample width) and never decodes them.
"""

from __future__ import annotations

from bisect import bisect_right


class TimestampJump(ValueError):
    """A frame starts implausibly far beyond everything placed so far (a bogus timestamp)."""

    def __init__(self, start: int, frontier: int, max_jump: int) -> None:
        super().__init__(
            f"frame at sample {start} is {start - frontier} samples beyond the frontier "
            f"{frontier} (max jump {max_jump})"
        )
        self.start = start
        self.frontier = frontier
        self.max_jump = max_jump


class ChannelClock:
    """Places frames by media timestamp and releases contiguous, gap-filled audio.

    Audio at ``[released, frontier)`` is pending: frames are written into one silence-initialized
    bytearray at their place, so holes need no separate fill step. Release happens up to
    ``frontier - reorder_window`` on every push (``fill_to`` and ``flush`` release further); the
    released bytes are returned to the caller and forgotten.

    Dropped audio (``late_samples`` / ``late_frames``) is whatever a frame would have written over
    a place that is already taken: released (or before t = 0), or pending and written by an earlier
    frame (first placed wins). Both are the same event, a late copy, and which of the two it hits
    depends only on the reorder window, so they share the counters.
    """

    __slots__ = (
        "_silence",
        "_width",
        "_window",
        "_max_jump",
        "_buf",
        "_spans",
        "_released",
        "_frontier",
        "_next",
        "_late_samples",
        "_late_frames",
        "_duplicate_frames",
        "_filled_samples",
    )

    def __init__(
        self,
        silence_sample: bytes,
        *,
        reorder_window: int = 0,
        max_jump: int | None = None,
        start: int = 0,
    ) -> None:
        """``silence_sample`` is one sample of codec silence; its length is the sample width.

        ``start``: the sample the clock begins at (a leg that joins a running call); everything
        before it counts as released, so audio placed there is late.

        ``reorder_window``: samples held back behind the frontier so that frames arriving out of
        order by up to that much still land in place (adds that much latency). ``max_jump``: the
        largest gap, in samples, a frame may open beyond the frontier; None for no limit.
        """
        if not silence_sample:
            raise ValueError("silence_sample must be one sample (at least one byte)")
        if reorder_window < 0:
            raise ValueError(f"negative reorder_window: {reorder_window}")
        if max_jump is not None and max_jump < 0:
            raise ValueError(f"negative max_jump: {max_jump}")
        if start < 0:
            raise ValueError(f"negative start: {start}")
        self._silence = bytes(silence_sample)
        self._width = len(silence_sample)
        self._window = reorder_window
        self._max_jump = max_jump
        self._buf = bytearray()  # samples [released, frontier), holes hold silence
        # Sorted, disjoint, non-touching [start, end) spans of pending samples written by frames.
        # Only frames inside the reorder window are pending, so this list stays short.
        self._spans: list[list[int]] = []
        self._released = start
        self._frontier = start
        self._next = start  # where start=None places a frame: the end of the latest pushed frame
        self._late_samples = 0
        self._late_frames = 0
        self._duplicate_frames = 0
        self._filled_samples = 0

    @property
    def released(self) -> int:
        """Samples released so far: the call time this channel covers."""
        return self._released

    @property
    def frontier(self) -> int:
        """The largest end placed so far (or declared by :meth:`fill_to`)."""
        return self._frontier

    @property
    def pending(self) -> int:
        """Samples placed or opened but not yet released (``frontier - released``)."""
        return self._frontier - self._released

    @property
    def late_samples(self) -> int:
        """Samples dropped because their place was already released or already taken."""
        return self._late_samples

    @property
    def late_frames(self) -> int:
        """Frames of which at least one sample was dropped as late."""
        return self._late_frames

    @property
    def duplicate_frames(self) -> int:
        """Of :attr:`late_frames`, those that only overlapped audio still pending (a copy seen
        within the reorder window); the rest came after their place was released."""
        return self._duplicate_frames

    @property
    def filled_samples(self) -> int:
        """Samples of silence inserted into holes so far (counted when released)."""
        return self._filled_samples

    def push(self, start: int | None, payload: bytes) -> bytes:
        """Place ``payload`` at sample ``start`` and return the newly released bytes (maybe b"").

        ``start`` None places it directly after the latest pushed frame. Late and duplicate parts
        are dropped and counted. Raises ValueError (clock unchanged) for a payload that is not a
        whole number of samples, and :class:`TimestampJump` (clock unchanged) for a start more
        than ``max_jump`` beyond the frontier. An empty payload changes nothing.
        """
        width = self._width
        if len(payload) % width:
            raise ValueError(
                f"payload of {len(payload)} bytes is not a whole number of {width}-byte samples"
            )
        if start is None:
            start = self._next
        if self._max_jump is not None and start - self._frontier > self._max_jump:
            raise TimestampJump(start, self._frontier, self._max_jump)
        n = len(payload) // width
        if n == 0:
            return b""
        end = start + n
        self._next = end
        if start == self._frontier == self._released and not self._window:
            # The live path: the next frame in order with nothing held back goes straight out.
            self._frontier = self._released = end
            return payload if type(payload) is bytes else bytes(payload)
        dropped = 0
        lo = start
        if lo < self._released:  # before what is already released (or before t = 0)
            dropped = min(end, self._released) - lo
            lo = self._released
        if lo < end and lo >= self._frontier:  # the common case: in order, or after a gap
            self._buf += self._silence * (lo - self._frontier)
            self._buf += memoryview(payload)[(lo - start) * width :]
            self._frontier = end
            spans = self._spans
            if spans and spans[-1][1] == lo:
                spans[-1][1] = end
            else:
                spans.append([lo, end])
        elif lo < end:  # lands (partly) inside the pending region
            if end > self._frontier:
                self._buf += self._silence * (end - self._frontier)
                self._frontier = end
            overlap = self._write(lo, end, memoryview(payload), start)
            if overlap and not dropped:
                self._duplicate_frames += 1
            dropped += overlap
        if dropped:
            self._late_samples += dropped
            self._late_frames += 1
        return self._release(self._frontier - self._window)

    def fill_to(self, t: int) -> bytes:
        """Declare that no more media comes before ``t``; release everything up to ``t``.

        The frontier moves to at least ``t``, holes are filled with silence, and a later
        ``push(None, ...)`` lands no earlier than ``t``. Audio pending beyond ``t`` stays within
        the reorder window. Returns the released bytes.
        """
        if t > self._frontier:
            self._buf += self._silence * (t - self._frontier)
            self._frontier = t
        self._next = max(self._next, t)
        return self._release(max(t, self._frontier - self._window))

    def flush(self) -> bytes:
        """Release everything pending (up to the frontier), holes filled with silence."""
        return self._release(self._frontier)

    def _write(self, lo: int, hi: int, payload: memoryview, start: int) -> int:
        """Write the parts of ``[lo, hi)`` not yet taken from ``payload`` (placed at ``start``).

        Returns the number of samples skipped because an earlier frame already wrote them.
        """
        width, base, spans = self._width, self._released, self._spans
        # Spans that overlap or touch [lo, hi) are merged with it into one span.
        i = bisect_right(spans, [lo, lo]) - 1
        if i < 0 or spans[i][1] < lo:
            i += 1
        j = i
        skipped = 0
        pos = lo
        while j < len(spans) and spans[j][0] <= hi:
            s, e = spans[j]
            if pos < s:
                self._buf[(pos - base) * width : (s - base) * width] = payload[
                    (pos - start) * width : (s - start) * width
                ]
            skipped += max(0, min(e, hi) - max(s, pos))
            pos = max(pos, e)
            j += 1
        if pos < hi:
            self._buf[(pos - base) * width : (hi - base) * width] = payload[
                (pos - start) * width : (hi - start) * width
            ]
        if j > i:
            lo, hi = min(lo, spans[i][0]), max(hi, spans[j - 1][1])
        spans[i:j] = [[lo, hi]]
        return skipped

    def _release(self, cut: int) -> bytes:
        """Release ``[released, cut)`` (cut is capped at the frontier) and return its bytes."""
        cut = min(cut, self._frontier)
        if cut <= self._released:
            return b""
        count = cut - self._released
        written = 0
        spans = self._spans
        k = 0
        while k < len(spans) and spans[k][0] < cut:
            s, e = spans[k]
            if e <= cut:
                written += e - s
                k += 1
            else:  # a span straddling the cut keeps its unreleased part
                written += cut - s
                spans[k][0] = cut
                break
        del spans[:k]
        self._filled_samples += count - written
        nbytes = count * self._width
        out = bytes(self._buf[:nbytes])
        del self._buf[:nbytes]  # CPython trims a bytearray's head in O(1)
        self._released = cut
        return out
