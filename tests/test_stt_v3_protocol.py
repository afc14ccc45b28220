"""The v3 wire protocol, sans I/O: parsing, encoding, parameters, close codes, the final rule."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import pytest

from gateway.stt.v3_protocol import (
    Begin,
    ClientMessageError,
    CloseAction,
    CloseCode,
    Encoding,
    ErrorMessage,
    FinalTurn,
    ForceEndpoint,
    KeepAlive,
    ProtocolError,
    QueryError,
    RealtimeGuard,
    SpeechStarted,
    StreamingParams,
    Terminate,
    Termination,
    Turn,
    TurnEvent,
    TurnTracker,
    UnknownMessage,
    UpdateConfiguration,
    WarningMessage,
    Word,
    chunk_violation,
    classify_close,
    encode_client_message,
    encode_server_message,
    parse_client_message,
    parse_server_message,
)

# -- verbatim frames from the reference (§3) -----------------------------------------------------

BEGIN_INT = (
    '{"type": "Begin", "id": "de5d9927-73a6-4be8-b52d-b4c07be37e6b", "expires_at": 1759796682}'
)
BEGIN_CONFIG = (
    '{"type":"Begin","id":"3207b601-2054-48df-ba77-8784dfcf9fb8","expires_at":1772570132,'
    '"configuration":{"model":"u3-rt-pro","mode":"balanced","api_version":"1.0.0"}}'
)
TURN_PARTIAL = (
    '{"turn_order":0,"turn_is_formatted":true,"end_of_turn":false,"transcript":"",'
    '"end_of_turn_confidence":0.013648,'
    '"words":[{"start":2160,"end":2240,"text":"Hi","confidence":0.959187,"word_is_final":false}],'
    '"utterance":"","type":"Turn"}'
)
TURN_PARTIAL_2 = (
    '{"turn_order":0,"turn_is_formatted":true,"end_of_turn":false,"transcript":"Hi,",'
    '"end_of_turn_confidence":0.000041,'
    '"words":[{"start":2160,"end":2560,"text":"Hi,","confidence":0.868781,"word_is_final":true},'
    '{"start":2560,"end":2560,"text":"my","confidence":0.987536,"word_is_final":false}],'
    '"utterance":"","type":"Turn"}'
)
TURN_FINAL = (
    '{"turn_order":0,"turn_is_formatted":true,"end_of_turn":true,'
    '"transcript":"Hi, my name is Sonny.","end_of_turn_confidence":0.429525,'
    '"words":[{"start":3280,"end":3600,"text":"Sonny.","confidence":0.663976,'
    '"word_is_final":true}],"utterance":"Hi, my name is Sonny.","type":"Turn"}'
)
TERMINATION = '{"type": "Termination", "audio_duration_seconds": 7, "session_duration_seconds": 7}'
ERROR = (
    '{"type": "Error", "error_code": 3008, '
    '"error": "Session Expired: Maximum session duration exceeded"}'
)
WARNING = '{"type": "Warning", "warning": "session ending soon", "warning_code": 1234}'
HEARTBEAT = (
    '{"type": "Heartbeat", "total_audio_received_ms": 45000, "total_duration_ms": 45205, '
    '"realtime_factor": 0.9964, "max_speech_probability": 0.999954}'
)


def test_begin_with_int_expiry() -> None:
    msg = parse_server_message(BEGIN_INT)
    assert msg == Begin("de5d9927-73a6-4be8-b52d-b4c07be37e6b", 1759796682.0, {})


def test_begin_with_configuration() -> None:
    msg = parse_server_message(BEGIN_CONFIG)
    assert isinstance(msg, Begin)
    assert msg.expires_at == 1772570132
    assert msg.configuration == {"model": "u3-rt-pro", "mode": "balanced", "api_version": "1.0.0"}


@pytest.mark.parametrize(
    "iso",
    [
        "2025-06-02T15:04:42Z",
        "2025-06-02T15:04:42+00:00",
        "2025-06-02T15:04:42",
        "2025-06-02 15:04:42.000000",
    ],
)
def test_begin_with_iso_expiry(iso: str) -> None:
    msg = parse_server_message(json.dumps({"type": "Begin", "id": "x", "expires_at": iso}))
    assert isinstance(msg, Begin)
    assert msg.expires_at == datetime(2025, 6, 2, 15, 4, 42, tzinfo=UTC).timestamp()


def test_begin_with_offset_iso_expiry_and_missing_expiry() -> None:
    msg = parse_server_message('{"type":"Begin","id":"x","expires_at":"2025-06-02T17:04:42+02:00"}')
    assert isinstance(msg, Begin)
    assert msg.expires_at == datetime(2025, 6, 2, 15, 4, 42, tzinfo=UTC).timestamp()
    msg = parse_server_message('{"type":"Begin"}')
    assert msg == Begin("", math.inf, {})
    assert encode_server_message(msg) == '{"type":"Begin","id":""}'


def test_bad_expiry_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="expires_at"):
        parse_server_message('{"type":"Begin","id":"x","expires_at":"tomorrow"}')


def test_turn_partial() -> None:
    msg = parse_server_message(TURN_PARTIAL)
    assert msg == Turn(
        turn_order=0,
        turn_is_formatted=True,
        end_of_turn=False,
        transcript="",
        end_of_turn_confidence=0.013648,
        words=(Word("Hi", 2160, 2240, 0.959187, False),),
        utterance="",
    )


def test_turn_partial_with_final_word() -> None:
    msg = parse_server_message(TURN_PARTIAL_2)
    assert isinstance(msg, Turn)
    assert msg.transcript == "Hi,"
    assert msg.words == (
        Word("Hi,", 2160, 2560, 0.868781, True),
        Word("my", 2560, 2560, 0.987536, False),
    )


def test_turn_final() -> None:
    msg = parse_server_message(TURN_FINAL)
    assert isinstance(msg, Turn)
    assert msg.end_of_turn and msg.turn_is_formatted
    assert msg.transcript == msg.utterance == "Hi, my name is Sonny."
    assert msg.end_of_turn_confidence == 0.429525
    assert msg.words[-1] == Word("Sonny.", 3600 - 320, 3600, 0.663976, True)
    assert msg.speaker_label is None and msg.language_code is None


def test_turn_defaults_floats_and_extras() -> None:
    msg = parse_server_message(
        '{"type":"Turn","turn_order":3,"end_of_turn_confidence":1,"speaker_label":"A",'
        '"language_code":"en","language_confidence":0.9,"speaker_confidence":0.5,'
        '"words":[{"text":"yo","start":10.4,"end":20.6,"confidence":1,"word_is_final":true,'
        '"speaker":"A","extra":1}]}'
    )
    assert msg == Turn(
        turn_order=3,
        turn_is_formatted=False,
        end_of_turn=False,
        transcript="",
        end_of_turn_confidence=1,
        words=(Word("yo", 10, 21, 1, True, "A"),),
        speaker_label="A",
        language_code="en",
        language_confidence=0.9,
    )


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"Turn"}',  # no turn_order
        '{"type":"Turn","turn_order":"1"}',
        '{"type":"Turn","turn_order":1.5}',
        '{"type":"Turn","turn_order":true}',
        '{"type":"Turn","turn_order":-1}',
        '{"type":"Turn","turn_order":1,"end_of_turn":"yes"}',
        '{"type":"Turn","turn_order":1,"words":{}}',
        '{"type":"Turn","turn_order":1,"words":[1]}',
        '{"type":"Turn","turn_order":1,"words":[{"text":"a","start":"0"}]}',
        '{"type":"Begin","id":"x","expires_at":1,"configuration":[]}',
        '{"type":"Error","error_code":"x","error":"e"}',
    ],
)
def test_unreadable_known_messages(frame: str) -> None:
    with pytest.raises(ProtocolError):
        parse_server_message(frame)


def test_termination() -> None:
    assert parse_server_message(TERMINATION) == Termination(7, 7)
    assert parse_server_message('{"type":"Termination"}') == Termination(None, None)
    assert parse_server_message(
        '{"type":"Termination","audio_duration_seconds":7.5}'
    ) == Termination(7.5, None)


def test_error_frames() -> None:
    assert parse_server_message(ERROR) == ErrorMessage(
        3008, "Session Expired: Maximum session duration exceeded"
    )
    assert parse_server_message('{"error": "Audio duration is too short"}') == ErrorMessage(
        None, "Audio duration is too short"
    )


def test_warning_speech_started_and_unknown() -> None:
    assert parse_server_message(WARNING) == WarningMessage(1234, "session ending soon")
    assert parse_server_message('{"type": "SpeechStarted", "timestamp": 1280}') == SpeechStarted(
        1280
    )
    assert parse_server_message(
        '{"type":"SpeechStarted","timestamp":1280,"confidence":0.93}'
    ) == SpeechStarted(1280, 0.93)
    heartbeat = parse_server_message(HEARTBEAT)
    assert isinstance(heartbeat, UnknownMessage)
    assert heartbeat.type == "Heartbeat"
    assert heartbeat.data["realtime_factor"] == 0.9964
    assert parse_server_message('{"no_type": 1}') == UnknownMessage("", {"no_type": 1})


@pytest.mark.parametrize("frame", ["", "{", "nope", "[]", "1", '"Turn"', "null", "[" * 100000])
def test_non_objects_are_protocol_errors(frame: str) -> None:
    with pytest.raises(ProtocolError):
        parse_server_message(frame)


@pytest.mark.parametrize(
    "frame",
    [
        BEGIN_INT,
        BEGIN_CONFIG,
        TURN_PARTIAL,
        TURN_PARTIAL_2,
        TURN_FINAL,
        TERMINATION,
        ERROR,
        WARNING,
        HEARTBEAT,
        '{"error":"legacy"}',
    ],
)
def test_encode_parse_round_trip(frame: str) -> None:
    msg = parse_server_message(frame)
    encoded = encode_server_message(msg)
    assert parse_server_message(encoded) == msg
    compact = json.dumps(json.loads(encoded), separators=(",", ":"), ensure_ascii=False)
    assert encoded == compact
    assert "null" not in encoded


def test_encode_server_message_wire_shape() -> None:
    begin = Begin("id-1", 1759796682.9, {"model": "m"})
    assert json.loads(encode_server_message(begin)) == {
        "type": "Begin",
        "id": "id-1",
        "expires_at": 1759796682,
        "configuration": {"model": "m"},
    }
    turn = Turn(1, False, True, "hi", 1.0, (Word("hi", 0, 100, 0.5, True),), "hi")
    assert json.loads(encode_server_message(turn)) == {
        "type": "Turn",
        "turn_order": 1,
        "turn_is_formatted": False,
        "end_of_turn": True,
        "transcript": "hi",
        "end_of_turn_confidence": 1.0,
        "words": [{"start": 0, "end": 100, "text": "hi", "confidence": 0.5, "word_is_final": True}],
        "utterance": "hi",
    }
    assert encode_server_message(ErrorMessage(3007, "x")) == (
        '{"type":"Error","error_code":3007,"error":"x"}'
    )
    assert encode_server_message(Termination(7, 8)) == (
        '{"type":"Termination","audio_duration_seconds":7,"session_duration_seconds":8}'
    )


# -- client messages ----------------------------------------------------------------------------


def test_encode_client_messages() -> None:
    assert encode_client_message(Terminate()) == '{"type":"Terminate"}'
    assert encode_client_message(ForceEndpoint()) == '{"type":"ForceEndpoint"}'
    assert encode_client_message(KeepAlive()) == '{"type":"KeepAlive"}'
    update = UpdateConfiguration(min_turn_silence=700, keyterms_prompt=("AssemblyAI",))
    assert encode_client_message(update) == (
        '{"type":"UpdateConfiguration","min_turn_silence":700,"keyterms_prompt":["AssemblyAI"]}'
    )


@pytest.mark.parametrize(
    "frame",
    [
        '{"type": "Terminate"}',
        '{"type": "ForceEndpoint"}',
        '{"type": "KeepAlive"}',
        '{"type": "UpdateConfiguration", "sample_rate": 16000, "encoding": "pcm_s16le", '
        '"format_turns": true, "keyterms_prompt": ["AssemblyAI", "Universal Streaming"]}',
        '{"type": "UpdateConfiguration", "prompt": "Transcribe product names accurately.", '
        '"keyterms_prompt": ["AssemblyAI", "Universal-3"], "min_turn_silence": 700, '
        '"max_turn_silence": 1600}',
    ],
)
def test_client_message_round_trip(frame: str) -> None:
    msg = parse_client_message(frame)
    assert json.loads(encode_client_message(msg)) == json.loads(frame)
    assert parse_client_message(encode_client_message(msg)) == msg


def test_update_configuration_fields() -> None:
    msg = parse_client_message(
        '{"type":"UpdateConfiguration","end_of_turn_confidence_threshold":1,'
        '"min_end_of_turn_silence_when_confident":160,"format_turns":false,"vad_threshold":null}'
    )
    assert msg == UpdateConfiguration(
        end_of_turn_confidence_threshold=1, min_turn_silence=160, format_turns=False
    )
    assert parse_client_message('{"type":"Terminate","extra":1}') == Terminate()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "Invalid JSON: not json"),
        ('{"type": "Terminate"', 'Invalid JSON: {"type": "Terminate"'),
        ("[]", "Invalid Message: []"),
        ('"Terminate"', 'Invalid Message: "Terminate"'),
        ("42", "Invalid Message: 42"),
        ('{"type": "Bogus"}', 'Invalid Message Type: {"type": "Bogus"}'),
        ('{"type": 1}', 'Invalid Message Type: {"type": 1}'),
        ("{}", "Invalid Message Type: {}"),
        (
            '{"type": "UpdateConfiguration", "min_turn_silence": "x"}',
            'Invalid Message: {"type": "UpdateConfiguration", "min_turn_silence": "x"}',
        ),
        (
            '{"type": "UpdateConfiguration", "keyterms_prompt": "x"}',
            'Invalid Message: {"type": "UpdateConfiguration", "keyterms_prompt": "x"}',
        ),
    ],
)
def test_client_message_errors(frame: str, reason: str) -> None:
    with pytest.raises(ClientMessageError) as info:
        parse_client_message(frame)
    assert info.value.code == 3006
    assert info.value.reason == reason == str(info.value)


# -- query parameters ---------------------------------------------------------------------------


def test_query_defaults() -> None:
    p = StreamingParams()
    assert dict(parse_qsl(p.to_query())) == {
        "speech_model": "universal-streaming-english",
        "sample_rate": "16000",
        "encoding": "pcm_s16le",
        "format_turns": "false",
    }
    assert StreamingParams.from_query({}) == p
    assert p.bytes_per_sample == 2
    assert p.ms_of(3200) == 100.0


def test_query_round_trip() -> None:
    p = StreamingParams(
        speech_model="universal-streaming-multilingual",
        sample_rate=8000,
        encoding="pcm_mulaw",
        format_turns=True,
        end_of_turn_confidence_threshold=0.4,
        min_turn_silence=400,
        max_turn_silence=1280,
        keyterms_prompt=("AssemblyAI", "Callgate & co"),
        speaker_labels=True,
        max_speakers=2,
        inactivity_timeout=30,
        token="tok",
    )
    query = p.to_query()
    assert "keyterms_prompt=%5B%22AssemblyAI%22%2C+%22Callgate+%26+co%22%5D" in query
    assert "format_turns=true" in query and "speaker_labels=true" in query
    assert StreamingParams.from_query(dict(parse_qsl(query))) == p
    assert p.encoding is Encoding.PCM_MULAW and p.bytes_per_sample == 1
    assert p.ms_of(800) == 100.0


def test_query_lenient_parts() -> None:
    p = StreamingParams.from_query(
        {
            "min_end_of_turn_silence_when_confident": "160",
            "format_turns": "True",
            "speaker_labels": "0",
            "language": "en",  # deprecated, ignored
            "formatted_finals": "true",  # unknown, ignored
        }
    )
    assert p == StreamingParams(min_turn_silence=160, format_turns=True, speaker_labels=False)
    both = {"min_turn_silence": "400", "min_end_of_turn_silence_when_confident": "160"}
    assert StreamingParams.from_query(both).min_turn_silence == 400


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ({"sample_rate": "abc"}, "sample_rate must be an integer"),
        ({"sample_rate": "16000.0"}, "sample_rate must be an integer"),
        ({"sample_rate": "7999"}, "sample_rate must be between 8000 and 96000"),
        ({"sample_rate": "96001"}, "sample_rate must be between"),
        ({"encoding": "opus"}, "encoding must be one of pcm_s16le, pcm_mulaw"),
        ({"format_turns": "yes"}, "format_turns must be true or false"),
        ({"end_of_turn_confidence_threshold": "1.5"}, "end_of_turn_confidence_threshold must be"),
        ({"end_of_turn_confidence_threshold": "nan"}, "finite"),
        ({"min_turn_silence": "-1"}, "min_turn_silence must be between"),
        ({"max_turn_silence": "1.5"}, "max_turn_silence must be an integer"),
        ({"max_speakers": "0"}, "max_speakers must be between 1 and 10"),
        ({"max_speakers": "11"}, "max_speakers must be between 1 and 10"),
        ({"inactivity_timeout": "4"}, "inactivity_timeout must be between 5 and 3600"),
        ({"inactivity_timeout": "3601"}, "inactivity_timeout must be between 5 and 3600"),
        ({"keyterms_prompt": "AssemblyAI"}, "keyterms_prompt must be a JSON list of strings"),
        ({"keyterms_prompt": "[1]"}, "keyterms_prompt must be a JSON list of strings"),
        ({"keyterms_prompt": '{"a": 1}'}, "keyterms_prompt must be a JSON list of strings"),
    ],
)
def test_query_validation(query: dict[str, str], match: str) -> None:
    with pytest.raises(QueryError, match=match):
        StreamingParams.from_query(query)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(QueryError, match="sample_rate"):
        StreamingParams(sample_rate=True)
    with pytest.raises(QueryError, match="keyterms_prompt"):
        StreamingParams(keyterms_prompt="abc")  # type: ignore[arg-type]
    p = StreamingParams(keyterms_prompt=["a"])  # type: ignore[arg-type]
    assert p.keyterms_prompt == ("a",)


# -- close codes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "action"),
    [
        (None, "", CloseAction.RECONNECT),
        (1000, "", CloseAction.CLEAN),
        (1006, "", CloseAction.RECONNECT),
        (1011, "Internal error", CloseAction.RECONNECT),
        (3005, "Session Cancelled: An error occurred", CloseAction.RECONNECT),
        (1008, "Unauthorized Connection: Missing Authorization header", CloseAction.FAIL),
        (1008, "Unauthorized connection: Incorrect padding", CloseAction.BACKOFF),
        (1008, "Unauthorized Connection: Insufficient balance", CloseAction.FAIL),
        (1008, "Unauthorized Connection: Too many concurrent sessions", CloseAction.BACKOFF),
        (3009, "Unauthorized Connection: Too many concurrent sessions", CloseAction.BACKOFF),
        (3006, "Invalid JSON: x", CloseAction.BUG),
        (
            3007,
            "Input duration violation: 20.0 ms. Expected between 50 and 1000 ms",
            CloseAction.BUG,
        ),
        (1009, "", CloseAction.BUG),
        (3008, "Session Expired: Maximum session duration exceeded", CloseAction.ROLLOVER),
        # pre-2026-02: the 3005 catch-all carried these reasons
        (
            3005,
            "Input duration violation: 20.0 ms. Expected between 50 and 1000 ms",
            CloseAction.BUG,
        ),
        (3005, "Audio Transmission Rate Exceeded: Received 9 sec. audio in 1 sec", CloseAction.BUG),
        (3005, "Invalid Message Type: {}", CloseAction.BUG),
        (3005, "Session Expired: Maximum session duration exceeded", CloseAction.ROLLOVER),
        (4001, "Not Authorized", CloseAction.FAIL),
        (4102, "", CloseAction.BACKOFF),
        (4999, "", CloseAction.RECONNECT),
        (4321, "whatever", CloseAction.RECONNECT),
        (1013, "", CloseAction.BACKOFF),
    ],
)
def test_classify_close(code: int | None, reason: str, action: CloseAction) -> None:
    assert classify_close(code, reason) is action


def test_close_code_values() -> None:
    assert [int(c) for c in CloseCode] == [
        1000,
        1006,
        1008,
        1009,
        1011,
        3005,
        3006,
        3007,
        3008,
        3009,
    ]
    assert classify_close(CloseCode.SESSION_EXPIRED, "") is CloseAction.ROLLOVER


# -- the final-turn rule ------------------------------------------------------------------------


def turn(order: int, text: str, *, eot: bool = False, formatted: bool = False) -> Turn:
    words = tuple(Word(w, 100 * i, 100 * i + 80, 0.9, eot) for i, w in enumerate(text.split()))
    return Turn(order, formatted, eot, text, 0.5, words)


def kinds(events: list[TurnEvent]) -> list[tuple[str, int, str]]:
    return [
        ("final" if isinstance(e, FinalTurn) else "partial", e.turn.turn_order, e.turn.transcript)
        for e in events
    ]


def run(tracker: TurnTracker, turns: list[Turn]) -> list[tuple[str, int, str]]:
    out = []
    for t in turns:
        out += kinds(tracker.feed(t))
    return out + kinds(list(tracker.flush()))


def test_current_formatting_single_final() -> None:
    turns = [
        turn(0, "Hi", formatted=True),
        turn(0, "Hi, my", formatted=True),
        turn(0, "Hi, my name is Sonny.", eot=True, formatted=True),
        turn(1, "I", formatted=True),
        turn(1, "I am.", eot=True, formatted=True),
    ]
    assert run(TurnTracker(True), turns) == [
        ("partial", 0, "Hi"),
        ("partial", 0, "Hi, my"),
        ("final", 0, "Hi, my name is Sonny."),
        ("partial", 1, "I"),
        ("final", 1, "I am."),
    ]


LEGACY = [
    turn(0, "hi"),
    turn(0, "hi my name is sonny", eot=True),
    turn(0, "Hi, my name is Sonny.", eot=True, formatted=True),
    turn(1, "i"),
    turn(1, "i am", eot=True),
    turn(1, "I am.", eot=True, formatted=True),
]


def test_legacy_formatting_requested_emits_only_the_formatted_final() -> None:
    assert run(TurnTracker(True), LEGACY) == [
        ("partial", 0, "hi"),
        ("partial", 0, "hi my name is sonny"),  # held, not final
        ("final", 0, "Hi, my name is Sonny."),
        ("partial", 1, "i"),
        ("partial", 1, "i am"),
        ("final", 1, "I am."),
    ]


def test_legacy_without_formatting_unformatted_eot_is_final() -> None:
    unformatted = [t for t in LEGACY if not t.turn_is_formatted]
    expected = [
        ("partial", 0, "hi"),
        ("final", 0, "hi my name is sonny"),
        ("partial", 1, "i"),
        ("final", 1, "i am"),
    ]
    assert run(TurnTracker(False), unformatted) == expected
    # A formatted duplicate (a server formatting anyway) is dropped.
    assert run(TurnTracker(False), LEGACY) == expected


def test_held_legacy_eot_is_released_by_the_next_turn() -> None:
    tracker = TurnTracker(True)
    assert kinds(tracker.feed(turn(0, "hi there", eot=True))) == [("partial", 0, "hi there")]
    assert tracker.held == (turn(0, "hi there", eot=True),)
    assert kinds(tracker.feed(turn(1, "next"))) == [
        ("final", 0, "hi there"),
        ("partial", 1, "next"),
    ]
    # Its formatted twin arriving late is dropped: one final per turn.
    assert tracker.feed(turn(0, "Hi there.", eot=True, formatted=True)) == []
    assert tracker.flush() == []


def test_held_legacy_eot_is_released_by_flush() -> None:
    tracker = TurnTracker(True)
    tracker.feed(turn(0, "a", eot=True))
    tracker.feed(turn(0, "a b", eot=True))  # a newer unformatted EOT replaces the held one
    assert kinds(list(tracker.flush())) == [("final", 0, "a b")]
    assert tracker.flush() == []


def test_held_eot_then_next_turn_eot_directly() -> None:
    tracker = TurnTracker(True)
    tracker.feed(turn(4, "one", eot=True))
    events = tracker.feed(turn(5, "Two.", eot=True, formatted=True))
    assert kinds(events) == [("final", 4, "one"), ("final", 5, "Two.")]


def test_duplicate_finals_and_late_partials_are_dropped() -> None:
    tracker = TurnTracker(False)
    assert kinds(tracker.feed(turn(0, "a b", eot=True))) == [("final", 0, "a b")]
    assert tracker.feed(turn(0, "a b", eot=True)) == []
    assert tracker.feed(turn(0, "a")) == []  # partial of a finalized turn
    assert kinds(tracker.feed(turn(2, "c", eot=True))) == [("final", 2, "c")]
    assert tracker.feed(turn(1, "late")) == []  # partial below the highest final
    # a late end of a turn that never ended is still delivered, once
    assert kinds(tracker.feed(turn(1, "late turn", eot=True))) == [("final", 1, "late turn")]
    assert tracker.feed(turn(1, "late turn", eot=True)) == []
    assert kinds(tracker.feed(turn(3, "d"))) == [("partial", 3, "d")]


def test_partials_below_a_held_eot_are_dropped() -> None:
    tracker = TurnTracker(True)
    tracker.feed(turn(2, "x", eot=True))
    assert tracker.feed(turn(1, "old")) == []
    assert tracker.feed(turn(2, "x y")) == []
    assert kinds(list(tracker.flush())) == [("final", 2, "x")]


# -- server-side checks -------------------------------------------------------------------------


def test_chunk_violation() -> None:
    p = StreamingParams()
    assert chunk_violation(640, p) == (
        "Input duration violation: 20.0 ms. Expected between 50 and 1000 ms"
    )
    assert chunk_violation(1600, p) is None  # 50 ms: bounds inclusive
    assert chunk_violation(32000, p) is None  # 1000 ms
    assert chunk_violation(32002, p) == (
        "Input duration violation: 1000.062 ms. Expected between 50 and 1000 ms"
    )
    assert (
        chunk_violation(0, p) == "Input duration violation: 0.0 ms. Expected between 50 and 1000 ms"
    )
    mulaw = StreamingParams(sample_rate=8000, encoding="pcm_mulaw")
    assert chunk_violation(400, mulaw) is None
    assert chunk_violation(160, mulaw) == (
        "Input duration violation: 20.0 ms. Expected between 50 and 1000 ms"
    )


def test_realtime_guard() -> None:
    guard = RealtimeGuard(allowance_s=2.0)
    assert guard.on_audio(1000, now=100.0) is None  # first chunk: 1 s ahead, allowed
    assert guard.on_audio(3000, now=101.0) is None  # 3 s in 1 s: exactly at the allowance
    assert guard.on_audio(3100, now=101.0) == (
        "Audio Transmission Rate Exceeded: Received 3.1 sec. audio in 1.0 sec"
    )
    assert guard.on_audio(314_900, now=101.312326) == (
        "Audio Transmission Rate Exceeded: Received 314.9 sec. audio in 1.312326 sec"
    )
    with pytest.raises(ValueError):
        RealtimeGuard(-1)


def test_realtime_guard_accepts_real_time_paced_audio() -> None:
    guard = RealtimeGuard(allowance_s=0.1)
    for i in range(1, 1000):
        # chunk i (100 ms) arrives when its start is reached in wall time
        assert guard.on_audio(i * 100, now=50.0 + (i - 1) * 0.1) is None
