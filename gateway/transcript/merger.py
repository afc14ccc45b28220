"""TurnMerger: per-channel turn updates in, live deltas and audio-ordered utterances out.

Sans-I/O: feed it :class:`TurnUpdate`s and per-channel watermarks, get back output events.

Rules (DESIGN.md invariants 4 and 5):

1. A turn is keyed by (channel, epoch, turn_order). Its first final is accepted and immutable; a
   later final or partial for the same key is dropped and counted. Partials upsert.
2. Every accepted update is emitted at once as a :class:`TurnDelta` (the live view).
3. The ordered stream sorts finals by (start, end, channel) and releases a final only when every
   other channel's watermark has reached its start, so a turn that a slower channel has not
   finalized yet can still come first. :meth:`close` raises all watermarks to infinity.
4. With joining on, consecutive released finals of one channel whose gap is at most
   ``max_join_gap_ms`` become one utterance. An utterance is emitted once it can no longer grow:
   another channel's final was released after it, or its channel's watermark passed its end plus
   the gap with no pending final of that channel inside the gap.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.transcript.model import ChannelInfo, TurnKey, TurnUpdate, Utterance, Word
from gateway.transcript.turn_set import TurnSet


@dataclass(frozen=True, slots=True)
class TurnDelta:
    """An accepted partial (upsert) or final (first and only) of one turn, for live consumers."""

    update: TurnUpdate


@dataclass(frozen=True, slots=True)
class UtteranceReleased:
    """The next utterance of the ordered transcript; ``index`` counts from 0 and never repeats."""

    index: int
    utterance: Utterance


MergerOutput = TurnDelta | UtteranceReleased


@dataclass(slots=True)
class MergerStats:
    duplicate_finals: int = 0
    stale_partials: int = 0
    late_finals: int = 0


_SEP = "\x1f"  # ASCII unit separator: between packed word texts (never in recognized text)


class _ReleasedUtterances:
    """Every released utterance of a call, column by column: numbers in a few arrays, one string
    per utterance for its text and one for its words' texts. A long call keeps all of them until
    it ends, for its transcript; as objects (an Utterance, its Words and TurnKeys) they cost
    about 200 bytes a word and 300 an utterance, here about 24 and 100."""

    __slots__ = (
        "_ints",
        "_confidence",
        "_texts",
        "_words",
        "_times",
        "_word_conf",
        "_turns",
        "_speakers",
    )

    _STRIDE = 6  # channel, start, end, words end, turns end, speaker index

    def __init__(self) -> None:
        self._ints = array("q")
        self._confidence = array("d")
        self._texts: list[str] = []
        # Per utterance: its words' texts joined by _SEP, or a tuple when there are none or one
        # holds _SEP.
        self._words: list[str | tuple[str, ...]] = []
        self._times = array("q")  # start, end per word
        self._word_conf = array("d")
        self._turns = array("q")  # channel, epoch, turn_order per turn
        self._speakers: list[tuple[str, str]] = []  # (speaker, role), each distinct pair once

    def __len__(self) -> int:
        return len(self._texts)

    def append(self, u: Utterance) -> None:
        pair = (u.speaker, u.role)
        try:
            speaker = self._speakers.index(pair)  # a handful of pairs per call
        except ValueError:
            speaker = len(self._speakers)
            self._speakers.append(pair)
        texts = tuple(w.text for w in u.words)
        packed = len(texts) > 0 and not any(_SEP in t for t in texts)
        self._words.append(_SEP.join(texts) if packed else texts)
        for w in u.words:
            self._times.append(int(w.start))
            self._times.append(int(w.end))
            self._word_conf.append(w.confidence)
        for k in u.turns:
            self._turns.extend((k.channel, k.epoch, k.turn_order))
        self._ints.extend(
            (u.channel, u.start, u.end, len(self._word_conf), len(self._turns) // 3, speaker)
        )
        self._confidence.append(u.confidence)
        self._texts.append(u.text)

    def __getitem__(self, i: int) -> Utterance:
        n = self._STRIDE
        ints = self._ints
        channel, start, end, words_end, turns_end, speaker = ints[i * n : i * n + n]
        words_start = ints[i * n - 3] if i else 0
        turns_start = ints[i * n - 2] if i else 0
        packed = self._words[i]
        texts = packed.split(_SEP) if isinstance(packed, str) else packed
        times, conf = self._times, self._word_conf
        words = tuple(
            Word(text, times[2 * j], times[2 * j + 1], conf[j])
            for j, text in zip(range(words_start, words_end), texts, strict=True)
        )
        turns = self._turns
        keys = tuple(
            TurnKey(turns[3 * j], turns[3 * j + 1], turns[3 * j + 2])
            for j in range(turns_start, turns_end)
        )
        name, role = self._speakers[speaker]
        return Utterance(
            channel=channel,
            speaker=name,
            role=role,
            start=start,
            end=end,
            text=self._texts[i],
            confidence=self._confidence[i],
            words=words,
            turns=keys,
        )


@dataclass(slots=True)
class _OpenUtterance:
    channel: int
    turns: list[TurnUpdate] = field(default_factory=list)

    @property
    def end(self) -> int:
        return max(t.end_ms for t in self.turns)


class TurnMerger:
    """Merges per-channel turns into one speaker-ordered transcript (see module docstring)."""

    def __init__(
        self,
        channels: Sequence[ChannelInfo],
        *,
        join_same_speaker: bool = True,
        max_join_gap_ms: int = 1000,
    ) -> None:
        self._channels = {c.index: c for c in channels}
        self._join = join_same_speaker
        self._max_gap = max_join_gap_ms
        self._watermarks: dict[int, float] = {c.index: 0 for c in channels}
        self._finals = TurnSet()
        self._partials: dict[TurnKey, TurnUpdate] = {}
        self._pending: list[tuple[int, int, int, int, int, TurnUpdate]] = []
        self._open: _OpenUtterance | None = None
        self._released = _ReleasedUtterances()
        self._last_released_start = -1
        self._closed = False
        self.stats = MergerStats()

    # -- inputs ---------------------------------------------------------------------------------

    def update(self, u: TurnUpdate) -> list[MergerOutput]:
        """Take a partial or final; returns its delta (if accepted) and any released utterances."""
        key = u.key
        if u.channel not in self._channels:
            self._channels[u.channel] = ChannelInfo(u.channel, f"channel{u.channel}")
            self._watermarks[u.channel] = math.inf if self._closed else 0
        if self._finals.contains((u.channel, u.epoch), u.turn_order):
            if u.final:
                self.stats.duplicate_finals += 1
            else:
                self.stats.stale_partials += 1
            return []
        if not u.final:
            if self._partials.get(key) == u:
                return []
            self._partials[key] = u
            return [TurnDelta(u)]
        self._finals.add((u.channel, u.epoch), u.turn_order)
        self._partials.pop(key, None)
        out: list[MergerOutput] = [TurnDelta(u)]
        if u.text.strip() or u.words:
            heapq.heappush(
                self._pending, (u.start_ms, u.end_ms, u.channel, u.epoch, u.turn_order, u)
            )
        out.extend(self._release())
        return out

    def watermark(self, channel: int, ms: float) -> list[MergerOutput]:
        """Channel ``channel`` will emit no final starting before ``ms``; watermarks only rise."""
        if channel not in self._watermarks:
            self._channels[channel] = ChannelInfo(channel, f"channel{channel}")
            self._watermarks[channel] = 0
        if ms > self._watermarks[channel]:
            self._watermarks[channel] = ms
        return self._release()

    def close(self) -> list[MergerOutput]:
        """The call ended: every watermark goes to infinity and everything pending is released."""
        self._closed = True
        for ch in self._watermarks:
            self._watermarks[ch] = math.inf
        out = self._release()
        if self._open is not None:
            out.append(self._emit_open())
        return out

    def add_channel(self, channel: ChannelInfo, from_ms: float) -> None:
        """A channel joins mid-call; it will emit no final starting before ``from_ms``, so
        finals of the others up to there are not held back for it."""
        self._channels[channel.index] = channel
        self._watermarks[channel.index] = math.inf if self._closed else from_ms

    def set_channels(self, channels: Sequence[ChannelInfo]) -> None:
        """Role/participant changes apply to utterances released from now on."""
        for c in channels:
            self._channels[c.index] = c
            self._watermarks.setdefault(c.index, math.inf if self._closed else 0)

    # -- state ----------------------------------------------------------------------------------

    @property
    def utterances(self) -> tuple[Utterance, ...]:
        """Utterances released so far, in order (rebuilt from their packed form per call)."""
        released = self._released
        return tuple(released[i] for i in range(len(released)))

    @property
    def released_count(self) -> int:
        """How many utterances were released so far."""
        return len(self._released)

    @property
    def open_partials(self) -> tuple[TurnUpdate, ...]:
        return tuple(self._partials.values())

    # -- internals ------------------------------------------------------------------------------

    def _releasable(self, u: TurnUpdate) -> bool:
        # Strictly past: a channel whose watermark equals this start may still finalize a turn
        # starting there, which (start, end, channel) order could put first.
        return all(wm > u.start_ms for ch, wm in self._watermarks.items() if ch != u.channel)

    def _release(self) -> list[MergerOutput]:
        out: list[MergerOutput] = []
        while self._pending and self._releasable(self._pending[0][-1]):
            u = heapq.heappop(self._pending)[-1]
            if u.start_ms < self._last_released_start:
                self.stats.late_finals += 1
            self._last_released_start = max(self._last_released_start, u.start_ms)
            out.extend(self._append(u))
        if self._open is not None and self._open_is_settled():
            out.append(self._emit_open())
        return out

    def _append(self, u: TurnUpdate) -> list[MergerOutput]:
        out: list[MergerOutput] = []
        cur = self._open
        if (
            cur is not None
            and self._join
            and cur.channel == u.channel
            and u.start_ms - cur.end <= self._max_gap
        ):
            cur.turns.append(u)
            return out
        if cur is not None:
            out.append(self._emit_open())
        self._open = _OpenUtterance(u.channel, [u])
        if not self._join:
            out.append(self._emit_open())
        return out

    def _open_is_settled(self) -> bool:
        cur = self._open
        assert cur is not None
        horizon = cur.end + self._max_gap
        if self._watermarks.get(cur.channel, 0) <= horizon:
            return False
        return not any(p[-1].channel == cur.channel and p[0] <= horizon for p in self._pending)

    def _emit_open(self) -> UtteranceReleased:
        cur = self._open
        assert cur is not None
        self._open = None
        utt = self._build(cur.channel, cur.turns)
        self._released.append(utt)
        return UtteranceReleased(len(self._released) - 1, utt)

    def _build(self, channel: int, turns: list[TurnUpdate]) -> Utterance:
        info = self._channels[channel]
        words: tuple[Word, ...] = tuple(w for t in turns for w in t.words)
        if words:
            confidence = sum(w.confidence for w in words) / len(words)
        else:
            confidence = sum(t.confidence for t in turns) / len(turns)
        return Utterance(
            channel=channel,
            speaker=info.speaker,
            role=info.role,
            start=min(t.start_ms for t in turns),
            end=max(t.end_ms for t in turns),
            text=" ".join(t.text.strip() for t in turns if t.text.strip()),
            confidence=confidence,
            words=words,
            turns=tuple(t.key for t in turns),
        )
