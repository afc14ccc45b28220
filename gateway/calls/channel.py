"""Channel: one call leg's clock and STT session.

Audio is placed on the call clock by its media timestamp (invariant 1) and whatever the clock
releases, contiguous and gap-filled, goes to the channel's STT session in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.calls.arrivals import ArrivalLog
from gateway.ingress.events import ChannelSpec
from gateway.media.clock import ChannelClock
from gateway.media.codec import silence
from gateway.stt.session import SttSession
from gateway.transcript.model import ChannelInfo


def channel_info(spec: ChannelSpec) -> ChannelInfo:
    return ChannelInfo(spec.index, spec.role, spec.participant)


class Channel:
    """A leg of a call. ``sent`` is the call time covered, in samples: ``start`` (where a leg that
    joined a running call begins) plus the samples handed to the session."""

    def __init__(
        self,
        spec: ChannelSpec,
        session: SttSession,
        *,
        reorder_window: int = 0,
        max_jump: int | None = None,
        start: int = 0,
    ) -> None:
        self.spec = spec
        self.session = session
        self.clock = ChannelClock(
            silence(spec.codec, 1), reorder_window=reorder_window, max_jump=max_jump, start=start
        )
        self.start = start
        self.sent = start
        self._width = spec.codec.sample_width
        # When each 50 ms of call time arrived: STT latency = final's time - its end's arrival.
        self.arrivals = ArrivalLog(spec.sample_rate // 20)
        self.failed: str | None = None
        self.on_hold = False  # the source says this leg is on hold (SIPREC, AudioHook)
        # Sees every released byte, in call-clock order (recording); set by the Call.
        self.tap: Callable[[int, bytes], None] | None = None

    async def push(self, start: int | None, payload: bytes) -> None:
        clock = self.clock
        released = clock.push(start, payload)
        if released:  # _send inlined: this runs for every frame
            self.sent += len(released) // self._width
            if self.tap is not None:
                self.tap(self.spec.index, released)
            if self.failed is None:
                await self.session.send(released)
        self.arrivals.mark(clock.frontier, time.monotonic())

    async def fill_to(self, t: int) -> None:
        await self._send(self.clock.fill_to(t))
        await self._send(self.clock.flush())

    async def _send(self, released: bytes) -> None:
        if released:
            self.sent += len(released) // self._width
            if self.tap is not None:
                self.tap(self.spec.index, released)
            if self.failed is None:
                await self.session.send(released)

    @property
    def duration_ms(self) -> int:
        return self.sent * 1000 // self.spec.sample_rate

    @property
    def received_samples(self) -> int:
        """Samples released to the session that came from the source (not gap fill)."""
        return self.sent - self.start - self.clock.filled_samples

    @property
    def filled_ms(self) -> int:
        return self.clock.filled_samples * 1000 // self.spec.sample_rate
