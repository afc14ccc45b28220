"""CallRecorder: a call's audio as one multi-channel WAV, written off the event loop.

Each channel's audio arrives (through :meth:`Call.add_audio_tap`) as its clock releases it: in
order, gaps already filled with silence, so sample index == call time on every channel. The
recorder interleaves the span every channel has reached and hands it to a writer thread; the
event loop only does the interleave (numpy). The file is ``DIR/CALL_ID.wav``, one WAV channel per
call channel in channel order.

The file's format is the channels' own when they share one (µ-law and A-law stay 8-bit G.711, L16
is 16-bit PCM). Channels that differ (a SIPREC call with a PCMA and an L16/16000 stream) are
recorded as L16 at the highest rate among them, and a channel whose codec or rate differs from
the file's is converted to it (decoded, resampled, encoded).

A channel added mid-call (a SIPREC leg joining, :meth:`add_channel`) widens the file: the writer
thread rewrites what is on disk with one more channel, silent up to the call time the leg joined
at, into a temporary file that replaces the recording, and goes on writing every channel. So the
recording always holds every leg on the call clock, which is what makes it a complete source for
transcribing again after an STT outage.

The header is written first with data size 0, which readers (ours included) take as "until the
end of the file", and patched with the real sizes on :meth:`close`: a recording cut short by a
crash is still a readable WAV up to its last write. ``gateway transcribe`` takes the file as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gateway.media.codec import (
    Codec,
    decode,
    encode,
    float32_to_pcm16,
    pcm16_to_float32,
    silence,
)
from gateway.media.interleave import interleave
from gateway.media.resample import Resampler
from gateway.media.wav import wav_header
from gateway.observability.logging import get_logger

log = get_logger("gateway.recorder")

_FLUSH_BYTES = 16000  # per channel: about 1-2 s of 8 kHz audio per write
_REWRITE_FRAMES = 1 << 16  # frames per block when widening the file on disk


@dataclass(frozen=True, slots=True)
class RecordedFormat:
    """A channel's audio format as the recorder receives it."""

    codec: Codec
    sample_rate: int


@dataclass(frozen=True, slots=True)
class _Widen:
    """Writer-thread job: rewrite the file with one more channel (``fill`` is its silence)."""

    channels: int
    fill: bytes


class _Converter:
    """One channel's audio in the file's codec and rate (stateful: the resampler's filter)."""

    def __init__(self, source: RecordedFormat, target: RecordedFormat) -> None:
        self.source = source
        self.target = target
        self._resampler = (
            Resampler(source.sample_rate, target.sample_rate)
            if source.sample_rate != target.sample_rate
            else None
        )

    def convert(self, data: bytes) -> bytes:
        pcm = decode(self.source.codec, data)
        if self._resampler is not None:
            pcm = float32_to_pcm16(self._resampler.process(pcm16_to_float32(pcm)))
        return encode(self.target.codec, pcm)

    def flush(self) -> bytes:
        """The resampler's held-back tail (nothing without one)."""
        if self._resampler is None:
            return b""
        return encode(self.target.codec, float32_to_pcm16(self._resampler.flush()))


def recording_format(channels: Sequence[RecordedFormat]) -> RecordedFormat:
    """The file format for ``channels``: theirs when they share one, else L16 at the top rate.

    Raises ValueError for no channels.
    """
    if not channels:
        raise ValueError("a recording needs at least one channel")
    if len(set(channels)) == 1:
        return channels[0]
    return RecordedFormat(Codec.L16, max(c.sample_rate for c in channels))


class CallRecorder:
    """Records one call; ``feed`` is the audio tap, ``close`` finishes the file.

    Must be created on the event loop (it starts its writer task).
    """

    def __init__(self, path: Path, channels: Sequence[RecordedFormat]) -> None:
        """``channels`` in call channel order (indexes 0..n-1). Raises ValueError for none."""
        self.path = path
        self.format = recording_format(channels)
        self.codec = self.format.codec
        self.sample_rate = self.format.sample_rate
        self.channels = 0
        self._column: dict[int, int] = {}  # call channel index -> WAV channel
        self._converters: dict[int, _Converter] = {}
        self._pending: list[bytearray] = []
        self._frames_queued = 0  # frames handed to the writer so far (the file's length)
        self._queue: asyncio.Queue[bytes | _Widen | None] = asyncio.Queue()
        self._written = 0
        self.error: str | None = None
        for index, fmt in enumerate(channels):
            self._add_column(index, fmt)
        self._disk_channels = self.channels  # what the file holds; the writer thread's
        self._writer = asyncio.create_task(self._run(), name=f"recorder-{path.stem}")

    def _add_column(self, index: int, fmt: RecordedFormat) -> None:
        self._column[index] = self.channels
        self.channels += 1
        self._pending.append(bytearray())
        if fmt != self.format:
            self._converters[index] = _Converter(fmt, self.format)

    def feed(self, channel: int, data: bytes) -> None:
        """Buffer ``data`` for ``channel``; queue the interleaved span all channels reached.

        Audio of a channel the recorder was not told about is ignored.
        """
        column = self._column.get(channel)
        if self.error is not None or column is None:
            return
        converter = self._converters.get(channel)
        if converter is not None:
            data = converter.convert(data)
        self._pending[column] += data
        ready = min(len(p) for p in self._pending)
        if ready >= _FLUSH_BYTES:
            self._queue.put_nowait(self._take(ready))

    def add_channel(self, channel: int, fmt: RecordedFormat, start: int) -> None:
        """A leg joins: record ``channel`` from sample ``start`` of its own rate (call time).

        Its WAV channel is silent before that, in the file written so far too (the writer
        rewrites the file). A channel already recorded is ignored.
        """
        if self.error is not None or channel in self._column:
            return
        # Every channel's pending audio begins at the file's end: the new one's, with silence up
        # to where it joins. It joins where the slowest moving leg is, never before the span
        # already written (that needs every leg), so the silence is never negative.
        at = start * self.sample_rate // fmt.sample_rate
        lead = max(0, at - self._frames_queued)
        self._queue.put_nowait(_Widen(self.channels + 1, silence(self.codec, 1)))
        self._add_column(channel, fmt)
        self._pending[-1] += silence(self.codec, lead)

    def _take(self, size: int) -> bytes:
        width = self.codec.sample_width
        size -= size % width
        parts = [bytes(p[:size]) for p in self._pending]
        for p in self._pending:
            del p[:size]
        self._frames_queued += size // width
        return interleave(parts, width)

    async def _run(self) -> None:
        try:
            fh = await asyncio.to_thread(self._open)
        except OSError as exc:
            self._failed(exc)
            return
        try:
            while True:
                job = await self._queue.get()
                if job is None:
                    break
                if isinstance(job, _Widen):
                    fh = await asyncio.to_thread(self._widen, fh, job)
                else:
                    await asyncio.to_thread(self._write, fh, job)
        except OSError as exc:
            self._failed(exc)
        finally:
            try:
                await asyncio.to_thread(self._finish, fh)
            except OSError as exc:
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        """The file cannot be written: stop taking audio (nothing would drain it), say so now."""
        if self.error is None:
            self.error = str(exc)
            log.error("recording.failed", path=str(self.path), error=str(exc))
        for pending in self._pending:
            pending.clear()
        while not self._queue.empty():
            self._queue.get_nowait()

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "wb")  # noqa: SIM115 - closed by _finish
        fh.write(wav_header(self.codec, self._disk_channels, self.sample_rate, 0))
        return fh

    def _write(self, fh: BinaryIO, block: bytes) -> None:
        fh.write(block)
        self._written += len(block)

    def _widen(self, fh: BinaryIO, job: _Widen) -> BinaryIO:
        """Writer thread: the file so far, with a silent channel appended to every frame."""
        width = self.codec.sample_width
        old_frame = (job.channels - 1) * width
        header = len(wav_header(self.codec, job.channels, self.sample_rate, 0))
        fh.flush()
        tmp = self.path.with_name(self.path.name + ".widen")
        written = 0
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            src.seek(header)
            dst.write(wav_header(self.codec, job.channels, self.sample_rate, 0))
            fill = np.frombuffer(job.fill, dtype=np.uint8)
            while block := src.read(_REWRITE_FRAMES * old_frame):
                frames = np.frombuffer(block, dtype=np.uint8).reshape(-1, old_frame)
                wider = np.empty((len(frames), old_frame + width), dtype=np.uint8)
                wider[:, :old_frame] = frames
                wider[:, old_frame:] = fill
                dst.write(wider.tobytes())
                written += wider.size
            dst.flush()
            os.fsync(dst.fileno())
        fh.close()
        os.replace(tmp, self.path)
        self._written = written
        self._disk_channels = job.channels
        widened = open(self.path, "r+b")  # noqa: SIM115 - closed by _finish
        widened.seek(0, os.SEEK_END)
        return widened

    def _finish(self, fh: BinaryIO) -> None:
        try:
            if self._written % 2:
                fh.write(b"\0")  # RIFF chunks are padded to an even size
            fh.seek(0)
            fh.write(wav_header(self.codec, self._disk_channels, self.sample_rate, self._written))
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()

    async def close(self) -> Path:
        for channel, converter in self._converters.items():
            tail = converter.flush()
            if tail:
                self._pending[self._column[channel]] += tail
        """Write what every channel has, fix up the header, close. Returns the path; raises
        OSError if the recording failed (then the file holds what was written before)."""
        ready = min(len(p) for p in self._pending) if self.error is None else 0
        if ready:
            self._queue.put_nowait(self._take(ready))
        self._queue.put_nowait(None)
        await self._writer
        if self.error is not None:
            raise OSError(self.error)
        return self.path

    async def abort(self) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self._writer
