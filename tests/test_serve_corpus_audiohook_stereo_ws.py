"""End to end over real sockets: corpus calls played by the AudioHook and stereo PCM WebSocket
simulators into the gateway (embedded engine).

The stored transcripts must meet the same bars as offline transcription and the Twilio path
(tests/test_transcribe_corpus.py, tests/test_serve_corpus.py). A pause (paused ... resumed
{discarded}) and a discard (frames not sent, then discarded{start, discarded}) must not shift
the channels: the call gives the same utterance times as without them, within 40 ms, and the
declared spans become silence on both channels.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.simulate.audiohook import AudioHookOptions, simulate_audiohook
from gateway.simulate.stereo_ws import StereoWsOptions, simulate_stereo_ws
from gateway.simulate.twilio import load_call_audio
from gateway.stt.local import LocalEngine
from gateway.transcript.model import Transcript
from tests.conftest import TRANSCRIBED_CALLS, call_path
from tests.gateway_server import (
    AUDIOHOOK_KEY,
    AUDIOHOOK_SECRET,
    STEREO_SECRET,
    ingress_settings_for,
    running_gateway,
)
from tests.test_transcribe_corpus import assert_meets_bars

SPEED = 1.5
# Spans where both parties of composed_library are silent (its truth file: no turn between
# 5.51-6.11 s and 26.93-27.63 s), so the recognizer hears the same audio either way.
PAUSES = ((5.7, 6.0),)
DISCARDS = ((27.1, 27.5),)


def _assert_aligned(plain: Transcript, gapped: Transcript) -> None:
    assert [(u.channel, u.text) for u in gapped.utterances] == [
        (u.channel, u.text) for u in plain.utterances
    ]
    for a, b in zip(plain.utterances, gapped.utterances, strict=True):
        assert abs(a.start - b.start) <= 40, (a, b)
        assert abs(a.end - b.end) <= 40, (a, b)


@pytest.mark.slow
async def test_audiohook_corpus_calls_meet_the_bars_and_gaps_stay_aligned(
    local_engine: LocalEngine, tmp_path: Path
) -> None:
    settings = ingress_settings_for(tmp_path, calls={"max_speed": 2.0})
    async with running_gateway(settings, local_engine) as gw:
        url = gw.ws("/audiohook/ws")
        jobs = []
        for name in (*TRANSCRIBED_CALLS, "composed_library"):
            audio = await load_call_audio(call_path(name))
            gapped = len(jobs) == len(TRANSCRIBED_CALLS)
            options = AudioHookOptions(
                speed=SPEED,
                api_key=AUDIOHOOK_KEY,
                client_secret=AUDIOHOOK_SECRET,
                pauses=PAUSES if gapped else (),
                discards=DISCARDS if gapped else (),
            )
            jobs.append(simulate_audiohook(url, audio, options))
        results = await asyncio.gather(*jobs)
        assert all(r.completed for r in results), results
        await gw.idle(within_s=240)
        transcripts: list[Transcript] = []
        for result in results:
            call = gw.registry.get(result.session_id)
            assert call is not None
            assert gw.stored(call.call_id)["state"] == "ended"
            transcripts.append(call.transcript())
        gapped_call = gw.registry.get(results[-1].session_id)
        assert gapped_call is not None
        filled = {i: c.filled_ms for i, c in gapped_call.channels.items()}

    for name, transcript in zip(TRANSCRIBED_CALLS, transcripts, strict=False):
        await assert_meets_bars(name, transcript)
    # The declared pause (0.3 s) and discard (0.4 s) became silence on both channels.
    assert filled == {0: 700, 1: 700}
    _assert_aligned(transcripts[0], transcripts[-1])


@pytest.mark.slow
async def test_stereo_ws_corpus_calls_meet_the_bars(
    local_engine: LocalEngine, tmp_path: Path
) -> None:
    settings = ingress_settings_for(tmp_path, calls={"max_speed": 2.0})
    async with running_gateway(settings, local_engine) as gw:
        url = gw.ws("/stereo/ws")
        jobs = []
        for name in TRANSCRIBED_CALLS:
            audio = await load_call_audio(call_path(name))
            options = StereoWsOptions(speed=SPEED, secret=STEREO_SECRET)
            jobs.append(simulate_stereo_ws(url, audio, options))
        results = await asyncio.gather(*jobs)
        assert all(r.completed for r in results), results
        await gw.idle(within_s=240)
        transcripts = []
        for result in results:
            call = gw.registry.get(result.call_sid)
            assert call is not None
            assert gw.stored(call.call_id)["state"] == "ended"
            transcripts.append(call.transcript())

    for name, transcript in zip(TRANSCRIBED_CALLS, transcripts, strict=True):
        await assert_meets_bars(name, transcript)
