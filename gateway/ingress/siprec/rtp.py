"""RTP for recorded streams: packet parsing, a per-stream jitter buffer, and channel events.

Three layers, all sans-I/O (the caller passes every datagram and its arrival time, in seconds
on any monotonic clock; nothing here reads a clock):

- :func:`parse_rtp` / :func:`is_rtcp` / :func:`parse_telephone_event`: RFC 3550 headers (CSRCs,
  header extension, padding), RTCP demultiplexing (RFC 5761) and RFC 4733 events.
- :class:`JitterBuffer`: one per stream. Reorders within a small window, drops duplicates and
  late packets, extends 16-bit sequence numbers and 32-bit timestamps across wraps, and places
  every packet at a **position**: samples on the stream's timeline, the one timeline all streams
  of a call share (a :class:`MediaEpoch`: position 0 is the arrival of the call's first packet).
  Within one SSRC, positions follow RTP timestamps exactly. The first packet of an SSRC (a new
  stream, an SSRC change, a sequence restart, or timestamps that drifted from arrival time by
  more than ``resync_s``) is anchored by its arrival time: RTP timestamps of different SSRCs are
  unrelated, so arrival is the only common reference (reference notes 5.5). An anchor never
  lands before audio already placed, and snaps onto the end of it when within ``snap_s``.
- :class:`RtpReceiver`: one per channel. RTCP is ignored, SRTP packets are authenticated and
  decrypted by libsrtp (pylibsrtp; a failure drops the packet), the jitter buffer orders
  packets, then audio becomes :class:`~gateway.ingress.events.Audio` (timestamp = position,
  L16 byte-swapped from network order to our little-endian), telephone-events become one
  :class:`~gateway.ingress.events.Dtmf` per event (repeated end packets deduplicated), comfort
  noise and holes before audio become :class:`~gateway.ingress.events.Gap`.

:class:`CallMedia` bundles a call's receivers on one epoch and pins the call clock's origin: its
first event is an empty ``Audio(channel, b"", 0)``, so ``Audio.timestamp`` is call time in
samples and :class:`~gateway.media.clock.ChannelClock` places everything by it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pylibsrtp

from gateway.ingress.events import Audio, Dtmf, Gap, IngressEvent
from gateway.ingress.siprec.sdp import Crypto
from gateway.media.codec import Codec, decode, encode

__all__ = [
    "CallMedia",
    "Frame",
    "JitterBuffer",
    "JitterStats",
    "MediaEpoch",
    "RtpError",
    "RtpPacket",
    "RtpReceiver",
    "StreamConfig",
    "TelephoneEvent",
    "is_rtcp",
    "parse_rtp",
    "parse_telephone_event",
]

RTP_VERSION = 2
CN_STATIC = 13
_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32
# RFC 3550 A.1: a sequence jump this large (either way) is a restart, not loss.
MAX_DROPOUT = 3000
# Packets in a row from a new SSRC, with none from the locked one, before the stream switches to
# it (RFC 3550 8.2 leaves this to the receiver; loreste/siprec locks the same way). Held, then
# replayed, so a real change loses nothing.
SSRC_SWITCH = 3
MAX_MISORDER = 100


class RtpError(ValueError):
    """A datagram that is not a valid RTP packet."""


class RtpPacket(NamedTuple):
    """A parsed RTP packet (RFC 3550 5.1). ``payload`` has the padding removed.

    A named tuple rather than a frozen dataclass: one is made per packet (a hundred per call
    second), and a tuple is built several times faster.
    """

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    padding: bool = False
    extension: bool = False
    csrcs: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension_data: bytes = b""
    version: int = RTP_VERSION

    def to_bytes(self) -> bytes:
        """Serialize (no padding, extension kept): for tests and simulators."""
        first = (RTP_VERSION << 6) | (0x10 if self.extension else 0) | len(self.csrcs)
        second = (0x80 if self.marker else 0) | self.payload_type
        out = struct.pack("!BBHII", first, second, self.sequence, self.timestamp, self.ssrc)
        out += b"".join(struct.pack("!I", c) for c in self.csrcs)
        if self.extension:
            data = self.extension_data + b"\x00" * (-len(self.extension_data) % 4)
            out += struct.pack("!HH", self.extension_profile or 0, len(data) // 4) + data
        return out + self.payload


def is_rtcp(data: bytes) -> bool:
    """True for RTCP multiplexed on the RTP port (RFC 5761 4: second octet 192..223).

    That range covers the RTCP packet types 200-204 (SR, RR, SDES, BYE, APP) and the feedback and
    XR types; RTP payload types 64-95 with the marker bit would collide and are never offered.
    """
    return len(data) >= 2 and (data[0] >> 6) == RTP_VERSION and 192 <= data[1] <= 223


def parse_rtp(data: bytes) -> RtpPacket:
    """Parse one RTP datagram. Raises :class:`RtpError` for anything malformed."""
    if len(data) < 12:
        raise RtpError(f"RTP packet of {len(data)} bytes (header is 12)")
    first, second, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
    version = first >> 6
    if version != RTP_VERSION:
        raise RtpError(f"RTP version {version}")
    padding = bool(first & 0x20)
    extension = bool(first & 0x10)
    cc = first & 0x0F
    offset = 12 + 4 * cc
    if len(data) < offset:
        raise RtpError(f"{cc} CSRCs do not fit in {len(data)} bytes")
    csrcs = struct.unpack_from(f"!{cc}I", data, 12) if cc else ()
    profile: int | None = None
    ext_data = b""
    if extension:
        if len(data) < offset + 4:
            raise RtpError("truncated header extension")
        profile, words = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + 4 * words
        if len(data) < end:
            raise RtpError("header extension longer than the packet")
        ext_data = bytes(data[offset + 4 : end])
        offset = end
    end = len(data)
    if padding:
        pad = data[-1]
        if pad == 0 or offset + pad > end:
            raise RtpError(f"bad padding length {pad}")
        end -= pad
    return RtpPacket(
        payload_type=second & 0x7F,
        sequence=seq,
        timestamp=ts,
        ssrc=ssrc,
        payload=bytes(data[offset:end]),
        marker=bool(second & 0x80),
        padding=padding,
        extension=extension,
        csrcs=tuple(csrcs),
        extension_profile=profile,
        extension_data=ext_data,
        version=version,
    )


_EVENT_DIGITS = "0123456789*#ABCD"


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """An RFC 4733 event payload. ``digit`` is the DTMF character (None for other events)."""

    event: int
    end: bool
    volume: int
    duration: int

    @property
    def digit(self) -> str | None:
        """``0``-``9``, ``*``, ``#``, ``A``-``D`` for events 0-15; None otherwise."""
        return _EVENT_DIGITS[self.event] if self.event < len(_EVENT_DIGITS) else None


def parse_telephone_event(payload: bytes) -> TelephoneEvent:
    """Decode the first 4-byte event of a telephone-event payload. Raises :class:`RtpError`."""
    if len(payload) < 4:
        raise RtpError(f"telephone-event payload of {len(payload)} bytes (need 4)")
    event, flags, duration = struct.unpack_from("!BBH", payload)
    return TelephoneEvent(event, bool(flags & 0x80), flags & 0x3F, duration)


class MediaEpoch:
    """The arrival time of a call's first RTP packet: position 0 for every stream of the call."""

    __slots__ = ("_t0",)

    def __init__(self, t0: float | None = None) -> None:
        """``t0`` None: set by the first :meth:`position` call."""
        self._t0 = t0

    @property
    def t0(self) -> float | None:
        """The epoch, once set."""
        return self._t0

    def position(self, arrival: float, rate: int) -> int:
        """Samples at ``rate`` from the epoch to ``arrival`` (sets the epoch on first use)."""
        if self._t0 is None:
            self._t0 = arrival
        return round((arrival - self._t0) * rate)


class Frame(NamedTuple):
    """A packet released by the jitter buffer, placed at ``position`` (samples, stream timeline).

    ``lost`` counts the packets skipped right before this one (sequence holes given up on).
    A named tuple: one is made per packet.
    """

    position: int
    packet: RtpPacket
    lost: int = 0


@dataclass(slots=True)
class JitterStats:
    """Counters of one :class:`JitterBuffer` (for metrics)."""

    received: int = 0
    released: int = 0
    duplicates: int = 0
    late: int = 0
    lost: int = 0
    reordered: int = 0
    ssrc_changes: int = 0
    resyncs: int = 0
    foreign_ssrc: int = 0  # packets of another SSRC while the locked one was still sending


@dataclass(slots=True)
class _Held:
    ext_seq: int
    position: int
    arrival: float
    packet: RtpPacket


class JitterBuffer:
    """Reorders, dedupes and places one stream's RTP packets on the call timeline.

    Contract: :meth:`push` returns the frames it releases, in sequence order with non-decreasing
    positions, never the same sequence number twice. A packet is held until its predecessor is
    released or it is ``window`` samples behind the newest held packet (then the missing ones
    count as lost), or ``max_delay_s`` after its arrival via :meth:`poll`. Packets older than what
    was released are dropped (``duplicates`` if recently released, else ``late``).
    """

    def __init__(
        self,
        clock_rate: int,
        *,
        epoch: MediaEpoch | None = None,
        window_ms: int = 60,
        max_held: int = 50,
        max_delay_s: float = 0.2,
        resync_s: float = 2.0,
        snap_s: float = 0.1,
    ) -> None:
        """Create a buffer for a stream sampled at ``clock_rate`` Hz (see the class docstring)."""
        if clock_rate <= 0:
            raise ValueError(f"bad clock rate {clock_rate}")
        self.rate = clock_rate
        self.epoch = epoch or MediaEpoch()
        self.window = clock_rate * window_ms // 1000
        self.max_held = max_held
        self.max_delay_s = max_delay_s
        self.resync = round(resync_s * clock_rate)
        self.snap = round(snap_s * clock_rate)
        self.stats = JitterStats()
        self._held: dict[int, _Held] = {}
        self._recent: deque[int] = deque(maxlen=128)
        self._ssrc: int | None = None
        # Packets of an SSRC other than the locked one, held until it has sent SSRC_SWITCH of
        # them in a row (a transfer: switch, replaying them) or the locked one sends again
        # (two senders interleaved on one port: dropped, so the timeline does not run double).
        self._candidate: list[tuple[RtpPacket, float]] = []
        self._max_ext_seq = 0
        self._next_seq = 0  # the next extended sequence number to release
        self._ref_ext_ts = 0  # extended timestamp of the highest sequence so far
        self._offset = 0  # position = extended timestamp + offset (this SSRC)
        self._end = 0  # position just after the latest released packet (estimated)
        self._last: tuple[int, int] | None = None  # (ext seq, position) last released
        self._step = 0  # timestamp step between consecutive packets: the packet duration

    @property
    def held(self) -> int:
        """Packets waiting in the buffer."""
        return len(self._held)

    def push(self, packet: RtpPacket, arrival: float) -> list[Frame]:
        """Take one packet that arrived at ``arrival`` (seconds); return the released frames."""
        self.stats.received += 1
        if self._ssrc is None:
            self._anchor(packet, arrival)
            return self._accept(self._max_ext_seq, packet, arrival)
        if packet.ssrc != self._ssrc:
            return self._other_ssrc(packet, arrival)
        if self._candidate:  # the locked sender goes on: the other one was not a change
            self.stats.foreign_ssrc += len(self._candidate)
            self._candidate = []
        return self._push(packet, arrival)

    def _other_ssrc(self, packet: RtpPacket, arrival: float) -> list[Frame]:
        candidate = self._candidate
        if candidate and candidate[0][0].ssrc != packet.ssrc:
            self.stats.foreign_ssrc += len(candidate)  # a third sender: start counting again
            candidate.clear()
        candidate.append((packet, arrival))
        if len(candidate) < SSRC_SWITCH:
            return []
        # Sustained traffic from the new SSRC and none from the locked one: a real change.
        held, self._candidate = candidate, []
        self.stats.ssrc_changes += 1
        out = self._release_all()
        first, first_arrival = held[0]
        self._anchor(first, first_arrival)
        out += self._accept(self._max_ext_seq, first, first_arrival)
        for later, at in held[1:]:
            out += self._push(later, at)
        return out

    def _push(self, packet: RtpPacket, arrival: float) -> list[Frame]:
        """A packet of the locked SSRC."""
        out: list[Frame] = []
        ext_seq = self._extend_seq(packet.sequence)
        if abs(ext_seq - self._max_ext_seq) > MAX_DROPOUT:
            # A sequence restart within the same SSRC: start over like a new stream.
            self.stats.resyncs += 1
            out += self._release_all()
            self._anchor(packet, arrival)
            return out + self._accept(self._max_ext_seq, packet, arrival)
        if ext_seq < self._next_seq or ext_seq in self._held:
            if ext_seq in self._held or ext_seq in self._recent:
                self.stats.duplicates += 1
            else:
                self.stats.late += 1
            return out
        ext_ts = self._extend_ts(packet.timestamp)
        if ext_seq < self._max_ext_seq:
            self.stats.reordered += 1
        else:
            drift = ext_ts + self._offset - self.epoch.position(arrival, self.rate)
            if abs(drift) > self.resync:
                # Timestamps no longer follow arrival (a jump, a frozen clock after hold).
                self.stats.resyncs += 1
                out += self._release_all()
                self._anchor(packet, arrival)
                return out + self._accept(self._max_ext_seq, packet, arrival)
            self._max_ext_seq = ext_seq
            self._ref_ext_ts = ext_ts
        return out + self._accept(ext_seq, packet, arrival, ext_ts)

    def poll(self, now: float) -> list[Frame]:
        """Release packets held longer than ``max_delay_s`` (and everything before them)."""
        due = [h.ext_seq for h in self._held.values() if now - h.arrival >= self.max_delay_s]
        if not due:
            return []
        return self._release_through(max(due))

    def next_deadline(self) -> float | None:
        """When :meth:`poll` will next release something (None when nothing is held)."""
        if not self._held:
            return None
        return min(h.arrival for h in self._held.values()) + self.max_delay_s

    def flush(self) -> list[Frame]:
        """Release everything held (end of call, hold, or before a re-anchor)."""
        return self._release_all()

    # -- internals -------------------------------------------------------------------------

    def _anchor(self, packet: RtpPacket, arrival: float) -> None:
        """Start a new SSRC epoch: place ``packet`` by its arrival, never before placed audio."""
        first = self._ssrc is None and self.stats.released == 0
        self._ssrc = packet.ssrc
        # Extended numbers keep increasing across anchors (in whole cycles, so the modular
        # extension still works), which keeps "recently released" unambiguous.
        base = 0 if first else (self._max_ext_seq // _SEQ_MOD + 2) * _SEQ_MOD
        self._max_ext_seq = base + packet.sequence
        self._next_seq = self._max_ext_seq
        self._ref_ext_ts = packet.timestamp
        position = self.epoch.position(arrival, self.rate)
        if not first:
            if abs(position - self._end) <= self.snap:
                position = self._end
            position = max(position, self._end)
        self._offset = position - packet.timestamp

    def _extend_seq(self, seq: int) -> int:
        delta = (seq - self._max_ext_seq) % _SEQ_MOD
        if delta >= _SEQ_MOD // 2:
            delta -= _SEQ_MOD
        return self._max_ext_seq + delta

    def _extend_ts(self, ts: int) -> int:
        delta = (ts - self._ref_ext_ts) % _TS_MOD
        if delta >= _TS_MOD // 2:
            delta -= _TS_MOD
        return self._ref_ext_ts + delta

    def _accept(
        self, ext_seq: int, packet: RtpPacket, arrival: float, ext_ts: int | None = None
    ) -> list[Frame]:
        if ext_ts is None:
            ext_ts = self._extend_ts(packet.timestamp)
        position = ext_ts + self._offset
        if ext_seq == self._next_seq and not self._held:
            return [self._release(ext_seq, position, packet)]  # in order: the usual case
        self._held[ext_seq] = _Held(ext_seq, position, arrival, packet)
        out: list[Frame] = []
        while self._held:
            head = min(self._held)
            if head != self._next_seq:
                newest = max(h.position for h in self._held.values())
                if newest - self._held[head].position < self.window and (
                    len(self._held) <= self.max_held
                ):
                    break
            out += self._release_through(head)
        return out

    def _release_through(self, last: int) -> list[Frame]:
        out: list[Frame] = []
        for ext_seq in sorted(s for s in self._held if s <= last):
            held = self._held.pop(ext_seq)
            out.append(self._release(ext_seq, held.position, held.packet))
        return out

    def _release(self, ext_seq: int, position: int, packet: RtpPacket) -> Frame:
        lost = max(0, ext_seq - self._next_seq)
        stats = self.stats
        stats.lost += lost
        stats.released += 1
        self._next_seq = ext_seq + 1
        self._recent.append(ext_seq)
        last = self._last
        if last is not None and last[0] == ext_seq - 1:
            step = position - last[1]
            if 0 < step <= self.rate:  # 0: a telephone-event repeat; > 1 s: not a step
                self._step = step
        self._last = (ext_seq, position)
        self._end = max(self._end, position + self._step)
        return Frame(position, packet, lost)

    def _release_all(self) -> list[Frame]:
        if not self._held:
            return []
        return self._release_through(max(self._held))


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """What one channel's RTP carries (from the SDP negotiation)."""

    channel: int
    codec: Codec
    payload_type: int
    clock_rate: int = 8000
    telephone_event: int | None = None
    comfort_noise: tuple[int, ...] = (CN_STATIC,)
    srtp: Crypto | None = None  # SRTP (SDES): the sender's suite and master key + salt


# SDES suite -> libsrtp protection profile.
_SRTP_PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    "AEAD_AES_256_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM,
}


def srtp_session(crypto: Crypto) -> pylibsrtp.Session:
    """A libsrtp receive context for any SSRC keyed by ``crypto``. Raises KeyError for a suite
    outside :data:`~gateway.ingress.siprec.sdp.SRTP_SUITES`."""
    policy = pylibsrtp.Policy(
        key=crypto.key,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=_SRTP_PROFILES[crypto.suite],
    )
    return pylibsrtp.Session(policy=policy)


@dataclass(slots=True)
class ReceiverStats:
    """Counters of one :class:`RtpReceiver` beyond the jitter buffer's."""

    malformed: int = 0
    rtcp: int = 0
    unknown_payload: int = 0
    dtmf: int = 0
    comfort_noise: int = 0
    srtp_rejected: int = 0  # failed SRTP authentication: dropped
    srtp_replayed: int = 0  # a copy of an SRTP packet already taken (libsrtp's replay check)
    accepted: int = 0  # authentic, well-formed RTP of a negotiated payload type


class RtpReceiver:
    """One channel's RTP datagrams in, that channel's Audio/Dtmf/Gap events out (sans-I/O).

    Events come out in timeline order. ``Audio.timestamp`` is the position; a ``Gap`` precedes
    audio that starts after the end of the previous output (loss, comfort noise, a late start),
    sized so the channel's clock reaches exactly that position.
    """

    def __init__(
        self,
        config: StreamConfig,
        *,
        epoch: MediaEpoch | None = None,
        window_ms: int = 60,
        max_delay_s: float = 0.2,
        joined: bool = False,
    ) -> None:
        """Create the receiver for ``config`` on ``epoch`` (shared by a call's receivers).

        ``joined``: the stream joins a running call, whose channel for it begins where the call
        has got to; so no gap is declared before its first frame (the call places that frame by
        its position, and a gap from position 0 would push the channel past it).
        """
        self.config = config
        self.buffer = JitterBuffer(
            config.clock_rate, epoch=epoch, window_ms=window_ms, max_delay_s=max_delay_s
        )
        self.stats = ReceiverStats()
        # The channel's codec for the call's life; a re-INVITE may switch the stream to another
        # codec of the same clock rate, which is transcoded to this one.
        self.target = config.codec
        self._width = config.codec.sample_width
        # Audio payload types seen in this stream's offers -> codec: packets of a replaced
        # type still in the jitter buffer (or in flight) decode as they were sent.
        self._audio_types = {config.payload_type: config.codec}
        self._srtp = srtp_session(config.srtp) if config.srtp is not None else None
        # Timeline position where this channel's output ends (None: joined, nothing out yet).
        self._end: int | None = None if joined else 0
        self._event_key: tuple[int, int] | None = None  # (ssrc, timestamp) of the DTMF event
        self._event_digit: str | None = None
        self._event_done = False

    def reconfigure(self, config: StreamConfig) -> None:
        """Take a renegotiated stream (re-INVITE/UPDATE): a new payload type or codec of the
        same clock rate. Raises ValueError for another channel or clock rate."""
        if config.channel != self.config.channel or config.clock_rate != self.config.clock_rate:
            raise ValueError(
                f"channel {self.config.channel} at {self.config.clock_rate} Hz cannot become "
                f"channel {config.channel} at {config.clock_rate} Hz"
            )
        if config.srtp != self.config.srtp:  # new keys (or SRTP switched on or off)
            self._srtp = srtp_session(config.srtp) if config.srtp is not None else None
        self.config = config
        self._audio_types[config.payload_type] = config.codec

    def receive(self, datagram: bytes, arrival: float) -> list[IngressEvent]:
        """Handle one datagram received at ``arrival`` (seconds). Malformed input is counted;
        with SRTP, a packet that fails authentication is dropped and counted."""
        if is_rtcp(datagram):
            self.stats.rtcp += 1
            return []
        if self._srtp is not None:
            try:
                datagram = self._srtp.unprotect(datagram)
            except pylibsrtp.Error as exc:
                if len(datagram) < 12:
                    self.stats.malformed += 1
                elif str(exc).startswith("replay check failed"):
                    self.stats.srtp_replayed += 1  # a duplicate, caught before the jitter buffer
                else:
                    self.stats.srtp_rejected += 1
                return []
        try:
            packet = parse_rtp(datagram)
        except RtpError:
            self.stats.malformed += 1
            return []
        cfg = self.config
        if (
            packet.payload_type not in self._audio_types
            and packet.payload_type != cfg.telephone_event
            and packet.payload_type not in cfg.comfort_noise
        ):
            self.stats.unknown_payload += 1
            return []
        self.stats.accepted += 1
        return self._events(self.buffer.push(packet, arrival))

    def poll(self, now: float) -> list[IngressEvent]:
        """Release what waited too long in the jitter buffer (call at :meth:`next_deadline`)."""
        return self._events(self.buffer.poll(now))

    def next_deadline(self) -> float | None:
        """When :meth:`poll` has work (None: nothing held)."""
        return self.buffer.next_deadline()

    def flush(self) -> list[IngressEvent]:
        """Release everything (call end, hold); a DTMF event whose end was lost is emitted."""
        events = self._events(self.buffer.flush())
        if self._event_digit is not None and not self._event_done:
            events.append(Dtmf(self.config.channel, self._event_digit))
            self._event_done = True
        return events

    def _events(self, frames: Sequence[Frame]) -> list[IngressEvent]:
        cfg = self.config
        out: list[IngressEvent] = []
        for frame in frames:
            pt = frame.packet.payload_type
            codec = self._audio_types.get(pt) if pt != cfg.telephone_event else None
            if codec is not None:
                payload = frame.packet.payload
                if codec is Codec.L16:
                    payload = _network_l16_to_little(payload)
                if codec is not self.target:
                    payload = encode(self.target, decode(codec, payload))
                samples = len(payload) // self._width
                if samples == 0:
                    continue
                end = frame.position if self._end is None else self._end
                if frame.position > end:
                    out.append(Gap(cfg.channel, frame.position - end))
                out.append(Audio(cfg.channel, payload, frame.position))
                self._end = max(end, frame.position + samples)
            elif pt == cfg.telephone_event:
                out += self._dtmf(frame)
            else:
                self.stats.comfort_noise += 1
                end = frame.position if self._end is None else self._end
                if frame.position > end:
                    out.append(Gap(cfg.channel, frame.position - end))
                self._end = max(end, frame.position)
        return out

    def _dtmf(self, frame: Frame) -> list[IngressEvent]:
        try:
            event = parse_telephone_event(frame.packet.payload)
        except RtpError:
            self.stats.malformed += 1
            return []
        out: list[IngressEvent] = []
        key = (frame.packet.ssrc, frame.packet.timestamp)
        if key != self._event_key:
            if self._event_digit is not None and not self._event_done:
                out.append(Dtmf(self.config.channel, self._event_digit))  # its end was lost
            self._event_key = key
            self._event_digit = event.digit
            self._event_done = False
        if event.end and not self._event_done and self._event_digit is not None:
            out.append(Dtmf(self.config.channel, self._event_digit))
            self.stats.dtmf += 1
            self._event_done = True
        return out


def _network_l16_to_little(payload: bytes) -> bytes:
    """RTP L16 is big-endian (RFC 3551 4.5.11); our L16 is little-endian."""
    usable = len(payload) - len(payload) % 2
    out: bytes = np.frombuffer(payload[:usable], dtype=">i2").astype("<i2").tobytes()
    return out


class CallMedia:
    """A call's RTP receivers on one shared epoch; emits the call's media events.

    The first event ever returned is ``Audio(first channel, b"", 0)``: it fixes the call clock's
    origin at position 0, so channels whose audio is released in any order land in place.
    """

    def __init__(
        self,
        streams: Sequence[StreamConfig],
        *,
        window_ms: int = 60,
        max_delay_s: float = 0.2,
    ) -> None:
        """One :class:`RtpReceiver` per stream config (channels must be distinct)."""
        self.epoch = MediaEpoch()
        self.receivers: dict[int, RtpReceiver] = {}
        self._window_ms = window_ms
        self._max_delay_s = max_delay_s
        for cfg in streams:
            self._add(cfg, joined=False)
        self._pinned = False

    def add(self, config: StreamConfig) -> RtpReceiver:
        """A receiver for a stream that joins mid-call, on the call's epoch: placed by its
        arrival like the others. Raises ValueError for a channel already here."""
        return self._add(config, joined=True)

    def _add(self, config: StreamConfig, *, joined: bool) -> RtpReceiver:
        if config.channel in self.receivers:
            raise ValueError(f"channel {config.channel} configured twice")
        receiver = self.receivers[config.channel] = RtpReceiver(
            config,
            epoch=self.epoch,
            window_ms=self._window_ms,
            max_delay_s=self._max_delay_s,
            joined=joined,
        )
        return receiver

    def receive(self, channel: int, datagram: bytes, arrival: float) -> list[IngressEvent]:
        """One datagram for ``channel``'s port. Raises KeyError for an unknown channel."""
        return self._pin(self.receivers[channel].receive(datagram, arrival))

    def poll(self, now: float) -> list[IngressEvent]:
        """Release whatever waited too long on any channel."""
        out: list[IngressEvent] = []
        for receiver in self.receivers.values():
            out += receiver.poll(now)
        return self._pin(out)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`poll` has work, or None."""
        deadlines = [d for r in self.receivers.values() if (d := r.next_deadline()) is not None]
        return min(deadlines, default=None)

    def flush(self) -> list[IngressEvent]:
        """Release everything held on every channel."""
        out: list[IngressEvent] = []
        for receiver in self.receivers.values():
            out += receiver.flush()
        return self._pin(out)

    def _pin(self, events: list[IngressEvent]) -> list[IngressEvent]:
        if events and not self._pinned:
            self._pinned = True
            first = min(self.receivers)
            return [Audio(first, b"", 0), *events]
        return events
