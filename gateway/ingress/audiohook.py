"""Genesys AudioHook Monitor, server side, as a sans-I/O protocol state machine.

:class:`AudioHookSession` is one AudioHook WebSocket seen from the server (reference notes,
section 3): the shell hands it each text and binary message and gets back normalized
:class:`~gateway.ingress.events.IngressEvent` objects; the JSON messages the server must send
(``opened``, ``pong``, ``closed``, ``disconnect``, ``event``) come from its methods and from
:meth:`AudioHookSession.data_to_send`. It never does I/O, never sleeps and, for any input
whatsoever, raises nothing but :class:`AudioHookProtocolError`.

State table (the reference server's, ``serversessionimpl.ts``)::

    PREPARING --open--> OPENING --accept()--> ACTIVE <--paused/resumed--> PAUSED
    any --close--> CLOSING --closed()--> CLOSED
    PREPARING..PAUSED --disconnect()/protocol error--> DISCONNECTING --close--> CLOSING

Rules:

1. Every text message is JSON with ``version`` "2", the session ``id`` (the
   ``Audiohook-Session-Id`` header when there was one), ``seq`` = previous ``seq`` + 1 and
   ``serverseq`` <= the last ``seq`` we sent; a text message over ``max_message_bytes`` (64 KiB),
   an unknown ``type`` or a malformed one is a protocol error. Binary audio is only accepted in
   ACTIVE (so binary before ``open`` or while paused is an error) and must be whole frames of the
   selected format.
2. ``open`` chooses, in the configured format order (PCMU, then L16), the stereo
   ``external``/``internal`` offer at 8 kHz, else a mono offer; nothing usable is the protocol
   error ``unsupported_format``. ``organizationId`` must equal the header's, else
   ``unauthorized``. It yields :class:`CallStarted`: channel 0 = ``external`` (role
   ``customer`` by default), 1 = ``internal`` (``agent``); conversation and participant ids,
   ANI, DNIS and language become source ids / metadata. The shell answers with
   :meth:`~AudioHookSession.accept` (``opened``) or :meth:`~AudioHookSession.disconnect`.
3. Audio is placed by ``position``, the session timeline the reference server keeps by
   counting samples: each channel's :class:`Audio` follows directly on the channel's previous
   audio (``timestamp`` None), and ``discarded{start, discarded}`` and ``resumed{start,
   discarded}`` advance the timeline by the declared duration as one :class:`Gap` per channel,
   so both channels stay aligned with Genesys' clock (:attr:`position` counts both).
4. ``ping`` is answered with ``pong`` at once; ``paused`` yields :class:`Hold`, ``resumed``
   :class:`Resume`; ``update`` yields :class:`MetadataChanged` (language); ``error`` from the
   client is recorded (it does not end the session).
5. ``close`` yields :class:`CallEnded` with the client's reason; the shell drains the call's
   STT sessions and then sends :meth:`~AudioHookSession.closed`. A protocol error is answered
   with ``disconnect{reason: "error"}`` (``unauthorized`` for authentication failures); the
   client then sends ``close`` and gets ``closed``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeGuard

from gateway.ingress.events import (
    Audio,
    CallEnded,
    CallStarted,
    ChannelSpec,
    Gap,
    Hold,
    IngressEvent,
    MetadataChanged,
    Resume,
)
from gateway.media.codec import Codec
from gateway.media.interleave import deinterleave
from gateway.transcript.model import TurnUpdate

VERSION = "2"
RATE = 8000
CHANNEL_NAMES: tuple[str, ...] = ("external", "internal")
DEFAULT_ROLES: dict[str, str] = {"external": "customer", "internal": "agent"}
# L16 frames are taken as little-endian: Genesys' reference server reads them as a typed
# Int16Array over the message bytes, i.e. in the host's (x86/ARM: little-endian) byte order,
# unlike RTP's network-order L16.
FORMATS: dict[str, Codec] = {"PCMU": Codec.PCMU, "L16": Codec.L16}
CLIENT_TYPES = frozenset(
    ("open", "close", "ping", "paused", "resumed", "discarded", "update", "error")
)
# A declared discard longer than this (one day) is bogus.
MAX_DISCARD_S = 86400.0

_DURATION = re.compile(
    r"P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?"
)


class SessionState(Enum):
    PREPARING = "preparing"
    OPENING = "opening"
    ACTIVE = "active"
    PAUSED = "paused"
    DISCONNECTING = "disconnecting"
    CLOSING = "closing"
    CLOSED = "closed"


class AudioHookProtocolError(ValueError):
    """The client broke the protocol; the session must end with ``disconnect``.

    ``reason`` is the metric token (``message_too_large``, ``malformed_json``, ``bad_message``,
    ``bad_version``, ``session_mismatch``, ``bad_seq``, ``bad_serverseq``, ``unknown_type``,
    ``duplicate_open``, ``binary_before_open``, ``binary_while_paused``, ``bad_audio``,
    ``unsupported_format``, ``bad_duration``, ``unauthorized``); ``disconnect_reason`` what the
    ``disconnect`` message says (``error`` or ``unauthorized``).
    """

    def __init__(self, reason: str, message: str, *, disconnect_reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason
        self.disconnect_reason = disconnect_reason


def _err(reason: str, message: str) -> AudioHookProtocolError:
    return AudioHookProtocolError(reason, message)


def parse_duration(value: Any) -> float:
    """An ISO-8601 duration such as ``PT12.34S`` (or ``P1DT2H3M4.5S``) in seconds.

    Raises AudioHookProtocolError (``bad_duration``) for anything else.
    """
    if not isinstance(value, str) or not value or value in ("P", "PT") or value.endswith("T"):
        raise _err("bad_duration", f"not an ISO-8601 duration: {value!r:.40}")
    m = _DURATION.fullmatch(value)
    if m is None:
        raise _err("bad_duration", f"not an ISO-8601 duration: {value!r:.40}")
    parts = {k: float(v) for k, v in m.groupdict().items() if v is not None}
    return (
        parts.get("d", 0.0) * 86400
        + parts.get("h", 0.0) * 3600
        + parts.get("m", 0.0) * 60
        + parts.get("s", 0.0)
    )


def format_duration(seconds: float) -> str:
    """Seconds as ``PT<s>S`` with millisecond precision (what AudioHook sends)."""
    text = f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".")
    return f"PT{text}S"


@dataclass(frozen=True, slots=True)
class MediaChoice:
    """The media the server selected: format, channel names in wire order, rate."""

    format: str
    channels: tuple[str, ...]
    rate: int = RATE

    @property
    def codec(self) -> Codec:
        return FORMATS[self.format]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel."""
        return self.codec.sample_width * len(self.channels)

    def as_json(self) -> dict[str, Any]:
        return {
            "type": "audio",
            "format": self.format,
            "channels": list(self.channels),
            "rate": self.rate,
        }


def choose_media(offers: Any, formats: Sequence[str] = ("PCMU", "L16")) -> MediaChoice | None:
    """The preferred usable offer: stereo external/internal first, in ``formats`` order."""
    if not isinstance(offers, list):
        return None
    usable: list[tuple[int, int, MediaChoice]] = []
    for offer in offers:
        if not isinstance(offer, dict) or offer.get("type", "audio") != "audio":
            continue
        fmt, rate, channels = offer.get("format"), offer.get("rate"), offer.get("channels")
        if fmt not in formats or fmt not in FORMATS or rate != RATE:
            continue
        if not isinstance(channels, list) or not channels:
            continue
        if len(set(channels)) != len(channels) or any(c not in CHANNEL_NAMES for c in channels):
            continue
        stereo = 0 if len(channels) == 2 else 1
        usable.append((stereo, list(formats).index(fmt), MediaChoice(fmt, tuple(channels))))
    if not usable:
        return None
    usable.sort(key=lambda item: (item[0], item[1]))
    return usable[0][2]


class AudioHookSession:
    """One AudioHook WebSocket, server side (see module docstring).

    ``session_id`` / ``organization_id`` come from the upgrade headers (None when absent: the
    first message's ``id`` is then taken). ``roles`` maps ``external`` / ``internal`` to channel
    roles.
    """

    def __init__(
        self,
        *,
        session_id: str | None = None,
        organization_id: str | None = None,
        roles: Mapping[str, str] | None = None,
        formats: Sequence[str] = ("PCMU", "L16"),
        max_message_bytes: int = 65536,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        unknown = [f for f in formats if f not in FORMATS]
        if unknown or not formats:
            raise ValueError(f"formats must be a non-empty subset of {', '.join(FORMATS)}")
        self.id = session_id or None
        self.organization_id = organization_id or None
        self._roles = dict(DEFAULT_ROLES)
        if roles:
            self._roles.update(roles)
        self._formats = tuple(formats)
        self._max_bytes = max_message_bytes
        self.state = SessionState.PREPARING
        self.seq = 0
        """The last ``seq`` we sent."""
        self.clientseq = 0
        """The last client ``seq`` seen."""
        self.media: MediaChoice | None = None
        self.started: CallStarted | None = None
        self.continued_sessions: tuple[str, ...] = ()
        """Ids of earlier sessions this one continues (``open.continuedSessions``)."""
        self.close_reason: str | None = None
        self.position = 0
        """Samples per channel on the session timeline (audio received plus declared gaps)."""
        self.client_position_s: float | None = None
        self.frames = 0
        self.bytes = 0
        self.rtt_s: float | None = None
        self.client_errors: list[str] = []
        self._channel_of: list[int] = []  # wire channel j -> call channel index
        self._outbox: list[str] = []

    # -- outgoing ----------------------------------------------------------------------------

    @property
    def timeline_ms(self) -> float:
        """How far the session's timeline has moved (audio received plus discarded spans), in
        ms: what a shell checks against real time."""
        return self.position * 1000 / RATE

    def data_to_send(self) -> list[str]:
        """Messages queued by :meth:`receive_text` (``pong``), in order; the queue is emptied."""
        out, self._outbox = self._outbox, []
        return out

    def _message(self, type_: str, parameters: dict[str, Any]) -> str:
        self.seq += 1
        return json.dumps(
            {
                "version": VERSION,
                "id": self.id or str(uuid.UUID(int=0)),
                "type": type_,
                "seq": self.seq,
                "clientseq": self.clientseq,
                "parameters": parameters,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    def accept(self) -> str:
        """``opened`` for the chosen media; the session becomes ACTIVE. Call after ``open``."""
        if self.state is not SessionState.OPENING or self.media is None:
            raise RuntimeError(f"accept() in state {self.state.value}")
        self.state = SessionState.ACTIVE
        return self._message("opened", {"startPaused": False, "media": [self.media.as_json()]})

    def disconnect(self, reason: str, info: str = "") -> str | None:
        """``disconnect{reason, info}`` (completed, unauthorized, error), or None when the
        session is already closing or closed. The client is expected to answer with ``close``.
        """
        if self.state in (SessionState.DISCONNECTING, SessionState.CLOSING, SessionState.CLOSED):
            return None
        self.state = SessionState.DISCONNECTING
        params: dict[str, Any] = {"reason": reason}
        if info:
            params["info"] = info[:500]
        return self._message("disconnect", params)

    def closed(self) -> str | None:
        """``closed``, after the client's ``close`` (and the STT drain); None if not CLOSING."""
        if self.state is not SessionState.CLOSING:
            return None
        self.state = SessionState.CLOSED
        return self._message("closed", {})

    def transcript_event(
        self, update: TurnUpdate, *, language: str | None = None, origin_ms: int = 0
    ) -> str | None:
        """An ``event`` message carrying ``update`` as a ``transcript`` entity.

        ``update.channel`` is a call channel; the entity's ``channelId`` is its index in the
        selected media. Offsets are on this session's timeline, whose position 0 is call time
        ``origin_ms`` (a session continuing a call after a reconnect starts later on the call
        clock); a turn from before it (finalized after the reconnect) is placed at 0, not
        dropped. None when the session cannot carry events now or the channel is not in the
        media.
        """
        if self.state not in (SessionState.ACTIVE, SessionState.PAUSED, SessionState.CLOSING):
            return None
        if update.channel not in self._channel_of:
            return None
        channel_id = self._channel_of.index(update.channel)
        tokens = [
            {
                "type": "word",
                "value": w.text,
                "confidence": round(w.confidence, 3),
                "offset": format_duration(max(0, w.start - origin_ms) / 1000),
                "duration": format_duration((w.end - w.start) / 1000),
                "language": language or "en-US",
            }
            for w in update.words
        ]
        data = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.id}/{update.key}")),
            "channelId": channel_id,
            "isFinal": update.final,
            "offset": format_duration(max(0, update.start_ms - origin_ms) / 1000),
            "duration": format_duration(max(0, update.end_ms - update.start_ms) / 1000),
            "alternatives": [
                {
                    "confidence": round(update.confidence, 3),
                    "languages": [language or "en-US"],
                    "interpretations": [
                        {"type": "display", "transcript": update.text, "tokens": tokens}
                    ],
                }
            ],
        }
        return self._message("event", {"entities": [{"type": "transcript", "data": data}]})

    # -- incoming ----------------------------------------------------------------------------

    def receive_text(self, text: str | bytes) -> list[IngressEvent]:
        """Handle one text message. Raises only :class:`AudioHookProtocolError`."""
        try:
            return self._text(text)
        except AudioHookProtocolError:
            raise
        except Exception as exc:  # noqa: BLE001 - the contract: nothing but the protocol error
            raise _err("bad_message", f"cannot decode message: {type(exc).__name__}") from exc

    def receive_binary(self, data: bytes) -> list[IngressEvent]:
        """Handle one binary (audio) message. Raises only :class:`AudioHookProtocolError`."""
        state = self.state
        if state in (SessionState.DISCONNECTING, SessionState.CLOSING, SessionState.CLOSED):
            return []  # audio still in flight while we wait for close: dropped
        if state is SessionState.PAUSED:
            raise _err("binary_while_paused", "audio received while the session is paused")
        if state is not SessionState.ACTIVE or self.media is None:
            raise _err("binary_before_open", f"audio received in state {state.value}")
        media = self.media
        if len(data) % media.frame_bytes:
            raise _err(
                "bad_audio",
                f"audio message of {len(data)} bytes is not whole {media.format} frames of "
                f"{len(media.channels)} channel(s)",
            )
        samples = len(data) // media.frame_bytes
        self.frames += 1
        self.bytes += len(data)
        if not samples:
            return []
        self.position += samples
        parts = deinterleave(bytes(data), len(media.channels), media.codec.sample_width)
        # Placed directly after the channel's previous audio or declared gap: together that is
        # the session's position, and it cannot shift a channel when a gap comes first.
        return [Audio(self._channel_of[j], part) for j, part in enumerate(parts)]

    # -- internals ---------------------------------------------------------------------------

    def _text(self, text: str | bytes) -> list[IngressEvent]:
        if isinstance(text, str):
            size = len(text) if len(text) * 4 <= self._max_bytes else len(text.encode("utf-8"))
        else:
            size = len(text)
        if size > self._max_bytes:
            raise _err(
                "message_too_large",
                f"text message of {size} bytes exceeds the {self._max_bytes}-byte limit",
            )
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            raise _err("malformed_json", "text message is not valid JSON") from None
        if not isinstance(msg, dict):
            raise _err("malformed_json", "text message is not a JSON object")
        if self.state is SessionState.CLOSED:
            return []
        type_, seq, serverseq = msg.get("type"), msg.get("seq"), msg.get("serverseq", 0)
        msg_id = msg.get("id")
        if not _is_int(seq) or not _is_int(serverseq):
            raise _err("bad_message", "message lacks an integer seq/serverseq")
        if not isinstance(type_, str) or not isinstance(msg_id, str):
            raise _err("bad_message", "message lacks a string type/id or an integer seq/serverseq")
        if self.state is SessionState.DISCONNECTING:
            # We already ended the session: only the client's close matters now, whatever
            # its numbering.
            if type_ == "close":
                self.clientseq = seq
                return self._dispatch(type_, {})
            return []
        if msg.get("version") != VERSION:
            raise _err("bad_version", f"version {msg.get('version')!r:.20} is not {VERSION!r}")
        if seq != self.clientseq + 1:
            raise _err(
                "bad_seq", f"seq {seq} does not follow {self.clientseq} (message {type_!r:.20})"
            )
        self.clientseq = seq
        if serverseq > self.seq:
            raise _err("bad_serverseq", f"serverseq {serverseq} is beyond our seq {self.seq}")
        if self.id is None:
            self.id = msg_id
        elif msg_id != self.id:
            raise _err("session_mismatch", "message id is not this session's id")
        if type_ not in CLIENT_TYPES:
            raise _err("unknown_type", f"unknown message type {type_!r:.40}")
        params = msg.get("parameters", {})
        if not isinstance(params, dict):
            raise _err("bad_message", f"{type_}.parameters must be an object")
        if "position" in msg:
            self.client_position_s = parse_duration(msg["position"])
        return self._dispatch(type_, params)

    def _dispatch(self, type_: str, params: dict[str, Any]) -> list[IngressEvent]:
        state = self.state
        if type_ == "close":
            if state is SessionState.CLOSING:
                return []
            reason = params.get("reason")
            self.close_reason = reason if isinstance(reason, str) and reason else "end"
            was_open = state in (SessionState.ACTIVE, SessionState.PAUSED, SessionState.OPENING)
            self.state = SessionState.CLOSING
            return [CallEnded(self.close_reason)] if was_open else []
        if type_ == "ping":
            rtt = params.get("rtt")
            if rtt is not None:
                self.rtt_s = parse_duration(rtt)
            self._outbox.append(self._message("pong", {}))
            return []
        if type_ == "error":
            code, message = params.get("code"), params.get("message")
            self.client_errors.append(f"{code}: {str(message)[:200]}")
            return []
        if type_ == "open":
            if state is not SessionState.PREPARING:
                raise _err("duplicate_open", f"open in state {state.value}")
            return self._open(params)
        if state not in (SessionState.ACTIVE, SessionState.PAUSED):
            raise _err("bad_message", f"{type_} before the session is open")
        if type_ == "paused":
            if state is SessionState.PAUSED:
                return []
            self.state = SessionState.PAUSED
            return [Hold()]
        if type_ == "resumed":
            if state is not SessionState.PAUSED:
                return []  # the reference server ignores it outside PAUSED
            self.state = SessionState.ACTIVE
            return [Resume(), *self._gap(params)]
        if type_ == "discarded":
            return self._gap(params)
        # update
        meta: dict[str, str] = {}
        language = params.get("language")
        if isinstance(language, str):
            meta["language"] = language
        return [MetadataChanged((), meta)] if meta else []

    def _gap(self, params: dict[str, Any]) -> list[IngressEvent]:
        raw = params.get("discarded")
        if raw is None:
            return []
        seconds = parse_duration(raw)
        if seconds > MAX_DISCARD_S:
            raise _err("bad_duration", f"discarded {raw!r:.40} is implausibly long")
        samples = round(seconds * RATE)
        if samples <= 0:
            return []
        self.position += samples
        return [Gap(index, samples) for index in sorted(self._channel_of)]

    def _open(self, params: dict[str, Any]) -> list[IngressEvent]:
        org = params.get("organizationId")
        if self.organization_id is not None and org != self.organization_id:
            raise AudioHookProtocolError(
                "unauthorized",
                "open.organizationId does not match the Audiohook-Organization-Id header",
                disconnect_reason="unauthorized",
            )
        media = choose_media(params.get("media"), self._formats)
        if media is None:
            raise _err(
                "unsupported_format",
                "no offered media is usable; supported: "
                f"{'/'.join(self._formats)} at {RATE} Hz, channels external/internal",
            )
        self.media = media
        # Call channels: external first (channel 0), whatever the wire order.
        ordered = [c for c in CHANNEL_NAMES if c in media.channels]
        self._channel_of = [ordered.index(c) for c in media.channels]
        participant = params.get("participant")
        participant = participant if isinstance(participant, dict) else {}
        name = participant.get("aniName")
        channels = tuple(
            ChannelSpec(
                i,
                self._roles.get(c, c),
                name if c == "external" and isinstance(name, str) and name else None,
                media.codec,
                RATE,
            )
            for i, c in enumerate(ordered)
        )
        source_ids = {"sessionId": self.id or ""}
        for key, value in (
            ("organizationId", org),
            ("conversationId", params.get("conversationId")),
            ("participantId", participant.get("id")),
        ):
            if isinstance(value, str) and value:
                source_ids[key] = value
        metadata: dict[str, str] = {"tracks": ",".join(ordered), "format": media.format}
        for key in ("ani", "aniName", "dnis"):
            value = participant.get(key)
            if isinstance(value, str) and value:
                metadata[key] = value
        language = params.get("language")
        if isinstance(language, str) and language:
            metadata["language"] = language
        custom = params.get("customConfig")
        if isinstance(custom, dict):
            for key, value in custom.items():
                metadata[f"custom.{key}"] = (
                    value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                )
        continued = params.get("continuedSessions")
        if isinstance(continued, list):
            self.continued_sessions = tuple(
                item["id"]
                for item in continued
                if isinstance(item, dict) and isinstance(item.get("id"), str)
            )
            if self.continued_sessions:
                metadata["continuedSessions"] = ",".join(self.continued_sessions)
        self.state = SessionState.OPENING
        self.started = CallStarted("audiohook", channels, source_ids, metadata)
        return [self.started]

    def call_channels(self) -> tuple[int, ...]:
        """The call channel of each wire channel of the selected media."""
        return tuple(self._channel_of)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
