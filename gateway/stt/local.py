"""The embedded speech engine: Silero VAD endpointing plus faster-whisper, with no network.

:class:`LocalEngine` owns the shared resources: the Whisper model, the VAD model and two bounded
thread pools (recognition, and VAD + resampling) shared by all channels. :class:`LocalSession` is
the thin asyncio shell around one channel's sans-I/O :class:`TurnSegmenter`.

A session processes its audio strictly in order and waits for the recognizer whenever the
endpointing decision needs words, so a file transcribed at 20x real time gives the same turns as the
same audio streamed live. Partials are best effort: at most one in flight per channel, skipped while
the recognition pool is busy ("off under load").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gateway.config import LocalEngineSettings
from gateway.media import codec as codecs
from gateway.media.resample import Resampler
from gateway.stt.endpointing import (
    EndCandidate,
    PartialDue,
    SegmenterEvent,
    TurnClosed,
    TurnOpened,
    TurnResumed,
    TurnSegmenter,
)
from gateway.stt.recognizer import Recognition, WhisperRecognizer
from gateway.stt.session import EngineStats, SessionParams, SttError, SttEvent, Watermark
from gateway.stt.vad import SileroModel, VoiceActivityStream
from gateway.transcript.model import TurnUpdate, Word

RATE = 16000
_MS = RATE // 1000
_FORCE = b"<force-endpoint>"  # an in-band marker, so the endpoint lands after queued audio
_ONSET_SHIFT = 3 * RATE // 2  # at most 1.5 s: see _place_words


class LocalEngine:
    """Shared model and worker pools of the embedded engine."""

    name = "local"

    def __init__(self, settings: LocalEngineSettings) -> None:
        self.settings = settings
        self._recognizer: WhisperRecognizer | None = None
        self._vad: SileroModel | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._vad_pool: ThreadPoolExecutor | None = None
        self._inflight = 0
        self.sessions: set[LocalSession] = set()
        self.stats = EngineStats()

    @property
    def ready(self) -> bool:
        return self._recognizer is not None

    async def start(self) -> None:
        if self._recognizer is not None:
            return
        s = self.settings
        workers = s.worker_count
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="stt-local")
        self._vad_pool = ThreadPoolExecutor(1, thread_name_prefix="stt-vad")
        model_path = Path(s.model_path) if s.model_path else None
        loop = asyncio.get_running_loop()
        self._recognizer = await loop.run_in_executor(
            self._pool,
            partial(
                WhisperRecognizer,
                model_path,
                compute_type=s.compute_type,
                cpu_threads=s.cpu_threads,
                num_workers=workers,
                beam_size=s.beam_size,
            ),
        )
        self._vad = await loop.run_in_executor(self._vad_pool, SileroModel)

    async def close(self) -> None:
        for session in list(self.sessions):
            await session.aclose()
        pools = [p for p in (self._pool, self._vad_pool) if p is not None]
        self._pool = self._vad_pool = None
        self._recognizer = None
        for pool in pools:
            # shutdown(wait=True) joins threads: do it off the loop.
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    def open_session(self, params: SessionParams) -> LocalSession:
        if self._recognizer is None or self._vad is None:
            raise RuntimeError("LocalEngine.start() was not awaited")
        session = LocalSession(self, params)
        self.sessions.add(session)
        self.stats.session_starts += 1
        return session

    # -- worker-pool helpers used by sessions ----------------------------------------------------

    @property
    def busy(self) -> bool:
        """Every recognition worker has a job: partials are skipped."""
        return self._inflight >= self.settings.worker_count

    async def recognize(self, audio: npt.NDArray[np.float32], *, final: bool = True) -> Recognition:
        """Recognize one turn's audio in the pool; partials decode greedily."""
        assert self._recognizer is not None and self._pool is not None
        self._inflight += 1
        try:
            loop = asyncio.get_running_loop()
            job = partial(self._recognizer.recognize, audio, words=True, greedy=not final)
            return await loop.run_in_executor(self._pool, job)
        finally:
            self._inflight -= 1

    async def in_vad_pool(
        self, fn: partial[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        assert self._vad_pool is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._vad_pool, fn)

    def vad_stream(self) -> VoiceActivityStream:
        assert self._vad is not None
        mode = self.settings.webrtc_vad_mode
        return VoiceActivityStream(self._vad, webrtc_mode=None if mode < 0 else mode)


class _Buffer:
    """16 kHz audio of the channel from ``base`` on; older audio is trimmed as turns close."""

    def __init__(self) -> None:
        self.base = 0
        self._chunks: list[npt.NDArray[np.float32]] = []
        self._data = np.zeros(0, np.float32)
        self.end = 0

    def append(self, x: npt.NDArray[np.float32]) -> None:
        if x.size:
            self._chunks.append(x)
            self.end += x.size

    def slice(self, start: int, end: int) -> npt.NDArray[np.float32]:
        self._consolidate()
        a = max(start, self.base) - self.base
        b = max(min(end, self.end), self.base) - self.base
        return self._data[a:b].copy()

    def trim(self, before: int) -> None:
        if before <= self.base:
            return
        self._consolidate()
        cut = min(before, self.end) - self.base
        self._data = self._data[cut:]
        self.base += cut

    def _consolidate(self) -> None:
        if self._chunks:
            self._data = np.concatenate([self._data, *self._chunks])
            self._chunks.clear()


class LocalSession:
    """One channel of the embedded engine (see :class:`~gateway.stt.session.SttSession`)."""

    def __init__(self, engine: LocalEngine, params: SessionParams) -> None:
        s = engine.settings
        self.params = params
        self._engine = engine
        self._input: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=s.input_queue_chunks)
        self._output: asyncio.Queue[SttEvent | None] = asyncio.Queue()
        self._resampler: Resampler | None = Resampler(params.sample_rate, RATE)
        self._vad = engine.vad_stream()
        self._segmenter = TurnSegmenter(
            sample_rate=RATE,
            threshold=s.vad_threshold,
            min_speech_ms=s.min_speech_ms,
            pad_ms=s.speech_pad_ms,
            min_turn_silence_ms=s.min_turn_silence_ms,
            max_turn_silence_ms=s.max_turn_silence_ms,
            max_turn_ms=s.max_turn_ms,
            partial_interval_ms=s.partial_interval_ms if params.partials else None,
        )
        self._buffer = _Buffer()
        self._turn_order = 0
        self._partials_sent = False
        self._held: tuple[EndCandidate, npt.NDArray[np.float32], Recognition] | None = None
        self._partial_task: asyncio.Task[None] | None = None
        self._last_watermark = -1
        self._finishing = False
        self._queued_bytes = 0  # sent, not yet taken off the input queue
        self._task = asyncio.create_task(self._run(), name=f"stt-local-ch{params.channel}")

    # -- SttSession -----------------------------------------------------------------------------

    @property
    def queued_ms(self) -> int:
        p = self.params
        return self._queued_bytes // p.codec.sample_width * 1000 // p.sample_rate

    async def send(self, audio: bytes) -> None:
        if self._finishing:
            raise RuntimeError("send() after finish()")
        if self._task.done():
            return  # the session failed; its SttError is already in the event stream
        self._queued_bytes += len(audio)
        await self._input.put(audio)

    async def force_endpoint(self) -> None:
        """End the open turn at the audio received so far (the v3 ``ForceEndpoint``)."""
        if not self._finishing and not self._task.done():
            await self._input.put(_FORCE)

    def configure(self, update: object) -> None:
        """Apply ``min_turn_silence``/``max_turn_silence`` of a v3 ``UpdateConfiguration``."""
        low = getattr(update, "min_turn_silence", None)
        high = getattr(update, "max_turn_silence", None)
        self._segmenter.set_silences(low, high)

    async def finish(self) -> None:
        if not self._finishing:
            self._finishing = True
            if not self._task.done():
                await self._input.put(None)
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise  # our caller was cancelled (a timeout, shutdown): not the session

    async def events(self) -> AsyncIterator[SttEvent]:
        while True:
            event = await self._output.get()
            if event is None:
                return
            yield event

    async def aclose(self) -> None:
        self._finishing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    # -- processing -----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                chunk = await self._input.get()
                chunks: list[bytes] = []
                done = chunk is None
                if chunk is not None:
                    chunks.append(chunk)
                # Batch whatever else is queued: one pool hop per batch, not per 20 ms frame.
                force = chunk is _FORCE
                if force:
                    chunks.clear()
                while not done and not force and not self._input.empty():
                    more = self._input.get_nowait()
                    if more is None:
                        done = True
                    elif more is _FORCE:
                        force = True
                    else:
                        chunks.append(more)
                if chunks:
                    payload = b"".join(chunks)
                    self._queued_bytes -= len(payload)
                    await self._process(payload, final=False)
                if force:
                    closed = self._segmenter.force_close()
                    if closed is not None:
                        await self._handle(closed)
                        self._watermark()
                if done:
                    await self._process(b"", final=True)
                    for event in self._segmenter.flush():
                        await self._handle(event)
                    self._watermark(force_end=True)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a recognizer crash fails this channel only
            self._engine.stats.failures["engine_error"] += 1
            self._output.put_nowait(SttError(self.params.channel, f"local engine: {exc}", True))
        finally:
            # Nothing reads the input any more: empty it, so a send() waiting on the full queue
            # returns (it would otherwise wait forever, holding up the call's whole ingress).
            while not self._input.empty():
                self._input.get_nowait()
            if self._partial_task is not None:
                self._partial_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._partial_task
            self._output.put_nowait(None)
            self._engine.sessions.discard(self)
            # Native soxr state: free it now rather than whenever the session object goes
            # (finished calls stay referenced for a while; at exit nanobind reports it as leaked).
            self._resampler = None

    async def _process(self, payload: bytes, *, final: bool) -> None:
        pcm = codecs.decode(self.params.codec, payload) if payload else b""
        x = codecs.pcm16_to_float32(pcm) if pcm else np.zeros(0, np.float32)
        y, probs = await self._engine.in_vad_pool(partial(self._resample_and_vad, x, final))
        self._buffer.append(y)
        events = self._segmenter.feed(probs.tolist())
        while events:
            for event in events:
                await self._handle(event)
            # An EndCandidate paused the segmenter; go on with the audio queued behind it.
            events = self._segmenter.feed(())
        self._trim()
        self._watermark()

    def _resample_and_vad(
        self, x: npt.NDArray[np.float32], final: bool
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        resampler = self._resampler
        if resampler is None:  # the session ended while this job was queued
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        y = resampler.process(x) if x.size else np.zeros(0, np.float32)
        if final:
            tail = resampler.flush()
            y = np.concatenate([y, tail]) if tail.size else y
        return y.astype(np.float32, copy=False), self._vad.feed(y)

    async def _handle(self, event: SegmenterEvent) -> None:
        if isinstance(event, TurnOpened):
            self._partials_sent = False
        elif isinstance(event, PartialDue):
            self._start_partial(event)
        elif isinstance(event, EndCandidate):
            audio, result = await self._recognize(event.start, event.end)
            if not result.text or result.complete:
                closed = self._segmenter.end_turn()
                self._emit_final(closed.start, closed.end, result, closed.regions, audio)
            else:
                self._segmenter.keep_turn()
                self._held = (event, audio, result)
        elif isinstance(event, TurnResumed):
            self._held = None
        elif isinstance(event, TurnClosed):
            held = self._held
            self._held = None
            if held is not None and (held[0].start, held[0].end) == (event.start, event.end):
                _, audio, result = held
            else:
                audio, result = await self._recognize(event.start, event.end)
            self._emit_final(event.start, event.end, result, event.regions, audio)
        elif self._partials_sent:  # TurnDropped: a blip; close the partial shown for it
            empty = np.zeros(0, np.float32)
            self._emit_final(event.start, event.end, Recognition("", (), 0.0), (), empty)

    async def _recognize(self, start: int, end: int) -> tuple[npt.NDArray[np.float32], Recognition]:
        await self._cancel_partial()
        audio = self._buffer.slice(start, end)
        return audio, await self._engine.recognize(audio, final=True)

    def _start_partial(self, due: PartialDue) -> None:
        if self._partial_task is not None or self._engine.busy:
            return
        audio = self._buffer.slice(due.start, due.end)
        order = self._turn_order
        self._partial_task = asyncio.create_task(self._partial(audio, due.start, order))

    async def _partial(self, audio: npt.NDArray[np.float32], start: int, order: int) -> None:
        try:
            result = await self._engine.recognize(audio, final=False)
            if order == self._turn_order and result.text:
                self._partials_sent = True
                update = self._update(start, result, (), audio, final=False)
                self._output.put_nowait(update)
        finally:
            self._partial_task = None

    async def _cancel_partial(self) -> None:
        task = self._partial_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._partial_task = None

    def _emit_final(
        self,
        start: int,
        end: int,
        result: Recognition,
        regions: tuple[tuple[int, int], ...],
        audio: npt.NDArray[np.float32],
    ) -> None:
        if not result.text and not self._partials_sent:
            return
        update = self._update(start, result, regions, audio, final=True, audio_end=end)
        self._output.put_nowait(update)
        self._turn_order += 1
        self._partials_sent = False

    def _update(
        self,
        start: int,
        result: Recognition,
        regions: tuple[tuple[int, int], ...],
        audio: npt.NDArray[np.float32],
        *,
        final: bool,
        audio_end: int | None = None,
    ) -> TurnUpdate:
        """Map a recognition of audio starting at ``start`` onto the call clock."""
        off = self.params.offset_ms
        spans: list[tuple[int, int]] = []
        for w in result.words:
            a = start + int(round(w.start * RATE))
            b = start + int(round(w.end * RATE))
            if spans and a < spans[-1][0]:
                a = spans[-1][0]
            spans.append((a, max(a, b)))
        if spans and regions:
            spans = _place_words(spans, regions, _ONSET_SHIFT)
        words = [
            Word(w.text, off + a // _MS, off + b // _MS, round(w.probability, 4))
            for w, (a, b) in zip(result.words, spans, strict=True)
        ]
        if words:
            start_ms, end_ms = words[0].start, max(w.end for w in words)
        elif regions:
            start_ms, end_ms = off + regions[0][0] // _MS, off + regions[-1][1] // _MS
        else:
            start_ms = off + start // _MS
            end_ms = off + (audio_end if audio_end is not None else start) // _MS
        return TurnUpdate(
            channel=self.params.channel,
            epoch=0,
            turn_order=self._turn_order,
            words=tuple(words),
            text=result.text,
            start_ms=start_ms,
            end_ms=end_ms,
            final=final,
            confidence=round(result.confidence, 4),
        )

    def _trim(self) -> None:
        keep_from = self._segmenter.turn_start
        if keep_from is None:
            keep_from = self._segmenter.position - self._segmenter.pad - 2 * self._segmenter.window
        self._buffer.trim(keep_from)

    def _watermark(self, *, force_end: bool = False) -> None:
        pos = self._segmenter.watermark if not force_end else self._buffer.end + RATE
        ms = self.params.offset_ms + pos // _MS
        if ms > self._last_watermark:
            self._last_watermark = ms
            self._output.put_nowait(Watermark(self.params.channel, ms))


def _region_of(t: int, regions: tuple[tuple[int, int], ...]) -> int | None:
    for i, (ra, rb) in enumerate(regions):
        if ra <= t < rb:
            return i
        if t < ra:
            return i  # in the pause before region i: that is the sound this word belongs to
    return None


def _place_words(
    spans: list[tuple[int, int]], regions: tuple[tuple[int, int], ...], max_shift: int
) -> list[tuple[int, int]]:
    """Start each word that follows a pause at the onset of the speech it belongs to.

    Whisper places the first word after a pause late (by up to a second on telephone audio), and
    it drops fillers ("uh", "um") that open a turn; the VAD says where the speaker audibly
    started. Speech regions between the previous word and this one that no word covers are
    attributed to this word, back to at most ``max_shift`` samples before it, when the word
    starts inside speech; a word placed in a pause moves to the onset of the region after it.
    """
    out: list[tuple[int, int]] = []
    for a, b in spans:
        floor = out[-1][1] if out else 0
        region = _region_of(a, regions)
        if region is None:
            out.append((a, b))
            continue
        k = region
        # A word Whisper put in the pause before a region is early, not late: it belongs to
        # that region. Only a word that starts inside speech can own uncovered speech before it.
        inside = regions[k][0] <= a
        while (
            inside and k > 0 and regions[k - 1][0] >= floor and a - regions[k - 1][0] <= max_shift
        ):
            k -= 1
        onset = regions[k][0]
        if onset >= floor and (onset > a or a - onset <= max_shift):
            a = onset if onset < b else a
        out.append((a, max(a, b)))
    return out
