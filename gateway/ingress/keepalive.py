"""Keepalive for the high-rate media WebSockets: ping the ones that went quiet, drop the ones
that stay quiet.

A platform that vanishes without closing TCP (a crashed host, a dead NAT) would keep its call
open until ``calls.max_call_s``. aiohttp's own heartbeat catches that, but it re-arms on every
received chunk (a ``call_soon`` and a timer update per message): about 4.5 µs a message, 30 % of
the cost of receiving a 20 ms frame (``bench/ingress_floor.py``, with and without). Media streams
are almost never quiet, so one sweep over all of them every half interval does the same job for
one counter increment a message: :class:`IdleSweep` decides, :class:`StreamKeepalive` pings and
drops. Twilio (and its cousins) and stereo PCM streams use it; AudioHook's 100 ms frames keep
aiohttp's heartbeat, whose cost there is a fifth as much and whose protocol has its own pings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import structlog

from gateway.observability.metrics import Metrics

log = structlog.get_logger("gateway.ingress.keepalive")

K = TypeVar("K", bound=Hashable)


@dataclass
class _Quiet:
    received: int  # the stream's message count at the last sweep
    sweeps: int = 0  # consecutive sweeps that saw no message
    pinged: bool = False


class IdleSweep(Generic[K]):
    """Which streams to ping and which to drop, from their message counts; sans I/O.

    Called every half heartbeat interval with every watched stream's count of messages received
    (pongs included). A stream whose count has not moved for two sweeps (one interval) is
    pinged; one still quiet at the next sweep (half an interval later, aiohttp's pong timeout)
    is dropped. Any message clears both. So a dead peer is dropped between 1.5 and 2 intervals
    after its last message; a live one is pinged at most once an interval while quiet.
    """

    def __init__(self) -> None:
        self._streams: dict[K, _Quiet] = {}

    def sweep(self, counts: Iterable[tuple[K, int]]) -> tuple[list[K], list[K]]:
        """(streams to ping, streams to drop). Streams not in ``counts`` are forgotten."""
        ping: list[K] = []
        drop: list[K] = []
        seen: dict[K, _Quiet] = {}
        for key, received in counts:
            quiet = self._streams.get(key)
            if quiet is None or quiet.received != received:
                seen[key] = _Quiet(received)
                continue
            if quiet.pinged:
                drop.append(key)  # and forgotten: the caller stops watching it
                continue
            seen[key] = quiet
            quiet.sweeps += 1
            if quiet.sweeps >= 2:
                quiet.pinged = True
                ping.append(key)
        self._streams = seen
        return ping, drop


class WatchedSocket(Protocol):
    """What the keepalive needs of a stream (ws_shell.SocketLink)."""

    received: int  # messages received so far, pongs included: bumped by the handler's loop
    dropped: str | None

    def __hash__(self) -> int: ...

    async def ping(self) -> None: ...

    def drop(self, reason: str) -> None: ...


class StreamKeepalive:
    """Owns the sweep task; handlers watch a stream for its lifetime (:meth:`watching`).

    A dropped stream has its transport aborted (the handler's receive loop then ends), one
    warning and ``stream_errors{source, reason="ping_timeout"}``. ``interval_s`` 0 turns it off.
    """

    def __init__(self, interval_s: float, metrics: Metrics) -> None:
        self.interval_s = interval_s
        self._metrics = metrics
        self._watched: dict[WatchedSocket, str] = {}
        self._sweep: IdleSweep[WatchedSocket] = IdleSweep()
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watching(self, stream: WatchedSocket, source: str) -> Iterator[None]:
        """Watch ``stream`` for the duration of the block (a handler's run)."""
        self._watched[stream] = source
        try:
            yield
        finally:
            self.unwatch(stream)

    def unwatch(self, stream: WatchedSocket) -> None:
        self._watched.pop(stream, None)

    def start(self) -> None:
        """Start sweeping (no-op when off or already running)."""
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="ws-keepalive")

    async def close(self) -> None:
        """Stop sweeping and wait for the task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s / 2)
            watched = self._watched
            ping, drop = self._sweep.sweep((s, s.received) for s in watched)
            for stream in drop:
                source = watched.get(stream)
                if source is None:
                    continue
                self._metrics.stream_errors.labels(source, "ping_timeout").inc()
                log.warning("stream.ping_timeout", source=source, interval_s=self.interval_s)
                self.unwatch(stream)
                stream.drop("ping_timeout")
            for stream in ping:
                if stream in watched:
                    await stream.ping()
