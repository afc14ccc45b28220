"""The embedded engine's session: partials while a turn is open, immutable finals, call clock."""

from __future__ import annotations

import asyncio

import pytest

from gateway.media.codec import Codec
from gateway.stt.local import LocalEngine, _place_words
from gateway.stt.session import SessionParams, SttError, Watermark
from gateway.transcript.model import TurnUpdate
from tests.conftest import channel_audio


@pytest.mark.slow
async def test_partials_then_one_final_per_turn_on_the_call_clock(
    local_engine: LocalEngine,
) -> None:
    # 12 s of the composed call's channel 0: one long read turn from 6.1 s to 16.9 s.
    offset_ms = 5000
    audio = channel_audio("composed_library", 0, 5.0, 17.5)
    session = local_engine.open_session(
        SessionParams(channel=0, codec=Codec.L16, sample_rate=8000, offset_ms=offset_ms)
    )
    events: list[object] = []
    partial_seen = asyncio.Event()

    async def read() -> None:
        async for event in session.events():
            events.append(event)
            if isinstance(event, TurnUpdate) and not event.final:
                partial_seen.set()

    reader = asyncio.create_task(read())
    chunk = 1600 * 2  # 100 ms of L16
    middle = 7 * 8000 * 2  # 12 s into the call: the turn is open, with 6 s of it sent
    for i in range(0, middle, chunk):
        await session.send(audio[i : i + chunk])
        await asyncio.sleep(0.05)  # 2x real time
    # A partial must come while the turn is open. On a loaded machine the engine may still be
    # catching up, so wait for it (bounded) rather than racing the rest of the audio.
    async with asyncio.timeout(60):
        await partial_seen.wait()
    for i in range(middle, len(audio), chunk):
        await session.send(audio[i : i + chunk])
        await asyncio.sleep(0.05)
    await session.finish()
    await reader

    assert not [e for e in events if isinstance(e, SttError)]
    updates = [e for e in events if isinstance(e, TurnUpdate)]
    partials = [u for u in updates if not u.final]
    finals = [u for u in updates if u.final]
    assert partials, "no partial while the turn was open"
    assert finals
    final_keys = [u.key for u in finals]
    assert len(final_keys) == len(set(final_keys))  # at most one final per turn
    for p in partials:
        assert p.key in final_keys  # every partial's turn was finalized
        final_index = updates.index(next(f for f in finals if f.key == p.key))
        assert updates.index(p) < final_index  # and no partial came after its final
    # Times are on the call clock: the turn starts about 6.1 s into the call.
    first = finals[0]
    assert abs(first.start_ms - 6113) < 300
    assert all(offset_ms <= w.start <= w.end <= 17500 for f in finals for w in f.words)
    text = " ".join(f.text for f in finals).lower()
    assert "reader will excuse me" in text and "native country" in text
    marks = [e.ms for e in events if isinstance(e, Watermark)]
    assert marks == sorted(marks)
    # No final starts before a watermark announced earlier in the stream.
    seen = 0
    for event in events:
        if isinstance(event, Watermark):
            seen = event.ms
        elif isinstance(event, TurnUpdate) and event.final:
            assert event.start_ms >= seen - 1


async def test_send_after_finish_is_refused(local_engine: LocalEngine) -> None:
    session = local_engine.open_session(
        SessionParams(channel=0, codec=Codec.PCMU, sample_rate=8000)
    )
    await session.send(b"\xff" * 800)
    await session.finish()
    await session.finish()  # idempotent
    with pytest.raises(RuntimeError):
        await session.send(b"\xff" * 800)
    # The event stream still ends after finish (no hang), with no error and no turn for the
    # 100 ms of µ-law silence that was sent.
    async with asyncio.timeout(10):
        events = [e async for e in session.events()]
    assert not [e for e in events if isinstance(e, (SttError, TurnUpdate))], events


async def test_silence_gives_no_turns_and_a_closing_watermark(local_engine: LocalEngine) -> None:
    session = local_engine.open_session(
        SessionParams(channel=1, codec=Codec.PCMU, sample_rate=8000)
    )
    events: list[object] = []

    async def read() -> None:
        async for event in session.events():
            events.append(event)

    reader = asyncio.create_task(read())
    for _ in range(30):
        await session.send(b"\xff" * 800)  # 3 s of µ-law silence
    await session.finish()
    await reader
    assert not [e for e in events if isinstance(e, TurnUpdate)]
    marks = [e for e in events if isinstance(e, Watermark)]
    assert marks and marks[-1].ms >= 3000


def test_word_in_a_pause_moves_to_the_next_onset_not_to_noise_before_it() -> None:
    # A 160 ms noise burst at 0.64 s, speech from 1.056 s; Whisper put the first word at 0.86 s.
    regions = ((10240, 12800), (16896, 111104))
    placed = _place_words([(13760, 20160), (20160, 23040)], regions, 24000)
    assert placed[0] == (16896, 20160)
    assert placed[1] == (20160, 23040)


def test_word_inside_speech_owns_the_uncovered_speech_before_it() -> None:
    # An "uh" Whisper dropped at 1.0-1.3 s; the next word starts inside the following region.
    regions = ((16000, 20800), (24000, 40000))
    placed = _place_words([(25600, 30000)], regions, 24000)
    assert placed == [(16000, 30000)]


async def test_a_failed_session_never_leaves_a_sender_waiting() -> None:
    # The recognizer fails while send() waits on the full input queue: that send returns (it
    # waited forever before, and with it the call's ingress), and the failure is reported.
    from gateway.config import LocalEngineSettings
    from gateway.stt.local import LocalSession
    from gateway.stt.session import EngineStats

    class FailingEngine:
        def __init__(self) -> None:
            self.settings = LocalEngineSettings(input_queue_chunks=2)
            self.stats = EngineStats()
            self.sessions: set[object] = set()
            self.gate = asyncio.Event()

        def vad_stream(self) -> None:
            return None

        async def in_vad_pool(self, fn: object) -> object:
            await self.gate.wait()
            raise RuntimeError("VAD worker crashed")

    engine = FailingEngine()
    session = LocalSession(engine, SessionParams(0, Codec.PCMU, 8000))  # type: ignore[arg-type]
    await session.send(b"\xff" * 160)
    await asyncio.sleep(0)  # taken by the session, which is now stuck in the pool
    await session.send(b"\xff" * 160)
    await session.send(b"\xff" * 160)  # the queue is full
    blocked = asyncio.create_task(session.send(b"\xff" * 160))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    engine.gate.set()
    async with asyncio.timeout(5):
        await blocked
        events = [e async for e in session.events()]
    assert [e for e in events if isinstance(e, SttError) and e.fatal], events
