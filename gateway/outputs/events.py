"""The call event vocabulary and the per-call event log (sans-I/O).

Every output a consumer sees is a :class:`CallEvent`: ``{"seq", "call_id", "type", "time",
"data"}`` with ``seq`` counting 1, 2, 3, ... per call, without gaps, in the order the events
happened. Types and their ``data``:

=====================  =====================================================================
``call.started``       the call summary (:func:`call_summary`)
``turn.partial``       a turn (:func:`turn_data`) whose words may still change
``turn.final``         a turn's one and only final (committed to the store before it is sent)
``transcript.utterance``  the next utterance of the ordered transcript (finals released by
                       watermark, invariant 5), with ``index`` 0, 1, 2, ...
``call.updated``       new roles/participants or metadata, a hold, a new leg (the call summary)
``call.ended``         the call summary with its final state and end reason
=====================  =====================================================================

A turn is keyed by ``key`` = ``"CHANNEL:EPOCH:TURN_ORDER"``: partials of a key upsert, its final
is immutable (invariant 4); :class:`EventLog` drops a partial that arrives after the final of its
key, so no consumer can ever see one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.calls.call import Call
from gateway.transcript.model import TurnUpdate, Utterance, Word
from gateway.transcript.turn_set import TurnSet

EVENT_TYPES = (
    "call.started",
    "turn.partial",
    "turn.final",
    "transcript.utterance",
    "call.updated",
    "call.ended",
)


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One event of one call; ``seq`` is the call's own sequence number (from 1).

    :attr:`json_text` is computed once and shared by every subscriber (and every resend).
    """

    call_id: str
    seq: int
    type: str
    time: float
    data: dict[str, Any]
    _json: str | None = field(default=None, compare=False, repr=False)

    @property
    def json_text(self) -> str:
        """The event as JSON text, encoded once however many subscribers send it."""
        text = self._json
        if text is None:
            text = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))
            object.__setattr__(self, "_json", text)  # a cache, not a change of value
        return text

    def slim(self) -> CallEvent:
        """The same event holding only its JSON text (``data`` emptied but for a turn's
        ``key``): for events kept for resuming subscribers, at a fraction of the memory."""
        key = self.data.get("key")
        return CallEvent(
            self.call_id,
            self.seq,
            self.type,
            self.time,
            {} if key is None else {"key": key},
            self.json_text,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "call_id": self.call_id,
            "type": self.type,
            "time": self.time,
            "data": self.data,
        }


def turn_key(channel: int, epoch: int, turn_order: int) -> str:
    return f"{channel}:{epoch}:{turn_order}"


def _split_turn_key(key: str) -> tuple[tuple[int, int], int]:
    """``"channel:epoch:turn_order"`` as the ((channel, epoch), turn_order) of a TurnSet."""
    channel, epoch, order = key.split(":")
    return (int(channel), int(epoch)), int(order)


def _words(words: tuple[Word, ...]) -> list[dict[str, Any]]:
    return [
        {
            "text": w.text,
            "start": int(w.start),
            "end": int(w.end),
            "confidence": round(float(w.confidence), 4),
        }
        for w in words
    ]


def call_summary(call: Call) -> dict[str, Any]:
    """The call as the API and ``call.*`` events show it (no transcript)."""
    return {
        "id": call.call_id,
        "source": call.source,
        "source_ids": dict(call.source_ids),
        "state": call.state.value,
        "end_reason": call.end_reason,
        "started_at": call.started_at,
        "ended_at": call.ended_at,
        "duration_ms": call.duration_ms,
        "metadata": dict(call.metadata),
        "channels": [
            {
                "index": c.spec.index,
                "role": c.spec.role,
                "participant": c.spec.participant,
                "speaker": c.spec.participant or c.spec.role,
                "on_hold": c.on_hold,
            }
            for c in call.channels.values()
        ],
    }


def turn_data(call: Call, u: TurnUpdate) -> dict[str, Any]:
    """A partial or final turn, with the speaker and role of its channel."""
    channel = call.channels.get(u.channel)
    role = channel.spec.role if channel else f"channel{u.channel}"
    speaker = (channel.spec.participant or role) if channel else role
    return {
        "key": turn_key(u.channel, u.epoch, u.turn_order),
        "channel": u.channel,
        "epoch": u.epoch,
        "turn_order": u.turn_order,
        "speaker": speaker,
        "role": role,
        "start": int(u.start_ms),
        "end": int(u.end_ms),
        "text": u.text,
        "confidence": round(float(u.confidence), 4),
        "words": _words(u.words),
        "final": u.final,
    }


def utterance_data(index: int, u: Utterance) -> dict[str, Any]:
    return {
        "index": index,
        "channel": u.channel,
        "speaker": u.speaker,
        "role": u.role,
        "start": int(u.start),
        "end": int(u.end),
        "text": u.text,
        "confidence": round(float(u.confidence), 4),
        "words": _words(u.words),
        "turns": [turn_key(k.channel, k.epoch, k.turn_order) for k in u.turns],
    }


class EventLog:
    """One call's events in order, each with the next sequence number.

    Keeps every event (the live feeds replay from any ``seq``); ``first_seq`` > 1 when the log
    was restored from the store after a restart and starts later.
    """

    def __init__(self, call_id: str, *, next_seq: int = 1, keep_full: int = 300) -> None:
        self.call_id = call_id
        self._events: list[CallEvent] = []
        # Events older than the newest keep_full are kept as JSON text only (CallEvent.slim).
        self._keep_full = keep_full
        self._next = next_seq
        self._finals = TurnSet()
        self.dropped_partials = 0
        self.closed = False

    @property
    def last_seq(self) -> int:
        return self._next - 1

    @property
    def first_seq(self) -> int:
        return self._events[0].seq if self._events else self._next

    def __len__(self) -> int:
        return len(self._events)

    def append(
        self, type_: str, data: dict[str, Any], *, at: float | None = None
    ) -> CallEvent | None:
        """Add an event; None (nothing added) for a partial of a turn already final."""
        if type_ not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type_!r}")
        if self.closed:
            raise ValueError(f"call {self.call_id}: event log is closed")
        if type_ in ("turn.partial", "turn.final"):
            key = data["key"]
            stream, order = _split_turn_key(key)
            if self._finals.contains(stream, order):
                self.dropped_partials += type_ == "turn.partial"
                if type_ == "turn.partial":
                    return None
                raise ValueError(f"call {self.call_id}: second final for turn {key}")
            if type_ == "turn.final":
                self._finals.add(stream, order)
        event = CallEvent(self.call_id, self._next, type_, time.time() if at is None else at, data)
        self._next += 1
        self._events.append(event)
        i = len(self._events) - 1 - self._keep_full
        if i >= 0:  # the event leaving the window (each does so once, at this append)
            self._events[i] = self._events[i].slim()
        if type_ == "call.ended":
            self.closed = True
        return event

    def restore(self, event: CallEvent) -> None:
        """Re-add an event read back from the store (its ``seq`` is kept)."""
        if event.seq < self._next:
            raise ValueError(f"restored event {event.seq} is not after {self.last_seq}")
        self._events.append(event)
        self._next = event.seq + 1
        if event.type == "turn.final":
            self._finals.add(*_split_turn_key(event.data["key"]))
        if event.type == "call.ended":
            self.closed = True

    def after(self, seq: int) -> Iterator[CallEvent]:
        """Events with a sequence number greater than ``seq``, in order."""
        events = self._events
        lo, hi = 0, len(events)
        while lo < hi:  # binary search: seqs are increasing
            mid = (lo + hi) // 2
            if events[mid].seq <= seq:
                lo = mid + 1
            else:
                hi = mid
        return iter(events[lo:])

    def forget_oldest(self, keep: int) -> int:
        """Drop all but the newest ``keep`` events from memory (they are in the store);
        :attr:`first_seq` moves up. Returns how many were dropped."""
        drop = max(0, len(self._events) - keep)
        if drop:
            del self._events[:drop]
        return drop

    def compact(self, *, keep_last: int) -> int:
        """Drop partials of turns already final, except among the newest ``keep_last`` events.

        Their final carries everything they said; a client resuming from an older seq skips them.
        Returns how many were dropped.
        """
        cut = max(0, len(self._events) - keep_last)
        old = self._events[:cut]
        finals = self._finals
        kept = [
            e
            for e in old
            if not (e.type == "turn.partial" and finals.contains(*_split_turn_key(e.data["key"])))
        ]
        dropped = len(old) - len(kept)
        if dropped:
            self._events = kept + self._events[cut:]
        return dropped
