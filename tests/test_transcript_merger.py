"""TurnMerger: partial/final rules (invariant 4) and audio ordering by watermark (invariant 5)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.transcript.merger import TurnDelta, TurnMerger, UtteranceReleased
from gateway.transcript.model import ChannelInfo, TurnUpdate, Word

CHANNELS = (ChannelInfo(0, "customer", "Diane"), ChannelInfo(1, "agent"))


def turn(
    channel: int,
    order: int,
    start: int,
    end: int,
    text: str = "",
    *,
    final: bool = True,
    epoch: int = 0,
) -> TurnUpdate:
    text = text or f"c{channel} t{order}"
    words = tuple(
        Word(w, start + i * (end - start) // max(1, len(text.split())), end)
        for i, w in enumerate(text.split())
    )
    return TurnUpdate(channel, epoch, order, words, text, start, end, final, 0.9)


def released(outputs: list[object]) -> list[UtteranceReleased]:
    return [o for o in outputs if isinstance(o, UtteranceReleased)]


def test_late_partial_never_overwrites_final() -> None:
    m = TurnMerger(CHANNELS)
    assert m.update(turn(0, 0, 100, 900, "hello there", final=False)) == [
        TurnDelta(turn(0, 0, 100, 900, "hello there", final=False))
    ]
    final = turn(0, 0, 100, 1000, "hello there friend")
    assert TurnDelta(final) in m.update(final)
    # The partial computed before the final arrives late: dropped, counted, nothing published.
    assert m.update(turn(0, 0, 100, 900, "hello there", final=False)) == []
    assert m.stats.stale_partials == 1
    # A second final for the same key is dropped too: finals are immutable.
    assert m.update(turn(0, 0, 100, 1000, "something else")) == []
    assert m.stats.duplicate_finals == 1
    out = m.close()
    assert [u.utterance.text for u in released(out)] == ["hello there friend"]
    assert m.open_partials == ()


def test_partials_upsert_and_identical_repeats_are_suppressed() -> None:
    m = TurnMerger(CHANNELS)
    a = turn(1, 0, 0, 500, "good", final=False)
    b = turn(1, 0, 0, 800, "good morning", final=False)
    assert m.update(a) == [TurnDelta(a)]
    assert m.update(a) == []
    assert m.update(b) == [TurnDelta(b)]
    assert m.open_partials == (b,)


def test_finals_are_ordered_by_audio_time_not_arrival() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    out: list[object] = []
    # The agent's turn (2.0 s) is finalized first, the customer's earlier turn (1.0 s) later.
    out += m.update(turn(1, 0, 2000, 3000, "agent later"))
    out += m.watermark(1, 3500)
    assert released(out) == []  # channel 0 may still produce something before 2.0 s
    out += m.update(turn(0, 0, 1000, 1800, "customer first"))
    out += m.watermark(0, 4000)
    texts = [r.utterance.text for r in released(out)]
    assert texts == ["customer first", "agent later"]
    assert [r.index for r in released(out)] == [0, 1]


def test_release_waits_for_every_other_channel_watermark() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    assert released(m.update(turn(0, 0, 1000, 2000))) == []
    assert released(m.watermark(1, 999)) == []
    # At 1000 channel 1 may still finalize a turn starting at 1000: only strictly past it.
    assert released(m.watermark(1, 1000)) == []
    assert [r.utterance.start for r in released(m.watermark(1, 1001))] == [1000]


def test_turns_starting_together_are_released_in_start_end_channel_order() -> None:
    # Channel 1's open turn starts at 1000 (its watermark); channel 0 finalizes 1000-2000 first.
    # Channel 1's 1000-1500 is shorter, so it comes first in the transcript and in the release.
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    m.watermark(1, 1000)
    assert released(m.update(turn(0, 0, 1000, 2000))) == []
    out = released(m.update(turn(1, 0, 1000, 1500)))
    out += released(m.close())
    assert [(r.utterance.channel, r.utterance.end) for r in out] == [(1, 1500), (0, 2000)]
    assert m.stats.late_finals == 0


def test_own_watermark_does_not_block_release() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    m.watermark(1, 10_000)
    assert len(released(m.update(turn(0, 0, 1000, 2000)))) == 1


def test_close_flushes_everything_in_order() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    m.update(turn(1, 0, 500, 900))
    m.update(turn(0, 0, 400, 1200))
    m.update(turn(0, 1, 1300, 1400))
    out = released(m.close())
    assert [(r.utterance.channel, r.utterance.start) for r in out] == [
        (0, 400),
        (1, 500),
        (0, 1300),
    ]


def test_ties_sort_by_end_then_channel() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    m.update(turn(1, 0, 500, 900))
    m.update(turn(0, 0, 500, 900))
    m.update(turn(0, 1, 500, 700, "short"))
    out = released(m.close())
    assert [(r.utterance.channel, r.utterance.end) for r in out] == [(0, 700), (0, 900), (1, 900)]


def test_join_consecutive_turns_of_one_speaker() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=True, max_join_gap_ms=500)
    m.update(turn(0, 0, 0, 1000, "oh hello"))
    m.update(turn(0, 1, 1200, 2000, "i did not know"))
    m.update(turn(0, 2, 3000, 3500, "anyway"))  # gap 1000 > 500: a new utterance
    m.update(turn(1, 0, 4000, 4500, "yes"))
    out = released(m.close())
    assert [(r.utterance.channel, r.utterance.text) for r in out] == [
        (0, "oh hello i did not know"),
        (0, "anyway"),
        (1, "yes"),
    ]
    first = out[0].utterance
    assert (first.start, first.end) == (0, 2000)
    assert len(first.turns) == 2 and first.speaker == "Diane" and first.role == "customer"
    assert [w.text for w in first.words] == ["oh", "hello", "i", "did", "not", "know"]


def test_joined_utterance_is_released_once_it_cannot_grow() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=True, max_join_gap_ms=500)
    m.watermark(1, 100_000)
    m.update(turn(0, 0, 0, 1000))
    assert released(m.watermark(0, 1500)) == []  # a turn starting at 1.5 s could still join
    assert len(released(m.watermark(0, 1501))) == 1


def test_empty_final_closes_partial_but_makes_no_utterance() -> None:
    m = TurnMerger(CHANNELS)
    m.update(turn(0, 0, 0, 500, "uh", final=False))
    empty = TurnUpdate(0, 0, 0, (), "", 0, 500, True, 0.0)
    assert m.update(empty) == [TurnDelta(empty)]
    assert released(m.close()) == []
    assert m.open_partials == ()


def test_epochs_are_distinct_turns() -> None:
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    out = m.update(turn(0, 0, 0, 500, "before reconnect"))
    out += m.update(turn(0, 0, 600, 900, "after reconnect", epoch=1))
    out += m.close()
    assert [r.utterance.text for r in released(out)] == ["before reconnect", "after reconnect"]


@st.composite
def channel_streams(draw: st.DrawFn) -> list[list[TurnUpdate]]:
    streams = []
    for ch in (0, 1, 2):
        t = draw(st.integers(0, 500))
        turns = []
        for order in range(draw(st.integers(0, 6))):
            start = t + draw(st.integers(0, 2000))
            end = start + draw(st.integers(1, 3000))
            turns.append(turn(ch, order, start, end))
            t = end
        streams.append(turns)
    return streams


@settings(max_examples=300, deadline=None)
@given(channel_streams(), st.randoms(use_true_random=False), st.booleans())
def test_any_arrival_interleaving_gives_the_audio_order(
    streams: list[list[TurnUpdate]], rnd: object, join: bool
) -> None:
    """Each channel emits its finals in order, each followed by a watermark at its end; the
    channels' streams interleave arbitrarily. The ordered output must be sorted by
    (start, end, channel) and hold every final exactly once, released as early as allowed."""
    import random

    assert isinstance(rnd, random.Random)
    infos = [ChannelInfo(i, f"r{i}") for i in range(3)]
    m = TurnMerger(infos, join_same_speaker=join, max_join_gap_ms=300)
    queues = [list(s) for s in streams]
    outputs: list[object] = []
    while any(queues):
        ch = rnd.choice([i for i, q in enumerate(queues) if q])
        u = queues[ch].pop(0)
        outputs += m.update(u)
        # Next turn of this channel starts at or after this end.
        outputs += m.watermark(ch, u.end_ms if queues[ch] else math.inf)
    for ch, q in enumerate(streams):
        if not q:
            outputs += m.watermark(ch, math.inf)
    outputs += m.close()
    utterances = [r.utterance for r in released(outputs)]
    keys = [k for u in utterances for k in u.turns]
    expected = sorted(
        (u for s in streams for u in s), key=lambda u: (u.start_ms, u.end_ms, u.channel)
    )
    assert keys == [u.key for u in expected]
    assert m.stats.late_finals == 0
    starts = [(u.start, u.channel) for u in utterances]
    assert starts == sorted(starts, key=lambda s: s[0]) or join


def test_released_utterances_are_kept_exactly() -> None:
    """The merger keeps released utterances packed for the end-of-call transcript: what it
    hands back later is equal to what it released, odd word texts and wordless turns too."""
    m = TurnMerger(CHANNELS, join_same_speaker=False)
    odd = TurnUpdate(
        0,
        0,
        1,
        (Word("a\x1fb", 100, 180, 0.123456789), Word("", 200, 260, 1.0)),
        "a\x1fb",
        100,
        260,
        True,
        0.5,
    )
    wordless = TurnUpdate(1, 0, 0, (), "[music]", 300, 900, True, 0.75)
    plain = turn(0, 2, 1000, 1400, "hello there friend")
    out = [*m.update(odd), *m.update(wordless), *m.update(plain), *m.close()]
    sent = [r.utterance for r in released(out)]
    assert len(sent) == 3 and m.released_count == 3
    assert m.utterances == tuple(sent)


def test_released_utterances_keep_joined_turns_and_speaker_changes() -> None:
    """Utterances of several joined turns, of a reconnect's new epoch and from before and after
    a participant change come back exactly, each with its own words, turns and speaker."""
    m = TurnMerger(CHANNELS, join_same_speaker=True, max_join_gap_ms=300)
    out = [*m.update(turn(0, 0, 0, 400, "good morning")), *m.update(turn(0, 1, 600, 900, "hi"))]
    out += m.update(turn(1, 0, 1000, 1500, "hello how can I help"))
    out += [*m.watermark(0, 1900), *m.watermark(1, 1900)]
    assert len(released(out)) == 2  # both utterances settled before the change
    m.set_channels([ChannelInfo(0, "customer", "Diane Smith")])
    out += m.update(turn(0, 0, 2000, 2400, "my order", epoch=1))
    out += [*m.update(turn(1, 1, 3000, 3200, "sure")), *m.close()]
    sent = [r.utterance for r in released(out)]
    assert [(u.speaker, len(u.turns), len(u.words)) for u in sent] == [
        ("Diane", 2, 3),
        ("agent", 1, 5),
        ("Diane Smith", 1, 2),
        ("agent", 1, 1),
    ]
    assert sent[2].turns[0].epoch == 1
    assert m.utterances == tuple(sent)
    assert [m.utterances[i] for i in range(4)] == sent
