"""Accuracy scoring: normalization, WER, turn alignment, order and timing checks, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.transcript.model import ChannelInfo, Transcript, TurnKey, Utterance, Word
from gateway.transcript.scoring import (
    ReferenceTurn,
    ScoreReport,
    TurnMatch,
    align_turns,
    channel_wer,
    check_order,
    check_timing,
    load_reference,
    normalize,
    score,
    word_error_rate,
)
from tests.conftest import CALLS, ROOT

ROLES = {0: "customer", 1: "agent"}


def ref(channel: int, start_ms: int, end_ms: int, text: str) -> ReferenceTurn:
    return ReferenceTurn(channel, ROLES[channel], ROLES[channel], start_ms, end_ms, text)


def utt(channel: int, start: int, end: int, text: str, *, with_words: bool = True) -> Utterance:
    """An utterance with its words spread evenly over [start, end)."""
    parts = text.split()
    step = (end - start) / max(1, len(parts))
    words = tuple(
        Word(p, start + round(i * step), start + round((i + 1) * step)) for i, p in enumerate(parts)
    )
    return Utterance(
        channel=channel,
        speaker=ROLES[channel],
        role=ROLES[channel],
        start=start,
        end=end,
        text=text,
        confidence=1.0,
        words=words if with_words else (),
        turns=(TurnKey(channel, 0, start),),
    )


def word_start(u: Utterance, text: str) -> int:
    """Start of the first word of ``u`` whose text is ``text``."""
    return next(w.start for w in u.words if w.text == text)


def transcript(utterances: list[Utterance]) -> Transcript:
    ordered = sorted(utterances, key=lambda u: (u.start, u.end, u.channel))
    return Transcript(
        call_id="test",
        channels=(ChannelInfo(0, "customer"), ChannelInfo(1, "agent")),
        utterances=tuple(ordered),
        duration_ms=max((u.end for u in ordered), default=0),
    )


# --------------------------------------------------------------------------------------------
# Normalization and WER


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Hello, World!", "hello world"),  # case and punctuation
        ("I'm OK.", "i am ok"),  # contractions
        ("I’m here", "I'm here"),  # typographic apostrophe
        ("one two three", "1 2 3"),  # spelled digits vs digits
        ("one two three", "123"),
        ("twenty-five", "25"),
        ("twenty five", "25"),
        ("Um, I uh think, hmm, so.", "I think so"),  # fillers
        ("Uh-huh. Mm-hmm, er, erm, hm, mhm yes", "yes"),
        ("the colour", "the color"),  # spelling
    ],
)
def test_normalize_equivalences(a: str, b: str) -> None:
    assert normalize(a) == normalize(b)


def test_normalize_output() -> None:
    assert normalize("Hello, World!") == "hello world"
    assert normalize("Uh, um, hmm") == ""
    assert normalize("It's twenty-five dollars.") == "it is $25"
    assert normalize("I didn't know") == "i did not know"


def test_normalize_keeps_distinct_words_distinct() -> None:
    assert normalize("twenty five") != normalize("twenty six")
    assert normalize("huh") == "huh"  # a real word, unlike the uh-huh backchannel


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("a b c d", "a x c", 0.5),  # 1 substitution + 1 deletion over 4
        ("The cat sat.", "the cat sat", 0.0),
        ("the cat sat", "the cat sat down", 1 / 3),
        ("the cat sat", "", 1.0),
        ("one two three", "1 2 3", 0.0),
        ("Um, the cat sat", "the cat uh sat", 0.0),
        ("", "", 0.0),
        ("", "something", 1.0),
        ("uh um", "", 0.0),  # empty after normalization
    ],
)
def test_word_error_rate(reference: str, hypothesis: str, expected: float) -> None:
    assert word_error_rate(reference, hypothesis) == pytest.approx(expected)


def test_channel_wer_ignores_turn_boundaries_and_pools_channels() -> None:
    refs = [
        ref(0, 0, 2_000, "I would like to"),
        ref(0, 2_000, 4_000, "check my order"),
        ref(1, 5_000, 7_000, "sure what is the number"),
    ]
    # same words, cut differently: no errors
    hyp = [utt(0, 0, 1_000, "I would"), utt(0, 1_000, 4_000, "like to check my order")]
    hyp.append(utt(1, 5_000, 7_000, "Sure, what is the number?"))
    assert channel_wer(refs, hyp) == 0.0
    # one substitution on channel 0 (7 words) and one deletion on channel 1 (5 words)
    hyp = [
        utt(0, 0, 4_000, "I would like to check my border"),
        utt(1, 5_000, 7_000, "sure what is the"),
    ]
    assert channel_wer(refs, hyp) == pytest.approx(2 / 12)
    # the right words on the wrong channel: 5 substitutions and 2 deletions on channel 0,
    # 5 substitutions and 2 insertions on channel 1
    hyp = [
        utt(1, 0, 4_000, "I would like to check my order"),
        utt(0, 5_000, 7_000, "sure what is the number"),
    ]
    assert channel_wer(refs, hyp) == pytest.approx(14 / 12)
    assert channel_wer([], []) == 0.0
    assert channel_wer([], [utt(0, 0, 1, "hi")]) == 1.0


# --------------------------------------------------------------------------------------------
# Alignment

REFS = [
    ref(0, 1_000, 3_500, "I would like to check my order status"),
    ref(0, 3_600, 5_500, "it was placed on Monday"),
    ref(1, 6_500, 8_000, "Sure. Can I have the order number?"),
    ref(0, 9_000, 10_500, "Yes, it is four five six."),
    ref(1, 11_000, 11_500, "Thanks."),  # one word: not scored
    ref(1, 12_000, 16_000, "okay so let me pull that up for you one moment please"),
]


def hypothesis() -> list[Utterance]:
    """REFS recognized with different cuts (two turns merged, one split) and timing offsets."""
    return [
        # turns 0 and 1 merged into one utterance, 120 ms late, with a contraction
        utt(0, 1_120, 5_500, "I'd like to check my order status, it was placed on Monday."),
        utt(1, 6_450, 8_000, "Sure, can I have the order number?"),
        utt(0, 9_050, 10_400, "Yes, it's 4 5 6."),
        utt(1, 11_000, 11_400, "Thanks."),
        # turn 5 split in two utterances, first word misrecognized
        utt(1, 12_080, 14_000, "OK so let me pull that up"),
        utt(1, 14_200, 16_000, "for you. One moment, please."),
    ]


def test_align_finds_merged_and_split_turns() -> None:
    hyp = hypothesis()
    t = transcript(hyp)
    assert list(t.utterances) == hyp  # already in transcript order
    matches = align_turns(REFS, t.utterances)
    assert [m.ref for m in matches] == [REFS[0], REFS[1], REFS[2], REFS[3], REFS[5]]
    by_text = {m.ref.text: m for m in matches}

    m = by_text[REFS[0].text]
    assert (m.utterance_index, m.start_ms) == (0, 1_120)
    m = by_text[REFS[1].text]  # inside the merged utterance, starting at its word "it"
    assert (m.utterance_index, m.start_ms) == (0, word_start(hyp[0], "it"))
    m = by_text[REFS[2].text]
    assert (m.utterance_index, m.start_ms) == (1, 6_450)
    m = by_text[REFS[3].text]
    assert (m.utterance_index, m.start_ms) == (2, 9_050)
    m = by_text[REFS[5].text]  # majority of its words in the first part; "OK" dates it
    assert (m.utterance_index, m.start_ms) == (4, 12_080)
    assert all(m.found for m in matches)


def test_align_without_word_timings_uses_utterance_start() -> None:
    hyp = [utt(0, 1_300, 5_500, "I would like to check my order status", with_words=False)]
    matches = align_turns(REFS[:1], hyp)
    assert matches == [TurnMatch(REFS[0], 0, 1_300)]


def test_leading_filler_dates_the_turn() -> None:
    refs = [
        ref(0, 0, 1_500, "so that is the first thing uh"),
        ref(0, 2_000, 4_000, "um this is me talking slowly"),
    ]
    # the recognizer kept the fillers: "um" dates the second turn, the first turn's trailing
    # "uh" (right before "um") is not taken for it
    hyp = [
        utt(0, 0, 1_500, "So that is the first thing, uh"),
        utt(0, 2_000, 4_000, "Um, this is me talking slowly."),
    ]
    matches = align_turns(refs, hyp)
    assert [(m.utterance_index, m.start_ms) for m in matches] == [(0, 0), (1, 2_000)]
    # all in one utterance: still only as many fillers as the reference turn opens with
    merged = utt(0, 0, 4_000, "so that is the first thing uh um this is me talking slowly")
    matches = align_turns(refs, [merged])
    assert matches[1].start_ms == word_start(merged, "um")
    # the recognizer dropped the filler: the first real word dates the turn
    hyp = [
        utt(0, 0, 1_500, "So that is the first thing."),
        utt(0, 2_300, 4_000, "This is me talking slowly."),
    ]
    assert align_turns(refs, hyp)[1].start_ms == 2_300


def test_wrong_channel_is_missing() -> None:
    hyp = hypothesis()
    hyp[1] = utt(0, 6_450, 8_000, "Sure, can I have the order number?")  # agent's words on ch 0
    t = transcript(hyp)
    matches = align_turns(REFS, t.utterances)
    missing = [m for m in matches if not m.found]
    assert [m.ref for m in missing] == [REFS[2]]
    assert missing[0].start_ms is None
    report = score(REFS, t)
    assert report.missing == (REFS[2],)
    assert report.wer > 0


def test_mostly_wrong_words_is_missing() -> None:
    refs = [ref(0, 0, 2_000, "please send me a new card")]
    matches = align_turns(refs, [utt(0, 0, 2_000, "police sent the a blue card")])
    assert matches == [TurnMatch(refs[0], None, None)]  # 2 of 6 words match
    matches = align_turns(refs, [utt(0, 0, 2_000, "please send a new card")])
    assert matches[0].found  # 5 of 6


def test_no_hypothesis_at_all() -> None:
    report = score(REFS, transcript([]))
    assert len(report.missing) == 5
    assert report.wer == 1.0
    assert report.worst_timing_error_ms is None
    assert report.order_problems == ()
    assert "timing: no turn found" in report.format()


# --------------------------------------------------------------------------------------------
# Order and timing checks


def test_swapped_order_is_reported() -> None:
    refs = [
        ref(0, 1_000, 2_500, "I would like a refund please"),
        ref(1, 3_000, 4_500, "I can help you with that"),
        ref(0, 5_000, 6_000, "thank you very much"),
    ]
    right = transcript(
        [
            utt(0, 1_000, 2_500, "I would like a refund please"),
            utt(1, 3_000, 4_500, "I can help you with that"),
            utt(0, 5_000, 6_000, "thank you very much"),
        ]
    )
    assert check_order(align_turns(refs, right.utterances)) == []
    # the agent's answer placed before the customer's question
    swapped = transcript(
        [
            utt(0, 1_000, 2_500, "I would like a refund please"),
            utt(1, 800, 4_500, "I can help you with that"),
            utt(0, 5_000, 6_000, "thank you very much"),
        ]
    )
    problems = check_order(align_turns(refs, swapped.utterances))
    assert len(problems) == 1
    assert "I can help you with that" in problems[0]
    assert "#0" in problems[0] and "#1" in problems[0]
    assert check_order(align_turns(refs, swapped.utterances), slack_ms=2_000) == []
    assert score(refs, swapped).order_problems == tuple(problems)


def test_same_utterance_is_not_out_of_order() -> None:
    matches = [
        TurnMatch(ref(0, 0, 1_000, "a b"), 3, 0),
        TurnMatch(ref(0, 1_000, 2_000, "c d"), 3, 1_000),
        TurnMatch(ref(1, 1_500, 2_000, "e f"), None, None),  # missing turns are skipped
        TurnMatch(ref(1, 2_500, 3_000, "g h"), 4, 2_500),
    ]
    assert check_order(matches) == []


def test_timing_tolerance() -> None:
    matches = [
        TurnMatch(ref(0, 1_000, 2_000, "a b"), 0, 1_300),
        TurnMatch(ref(1, 3_000, 4_000, "c d"), 1, 2_200),
        TurnMatch(ref(1, 5_000, 6_000, "e f"), None, None),
    ]
    problems = check_timing(matches, 500)
    assert len(problems) == 1
    assert "-800 ms" in problems[0] and "c d" in problems[0]
    assert check_timing(matches, 800) == []
    assert len(check_timing(matches, 299)) == 2


def test_score_report() -> None:
    t = transcript(hypothesis())
    report = score(REFS, t)
    assert isinstance(report, ScoreReport)
    assert report.reference_words == 37
    assert report.wer == pytest.approx(1 / 37)  # "okay" recognized as "OK"
    assert report.missing == ()
    assert report.order_problems == ()
    assert report.found == len(report.matches) == 5
    assert report.worst_timing_error_ms == 120
    assert report.worst_timing_turn == REFS[0]
    assert report.timing_problems(100) != [] and report.timing_problems(120) == []
    text = report.format(timing_tolerance_ms=100)
    assert "WER 2.70%" in text and "5/5" in text and "+120 ms" in text
    assert "order: ok" in text


# --------------------------------------------------------------------------------------------
# Reference files


def test_load_reference(tmp_path: Path) -> None:
    path = tmp_path / "x.truth.json"
    doc = {
        "channels": [
            {"index": 0, "role": "customer", "speaker": "Diane"},
            {"index": 1, "role": "agent", "speaker": "Sheila"},
        ],
        "duration_s": 30.0,
        "turns": [
            {"channel": 0, "speaker": "Diane", "role": "customer", "start_s": 6.68,
             "end_s": 7.16, "text": "Hello?"},
            {"channel": 1, "start_s": 7.634, "end_s": 8.155, "text": "Hello?"},
        ],
    }  # fmt: skip
    path.write_text(json.dumps(doc))
    assert load_reference(path) == [
        ReferenceTurn(0, "customer", "Diane", 6_680, 7_160, "Hello?"),
        ReferenceTurn(1, "agent", "Sheila", 7_634, 8_155, "Hello?"),  # from "channels"
    ]
    doc["turns"] = None
    path.write_text(json.dumps(doc))
    assert load_reference(path) is None
    del doc["turns"]
    path.write_text(json.dumps(doc))
    assert load_reference(str(path)) is None


def perfect_hypothesis(turns: list[ReferenceTurn]) -> Transcript:
    """One utterance per reference turn, words spread evenly over it."""
    return transcript(
        [
            Utterance(
                channel=turn.channel,
                speaker=turn.speaker,
                role=turn.role,
                start=turn.start_ms,
                end=turn.end_ms,
                text=turn.text,
                confidence=1.0,
                words=utt(turn.channel, turn.start_ms, turn.end_ms, turn.text).words,
                turns=(TurnKey(turn.channel, 0, i),),
            )
            for i, turn in enumerate(turns)
        ]
    )


# The corpus calls that travel with the repository (tests/data/README.md) and the sample.
TRUTH_FILES = sorted(CALLS.glob("*.truth.json")) + sorted((ROOT / "samples").glob("*.truth.json"))


def test_the_repository_carries_the_corpus_references() -> None:
    assert len(TRUTH_FILES) >= 4, TRUTH_FILES


def test_untranscribed_reference_loads_as_none(tmp_path: Path) -> None:
    # The corpus marks real calls without a reference transcript with "turns": null.
    path = tmp_path / "x_untranscribed.truth.json"
    channels = [{"index": 0, "role": "customer"}, {"index": 1, "role": "agent"}]
    path.write_text(json.dumps({"channels": channels, "duration_s": 245.4, "turns": None}))
    assert load_reference(path) is None


@pytest.mark.parametrize("path", TRUTH_FILES, ids=lambda p: p.name)
def test_real_reference_scores_perfect_hypothesis(path: Path) -> None:
    turns = load_reference(path)
    assert turns
    report = score(turns, perfect_hypothesis(turns))
    assert report.wer == 0.0, report.format()
    assert report.reference_words > 0
    assert report.missing == ()
    assert report.order_problems == ()
    assert report.worst_timing_error_ms == 0
    assert check_timing(report.matches, 0) == []
    multi_word = [t for t in turns if len(normalize(t.text).split()) > 1]
    assert len(report.matches) == len(multi_word)
