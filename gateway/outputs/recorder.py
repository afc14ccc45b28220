"""CallRecorder: a call's audio as one multi-channel WAV, written off the event loop.

Each channel's audio arrives (through :meth:`Call.add_audio_tap`) as its clock releases it: in
order, gaps already filled with silence, so sample index == call time on every channel. The
recorder interleaves the span every channel has reached and hands it to a writer thread; the
event loop only does the interleave (numpy). The file is ``DIR/CALL_ID.wav`` in the call's codec
(µ-law and A-law stay 8-bit G.711, L16 is 16-bit PCM), one WAV channel per call channel.

The header is written first with data size 0, which readers (ours included) take as "until the
end of the file", and patched with the real sizes on :meth:`close`: a recording cut short by a
crash is still a readable WAV up to its last write. ``gateway transcribe`` takes the file as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import BinaryIO

from gateway.media.codec import Codec
from gateway.media.interleave import interleave
from gateway.media.wav import wav_header

_FLUSH_BYTES = 16000  # per channel: about 1-2 s of 8 kHz audio per write


class CallRecorder:
    """Records one call; ``feed`` is the audio tap, ``close`` finishes the file."""

    def __init__(self, path: Path, codec: Codec, sample_rate: int, channels: int) -> None:
        self.path = path
        self.codec = codec
        self.sample_rate = sample_rate
        self.channels = channels
        self._pending = [bytearray() for _ in range(channels)]
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._written = 0
        self._writer = asyncio.create_task(self._run(), name=f"recorder-{path.stem}")
        self.error: str | None = None

    def feed(self, channel: int, data: bytes) -> None:
        """Buffer ``data`` for ``channel``; queue the interleaved span all channels reached."""
        if self.error is not None or not 0 <= channel < self.channels:
            return
        self._pending[channel] += data
        ready = min(len(p) for p in self._pending)
        if ready >= _FLUSH_BYTES:
            self._queue.put_nowait(self._take(ready))

    def _take(self, size: int) -> bytes:
        width = self.codec.sample_width
        size -= size % width
        parts = [bytes(p[:size]) for p in self._pending]
        for p in self._pending:
            del p[:size]
        return interleave(parts, width)

    async def _run(self) -> None:
        fh = await asyncio.to_thread(self._open)
        try:
            while True:
                block = await self._queue.get()
                if block is None:
                    break
                await asyncio.to_thread(self._write, fh, block)
        finally:
            await asyncio.to_thread(self._finish, fh)

    def _open(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "wb")  # noqa: SIM115 - closed by _finish
        fh.write(wav_header(self.codec, self.channels, self.sample_rate, 0))
        return fh

    def _write(self, fh: BinaryIO, block: bytes) -> None:
        fh.write(block)
        self._written += len(block)

    def _finish(self, fh: BinaryIO) -> None:
        try:
            if self._written % 2:
                fh.write(b"\0")  # RIFF chunks are padded to an even size
            fh.seek(0)
            fh.write(wav_header(self.codec, self.channels, self.sample_rate, self._written))
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()

    async def close(self) -> Path:
        """Write what every channel has, fix up the header, close. Returns the path."""
        ready = min(len(p) for p in self._pending)
        if ready:
            self._queue.put_nowait(self._take(ready))
        self._queue.put_nowait(None)
        try:
            await self._writer
        except OSError as exc:
            self.error = str(exc)
            raise
        return self.path

    async def abort(self) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await self._writer
