"""Renderers of a :class:`~gateway.transcript.model.Transcript`: JSON, plain text, WebVTT and SRT.

Every function here is pure: it takes a transcript and returns a ``dict`` or a ``str``; nothing is
read or written. Times in the transcript are integer milliseconds on the call clock.

Caption formats (VTT, SRT) split long utterances into cues of at most :data:`MAX_CUE_MS` and
:data:`MAX_CUE_CHARS` at word boundaries, using the utterance's word timings; an utterance without
words is always one cue. Cues are emitted sorted by start time (stable, so utterance order breaks
ties), each cue ends strictly after it starts, and no time is negative.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway.transcript.model import Transcript, Utterance, Word

FORMATS: tuple[str, ...] = ("text", "json", "vtt", "srt")
"""The formats :func:`render` accepts."""

MAX_CUE_MS = 7_000
"""Longest caption cue, in ms, when an utterance is split at word boundaries."""

MAX_CUE_CHARS = 84
"""Longest caption cue text (two lines of ~42 characters) when an utterance is split."""

_HOUR_MS = 3_600_000
_WHITESPACE = re.compile(r"\s+")


def _one_line(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space.

    A newline inside an utterance would break the one-line-per-utterance text format, and a blank
    line inside a caption payload would end the cue early.
    """
    return _WHITESPACE.sub(" ", text).strip()


# --------------------------------------------------------------------------------------------
# JSON


def _word_json(word: Word, speaker: str, channel: int) -> dict[str, object]:
    return {
        "text": word.text,
        "start": int(word.start),
        "end": int(word.end),
        "confidence": round(float(word.confidence), 4),
        "speaker": speaker,
        "channel": int(channel),
    }


def _utterance_json(u: Utterance) -> dict[str, object]:
    return {
        "speaker": u.speaker,
        "role": u.role,
        "channel": int(u.channel),
        "start": int(u.start),
        "end": int(u.end),
        "text": u.text,
        "confidence": round(float(u.confidence), 4),
        "words": [_word_json(w, u.speaker, u.channel) for w in u.words],
    }


def to_json(t: Transcript) -> dict[str, object]:
    """Return the transcript as a JSON-ready dict shaped like AssemblyAI's ``utterances``.

    Keys: ``call_id``, ``duration_ms``, ``channels`` (``index``, ``role``, ``participant``,
    ``speaker``), ``metadata`` (a copy), ``text`` (every utterance as ``"speaker: text"``, joined
    by newlines) and ``utterances`` (``speaker``, ``role``, ``channel``, ``start``, ``end``,
    ``text``, ``confidence`` rounded to 4 places, and ``words`` each with ``text``, ``start``,
    ``end``, ``confidence``, ``speaker``, ``channel``). Times are int ms; the result holds only
    fresh lists and dicts, so callers may mutate it.
    """
    return {
        "call_id": t.call_id,
        "duration_ms": int(t.duration_ms),
        "channels": [
            {
                "index": int(c.index),
                "role": c.role,
                "participant": c.participant,
                "speaker": c.speaker,
            }
            for c in t.channels
        ],
        "metadata": dict(t.metadata),
        "text": "\n".join(f"{u.speaker}: {_one_line(u.text)}" for u in t.utterances),
        "utterances": [_utterance_json(u) for u in t.utterances],
    }


def render_json(t: Transcript) -> str:
    """Return :func:`to_json` as indented JSON text (non-ASCII kept as is) ending in a newline."""
    return json.dumps(to_json(t), indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------
# Plain text


def _text_stamp(ms: int, with_hours: bool) -> str:
    """``MM:SS.d`` or ``HH:MM:SS.d`` with tenths truncated, never rounded up past the speech."""
    ms = max(0, ms)
    tenths = ms // 100  # floor: the stamp is never later than the speech it labels
    seconds, tenth = divmod(tenths, 10)
    minutes, second = divmod(seconds, 60)
    if with_hours:
        hours, minute = divmod(minutes, 60)
        return f"{hours:02d}:{minute:02d}:{second:02d}.{tenth}"
    return f"{minutes:02d}:{second:02d}.{tenth}"


def render_text(t: Transcript) -> str:
    """Return one line per utterance, ``[MM:SS.d] speaker: text``, each ending in a newline.

    Time rule: when the call lasts an hour or longer (``duration_ms`` or the last utterance end is
    at least 60 min) every line of the transcript uses ``[HH:MM:SS.d]``, otherwise every line uses
    ``[MM:SS.d]``; one transcript never mixes the two widths. Tenths are truncated (floor), so a
    stamp never shows a time after the speech starts. Whitespace runs in the text (newlines
    included) become single spaces. An empty transcript renders as ``""``.
    """
    longest = max([t.duration_ms, *(u.end for u in t.utterances)])
    with_hours = longest >= _HOUR_MS
    return "".join(
        f"[{_text_stamp(u.start, with_hours)}] {_one_line(u.speaker)}: {_one_line(u.text)}\n"
        for u in t.utterances
    )


# --------------------------------------------------------------------------------------------
# Captions (VTT, SRT)


@dataclass(frozen=True, slots=True)
class _Cue:
    start: int
    end: int
    speaker: str
    text: str


def _split_words(words: tuple[Word, ...]) -> list[list[Word]]:
    """Greedily group words into chunks within MAX_CUE_MS and MAX_CUE_CHARS.

    A chunk always holds at least one word, so a single over-long word still gets its own cue.
    """
    chunks: list[list[Word]] = []
    current: list[Word] = []
    chars = 0
    for word in words:
        text = _one_line(word.text)
        if current:
            too_long = chars + 1 + len(text) > MAX_CUE_CHARS
            too_slow = word.end - current[0].start > MAX_CUE_MS
            if too_long or too_slow:
                chunks.append(current)
                current, chars = [], 0
        chars += len(text) + (1 if current else 0)
        current.append(word)
    if current:
        chunks.append(current)
    return chunks


def _utterance_cues(u: Utterance) -> list[_Cue]:
    """Cues for one utterance: one cue if it fits (or has no words), else word-boundary chunks."""
    text = _one_line(u.text)
    speaker = _one_line(u.speaker)
    words = tuple(w for w in u.words if _one_line(w.text))
    fits = len(text) <= MAX_CUE_CHARS and u.end - u.start <= MAX_CUE_MS
    if fits or not words:
        return [_Cue(u.start, u.end, speaker, text)]
    return [
        _Cue(
            chunk[0].start,
            max(w.end for w in chunk),
            speaker,
            " ".join(_one_line(w.text) for w in chunk),
        )
        for chunk in _split_words(words)
    ]


def _cues(t: Transcript) -> list[_Cue]:
    """All cues of the transcript, sorted by start (stable), clamped to >= 0 and end > start."""
    cues: list[_Cue] = []
    for u in t.utterances:
        for cue in _utterance_cues(u):
            start = max(0, cue.start)
            # A caption must be visible for some time: bump zero or negative spans to 1 ms.
            end = max(cue.end, start + 1)
            cues.append(_Cue(start, end, cue.speaker, cue.text))
    cues.sort(key=lambda c: c.start)  # WebVTT requires non-decreasing cue start times
    return cues


def _clock(ms: int, sep: str) -> str:
    """``HH:MM:SS<sep>mmm``; hours grow past two digits for calls of 100 hours or more."""
    seconds, millis = divmod(max(0, ms), 1000)
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours:02d}:{minute:02d}:{second:02d}{sep}{millis:03d}"


def _vtt_escape(text: str) -> str:
    """Escape the characters WebVTT cue text and span annotations reserve: ``& < >``."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_vtt(t: Transcript) -> str:
    """Return WebVTT captions: a ``WEBVTT`` header, then one cue per block.

    Each cue is ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` followed by ``<v speaker>text``, with ``&``,
    ``<`` and ``>`` escaped in both the speaker annotation and the text (so the annotation never
    holds a raw ``>`` and no payload holds ``-->``). Long utterances are split as described in the
    module docstring.
    """
    blocks = ["WEBVTT\n"]
    for cue in _cues(t):
        blocks.append(
            f"{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}\n"
            f"<v {_vtt_escape(cue.speaker)}>{_vtt_escape(cue.text)}\n"
        )
    return "\n".join(blocks)


def render_srt(t: Transcript) -> str:
    """Return SubRip captions: cues numbered from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, then
    ``speaker: text``, blocks separated by a blank line. Same cue splitting as :func:`render_vtt`.
    Text is not escaped (SRT has no escaping); whitespace runs become single spaces.
    """
    blocks = [
        f"{n}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n{cue.speaker}: {cue.text}\n"
        for n, cue in enumerate(_cues(t), start=1)
    ]
    return "\n".join(blocks)


_RENDERERS: dict[str, Callable[[Transcript], str]] = {
    "text": render_text,
    "json": render_json,
    "vtt": render_vtt,
    "srt": render_srt,
}


def render(t: Transcript, fmt: str) -> str:
    """Render ``t`` in format ``fmt`` (one of :data:`FORMATS`).

    Raises ValueError naming the accepted formats for anything else (matching is exact: ``"TEXT"``
    is refused).
    """
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        raise ValueError(
            f"unknown transcript format {fmt!r}; expected one of: {', '.join(FORMATS)}"
        )
    return renderer(t)
