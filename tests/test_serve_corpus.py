"""End to end over real sockets: corpus calls played by the Twilio simulator into the gateway.

The stored transcripts must meet the same bars as offline transcription
(tests/test_transcribe_corpus.py), and frames Twilio never sent (gaps) must not shift one channel
against the other: a call with dropped frames gives the same utterance times as without, within
40 ms.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.simulate.twilio import SimulationOptions, load_call_audio, simulate_calls
from gateway.stt.local import LocalEngine
from gateway.transcript.model import Transcript
from tests.conftest import TRANSCRIBED_CALLS, call_path
from tests.gateway_server import TOKEN, running_gateway, settings_for
from tests.test_transcribe_corpus import assert_meets_bars

SPEED = 1.5
# Drops in spans where that channel is silent in composed_library, so the recognizer hears the
# same audio either way: only the placement of what follows can differ.
DROPS = (("inbound", 2000.0, 2600.0), ("outbound", 8000.0, 8500.0), ("inbound", 16800.0, 17200.0))


@pytest.mark.slow
async def test_simulated_twilio_calls_meet_the_offline_bars_and_gaps_stay_aligned(
    local_engine: LocalEngine, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, calls={"max_speed": 2.0})
    async with running_gateway(settings, local_engine) as gw:
        url = gw.ws()
        jobs = []
        for name in (*TRANSCRIBED_CALLS, "composed_library"):
            audio = await load_call_audio(call_path(name))
            drop = DROPS if len(jobs) == len(TRANSCRIBED_CALLS) else ()
            options = SimulationOptions(speed=SPEED, drop=drop)
            jobs.append(simulate_calls(1, url, audio, options, auth_token=TOKEN))
        results = [r for batch in await asyncio.gather(*jobs) for r in batch]
        assert all(r.completed for r in results), results
        await gw.idle(within_s=240)
        transcripts: list[Transcript] = []
        for result in results:
            call = gw.registry.get(result.call_sid)
            assert call is not None
            assert gw.stored(call.call_id)["state"] == "ended"
            transcripts.append(call.transcript())

    for name, transcript in zip(TRANSCRIBED_CALLS, transcripts, strict=False):
        await assert_meets_bars(name, transcript)

    plain, dropped = transcripts[0], transcripts[-1]
    call = gw.registry.get(results[-1].call_sid)
    assert call is not None
    filled = {i: c.filled_ms for i, c in call.channels.items()}
    assert filled == {0: 1000, 1: 500}  # the dropped spans became silence on their channel
    assert [(u.channel, u.text) for u in dropped.utterances] == [
        (u.channel, u.text) for u in plain.utterances
    ]
    for a, b in zip(plain.utterances, dropped.utterances, strict=True):
        assert abs(a.start - b.start) <= 40, (a, b)
        assert abs(a.end - b.end) <= 40, (a, b)
