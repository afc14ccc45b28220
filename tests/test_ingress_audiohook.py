"""AudioHook: the sans-I/O session (no sockets) and the upgrade authenticator."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.ingress.audiohook import (
    AudioHookProtocolError,
    AudioHookSession,
    SessionState,
    choose_media,
    format_duration,
    parse_duration,
)
from gateway.ingress.audiohook_signature import (
    AudioHookAuthenticator,
    AuthFailure,
    UpgradeRequest,
    parse_key_entries,
    parse_signature_input,
    sign_headers,
)
from gateway.ingress.events import (
    Audio,
    CallEnded,
    CallStarted,
    Gap,
    Hold,
    MetadataChanged,
    Resume,
)
from gateway.media.codec import Codec
from gateway.transcript.model import TurnUpdate, Word

SID = "30b0e395-84d3-4570-ac13-9a62d8f514c0"
ORG = "d7934305-0972-4844-938e-9060eef73d05"

BOTH = ["external", "internal"]
STEREO_PCMU = {"type": "audio", "format": "PCMU", "channels": BOTH, "rate": 8000}
MONO_EXT = {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}
STEREO_L16 = {"type": "audio", "format": "L16", "channels": BOTH, "rate": 8000}


class Client:
    """Builds client messages with correct seq numbers."""

    def __init__(self, session_id: str = SID) -> None:
        self.id = session_id
        self.seq = 0
        self.serverseq = 0

    def msg(self, type_: str, parameters: dict[str, Any] | None = None, **extra: Any) -> str:
        self.seq += 1
        body = {
            "version": "2",
            "id": self.id,
            "type": type_,
            "seq": self.seq,
            "serverseq": self.serverseq,
            "position": "PT0S",
            "parameters": parameters or {},
        }
        body.update(extra)
        return json.dumps(body)

    def open(self, media: list[dict[str, Any]] | None = None, **params: Any) -> str:
        p = {
            "organizationId": ORG,
            "conversationId": "090eaa2f-72fa-480a-83e0-8667ff89c0ec",
            "participant": {
                "id": "883efee8-3d6c-4537-b500-6d7ca4b92fa0",
                "ani": "+1-555-555-1234",
                "aniName": "John Doe",
                "dnis": "+1-800-555-6789",
            },
            "media": media if media is not None else [STEREO_PCMU, MONO_EXT],
            "language": "en-US",
        }
        p.update(params)
        return self.msg("open", p)


def opened_session(**kwargs: Any) -> tuple[AudioHookSession, Client]:
    session = AudioHookSession(session_id=SID, organization_id=ORG, **kwargs)
    client = Client()
    events = session.receive_text(client.open())
    assert isinstance(events[0], CallStarted)
    reply = json.loads(session.accept())
    client.serverseq = reply["seq"]
    return session, client


def test_open_chooses_stereo_pcmu_and_maps_external_to_customer() -> None:
    session = AudioHookSession(session_id=SID, organization_id=ORG)
    client = Client()
    (started,) = session.receive_text(client.open(media=[MONO_EXT, STEREO_L16, STEREO_PCMU]))
    assert isinstance(started, CallStarted)
    assert started.source == "audiohook"
    assert [(c.index, c.role, c.codec) for c in started.channels] == [
        (0, "customer", Codec.PCMU),
        (1, "agent", Codec.PCMU),
    ]
    assert started.channels[0].participant == "John Doe"
    assert started.source_ids["sessionId"] == SID
    assert started.source_ids["conversationId"] == "090eaa2f-72fa-480a-83e0-8667ff89c0ec"
    assert started.metadata["ani"] == "+1-555-555-1234"
    assert started.metadata["dnis"] == "+1-800-555-6789"
    assert started.metadata["tracks"] == "external,internal"
    opened = json.loads(session.accept())
    assert opened == {
        "version": "2",
        "id": SID,
        "type": "opened",
        "seq": 1,
        "clientseq": 1,
        "parameters": {"startPaused": False, "media": [STEREO_PCMU]},
    }
    assert session.state is SessionState.ACTIVE


def test_media_preference() -> None:
    assert choose_media([STEREO_L16, STEREO_PCMU]).format == "PCMU"  # type: ignore[union-attr]
    l16 = choose_media([STEREO_L16, STEREO_PCMU], ("L16", "PCMU"))
    assert l16 is not None and l16.format == "L16"
    mono = choose_media([MONO_EXT])
    assert mono is not None and mono.channels == ("external",)
    assert choose_media([{"type": "audio", "format": "OPUS", "channels": ["external"]}]) is None
    assert choose_media([{**STEREO_PCMU, "rate": 16000}]) is None
    assert choose_media("nope") is None


def test_binary_frames_split_into_external_and_internal() -> None:
    session, _ = opened_session()
    frame = bytes([1, 2] * 80)  # external = 1, internal = 2
    events = session.receive_binary(frame)
    assert events == [Audio(0, b"\x01" * 80), Audio(1, b"\x02" * 80)]
    assert session.position == 80


def test_internal_first_on_the_wire_still_lands_on_channel_1() -> None:
    session = AudioHookSession(session_id=SID)
    client = Client()
    swapped = {**STEREO_PCMU, "channels": ["internal", "external"]}
    (started,) = session.receive_text(client.open(media=[swapped]))
    assert isinstance(started, CallStarted)
    assert [c.role for c in started.channels] == ["customer", "agent"]
    session.accept()
    events = session.receive_binary(bytes([7, 9] * 4))
    assert events == [Audio(1, b"\x07" * 4), Audio(0, b"\x09" * 4)]


def test_l16_stereo_frames() -> None:
    session = AudioHookSession(session_id=SID, formats=("L16",))
    client = Client()
    session.receive_text(client.open(media=[STEREO_PCMU, STEREO_L16]))
    session.accept()
    frame = b"\x01\x00\x02\x00" * 3
    assert session.receive_binary(frame) == [Audio(0, b"\x01\x00" * 3), Audio(1, b"\x02\x00" * 3)]
    with pytest.raises(AudioHookProtocolError) as exc:
        session.receive_binary(b"\x01\x00\x02")
    assert exc.value.reason == "bad_audio"


def test_ping_pong_and_sequence_numbers() -> None:
    session, client = opened_session()
    assert session.receive_text(client.msg("ping", {"rtt": "PT0.05S"})) == []
    (pong,) = [json.loads(m) for m in session.data_to_send()]
    assert (pong["type"], pong["seq"], pong["clientseq"]) == ("pong", 2, 2)
    assert session.rtt_s == pytest.approx(0.05)
    assert session.data_to_send() == []


def test_paused_session_refuses_audio() -> None:
    session, client = opened_session()
    session.receive_binary(b"\xff" * 320)
    assert session.receive_text(client.msg("paused")) == [Hold()]
    with pytest.raises(AudioHookProtocolError) as exc:
        session.receive_binary(b"\xff" * 2)
    assert exc.value.reason == "binary_while_paused"


def test_resumed_and_discarded_declare_gaps() -> None:
    session, client = opened_session()
    session.receive_text(client.msg("paused"))
    events = session.receive_text(client.msg("resumed", {"start": "PT0S", "discarded": "PT1.5S"}))
    assert events == [Resume(), Gap(0, 12000), Gap(1, 12000)]
    events = session.receive_text(
        client.msg("discarded", {"start": "PT1.5S", "discarded": "PT0.25S"})
    )
    assert events == [Gap(0, 2000), Gap(1, 2000)]
    assert session.position == 14000
    # resumed outside PAUSED is ignored, as the reference server does
    assert session.receive_text(client.msg("resumed", {"discarded": "PT1S"})) == []


def test_update_and_client_error() -> None:
    session, client = opened_session()
    events = session.receive_text(client.msg("update", {"language": "es-ES"}))
    assert events == [MetadataChanged((), {"language": "es-ES"})]
    assert session.receive_text(client.msg("error", {"code": 429, "message": "slow"})) == []
    assert session.client_errors == ["429: slow"]


def test_close_then_closed() -> None:
    session, client = opened_session()
    assert session.receive_text(client.msg("close", {"reason": "end"})) == [CallEnded("end")]
    assert session.state is SessionState.CLOSING
    closed = json.loads(session.closed() or "")
    assert closed["type"] == "closed"
    assert session.closed() is None
    assert session.receive_text(client.msg("ping")) == []  # after closed: ignored


def test_disconnect_then_client_close() -> None:
    session, client = opened_session()
    text = session.disconnect("completed", "shutting down")
    assert text is not None and json.loads(text)["parameters"] == {
        "reason": "completed",
        "info": "shutting down",
    }
    assert session.disconnect("error") is None
    assert session.receive_binary(b"\xff" * 4) == []  # in flight: dropped
    assert session.receive_text(client.msg("ping")) == []
    assert session.receive_text(client.msg("close", {"reason": "disconnect"})) == []
    assert session.closed() is not None


def _error(session: AudioHookSession, text: str | bytes, binary: bool = False) -> str:
    with pytest.raises(AudioHookProtocolError) as exc:
        if binary:
            assert isinstance(text, bytes)
            session.receive_binary(text)
        else:
            session.receive_text(text)
    return exc.value.reason


def test_protocol_errors() -> None:
    session = AudioHookSession(session_id=SID, organization_id=ORG)
    assert _error(session, b"\xff" * 160, binary=True) == "binary_before_open"

    session, client = opened_session()
    client.seq += 1
    assert _error(session, client.msg("ping")) == "bad_seq"

    session, client = opened_session()
    assert _error(session, client.msg("ping", serverseq=5)) == "bad_serverseq"

    session, client = opened_session()
    assert _error(session, client.msg("ping", id="other")) == "session_mismatch"

    session, client = opened_session()
    assert _error(session, client.msg("dance")) == "unknown_type"

    session, client = opened_session()
    assert _error(session, client.msg("ping", version="1")) == "bad_version"

    session, client = opened_session()
    assert _error(session, client.msg("ping", comment="x" * 70_000)) == "message_too_large"

    session, client = opened_session()
    assert _error(session, "{not json") == "malformed_json"
    session, client = opened_session()
    assert _error(session, client.open()) == "duplicate_open"

    session = AudioHookSession(session_id=SID, organization_id=ORG)
    opus = {"type": "audio", "format": "OPUS", "channels": ["external", "internal"], "rate": 8000}
    assert _error(session, Client().open(media=[opus])) == "unsupported_format"

    session = AudioHookSession(session_id=SID, organization_id=ORG)
    with pytest.raises(AudioHookProtocolError) as exc:
        session.receive_text(Client().open(organizationId="someone-else"))
    assert (exc.value.reason, exc.value.disconnect_reason) == ("unauthorized", "unauthorized")


def test_continued_sessions_and_custom_config() -> None:
    session = AudioHookSession(session_id="new-session")
    client = Client("new-session")
    (started,) = session.receive_text(
        client.open(
            continuedSessions=[{"id": SID, "serverseq": 10, "clientseq": 20}],
            customConfig={"queue": "sales", "n": 3},
        )
    )
    assert session.continued_sessions == (SID,)
    assert isinstance(started, CallStarted)
    assert started.metadata["custom.queue"] == "sales"
    assert started.metadata["custom.n"] == "3"


def test_session_id_from_first_message_without_header() -> None:
    session = AudioHookSession()
    session.receive_text(Client().open())
    assert session.id == SID


def test_transcript_event_entity() -> None:
    session, _ = opened_session()
    update = TurnUpdate(
        channel=1,
        epoch=0,
        turn_order=3,
        words=(Word("hello", 1000, 1400, 0.9),),
        text="Hello.",
        start_ms=1000,
        end_ms=1400,
        final=True,
        confidence=0.9,
    )
    msg = json.loads(session.transcript_event(update) or "")
    assert msg["type"] == "event"
    (entity,) = msg["parameters"]["entities"]
    assert entity["type"] == "transcript"
    data = entity["data"]
    assert (data["channelId"], data["isFinal"], data["offset"], data["duration"]) == (
        1,
        True,
        "PT1S",
        "PT0.4S",
    )
    interp = data["alternatives"][0]["interpretations"][0]
    assert interp["transcript"] == "Hello."
    assert interp["tokens"][0]["value"] == "hello"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("PT0S", 0.0), ("PT1.5S", 1.5), ("PT2M3.25S", 123.25), ("P1DT1H", 90000.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "PT", "1.5", "PTxS", None, 3])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(AudioHookProtocolError):
        parse_duration(bad)


def test_format_duration() -> None:
    assert format_duration(1.5) == "PT1.5S"
    assert format_duration(0) == "PT0S"
    assert format_duration(0.0004) == "PT0S"


def test_any_input_raises_only_the_protocol_error() -> None:
    for junk in ("[]", "null", '{"type": 1}', json.dumps({"version": "2", "seq": True})):
        session = AudioHookSession()
        with pytest.raises(AudioHookProtocolError):
            session.receive_text(junk)


# -- the upgrade authenticator --------------------------------------------------------------

VECTOR_KEY = "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh"
VECTOR_SECRET = "TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU="
VECTOR_HEADERS = {
    "Audiohook-Organization-Id": "d7934305-0972-4844-938e-9060eef73d05",
    "Audiohook-Session-Id": "30b0e395-84d3-4570-ac13-9a62d8f514c0",
    "Audiohook-Correlation-Id": "e160e428-53e2-487c-977d-96989bf5c99d",
    "X-API-KEY": VECTOR_KEY,
    "Signature-Input": 'sig1=("@request-target" "@authority" "audiohook-organization-id" '
    '"audiohook-session-id" "audiohook-correlation-id" "x-api-key");'
    'keyid="SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh";nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";'
    'alg="hmac-sha256";created=1641013200;expires=3282026430',
    "Signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
}
VECTOR_CREATED = 1641013200


def _vector(headers: dict[str, str] | None = None) -> UpgradeRequest:
    return UpgradeRequest(
        "/api/v1/voicebiometrics/ws", ("audiohook.example.com",), headers or VECTOR_HEADERS
    )


def test_reference_signature_test_vector_verifies() -> None:
    auth = AudioHookAuthenticator({VECTOR_KEY: VECTOR_SECRET})
    assert auth.check(_vector(), now=VECTOR_CREATED + 1) is None
    # Our signer produces the same signature for the same inputs.
    signed = sign_headers(
        request_target="/api/v1/voicebiometrics/ws",
        authority="audiohook.example.com",
        headers=VECTOR_HEADERS,
        api_key=VECTOR_KEY,
        secret_b64=VECTOR_SECRET,
        nonce="VGhpc0lzQVVuaXF1ZU5vbmNl",
        created=1641013200,
        expires=3282026430,
    )
    assert signed["Signature"] == VECTOR_HEADERS["Signature"]
    assert signed["Signature-Input"] == VECTOR_HEADERS["Signature-Input"]


def test_wrong_secret_expired_and_short_nonce_are_refused() -> None:
    wrong = AudioHookAuthenticator({VECTOR_KEY: "V3JvbmdTZWNyZXQ="})
    assert wrong.check(_vector(), now=VECTOR_CREATED + 1) is AuthFailure.BAD_SIGNATURE
    auth = AudioHookAuthenticator({VECTOR_KEY: VECTOR_SECRET})
    assert auth.check(_vector(), now=VECTOR_CREATED + 14) is AuthFailure.SIGNATURE_EXPIRED
    assert auth.check(_vector(), now=VECTOR_CREATED - 10) is AuthFailure.SIGNATURE_FROM_FUTURE
    short = sign_headers(
        request_target="/api/v1/voicebiometrics/ws",
        authority="audiohook.example.com",
        headers=VECTOR_HEADERS,
        api_key=VECTOR_KEY,
        secret_b64=VECTOR_SECRET,
        nonce="tooShortNonce",
        created=VECTOR_CREATED,
        expires=VECTOR_CREATED + 60,
    )
    req = _vector({**VECTOR_HEADERS, **short})
    assert auth.check(req, now=VECTOR_CREATED + 1) is AuthFailure.SHORT_NONCE
    expired = sign_headers(
        request_target="/api/v1/voicebiometrics/ws",
        authority="audiohook.example.com",
        headers=VECTOR_HEADERS,
        api_key=VECTOR_KEY,
        secret_b64=VECTOR_SECRET,
        nonce="x" * 24,
        created=VECTOR_CREATED,
        expires=VECTOR_CREATED + 5,
    )
    req = _vector({**VECTOR_HEADERS, **expired})
    assert auth.check(req, now=VECTOR_CREATED + 9) is AuthFailure.SIGNATURE_EXPIRED
    assert auth.check(req, now=VECTOR_CREATED + 4) is None


def test_other_refusals() -> None:
    auth = AudioHookAuthenticator({VECTOR_KEY: VECTOR_SECRET, "plain-key": ""})
    now = VECTOR_CREATED + 1
    no_key = {k: v for k, v in VECTOR_HEADERS.items() if k != "X-API-KEY"}
    assert auth.check(_vector(no_key), now=now) is AuthFailure.MISSING_API_KEY
    assert auth.check(_vector({**VECTOR_HEADERS, "X-API-KEY": "nope"}), now=now) is (
        AuthFailure.BAD_API_KEY
    )
    unsigned = {k: v for k, v in VECTOR_HEADERS.items() if not k.startswith("Signature")}
    assert auth.check(_vector(unsigned), now=now) is AuthFailure.MISSING_SIGNATURE
    # A key configured without a secret needs no signature.
    assert auth.check(_vector({**unsigned, "X-API-KEY": "plain-key"}), now=now) is None
    tampered = {**VECTOR_HEADERS, "Audiohook-Session-Id": "another-session"}
    assert auth.check(_vector(tampered), now=now) is AuthFailure.BAD_SIGNATURE
    other_host = UpgradeRequest("/api/v1/voicebiometrics/ws", ("evil.example.com",), VECTOR_HEADERS)
    assert auth.check(other_host, now=now) is AuthFailure.BAD_SIGNATURE
    garbled = {**VECTOR_HEADERS, "Signature": "sig1=:%%%:"}
    assert auth.check(_vector(garbled), now=now) is AuthFailure.MALFORMED_SIGNATURE
    assert AudioHookAuthenticator({}).check(_vector(), now=now) is AuthFailure.UNSIGNED_REFUSED
    assert AudioHookAuthenticator({}, allow_unauthenticated=True).check(_vector(), now=now) is None


def test_signature_input_parsing_and_key_entries() -> None:
    (spec,) = parse_signature_input(VECTOR_HEADERS["Signature-Input"]).values()
    assert spec.label == "sig1"
    assert spec.params["created"] == 1641013200
    assert spec.params["alg"] == "hmac-sha256"
    assert parse_key_entries(["k1", f"k2:{VECTOR_SECRET}"]) == {"k1": "", "k2": VECTOR_SECRET}
    with pytest.raises(ValueError):
        parse_key_entries(["k:not base64!"])
