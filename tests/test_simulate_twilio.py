"""The Twilio Media Streams call simulator: its scripts decode with our own decoder, and its
asyncio shell behaves on a real loopback socket (signature, pacing, redirects, early closes)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import socket
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import WSMsgType, web

from gateway.cli import UsageError
from gateway.ingress.events import Audio, CallEnded, CallStarted, IngressEvent
from gateway.ingress.file import FileSourceError
from gateway.ingress.twilio import TwilioDecoder, TwilioProtocolError
from gateway.ingress.twilio_signature import compute_signature
from gateway.media.codec import Codec, encode
from gateway.media.interleave import interleave
from gateway.media.wav import wav_header
from gateway.simulate import cli as simulate_cli
from gateway.simulate.twilio import (
    CallAudio,
    SimulationOptions,
    TwilioCallScript,
    WireAudio,
    prepare_audio,
    send_raw,
    simulate_call,
    simulate_calls,
)
from tests.conftest import call_path, channel_audio

CALL = "phone_diane_sheila"
BOTH = ("inbound", "outbound")


def wav_channels(path: Path) -> list[bytes]:
    """Each channel of a 16-bit WAV as PCM16 bytes, read independently of the simulator."""
    with wave.open(str(path)) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
    return [frames[:, c].tobytes() for c in range(frames.shape[1])]


def write_wav(path: Path, channels: list[bytes], rate: int = 8000) -> Path:
    data = np.stack([np.frombuffer(c, "<i2") for c in channels], axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


@pytest.fixture
def short_call(tmp_path: Path) -> Path:
    """One second of the test call, stereo 8 kHz (customer left, agent right)."""
    return write_wav(
        tmp_path / "short.wav",
        [channel_audio(CALL, 0, 10.0, 11.0), channel_audio(CALL, 1, 10.0, 11.0)],
    )


def short_audio() -> CallAudio:
    return CallAudio(8000, channel_audio(CALL, 0, 10.0, 11.0), channel_audio(CALL, 1, 10.0, 11.0))


def decode_all(decoder: TwilioDecoder, texts: list[str]) -> list[IngressEvent]:
    return [event for text in texts for event in decoder.receive(text)]


# -- the sans-I/O script ---------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["twilio", "telnyx", "signalwire"])
@pytest.mark.parametrize("codec", [Codec.PCMU, Codec.PCMA, Codec.L16])
def test_the_whole_call_decodes_with_the_gateway_decoder(dialect: Any, codec: Codec) -> None:
    path = call_path(CALL)
    audio = CallAudio.from_wav_bytes(path.read_bytes())
    options = SimulationOptions(dialect=dialect, codec=codec, custom_parameters={"who": "Diane"})
    script = TwilioCallScript(audio, options)
    (stream,) = script.streams
    sent = list(stream.messages())
    texts = [text for _, text in sent]
    decoder = TwilioDecoder(dialect, default_tracks=BOTH)
    events = decode_all(decoder, texts)

    started = events[0]
    assert isinstance(started, CallStarted)
    assert [(c.index, c.role, c.codec, c.sample_rate) for c in started.channels] == [
        (0, "customer", codec, 8000),
        (1, "agent", codec, 8000),
    ]
    assert started.metadata["param.who"] == "Diane"
    assert events[-1] == CallEnded("stop")
    assert decoder.ended and decoder.frames == 2 * 1500

    # Each channel's payloads, in order, are exactly the WAV channel in the wire codec, and
    # every frame's timestamp is 20 ms (160 samples) after the previous one.
    for channel, pcm in enumerate(wav_channels(path)):
        frames = [e for e in events if isinstance(e, Audio) and e.channel == channel]
        assert b"".join(f.payload for f in frames) == encode(codec, pcm)
        assert [f.timestamp for f in frames] == [160 * k for k in range(1500)]

    # On the wire: ids, string counters shared by both tracks, outbound first in each slot.
    msgs = [json.loads(t) for t in texts]
    seq_key = "sequence_number" if dialect == "telnyx" else "sequenceNumber"
    assert msgs[0]["event"] == "connected" and ("protocol" in msgs[0]) == (dialect != "telnyx")
    seqs = [m[seq_key] for m in msgs[1:]]
    assert all(isinstance(s, str) for s in seqs)
    assert [int(s) for s in seqs] == list(range(1, len(msgs)))
    media = [m["media"] for m in msgs if m["event"] == "media"]
    assert [m["chunk"] for m in media] == [str(i) for i in range(1, len(media) + 1)]
    assert [m["track"] for m in media[:4]] == ["outbound", "inbound", "outbound", "inbound"]
    inbound_ts = [m["timestamp"] for m in media if m["track"] == "inbound"]
    assert inbound_ts == [str(20 * k) for k in range(1500)]
    assert msgs[-1]["event"] == "stop"
    if dialect == "telnyx":
        start = msgs[1]["start"]
        assert "tracks" not in start and start["call_control_id"].startswith("v2:")
        assert start["media_format"]["encoding"] == {"pcmu": "PCMU", "pcma": "PCMA"}.get(
            codec.value, "L16"
        )
        assert msgs[1]["stream_id"] == stream.stream_sid
    else:
        start = msgs[1]["start"]
        assert re.fullmatch(r"CA[0-9a-f]{32}", start["callSid"])
        assert re.fullmatch(r"MZ[0-9a-f]{32}", start["streamSid"])
        assert re.fullmatch(r"AC[0-9a-f]{32}", start["accountSid"])
        assert start["tracks"] == ["inbound", "outbound"]
        assert start["mediaFormat"]["channels"] == 1

    # Send times: start at 0, each frame when its 20 ms are complete, never decreasing.
    times = [at for at, _ in sent]
    assert times[:2] == [0.0, 0.0] and times == sorted(times)
    assert times[2] == pytest.approx(0.02) and times[-1] == pytest.approx(30.0)


def test_l16_at_16_khz_and_a_mono_wav_inbound_only(tmp_path: Path) -> None:
    mono = write_wav(tmp_path / "mono.wav", [channel_audio(CALL, 0, 0.0, 0.5)])
    audio = CallAudio.from_wav_bytes(mono.read_bytes())
    assert audio.tracks == ("inbound",)
    options = SimulationOptions(codec=Codec.L16, sample_rate=16000)
    texts = [t for _, t in TwilioCallScript(audio, options).streams[0]]
    decoder = TwilioDecoder("twilio")
    events = decode_all(decoder, texts)
    started = events[0]
    assert isinstance(started, CallStarted)
    assert [(c.codec, c.sample_rate) for c in started.channels] == [(Codec.L16, 16000)]
    frames = [e for e in events if isinstance(e, Audio)]
    assert {f.channel for f in frames} == {0}
    assert len(frames) == 25 and all(len(f.payload) == 640 for f in frames)  # 320 samples
    assert json.loads(texts[1])["start"]["tracks"] == ["inbound"]


def test_drop_spans_leave_frames_out_and_timestamps_jump() -> None:
    options = SimulationOptions(drop=(("inbound", 100, 200), ("outbound", 0, 10)))
    script = TwilioCallScript(short_audio(), options)
    msgs = [json.loads(t) for _, t in script.streams[0]]
    media = [m["media"] for m in msgs if m["event"] == "media"]
    inbound = [int(m["timestamp"]) for m in media if m["track"] == "inbound"]
    outbound = [int(m["timestamp"]) for m in media if m["track"] == "outbound"]
    assert inbound[:6] == [0, 20, 40, 60, 80, 200]
    assert len(inbound) == 50 - 5
    assert outbound[0] == 20 and len(outbound) == 49
    # The decoder sees the jump as a timestamp (in samples), which is how gaps are found.
    decoder = TwilioDecoder("twilio")
    events = decode_all(decoder, [json.dumps(m) for m in msgs])
    ts = [e.timestamp for e in events if isinstance(e, Audio) and e.channel == 0]
    assert ts[4:6] == [640, 1600]
    # sequenceNumber and chunk still count only what was sent.
    assert [m["chunk"] for m in media] == [str(i) for i in range(1, len(media) + 1)]


def test_redirect_script_continues_the_call_on_a_new_stream() -> None:
    wire = WireAudio.from_audio(short_audio())
    options = SimulationOptions(
        redirect_at_s=0.4, redirect_gap_ms=100, custom_parameters={"k": "v"}
    )
    script = TwilioCallScript(wire, options)
    first, second = script.streams
    assert first.stream_sid != second.stream_sid
    assert (first.start_at_s, first.end_at_s) == (0.0, 0.4)
    assert second.start_at_s == pytest.approx(0.5) and second.end_at_s == pytest.approx(1.0)
    one = [json.loads(t) for _, t in first]
    two = [json.loads(t) for _, t in second]
    for msgs in (one, two):
        assert msgs[1]["start"]["callSid"] == script.call_sid
        assert msgs[1]["start"]["customParameters"] == {"k": "v"}
        assert msgs[1]["sequenceNumber"] == "1" and msgs[-1]["event"] == "stop"
    media_two = [m["media"] for m in two if m["event"] == "media"]
    assert media_two[0]["timestamp"] == "0" and media_two[0]["chunk"] == "1"
    # Audio continues at 0.5 s: frame 25 of the call.
    inbound = wire.payloads[wire.tracks.index("inbound")]
    assert next(m for m in media_two if m["track"] == "inbound")["payload"] == inbound[25]
    assert len([m for m in one if m["event"] == "media"]) == 2 * 20
    assert len(media_two) == 2 * 25


def test_shuffle_is_local_deterministic_and_reorderable() -> None:
    audio = short_audio()
    ids: dict[str, Any] = {"call_sid": "v2:x", "stream_sid": "S", "account_sid": "U"}
    plain = SimulationOptions(dialect="telnyx", **ids)
    shuffled = SimulationOptions(dialect="telnyx", shuffle_window=4, shuffle_seed=7, **ids)
    ordered = [t for _, t in TwilioCallScript(audio, plain).streams[0]]
    first = list(TwilioCallScript(audio, shuffled).streams[0])
    again = list(TwilioCallScript(audio, shuffled).streams[0])
    texts = [t for _, t in first]
    assert first == again and texts != ordered and sorted(texts) == sorted(ordered)
    assert [at for at, _ in first] == sorted(at for at, _ in first)
    for i, text in enumerate(texts):
        assert abs(ordered.index(text) - i) < 4
    # A decoder with a reorder window puts every frame back in place.
    decoder = TwilioDecoder("telnyx", default_tracks=BOTH, reorder_window_ms=100)
    events = decode_all(decoder, texts)
    pcm = [audio.inbound, audio.outbound]
    for channel in (0, 1):
        frames = [e for e in events if isinstance(e, Audio) and e.channel == channel]
        assert b"".join(f.payload for f in frames) == encode(Codec.PCMU, pcm[channel] or b"")


def test_wav_input_of_any_codec_and_rate(tmp_path: Path) -> None:
    pcm = channel_audio(CALL, 0, 5.0, 5.5)
    up = np.repeat(np.frombuffer(pcm, "<i2"), 2).tobytes()  # crude 16 kHz copy
    audio = CallAudio.from_wav_bytes(write_wav(tmp_path / "16k.wav", [up, up], 16000).read_bytes())
    assert audio.sample_rate == 16000
    wire = WireAudio.from_audio(audio)
    assert wire.sample_rate == 8000 and abs(wire.samples - 4000) <= 2 and wire.frames == 25
    # A G.711 WAV goes out bit-exact in the same codec (µ-law -> PCM16 -> µ-law is lossless).
    ulaw = [encode(Codec.PCMU, pcm), encode(Codec.PCMU, pcm[::-1])]
    body = interleave(ulaw, 1)
    audio = CallAudio.from_wav_bytes(wav_header(Codec.PCMU, 2, 8000, len(body)) + body)
    wire = WireAudio.from_audio(audio, codec=Codec.PCMU)
    for track, expected in zip(("inbound", "outbound"), ulaw, strict=True):
        frames = wire.payloads[wire.tracks.index(track)]
        assert b"".join(base64.b64decode(f) for f in frames) == expected
    with pytest.raises(FileSourceError, match="3 channels"):
        CallAudio.from_wav_bytes(write_wav(tmp_path / "3.wav", [pcm, pcm, pcm]).read_bytes())
    with pytest.raises(FileSourceError):
        CallAudio.from_wav_bytes(b"RIFF....WAVEjunk")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dialect": "vonage"},
        {"codec": "opus"},
        {"sample_rate": 16000},  # G.711 is 8 kHz only
        {"codec": Codec.L16, "sample_rate": 11025},  # 20 ms is not whole samples
        {"speed": -1.0},
        {"speed": float("nan")},
        {"drop": (("both", 0, 10),)},
        {"drop": (("inbound", 20, 10),)},
        {"redirect_at_s": 0.0},
        {"redirect_gap_ms": -5.0},
        {"custom_parameters": {"": "x"}},
    ],
)
def test_bad_options_raise_value_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulationOptions(**kwargs)


def test_redirect_outside_the_call_and_mismatched_audio_raise() -> None:
    wire = WireAudio.from_audio(short_audio())
    with pytest.raises(ValueError, match="not inside"):
        TwilioCallScript(wire, SimulationOptions(redirect_at_s=1.0))
    with pytest.raises(ValueError, match="options ask for"):
        TwilioCallScript(wire, SimulationOptions(codec=Codec.PCMA))
    assert SimulationOptions(codec="alaw").codec is Codec.PCMA  # type: ignore[arg-type]


# -- the asyncio shell, over a loopback socket ------------------------------------------------


@dataclass
class Conn:
    """One WebSocket the test server accepted, and everything it received."""

    path: str
    headers: dict[str, str]
    texts: list[str] = field(default_factory=list)
    events: list[IngressEvent] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Server:
    base: str
    conns: list[Conn]

    def url(self, mode: str) -> str:
        return f"{self.base}/{mode}"


CONNS = web.AppKey("conns", list[Conn])


async def _handler(request: web.Request) -> web.StreamResponse:
    """Modes: twilio / telnyx (decode, wait for the client to close), close-on-stop (close
    1000 after stop, like the gateway), bad-after-5 (close 1008 after 5 frames), forbidden."""
    mode = request.match_info["mode"]
    if mode == "forbidden":
        return web.Response(status=403, text="bad_signature: no\n")
    conns = request.app[CONNS]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    conn = Conn(mode, dict(request.headers))
    conns.append(conn)
    decoder = TwilioDecoder("telnyx" if mode == "telnyx" else "twilio", default_tracks=BOTH)
    loop = asyncio.get_running_loop()
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            conn.error = "binary"
            await ws.close(code=1003, message=b"binary")
            break
        conn.texts.append(msg.data)
        conn.arrivals.append(loop.time())
        try:
            conn.events += decoder.receive(msg.data)
        except TwilioProtocolError as exc:
            conn.error = exc.reason
            await ws.close(code=1008, message=exc.reason.encode())
            break
        if mode == "bad-after-5" and decoder.frames == 5:
            await ws.close(code=1008, message=b"bad_base64")
            break
        if mode == "close-on-stop" and decoder.ended:
            await ws.close(code=1000, message=b"stop")
            break
    return ws


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    app = web.Application()
    app[CONNS] = []
    app.router.add_get("/{mode}", _handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Server(f"ws://127.0.0.1:{runner.addresses[0][1]}", app[CONNS])
    finally:
        await runner.cleanup()


async def test_signed_fast_call_delivers_every_message(server: Server, short_call: Path) -> None:
    url = server.url("twilio")
    options = SimulationOptions(speed=0)
    result = await simulate_call(url, short_call, options, auth_token="s3cret")
    (conn,) = server.conns
    assert conn.headers["X-Twilio-Signature"] == compute_signature("s3cret", url)
    assert result.completed and result.close_code == 1000 and result.rejected_status is None
    assert result.messages_sent == len(conn.texts) == 2 + 2 * 50 + 1
    assert result.frames_sent == 100 and result.audio_ms == pytest.approx(1000.0)
    assert result.stream_sids == [json.loads(conn.texts[1])["streamSid"]]
    assert result.call_sid == json.loads(conn.texts[1])["start"]["callSid"]
    assert conn.error is None and isinstance(conn.events[-1], CallEnded)
    pcm = wav_channels(short_call)
    for channel in (0, 1):
        got = b"".join(
            e.payload for e in conn.events if isinstance(e, Audio) and e.channel == channel
        )
        assert got == encode(Codec.PCMU, pcm[channel])


async def test_real_time_pacing(server: Server) -> None:
    audio = CallAudio(8000, channel_audio(CALL, 0, 10.0, 10.4))
    result = await simulate_call(server.url("close-on-stop"), audio)
    (conn,) = server.conns
    assert result.completed and result.close_code == 1000
    # The last frame (and stop) is due 0.4 s after the call started; frames come 20 ms apart,
    # not in a burst (a slow connect may make the first few catch up, hence the median).
    assert 0.4 <= result.elapsed_s < 2.0
    gaps = np.diff(conn.arrivals[2:-1])
    assert len(gaps) == 19 and 0.015 <= float(np.median(gaps)) <= 0.03


async def test_redirect_opens_a_second_socket_for_the_same_call(
    server: Server, short_call: Path
) -> None:
    options = SimulationOptions(speed=0, redirect_at_s=0.6, custom_parameters={"a": "1"})
    result = await simulate_call(server.url("close-on-stop"), short_call, options)
    assert result.completed and len(result.stream_sids) == 2
    one, two = server.conns
    starts = [json.loads(c.texts[1])["start"] for c in (one, two)]
    assert starts[0]["callSid"] == starts[1]["callSid"] == result.call_sid
    assert starts[0]["streamSid"] != starts[1]["streamSid"]
    assert [s["streamSid"] for s in starts] == result.stream_sids
    assert starts[1]["customParameters"] == {"a": "1"}
    ts = [json.loads(t)["media"]["timestamp"] for t in two.texts if '"media"' in t]
    assert ts[:4] == ["0", "0", "20", "20"]
    assert result.frames_sent == 100


async def test_server_closing_mid_stream_is_reported_not_raised(
    server: Server, short_call: Path
) -> None:
    # At 10x real time the server's close arrives while frames are still due: sending stops.
    options = SimulationOptions(speed=10)
    result = await simulate_call(server.url("bad-after-5"), short_call, options)
    assert result.close_code == 1008 and result.close_reason == "bad_base64"
    assert not result.completed and 5 <= result.frames_sent < 100
    # At full speed everything is written before the server reacts: its close crosses ours.
    # The code survives; with a linger the reason does too.
    result = await simulate_call(server.url("bad-after-5"), short_call, SimulationOptions(speed=0))
    assert result.close_code == 1008 and not result.completed
    options = SimulationOptions(speed=0, linger_s=5.0)
    result = await simulate_call(server.url("bad-after-5"), short_call, options)
    assert result.close_code == 1008 and result.close_reason == "bad_base64"
    assert result.elapsed_s < 4.0


async def test_refused_upgrade_and_unreachable_server(server: Server, short_call: Path) -> None:
    result = await simulate_call(server.url("forbidden"), short_call, auth_token="t")
    assert result.rejected_status == 403 and not result.completed and result.messages_sent == 0
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await simulate_call(f"ws://127.0.0.1:{port}/x", short_call)
    assert result.error is not None and result.rejected_status is None and not result.completed


async def test_three_concurrent_calls_share_the_audio(server: Server, short_call: Path) -> None:
    options = SimulationOptions(dialect="telnyx", speed=0)
    wire = await prepare_audio(short_call, options)
    results = await simulate_calls(3, server.url("telnyx"), wire, options, stagger_s=0.01)
    assert all(r.completed for r in results)
    call_ids = {r.call_sid for r in results}
    assert len(call_ids) == 3 and all(c.startswith("v2:") for c in call_ids)
    assert {json.loads(c.texts[1])["start"]["call_control_id"] for c in server.conns} == call_ids
    assert len({r.stream_sids[0] for r in results}) == 3
    assert all(c.error is None and len(c.texts) == 103 for c in server.conns)
    with pytest.raises(ValueError):
        await simulate_calls(2, server.url("telnyx"), wire, SimulationOptions(call_sid="CA1"))


async def test_send_raw_reports_how_the_server_closed(server: Server) -> None:
    result = await send_raw(server.url("twilio"), ['{"event": "connected"}', "{not json"])
    assert result.close_code == 1008 and result.close_reason == "malformed_json"
    assert result.messages_sent == 2 and not result.completed
    result = await send_raw(server.url("twilio"), [b"\x00\x01"])
    assert result.close_code == 1003 and result.close_reason == "binary"
    # Nothing wrong: the socket is closed normally after the linger.
    result = await send_raw(server.url("twilio"), ['{"event":"connected"}'], linger_s=0.05)
    assert result.completed and result.close_code == 1000


# -- the CLI ---------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate_cli.register(sub, [])
    return parser.parse_args(["simulate", "twilio", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.wav", "--url", "ws://h/p"], "no such file"),
        (["{wav}", "--url", "http://h/p"], "ws:// or wss://"),
        (["{wav}", "--url", "ws://h/p", "--param", "novalue"], "KEY=VALUE"),
        (["{wav}", "--url", "ws://h/p", "--drop", "inbound:2"], "TRACK:START-END"),
        (["{wav}", "--url", "ws://h/p", "--drop", "sideways:1-2"], "TRACK:START-END"),
        (["{wav}", "--url", "ws://h/p", "--drop", "inbound:2-1"], "START < END"),
        (["{wav}", "--url", "ws://h/p", "--speed", "-1"], "--speed"),
        (["{wav}", "--url", "ws://h/p", "--calls", "0"], "--calls"),
        (["{wav}", "--url", "ws://h/p", "--redirect-at", "5"], "inside the call"),
        (["{wav}", "--url", "ws://h/p", "--codec", "pcmu", "--rate", "16000"], "8000 Hz only"),
    ],
)
def test_cli_usage_errors_are_one_line(
    argv: list[str], message: str, short_call: Path, tmp_path: Path
) -> None:
    argv = [
        a.replace("{wav}", str(short_call)).replace("missing.wav", str(tmp_path / "no.wav"))
        for a in argv
    ]
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        simulate_cli.run(_parse(argv))
    assert "\n" not in str(info.value)


async def test_cli_plays_calls_and_prints_one_line_each(
    server: Server,
    short_call: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEWAY_TWILIO__AUTH_TOKEN", "from-env")
    url = server.url("close-on-stop")
    argv = [str(short_call), "--url", url, "--speed", "0", "--calls", "2", "--param", "a=b"]
    # run() owns its event loop (asyncio.run), so it runs in a thread while this loop serves.
    assert await asyncio.to_thread(lambda: simulate_cli.run(_parse(argv))) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("completed (1000 stop)" in line for line in lines)
    assert all("frames=100 audio=1.00s" in line for line in lines)
    assert all(
        c.headers["X-Twilio-Signature"] == compute_signature("from-env", url) for c in server.conns
    )
    assert all(
        json.loads(c.texts[1])["start"]["customParameters"] == {"a": "b"} for c in server.conns
    )

    argv = [str(short_call), "--url", server.url("bad-after-5"), "--speed", "10"]
    assert await asyncio.to_thread(lambda: simulate_cli.run(_parse(argv))) == 1
    assert "closed early (1008 bad_base64)" in capsys.readouterr().out


def test_payloads_are_base64_of_whole_frames() -> None:
    wire = WireAudio.from_audio(CallAudio(8000, b"\x01\x00" * 170))
    sizes = [len(base64.b64decode(p)) for p in wire.payloads[0]]
    assert sizes == [160, 10]  # the short last frame is sent as it is
    assert wire.frame_end(1) == 170
