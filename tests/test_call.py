"""Call: clock alignment across channels (invariant 1), lifecycle, ordering through the merger.

The sessions here are scripted recorders: they keep every byte the Call sends, and emit given
turns once their audio has been sent, so the Call's wiring is checked sample for sample.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.calls.call import (
    Call,
    CallError,
    CallOptions,
    CallOutput,
    CallState,
    CallStateChanged,
    CallUpdated,
    ChannelFailed,
)
from gateway.ingress.events import (
    Audio,
    CallEnded,
    CallStarted,
    ChannelAdded,
    ChannelSpec,
    Gap,
    Hold,
    MetadataChanged,
    Resume,
)
from gateway.media.codec import Codec
from gateway.stt.session import SessionParams, SttError, SttEvent, Watermark
from gateway.transcript.merger import UtteranceReleased
from gateway.transcript.model import TurnUpdate, Word

RATE = 8000
FRAME = 160  # 20 ms


class ScriptedSession:
    """Records audio; emits each scripted (start_ms, end_ms, text) once audio passes its end."""

    def __init__(
        self, params: SessionParams, script: list[tuple[int, int, str]], fail_at: int | None
    ):
        self.params = params
        self.audio = bytearray()
        self._script = list(script)
        self._order = 0
        self._fail_at = fail_at
        self._queue: asyncio.Queue[SttEvent | None] = asyncio.Queue()
        self.finished = False
        self.closed = False

    @property
    def sent_ms(self) -> int:
        return len(self.audio) // self.params.codec.sample_width * 1000 // self.params.sample_rate

    async def send(self, audio: bytes) -> None:
        assert not self.finished
        self.audio.extend(audio)
        if self._fail_at is not None and self.sent_ms >= self._fail_at:
            self._queue.put_nowait(SttError(self.params.channel, "engine crashed", True))
            self._queue.put_nowait(None)
            self._fail_at = None
            return
        while self._script and self._script[0][1] <= self.sent_ms:
            self._emit(*self._script.pop(0))
        self._queue.put_nowait(Watermark(self.params.channel, self._watermark()))

    def _watermark(self) -> int:
        return self.params.offset_ms + (self._script[0][0] if self._script else self.sent_ms)

    def _emit(self, start: int, end: int, text: str) -> None:
        # Scripted times are on the session's own audio; its offset puts them on the call clock.
        start, end = start + self.params.offset_ms, end + self.params.offset_ms
        words = tuple(Word(w, start, end) for w in text.split())
        self._queue.put_nowait(
            TurnUpdate(self.params.channel, 0, self._order, words, text, start, end, True, 0.9)
        )
        self._order += 1

    async def finish(self) -> None:
        if not self.finished:
            self.finished = True
            for turn in self._script:
                self._emit(*turn)
            self._script.clear()
            self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[SttEvent]:
        while (event := await self._queue.get()) is not None:
            yield event

    async def aclose(self) -> None:
        self.closed = True
        self._queue.put_nowait(None)


class ScriptedEngine:
    name = "scripted"

    def __init__(
        self,
        scripts: dict[int, list[tuple[int, int, str]]] | None = None,
        fail_at: dict[int, int] | None = None,
    ) -> None:
        self.scripts = scripts or {}
        self.fail_at = fail_at or {}
        self.sessions: dict[int, ScriptedSession] = {}

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def open_session(self, params: SessionParams) -> ScriptedSession:
        session = ScriptedSession(
            params, self.scripts.get(params.channel, []), self.fail_at.get(params.channel)
        )
        self.sessions[params.channel] = session
        return session


def started(channels: int = 2, codec: Codec = Codec.L16) -> CallStarted:
    roles = ("customer", "agent", "supervisor")
    return CallStarted(
        "test",
        tuple(ChannelSpec(i, roles[i], None, codec, RATE) for i in range(channels)),
    )


def tone(n: int, value: int) -> bytes:
    return value.to_bytes(2, "little", signed=True) * n


def collect(call: Call) -> list[CallOutput]:
    out: list[CallOutput] = []
    call.add_listener(lambda _call, o: out.append(o))
    return out


async def test_a_gap_on_one_channel_is_silence_and_keeps_the_channels_aligned() -> None:
    engine = ScriptedEngine()
    call = Call(engine)
    await call.handle(started())
    for i in range(50):  # 1 s of audio per channel, 20 ms frames
        await call.handle(Audio(0, tone(FRAME, 1000), i * FRAME))
        if not 20 <= i < 30:  # channel 1 loses 200 ms of frames
            await call.handle(Audio(1, tone(FRAME, 2000), i * FRAME))
    await call.handle(CallEnded())
    a, b = engine.sessions[0].audio, engine.sessions[1].audio
    assert len(a) == len(b) == 50 * FRAME * 2
    assert bytes(b[: 20 * FRAME * 2]) == tone(20 * FRAME, 2000)
    assert bytes(b[20 * FRAME * 2 : 30 * FRAME * 2]) == bytes(10 * FRAME * 2)  # silence fill
    assert bytes(b[30 * FRAME * 2 :]) == tone(20 * FRAME, 2000)
    assert call.channels[1].filled_ms == 200 and call.channels[0].filled_ms == 0


async def test_call_time_starts_at_the_first_media_and_late_duplicates_are_dropped() -> None:
    engine = ScriptedEngine()
    call = Call(engine)
    await call.handle(started())
    base = 123_456  # the source's media clock does not start at 0
    await call.handle(Audio(0, tone(FRAME, 1), base))
    await call.handle(Audio(1, tone(FRAME, 2), base + FRAME))  # channel 1 starts 20 ms later
    await call.handle(Audio(0, tone(FRAME, 3), base + FRAME))
    await call.handle(Audio(0, tone(FRAME, 9), base))  # a late duplicate of the first frame
    await call.handle(CallEnded())
    a, b = engine.sessions[0].audio, engine.sessions[1].audio
    assert bytes(a) == tone(FRAME, 1) + tone(FRAME, 3)
    assert bytes(b) == bytes(FRAME * 2) + tone(FRAME, 2)  # leading silence: sample == call time
    assert call.channels[0].clock.late_frames == 1
    assert call.duration_ms == 40


async def test_a_gap_before_the_first_media_comes_first_on_the_clock() -> None:
    # A stream that starts paused: 100 ms declared on channel 0, then timestamped audio whose
    # source clock starts anywhere. Nothing is dropped; the audio follows the gap on both legs.
    engine = ScriptedEngine()
    call = Call(engine)
    await call.handle(started())
    await call.handle(Gap(0, 100 * RATE // 1000))
    base = 987_654
    for i in range(10):
        await call.handle(Audio(0, tone(FRAME, 1000), base + i * FRAME))
        await call.handle(Audio(1, tone(FRAME, 2000), base + i * FRAME))
    await call.handle(CallEnded())
    a, b = engine.sessions[0].audio, engine.sessions[1].audio
    gap = 100 * RATE // 1000 * 2
    assert len(a) == len(b) == gap + 10 * FRAME * 2
    assert bytes(a[:gap]) == bytes(b[:gap]) == bytes(gap)
    assert bytes(a[gap:]) == tone(10 * FRAME, 1000)
    assert bytes(b[gap:]) == tone(10 * FRAME, 2000)
    assert all(c.clock.late_frames == 0 for c in call.channels.values())


async def test_declared_gap_and_mu_law_silence() -> None:
    engine = ScriptedEngine()
    call = Call(engine)
    await call.handle(started(1, Codec.PCMU))
    await call.handle(Audio(0, b"\x10" * FRAME))
    await call.handle(Gap(0, 2 * FRAME))
    await call.handle(Audio(0, b"\x20" * FRAME))
    await call.handle(CallEnded())
    assert (
        bytes(engine.sessions[0].audio) == b"\x10" * FRAME + b"\xff" * 2 * FRAME + b"\x20" * FRAME
    )


async def test_lifecycle_and_speaker_order_by_audio_time() -> None:
    # The agent's session reports its turn long before the customer's earlier turn is final.
    engine = ScriptedEngine(
        scripts={0: [(100, 900, "customer speaks first")], 1: [(500, 700, "agent overlaps")]}
    )
    call = Call(engine, CallOptions(join_same_speaker=False))
    out = collect(call)
    await call.handle(started())
    for i in range(50):
        await call.handle(Audio(1, tone(FRAME, 1), i * FRAME))
    for i in range(50):
        await call.handle(Audio(0, tone(FRAME, 1), i * FRAME))
    await call.handle(CallEnded("hangup"))
    states = [o.state for o in out if isinstance(o, CallStateChanged)]
    assert states == [CallState.ACTIVE, CallState.ENDING, CallState.ENDED]
    texts = [o.utterance.text for o in out if isinstance(o, UtteranceReleased)]
    assert texts == ["customer speaks first", "agent overlaps"]
    transcript = call.transcript()
    assert [(u.role, u.start) for u in transcript.utterances] == [("customer", 100), ("agent", 500)]
    assert call.end_reason == "hangup" and call.finals == 2


async def test_role_overrides_apply_per_channel() -> None:
    call = Call(ScriptedEngine(), CallOptions(roles=("agent",), participants=(None, "Sam")))
    await call.handle(started())
    await call.handle(CallEnded())
    infos = call.transcript().channels
    assert [(c.role, c.speaker) for c in infos] == [("agent", "agent"), ("agent", "Sam")]


async def test_a_failed_channel_does_not_hold_back_the_other() -> None:
    engine = ScriptedEngine(scripts={1: [(0, 400, "still transcribed")]}, fail_at={0: 100})
    call = Call(engine, CallOptions(join_same_speaker=False))
    out = collect(call)
    await call.handle(started())
    for i in range(50):
        await call.handle(Audio(0, tone(FRAME, 1), i * FRAME))
        await call.handle(Audio(1, tone(FRAME, 1), i * FRAME))
    for _ in range(10):  # let the reader tasks drain the sessions' event streams
        await asyncio.sleep(0)
    assert [o for o in out if isinstance(o, ChannelFailed)] == [ChannelFailed(0, "engine crashed")]
    # Released before the call ends: channel 0's stream ended, so it no longer holds the order.
    assert [o.utterance.text for o in out if isinstance(o, UtteranceReleased)] == [
        "still transcribed"
    ]
    await call.handle(CallEnded())
    assert call.state is CallState.ENDED


async def test_hold_resume_and_metadata_changes_are_call_updates() -> None:
    call = Call(ScriptedEngine())
    out = collect(call)
    await call.handle(started())
    await call.handle(Hold())
    await call.handle(Hold(0))  # already on hold: no second update
    assert [c.on_hold for c in call.channels.values()] == [True, True]
    await call.handle(Resume(1))
    assert [c.on_hold for c in call.channels.values()] == [True, False]
    await call.handle(
        MetadataChanged((ChannelSpec(1, "supervisor", "Ann"),), {"sip.callee": "ann@example.com"})
    )
    assert [o for o in out if isinstance(o, CallUpdated)] == [
        CallUpdated("hold", None),
        CallUpdated("resume", 1),
        CallUpdated("metadata", None),
    ]
    assert call.channels[1].spec.role == "supervisor"
    assert call.metadata["sip.callee"] == "ann@example.com"
    with pytest.raises(CallError):
        await call.handle(Hold(7))  # no such channel
    await call.handle(CallEnded())
    with pytest.raises(CallError):
        await call.handle(Resume())  # not active any more


async def test_bad_events_are_refused_with_a_reason() -> None:
    call = Call(ScriptedEngine(), CallOptions(max_channels=2))
    with pytest.raises(CallError, match="is new"):
        await call.handle(Audio(0, b"\0\0"))
    with pytest.raises(CallError, match="3 channels"):
        await call.handle(started(3))
    call = Call(ScriptedEngine())
    await call.handle(started())
    with pytest.raises(CallError, match="unknown channel 5"):
        await call.handle(Audio(5, b"\0\0"))
    with pytest.raises(CallError, match="is active"):
        await call.handle(started())


async def test_timestamp_jump_is_refused_without_allocating_silence() -> None:
    call = Call(ScriptedEngine(), CallOptions(max_timestamp_jump_s=10))
    await call.handle(started())
    await call.handle(Audio(0, tone(FRAME, 1), 0))
    with pytest.raises(ValueError):
        await call.handle(Audio(0, tone(FRAME, 1), 3600 * RATE))
    assert call.channels[0].clock.frontier == FRAME


async def test_abort_closes_sessions_and_cancels_readers() -> None:
    engine = ScriptedEngine()
    call = Call(engine)
    await call.handle(started())
    await call.abort("test")
    assert call.state is CallState.FAILED
    assert all(s.closed for s in engine.sessions.values())
    await call.end()  # idempotent after abort
    assert call.state is CallState.FAILED


async def test_a_leg_added_mid_call_starts_at_the_call_time_reached() -> None:
    """A third leg joining after 2 s (a SIPREC re-INVITE adding a stream) gets an STT session
    offset to 2 s and no silence before it; its turns land in call-time order among the
    others', under its own speaker; audio placed before it joined is dropped as late."""
    engine = ScriptedEngine(
        scripts={
            0: [(100, 900, "customer first"), (2400, 2800, "customer again")],
            1: [(1200, 1800, "agent next")],
            2: [(200, 600, "supervisor joins")],  # on its own session: call time 2200-2600
        }
    )
    call = Call(engine, CallOptions(join_same_speaker=False, max_channels=3))
    out = collect(call)
    await call.handle(started())
    for i in range(100):
        await call.handle(Audio(0, tone(FRAME, 1), i * FRAME))
        await call.handle(Audio(1, tone(FRAME, 1), i * FRAME))
    supervisor = ChannelSpec(2, "supervisor", "Sam", Codec.L16, RATE)
    await call.handle(ChannelAdded(supervisor, {"x": "y"}))
    assert [o for o in out if isinstance(o, CallUpdated)] == [CallUpdated("channel_added", 2)]
    assert engine.sessions[2].params.offset_ms == 2000 and call.metadata["x"] == "y"
    await call.handle(Audio(2, tone(FRAME, 1), 50 * FRAME))  # from before it joined: late
    for i in range(100, 150):
        for channel in range(3):
            await call.handle(Audio(channel, tone(FRAME, 1), i * FRAME))
    await call.handle(CallEnded())
    assert len(engine.sessions[2].audio) == 50 * FRAME * 2  # 1 s, nothing before it joined
    assert call.channels[2].clock.late_frames == 1
    assert call.channels[2].duration_ms == call.channels[0].duration_ms == 3000
    utterances = call.transcript().utterances
    assert [(u.speaker, u.start) for u in utterances] == [
        ("customer", 100),
        ("agent", 1200),
        ("Sam", 2200),
        ("customer", 2400),
    ]
    assert [c.speaker for c in call.transcript().channels] == ["customer", "agent", "Sam"]


async def test_an_added_leg_is_refused_when_it_exists_or_is_one_too_many() -> None:
    call = Call(ScriptedEngine(), CallOptions(max_channels=3))
    with pytest.raises(CallError, match="is new"):
        await call.handle(ChannelAdded(ChannelSpec(2, "x")))
    await call.handle(started())
    with pytest.raises(CallError, match="already exists"):
        await call.handle(ChannelAdded(ChannelSpec(1, "x")))
    await call.handle(ChannelAdded(ChannelSpec(2, "x")))
    with pytest.raises(CallError, match="limit of 3"):
        await call.handle(ChannelAdded(ChannelSpec(3, "x")))
    await call.handle(CallEnded())


async def test_channels_of_different_rates_end_at_the_same_call_time() -> None:
    # A µ-law/8000 leg and an L16/16000 leg (SIPREC offers both), 1 s each: at the end neither
    # is padded (aligning them by sample count padded the 8 kHz leg to twice the call).
    from gateway.stt.scripted import ScriptedEngine, parse_script

    call = Call(ScriptedEngine(parse_script([[["hi", 100, 300]]])), CallOptions())
    await call.handle(
        CallStarted(
            "t",
            (
                ChannelSpec(0, "customer", None, Codec.PCMU, 8000),
                ChannelSpec(1, "agent", None, Codec.L16, 16000),
            ),
        )
    )
    for i in range(50):
        await call.handle(Audio(0, b"\xff" * 160, i * 160))
        await call.handle(Audio(1, b"\0" * 640, i * 320))
    await call.handle(CallEnded())
    assert [c.duration_ms for c in call.channels.values()] == [1000, 1000]
    assert [c.filled_ms for c in call.channels.values()] == [0, 0]
