"""Recorded calls: a 1-8 channel WAV file (16-bit PCM or G.711, any sample rate) as a call.

:class:`WavDecoder` is the sans-I/O part: fed the file's bytes in any chunking, it returns
normalized ingress events (one channel per WAV channel, timestamps = frame index). :func:`play_file`
is the thin shell that reads the file off the event loop and feeds a
:class:`~gateway.calls.call.Call` as fast as its STT sessions accept audio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.calls.call import Call
from gateway.ingress.events import Audio, CallEnded, CallStarted, ChannelSpec, IngressEvent
from gateway.media.interleave import deinterleave
from gateway.media.wav import WavError, WavFormat, WavNeedMoreData, parse_wav_header

SOURCE = "file"


class FileSourceError(ValueError):
    """The file cannot be transcribed; the message is one line a user can act on."""


class WavDecoder:
    """WAV bytes in, :class:`CallStarted` / :class:`Audio` / :class:`CallEnded` events out."""

    def __init__(
        self,
        *,
        roles: Sequence[str] = ("customer", "agent"),
        max_channels: int = 8,
        chunk_ms: int = 200,
        name: str = "",
    ) -> None:
        self._roles = tuple(roles)
        self._max_channels = max_channels
        self._chunk_ms = chunk_ms
        self._name = name
        self._head = bytearray()
        self.format: WavFormat | None = None
        self._pending = bytearray()
        self._remaining: int | None = None
        self._frames = 0
        self._ended = False

    @property
    def frames(self) -> int:
        """Frames (samples per channel) decoded so far."""
        return self._frames

    def feed(self, data: bytes) -> list[IngressEvent]:
        if self._ended:
            raise RuntimeError("feed() after eof()")
        events: list[IngressEvent] = []
        if self.format is None:
            self._head.extend(data)
            try:
                fmt = parse_wav_header(bytes(self._head))
            except WavNeedMoreData:
                return events
            except WavError as exc:
                raise FileSourceError(str(exc)) from None
            events.append(self._begin(fmt))
            data = bytes(self._head[fmt.data_offset :])
            self._head.clear()
        events.extend(self._audio(data))
        return events

    def _begin(self, fmt: WavFormat) -> CallStarted:
        self._check(fmt)
        self.format = fmt
        self._remaining = fmt.data_size
        return self._started(fmt)

    def eof(self) -> list[IngressEvent]:
        """End of file: flush whole frames, drop a trailing partial frame, end the call."""
        events: list[IngressEvent] = []
        if self.format is None:
            if not self._head:
                raise FileSourceError("file is empty")
            try:
                # Whole now: the header may parse where it waited for more (a data chunk of
                # size 0 with less than a chunk header after it).
                fmt = parse_wav_header(bytes(self._head), at_eof=True)
            except (WavError, WavNeedMoreData) as exc:
                raise FileSourceError(str(exc) or "WAV header is truncated") from None
            events.append(self._begin(fmt))
            events.extend(self._audio(bytes(self._head[fmt.data_offset :])))
            self._head.clear()
        events += self._audio(b"", flush=True)
        if self._frames == 0:
            raise FileSourceError("WAV has no audio (0 frames)")
        self._ended = True
        events.append(CallEnded("end_of_file"))
        return events

    def _check(self, fmt: WavFormat) -> None:
        if fmt.channels > self._max_channels:
            raise FileSourceError(
                f"WAV has {fmt.channels} channels; at most {self._max_channels} are supported"
            )
        if fmt.sample_rate < 4000 or fmt.sample_rate > 96000:
            raise FileSourceError(f"unsupported WAV sample rate {fmt.sample_rate} Hz")
        if fmt.data_size == 0:
            raise FileSourceError("WAV has no audio (0 frames)")

    def _started(self, fmt: WavFormat) -> CallStarted:
        channels = tuple(
            ChannelSpec(
                index=i,
                role=self._roles[i] if i < len(self._roles) else f"channel{i}",
                codec=fmt.codec,
                sample_rate=fmt.sample_rate,
            )
            for i in range(fmt.channels)
        )
        meta = {"file": self._name} if self._name else {}
        return CallStarted(SOURCE, channels, {"file": self._name}, meta)

    def _audio(self, data: bytes, *, flush: bool = False) -> list[IngressEvent]:
        fmt = self.format
        assert fmt is not None
        if self._remaining is not None:
            data = data[: self._remaining]
            self._remaining -= len(data)
        self._pending.extend(data)
        chunk = max(1, fmt.sample_rate * self._chunk_ms // 1000) * fmt.frame_size
        events: list[IngressEvent] = []
        while len(self._pending) >= chunk or (flush and len(self._pending) >= fmt.frame_size):
            take = min(chunk, len(self._pending) - len(self._pending) % fmt.frame_size)
            block = bytes(self._pending[:take])
            del self._pending[:take]
            parts = deinterleave(block, fmt.channels, fmt.codec.sample_width)
            for index, payload in enumerate(parts):
                events.append(Audio(index, payload, self._frames))
            self._frames += take // fmt.frame_size
        return events


async def play_file(
    call: Call,
    path: Path,
    *,
    roles: Sequence[str] = ("customer", "agent"),
    max_channels: int = 8,
    progress: Callable[[int, int], None] | None = None,
    block_size: int = 1 << 16,
) -> None:
    """Stream ``path`` through ``call`` as fast as its sessions accept audio, then end the call.

    Raises :class:`FileSourceError` for a file that cannot be used (before any audio flows when
    the header is the problem). File reads run in a worker thread.
    """
    try:
        fh = await asyncio.to_thread(path.open, "rb")
    except FileNotFoundError:
        raise FileSourceError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise FileSourceError(f"is a directory, not a WAV file: {path}") from None
    except PermissionError:
        raise FileSourceError(f"permission denied: {path}") from None
    try:
        total = (await asyncio.to_thread(path.stat)).st_size
        decoder = WavDecoder(roles=roles, max_channels=max_channels, name=path.name)
        done = 0
        while True:
            data = await asyncio.to_thread(fh.read, block_size)
            if not data:
                break
            done += len(data)
            for event in decoder.feed(data):
                await call.handle(event)
            if progress is not None:
                progress(done, total)
        for event in decoder.eof():
            await call.handle(event)
    finally:
        await asyncio.to_thread(fh.close)


def probe_wav(path: Path, *, max_channels: int = 8) -> WavFormat:
    """Check a WAV file's header without decoding it (blocking: for CLI use before the loop)."""
    decoder = WavDecoder(max_channels=max_channels, name=path.name)
    try:
        with path.open("rb") as fh:
            while decoder.format is None:
                data = fh.read(1 << 16)
                if not data:
                    decoder.eof()  # raises the precise error
                    break
                decoder.feed(data)
    except FileNotFoundError:
        raise FileSourceError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise FileSourceError(f"is a directory, not a WAV file: {path}") from None
    except PermissionError:
        raise FileSourceError(f"permission denied: {path}") from None
    assert decoder.format is not None
    fmt = decoder.format
    available = path.stat().st_size - fmt.data_offset
    if fmt.data_size is not None:
        available = min(available, fmt.data_size)
    if available < fmt.frame_size:
        raise FileSourceError("WAV has no audio (0 frames)")
    return fmt
