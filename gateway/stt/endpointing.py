"""TurnSegmenter: voice-activity probabilities in, turn boundaries out.

Sans-I/O state machine for the embedded engine's endpointing. It mirrors AssemblyAI's turn rules:
after ``min_turn_silence`` of silence a turn *may* end (the shell asks the recognizer whether the
words so far end a sentence), after ``max_turn_silence`` it ends regardless. Long monologues are
split at the quietest recent window once a turn reaches ``max_turn``.

Positions are sample indexes of the session's audio (at ``sample_rate``), counted from 0.

States and transitions::

    IDLE --p>=threshold--> SPEAKING --p<neg_threshold--> TRAILING --p>=threshold--> SPEAKING
    TRAILING --silence>=min_turn_silence--> (EndCandidate) --end_turn()--> IDLE
    TRAILING --silence>=max_turn_silence--> (TurnClosed) --> IDLE
    SPEAKING --length>=max_turn--> (TurnClosed, TurnOpened) --> SPEAKING

An :class:`EndCandidate` pauses the machine: it is always the last event :meth:`feed` returns, and
probabilities fed afterwards are queued until the shell decides with :meth:`end_turn` or
:meth:`keep_turn` and calls :meth:`feed` again. So the decision depends only on the audio, never
on how fast audio arrived while the recognizer was thinking.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class SegmenterState(Enum):
    IDLE = "idle"
    SPEAKING = "speaking"
    TRAILING = "trailing"


@dataclass(frozen=True, slots=True)
class TurnOpened:
    """Speech began; the turn's audio starts at ``start`` (onset minus padding)."""

    start: int


@dataclass(frozen=True, slots=True)
class PartialDue:
    """Enough new speech has accumulated for a partial hypothesis of ``[start, end)``."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class EndCandidate:
    """``min_turn_silence`` reached: the turn ``[start, end)`` may end if its words are complete.

    The shell answers with :meth:`TurnSegmenter.end_turn` or :meth:`TurnSegmenter.keep_turn`;
    after keeping, resumed speech gives a :class:`TurnResumed` and silence reaching
    ``max_turn_silence`` a :class:`TurnClosed`.
    """

    start: int
    end: int
    regions: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class TurnResumed:
    """Speech resumed after an :class:`EndCandidate`: any result computed for it is stale."""

    start: int


@dataclass(frozen=True, slots=True)
class TurnClosed:
    """The turn ``[start, end)`` is over (``reason``: max_silence, max_turn, flush)."""

    start: int
    end: int
    reason: str
    regions: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class TurnDropped:
    """A blip shorter than ``min_speech`` was discarded without recognition."""

    start: int
    end: int


SegmenterEvent = TurnOpened | PartialDue | EndCandidate | TurnResumed | TurnClosed | TurnDropped


@dataclass(slots=True)
class _Turn:
    start: int
    speech_samples: int = 0
    last_speech_end: int = 0
    last_partial_end: int = 0
    candidate: bool = False
    regions: list[list[int]] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)


class TurnSegmenter:
    """Endpointing over per-window speech probabilities (see module docstring)."""

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        window: int = 512,
        threshold: float = 0.5,
        neg_threshold: float | None = None,
        min_speech_ms: int = 120,
        pad_ms: int = 200,
        min_turn_silence_ms: int = 400,
        max_turn_silence_ms: int = 1280,
        max_turn_ms: int = 20000,
        partial_interval_ms: int | None = 1000,
    ) -> None:
        if not 0 < threshold < 1:
            raise ValueError("threshold must be in (0, 1)")
        if max_turn_silence_ms < min_turn_silence_ms:
            raise ValueError("max_turn_silence must be >= min_turn_silence")
        ms = sample_rate // 1000
        self.sample_rate = sample_rate
        self.window = window
        self._threshold = threshold
        self._neg = neg_threshold if neg_threshold is not None else max(threshold - 0.15, 0.01)
        self._min_speech = min_speech_ms * ms
        self.pad = pad_ms * ms
        self._min_silence = min_turn_silence_ms * ms
        self._max_silence = max_turn_silence_ms * ms
        self._max_turn = max_turn_ms * ms
        self._partial_every = partial_interval_ms * ms if partial_interval_ms else None
        self.state = SegmenterState.IDLE
        self.position = 0
        self._turn: _Turn | None = None
        self._floor = 0  # a new turn's audio never starts before the previous turn's end
        self._queue: deque[float] = deque()
        self._deciding = False

    # -- queries --------------------------------------------------------------------------------

    @property
    def watermark(self) -> int:
        """No turn closed from now on starts before this position."""
        if self._turn is not None:
            return self._turn.start
        return max(self._floor, self.position - self.pad - self.window)

    @property
    def turn_start(self) -> int | None:
        return self._turn.start if self._turn else None

    # -- inputs ---------------------------------------------------------------------------------

    @property
    def deciding(self) -> bool:
        """An :class:`EndCandidate` awaits :meth:`end_turn` or :meth:`keep_turn`."""
        return self._deciding

    @property
    def pending(self) -> int:
        """Windows queued while a decision is awaited."""
        return len(self._queue)

    def feed(self, probs: Iterable[float]) -> list[SegmenterEvent]:
        """Queue one probability per window and process until done or a decision is needed."""
        self._queue.extend(float(p) for p in probs)
        out: list[SegmenterEvent] = []
        while self._queue and not self._deciding:
            p = self._queue.popleft()
            start = self.position
            self.position += self.window
            events = self._step(p, start, self.position)
            out.extend(events)
            if events and isinstance(events[-1], EndCandidate):
                self._deciding = True
        return out

    def end_turn(self) -> TurnClosed:
        """Accept the pending :class:`EndCandidate`: the turn is closed."""
        turn = self._turn
        if not self._deciding or turn is None:
            raise RuntimeError("end_turn() without a pending end candidate")
        self._deciding = False
        return self._close(turn, "end_of_turn")

    def keep_turn(self) -> None:
        """Decline the pending :class:`EndCandidate`: the turn stays open."""
        if not self._deciding:
            raise RuntimeError("keep_turn() without a pending end candidate")
        self._deciding = False

    def set_silences(
        self, min_turn_silence_ms: int | None, max_turn_silence_ms: int | None
    ) -> None:
        """Change the turn-ending silences for audio fed from now on (UpdateConfiguration)."""
        ms = self.sample_rate // 1000
        low = self._min_silence if min_turn_silence_ms is None else min_turn_silence_ms * ms
        high = self._max_silence if max_turn_silence_ms is None else max_turn_silence_ms * ms
        if high < low:
            raise ValueError("max_turn_silence must be >= min_turn_silence")
        self._min_silence, self._max_silence = low, high

    def force_close(self) -> TurnClosed | None:
        """End the open turn now (ForceEndpoint); None when no turn is open or a decision pends."""
        turn = self._turn
        if turn is None or self._deciding or self._queue:
            return None
        return self._close(turn, "forced")

    def flush(self) -> list[SegmenterEvent]:
        """End of audio: close (or drop) the open turn. Queued windows must be fed first."""
        if self._deciding or self._queue:
            raise RuntimeError("flush() while a decision is pending")
        turn = self._turn
        if turn is None:
            return []
        if turn.speech_samples < self._min_speech:
            self._turn = None
            self.state = SegmenterState.IDLE
            return [TurnDropped(turn.start, turn.last_speech_end)]
        return [self._close(turn, "flush")]

    # -- internals ------------------------------------------------------------------------------

    def _step(self, p: float, start: int, end: int) -> list[SegmenterEvent]:
        out: list[SegmenterEvent] = []
        turn = self._turn
        if self.state is SegmenterState.IDLE:
            if p >= self._threshold:
                turn = _Turn(start=max(self._floor, start - self.pad))
                turn.last_partial_end = start
                self._turn = turn
                self.state = SegmenterState.SPEAKING
                self._speech(turn, p, start, end)
                out.append(TurnOpened(turn.start))
            return out
        assert turn is not None
        turn.probs.append(p)
        if self.state is SegmenterState.SPEAKING:
            if p >= self._neg:
                self._speech(turn, p, start, end)
                out.extend(self._maybe_partial(turn))
                if end - turn.start >= self._max_turn:
                    out.extend(self._split(turn))
            else:
                self.state = SegmenterState.TRAILING
            return out
        # TRAILING
        if p >= self._threshold:
            self.state = SegmenterState.SPEAKING
            if turn.candidate:
                turn.candidate = False
                out.append(TurnResumed(turn.start))
            self._speech(turn, p, start, end)
            return out
        silence = end - turn.last_speech_end
        if turn.speech_samples < self._min_speech and silence >= self._min_silence:
            self._turn = None
            self.state = SegmenterState.IDLE
            self._floor = max(self._floor, turn.start)
            out.append(TurnDropped(turn.start, turn.last_speech_end))
        elif silence >= self._max_silence:
            out.append(self._close(turn, "max_silence"))
        elif silence >= self._min_silence and not turn.candidate:
            turn.candidate = True
            out.append(EndCandidate(turn.start, self._audio_end(turn), self._regions(turn)))
        return out

    def _speech(self, turn: _Turn, p: float, start: int, end: int) -> None:
        del p
        turn.speech_samples += end - start
        if turn.regions and turn.regions[-1][1] >= start:
            turn.regions[-1][1] = end
        else:
            turn.regions.append([start, end])
        turn.last_speech_end = end

    def _maybe_partial(self, turn: _Turn) -> list[SegmenterEvent]:
        every = self._partial_every
        if every is None or turn.last_speech_end - turn.last_partial_end < every:
            return []
        turn.last_partial_end = turn.last_speech_end
        return [PartialDue(turn.start, turn.last_speech_end)]

    def _audio_end(self, turn: _Turn) -> int:
        return min(self.position, turn.last_speech_end + self.pad)

    def _close(self, turn: _Turn, reason: str) -> TurnClosed:
        end = self._audio_end(turn)
        self._turn = None
        self.state = SegmenterState.IDLE
        self._floor = max(self._floor, end)
        return TurnClosed(turn.start, end, reason, self._regions(turn))

    @staticmethod
    def _regions(turn: _Turn) -> tuple[tuple[int, int], ...]:
        return tuple((a, b) for a, b in turn.regions)

    def _split(self, turn: _Turn) -> list[SegmenterEvent]:
        # Split at the quietest window of the last 3 s, so a word is rarely cut in two.
        look = min(len(turn.probs), max(1, (3 * self.sample_rate) // self.window))
        recent = turn.probs[-look:]
        quietest = min(range(len(recent)), key=lambda i: recent[i])
        cut = self.position - (len(recent) - quietest) * self.window
        cut = max(cut, turn.start + self.window)
        turn.regions = [[a, min(b, cut)] for a, b in turn.regions if a < cut]
        closed = TurnClosed(turn.start, cut, "max_turn", self._regions(turn))
        self._floor = max(self._floor, cut)
        nxt = _Turn(start=cut, last_partial_end=cut)
        nxt.speech_samples = max(0, self.position - cut)
        nxt.last_speech_end = self.position
        nxt.regions = [[cut, self.position]]
        self._turn = nxt
        return [closed, TurnOpened(cut)]
