"""Acceptance: offline transcription of the corpus calls with the embedded engine.

Every reference turn of more than one word must appear as an utterance of the right speaker, in
the reference order, starting within 300 ms of the reference; word error rate (normalized) at most
0.12 on composed_library and 0.30 on phone_diane_sheila.
"""

from __future__ import annotations

import pytest

from gateway.calls.call import Call, CallOptions
from gateway.ingress.file import play_file
from gateway.stt.local import LocalEngine
from gateway.transcript.model import Transcript
from gateway.transcript.scoring import load_reference, score
from tests.conftest import CALLS, TRANSCRIBED_CALLS, call_path

WER_BARS = {"composed_library": 0.12, "phone_diane_sheila": 0.30, "mfa_two_michaels": 0.30}
START_TOLERANCE_MS = 300


async def transcribe(engine: LocalEngine, name: str) -> Transcript:
    call = Call(engine, CallOptions(roles=("customer", "agent"), partials=False), call_id=name)
    await play_file(call, call_path(name), roles=("customer", "agent"))
    return call.transcript()


@pytest.mark.slow
@pytest.mark.parametrize("name", TRANSCRIBED_CALLS)
async def test_corpus_call_meets_order_wer_and_timing_bars(
    local_engine: LocalEngine, name: str
) -> None:
    reference = load_reference(CALLS / f"{name}.truth.json")
    assert reference, f"{name} has no reference turns"
    transcript = await transcribe(local_engine, name)
    report = score(reference, transcript)
    summary = report.format(timing_tolerance_ms=START_TOLERANCE_MS)
    assert not report.missing, summary
    for match in report.matches:
        utterance = transcript.utterances[match.utterance_index]  # type: ignore[index]
        assert utterance.channel == match.ref.channel, summary
        assert utterance.role == match.ref.role, summary
    assert report.order_problems == [], summary
    assert report.timing_problems(START_TOLERANCE_MS) == [], summary
    assert report.wer <= WER_BARS[name], summary
    # The transcript covers the whole call and is sorted by audio time.
    assert abs(transcript.duration_ms - reference[-1].end_ms) < 5000
    starts = [u.start for u in transcript.utterances]
    assert starts == sorted(starts)
