"""Renderers of a Transcript: JSON shape, text lines, WebVTT and SRT structure, cue splitting."""

from __future__ import annotations

import html
import json
import re

import pytest

from gateway.transcript.model import ChannelInfo, Transcript, TurnKey, Utterance, Word
from gateway.transcript.render import (
    FORMATS,
    MAX_CUE_CHARS,
    MAX_CUE_MS,
    render,
    render_json,
    render_srt,
    render_text,
    render_vtt,
    to_json,
)

CHANNELS = (ChannelInfo(0, "customer"), ChannelInfo(1, "agent", "Sheila"))


def words_over(text: str, start: int, end: int) -> tuple[Word, ...]:
    """The words of ``text`` spread evenly over [start, end)."""
    parts = text.split()
    step = (end - start) / len(parts)
    return tuple(
        Word(p, start + round(i * step), start + round((i + 1) * step), 0.9)
        for i, p in enumerate(parts)
    )


def utt(
    channel: int,
    speaker: str,
    start: int,
    end: int,
    text: str,
    *,
    with_words: bool = True,
    confidence: float = 0.912345,
) -> Utterance:
    role = "customer" if channel == 0 else "agent"
    return Utterance(
        channel=channel,
        speaker=speaker,
        role=role,
        start=start,
        end=end,
        text=text,
        confidence=confidence,
        words=words_over(text, start, end) if with_words else (),
        turns=(TurnKey(channel, 0, start),),
    )


LONG_TEXT = (
    "well I have been waiting on hold for almost forty minutes now and nobody has told me "
    "anything about my order which was supposed to arrive last Tuesday so I would really like "
    "to know what is going on"
)


def transcript(*utterances: Utterance, duration_ms: int = 30_000) -> Transcript:
    return Transcript(
        call_id="call-1",
        channels=CHANNELS,
        utterances=tuple(utterances),
        duration_ms=duration_ms,
        metadata={"source": "test"},
    )


SIMPLE = transcript(
    utt(0, "customer", 6_789, 7_160, "Hello?"),
    utt(1, "Sheila", 7_634, 8_155, "Hello, <Diane> & co?"),
    utt(0, "customer", 65_999, 67_000, "Yes."),
)

# --------------------------------------------------------------------------------------------
# Small parsers used to check the caption outputs' structure


VTT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d)\.(\d{3})"
SRT_TIME = r"(\d{2,}):([0-5]\d):([0-5]\d),(\d{3})"


def ms_of(groups: tuple[str, ...]) -> int:
    h, m, s, ms = (int(g) for g in groups)
    return ((h * 60 + m) * 60 + s) * 1000 + ms


def parse_vtt(doc: str) -> list[tuple[int, int, str, str]]:
    """(start, end, speaker, text) per cue, unescaped; asserts the WebVTT structure on the way."""
    assert doc.startswith("WEBVTT\n\n") or doc == "WEBVTT\n"
    assert doc.endswith("\n")
    blocks = doc.rstrip("\n").split("\n\n")
    assert blocks[0] == "WEBVTT"
    cues = []
    for block in blocks[1:]:
        lines = block.split("\n")
        assert len(lines) == 2, block
        timing = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert timing, lines[0]
        span = re.fullmatch(r"<v ([^>]+)>(.*)", lines[1])
        assert span, lines[1]
        speaker, text = span.groups()
        for part in (speaker, text):
            # no raw markup: every & starts an entity, no < at all, and no > in the payload
            assert "<" not in part
            assert not re.search(r"&(?!(amp|lt|gt);)", part)
        assert ">" not in text and "-->" not in text
        groups = timing.groups()
        cues.append(
            (ms_of(groups[:4]), ms_of(groups[4:]), html.unescape(speaker), html.unescape(text))
        )
    return cues


def parse_srt(doc: str) -> list[tuple[int, int, int, str]]:
    """(number, start, end, text) per cue; asserts the SRT structure on the way."""
    assert doc.endswith("\n")
    cues = []
    for block in doc.rstrip("\n").split("\n\n"):
        lines = block.split("\n")
        assert len(lines) == 3, block
        assert lines[0].isdigit()
        timing = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert timing, lines[1]
        groups = timing.groups()
        cues.append((int(lines[0]), ms_of(groups[:4]), ms_of(groups[4:]), lines[2]))
    return cues


# --------------------------------------------------------------------------------------------
# JSON


def test_json_shape_and_types() -> None:
    doc = to_json(SIMPLE)
    assert set(doc) == {"call_id", "duration_ms", "channels", "metadata", "text", "utterances"}
    assert doc["call_id"] == "call-1"
    assert doc["duration_ms"] == 30_000
    assert doc["metadata"] == {"source": "test"}
    assert doc["channels"] == [
        {"index": 0, "role": "customer", "participant": None, "speaker": "customer"},
        {"index": 1, "role": "agent", "participant": "Sheila", "speaker": "Sheila"},
    ]
    assert doc["text"] == "customer: Hello?\nSheila: Hello, <Diane> & co?\ncustomer: Yes."
    utterances = doc["utterances"]
    assert isinstance(utterances, list) and len(utterances) == 3
    first = utterances[1]
    assert set(first) == {
        "speaker", "role", "channel", "start", "end", "text", "confidence", "words"
    }  # fmt: skip
    assert first["speaker"] == "Sheila" and first["role"] == "agent"
    assert first["channel"] == 1 and type(first["channel"]) is int
    assert type(first["start"]) is int and type(first["end"]) is int
    assert (first["start"], first["end"]) == (7_634, 8_155)
    assert first["confidence"] == 0.9123
    assert [w["text"] for w in first["words"]] == ["Hello,", "<Diane>", "&", "co?"]
    for w in first["words"]:
        assert set(w) == {"text", "start", "end", "confidence", "speaker", "channel"}
        assert type(w["start"]) is int and type(w["end"]) is int
        assert isinstance(w["confidence"], float)
        assert w["speaker"] == "Sheila" and w["channel"] == 1


def test_render_json_round_trips_and_keeps_unicode() -> None:
    t = transcript(utt(0, "Zoë", 0, 1_000, "Café crème, s'il vous plaît"))
    out = render_json(t)
    assert "Café crème" in out and "Zoë" in out  # ensure_ascii=False
    assert out.startswith("{\n  ")  # indented
    assert json.loads(out) == to_json(t)


def test_to_json_is_a_fresh_copy() -> None:
    doc = to_json(SIMPLE)
    metadata = doc["metadata"]
    assert isinstance(metadata, dict)
    metadata["x"] = "y"
    assert SIMPLE.metadata == {"source": "test"}


# --------------------------------------------------------------------------------------------
# Text


def test_text_lines_and_truncated_tenths() -> None:
    lines = render_text(SIMPLE).splitlines()
    assert lines == [
        "[00:06.7] customer: Hello?",  # 6.789 s: truncated, not rounded up to 6.8
        "[00:07.6] Sheila: Hello, <Diane> & co?",
        "[01:05.9] customer: Yes.",  # 65.999 s
    ]
    assert render_text(SIMPLE).endswith("\n")


def test_text_minutes_past_59_use_hours_for_the_whole_call() -> None:
    t = transcript(
        utt(0, "customer", 5_000, 6_000, "Early."),
        utt(1, "Sheila", 3_725_450, 3_726_000, "Late."),
        duration_ms=3_800_000,
    )
    assert render_text(t).splitlines() == [
        "[00:00:05.0] customer: Early.",
        "[01:02:05.4] Sheila: Late.",
    ]
    # under an hour: minutes only, and 59:59.9 is the largest stamp
    short = transcript(utt(0, "customer", 3_599_999, 3_599_999, "Last."), duration_ms=3_599_999)
    assert render_text(short) == "[59:59.9] customer: Last.\n"


def test_text_keeps_one_line_per_utterance() -> None:
    t = transcript(utt(0, "customer", 0, 1_000, "two\nlines\n\nhere", with_words=False))
    assert render_text(t) == "[00:00.0] customer: two lines here\n"


def test_empty_transcript() -> None:
    t = transcript()
    assert render_text(t) == ""
    assert parse_vtt(render_vtt(t)) == []
    assert render_srt(t) == ""
    assert to_json(t)["utterances"] == [] and to_json(t)["text"] == ""


# --------------------------------------------------------------------------------------------
# VTT and SRT


def test_vtt_structure_and_escaping() -> None:
    t = transcript(
        utt(0, "customer", 6_789, 7_160, "Hello?"),
        utt(1, "A&B <x> Co", 7_634, 8_155, "Hello, <Diane> & co --> bye?"),
    )
    doc = render_vtt(t)
    assert "<v A&amp;B &lt;x&gt; Co>Hello, &lt;Diane&gt; &amp; co --&gt; bye?" in doc
    assert parse_vtt(doc) == [
        (6_789, 7_160, "customer", "Hello?"),
        (7_634, 8_155, "A&B <x> Co", "Hello, <Diane> & co --> bye?"),
    ]


def test_vtt_timestamps_past_an_hour() -> None:
    t = transcript(utt(0, "customer", 3_723_004, 3_724_500, "Late."), duration_ms=4_000_000)
    assert "01:02:03.004 --> 01:02:04.500\n" in render_vtt(t)


def test_srt_numbering_commas_and_text() -> None:
    doc = render_srt(SIMPLE)
    cues = parse_srt(doc)
    assert [n for n, *_ in cues] == [1, 2, 3]
    assert cues[0] == (1, 6_789, 7_160, "customer: Hello?")
    assert cues[2] == (3, 65_999, 67_000, "customer: Yes.")
    assert "00:00:06,789 --> 00:00:07,160" in doc
    assert "." not in doc.split("\n")[1]  # SRT uses a comma before the milliseconds


def test_long_utterance_split_at_word_boundaries() -> None:
    u = utt(0, "customer", 10_000, 28_000, LONG_TEXT)
    t = transcript(u)
    cues = parse_vtt(render_vtt(t))
    assert len(cues) >= 3
    # the cues partition the words, in order, never cutting one
    assert " ".join(text for *_, text in cues) == LONG_TEXT
    assert all(speaker == "customer" for _, _, speaker, _ in cues)
    word_iter = iter(u.words)
    for start, end, _, text in cues:
        assert len(text) <= MAX_CUE_CHARS
        assert end - start <= MAX_CUE_MS
        cue_words = [next(word_iter) for _ in text.split()]
        assert [w.text for w in cue_words] == text.split()
        # each cue spans exactly its words
        assert start == cue_words[0].start and end == cue_words[-1].end
    starts = [c[0] for c in cues]
    assert starts == sorted(starts)
    assert all(a[1] <= b[0] for a, b in zip(cues, cues[1:], strict=False))  # no overlap

    srt = parse_srt(render_srt(t))
    assert [(s, e) for _, s, e, _ in srt] == [(s, e) for s, e, _, _ in cues]
    assert [text for *_, text in srt] == [f"customer: {c[3]}" for c in cues]


def test_long_duration_alone_splits() -> None:
    # few characters but 20 s long: split on the time limit
    u = utt(1, "Sheila", 0, 20_000, "so what can I say")
    cues = parse_vtt(render_vtt(transcript(u)))
    assert len(cues) > 1
    assert all(end - start <= MAX_CUE_MS for start, end, _, _ in cues)
    assert " ".join(c[3] for c in cues) == "so what can I say"


def test_long_utterance_without_words_is_one_cue() -> None:
    u = utt(0, "customer", 10_000, 28_000, LONG_TEXT, with_words=False)
    cues = parse_vtt(render_vtt(transcript(u)))
    assert cues == [(10_000, 28_000, "customer", LONG_TEXT)]


def test_cue_end_after_start_and_cues_sorted() -> None:
    t = transcript(
        # overlapping speech: a long customer utterance split into cues, and an agent cue that
        # starts inside it; all cues must come out sorted by start
        utt(0, "customer", 1_000, 19_000, LONG_TEXT),
        utt(1, "Sheila", 5_000, 5_000, "Mm."),  # zero length: bumped to 1 ms
    )
    cues = parse_vtt(render_vtt(t))
    assert all(end > start for start, end, _, _ in cues)
    starts = [c[0] for c in cues]
    assert starts == sorted(starts)
    assert (5_000, 5_001, "Sheila", "Mm.") in cues
    srt = parse_srt(render_srt(t))
    assert [n for n, *_ in srt] == list(range(1, len(cues) + 1))
    assert [(s, e) for _, s, e, _ in srt] == [(s, e) for s, e, _, _ in cues]


# --------------------------------------------------------------------------------------------
# Dispatch


def test_render_dispatch() -> None:
    assert FORMATS == ("text", "json", "vtt", "srt")
    assert render(SIMPLE, "text") == render_text(SIMPLE)
    assert render(SIMPLE, "json") == render_json(SIMPLE)
    assert render(SIMPLE, "vtt") == render_vtt(SIMPLE)
    assert render(SIMPLE, "srt") == render_srt(SIMPLE)


@pytest.mark.parametrize("fmt", ["pdf", "", "TEXT"])
def test_render_unknown_format(fmt: str) -> None:
    with pytest.raises(ValueError) as err:
        render(SIMPLE, fmt)
    for name in FORMATS:
        assert name in str(err.value)
