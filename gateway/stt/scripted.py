"""A scripted speech engine: emits given words at given audio times, with no recognizer.

For tests, benchmarks and protocol work where the words must be known exactly: a script is a list
of turns, each a list of ``(word, start_ms, end_ms)`` in the session's own audio time. A session
emits a partial each time its audio passes the end of a word, and the turn's final once its audio
passes the last word's end plus ``final_delay_ms`` (the "silence" that ends a turn). Audio content
is ignored; only its duration counts, so the timing is exact and deterministic.

With ``timecode=True`` the audio must be 16-bit PCM made by :func:`timecode_audio`, whose samples
count 10 ms blocks: the session then reads *where in the call* its audio starts, as a recognizer
hears words where they are in the audio. A client that reconnects and replays from the middle of a
call gets the words of the replayed audio, at times relative to its new session, exactly as from
the real service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.stt.session import EngineStats, SessionParams, SttEvent, Watermark
from gateway.transcript.model import TurnUpdate, Word


@dataclass(frozen=True, slots=True)
class ScriptedWord:
    text: str
    start_ms: int
    end_ms: int


Script = tuple[tuple[ScriptedWord, ...], ...]

_BLOCK_MS = 10


def timecode_audio(start_sample: int, samples: int, sample_rate: int = 8000) -> bytes:
    """16-bit PCM whose every sample holds the index of its 10 ms block on the call clock."""
    per_block = sample_rate * _BLOCK_MS // 1000
    index = np.arange(start_sample, start_sample + samples) // per_block
    return (index % 32768).astype("<i2").tobytes()


def _timecode_origin(audio: bytes, sample_rate: int) -> float | None:
    """Call time (ms) of the first sample of ``audio`` made by :func:`timecode_audio`."""
    values = np.frombuffer(audio[: len(audio) // 2 * 2], "<i2")
    if values.size < 2:
        return None
    per_block = sample_rate * _BLOCK_MS // 1000
    changes = np.nonzero(np.diff(values))[0]
    if changes.size == 0:
        return None
    boundary = int(changes[0]) + 1  # first sample of the next block
    block = int(values[boundary])
    return (block * per_block - boundary) * 1000 / sample_rate


def load_script(path: Path) -> Script:
    """Read a script: JSON ``[[["hello", 100, 400], ["there", 450, 800]], ...]``, turns of words."""
    data = json.loads(path.read_text())
    return parse_script(data)


def parse_script(data: object) -> Script:
    if not isinstance(data, list):
        raise ValueError("a script is a list of turns")
    turns: list[tuple[ScriptedWord, ...]] = []
    last_end = -1
    for turn in data:
        if not isinstance(turn, list) or not turn:
            raise ValueError("each turn is a non-empty list of [word, start_ms, end_ms]")
        words = []
        for item in turn:
            if (
                not isinstance(item, list | tuple)
                or len(item) != 3
                or not isinstance(item[0], str)
                or not all(isinstance(v, int) for v in item[1:])
            ):
                raise ValueError(f"bad scripted word {item!r}: expected [word, start_ms, end_ms]")
            word = ScriptedWord(item[0], item[1], item[2])
            if word.start_ms > word.end_ms or word.start_ms < last_end:
                raise ValueError(f"scripted word {item!r} overlaps or runs backwards")
            last_end = word.end_ms
            words.append(word)
        turns.append(tuple(words))
    return tuple(turns)


class ScriptedEngine:
    """Sessions that replay ``script`` against the audio they are sent."""

    name = "scripted"

    def __init__(
        self, script: Script, *, final_delay_ms: int = 400, timecode: bool = False
    ) -> None:
        self.script = script
        self.final_delay_ms = final_delay_ms
        self.timecode = timecode
        self.sessions_opened = 0
        self.stats = EngineStats()

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def open_session(self, params: SessionParams) -> ScriptedSession:
        self.sessions_opened += 1
        self.stats.session_starts += 1
        return ScriptedSession(params, self.script, self.final_delay_ms, self.timecode)


class ScriptedSession:
    """One channel of the scripted engine. Times are offset by ``params.offset_ms``."""

    def __init__(
        self, params: SessionParams, script: Script, final_delay_ms: int, timecode: bool = False
    ) -> None:
        self.params = params
        self._script = list(script)
        self._timecode = timecode
        self._origin: float | None = None if timecode else 0.0
        self._delay = final_delay_ms
        self._bytes = 0
        self._width = params.codec.sample_width
        self._turn = 0  # next turn index to finish
        self._words_out = 0  # words of the current turn already shown in a partial
        self._queue: asyncio.Queue[SttEvent | None] = asyncio.Queue()
        self._finished = False

    @property
    def queued_ms(self) -> int:
        return 0  # audio is consumed as it is sent

    @property
    def audio_ms(self) -> int:
        return self._bytes // self._width * 1000 // self.params.sample_rate

    async def send(self, audio: bytes) -> None:
        if self._finished:
            raise RuntimeError("send() after finish()")
        if self._origin is None:
            # A v3 chunk holds at least 50 ms, five 10 ms blocks: the time is always readable.
            self._origin = _timecode_origin(audio, self.params.sample_rate) or 0.0
            self._rebase(self._origin)
        self._bytes += len(audio)
        self._advance(self.audio_ms)

    def _rebase(self, origin: float) -> None:
        """Script times become relative to this session's first sample; earlier words are
        not in this session's audio."""
        rebased: list[tuple[ScriptedWord, ...]] = []
        for turn in self._script:
            words = tuple(
                ScriptedWord(w.text, round(w.start_ms - origin), round(w.end_ms - origin))
                for w in turn
                if w.start_ms >= origin - 1
            )
            if words:
                rebased.append(words)
        self._script = rebased

    async def force_endpoint(self) -> None:
        """End the current turn now with the words heard so far (ForceEndpoint); the words not yet
        heard start the next turn."""
        if self._turn < len(self._script) and self._words_out:
            words = self._script[self._turn]
            heard, rest = words[: self._words_out], words[self._words_out :]
            self._script[self._turn : self._turn + 1] = [heard, rest] if rest else [heard]
            self._final(heard)

    async def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        # Terminate flushes: a turn whose words were all heard is finalized.
        self._advance(self.audio_ms + self._delay)
        self._queue.put_nowait(None)

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[SttEvent]:
        while (event := await self._queue.get()) is not None:
            yield event

    def _advance(self, now_ms: int) -> None:
        while self._turn < len(self._script):
            words = self._script[self._turn]
            heard = sum(1 for w in words if w.end_ms <= now_ms)
            if heard > self._words_out:
                self._words_out = heard
                if heard < len(words) or words[-1].end_ms + self._delay > now_ms:
                    self._emit(words[:heard], final=False)
            if heard == len(words) and words[-1].end_ms + self._delay <= now_ms:
                self._final(words)
                continue
            break
        if not self._finished:
            self._queue.put_nowait(Watermark(self.params.channel, self._watermark(now_ms)))

    def _watermark(self, now_ms: int) -> int:
        if self._turn < len(self._script):
            first = self._script[self._turn][0].start_ms
            return self.params.offset_ms + min(first, now_ms)
        return self.params.offset_ms + now_ms

    def _final(self, words: Sequence[ScriptedWord]) -> None:
        self._emit(words, final=True)
        self._turn += 1
        self._words_out = 0

    def _emit(self, words: Sequence[ScriptedWord], *, final: bool) -> None:
        off = self.params.offset_ms
        out = tuple(Word(w.text, off + w.start_ms, off + w.end_ms, 1.0) for w in words)
        self._queue.put_nowait(
            TurnUpdate(
                channel=self.params.channel,
                epoch=0,
                turn_order=self._turn,
                words=out,
                text=" ".join(w.text for w in words),
                start_ms=out[0].start,
                end_ms=out[-1].end,
                final=final,
                confidence=1.0,
            )
        )
