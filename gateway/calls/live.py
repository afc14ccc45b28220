"""LiveCall: a Call fed by one or more live streams over its lifetime.

A telephony platform may move a call to a new stream (a TwiML redirect opens a new WebSocket with
a new stream id and timestamps that restart at 0). The LiveCall keeps the Call going across
those: when its last stream goes away it waits ``grace_s`` for a continuation before it ends the
call; a stream that continues it is placed on the call clock after the audio already received
(or at the wall-clock time elapsed since the call's first media, whichever is later, so audio
lost during the reconnect becomes silence instead of pulling the two streams together).

A continuation may arrive while the stream it replaces still looks attached (a reconnect after
a network blip, before the old TCP connection is known dead; a redirect whose new stream starts
before the old one stops). The newest stream wins: an attached stream feeding any of the same
channels is replaced -- its placement marked ``replaced`` (its handler drops what it still
sends) and its socket closed with reason ``replaced`` -- so two streams never feed one channel.

Lifecycle::

    LIVE --last stream gone--> LINGERING --grace over--> ENDING --> FINISHED
      ^--------- stream continues ---------'
    any --end()/max duration/shutdown--> ENDING
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from gateway.calls.call import Call, CallState
from gateway.ingress.events import Audio, CallStarted
from gateway.media.codec import Codec
from gateway.observability.logging import get_logger

log = get_logger("gateway.live")


class StreamLink(Protocol):
    """What a LiveCall needs of a stream handler: a way to close its socket."""

    async def close(self, code: int, reason: str) -> None: ...


class LiveState(Enum):
    LIVE = "live"
    LINGERING = "lingering"
    ENDING = "ending"
    FINISHED = "finished"


class ContinuationError(ValueError):
    """A second stream for a call that cannot continue it (different codec, unknown track)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class StreamPlacement:
    """Maps one stream's channels and media clock onto its call (sans-I/O).

    ``channel_map`` takes the stream's channel index to the call's. ``base`` (samples, added to
    every timestamp) is fixed at the stream's first audio frame: 0 for the stream that started
    the call.
    """

    channel_map: dict[int, int]
    continuation: bool
    base: int | None = None
    # A newer stream took over this one's channels: drop whatever it still sends.
    replaced: bool = False

    def place(self, event: Audio, base_for: Callable[[], int]) -> Audio:
        channel = self.channel_map[event.channel]
        if not self.continuation:
            if channel == event.channel:
                return event
            return Audio(channel, event.payload, event.timestamp)
        if self.base is None:
            self.base = base_for()
        ts = None if event.timestamp is None else event.timestamp + self.base
        return Audio(channel, event.payload, ts)


Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class LiveCall:
    """See module docstring. ``on_finished`` runs once, after the Call has ENDED or FAILED."""

    def __init__(
        self,
        call: Call,
        *,
        source: str,
        key: str | None,
        grace_s: float,
        max_call_s: float,
        spawn: Spawn,
        on_finished: Callable[[LiveCall], Awaitable[None]],
    ) -> None:
        self.call = call
        self.source = source
        self.key = key
        self.state = LiveState.LIVE
        self.streams_seen = 0
        self.first_media_at: float | None = None
        # Set once the finished call's audio was added to the metrics' totals, so a scrape
        # between then and the registry forgetting it does not count it twice.
        self.accounted = False
        self._grace_s = grace_s
        self._spawn = spawn
        self._on_finished = on_finished
        self._streams: dict[StreamLink, StreamPlacement] = {}
        self._replaced: set[StreamLink] = set()  # replaced, their handlers not yet detached
        self._tracks: tuple[str, ...] = ()
        self._rate = 8000
        self._codec: Codec | None = None
        self._linger: asyncio.Task[None] | None = None
        self._ender: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        self._deadline = spawn(self._expire(max_call_s), f"live-{call.call_id}-deadline")

    @property
    def call_id(self) -> str:
        return self.call.call_id

    @property
    def accepting(self) -> bool:
        """Whether a new stream may still join this call."""
        return self.state in (LiveState.LIVE, LiveState.LINGERING)

    # -- streams ---------------------------------------------------------------------------------

    async def start(self, started: CallStarted, stream: StreamLink) -> StreamPlacement:
        """Start the Call with the first stream's CallStarted."""
        await self.call.handle(started)
        self._tracks = tuple(t for t in started.metadata.get("tracks", "").split(",") if t)
        if started.channels:
            self._rate = started.channels[0].sample_rate
            self._codec = started.channels[0].codec
        placement = StreamPlacement({c.index: c.index for c in started.channels}, False)
        self._attach(stream, placement)
        return placement

    def continue_with(self, started: CallStarted, stream: StreamLink) -> StreamPlacement:
        """Attach a stream that continues this call. Raises ContinuationError if it cannot."""
        if not self.accepting:
            raise ContinuationError("call_ended", "the call this stream belongs to has ended")
        mapping: dict[int, int] = {}
        tracks = [t for t in started.metadata.get("tracks", "").split(",") if t]
        for spec, track in zip(started.channels, tracks, strict=False):
            if spec.codec != self._codec or spec.sample_rate != self._rate:
                raise ContinuationError(
                    "format_changed",
                    f"continuation stream is {spec.codec.value}/{spec.sample_rate} Hz, the call "
                    f"is {self._codec.value if self._codec else '?'}/{self._rate} Hz",
                )
            if track not in self._tracks:
                raise ContinuationError(
                    "track_mismatch",
                    f"continuation stream has track {track!r}; the call has "
                    f"{', '.join(self._tracks) or 'none'}",
                )
            mapping[spec.index] = self._tracks.index(track)
        placement = StreamPlacement(mapping, continuation=True)
        self._replace_overlapping(set(mapping.values()))
        self._attach(stream, placement)
        return placement

    def continuation_base(self, now: float) -> int:
        """Timestamp base (samples) for a continuing stream's first frame arriving at ``now``."""
        frontier = self.call.frontier_ms
        if self.first_media_at is not None:
            frontier = max(frontier, int((now - self.first_media_at) * 1000))
        return self.call.source_timestamp(frontier, self._rate)

    def stream_origin_ms(self, placement: StreamPlacement) -> int | None:
        """Call-clock ms where a stream's own timestamp 0 lands: 0 for the stream that started
        the call, None for a continuation whose first audio has not come yet."""
        if not placement.continuation:
            return 0
        if placement.base is None:
            return None
        origin = self.call.source_timestamp(0, self._rate)
        return max(0, (placement.base - origin) * 1000 // self._rate)

    def _replace_overlapping(self, channels: set[int]) -> None:
        for old, placement in list(self._streams.items()):
            if channels.isdisjoint(placement.channel_map.values()):
                continue  # e.g. a Twilio stream per track: both feed the call
            placement.replaced = True
            del self._streams[old]
            self._replaced.add(old)
            log.info("stream.replaced", call_id=self.call_id, source=self.source)
            self._spawn(self._close_replaced(old), f"live-{self.call_id}-replaced")

    async def _close_replaced(self, stream: StreamLink) -> None:
        with contextlib.suppress(Exception):
            await stream.close(1000, "replaced")

    def _attach(self, stream: StreamLink, placement: StreamPlacement) -> None:
        self._streams[stream] = placement
        self.streams_seen += 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self.state = LiveState.LIVE

    def detach(self, stream: StreamLink, reason: str) -> None:
        """The stream is gone; with no stream left, end the call after the grace period."""
        if stream in self._replaced:
            self._replaced.discard(stream)
            return  # a newer stream took over: it keeps the call
        self._streams.pop(stream, None)
        if self._streams or not self.accepting:
            return
        if self._grace_s <= 0:
            self.end_soon(reason)
            return
        self.state = LiveState.LINGERING
        self._linger = self._spawn(self._linger_then_end(reason), f"live-{self.call_id}-linger")

    async def _linger_then_end(self, reason: str) -> None:
        await asyncio.sleep(self._grace_s)
        self._linger = None
        await self.end(reason)

    async def _expire(self, max_call_s: float) -> None:
        await asyncio.sleep(max_call_s)
        log.warning("call.max_duration", call_id=self.call_id, max_call_s=max_call_s)
        await self.end("max_duration", code=1000)

    # -- ending ----------------------------------------------------------------------------------

    def end_soon(self, reason: str, *, code: int = 1000) -> None:
        """Start ending the call in an owned task (no-op if already ending)."""
        if self._ender is None and self.state is not LiveState.FINISHED:
            self._ender = self._spawn(self.end(reason, code=code), f"live-{self.call_id}-end")

    async def end(self, reason: str, *, code: int = 1000) -> None:
        """End the call: close its streams, flush the Call (STT Terminate + drain), finish.

        Idempotent; a second caller waits for the first to finish.
        """
        if self.state in (LiveState.ENDING, LiveState.FINISHED):
            await self.finished.wait()
            return
        self.state = LiveState.ENDING
        current = asyncio.current_task()
        for task in (self._linger, self._deadline):
            if task is not None and task is not current:
                task.cancel()
        streams = list(self._streams)
        self._streams.clear()
        for stream in streams:
            with contextlib.suppress(Exception):
                await stream.close(code, reason)
        try:
            if self.call.state in (CallState.NEW,):
                await self.call.abort(reason)
            else:
                await self.call.end(reason)
        except Exception as exc:  # noqa: BLE001 - the call is FAILED; outputs still run
            log.error("call.end_failed", call_id=self.call_id, error=repr(exc))
        finally:
            self.state = LiveState.FINISHED
            try:
                await self._on_finished(self)
            finally:
                self.finished.set()
