"""Accuracy scoring of a transcript against a corpus reference ("truth") file.

Used by tests and benchmarks. Everything here is pure except :func:`load_reference`, which reads
one JSON file. Times are integer milliseconds on the call clock.

Text is compared after :func:`normalize` (the standard Whisper evaluation normalizer plus a few
fixes, see there). Three measures:

* WER (:func:`channel_wer`): per channel, the concatenated reference text against the concatenated
  hypothesis text, pooled over channels, so where turns and utterances are cut does not matter.
* Presence and order (:func:`align_turns`, :func:`check_order`): each reference turn is located in
  the hypothesis by a word-level edit-distance alignment of its channel; turns that do not appear
  are "missing", and turns whose utterances run backwards in the transcript are order problems.
* Timing (:func:`check_timing`): the hypothesis start of each located turn against the reference.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer

from gateway.transcript.model import Transcript, Utterance

# --------------------------------------------------------------------------------------------
# Reference files


@dataclass(frozen=True, slots=True)
class ReferenceTurn:
    """One turn of a reference transcript: who spoke, on which channel, when, and what."""

    channel: int
    role: str
    speaker: str
    start_ms: int
    end_ms: int
    text: str


def _parse_reference(data: Any) -> list[ReferenceTurn] | None:
    """Turn a parsed truth document into reference turns (None when it has no ``turns``)."""
    turns = data.get("turns")
    if turns is None:
        return None
    channels: dict[int, dict[str, Any]] = {
        int(c["index"]): c for c in data.get("channels") or [] if "index" in c
    }
    out: list[ReferenceTurn] = []
    for turn in turns:
        channel = int(turn["channel"])
        info = channels.get(channel, {})
        role = str(turn.get("role") or info.get("role") or f"channel {channel}")
        speaker = str(turn.get("speaker") or info.get("speaker") or role)
        out.append(
            ReferenceTurn(
                channel=channel,
                role=role,
                speaker=speaker,
                # round, not truncate: 6.68 s is 6679.999... in binary floating point
                start_ms=round(float(turn["start_s"]) * 1000),
                end_ms=round(float(turn["end_s"]) * 1000),
                text=str(turn.get("text") or ""),
            )
        )
    return out


def load_reference(path: str | os.PathLike[str]) -> list[ReferenceTurn] | None:
    """Read a ``*.truth.json`` file and return its turns in file order.

    Returns None for an untranscribed call (``"turns"`` missing or null); an empty list means a
    transcribed call with no speech. A turn lacking ``role`` or ``speaker`` takes it from the
    file's ``channels`` entry for its channel. Reads the file; raises OSError, ValueError (bad
    JSON) or KeyError (a turn without ``channel``, ``start_s`` or ``end_s``).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return _parse_reference(data)


# --------------------------------------------------------------------------------------------
# Normalization and WER

_WHISPER = EnglishTextNormalizer()

# Typographic apostrophes: recognizers emit "I’m", which the Whisper normalizer would turn into
# "i m" instead of "i am".
_APOSTROPHES = re.compile("[\u2018\u2019\u02bc\u0060\u00b4]")

# Whisper drops only hmm|mm|mhm|mmm|uh|um, and turns "uh-huh" into "huh" and "mm-hm" into "hm";
# drop the hyphenated backchannels whole and a few more hesitation spellings.
_FILLERS = re.compile(r"\b(?:uh-huh|mm-hmm|mm-hm|mhm|hmm+|hm|mm+|uhm|umm+|um|uhh+|uh|erm|er)\b")

_SINGLE_DIGIT = re.compile(r"^\d$")


def _canonical_numbers(tokens: list[str]) -> list[str]:
    """Make digit and spelled forms of nominal digit runs agree.

    Whisper turns "one two three" into "123" but "1 2 3" into "one 2 3" (it spells a lone 1 out
    "for readability" and joins only spelled digits). So: "one(s)" becomes "1(s)", then every run
    of single-digit tokens is joined into one token. Applied to both sides, "1 2 3", "one two
    three" and "123" all read "123".
    """
    out: list[str] = []
    run = ""
    for token in tokens:
        token = {"one": "1", "ones": "1s"}.get(token, token)
        if _SINGLE_DIGIT.match(token):
            run += token
            continue
        if run:
            out.append(run)
            run = ""
        out.append(token)
    if run:
        out.append(run)
    return out


@lru_cache(maxsize=65_536)
def normalize(text: str) -> str:
    """Return ``text`` normalized for word comparison: space-separated lower-case words.

    Whisper's ``EnglishTextNormalizer`` (lower case, punctuation and bracketed text removed,
    contractions expanded, British spellings Americanized, spelled numbers turned into digits:
    "twenty-five" -> "25", "five dollars" -> "$5"), preceded by apostrophe unification and filler
    removal (uh, um, er, erm, hm, hmm, mm, mhm, uh-huh, mm-hmm) and followed by
    :func:`_canonical_numbers`. Note Whisper reads "oh" as zero ("Oh, hello." -> "0 hello"); it
    does so on both sides, so comparisons are unaffected. Pure (cached).
    """
    text = _APOSTROPHES.sub("'", text)
    text = _FILLERS.sub(" ", text.lower())
    tokens = str(_WHISPER(text)).split()
    return " ".join(_canonical_numbers(tokens))


def _errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) of two normalized strings."""
    ref, hyp = reference.split(), hypothesis.split()
    if not ref or not hyp:
        # jiwer refuses an empty reference; either way every word present is an error
        return len(ref) + len(hyp), len(ref)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return int(out.substitutions + out.deletions + out.insertions), len(ref)


def _rate(errors: int, reference_words: int) -> float:
    """WER from counts; with no reference words: 0.0 if no errors else 1.0."""
    if reference_words == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / reference_words


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of ``hypothesis`` against ``reference`` after :func:`normalize` of both.

    An empty (after normalization) reference scores 0.0 if the hypothesis is empty too, else 1.0.
    WER can exceed 1.0 when the hypothesis inserts many words.
    """
    return _rate(*_errors(normalize(reference), normalize(hypothesis)))


_Channel = tuple[list[tuple[int, ReferenceTurn]], list[tuple[int, Utterance]]]


def _by_channel(
    reference_turns: Sequence[ReferenceTurn], utterances: Sequence[Utterance]
) -> dict[int, _Channel]:
    """Per channel: its (position, reference turn) sorted by start, its (index, utterance) in
    transcript order. Positions and indices refer to the input sequences.
    """
    out: dict[int, _Channel] = {}
    for i, turn in enumerate(reference_turns):
        out.setdefault(turn.channel, ([], []))[0].append((i, turn))
    for i, u in enumerate(utterances):
        out.setdefault(u.channel, ([], []))[1].append((i, u))
    for turns, _ in out.values():
        turns.sort(key=lambda it: (it[1].start_ms, it[1].end_ms, it[0]))
    return out


def _channel_counts(
    reference_turns: Sequence[ReferenceTurn], utterances: Sequence[Utterance]
) -> tuple[int, int]:
    """(errors, reference words) pooled over channels, as :func:`channel_wer` defines them."""
    errors = words = 0
    for turns, utts in _by_channel(reference_turns, utterances).values():
        ref = normalize(" ".join(t.text for _, t in turns))
        hyp = normalize(" ".join(u.text for _, u in utts))
        e, n = _errors(ref, hyp)
        errors += e
        words += n
    return errors, words


def channel_wer(reference_turns: Sequence[ReferenceTurn], utterances: Sequence[Utterance]) -> float:
    """Whole-call WER: per channel, the concatenated reference turns (sorted by start) against the
    concatenated utterance texts (in transcript order), errors pooled over channels and divided by
    the total reference words. Turn boundaries therefore never count as errors; words on a channel
    the reference does not have are insertions. No reference words: 0.0 if no hypothesis words,
    else 1.0.
    """
    return _rate(*_channel_counts(reference_turns, utterances))


# --------------------------------------------------------------------------------------------
# Turn alignment


@dataclass(frozen=True, slots=True)
class TurnMatch:
    """Where one reference turn appears in the hypothesis.

    ``utterance_index`` is the index in the transcript's utterances holding most of the turn's
    matched words, None when the turn does not appear; ``start_ms`` is the hypothesis start of the
    turn's first aligned word (None when it does not appear).
    """

    ref: ReferenceTurn
    utterance_index: int | None
    start_ms: int | None

    @property
    def found(self) -> bool:
        return self.utterance_index is not None


@dataclass(frozen=True, slots=True)
class _HypWord:
    utterance: int  # index in the transcript's utterances
    start_ms: int
    empty: bool  # normalizes to nothing (a filler, a lone punctuation mark)


@dataclass(frozen=True, slots=True)
class _HypToken:
    token: str
    word: int  # index in the channel's list of _HypWord


def _tokens(text: str) -> list[str]:
    """Normalize word by word, so that each token can be traced back to its source word.

    Whole-text normalization can merge words ("twenty five" -> "25"); token-wise it cannot, which
    is what a word-to-word alignment needs. Both sides of the alignment use this same function.
    """
    return [tok for word in text.split() for tok in normalize(word).split()]


def _leading_empty_words(text: str) -> int:
    """How many words at the start of ``text`` normalize to nothing ("Um, so ..." -> 1)."""
    count = 0
    for word in text.split():
        if normalize(word):
            break
        count += 1
    return count


def _hyp_words(utts: Sequence[tuple[int, Utterance]]) -> tuple[list[_HypWord], list[_HypToken]]:
    """A channel's hypothesis words in order, and their normalized tokens (0, 1 or more each)."""
    words: list[_HypWord] = []
    tokens: list[_HypToken] = []

    def add(text: str, utterance: int, start_ms: int) -> None:
        toks = normalize(text).split()
        tokens.extend(_HypToken(tok, len(words)) for tok in toks)
        words.append(_HypWord(utterance, start_ms, not toks))

    for index, u in utts:
        if u.words:
            for w in u.words:
                add(w.text, index, w.start)
        else:  # no word timings: every word starts when the utterance does
            for text in u.text.split():
                add(text, index, u.start)
    return words, tokens


def _align(ref: list[str], hyp: list[str]) -> list[tuple[int | None, bool]]:
    """For each reference token: (aligned hypothesis token index or None, exact match?)."""
    aligned: list[tuple[int | None, bool]] = [(None, False)] * len(ref)
    if not ref or not hyp:
        return aligned
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    for chunk in out.alignments[0]:
        if chunk.type in ("equal", "substitute"):
            for k in range(chunk.ref_end_idx - chunk.ref_start_idx):
                aligned[chunk.ref_start_idx + k] = (
                    chunk.hyp_start_idx + k,
                    chunk.type == "equal",
                )
    return aligned


def align_turns(
    reference_turns: Sequence[ReferenceTurn], utterances: Sequence[Utterance]
) -> list[TurnMatch]:
    """Locate each reference turn of more than one normalized word in the hypothesis.

    Per channel, the token-wise normalized words of all that channel's reference turns (sorted by
    start) are aligned to the words of all that channel's utterances (in order) by minimum edit
    distance (jiwer). A turn's *matched* words are its words aligned to an identical hypothesis
    word. A turn with fewer than half its words matched does not appear (``utterance_index`` and
    ``start_ms`` None); otherwise ``utterance_index`` is the utterance holding most matched words
    (ties: the earliest) and ``start_ms`` the start of the hypothesis word aligned to the turn's
    first aligned word (an exact match or a substitution, so a misrecognized first word still
    dates the turn), from the word timings or else the utterance start. When the turn opens with
    words that normalize away ("Um, ...") and the hypothesis has as many such words right before
    that word in the same utterance, the earliest of those dates the turn instead.

    Turns of zero or one word ("Hello?") are too ambiguous to place and get no TurnMatch, though
    their words still take part in the alignment. Returns matches in ``reference_turns`` order.
    Only the same channel is searched: a turn transcribed on the wrong channel is missing.
    """
    result: dict[int, TurnMatch] = {}  # by position in reference_turns
    for turns, utts in _by_channel(reference_turns, utterances).values():
        words, hyp = _hyp_words(utts)
        ref: list[str] = []
        spans: list[tuple[int, ReferenceTurn, int, int]] = []  # position, turn, token range
        for position, turn in turns:
            tokens = _tokens(turn.text)
            spans.append((position, turn, len(ref), len(ref) + len(tokens)))
            ref.extend(tokens)
        aligned = _align(ref, [h.token for h in hyp])
        for position, turn, lo, hi in spans:
            if hi - lo <= 1:
                continue
            pairs = aligned[lo:hi]
            matched = [words[hyp[j].word] for j, exact in pairs if j is not None and exact]
            if 2 * len(matched) < hi - lo:
                result[position] = TurnMatch(turn, None, None)
                continue
            counts = Counter(w.utterance for w in matched)
            best = max(counts.values())
            index = min(u for u, c in counts.items() if c == best)
            k, j = next((k, j) for k, (j, _) in enumerate(pairs) if j is not None)
            first = hyp[j].word
            if k == 0:
                # The turn's leading fillers ("Um, this is ...") normalize away and so are not
                # aligned; when the hypothesis has filler words right before, they date the turn.
                for _ in range(_leading_empty_words(turn.text)):
                    prev = first - 1
                    if prev < 0 or not words[prev].empty:
                        break
                    if words[prev].utterance != words[first].utterance:
                        break
                    first = prev
            result[position] = TurnMatch(turn, index, words[first].start_ms)
    return [result[i] for i in sorted(result)]


# --------------------------------------------------------------------------------------------
# Checks


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.3f}s"


def _describe(turn: ReferenceTurn) -> str:
    text = turn.text if len(turn.text) <= 48 else turn.text[:45] + "..."
    return f"ch{turn.channel} {turn.speaker} @{_seconds(turn.start_ms)} {text!r}"


def check_order(matches: Sequence[TurnMatch], *, slack_ms: int = 0) -> list[str]:
    """Report where the transcript's order goes backwards relative to the reference.

    Found turns are sorted by reference start (then end, then channel); each one mapping to an
    utterance index lower than the previous found turn's (across channels too: utterances are
    globally ordered) is one problem, described in a readable string. Pairs whose reference
    starts are within ``slack_ms`` of each other (near-simultaneous overlapping speech) are not
    reported. Empty list: the order is right.
    """
    found = sorted(
        (m for m in matches if m.utterance_index is not None),
        key=lambda m: (m.ref.start_ms, m.ref.end_ms, m.ref.channel),
    )
    problems: list[str] = []
    for prev, cur in zip(found, found[1:], strict=False):
        assert prev.utterance_index is not None and cur.utterance_index is not None
        if cur.utterance_index >= prev.utterance_index:
            continue
        if slack_ms > 0 and cur.ref.start_ms - prev.ref.start_ms <= slack_ms:
            continue
        problems.append(
            f"out of order: {_describe(cur.ref)} is in utterance #{cur.utterance_index}, "
            f"before utterance #{prev.utterance_index} holding the earlier {_describe(prev.ref)}"
        )
    return problems


def check_timing(matches: Sequence[TurnMatch], tolerance_ms: int) -> list[str]:
    """Report found turns whose hypothesis start is more than ``tolerance_ms`` off the reference
    start, one readable string each, in reference order. Empty list: all within tolerance.
    """
    problems: list[str] = []
    for m in sorted(matches, key=lambda m: (m.ref.start_ms, m.ref.channel)):
        if m.start_ms is None:
            continue
        error = m.start_ms - m.ref.start_ms
        if abs(error) > tolerance_ms:
            problems.append(
                f"{_describe(m.ref)} starts at {_seconds(m.start_ms)} in the transcript: "
                f"{error:+d} ms off (tolerance {tolerance_ms} ms)"
            )
    return problems


# --------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True, slots=True)
class ScoreReport:
    """The accuracy of one transcript against its reference.

    ``wer``: :func:`channel_wer`. ``reference_words``: normalized reference word count.
    ``matches``: :func:`align_turns`. ``missing``: reference turns that do not appear.
    ``order_problems``: :func:`check_order`. ``worst_timing_error_ms``: the largest signed start
    error (hypothesis - reference) by absolute value over found turns, None if none was found;
    ``worst_timing_turn``: its reference turn.
    """

    wer: float
    reference_words: int
    matches: tuple[TurnMatch, ...]
    missing: tuple[ReferenceTurn, ...]
    order_problems: tuple[str, ...]
    worst_timing_error_ms: int | None
    worst_timing_turn: ReferenceTurn | None

    @property
    def found(self) -> int:
        """How many scored reference turns appear in the transcript."""
        return sum(1 for m in self.matches if m.found)

    def timing_problems(self, tolerance_ms: int) -> list[str]:
        """:func:`check_timing` of the matches."""
        return check_timing(self.matches, tolerance_ms)

    def format(self, timing_tolerance_ms: int | None = None) -> str:
        """A human-readable multi-line summary (no trailing newline); with a tolerance, the
        timing problems over it are listed too.
        """
        lines = [
            f"WER {self.wer:.2%} over {self.reference_words} reference words",
            f"turns: {self.found}/{len(self.matches)} found",
        ]
        if self.missing:
            lines.append(f"missing turns ({len(self.missing)}):")
            lines.extend(f"  {_describe(t)}" for t in self.missing)
        if self.order_problems:
            lines.append(f"order problems ({len(self.order_problems)}):")
            lines.extend(f"  {p}" for p in self.order_problems)
        else:
            lines.append("order: ok")
        if self.worst_timing_error_ms is None or self.worst_timing_turn is None:
            lines.append("timing: no turn found")
        else:
            lines.append(
                f"timing: worst start error {self.worst_timing_error_ms:+d} ms "
                f"({_describe(self.worst_timing_turn)})"
            )
        if timing_tolerance_ms is not None:
            problems = self.timing_problems(timing_tolerance_ms)
            lines.append(f"timing problems over {timing_tolerance_ms} ms: {len(problems)}")
            lines.extend(f"  {p}" for p in problems)
        return "\n".join(lines)


def score(
    reference_turns: Sequence[ReferenceTurn], transcript: Transcript, *, order_slack_ms: int = 0
) -> ScoreReport:
    """Score ``transcript`` against ``reference_turns`` (see the module docstring); pure."""
    matches = align_turns(reference_turns, transcript.utterances)
    timed = [(m.start_ms - m.ref.start_ms, m.ref) for m in matches if m.start_ms is not None]
    # first of the largest absolute errors, so the report is deterministic
    worst = max(timed, key=lambda e: abs(e[0]), default=None)
    errors, words = _channel_counts(reference_turns, transcript.utterances)
    return ScoreReport(
        wer=_rate(errors, words),
        reference_words=words,
        matches=tuple(matches),
        missing=tuple(m.ref for m in matches if not m.found),
        order_problems=tuple(check_order(matches, slack_ms=order_slack_ms)),
        worst_timing_error_ms=None if worst is None else worst[0],
        worst_timing_turn=None if worst is None else worst[1],
    )
