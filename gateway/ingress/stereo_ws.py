"""Stereo PCM WebSockets (FreeSWITCH mod_audio_fork / mod_audio_stream, jambonz ``listen``).

:class:`StereoStreamDecoder` is sans-I/O: the WebSocket shell hands it each text and binary
message and gets back normalized :class:`~gateway.ingress.events.IngressEvent` objects. It never
does I/O and, for any input whatsoever, raises nothing but :class:`StereoWsProtocolError`.

Wire format (reference notes, section 4)::

    first text frame -> call metadata: JSON (jambonz: sampleRate, mixType, callSid, from, to,
                        ...; mod_audio_fork: whatever the dialplan passed), or plain text
    binary frames    -> 16-bit little-endian PCM, interleaved left/right for mixType=stereo
    later text       -> {"event": "dtmf", "dtmf": "5"} -> Dtmf; other JSON -> MetadataChanged
    socket closed    -> CallEnded("hangup") (the shell calls :meth:`StereoStreamDecoder.close`)

The call starts at the first text frame, or at the first binary frame when no text came first
(mod_audio_fork without metadata). Rate and mix type come from the metadata, else the query
string (``?sampleRate=16000&mixType=stereo``), else the configured defaults. ``stereo`` gives
two channels, left (FreeSWITCH's read stream: the caller) = channel 0 with role ``customer`` and
right = channel 1 with role ``agent`` by default; ``mono`` and ``mixed`` give one. Per call,
``left_role`` / ``right_role`` in the metadata or query override the roles.

Timing: the streams carry no timestamps; each channel's audio is placed directly after its
previous audio (sample count). A binary frame may end mid-sample or mid-frame: the remainder is
kept for the next frame, so no sample is ever split between channels.

Batching: with ``batch_ms`` > 0, binary frames are gathered and handed on as one Audio event per
channel once ``batch_ms`` of audio is waiting (20 ms frames, ``batch_ms`` 100: one in five frames
yields events). Everything after the decoder (clock, STT chunking) then runs per batch instead of
per frame. A batch no longer than the STT chunk adds no delay to recognition: the chunk cannot
leave before its last sample arrives anyway. Waiting audio is handed on before any text frame's
events (a DTMF lands after the audio before it), by :meth:`flush`, and by :meth:`close`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.ingress.events import (
    Audio,
    CallEnded,
    CallStarted,
    ChannelSpec,
    Dtmf,
    IngressEvent,
    MetadataChanged,
)
from gateway.media.codec import Codec
from gateway.media.interleave import deinterleave

SOURCE = "stereo_ws"
SAMPLE_RATES = frozenset((8000, 16000, 24000, 32000, 48000))
MIX_TYPES = ("stereo", "mono", "mixed")
_RATES = ", ".join(map(str, sorted(SAMPLE_RATES)))
_DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")
# Identifiers from the metadata that become source ids (jambonz call attributes and common names).
_ID_FIELDS = (
    "callSid",
    "callId",
    "sbcCallid",
    "accountSid",
    "applicationSid",
    "traceId",
    "uuid",
    "call_uuid",
    "callUuid",
)
_FORMAT_FIELDS = ("sampleRate", "mixType", "sample_rate", "mix_type")


class StereoWsProtocolError(ValueError):
    """The stream cannot be taken. ``reason`` is a short metric token.

    Reasons: ``message_too_large``, ``unsupported_format`` (rate or mix type), ``bad_message``
    (a DTMF or metadata frame that is not usable), ``after_close``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _err(reason: str, message: str) -> StereoWsProtocolError:
    return StereoWsProtocolError(reason, message)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif value is not None:
            out[name] = _text(value)
    return out


class StereoStreamDecoder:
    """One stereo PCM WebSocket: messages in, normalized ingress events out.

    ``query`` is the upgrade URL's query (format and role fallbacks); ``sample_rate`` /
    ``mix_type`` the configured defaults; ``roles`` maps ``left`` / ``right`` / ``mono`` to
    channel roles.
    """

    def __init__(
        self,
        *,
        sample_rate: int = 8000,
        mix_type: str = "stereo",
        roles: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        max_message_bytes: int = 65536,
        batch_ms: int = 0,
    ) -> None:
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {sorted(SAMPLE_RATES)}")
        if mix_type not in MIX_TYPES:
            raise ValueError(f"mix_type must be one of {', '.join(MIX_TYPES)}")
        if batch_ms < 0:
            raise ValueError("batch_ms must be >= 0")
        self._default_rate = sample_rate
        self._default_mix = mix_type
        self._roles = {"left": "customer", "right": "agent", "mono": "customer"}
        if roles:
            self._roles.update(roles)
        self._query = dict(query or {})
        self._max_bytes = max_message_bytes
        self.started: CallStarted | None = None
        self.ended = False
        self.sample_rate = 0
        self.channels = 0
        self.samples = 0
        """Samples per channel received so far."""
        self.frames = 0
        self.bytes = 0
        self._batch_ms = batch_ms
        self._batch_bytes = 0  # set at the start, from the rate and channel count
        self._pending = bytearray()  # audio received, not yet handed on (whole frames and rest)

    @property
    def media_ms_received(self) -> float:
        return self.samples * 1000 / self.sample_rate if self.sample_rate else 0.0

    @property
    def call_key(self) -> str | None:
        """The platform's call id (jambonz ``callSid``), which a reconnect would repeat."""
        if self.started is None:
            return None
        ids = self.started.source_ids
        return ids.get("callSid") or ids.get("uuid") or ids.get("callId")

    def receive_text(self, text: str | bytes) -> list[IngressEvent]:
        """Handle one text frame: the audio waiting in the batch, then the frame's events.
        Raises only :class:`StereoWsProtocolError` (the waiting audio stays for :meth:`flush`)."""
        try:
            events = self._receive_text(text)
        except StereoWsProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - the contract: nothing but the protocol error
            raise _err("bad_message", f"cannot decode message: {type(exc).__name__}") from exc
        return self.flush() + events if self._pending else events

    def receive_binary(self, data: bytes) -> list[IngressEvent]:
        """Handle one binary (audio) frame. Raises only :class:`StereoWsProtocolError`."""
        if self.ended:
            raise _err("after_close", "audio after the stream ended")
        if self.started is None:
            out: list[IngressEvent] = [self._start({}, None)]
            self._take(data)
            return out + self.flush()
        self._take(data)
        if len(self._pending) >= self._batch_bytes:
            return self.flush()
        return []

    def flush(self) -> list[IngressEvent]:
        """The audio waiting in the batch, one Audio event per channel (none when no whole
        sample frame waits). Never raises."""
        pending = self._pending
        frame = 2 * self.channels
        whole = len(pending) - len(pending) % frame if frame else 0
        if not whole:
            return []
        block = bytes(pending[:whole])
        del pending[:whole]
        return [Audio(i, part) for i, part in enumerate(deinterleave(block, self.channels, 2))]

    def close(self) -> list[IngressEvent]:
        """The socket closed: the audio still waiting, then CallEnded (nothing if the call never
        started or already ended)."""
        if self.started is None or self.ended:
            return []
        out = self.flush()
        self.ended = True
        out.append(CallEnded("hangup"))
        return out

    def _take(self, data: bytes) -> None:
        self.frames += 1
        self.bytes += len(data)
        self._pending += data
        # Whole sample frames received, handed on or waiting: the rate guard's measure.
        self.samples = self.bytes // (2 * self.channels)

    # -- internals ---------------------------------------------------------------------------

    def _receive_text(self, text: str | bytes) -> list[IngressEvent]:
        if self.ended:
            raise _err("after_close", "message after the stream ended")
        if isinstance(text, str):
            size = len(text) if len(text) * 4 <= self._max_bytes else len(text.encode("utf-8"))
            raw = text
        else:
            size = len(text)
            raw = bytes(text).decode("utf-8", "replace")
        if size > self._max_bytes:
            raise _err(
                "message_too_large",
                f"text message of {size} bytes exceeds the {self._max_bytes}-byte limit",
            )
        try:
            msg: Any = json.loads(raw)
        except (ValueError, RecursionError):
            msg = None
        if self.started is None:
            if isinstance(msg, dict):
                return [self._start(msg, None)]
            return [self._start({}, raw.strip())]
        if not isinstance(msg, dict):
            return [MetadataChanged((), {"text": raw.strip()[:1000]})] if raw.strip() else []
        kind = msg.get("event") or msg.get("type")
        if kind == "dtmf":
            digit = msg.get("dtmf", msg.get("digit"))
            digit = str(digit) if isinstance(digit, (str, int)) else ""
            if len(digit) != 1 or digit not in _DTMF_DIGITS:
                raise _err("bad_message", f"dtmf digit must be one of 0-9*#A-D, got {digit!r:.20}")
            return [Dtmf(0, digit.upper())]
        meta = _flatten(msg)
        return [MetadataChanged((), meta)] if meta else []

    def _pick(self, meta: Mapping[str, Any], *names: str) -> Any:
        for name in names:
            if meta.get(name) is not None:
                return meta[name]
        for name in names:
            if self._query.get(name):
                return self._query[name]
        return None

    def _start(self, meta: dict[str, Any], text: str | None) -> CallStarted:
        raw_rate = self._pick(meta, "sampleRate", "sample_rate")
        rate = self._default_rate if raw_rate is None else raw_rate
        if isinstance(rate, str) and rate.strip().lower().removesuffix("k").isdigit():
            value = rate.strip().lower()
            rate = int(value[:-1]) * 1000 if value.endswith("k") else int(value)
        if isinstance(rate, bool) or not isinstance(rate, int) or rate not in SAMPLE_RATES:
            raise _err(
                "unsupported_format",
                f"sampleRate {rate!r:.20} is not one of {_RATES}",
            )
        mix = self._pick(meta, "mixType", "mix_type") or self._default_mix
        if mix not in MIX_TYPES:
            raise _err(
                "unsupported_format",
                f"mixType {mix!r:.20} is not one of {', '.join(MIX_TYPES)}",
            )
        left = self._pick(meta, "left_role", "leftRole")
        right = self._pick(meta, "right_role", "rightRole")
        if mix == "stereo":
            channels: tuple[ChannelSpec, ...] = (
                ChannelSpec(0, str(left or self._roles["left"]), None, Codec.L16, rate),
                ChannelSpec(1, str(right or self._roles["right"]), None, Codec.L16, rate),
            )
            tracks = "left,right"
        else:
            role = str(left or self._roles["mono"]) if mix == "mono" else "mixed"
            channels = (ChannelSpec(0, role, None, Codec.L16, rate),)
            tracks = "mono"
        source_ids = {
            name: _text(meta[name])
            for name in _ID_FIELDS
            if isinstance(meta.get(name), (str, int)) and not isinstance(meta.get(name), bool)
        }
        metadata = {
            k: v
            for k, v in _flatten(meta).items()
            if k not in _ID_FIELDS and k not in _FORMAT_FIELDS
        }
        if text:
            metadata["metadata"] = text[:1000]
        metadata.update({"tracks": tracks, "mixType": mix, "sampleRate": str(rate)})
        self.sample_rate = rate
        self.channels = len(channels)
        self._batch_bytes = rate * 2 * self.channels * self._batch_ms // 1000
        self.started = CallStarted(SOURCE, channels, source_ids, metadata)
        return self.started
