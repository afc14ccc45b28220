"""Call recording: one multi-channel WAV on the call clock, gaps as silence, legs added
mid-call and legs in different formats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from gateway.ingress.file import probe_wav
from gateway.media.codec import Codec, decode, encode, float32_to_pcm16, pcm16_to_float32
from gateway.outputs.recorder import CallRecorder, RecordedFormat
from gateway.simulate.twilio import SimulationOptions, load_call_audio, simulate_calls
from tests.conftest import call_path
from tests.gateway_server import TOKEN, hello_engine, running_gateway, settings_for


async def test_recording_holds_each_channel_on_the_call_clock(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, recording={"enabled": True}, calls={"max_speed": 1000.0, "burst_s": 100.0}
    )
    audio = await load_call_audio(call_path("phone_diane_sheila"))
    drop = (("inbound", 2000.0, 2500.0),)
    async with running_gateway(settings, hello_engine()) as gw:
        [result] = await simulate_calls(
            1, gw.ws(), audio, SimulationOptions(speed=0, drop=drop), auth_token=TOKEN
        )
        assert result.completed
        await gw.idle()
        doc = await gw.transcript(result.call_sid)
    path = Path(doc["metadata"]["recording"])
    assert path.parent == tmp_path / "recordings"
    fmt = await asyncio.to_thread(probe_wav, path)
    assert (fmt.codec, fmt.channels, fmt.sample_rate) == (Codec.PCMU, 2, 8000)
    raw = await asyncio.to_thread(path.read_bytes)
    data = raw[raw.index(b"data") + 8 :]
    inbound, outbound = data[0::2], data[1::2]
    assert len(inbound) == len(outbound) == doc["duration_ms"] * 8
    # Outbound: exactly the µ-law the simulator sent. Inbound: the same, except the dropped
    # 500 ms, which the gateway filled with µ-law silence at the right place.
    sent_in = encode(Codec.PCMU, audio.pcm("inbound"))
    sent_out = encode(Codec.PCMU, audio.pcm("outbound"))
    assert outbound == sent_out[: len(outbound)]
    assert inbound[:16000] == sent_in[:16000]
    assert inbound[16000:20000] == b"\xff" * 4000
    assert inbound[20000:] == sent_in[20000 : len(inbound)]


def _columns(path: Path, channels: int, width: int) -> list[bytes]:
    raw = path.read_bytes()
    data = raw[raw.index(b"data") + 8 :]
    frame = channels * width
    data = data[: len(data) - len(data) % frame]  # the RIFF pad byte, if any
    return [
        b"".join(data[i + c * width : i + (c + 1) * width] for i in range(0, len(data), frame))
        for c in range(channels)
    ]


def _feed(recorder: CallRecorder, channel: int, data: bytes, step: int = 160) -> None:
    for i in range(0, len(data), step):
        recorder.feed(channel, data[i : i + step])


async def test_a_leg_added_mid_call_widens_the_file_already_written(tmp_path: Path) -> None:
    # Two legs for 5 s (two blocks reach the disk), then a third joins at 5 s and all three go
    # on for 2.5 s: the file holds three channels, the third silent until it joined.
    pcmu = RecordedFormat(Codec.PCMU, 8000)
    recorder = CallRecorder(tmp_path / "call.wav", [pcmu, pcmu])
    legs = [bytes(range(0, 250, 5)) * 1000, bytes(range(1, 251, 5)) * 1000]  # 50000 B each
    first = [leg[:40000] for leg in legs]
    for channel, data in enumerate(first):
        _feed(recorder, channel, data)
    await asyncio.sleep(0.2)  # let the writer put the first blocks on disk
    size = (await asyncio.to_thread((tmp_path / "call.wav").stat)).st_size
    assert size > 30000
    recorder.add_channel(2, RecordedFormat(Codec.PCMA, 8000), start=40000)
    third = bytes(range(7, 207, 2)) * 200  # 20000 B of A-law
    for channel, data in enumerate([leg[40000:] for leg in legs]):
        _feed(recorder, channel, data)
    _feed(recorder, 2, third[:10000])
    path = await recorder.close()

    fmt = await asyncio.to_thread(probe_wav, path)
    assert (fmt.codec, fmt.channels, fmt.sample_rate) == (Codec.PCMU, 3, 8000)
    assert not await asyncio.to_thread(path.with_name(path.name + ".widen").exists)
    c0, c1, c2 = await asyncio.to_thread(_columns, path, 3, 1)
    assert c0 == legs[0] and c1 == legs[1]
    # Silent (µ-law silence) until it joined, then its A-law transcoded to the file's µ-law.
    assert c2 == b"\xff" * 40000 + encode(Codec.PCMU, decode(Codec.PCMA, third[:10000]))


async def test_legs_in_different_formats_are_recorded_as_l16_at_the_top_rate(
    tmp_path: Path,
) -> None:
    # A-law at 8 kHz and L16 at 16 kHz: the file is L16/16000, the A-law leg decoded and
    # resampled, still a 1 kHz tone of the same length, on the same clock as the other leg.
    t = np.arange(8000 * 2) / 8000
    tone = encode(Codec.PCMA, float32_to_pcm16(0.5 * np.sin(2 * np.pi * 1000 * t)))
    wide = float32_to_pcm16(0.25 * np.sin(2 * np.pi * 3000 * np.arange(16000 * 2) / 16000))
    recorder = CallRecorder(
        tmp_path / "mixed.wav",
        [RecordedFormat(Codec.PCMA, 8000), RecordedFormat(Codec.L16, 16000)],
    )
    _feed(recorder, 0, tone, 160)
    _feed(recorder, 1, wide, 640)
    path = await recorder.close()

    fmt = await asyncio.to_thread(probe_wav, path)
    assert (fmt.codec, fmt.channels, fmt.sample_rate) == (Codec.L16, 2, 16000)
    c0, c1 = await asyncio.to_thread(_columns, path, 2, 2)
    assert c1 == wide
    assert len(c0) == len(wide)  # 2 s at 16 kHz, resampler tail included
    x = pcm16_to_float32(c0)
    spectrum = np.abs(np.fft.rfft(x[2000:-2000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(x[2000:-2000])
    assert abs(peak_hz - 1000) < 5
    assert 0.3 < np.max(np.abs(x[2000:-2000])) < 0.6  # the tone's level survived


async def test_a_recording_that_cannot_be_written_stops_buffering_and_says_why(
    tmp_path: Path,
) -> None:
    # The recordings directory is a file: the writer cannot open the WAV. The recorder must not
    # keep the whole call's audio queued for a writer that is gone, and close() says why.
    blocker = tmp_path / "recordings"
    await asyncio.to_thread(blocker.write_text, "not a directory")
    pcmu = RecordedFormat(Codec.PCMU, 8000)
    recorder = CallRecorder(blocker / "call.wav", [pcmu, pcmu])
    await asyncio.sleep(0.1)
    assert recorder.error is not None
    for _ in range(1000):  # 20 s of call
        recorder.feed(0, b"\xff" * 160)
        recorder.feed(1, b"\xff" * 160)
    assert recorder._queue.qsize() == 0 and all(not p for p in recorder._pending)
    with pytest.raises(OSError, match="File exists"):
        await recorder.close()
