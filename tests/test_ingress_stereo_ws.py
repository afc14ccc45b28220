"""Stereo PCM WebSockets: the sans-I/O decoder (no sockets)."""

from __future__ import annotations

import json

import pytest

from gateway.ingress.events import (
    Audio,
    CallEnded,
    CallStarted,
    Dtmf,
    MetadataChanged,
)
from gateway.ingress.stereo_ws import StereoStreamDecoder, StereoWsProtocolError
from gateway.media.codec import Codec

JAMBONZ = {
    "sampleRate": 16000,
    "mixType": "stereo",
    "callSid": "b7b1c1f0-1234",
    "callId": "sip-call-id@host",
    "direction": "inbound",
    "from": "+15555551234",
    "to": "+18005556789",
    "metadata": {"queue": "sales"},
}


def test_jambonz_metadata_starts_a_stereo_call() -> None:
    decoder = StereoStreamDecoder()
    (started,) = decoder.receive_text(json.dumps(JAMBONZ))
    assert isinstance(started, CallStarted)
    assert started.source == "stereo_ws"
    assert [(c.index, c.role, c.codec, c.sample_rate) for c in started.channels] == [
        (0, "customer", Codec.L16, 16000),
        (1, "agent", Codec.L16, 16000),
    ]
    assert started.source_ids == {"callSid": "b7b1c1f0-1234", "callId": "sip-call-id@host"}
    assert started.metadata["from"] == "+15555551234"
    assert started.metadata["metadata.queue"] == "sales"
    assert started.metadata["tracks"] == "left,right"
    assert decoder.call_key == "b7b1c1f0-1234"


def test_interleaved_frames_split_left_and_right() -> None:
    decoder = StereoStreamDecoder()
    decoder.receive_text(json.dumps({"mixType": "stereo", "sampleRate": 8000}))
    frame = b"\x01\x00\x02\x00" * 160
    assert decoder.receive_binary(frame) == [
        Audio(0, b"\x01\x00" * 160),
        Audio(1, b"\x02\x00" * 160),
    ]
    assert decoder.media_ms_received == 20.0


def test_partial_frames_are_carried_over() -> None:
    decoder = StereoStreamDecoder()
    decoder.receive_text("{}")
    assert decoder.receive_binary(b"\x01\x00\x02") == []
    assert decoder.receive_binary(b"\x00\x03\x00\x04\x00") == [
        Audio(0, b"\x01\x00\x03\x00"),
        Audio(1, b"\x02\x00\x04\x00"),
    ]


def test_mono_and_mixed() -> None:
    mono = StereoStreamDecoder(mix_type="mono")
    (started,) = mono.receive_text("plain text metadata from the dialplan")
    assert isinstance(started, CallStarted)
    assert [c.role for c in started.channels] == ["customer"]
    assert started.metadata["metadata"] == "plain text metadata from the dialplan"
    assert mono.receive_binary(b"\x05\x00\x06\x00") == [Audio(0, b"\x05\x00\x06\x00")]
    mixed = StereoStreamDecoder()
    (started,) = mixed.receive_text(json.dumps({"mixType": "mixed"}))
    assert isinstance(started, CallStarted)
    assert [c.role for c in started.channels] == ["mixed"]


def test_binary_first_uses_query_then_config() -> None:
    decoder = StereoStreamDecoder(query={"sampleRate": "16k", "mixType": "mono"})
    events = decoder.receive_binary(b"\x00\x00" * 4)
    started = events[0]
    assert isinstance(started, CallStarted)
    assert started.channels[0].sample_rate == 16000
    assert len(started.channels) == 1
    assert events[1:] == [Audio(0, b"\x00\x00" * 4)]


def test_roles_are_configurable_and_overridable_per_call() -> None:
    decoder = StereoStreamDecoder(roles={"left": "agent", "right": "customer"})
    (started,) = decoder.receive_text("{}")
    assert isinstance(started, CallStarted)
    assert [c.role for c in started.channels] == ["agent", "customer"]
    decoder = StereoStreamDecoder(query={"left_role": "caller"})
    (started,) = decoder.receive_text(json.dumps({"right_role": "callee"}))
    assert isinstance(started, CallStarted)
    assert [c.role for c in started.channels] == ["caller", "callee"]


def test_later_text_frames_are_dtmf_or_metadata() -> None:
    decoder = StereoStreamDecoder()
    decoder.receive_text(json.dumps(JAMBONZ))
    assert decoder.receive_text(json.dumps({"event": "dtmf", "dtmf": "5", "duration": 250})) == [
        Dtmf(0, "5")
    ]
    assert decoder.receive_text(json.dumps({"agent": {"id": 7}})) == [
        MetadataChanged((), {"agent.id": "7"})
    ]
    assert decoder.receive_text("stop metadata") == [MetadataChanged((), {"text": "stop metadata"})]
    with pytest.raises(StereoWsProtocolError) as exc:
        decoder.receive_text(json.dumps({"event": "dtmf", "dtmf": "55"}))
    assert exc.value.reason == "bad_message"
    assert decoder.close() == [CallEnded("hangup")]
    assert decoder.close() == []


@pytest.mark.parametrize(
    "meta", [{"sampleRate": 11025}, {"mixType": "surround"}, {"sampleRate": "fast"}]
)
def test_unsupported_formats(meta: dict[str, object]) -> None:
    with pytest.raises(StereoWsProtocolError) as exc:
        StereoStreamDecoder().receive_text(json.dumps(meta))
    assert exc.value.reason == "unsupported_format"


def test_message_too_large() -> None:
    decoder = StereoStreamDecoder(max_message_bytes=1024)
    with pytest.raises(StereoWsProtocolError) as exc:
        decoder.receive_text("x" * 2000)
    assert exc.value.reason == "message_too_large"


def test_nothing_before_start_ends_nothing() -> None:
    assert StereoStreamDecoder().close() == []


def _stereo_frame(left: int, right: int, samples: int = 160) -> bytes:
    """One interleaved frame (20 ms at 8 kHz by default) of two constant channels."""
    return (left.to_bytes(2, "little") + right.to_bytes(2, "little")) * samples


def test_batched_audio_is_handed_on_per_batch() -> None:
    decoder = StereoStreamDecoder(batch_ms=100)
    decoder.receive_text(json.dumps({"sampleRate": 8000}))
    frames = [_stereo_frame(i, 100 + i) for i in range(1, 6)]
    for frame in frames[:4]:
        assert decoder.receive_binary(frame) == []
    # Received, though still waiting: the rate guard counts it.
    assert decoder.media_ms_received == 80.0
    left, right = decoder.receive_binary(frames[4])
    assert left == Audio(0, b"".join(i.to_bytes(2, "little") * 160 for i in range(1, 6)))
    assert right == Audio(1, b"".join((100 + i).to_bytes(2, "little") * 160 for i in range(1, 6)))
    assert decoder.receive_binary(frames[0]) == []


def test_batched_audio_comes_before_a_dtmf_and_at_close() -> None:
    decoder = StereoStreamDecoder(batch_ms=100)
    decoder.receive_text(json.dumps({"sampleRate": 8000}))
    decoder.receive_binary(_stereo_frame(1, 2))
    # Half a sample frame waits too; it is not handed on until the frame is whole.
    decoder.receive_binary(_stereo_frame(3, 4) + b"\x05\x00")
    assert decoder.receive_text(json.dumps({"event": "dtmf", "dtmf": "9"})) == [
        Audio(0, b"\x01\x00" * 160 + b"\x03\x00" * 160),
        Audio(1, b"\x02\x00" * 160 + b"\x04\x00" * 160),
        Dtmf(0, "9"),
    ]
    decoder.receive_binary(b"\x06\x00")
    assert decoder.close() == [Audio(0, b"\x05\x00"), Audio(1, b"\x06\x00"), CallEnded("hangup")]


def test_batched_audio_survives_a_refused_text_frame() -> None:
    decoder = StereoStreamDecoder(batch_ms=100, max_message_bytes=1024)
    decoder.receive_text("{}")
    decoder.receive_binary(_stereo_frame(7, 8))
    with pytest.raises(StereoWsProtocolError):
        decoder.receive_text("x" * 2000)
    # The shell hands on what was received before the bad frame, then closes the stream.
    assert decoder.flush() == [Audio(0, b"\x07\x00" * 160), Audio(1, b"\x08\x00" * 160)]
    assert decoder.flush() == []


def test_the_first_binary_frame_is_handed_on_at_once() -> None:
    # A stream without metadata starts the call at its first frame; that frame is not held.
    decoder = StereoStreamDecoder(batch_ms=100)
    started, left, right = decoder.receive_binary(_stereo_frame(1, 2))
    assert isinstance(started, CallStarted)
    assert (left, right) == (Audio(0, b"\x01\x00" * 160), Audio(1, b"\x02\x00" * 160))
