"""The scripted engine: exact words at exact audio times, and timecoded replays."""

from __future__ import annotations

import pytest

from gateway.media.codec import Codec
from gateway.stt.scripted import ScriptedEngine, parse_script, timecode_audio
from gateway.stt.session import SessionParams, SttEvent
from gateway.transcript.model import TurnUpdate

SCRIPT = parse_script([[["hello", 100, 300], ["there", 350, 600]], [["bye", 1500, 1700]]])


async def run(engine: ScriptedEngine, chunks: list[bytes], offset_ms: int = 0) -> list[SttEvent]:
    session = engine.open_session(SessionParams(0, Codec.L16, 8000, offset_ms))
    for chunk in chunks:
        await session.send(chunk)
    await session.finish()
    return [e async for e in session.events()]


def updates(events: list[SttEvent]) -> list[TurnUpdate]:
    return [e for e in events if isinstance(e, TurnUpdate)]


async def test_partials_per_word_then_final_after_the_delay() -> None:
    engine = ScriptedEngine(SCRIPT, final_delay_ms=400)
    chunks = [b"\0\0" * 800] * 25  # 2.5 s in 100 ms chunks
    got = [(u.text, u.final, u.start_ms, u.end_ms) for u in updates(await run(engine, chunks))]
    assert got == [
        ("hello", False, 100, 300),
        ("hello there", False, 100, 600),
        ("hello there", True, 100, 600),
        ("bye", False, 1500, 1700),
        ("bye", True, 1500, 1700),
    ]


async def test_finish_flushes_a_heard_turn_and_offset_applies() -> None:
    engine = ScriptedEngine(SCRIPT)
    got = updates(await run(engine, [b"\0\0" * 800] * 7, offset_ms=10_000))  # 700 ms
    finals = [(u.text, u.start_ms) for u in got if u.final]
    assert finals == [("hello there", 10_100)]  # "bye" was never heard


async def test_timecode_replay_hears_only_the_replayed_audio() -> None:
    engine = ScriptedEngine(SCRIPT, timecode=True)
    start = 8 * 1200  # the client replays from call time 1.2 s
    chunks = [timecode_audio(start + i * 800, 800) for i in range(10)]
    got = updates(await run(engine, chunks, offset_ms=0))
    finals = [(u.text, u.start_ms, u.end_ms) for u in got if u.final]
    assert finals == [("bye", 300, 500)]  # session-relative: 1.5 s - 1.2 s


def test_bad_scripts_are_refused() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        parse_script([[["a", 100, 50]]])
    with pytest.raises(ValueError, match="expected"):
        parse_script([[["a", 1]]])
    with pytest.raises(ValueError):
        parse_script({"not": "a list"})
