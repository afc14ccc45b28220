"""The STT boundary: the one interface every speech engine meets.

A session transcribes one channel. The Call sends it that channel's audio in order, already on the
call clock (sample index == call time), and reads :class:`SttEvent`s from :meth:`SttSession.events`.
Every time a session emits is integer ms on the call clock: the session adds its offset (the call
time of the first sample it was sent) before anything leaves ``gateway/stt/`` (invariant 2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from gateway.media.codec import Codec
from gateway.transcript.model import TurnUpdate


@dataclass(frozen=True, slots=True)
class SessionParams:
    """What a session is told when it opens.

    ``offset_ms`` is the call time of the first sample the session will be sent. ``partials``
    turns partial turns on or off (offline transcription does not need them).
    """

    channel: int
    codec: Codec
    sample_rate: int
    offset_ms: int = 0
    partials: bool = True
    options: dict[str, object] = field(default_factory=dict)
    call_id: str = ""  # for log lines only


@dataclass(frozen=True, slots=True)
class Watermark:
    """The session will emit no further final turn starting before ``ms`` on the call clock."""

    channel: int
    ms: int


@dataclass(frozen=True, slots=True)
class SttError:
    """The engine failed this channel for good (``fatal``) or reports a recoverable problem."""

    channel: int
    reason: str
    fatal: bool


SttEvent = TurnUpdate | Watermark | SttError


@dataclass(slots=True)
class EngineStats:
    """Counters an engine keeps for ``/metrics``, read at scrape time (plain ints: no locks on
    the audio path). Reason keys are bounded tokens (``close_1006``, ``connect_failed``, ...)."""

    session_starts: int = 0
    reconnects: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


class SttSession(Protocol):
    """One streaming recognition session for one channel.

    Contract:
      * :meth:`send` takes audio in ``params.codec`` at ``params.sample_rate``, contiguous on the
        call clock. It may wait (backpressure) but never blocks the event loop.
      * :meth:`finish` flushes: every turn still open is finalized, then the event stream ends.
        It is idempotent and must be awaited on every exit path.
      * :meth:`events` yields partial and final :class:`TurnUpdate`s (at most one final per
        turn key), :class:`Watermark`s and :class:`SttError`s, and ends after :meth:`finish` or a
        fatal error.
      * :meth:`aclose` abandons the session at once (cancellation path), releasing its resources.
    """

    params: SessionParams

    @property
    def queued_ms(self) -> int:
        """Audio sent to the session that the recognizer has not taken yet (ms): a backlog."""
        ...

    async def send(self, audio: bytes) -> None: ...

    async def finish(self) -> None: ...

    def events(self) -> AsyncIterator[SttEvent]: ...

    async def aclose(self) -> None: ...


class SttEngine(Protocol):
    """A factory of sessions that owns shared resources (models, worker pools, connections)."""

    name: str
    stats: EngineStats

    async def start(self) -> None:
        """Load models / open pools. Called once before the first session."""
        ...

    def open_session(self, params: SessionParams) -> SttSession: ...

    async def close(self) -> None:
        """Release shared resources; sessions must be finished or closed first."""
        ...

    @property
    def ready(self) -> bool: ...
