"""The normalized vocabulary every ingress adapter emits, and nothing else leaves an adapter.

Adapters translate their wire protocol (Twilio JSON, RTP, AudioHook, WAV files, ...) into these
frozen events; the :class:`~gateway.calls.call.Call` consumes them. Audio timestamps are in samples
of the channel's sample rate on the source's own media clock, shared by all channels of the call
(Twilio ``media.timestamp`` x rate, the RTP timestamp mapped onto the call, AudioHook ``position``,
the sample count of a plain stream). ``None`` means "directly after the previous frame".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.media.codec import Codec


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One channel (call leg) as the source declares it."""

    index: int
    role: str
    participant: str | None = None
    codec: Codec = Codec.L16
    sample_rate: int = 8000


@dataclass(frozen=True, slots=True)
class CallStarted:
    """A call's media is about to flow. ``source_ids`` holds the source's own identifiers."""

    source: str
    channels: tuple[ChannelSpec, ...]
    source_ids: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Audio:
    """Payload bytes for one channel, in the channel's declared codec."""

    channel: int
    payload: bytes
    timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """A declared stretch with no media on a channel (discards, comfort noise, holds)."""

    channel: int
    duration_samples: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    channel: int
    digit: str


@dataclass(frozen=True, slots=True)
class Hold:
    channel: int | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    channel: int | None = None


@dataclass(frozen=True, slots=True)
class MetadataChanged:
    """New participant/role mapping, e.g. from a SIPREC UPDATE or re-INVITE."""

    channels: tuple[ChannelSpec, ...]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChannelAdded:
    """A leg joins a running call (a SIPREC re-INVITE adding a stream for a conference or a
    transfer). ``channel.index`` is new to the call; the channel covers call time from when it
    is added (audio placed before that is late), its STT session starts there too."""

    channel: ChannelSpec
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallEnded:
    reason: str = "normal"


IngressEvent = (
    CallStarted | Audio | Gap | Dtmf | Hold | Resume | MetadataChanged | ChannelAdded | CallEnded
)
