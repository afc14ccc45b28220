"""TurnSegmenter: turn boundaries from VAD probabilities, AssemblyAI-style silence rules."""

from __future__ import annotations

import pytest

from gateway.stt.endpointing import (
    EndCandidate,
    PartialDue,
    SegmenterEvent,
    SegmenterState,
    TurnClosed,
    TurnDropped,
    TurnOpened,
    TurnResumed,
    TurnSegmenter,
)

W = 512  # samples per window at 16 kHz = 32 ms
MS = 16


def windows(ms: int) -> int:
    return ms * MS // W


def seg(**kw: int) -> TurnSegmenter:
    opts: dict[str, int] = dict(
        min_speech_ms=100,
        pad_ms=200,
        min_turn_silence_ms=400,
        max_turn_silence_ms=1280,
        max_turn_ms=20000,
        partial_interval_ms=1000,
    )
    opts.update(kw)
    return TurnSegmenter(**opts)  # type: ignore[arg-type]


def feed(s: TurnSegmenter, p: float, ms: int) -> list[SegmenterEvent]:
    return s.feed([p] * windows(ms))


def of(events: list[SegmenterEvent], kind: type) -> list[SegmenterEvent]:
    return [e for e in events if isinstance(e, kind)]


def test_turn_opens_with_padding_and_ends_after_min_silence_when_accepted() -> None:
    s = seg()
    assert feed(s, 0.0, 1024) == []
    ev = feed(s, 0.9, 960)
    opened = of(ev, TurnOpened)
    assert opened == [TurnOpened(1024 * MS - 200 * MS)]
    ev = feed(s, 0.05, 416)
    (cand,) = of(ev, EndCandidate)
    assert isinstance(cand, EndCandidate)
    assert cand.start == opened[0].start  # type: ignore[union-attr]
    speech_end = (1024 + 960) * MS
    assert cand.end == speech_end + 200 * MS  # padded, and the padding is already received
    assert cand.regions == ((1024 * MS, speech_end),)
    closed = s.end_turn()
    assert (closed.start, closed.end, closed.reason) == (cand.start, cand.end, "end_of_turn")
    assert s.state is SegmenterState.IDLE


def test_max_silence_closes_the_turn_without_a_decision() -> None:
    s = seg()
    feed(s, 0.9, 640)
    ev = feed(s, 0.0, 1400)
    assert len(of(ev, EndCandidate)) == 1 and ev[-1] == of(ev, EndCandidate)[0]
    assert s.deciding and s.pending > 0  # the rest of the silence waits for the decision
    s.keep_turn()
    ev = s.feed(())
    (closed,) = of(ev, TurnClosed)
    assert isinstance(closed, TurnClosed) and closed.reason == "max_silence"
    assert s.state is SegmenterState.IDLE


def test_speech_resuming_after_a_candidate_withdraws_it() -> None:
    s = seg()
    feed(s, 0.9, 640)
    assert of(feed(s, 0.0, 448), EndCandidate)
    assert feed(s, 0.9, 320) == []  # queued behind the pending decision
    s.keep_turn()
    ev = s.feed(())
    assert of(ev, TurnResumed)
    with pytest.raises(RuntimeError):
        s.end_turn()
    ev = feed(s, 0.0, 448)
    (cand,) = of(ev, EndCandidate)
    assert isinstance(cand, EndCandidate) and len(cand.regions) == 2


def test_blip_shorter_than_min_speech_is_dropped() -> None:
    s = seg(min_speech_ms=200)
    feed(s, 0.9, 64)
    ev = feed(s, 0.0, 448)
    assert of(ev, TurnDropped) and not of(ev, EndCandidate)
    assert s.state is SegmenterState.IDLE


def test_hysteresis_keeps_a_turn_through_dips_above_neg_threshold() -> None:
    s = seg()
    feed(s, 0.9, 320)
    ev = feed(s, 0.4, 2000)  # below threshold 0.5 but above neg threshold 0.35
    assert not of(ev, EndCandidate) and s.state is SegmenterState.SPEAKING


def test_partials_are_due_every_interval_of_speech() -> None:
    s = seg(partial_interval_ms=1000)
    ev = feed(s, 0.9, 3200)
    due = of(ev, PartialDue)
    assert len(due) == 3
    assert all(isinstance(d, PartialDue) and d.end - d.start >= 1000 * MS for d in due)
    assert of(feed(seg(partial_interval_ms=0), 0.9, 3200), PartialDue) == []


def test_long_monologue_is_split_at_the_quietest_recent_window() -> None:
    s = seg(max_turn_ms=5000)
    probs = [0.9] * windows(3000) + [0.4] + [0.9] * windows(2500)
    ev = s.feed(probs)
    closed = of(ev, TurnClosed)
    assert len(closed) == 1 and isinstance(closed[0], TurnClosed)
    assert closed[0].reason == "max_turn"
    assert closed[0].end == (windows(3000)) * W  # the 0.4 window
    opened = of(ev, TurnOpened)
    assert opened[-1] == TurnOpened(closed[0].end)


def test_watermark_is_the_open_turn_start_or_recent_position() -> None:
    s = seg()
    feed(s, 0.0, 2000)
    idle_mark = s.watermark
    assert 0 < idle_mark <= s.position
    feed(s, 0.9, 320)
    assert s.watermark == s.turn_start
    feed(s, 0.0, 1400)  # closed by max silence
    assert s.watermark >= idle_mark


def test_flush_closes_an_open_turn() -> None:
    s = seg()
    feed(s, 0.9, 640)
    (closed,) = s.flush()
    assert isinstance(closed, TurnClosed) and closed.reason == "flush"
    assert s.flush() == []


def test_next_turn_audio_never_overlaps_the_previous_one() -> None:
    s = seg(pad_ms=300)
    feed(s, 0.9, 640)
    feed(s, 0.0, 416)
    first = s.end_turn()
    assert s.feed(()) == []
    ev = feed(s, 0.9, 320)  # speech right after: padding would reach into the first turn
    (opened,) = of(ev, TurnOpened)
    assert isinstance(opened, TurnOpened) and opened.start >= first.end


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError):
        TurnSegmenter(min_turn_silence_ms=500, max_turn_silence_ms=100)
    with pytest.raises(ValueError):
        TurnSegmenter(threshold=1.5)


def test_force_close_and_new_silences() -> None:
    s = seg()
    assert s.force_close() is None
    feed(s, 0.9, 640)
    closed = s.force_close()
    assert closed is not None and closed.reason == "forced"
    assert s.state is SegmenterState.IDLE
    s.set_silences(1000, 2000)
    feed(s, 0.9, 320)
    assert not of(feed(s, 0.0, 700), EndCandidate)  # 700 ms < the new 1000 ms
    with pytest.raises(ValueError):
        s.set_silences(3000, None)
