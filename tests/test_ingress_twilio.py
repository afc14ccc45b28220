"""Twilio Media Streams (and Telnyx / SignalWire dialects): the sans-I/O TwilioDecoder."""

from __future__ import annotations

import base64
import contextlib
import json
import random
from typing import Any

import pytest

from gateway.ingress.events import Audio, CallEnded, CallStarted, ChannelSpec, Dtmf, IngressEvent
from gateway.ingress.twilio import TwilioDecoder, TwilioProtocolError
from gateway.media.codec import Codec

SID = "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
CALL = "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
ACCOUNT = "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"

# Verbatim from the Twilio "Media Streams - WebSocket Messages" page (reference section 1.2).
CONNECTED = '{ "event": "connected", "protocol": "Call", "version": "1.0.0" }'
START_V = """{ "event": "start", "sequenceNumber": "1",
  "start": { "accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
             "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
             "callSid": "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "tracks": ["inbound"],
             "mediaFormat": { "encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1 },
             "customParameters": { "FirstName": "Jane", "LastName": "Doe", "RemoteParty": "Bob" } },
  "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX" }"""
DTMF_V = """{ "event": "dtmf", "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
  "sequenceNumber": "5", "dtmf": { "track": "inbound_track", "digit": "1" } }"""
MARK_V = """{ "event": "mark", "sequenceNumber": "4",
  "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "mark": { "name": "my label" } }"""
STOP_V = """{ "event": "stop", "sequenceNumber": "5",
  "stop": { "accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "callSid": "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX" },
  "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX" }"""

# Verbatim Telnyx messages (reference section 2.1); the media track is made concrete.
TELNYX_START = """{ "event": "start", "sequence_number": "1",
  "start": { "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
             "call_control_id": "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
             "media_format": { "encoding": "audio/x-mulaw", "sample_rate": 8000, "channels": 1 } },
  "stream_id": "32DE0DEA-53CB-4B21-89A4-9E1819C043BC" }"""
TELNYX_STOP = """{ "event": "stop", "sequence_number": "5",
  "stop": { "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
            "call_control_id": "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ" },
  "stream_id": "32DE0DEA-53CB-4B21-89A4-9E1819C043BC" }"""


def start_msg(
    tracks: list[str] | None = None,
    encoding: str = "audio/x-mulaw",
    rate: int | None = 8000,
    params: dict[str, Any] | None = None,
) -> str:
    fmt: dict[str, Any] = {"encoding": encoding, "channels": 1}
    if rate is not None:
        fmt["sampleRate"] = rate
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": ACCOUNT,
                "streamSid": SID,
                "callSid": CALL,
                "tracks": tracks if tracks is not None else ["inbound", "outbound"],
                "mediaFormat": fmt,
                "customParameters": params or {},
            },
            "streamSid": SID,
        }
    )


def media_msg(
    track: str, timestamp: Any, payload: bytes | str, chunk: int = 1, seq: int = 2
) -> str:
    b64 = payload if isinstance(payload, str) else base64.b64encode(payload).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "media": {"track": track, "chunk": str(chunk), "timestamp": timestamp, "payload": b64},
            "streamSid": SID,
        }
    )


def started(dec: TwilioDecoder, msg: str | bytes | None = None) -> CallStarted:
    events = dec.receive(msg if msg is not None else start_msg())
    assert len(events) == 1 and isinstance(events[0], CallStarted)
    return events[0]


def protocol_error(dec: TwilioDecoder, msg: str | bytes) -> TwilioProtocolError:
    with pytest.raises(TwilioProtocolError) as info:
        dec.receive(msg)
    assert type(info.value) is TwilioProtocolError
    assert str(info.value)
    return info.value


# -- the verbatim Twilio session ----------------------------------------------------------------


def test_verbatim_single_track_session() -> None:
    dec = TwilioDecoder()
    assert dec.receive(CONNECTED) == []
    assert dec.connected and dec.protocol_version == "1.0.0"
    call = started(dec, START_V)
    assert call.source == "twilio"
    assert call.channels == (ChannelSpec(0, "customer", None, Codec.PCMU, 8000),)
    assert call.source_ids == {"accountSid": ACCOUNT, "streamSid": SID, "callSid": CALL}
    assert call.metadata["param.FirstName"] == "Jane"
    assert call.metadata["param.RemoteParty"] == "Bob"
    assert dec.stream_id == SID
    # The doc's two-track example (timestamp "5"), with a real payload.
    payload = bytes(range(160))
    assert dec.receive(media_msg("inbound", "5", payload, chunk=2)) == [Audio(0, payload, 40)]
    assert dec.receive(MARK_V) == []
    assert dec.receive(DTMF_V) == [Dtmf(0, "1")]
    assert dec.receive(STOP_V) == [CallEnded("stop")]
    assert dec.ended
    assert dec.frames == 1 and dec.bytes == 160
    assert dec.media_ms_received == pytest.approx(20.0)


def test_both_tracks_default_roles_and_channels() -> None:
    dec = TwilioDecoder()
    call = started(dec)
    assert call.channels == (
        ChannelSpec(0, "customer", None, Codec.PCMU, 8000),
        ChannelSpec(1, "agent", None, Codec.PCMU, 8000),
    )
    assert call.metadata["tracks"] == "inbound,outbound"
    a, b = b"\x01" * 160, b"\x02" * 160
    # Outbound first with the same timestamp, as in the doc's example; one clock for both.
    assert dec.receive(media_msg("outbound", "5", b, chunk=1)) == [Audio(1, b, 40)]
    assert dec.receive(media_msg("inbound", "5", a, chunk=2)) == [Audio(0, a, 40)]
    assert dec.receive(media_msg("inbound", "25", a, chunk=3)) == [Audio(0, a, 200)]
    assert dec.frames == 3 and dec.bytes == 480
    assert dec.media_ms_received == pytest.approx(40.0)  # the busiest channel, not the sum


def test_roles_from_mapping_and_custom_parameters() -> None:
    dec = TwilioDecoder(roles={"inbound": "caller", "outbound": "rep"})
    assert [c.role for c in started(dec).channels] == ["caller", "rep"]

    dec = TwilioDecoder(roles={"inbound": "caller"})
    params = {"inbound_role": "agent", "outbound_role": "customer", "outbound_participant": "A7"}
    call = started(dec, start_msg(params=params))
    assert [(c.role, c.participant) for c in call.channels] == [
        ("agent", None),
        ("customer", "A7"),
    ]
    assert call.metadata["param.inbound_role"] == "agent"


def test_outbound_only_stream_is_one_channel() -> None:
    dec = TwilioDecoder()
    call = started(dec, start_msg(tracks=["outbound"]))
    assert call.channels == (ChannelSpec(0, "agent", None, Codec.PCMU, 8000),)
    assert dec.receive(media_msg("outbound", "0", b"\xff" * 4)) == [Audio(0, b"\xff" * 4, 0)]
    assert protocol_error(dec, media_msg("inbound", "0", b"\xff")).reason == "unknown_track"


@pytest.mark.parametrize(
    ("encoding", "rate", "codec", "expected_rate"),
    [
        ("audio/x-mulaw", 8000, Codec.PCMU, 8000),
        ("audio/x-alaw", 8000, Codec.PCMA, 8000),
        ("audio/x-l16", 16000, Codec.L16, 16000),
        ("audio/x-l16;rate=16000", None, Codec.L16, 16000),
        ("L16@24000h", None, Codec.L16, 24000),
        ("PCMU", 8000, Codec.PCMU, 8000),
        ("PCMA", 8000, Codec.PCMA, 8000),
    ],
)
def test_media_format(encoding: str, rate: int | None, codec: Codec, expected_rate: int) -> None:
    dec = TwilioDecoder()
    call = started(dec, start_msg(encoding=encoding, rate=rate))
    assert {(c.codec, c.sample_rate) for c in call.channels} == {(codec, expected_rate)}


def test_l16_16k_timestamps_and_byte_order() -> None:
    pcm_le = b"\x01\x02\x03\x04"
    dec = TwilioDecoder()
    started(dec, start_msg(encoding="audio/x-l16", rate=16000))
    assert dec.receive(media_msg("outbound", "20", pcm_le)) == [Audio(1, pcm_le, 320)]
    assert dec.media_ms_received == pytest.approx(2 / 16)

    dec = TwilioDecoder(l16_byte_order="big")
    started(dec, start_msg(encoding="audio/x-l16", rate=16000))
    assert dec.receive(media_msg("inbound", "20", b"\x02\x01\x04\x03")) == [Audio(0, pcm_le, 320)]
    assert protocol_error(dec, media_msg("inbound", "40", b"\x00" * 3)).reason == "bad_payload"


def test_numeric_timestamp_and_empty_payload() -> None:
    dec = TwilioDecoder()
    started(dec)
    assert dec.receive(media_msg("inbound", 1000, b"\xff")) == [Audio(0, b"\xff", 8000)]
    assert dec.receive(media_msg("inbound", "1020", b"")) == []
    assert dec.frames == 2


def test_missing_media_format_defaults_to_mulaw_8k() -> None:
    dec = TwilioDecoder()
    msg = json.loads(START_V)
    del msg["start"]["mediaFormat"]
    call = started(dec, json.dumps(msg))
    assert call.channels[0].codec is Codec.PCMU and call.channels[0].sample_rate == 8000


def test_bytes_message_is_accepted() -> None:
    dec = TwilioDecoder()
    started(dec, START_V.encode())
    assert dec.receive(STOP_V.encode()) == [CallEnded("stop")]


# -- Telnyx / SignalWire --------------------------------------------------------------------------


def telnyx_media(track: str, ts: str, payload: bytes, seq: int, chunk: int) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequence_number": str(seq),
            "media": {
                "track": track,
                "chunk": str(chunk),
                "timestamp": ts,
                "payload": base64.b64encode(payload).decode(),
            },
            "stream_id": "32DE0DEA-53CB-4B21-89A4-9E1819C043BC",
        }
    )


def test_telnyx_dialect_naming() -> None:
    dec = TwilioDecoder("telnyx")
    assert dec.receive('{"event": "connected", "version": "1.0.0"}') == []
    call = started(dec, TELNYX_START)
    assert call.source == "telnyx"
    assert call.channels == (ChannelSpec(0, "customer", None, Codec.PCMU, 8000),)
    assert call.source_ids == {
        "stream_id": "32DE0DEA-53CB-4B21-89A4-9E1819C043BC",
        "call_control_id": "v2:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ",
        "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
    }
    assert dec.stream_id == "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"
    assert dec.receive(telnyx_media("inbound", "5", b"\x7f" * 160, 4, 2)) == [
        Audio(0, b"\x7f" * 160, 40)
    ]
    assert dec.receive('{"event":"dtmf","stream_id":"x","sequence_number":"6",'
                       '"dtmf":{"digit":"#"}}') == [Dtmf(0, "#")]  # fmt: skip
    assert dec.receive('{"event":"error","payload":{"code":100003,"title":"x"}}') == []
    assert len(dec.remote_errors) == 1
    assert dec.receive(TELNYX_STOP) == [CallEnded("stop")]


def test_telnyx_pcma_both_tracks_via_default_tracks() -> None:
    msg = json.loads(TELNYX_START)
    msg["start"]["media_format"] = {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}
    dec = TwilioDecoder("telnyx", default_tracks=("inbound", "outbound"))
    call = started(dec, json.dumps(msg))
    assert [(c.index, c.role, c.codec) for c in call.channels] == [
        (0, "customer", Codec.PCMA),
        (1, "agent", Codec.PCMA),
    ]


def test_telnyx_reorder_window() -> None:
    dec = TwilioDecoder("telnyx", reorder_window_ms=40, default_tracks=["both_tracks"])
    started(dec, TELNYX_START)
    # Swapped pairs (1, 0, 3, 2, ...): no frame arrives more than the window late.
    order = [i ^ 1 for i in range(10)]
    out: list[IngressEvent] = []
    for i in order:
        out += dec.receive(telnyx_media("inbound", str(20 * i), bytes([i]) * 160, i + 2, i + 1))
    assert dec.pending_frames > 0
    out += dec.receive(TELNYX_STOP)
    assert isinstance(out[-1], CallEnded)
    audio = [e for e in out if isinstance(e, Audio)]
    assert [a.timestamp for a in audio] == [160 * i for i in range(10)]
    assert dec.pending_frames == 0


def test_signalwire_is_twilio_compatible() -> None:
    dec = TwilioDecoder("signalwire")
    call = started(dec, start_msg(encoding="L16@16000h", rate=None))
    assert call.source == "signalwire"
    assert call.channels[1] == ChannelSpec(1, "agent", None, Codec.L16, 16000)


# -- errors: only TwilioProtocolError, with a machine reason ---------------------------------------


def test_malformed_json() -> None:
    dec = TwilioDecoder()
    assert protocol_error(dec, "{not json").reason == "malformed_json"
    assert protocol_error(dec, "[1, 2]").reason == "malformed_json"
    assert protocol_error(dec, b"\xff\xfe{").reason == "malformed_json"
    assert protocol_error(dec, "[" * 100_000).reason in {"malformed_json", "message_too_large"}
    assert protocol_error(TwilioDecoder(max_message_bytes=10**6), "[" * 200_000).reason == (
        "malformed_json"
    )


def test_message_too_large() -> None:
    dec = TwilioDecoder()
    started(dec)
    big = media_msg("inbound", "0", b"\xff" * 50_000)
    assert len(big) > 65536
    assert protocol_error(dec, big).reason == "message_too_large"
    assert protocol_error(dec, big.encode()).reason == "message_too_large"
    # Multi-byte characters count in UTF-8 bytes.
    assert protocol_error(dec, '"' + "é" * 33_000 + '"').reason == "message_too_large"
    assert dec.frames == 0


def test_unknown_event_and_bad_message() -> None:
    dec = TwilioDecoder()
    assert protocol_error(dec, '{"event": "hangup"}').reason == "unknown_event"
    assert protocol_error(dec, '{"nope": 1}').reason == "bad_message"
    assert protocol_error(dec, '{"event": "start", "start": 5}').reason == "bad_message"
    assert protocol_error(dec, start_msg(tracks=["sideways"])).reason == "bad_message"


def test_media_before_start() -> None:
    dec = TwilioDecoder()
    dec.receive(CONNECTED)
    assert protocol_error(dec, media_msg("inbound", "0", b"\xff")).reason == "media_before_start"
    assert protocol_error(dec, DTMF_V).reason == "media_before_start"


def test_unsupported_codec() -> None:
    for msg in (
        start_msg(encoding="audio/opus"),
        start_msg(encoding="G722"),
        start_msg(rate=1_000_000),
    ):
        assert protocol_error(TwilioDecoder(), msg).reason == "unsupported_codec"
    stereo = json.loads(start_msg())
    stereo["start"]["mediaFormat"]["channels"] = 2
    assert protocol_error(TwilioDecoder(), json.dumps(stereo)).reason == "unsupported_codec"


def test_bad_base64() -> None:
    dec = TwilioDecoder()
    started(dec)
    assert protocol_error(dec, media_msg("inbound", "0", "no+Jho!!")).reason == "bad_base64"
    assert protocol_error(dec, media_msg("inbound", "0", "abc")).reason == "bad_base64"


@pytest.mark.parametrize("ts", ["-5", "5.0", "five", "", " 5", True, 1.5, [5], "9" * 40])
def test_bad_timestamp(ts: Any) -> None:
    dec = TwilioDecoder()
    started(dec)
    assert protocol_error(dec, media_msg("inbound", ts, b"\xff")).reason == "bad_timestamp"


def test_duplicate_start_after_stop_unknown_track() -> None:
    dec = TwilioDecoder()
    started(dec)
    assert protocol_error(dec, start_msg()).reason == "duplicate_start"
    assert protocol_error(dec, media_msg("sideways", "0", b"\xff")).reason == "unknown_track"
    dec.receive(STOP_V)
    assert protocol_error(dec, media_msg("inbound", "0", b"\xff")).reason == "after_stop"


def test_fuzz_never_raises_anything_else() -> None:
    rng = random.Random(1234)
    seeds = [CONNECTED, START_V, start_msg(), media_msg("inbound", "5", b"\x01" * 8), DTMF_V]
    seeds += [STOP_V, TELNYX_START, MARK_V]
    for _ in range(1500):
        text = bytearray(rng.choice(seeds).encode())
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(text))
            if op < 0.4:
                text[pos] = rng.randrange(256)
            elif op < 0.7:
                del text[pos : pos + rng.randint(1, 8)]
            else:
                text[pos:pos] = rng.choice([b'"', b"{", b"}", b"null", b"1e999", b"[]", b"\\u"])
        dec = TwilioDecoder(rng.choice(["twilio", "telnyx"]), reorder_window_ms=rng.choice([0, 40]))
        for msg in (start_msg(), bytes(text)):
            with contextlib.suppress(TwilioProtocolError):
                dec.receive(msg)


def test_structural_fuzz_on_started_decoder() -> None:
    values: list[Any] = [None, 0, -1, True, 1.5, "", "x", [], {}, [1], {"a": 1}, "inbound", 10**30]
    rng = random.Random(99)
    for _ in range(800):
        dec = TwilioDecoder()
        started(dec)
        msg = json.loads(rng.choice([media_msg("inbound", "5", b"\xff"), DTMF_V, START_V, STOP_V]))
        section = next((k for k in ("media", "dtmf", "start", "stop") if k in msg), "event")
        target = msg[section] if isinstance(msg.get(section), dict) else msg
        key = rng.choice([*target.keys(), "extra"])
        target[key] = rng.choice(values)
        with contextlib.suppress(TwilioProtocolError):
            dec.receive(json.dumps(msg))


def test_constructor_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        TwilioDecoder("vonage")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TwilioDecoder(max_message_bytes=0)
    with pytest.raises(ValueError):
        TwilioDecoder(reorder_window_ms=-1)
    with pytest.raises(ValueError):
        TwilioDecoder(default_tracks=["sideways"])
