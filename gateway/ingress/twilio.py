"""Twilio Media Streams (and the Telnyx / SignalWire dialects) as normalized ingress events.

:class:`TwilioDecoder` is sans-I/O: the WebSocket shell hands it each text message and gets back
:class:`~gateway.ingress.events.IngressEvent` objects. It never does I/O, never sleeps and, for any
input whatsoever, raises nothing but :class:`TwilioProtocolError`.

Wire format (reference notes, section 1.2 and 2.1)::

    connected -> ignored (protocol/version recorded)
    start     -> CallStarted (one channel per track: inbound = 0, outbound = 1 with both tracks)
    media     -> Audio(channel, payload, timestamp = int(media.timestamp) * rate // 1000)
    dtmf      -> Dtmf
    mark      -> ignored
    stop      -> CallEnded("stop")

Twilio and SignalWire use camelCase (``streamSid``, ``sequenceNumber``, ``mediaFormat.sampleRate``),
Telnyx snake_case (``stream_id``, ``sequence_number``, ``media_format.sample_rate``,
``call_control_id``). Every dialect accepts both spellings; the dialect picks the event ``source``
and which identifiers are expected.

Timing: ``media.timestamp`` is milliseconds from the start of the stream, one clock for both tracks,
so ``Audio.timestamp`` is in samples on a clock shared by all channels of the call. By default
frames are emitted in arrival order and placement by timestamp is left to the call's
:class:`~gateway.media.clock.ChannelClock` (which has its own reorder window). Telnyx documents
that "media frame order is not guaranteed"; with ``reorder_window_ms > 0`` the decoder itself holds
media frames back and emits them sorted by (timestamp, sequence number, chunk) once a frame that
much newer has arrived (and everything on ``stop`` or :meth:`TwilioDecoder.flush`).

L16 byte order is not documented by Twilio, Telnyx or SignalWire (reference section 8).
WebSocket L16 in the wild (Vonage, Plivo, FreeSWITCH, jambonz) is little-endian, which is our L16,
so ``l16_byte_order="little"`` is the default; pass ``"big"`` for RFC 2586 network byte order and
the payload is byte-swapped to little-endian.
"""

from __future__ import annotations

import binascii
import heapq
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson

from gateway.ingress.events import Audio, CallEnded, CallStarted, ChannelSpec, Dtmf, IngressEvent
from gateway.media.codec import Codec, UnsupportedCodec, parse_codec

Dialect = Literal["twilio", "telnyx", "signalwire"]
Track = Literal["inbound", "outbound"]

DIALECTS: tuple[str, ...] = ("twilio", "telnyx", "signalwire")
DEFAULT_ROLES: dict[str, str] = {"inbound": "customer", "outbound": "agent"}
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 48000
# A media timestamp beyond this many ms (about 11.6 days) is bogus, not a long call.
MAX_TIMESTAMP_MS = 1_000_000_000

_L16_NAMES = frozenset(("l16", "audio/l16", "audio/x-l16", "linear16", "pcm16", "slin", "s16le"))
_DIGITS = re.compile(r"[0-9]+")
_DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")

# Identifiers copied from `start` (and the envelope) into CallStarted.source_ids, both spellings.
_ID_FIELDS = (
    "accountSid",
    "callSid",
    "streamSid",
    "account_sid",
    "call_sid",
    "stream_id",
    "stream_sid",
    "call_control_id",
    "call_session_id",
    "call_leg_id",
    "user_id",
    "connection_id",
)
# Plain `start` fields that become metadata as-is (Telnyx).
_META_FIELDS = ("from", "to", "client_state", "name")


class TwilioProtocolError(ValueError):
    """The stream violates the Media Streams protocol. ``reason`` is a short machine token.

    Reasons: ``message_too_large``, ``malformed_json``, ``bad_message`` (missing or mistyped
    field), ``unknown_event``, ``duplicate_start``, ``media_before_start``, ``after_stop``,
    ``unsupported_codec``, ``unknown_track``, ``bad_timestamp``, ``bad_base64``, ``bad_payload``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _err(reason: str, message: str) -> TwilioProtocolError:
    return TwilioProtocolError(reason, message)


def _field(obj: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` present (not None) in ``obj``; None if none is."""
    for name in names:
        value = obj.get(name)
        if value is not None:
            return value
    return None


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _err("bad_message", f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _track_name(value: Any) -> Track | None:
    """``inbound`` / ``inbound_track`` -> ``inbound`` (same for outbound); None otherwise."""
    if not isinstance(value, str):
        return None
    name = value.strip().lower().removesuffix("_track")
    if name == "inbound":
        return "inbound"
    if name == "outbound":
        return "outbound"
    return None


def _tracks(value: Any) -> tuple[Track, ...]:
    """``start.tracks`` as a sorted (inbound first) tuple; ``both``/``both_tracks`` is both."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _err("bad_message", f"start.tracks must be a non-empty list, got {value!r:.80}")
    found: set[Track] = set()
    for item in items:
        if isinstance(item, str) and item.strip().lower().removesuffix("_tracks") == "both":
            found.update(("inbound", "outbound"))
            continue
        track = _track_name(item)
        if track is None:
            raise _err("bad_message", f"unknown track {item!r:.40} in start.tracks")
        found.add(track)
    return tuple(t for t in ("inbound", "outbound") if t in found)


def _rate(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise _err("bad_message", f"{what} must be a number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int):
        raise _err("bad_message", f"{what} must be an integer, got {value!r:.40}")
    if not MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE:
        raise _err(
            "unsupported_codec",
            f"{what} {value} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz",
        )
    return value


def parse_media_format(fmt: Mapping[str, Any]) -> tuple[Codec, int]:
    """``mediaFormat`` / ``media_format`` -> (codec, sample rate). Raises TwilioProtocolError.

    Accepts MIME-ish names (``audio/x-mulaw``, ``audio/x-alaw``, ``audio/x-l16``, with optional
    ``;rate=16000``), RTP names (``PCMU``, ``PCMA``, ``L16``) and SignalWire's ``L16@16000h``.
    """
    encoding = _field(fmt, "encoding")
    if not isinstance(encoding, str) or not encoding.strip():
        raise _err("bad_message", f"mediaFormat.encoding must be a string, got {encoding!r:.40}")
    name, _, params = encoding.strip().lower().partition(";")
    name, _, at_rate = name.partition("@")
    name = name.strip()
    rate_hint: Any = None
    if at_rate:
        rate_hint = at_rate.strip().removesuffix("h").removesuffix("hz")
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip() == "rate":
            rate_hint = val.strip()
    if name in _L16_NAMES:
        codec = Codec.L16
    else:
        try:
            codec = parse_codec(name)
        except UnsupportedCodec:
            raise _err(
                "unsupported_codec",
                f"unsupported media encoding {encoding!r:.60}; supported: "
                "audio/x-mulaw (PCMU), audio/x-alaw (PCMA), audio/x-l16 (L16)",
            ) from None
    raw_rate = _field(fmt, "sampleRate", "sample_rate")
    if raw_rate is None:
        raw_rate = rate_hint if rate_hint is not None else 8000
    rate = _rate(raw_rate, "mediaFormat.sampleRate")
    channels = _field(fmt, "channels")
    if channels is not None and channels != 1 and channels != "1":
        raise _err(
            "unsupported_codec",
            f"mediaFormat.channels={channels!r:.20}; only mono tracks are supported",
        )
    return codec, rate


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class _Pending:
    """A media frame in the reorder buffer, ordered by (timestamp, sequence, chunk, arrival)."""

    __slots__ = ("key", "audio")

    def __init__(self, key: tuple[int, int, int, int], audio: Audio) -> None:
        self.key = key
        self.audio = audio

    def __lt__(self, other: _Pending) -> bool:
        return self.key < other.key


class TwilioDecoder:
    """One Media Streams WebSocket: text messages in, normalized ingress events out.

    ``roles`` maps ``inbound`` / ``outbound`` to channel roles (defaults ``customer`` / ``agent``);
    the ``inbound_role`` / ``outbound_role`` custom parameters of ``start`` override it per call,
    and ``inbound_participant`` / ``outbound_participant`` set ``ChannelSpec.participant``.
    ``default_tracks`` applies when ``start`` names no tracks (Telnyx's ``start`` does not).
    """

    def __init__(
        self,
        dialect: Dialect = "twilio",
        *,
        roles: Mapping[str, str] | None = None,
        max_message_bytes: int = 65536,
        reorder_window_ms: int = 0,
        default_tracks: Sequence[str] = ("inbound",),
        l16_byte_order: Literal["little", "big"] = "little",
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        if reorder_window_ms < 0:
            raise ValueError(f"negative reorder_window_ms: {reorder_window_ms}")
        if l16_byte_order not in ("little", "big"):
            raise ValueError(f"l16_byte_order must be 'little' or 'big', got {l16_byte_order!r}")
        self.dialect: Dialect = dialect
        self._roles = dict(DEFAULT_ROLES)
        if roles:
            self._roles.update(roles)
        self._max_bytes = max_message_bytes
        self._window_ms = reorder_window_ms
        try:
            self._default_tracks = _tracks(list(default_tracks))
        except TwilioProtocolError as exc:
            raise ValueError(f"bad default_tracks: {exc}") from None
        self._l16_swap = l16_byte_order == "big"

        self.connected = False
        self.protocol_version: str | None = None
        self.started: CallStarted | None = None
        self.stream_id: str | None = None
        self.ended = False
        self.codec: Codec | None = None
        self._width = 1  # bytes per sample of the codec (set at start)
        self.sample_rate = 0
        self._channel_of: dict[Track, int] = {}
        self._samples: list[int] = []
        self.frames = 0
        """Media frames accepted (empty payloads included)."""
        self.bytes = 0
        """Payload bytes accepted (after base64 decoding)."""
        self.messages = 0
        """Messages handled without error."""
        self.remote_errors: list[str] = []
        """Details of ``error`` events the platform sent (Telnyx); they do not end the call."""
        self._heap: list[_Pending] = []
        self._max_ts_ms = -1
        self._arrival = 0
        self._first_ts_ms: int | None = None
        self._end_ts_ms = 0  # the latest media timestamp plus its frame's length

    # -- counters ------------------------------------------------------------------------------

    @property
    def timeline_ms(self) -> float:
        """How far the stream has moved its own clock since its first timestamp (ms): audio
        plus timestamp jumps, which place silence. What a shell checks against real time, since
        a few frames with far-apart timestamps would otherwise add hours of silence at once."""
        if self._first_ts_ms is None:
            return self.media_ms_received
        return max(self.media_ms_received, self._end_ts_ms - self._first_ts_ms)

    @property
    def media_ms_received(self) -> float:
        """Audio received so far, in ms, on the channel that has received the most.

        A shell compares this with wall-clock time since ``start`` to detect a peer sending far
        beyond real time.
        """
        if not self._samples or not self.sample_rate:
            return 0.0
        return max(self._samples) * 1000 / self.sample_rate

    @property
    def pending_frames(self) -> int:
        """Media frames held in the reorder buffer."""
        return len(self._heap)

    # -- entry points --------------------------------------------------------------------------

    def receive(self, text: str | bytes) -> list[IngressEvent]:
        """Decode one WebSocket text message. Raises only :class:`TwilioProtocolError`."""
        try:
            events = self._receive(text)
        except TwilioProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - the contract: nothing but TwilioProtocolError
            raise _err(
                "bad_message", f"cannot decode message: {type(exc).__name__}: {exc}"
            ) from exc
        self.messages += 1
        return events

    def flush(self) -> list[IngressEvent]:
        """Release every media frame held in the reorder buffer, in order."""
        out: list[IngressEvent] = []
        while self._heap:
            out.append(heapq.heappop(self._heap).audio)
        return out

    # -- internals -----------------------------------------------------------------------------

    def _receive(self, text: str | bytes) -> list[IngressEvent]:
        if isinstance(text, (bytes, bytearray, memoryview)):
            size = len(text)
        elif isinstance(text, str):
            # UTF-8 is at most 4 bytes per character: only encode when it could matter.
            size = len(text) if len(text) * 4 <= self._max_bytes else len(text.encode("utf-8"))
        else:
            raise _err("bad_message", f"message must be str or bytes, got {type(text).__name__}")
        if size > self._max_bytes:
            raise _err(
                "message_too_large",
                f"message of {size} bytes exceeds the {self._max_bytes}-byte limit",
            )
        if self.ended:
            raise _err("after_stop", "message received after the stream's stop event")
        try:
            msg = orjson.loads(bytes(text) if not isinstance(text, str) else text)
        except (ValueError, RecursionError) as exc:
            raise _err("malformed_json", f"message is not valid JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise _err("malformed_json", f"message must be a JSON object, got {type(msg).__name__}")
        event = msg.get("event")
        if not isinstance(event, str):
            raise _err("bad_message", "message has no string 'event' field")
        if event == "media":
            return self._media(msg)
        if event == "start":
            return self._start(msg)
        if event == "dtmf":
            return self._dtmf(msg)
        if event == "stop":
            self.ended = True
            return [*self.flush(), CallEnded("stop")]
        if event == "connected":
            self.connected = True
            version = msg.get("version")
            self.protocol_version = version if isinstance(version, str) else None
            return []
        if event in ("mark", "clear"):
            return []
        if event == "error":
            self.remote_errors.append(_text(_field(msg, "payload", "error") or msg)[:500])
            return []
        raise _err("unknown_event", f"unknown event {event!r:.40}")

    def _start(self, msg: dict[str, Any]) -> list[IngressEvent]:
        if self.started is not None:
            raise _err("duplicate_start", "second start event on one stream")
        start = _obj(msg.get("start"), "start")
        fmt = _field(start, "mediaFormat", "media_format")
        if fmt is None:
            # Twilio documents µ-law/8000 as "always"; only a missing format falls back to it.
            codec, rate = Codec.PCMU, 8000
        else:
            codec, rate = parse_media_format(_obj(fmt, "mediaFormat"))
        raw_tracks = _field(start, "tracks")
        tracks = self._default_tracks if raw_tracks is None else _tracks(raw_tracks)

        raw_params = _field(start, "customParameters", "custom_parameters")
        params = {} if raw_params is None else _obj(raw_params, "start.customParameters")
        params = {str(k): _text(v) for k, v in params.items()}

        channels = []
        for index, track in enumerate(tracks):
            role = params.get(f"{track}_role") or self._roles.get(track) or DEFAULT_ROLES[track]
            participant = params.get(f"{track}_participant") or None
            channels.append(ChannelSpec(index, role, participant, codec, rate))
            self._channel_of[track] = index

        source_ids: dict[str, str] = {}
        for name in _ID_FIELDS:
            value = _field(start, name)
            if value is None:
                value = msg.get(name)
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                source_ids[name] = str(value)
        metadata = {f"param.{k}": v for k, v in params.items()}
        for name in _META_FIELDS:
            value = start.get(name)
            if value is not None:
                metadata[name] = _text(value)
        metadata["tracks"] = ",".join(tracks)

        self.stream_id = source_ids.get("streamSid") or source_ids.get("stream_id")
        self.codec = codec
        self._width = codec.sample_width
        self.sample_rate = rate
        self._samples = [0] * len(channels)
        self.started = CallStarted(self.dialect, tuple(channels), source_ids, metadata)
        return [self.started]

    def _channel(self, raw_track: Any, what: str) -> int:
        if raw_track is None and len(self._channel_of) == 1:
            return next(iter(self._channel_of.values()))
        track = _track_name(raw_track)
        if track is None:
            raise _err("unknown_track", f"{what}.track {raw_track!r:.40} is not inbound/outbound")
        channel = self._channel_of.get(track)
        if channel is None:
            declared = ", ".join(self._channel_of) or "none"
            raise _err(
                "unknown_track",
                f"{what} on track {track!r} but start declared tracks: {declared}"
                " (set default_tracks when start names none)",
            )
        return channel

    def _media(self, msg: dict[str, Any]) -> list[IngressEvent]:
        if self.started is None:
            raise _err("media_before_start", "media event before the start event")
        media = _obj(msg.get("media"), "media")
        channel = self._channel(media.get("track"), "media")
        ts_ms = self._timestamp(media.get("timestamp"))
        payload_b64 = media.get("payload")
        if not isinstance(payload_b64, str):
            raise _err("bad_message", "media.payload must be a base64 string")
        try:
            payload = binascii.a2b_base64(payload_b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise _err("bad_base64", "media.payload is not valid base64") from None
        codec = self.codec
        assert codec is not None
        width = self._width
        if len(payload) % width:
            raise _err(
                "bad_payload",
                f"media payload of {len(payload)} bytes is not a whole number of "
                f"{codec.value} samples",
            )
        if self._l16_swap and codec is Codec.L16 and payload:
            swapped = bytearray(len(payload))
            swapped[0::2] = payload[1::2]
            swapped[1::2] = payload[0::2]
            payload = bytes(swapped)
        self.frames += 1
        self.bytes += len(payload)
        self._samples[channel] += len(payload) // width
        if not payload:
            return []
        timestamp = None if ts_ms is None else ts_ms * self.sample_rate // 1000
        if ts_ms is not None:
            if self._first_ts_ms is None:
                self._first_ts_ms = ts_ms
            end = ts_ms + len(payload) // width * 1000 // self.sample_rate
            if end > self._end_ts_ms:
                self._end_ts_ms = end
        audio = Audio(channel, payload, timestamp)
        if self._window_ms <= 0 or ts_ms is None:
            return [audio]
        return self._reorder(msg, media, ts_ms, audio)

    def _timestamp(self, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            ms = value
        elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
            ms = int(value)
        else:
            raise _err(
                "bad_timestamp",
                f"media.timestamp must be a non-negative integer string, got {value!r:.40}",
            )
        if not 0 <= ms <= MAX_TIMESTAMP_MS:
            raise _err("bad_timestamp", f"media.timestamp {ms} ms is out of range")
        return ms

    def _reorder(
        self, msg: dict[str, Any], media: dict[str, Any], ts_ms: int, audio: Audio
    ) -> list[IngressEvent]:
        seq = _as_int(_field(msg, "sequenceNumber", "sequence_number"))
        chunk = _as_int(media.get("chunk"))
        self._arrival += 1
        heapq.heappush(self._heap, _Pending((ts_ms, seq, chunk, self._arrival), audio))
        self._max_ts_ms = max(self._max_ts_ms, ts_ms)
        cut = self._max_ts_ms - self._window_ms
        out: list[IngressEvent] = []
        while self._heap and self._heap[0].key[0] <= cut:
            out.append(heapq.heappop(self._heap).audio)
        return out

    def _dtmf(self, msg: dict[str, Any]) -> list[IngressEvent]:
        if self.started is None:
            raise _err("media_before_start", "dtmf event before the start event")
        dtmf = _obj(msg.get("dtmf"), "dtmf")
        digit = dtmf.get("digit")
        if not isinstance(digit, str) or len(digit) != 1 or digit not in _DTMF_DIGITS:
            raise _err("bad_message", f"dtmf.digit must be one of 0-9*#A-D, got {digit!r:.20}")
        raw_track = dtmf.get("track")
        # Telnyx dtmf names no track; the digits come from the caller.
        channel = self._channel(raw_track, "dtmf") if raw_track is not None else 0
        return [Dtmf(channel, digit.upper())]


def _as_int(value: Any) -> int:
    """A sequence number or chunk for ordering; anything unusable sorts as 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value) and len(value) < 19:
        return int(value)
    return 0
