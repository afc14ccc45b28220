"""Acceptance: offline transcription of the corpus calls with the embedded engine.

Every reference turn of more than one word must appear as an utterance of the right speaker, in
the reference order, starting within 300 ms of the reference; word error rate (normalized) at most
0.12 on composed_library and 0.30 on phone_diane_sheila (0.30 is also held for mfa_two_michaels).

``KNOWN`` lists, exactly, the turns the bundled tiny.en model gets wrong today and why. The test
fails if one of them starts passing too, so the list never hides an improvement or a regression.
"""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from gateway.calls.call import Call, CallOptions
from gateway.ingress.file import play_file
from gateway.media.codec import Codec, encode, float32_to_pcm16
from gateway.media.resample import Resampler
from gateway.media.wav import wav_header
from gateway.stt.local import LocalEngine
from gateway.transcript.model import Transcript
from gateway.transcript.scoring import load_reference, score
from tests.conftest import CALLS, TRANSCRIBED_CALLS, call_path

WER_BARS = {"composed_library": 0.12, "phone_diane_sheila": 0.30, "mfa_two_michaels": 0.30}
START_TOLERANCE_MS = 300

# (call, reference start ms) -> why. "missing": the turn is not found; "timing": found, but its
# start is off by more than the tolerance.
KNOWN: dict[tuple[str, int], tuple[str, str]] = {
    ("phone_diane_sheila", 9838): (
        "missing",
        "tiny.en hears 'Neither did I.' as 'I need the design.' on this narrowband audio, with "
        "any beam size, prompt or context tried",
    ),
}

# (call, reference start ms) -> evidence. Turns that tiny.en finds or loses depending on where
# the channel's audio starts by a few milliseconds (bench/alignment.py). Paths that place audio
# by the source's timestamps or sample counts (files, Twilio, AudioHook, stereo PCM) start every
# channel at the same sample and must find them; SIPREC anchors each RTP stream at its first
# packet's arrival, which moves by a few samples from run to run, so its live test accepts either
# outcome.
ALIGNMENT_SENSITIVE: dict[tuple[str, int], str] = {
    ("mfa_two_michaels", 26723): (
        "tiny.en garbles 'than the uh uh acoustic corpus' on the sick speaker's 9 s turn, so "
        "barely half its words match; bench/alignment.py: lost at 1 of 22 offsets of channel 1 "
        "(0-64 ms), and at 2 of 26 shifts of the whole call (0-97 ms)"
    ),
}


async def transcribe(engine: LocalEngine, name: str) -> Transcript:
    call = Call(engine, CallOptions(roles=("customer", "agent"), partials=False), call_id=name)
    await play_file(call, call_path(name), roles=("customer", "agent"))
    return call.transcript()


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSCRIBED_CALLS)
async def test_corpus_call_meets_order_wer_and_timing_bars(
    local_engine: LocalEngine, name: str
) -> None:
    transcript = await transcribe(local_engine, name)
    await assert_meets_bars(name, transcript)


async def assert_meets_bars(
    name: str, transcript: Transcript, *, arrival_aligned: bool = False
) -> None:
    """The issue's bars for a corpus call: turns found (but KNOWN), roles, order, WER, timing.

    ``arrival_aligned``: the channels were placed by packet arrival (SIPREC), so the turns in
    ``ALIGNMENT_SENSITIVE`` may be missing; when found they are held to the timing bar.
    """
    reference = await asyncio.to_thread(load_reference, CALLS / f"{name}.truth.json")
    assert reference, f"{name} has no reference turns"
    report = score(reference, transcript)
    summary = report.format(timing_tolerance_ms=START_TOLERANCE_MS)

    known_missing = {
        ms for (call, ms), (kind, _) in KNOWN.items() if call == name and kind == "missing"
    }
    known_timing = {
        ms for (call, ms), (kind, _) in KNOWN.items() if call == name and kind == "timing"
    }
    missing = {t.start_ms for t in report.missing}
    if arrival_aligned:
        missing -= {ms for call, ms in ALIGNMENT_SENSITIVE if call == name}
    assert missing == known_missing, summary

    late: set[int] = set()
    for match in report.matches:
        if match.utterance_index is None:
            continue
        utterance = transcript.utterances[match.utterance_index]
        assert utterance.channel == match.ref.channel, summary
        assert utterance.role == match.ref.role, summary
        assert match.start_ms is not None
        if abs(match.start_ms - match.ref.start_ms) > START_TOLERANCE_MS:
            late.add(match.ref.start_ms)
    assert late == known_timing, summary
    assert list(report.order_problems) == [], summary
    assert report.wer <= WER_BARS[name], summary

    # The transcript covers the whole call and is sorted by audio time.
    assert abs(transcript.duration_ms - reference[-1].end_ms) < 5000
    starts = [u.start for u in transcript.utterances]
    assert starts == sorted(starts)


def _variant(tmp: Path, codec: Codec, rate: int) -> Path:
    """composed_library re-encoded as ``codec`` at ``rate`` Hz, as a recorder would store it."""
    with wave.open(str(call_path("composed_library"))) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)
    if rate != 8000:
        chans = [Resampler(8000, rate) for _ in range(2)]
        cols = []
        for ch, r in enumerate(chans):
            x = frames[:, ch].astype(np.float32) / 32768
            cols.append(np.concatenate([r.process(x), r.flush()]))
        n = min(len(c) for c in cols)
        frames = np.stack([np.frombuffer(float32_to_pcm16(c[:n]), np.int16) for c in cols], 1)
    pcm = frames.astype("<i2").tobytes()
    payload = encode(codec, pcm) if codec is not Codec.L16 else pcm
    path = tmp / f"composed_{codec.value}_{rate}.wav"
    path.write_bytes(wav_header(codec, 2, rate, len(payload)) + payload)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("codec", "rate"), [(Codec.PCMU, 8000), (Codec.PCMA, 8000), (Codec.L16, 16000)]
)
async def test_g711_and_wideband_files_go_through_the_same_pipeline(
    local_engine: LocalEngine, tmp_path: Path, codec: Codec, rate: int
) -> None:
    path = await asyncio.to_thread(_variant, tmp_path, codec, rate)
    call = Call(local_engine, CallOptions(partials=False))
    await play_file(call, path)
    assert call.channels[0].spec.codec is codec and call.channels[0].spec.sample_rate == rate
    reference = await asyncio.to_thread(load_reference, CALLS / "composed_library.truth.json")
    assert reference
    report = score(reference, call.transcript())
    summary = report.format(timing_tolerance_ms=START_TOLERANCE_MS)
    assert not report.missing and not report.order_problems, summary
    assert report.wer <= WER_BARS["composed_library"], summary
    assert report.timing_problems(START_TOLERANCE_MS) == [], summary
