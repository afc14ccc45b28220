"""AssemblyAI Universal Streaming v3: the wire protocol, sans I/O.

Shared by the client (:mod:`gateway.stt.assemblyai`) and our compatible server
(:mod:`gateway.stt.v3_server`). Nothing here touches a socket, a clock or an event loop: callers
feed strings, byte counts and times in, and get messages, events and verdicts out. Facts and their
sources are in ``shared/reference/assemblyai-v3.md`` (section numbers below refer to it).

Tolerance rules (the service adds message types and fields over time):

* unknown server message types parse to :class:`UnknownMessage`, unknown fields are ignored;
* numbers may arrive as int or float; a missing optional field gets its default;
* :class:`ProtocolError` is raised only for input that is not a JSON object, or for a *known*
  message whose fields have the wrong JSON type (or a ``Turn`` without a ``turn_order`` >= 0):
  a message that claims to be a ``Turn`` but cannot be read as one is a broken peer, not a newer
  one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, IntEnum, StrEnum
from typing import Any, TypeAlias
from urllib.parse import urlencode

from gateway.transcript.turn_set import TurnSet

__all__ = [
    "Begin",
    "ClientMessage",
    "ClientMessageError",
    "CloseAction",
    "CloseCode",
    "Encoding",
    "ErrorMessage",
    "FinalTurn",
    "ForceEndpoint",
    "KeepAlive",
    "PartialTurn",
    "ProtocolError",
    "QueryError",
    "RealtimeGuard",
    "ServerMessage",
    "SpeechStarted",
    "StreamingParams",
    "Terminate",
    "Termination",
    "Turn",
    "TurnEvent",
    "TurnTracker",
    "UnknownMessage",
    "UpdateConfiguration",
    "WarningMessage",
    "Word",
    "chunk_violation",
    "classify_close",
    "encode_client_message",
    "encode_server_message",
    "parse_client_message",
    "parse_server_message",
]

MIN_CHUNK_MS = 50
MAX_CHUNK_MS = 1000


class ProtocolError(ValueError):
    """A server frame that cannot be read as a v3 message (see the module docstring)."""


def _dumps(obj: object) -> str:
    # Compact like the service's own frames; non-ASCII text stays UTF-8 (frames are UTF-8 text).
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _loads(text: str | bytes) -> Any:
    """``json.loads`` that raises ValueError for every bad input (RecursionError included)."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


# -- field readers (server messages) ----------------------------------------------------------


def _is_number(value: object) -> bool:
    # bool is an int subclass in Python but never a number on this wire.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(obj: Mapping[str, Any], key: str, default: float) -> float:
    value = obj.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise ProtocolError(f"{key} must be a number, got {value!r}")
    number: float = value
    return number


def _opt_number(obj: Mapping[str, Any], key: str) -> float | None:
    return None if obj.get(key) is None else _number(obj, key, 0.0)


def _opt_int(obj: Mapping[str, Any], key: str) -> int | None:
    value = _opt_number(obj, key)
    if value is None:
        return None
    if not math.isfinite(value) or value != int(value):
        raise ProtocolError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _ms(obj: Mapping[str, Any], key: str) -> int:
    value = _number(obj, key, 0)
    if not math.isfinite(value):
        raise ProtocolError(f"{key} must be finite, got {value!r}")
    return round(value)


def _string(obj: Mapping[str, Any], key: str, default: str = "") -> str:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string, got {value!r}")
    return value


def _opt_string(obj: Mapping[str, Any], key: str) -> str | None:
    return None if obj.get(key) is None else _string(obj, key)


def _flag(obj: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(f"{key} must be a boolean, got {value!r}")
    return value


def _unix_seconds(value: object) -> float:
    """``Begin.expires_at``: Unix seconds (current service) or ISO-8601 (documented at launch)."""
    if _is_number(value):
        seconds: float = value  # type: ignore[assignment]
        return float(seconds)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ProtocolError(
                f"expires_at is neither Unix seconds nor ISO-8601: {value!r}"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # the service's clock is UTC
        return moment.timestamp()
    raise ProtocolError(f"expires_at must be a number or a string, got {value!r}")


# -- server -> client messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Word:
    """One word of a ``Turn``. Times are integer ms from the start of the session's audio (audio
    time, not wall time; they never reset per turn; a float on the wire is rounded).
    ``start == end`` occurs."""

    text: str
    start: int
    end: int
    confidence: float
    word_is_final: bool
    speaker: str | None = None


@dataclass(frozen=True, slots=True)
class Begin:
    """First message of a session. ``expires_at`` is Unix seconds; ``math.inf`` when the server
    did not say (the session then ends only by 3008)."""

    id: str
    expires_at: float
    configuration: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Turn:
    """A partial or end-of-turn hypothesis. ``end_of_turn`` is the only end signal;
    ``turn_is_formatted`` is not one (§3.2). Use :class:`TurnTracker` to decide finals."""

    turn_order: int
    turn_is_formatted: bool
    end_of_turn: bool
    transcript: str
    end_of_turn_confidence: float
    words: tuple[Word, ...]
    utterance: str = ""
    speaker_label: str | None = None
    language_code: str | None = None
    language_confidence: float | None = None


@dataclass(frozen=True, slots=True)
class Termination:
    """Last message of a session (after ``Terminate`` or expiry); the server closes 1000 next."""

    audio_duration_seconds: float | None
    session_duration_seconds: float | None


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """``{"type": "Error", ...}``, sent right before an error close with the same code; also the
    legacy untyped ``{"error": "..."}`` form, whose ``error_code`` is None."""

    error_code: int | None
    error: str


@dataclass(frozen=True, slots=True)
class WarningMessage:
    """A non-fatal notice; the session goes on."""

    warning_code: int | None
    warning: str


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """U3-Pro only: speech began at ``timestamp`` ms (audio time, like :class:`Word`)."""

    timestamp: int
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message type this module does not model (Heartbeat, SpeakerRevision, ...). ``data`` is
    the whole JSON object; ``type`` is ``""`` when the object had none."""

    type: str
    data: dict[str, Any]


ServerMessage: TypeAlias = (
    Begin | Turn | Termination | ErrorMessage | WarningMessage | SpeechStarted | UnknownMessage
)


def _parse_word(obj: object) -> Word:
    if not isinstance(obj, dict):
        raise ProtocolError(f"a word must be an object, got {obj!r}")
    return Word(
        text=_string(obj, "text"),
        start=_ms(obj, "start"),
        end=_ms(obj, "end"),
        confidence=_number(obj, "confidence", 0.0),
        word_is_final=_flag(obj, "word_is_final"),
        speaker=_opt_string(obj, "speaker"),
    )


def _parse_turn(obj: dict[str, Any]) -> Turn:
    order = _opt_int(obj, "turn_order")
    if order is None:
        raise ProtocolError("Turn without turn_order")
    if order < 0:
        raise ProtocolError(f"turn_order {order} is negative")
    words = obj.get("words")
    if words is None:
        words = []
    if not isinstance(words, list):
        raise ProtocolError(f"words must be a list, got {words!r}")
    return Turn(
        turn_order=order,
        turn_is_formatted=_flag(obj, "turn_is_formatted"),
        end_of_turn=_flag(obj, "end_of_turn"),
        transcript=_string(obj, "transcript"),
        end_of_turn_confidence=_number(obj, "end_of_turn_confidence", 0.0),
        words=tuple(_parse_word(w) for w in words),
        utterance=_string(obj, "utterance"),
        speaker_label=_opt_string(obj, "speaker_label"),
        language_code=_opt_string(obj, "language_code"),
        language_confidence=_opt_number(obj, "language_confidence"),
    )


def _parse_begin(obj: dict[str, Any]) -> Begin:
    expires = obj.get("expires_at")
    configuration = obj.get("configuration")
    if configuration is None:
        configuration = {}
    if not isinstance(configuration, dict):
        raise ProtocolError(f"configuration must be an object, got {configuration!r}")
    return Begin(
        id=_string(obj, "id"),
        expires_at=math.inf if expires is None else _unix_seconds(expires),
        configuration=configuration,
    )


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Parse one server text frame. Unknown types give :class:`UnknownMessage`.

    Raises :class:`ProtocolError` as described in the module docstring.
    """
    try:
        obj = _loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"not a JSON object: {type(obj).__name__}")
    kind = obj.get("type")
    if kind is None and "error" in obj:
        return ErrorMessage(None, _string(obj, "error"))  # the untyped pre-2026 error form
    if kind == "Turn":
        return _parse_turn(obj)
    if kind == "Begin":
        return _parse_begin(obj)
    if kind == "Termination":
        return Termination(
            _opt_number(obj, "audio_duration_seconds"),
            _opt_number(obj, "session_duration_seconds"),
        )
    if kind == "Error":
        return ErrorMessage(_opt_int(obj, "error_code"), _string(obj, "error"))
    if kind == "Warning":
        return WarningMessage(_opt_int(obj, "warning_code"), _string(obj, "warning"))
    if kind == "SpeechStarted":
        return SpeechStarted(_ms(obj, "timestamp"), _opt_number(obj, "confidence"))
    return UnknownMessage("" if kind is None else str(kind), obj)


def _without_none(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None}


def _word_json(w: Word) -> dict[str, Any]:
    return _without_none(
        {
            "start": w.start,
            "end": w.end,
            "text": w.text,
            "confidence": w.confidence,
            "word_is_final": w.word_is_final,
            "speaker": w.speaker,
        }
    )


def encode_server_message(msg: ServerMessage) -> str:
    """Serialize a server message as the service does: compact JSON, wire field names, None
    fields omitted, ``Begin.expires_at`` as integer Unix seconds (omitted when infinite), an
    empty ``Begin.configuration`` omitted. :func:`parse_server_message` inverts it (up to the
    sub-second part of ``expires_at``)."""
    obj: dict[str, Any]
    if isinstance(msg, Turn):
        obj = {
            "type": "Turn",
            "turn_order": msg.turn_order,
            "turn_is_formatted": msg.turn_is_formatted,
            "end_of_turn": msg.end_of_turn,
            "transcript": msg.transcript,
            "end_of_turn_confidence": msg.end_of_turn_confidence,
            "words": [_word_json(w) for w in msg.words],
            "utterance": msg.utterance,
            "speaker_label": msg.speaker_label,
            "language_code": msg.language_code,
            "language_confidence": msg.language_confidence,
        }
    elif isinstance(msg, Begin):
        obj = {
            "type": "Begin",
            "id": msg.id,
            "expires_at": int(msg.expires_at) if math.isfinite(msg.expires_at) else None,
            "configuration": msg.configuration or None,
        }
    elif isinstance(msg, Termination):
        obj = {
            "type": "Termination",
            "audio_duration_seconds": msg.audio_duration_seconds,
            "session_duration_seconds": msg.session_duration_seconds,
        }
    elif isinstance(msg, ErrorMessage):
        obj = {"type": "Error", "error_code": msg.error_code, "error": msg.error}
    elif isinstance(msg, WarningMessage):
        obj = {"type": "Warning", "warning_code": msg.warning_code, "warning": msg.warning}
    elif isinstance(msg, SpeechStarted):
        obj = {"type": "SpeechStarted", "timestamp": msg.timestamp, "confidence": msg.confidence}
    else:
        obj = dict(msg.data)
        if msg.type:
            obj["type"] = msg.type
    return _dumps(_without_none(obj))


# -- client -> server messages ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Terminate:
    """End the session gracefully: the server flushes Turns, sends Termination, closes 1000."""


@dataclass(frozen=True, slots=True)
class ForceEndpoint:
    """End the current turn now. On universal-streaming it may drop the in-flight tail (§2.2)."""


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Reset the server's ``inactivity_timeout`` timer; no reply."""


@dataclass(frozen=True, slots=True)
class UpdateConfiguration:
    """Mid-session changes (no acknowledgement; applies to audio processed afterwards).

    None means "unchanged" and is never sent. ``extra`` carries fields this module does not
    model, both ways (the SDK knows more than the service documents).
    """

    end_of_turn_confidence_threshold: float | None = None
    min_turn_silence: int | None = None
    max_turn_silence: int | None = None
    vad_threshold: float | None = None
    format_turns: bool | None = None
    keyterms_prompt: tuple[str, ...] | None = None
    filter_profanity: bool | None = None
    prompt: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


ClientMessage: TypeAlias = Terminate | ForceEndpoint | KeepAlive | UpdateConfiguration


class ClientMessageError(ProtocolError):
    """A client text frame the service rejects: close with ``code`` and ``reason`` (§2.2)."""

    def __init__(self, reason: str, code: int = 3006) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def encode_client_message(msg: ClientMessage) -> str:
    """Compact JSON with None fields omitted (the SDK's ``exclude_none``)."""
    if isinstance(msg, UpdateConfiguration):
        obj: dict[str, Any] = {"type": "UpdateConfiguration", **msg.extra}
        obj.update(
            end_of_turn_confidence_threshold=msg.end_of_turn_confidence_threshold,
            min_turn_silence=msg.min_turn_silence,
            max_turn_silence=msg.max_turn_silence,
            vad_threshold=msg.vad_threshold,
            format_turns=msg.format_turns,
            keyterms_prompt=None if msg.keyterms_prompt is None else list(msg.keyterms_prompt),
            filter_profanity=msg.filter_profanity,
            prompt=msg.prompt,
        )
        return _dumps(_without_none(obj))
    return _dumps({"type": type(msg).__name__})


_SIMPLE_CLIENT_MESSAGES: dict[str, ClientMessage] = {
    "Terminate": Terminate(),
    "ForceEndpoint": ForceEndpoint(),
    "KeepAlive": KeepAlive(),
}
_UPDATE_FLOATS = ("end_of_turn_confidence_threshold", "vad_threshold")
_UPDATE_INTS = ("min_turn_silence", "max_turn_silence")
_UPDATE_BOOLS = ("format_turns", "filter_profanity")
_UPDATE_KNOWN = frozenset(
    {"type", "keyterms_prompt", "prompt", "min_end_of_turn_silence_when_confident"}
    | set(_UPDATE_FLOATS + _UPDATE_INTS + _UPDATE_BOOLS)
)


def _parse_update(obj: dict[str, Any]) -> UpdateConfiguration:
    """Raises ProtocolError on a wrong JSON type (values are not range-checked: the service
    documents no rule for them)."""
    values: dict[str, Any] = {}
    for key in _UPDATE_FLOATS:
        values[key] = _opt_number(obj, key)
    for key in _UPDATE_INTS:
        values[key] = _opt_int(obj, key)
    for key in _UPDATE_BOOLS:
        values[key] = None if obj.get(key) is None else _flag(obj, key)
    if values["min_turn_silence"] is None:  # the deprecated name, still mapped by the SDK
        values["min_turn_silence"] = _opt_int(obj, "min_end_of_turn_silence_when_confident")
    terms = obj.get("keyterms_prompt")
    if terms is not None:
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise ProtocolError(f"keyterms_prompt must be a list of strings, got {terms!r}")
        terms = tuple(terms)
    extra = {k: v for k, v in obj.items() if k not in _UPDATE_KNOWN}
    return UpdateConfiguration(
        keyterms_prompt=terms, prompt=_opt_string(obj, "prompt"), extra=extra, **values
    )


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one client text frame as the service does.

    Raises :class:`ClientMessageError` (code 3006) with the documented reasons:
    ``Invalid JSON: <text>``, ``Invalid Message: <text>`` (not an object, or an
    ``UpdateConfiguration`` field of the wrong type) and ``Invalid Message Type: <text>``
    (missing or unknown ``type``). Extra fields on known messages are ignored.
    """
    shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
    try:
        obj = _loads(text)
    except ValueError:
        raise ClientMessageError(f"Invalid JSON: {shown}") from None
    if not isinstance(obj, dict):
        raise ClientMessageError(f"Invalid Message: {shown}")
    kind = obj.get("type")
    if kind == "UpdateConfiguration":
        try:
            return _parse_update(obj)
        except ProtocolError:
            raise ClientMessageError(f"Invalid Message: {shown}") from None
    if isinstance(kind, str) and kind in _SIMPLE_CLIENT_MESSAGES:
        return _SIMPLE_CLIENT_MESSAGES[kind]
    raise ClientMessageError(f"Invalid Message Type: {shown}")


# -- connection parameters --------------------------------------------------------------------


class QueryError(ValueError):
    """Invalid connection parameters; the message names the parameter and the rule."""


class Encoding(StrEnum):
    """Audio encodings of the Universal-Streaming models (mono only)."""

    PCM_S16LE = "pcm_s16le"
    PCM_MULAW = "pcm_mulaw"

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self is Encoding.PCM_S16LE else 1


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (low <= value <= high):
        raise QueryError(f"{name} must be between {low:g} and {high:g}, got {value!r}")


def _check_type(name: str, value: object, kind: type | tuple[type, ...]) -> None:
    if value is None:
        return
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass: True is not a sample rate.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise QueryError(f"{name} has the wrong type: {value!r}")


@dataclass(frozen=True, slots=True)
class StreamingParams:
    """Connect-time parameters (the query string of ``/v3/ws``), validated on construction.

    ``encoding`` is normalized to an :class:`Encoding` member (which is a ``str``).
    ``inactivity_timeout`` is in seconds, the silences in ms. Raises :class:`QueryError` for a
    value the service documents as invalid: sample_rate an int in 8000..96000, a known encoding,
    end_of_turn_confidence_threshold in 0..1, silences >= 0, max_speakers 1..10,
    inactivity_timeout 5..3600, keyterms_prompt strings.
    """

    speech_model: str = "universal-streaming-english"
    sample_rate: int = 16000
    encoding: str = Encoding.PCM_S16LE
    format_turns: bool = False
    end_of_turn_confidence_threshold: float | None = None
    min_turn_silence: int | None = None
    max_turn_silence: int | None = None
    keyterms_prompt: tuple[str, ...] | None = None
    speaker_labels: bool | None = None
    max_speakers: int | None = None
    inactivity_timeout: int | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.speech_model, str) or not self.speech_model:
            raise QueryError(f"speech_model must be a non-empty string, got {self.speech_model!r}")
        _check_type("sample_rate", self.sample_rate, int)
        _check_range("sample_rate", self.sample_rate, 8000, 96000)
        try:
            object.__setattr__(self, "encoding", Encoding(self.encoding))
        except ValueError:
            known = ", ".join(e.value for e in Encoding)
            raise QueryError(f"encoding must be one of {known}, got {self.encoding!r}") from None
        _check_type("format_turns", self.format_turns, bool)
        _check_type("speaker_labels", self.speaker_labels, bool)
        threshold = self.end_of_turn_confidence_threshold
        _check_type("end_of_turn_confidence_threshold", threshold, (int, float))
        _check_range("end_of_turn_confidence_threshold", threshold, 0.0, 1.0)
        for name in ("min_turn_silence", "max_turn_silence", "max_speakers", "inactivity_timeout"):
            _check_type(name, getattr(self, name), int)
        _check_range("min_turn_silence", self.min_turn_silence, 0, math.inf)
        _check_range("max_turn_silence", self.max_turn_silence, 0, math.inf)
        _check_range("max_speakers", self.max_speakers, 1, 10)
        _check_range("inactivity_timeout", self.inactivity_timeout, 5, 3600)
        terms = self.keyterms_prompt
        if terms is not None:
            if not isinstance(terms, list | tuple) or not all(isinstance(t, str) for t in terms):
                raise QueryError(f"keyterms_prompt must be a list of strings, got {terms!r}")
            object.__setattr__(self, "keyterms_prompt", tuple(terms))
        _check_type("token", self.token, str)

    @property
    def bytes_per_sample(self) -> int:
        """2 for pcm_s16le, 1 for pcm_mulaw."""
        return Encoding(self.encoding).bytes_per_sample

    def ms_of(self, nbytes: int) -> float:
        """Duration in ms of ``nbytes`` of audio in this encoding and sample rate."""
        return nbytes * 1000 / (self.bytes_per_sample * self.sample_rate)

    def to_query(self) -> str:
        """The URL query (without ``?``) as the SDK builds it: booleans ``true``/``false``,
        keyterms JSON-encoded, None omitted; ``speech_model`` always sent (its server default
        has changed several times)."""
        values: dict[str, object] = {
            "speech_model": self.speech_model,
            "sample_rate": self.sample_rate,
            "encoding": str(Encoding(self.encoding).value),
            "format_turns": self.format_turns,
            "end_of_turn_confidence_threshold": self.end_of_turn_confidence_threshold,
            "min_turn_silence": self.min_turn_silence,
            "max_turn_silence": self.max_turn_silence,
            "keyterms_prompt": self.keyterms_prompt,
            "speaker_labels": self.speaker_labels,
            "max_speakers": self.max_speakers,
            "inactivity_timeout": self.inactivity_timeout,
            "token": self.token,
        }
        pairs: list[tuple[str, str]] = []
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = json.dumps(list(value))
            else:
                text = str(value)
            pairs.append((key, text))
        return urlencode(pairs)

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> StreamingParams:
        """Parse (URL-decoded) query parameters as the server does.

        Unknown parameters are ignored, like the real service. The deprecated
        ``min_end_of_turn_silence_when_confident`` is read when ``min_turn_silence`` is absent.
        Booleans accept ``true``/``false``/``1``/``0`` in any case; ``keyterms_prompt`` must be a
        JSON list of strings. Raises :class:`QueryError` naming the bad parameter.
        """

        def get(key: str) -> str | None:
            value = query.get(key)
            return None if value is None else str(value).strip()

        def as_int(key: str) -> int | None:
            text = get(key)
            if text is None:
                return None
            try:
                return int(text)
            except ValueError:
                raise QueryError(f"{key} must be an integer, got {text!r}") from None

        def as_float(key: str) -> float | None:
            text = get(key)
            if text is None:
                return None
            try:
                value = float(text)
            except ValueError:
                raise QueryError(f"{key} must be a number, got {text!r}") from None
            if not math.isfinite(value):
                raise QueryError(f"{key} must be a finite number, got {text!r}")
            return value

        def as_bool(key: str) -> bool | None:
            text = get(key)
            if text is None:
                return None
            lowered = text.lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
            raise QueryError(f"{key} must be true or false, got {text!r}")

        keyterms: tuple[str, ...] | None = None
        raw_terms = get("keyterms_prompt")
        if raw_terms is not None:
            try:
                terms = _loads(raw_terms)
            except ValueError:
                terms = None
            if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                raise QueryError(
                    f"keyterms_prompt must be a JSON list of strings, got {raw_terms!r}"
                )
            keyterms = tuple(terms)

        min_silence = as_int("min_turn_silence")
        if min_silence is None:
            min_silence = as_int("min_end_of_turn_silence_when_confident")
        values: dict[str, Any] = {
            "speech_model": get("speech_model") or None,
            "sample_rate": as_int("sample_rate"),
            "encoding": get("encoding"),
            "format_turns": as_bool("format_turns"),
            "end_of_turn_confidence_threshold": as_float("end_of_turn_confidence_threshold"),
            "min_turn_silence": min_silence,
            "max_turn_silence": as_int("max_turn_silence"),
            "keyterms_prompt": keyterms,
            "speaker_labels": as_bool("speaker_labels"),
            "max_speakers": as_int("max_speakers"),
            "inactivity_timeout": as_int("inactivity_timeout"),
            "token": get("token"),
        }
        # Absent parameters take the dataclass defaults.
        return cls(**{k: v for k, v in values.items() if v is not None})


# -- close codes ------------------------------------------------------------------------------


class CloseCode(IntEnum):
    """WebSocket close codes the v3 service documents (§4.1)."""

    NORMAL = 1000
    ABNORMAL = 1006  # no close frame: the connection was lost
    POLICY = 1008  # auth/account; before 2026-02 also "too many concurrent sessions"
    TOO_BIG = 1009  # one message over 128 KiB
    INTERNAL = 1011
    SERVER_ERROR = 3005  # catch-all; before 2026-02 also what 3006-3008 are now
    INVALID_MESSAGE = 3006
    INPUT_DURATION = 3007  # chunk outside 50-1000 ms, or faster than real time
    SESSION_EXPIRED = 3008
    TOO_MANY_SESSIONS = 3009


class CloseAction(Enum):
    """What a client should do after a close."""

    CLEAN = "clean"  # normal end
    FAIL = "fail"  # auth/account: retrying cannot help
    RECONNECT = "reconnect"  # transient: new session with backoff, replay kept audio
    BUG = "bug"  # we broke the protocol: fail loudly, never loop
    ROLLOVER = "rollover"  # session hit its maximum duration: open a new one now
    BACKOFF = "backoff"  # rate/concurrency limit: reconnect after a longer backoff


_BY_CODE: dict[int, CloseAction] = {
    1000: CloseAction.CLEAN,
    1001: CloseAction.RECONNECT,  # going away (server restart)
    1002: CloseAction.BUG,  # the peer says we broke WebSocket framing
    1003: CloseAction.BUG,  # unsupported data
    1006: CloseAction.RECONNECT,
    1007: CloseAction.BUG,  # invalid payload (e.g. non-UTF-8 text)
    1009: CloseAction.BUG,
    1011: CloseAction.RECONNECT,
    1012: CloseAction.RECONNECT,  # service restart
    1013: CloseAction.BACKOFF,  # try again later
    3006: CloseAction.BUG,
    3007: CloseAction.BUG,
    3008: CloseAction.ROLLOVER,
    3009: CloseAction.BACKOFF,
    # v2 realtime codes, still listed by the SDKs but not documented for v3: mapped by meaning in
    # case a compatible server uses them; any other 4xxx reconnects.
    4000: CloseAction.BUG,  # bad sample rate
    4001: CloseAction.FAIL,  # not authorized
    4002: CloseAction.FAIL,  # insufficient funds
    4003: CloseAction.FAIL,  # feature not on this plan
    4008: CloseAction.ROLLOVER,  # session expired
    4029: CloseAction.BUG,  # audio sent too fast
    4032: CloseAction.BUG,  # audio chunk too short
    4033: CloseAction.BUG,  # audio chunk too long
    4100: CloseAction.BUG,  # invalid JSON
    4101: CloseAction.BUG,  # invalid message schema
    4102: CloseAction.BACKOFF,  # too many streams
}

# Reason fragments (lower case) that identify a cause whatever the code: before 2026-02-25 the
# service closed 3005 for invalid messages, bad chunks and expiry, and 1008 for concurrency.
_BY_REASON: tuple[tuple[str, CloseAction], ...] = (
    ("concurrent", CloseAction.BACKOFF),
    ("too many", CloseAction.BACKOFF),
    # Seen sporadically on connect with a valid key, gone on retry (node-sdk #97): back off and
    # retry; the retry limit still ends a real auth failure.
    ("incorrect padding", CloseAction.BACKOFF),
    ("session expired", CloseAction.ROLLOVER),
    ("input duration", CloseAction.BUG),
    ("transmission rate", CloseAction.BUG),
    ("invalid message", CloseAction.BUG),
    ("invalid json", CloseAction.BUG),
)


def classify_close(code: int | None, reason: str) -> CloseAction:
    """Decide what to do after the server closed with ``code``/``reason``.

    ``code`` None means the connection was lost without a close frame (RECONNECT). 1008 and 3005
    are refined by ``reason`` for the pre-2026-02 codes: 1008 mentioning concurrent sessions /
    "too many" / "incorrect padding" is BACKOFF (else FAIL: auth or account); 3005 with a
    3006/3007/3008/3009 reason gets that code's action (else RECONNECT). Unknown codes,
    including unknown 4xxx, RECONNECT: the client's retry limit bounds a loop, and failing a
    call on a code we cannot read is worse.
    """
    if code is None:
        return CloseAction.RECONNECT
    lowered = reason.lower()
    if code in (CloseCode.POLICY, CloseCode.SERVER_ERROR):
        for fragment, action in _BY_REASON:
            # 1008 only ever meant auth/account or concurrency.
            if fragment in lowered and (code == 3005 or action is CloseAction.BACKOFF):
                return action
        return CloseAction.FAIL if code == CloseCode.POLICY else CloseAction.RECONNECT
    return _BY_CODE.get(code, CloseAction.RECONNECT)


# -- final-turn rule --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartialTurn:
    """The turn's latest hypothesis; a later event for the same ``turn_order`` replaces it."""

    turn: Turn


@dataclass(frozen=True, slots=True)
class FinalTurn:
    """The turn's final text; emitted at most once per ``turn_order`` per tracker."""

    turn: Turn


TurnEvent: TypeAlias = PartialTurn | FinalTurn


class TurnTracker:
    """Which ``Turn`` messages of one session are partials and which are finals (§3.4).

    Works under both historical behaviours of ``format_turns``:

    * current: every message formatted when requested, one ``end_of_turn`` message per turn;
    * legacy (2025-06 .. 2026-03): an unformatted ``end_of_turn`` message, then, only when
      formatting was requested, a formatted ``end_of_turn`` duplicate with the same turn_order.

    Rules: a turn is final on its first ``end_of_turn`` message when formatting was not requested,
    else on its first formatted ``end_of_turn`` message. An unformatted ``end_of_turn`` while
    formatting was requested is *held* (and reported as a :class:`PartialTurn`): its formatted
    twin replaces it; if a message of a later turn (or :meth:`flush`) comes first, the held one
    becomes the final, so no turn is lost when the twin never comes (a server that ignores
    ``format_turns`` just delays finals until the next turn). At most one final per turn_order;
    later messages of a finalized turn are dropped, and so are partials of a turn at or below the
    highest turn_order that has ended (late partials). A late ``end_of_turn`` of an older turn
    that never ended is still made final.
    """

    def __init__(self, format_turns_requested: bool) -> None:
        self.format_turns_requested = format_turns_requested
        self._finalized = TurnSet()
        self._held: dict[int, Turn] = {}
        self._highest_ended = -1

    @property
    def held(self) -> tuple[Turn, ...]:
        """Unformatted end-of-turn messages waiting for their formatted twin."""
        return tuple(self._held[k] for k in sorted(self._held))

    def feed(self, turn: Turn) -> list[TurnEvent]:
        """Events for one ``Turn`` message, in order: finals released by it first, then its own
        event (if any). An empty list means the message is dropped."""
        order = turn.turn_order
        events: list[TurnEvent] = [
            self._finalize(self._held[k]) for k in sorted(self._held) if k < order
        ]
        if self._finalized.contains(None, order):
            return events
        if not turn.end_of_turn:
            if order > self._highest_ended:
                events.append(PartialTurn(turn))
            return events
        self._highest_ended = max(self._highest_ended, order)
        if not self.format_turns_requested or turn.turn_is_formatted:
            events.append(self._finalize(turn))
        else:
            self._held[order] = turn
            events.append(PartialTurn(turn))
        return events

    def flush(self) -> list[FinalTurn]:
        """End of session: every held turn becomes final, in turn order."""
        return [self._finalize(self._held[k]) for k in sorted(self._held)]

    def _finalize(self, turn: Turn) -> FinalTurn:
        self._held.pop(turn.turn_order, None)
        self._finalized.add(None, turn.turn_order)
        return FinalTurn(turn)


# -- server-side checks -----------------------------------------------------------------------


def _format_number(value: float, digits: int) -> str:
    # Python's shortest float repr after rounding: 20 -> "20.0", 1.3123264 -> "1.312326".
    return repr(round(float(value), digits))


def chunk_violation(nbytes: int, params: StreamingParams) -> str | None:
    """The service's 3007 reason if one binary message of ``nbytes`` holds less than 50 or more
    than 1000 ms of audio (bounds inclusive), else None."""
    ms = params.ms_of(nbytes)
    if MIN_CHUNK_MS <= ms <= MAX_CHUNK_MS:
        return None
    return (
        f"Input duration violation: {_format_number(ms, 3)} ms. "
        f"Expected between {MIN_CHUNK_MS} and {MAX_CHUNK_MS} ms"
    )


class RealtimeGuard:
    """The service's faster-than-real-time rule, sans I/O.

    Wall time is measured from the first :meth:`on_audio` call (the first chunk's arrival); audio
    may run ahead of it by at most ``allowance_s`` (the real service's allowance is unpublished
    and large; a client pacing at real time runs ahead by at most one chunk).
    """

    def __init__(self, allowance_s: float) -> None:
        if allowance_s < 0:
            raise ValueError(f"allowance_s must be >= 0, got {allowance_s}")
        self.allowance_s = allowance_s
        self.started: float | None = None

    def on_audio(self, audio_ms: float, now: float) -> str | None:
        """``audio_ms``: total audio received so far, this chunk included; ``now``: any monotonic
        clock in seconds. Returns the 3007 reason when the rule is broken, else None."""
        if self.started is None:
            self.started = now
        elapsed = now - self.started
        audio_s = audio_ms / 1000
        if audio_s <= elapsed + self.allowance_s + 1e-6:  # tolerate float rounding of times
            return None
        return (
            f"Audio Transmission Rate Exceeded: Received {_format_number(audio_s, 1)} sec. "
            f"audio in {_format_number(elapsed, 6)} sec"
        )
