"""Call recording: one multi-channel WAV on the call clock, gaps as silence."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.ingress.file import probe_wav
from gateway.media.codec import Codec, encode
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
