"""The transcript vocabulary: words, turns and utterances on the call clock.

Every time here is integer milliseconds on the call clock (t = 0 is the call's first media sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Word:
    """One recognized word with its span on the call clock."""

    text: str
    start: int
    end: int
    confidence: float = 1.0


@dataclass(frozen=True, slots=True)
class TurnKey:
    """Identity of one turn: partials of a turn share it, and its final is unique.

    ``epoch`` counts STT sessions of a channel (a reconnect starts a new epoch); ``turn_order`` is
    the session's own turn counter.
    """

    channel: int
    epoch: int
    turn_order: int


@dataclass(frozen=True, slots=True)
class TurnUpdate:
    """A partial or final hypothesis for one turn of one channel, on the call clock."""

    channel: int
    epoch: int
    turn_order: int
    words: tuple[Word, ...]
    text: str
    start_ms: int
    end_ms: int
    final: bool
    confidence: float
    speaker: str | None = None

    @property
    def key(self) -> TurnKey:
        return TurnKey(self.channel, self.epoch, self.turn_order)


class Role(StrEnum):
    """Well-known channel roles; any other string is allowed as a role too."""

    CUSTOMER = "customer"
    AGENT = "agent"


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """Who is on a channel. ``role`` is data (invariant 6): customer, agent, or anything else."""

    index: int
    role: str
    participant: str | None = None

    @property
    def speaker(self) -> str:
        """The label shown for this channel: the participant's name if known, else the role."""
        return self.participant or self.role


@dataclass(frozen=True, slots=True)
class Utterance:
    """One or more consecutive final turns of one channel, as released in audio order."""

    channel: int
    speaker: str
    role: str
    start: int
    end: int
    text: str
    confidence: float
    words: tuple[Word, ...]
    turns: tuple[TurnKey, ...]


@dataclass(frozen=True, slots=True)
class Transcript:
    """A call transcript: channel descriptions and utterances sorted by (start, end, channel)."""

    call_id: str
    channels: tuple[ChannelInfo, ...]
    utterances: tuple[Utterance, ...]
    duration_ms: int
    metadata: dict[str, str] = field(default_factory=dict)
