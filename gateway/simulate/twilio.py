"""Twilio Media Streams call simulator, client side: a recorded call played into a gateway.

A stereo WAV (channel 0 = inbound, the customer; channel 1 = outbound, the agent; a mono WAV is
inbound only) is sent over a WebSocket exactly as Twilio sends a ``<Start><Stream
track="both_tracks">`` fork (reference notes, sections 1.2 and 1.4): ``connected``, ``start``, one
``media`` message per track every 20 ms (outbound first, then inbound, as in Twilio's two-track
example; ``sequenceNumber`` and ``chunk`` shared across tracks; ``timestamp`` = ms since the stream
started; all three JSON strings), then ``stop``. The Telnyx dialect (section 2.1) is the same in
snake_case (``stream_id``, ``sequence_number``, ``media_format.sample_rate``, ``call_control_id``,
no ``tracks`` in ``start``); SignalWire is Twilio's wire format.

Two layers:

* The sans-I/O core (:class:`SimulationOptions`, :class:`CallAudio`, :class:`WireAudio`,
  :class:`TwilioCallScript`, :class:`TwilioStreamScript`): audio in, the ordered
  ``(send_at_s, text)`` messages of each WebSocket out. No sockets, no clock, no event loop.
* The asyncio shell (:func:`simulate_call`, :func:`simulate_calls`, :func:`send_raw`): aiohttp's
  WebSocket client, pacing on the loop's clock. ``asyncio`` and ``aiohttp`` are imported only
  inside these functions: the core uses neither (importing this module loads no aiohttp).

Audio is prepared once (decoded, resampled, encoded, cut into frames and base64-encoded) into an
immutable :class:`WireAudio` that any number of concurrent calls share; per call only the JSON
envelopes are built, lazily, one message at a time.
"""

from __future__ import annotations

import base64
import json
import math
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from gateway.ingress.events import Audio
from gateway.ingress.file import FileSourceError, WavDecoder
from gateway.ingress.twilio import DIALECTS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, Dialect, Track
from gateway.ingress.twilio_signature import SIGNATURE_HEADER, compute_signature
from gateway.media.codec import (
    Codec,
    UnsupportedCodec,
    decode,
    encode,
    float32_to_pcm16,
    parse_codec,
    pcm16_to_float32,
)
from gateway.media.resample import Resampler

if TYPE_CHECKING:
    import aiohttp

TRACKS: tuple[Track, ...] = ("inbound", "outbound")
# Within one 20 ms slot Twilio's only two-track example sends outbound before inbound.
SEND_ORDER: tuple[Track, ...] = ("outbound", "inbound")
# With nothing to wait for (speed 0, or behind schedule), give the loop a turn this often.
YIELD_EVERY = 50
MAX_WAV_CHANNELS = 2

# mediaFormat.encoding: MIME-ish for Twilio and SignalWire, RTP names for Telnyx (section 2.1).
_TWILIO_ENCODINGS = {
    Codec.PCMU: "audio/x-mulaw",
    Codec.PCMA: "audio/x-alaw",
    Codec.L16: "audio/x-l16",
}
_TELNYX_ENCODINGS = {Codec.PCMU: "PCMU", Codec.PCMA: "PCMA", Codec.L16: "L16"}


def _dumps(obj: Any) -> str:
    # Compact, like the platforms' own messages.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# -- identifiers -------------------------------------------------------------------------------


def new_call_sid(dialect: Dialect = "twilio") -> str:
    """A fresh call identifier: ``CA`` + 32 hex digits (Telnyx: a ``v2:`` call_control_id)."""
    if dialect == "telnyx":
        return "v2:" + secrets.token_urlsafe(40)
    return "CA" + secrets.token_hex(16)


def new_stream_sid(dialect: Dialect = "twilio") -> str:
    """A fresh stream identifier: ``MZ`` + 32 hex digits (Telnyx: an upper-case UUID)."""
    if dialect == "telnyx":
        return str(uuid.uuid4()).upper()
    return "MZ" + secrets.token_hex(16)


def new_account_sid(dialect: Dialect = "twilio") -> str:
    """A fresh account identifier: ``AC`` + 32 hex digits (Telnyx: a ``user_id`` UUID)."""
    if dialect == "telnyx":
        return str(uuid.uuid4()).upper()
    return "AC" + secrets.token_hex(16)


# -- options -----------------------------------------------------------------------------------


def _finite(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    """How one simulated call is sent. Construction raises ValueError for inconsistent values.

    ``codec`` accepts a :class:`~gateway.media.codec.Codec` or any of its names (``"pcmu"``).
    G.711 is 8000 Hz only; L16 may use any rate the decoder accepts (e.g. 16000), sent
    little-endian (the gateway's default ``l16_byte_order``).

    ``speed``: 1.0 is real time, 2.0 twice as fast, 0 as fast as the socket takes it.

    ``drop``: ``(track, start_ms, end_ms)`` spans of call time whose media frames (every frame
    overlapping the span) are not sent, as Twilio does on upstream loss: the next frame's
    timestamp simply jumps.

    ``redirect_at_s``: at that call time (rounded to a frame boundary) the stream sends ``stop``
    and its WebSocket closes; a new WebSocket follows with a new stream id but the same call id,
    account and custom parameters, its timestamps restarting at 0 and its audio continuing from
    the call position after ``redirect_gap_ms`` (rounded to whole frames) of lost audio.

    ``shuffle_window`` > 1 sends the media messages of each block of that many messages in a
    random order (seeded by ``shuffle_seed``: deterministic), as Telnyx may; each message keeps
    its sequence number, chunk and timestamp.

    ``call_sid`` / ``stream_sid`` / ``account_sid`` are generated when None; ``stream_sid`` names
    the first stream only.

    ``linger_s``: after ``stop``, how long to wait for the server to close the socket before
    closing it ourselves. 0 (the default) closes at once, as Twilio does; a server that rejects
    the tail of the stream then closes across our close frame, and its close reason is lost
    (the code is kept). A gateway that closes on ``stop`` costs no extra time with a linger.
    """

    dialect: Dialect = "twilio"
    codec: Codec = Codec.PCMU
    sample_rate: int = 8000
    frame_ms: int = 20
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
    call_sid: str | None = None
    stream_sid: str | None = None
    account_sid: str | None = None
    speed: float = 1.0
    drop: tuple[tuple[Track, float, float], ...] = ()
    redirect_at_s: float | None = None
    redirect_gap_ms: float = 0.0
    shuffle_window: int = 0
    shuffle_seed: int = 0
    linger_s: float = 0.0

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {self.dialect!r}; use one of {', '.join(DIALECTS)}")
        codec = self.codec
        if not isinstance(codec, Codec):
            try:
                codec = parse_codec(str(codec))
            except UnsupportedCodec as exc:
                raise ValueError(str(exc)) from None
            object.__setattr__(self, "codec", codec)
        rate = self.sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int):
            raise ValueError(f"sample_rate must be an integer, got {rate!r}")
        if codec is not Codec.L16 and rate != 8000:
            raise ValueError(f"{codec.value} is 8000 Hz only, not {rate} Hz (use l16 for others)")
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise ValueError(
                f"sample_rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE}"
            )
        if not 1 <= self.frame_ms <= 1000 or rate * self.frame_ms % 1000:
            raise ValueError(f"frame_ms {self.frame_ms} is not a whole number of samples at {rate}")
        for key, value in self.custom_parameters.items():
            if not isinstance(key, str) or not key or not isinstance(value, str):
                raise ValueError(f"custom parameter {key!r}={value!r}: need non-empty str = str")
        for name in ("call_sid", "stream_sid", "account_sid"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        _finite(self.speed, "speed")
        if self.speed < 0:
            raise ValueError(f"speed must be >= 0 (0 = as fast as possible), got {self.speed}")
        for span in self.drop:
            if len(span) != 3 or span[0] not in TRACKS:
                raise ValueError(f"drop span {span!r}: expected (inbound|outbound, start, end)")
            _finite(span[1], "drop start")
            _finite(span[2], "drop end")
            if not 0 <= span[1] < span[2]:
                raise ValueError(f"drop span {span!r}: need 0 <= start_ms < end_ms")
        if self.redirect_at_s is not None:
            _finite(self.redirect_at_s, "redirect_at_s")
            if self.redirect_at_s <= 0:
                raise ValueError(f"redirect_at_s must be > 0, got {self.redirect_at_s}")
        _finite(self.redirect_gap_ms, "redirect_gap_ms")
        if self.redirect_gap_ms < 0:
            raise ValueError(f"redirect_gap_ms must be >= 0, got {self.redirect_gap_ms}")
        if self.shuffle_window < 0:
            raise ValueError(f"shuffle_window must be >= 0, got {self.shuffle_window}")
        _finite(self.linger_s, "linger_s")
        if self.linger_s < 0:
            raise ValueError(f"linger_s must be >= 0, got {self.linger_s}")


# -- audio -------------------------------------------------------------------------------------


def _resample_pcm16(pcm: bytes, in_rate: int, out_rate: int) -> bytes:
    if in_rate == out_rate:
        return pcm
    resampler = Resampler(in_rate, out_rate)
    x = pcm16_to_float32(pcm)
    return float32_to_pcm16(np.concatenate((resampler.process(x), resampler.flush())))


@dataclass(frozen=True, slots=True)
class CallAudio:
    """A call's audio as 16-bit little-endian PCM, one mono buffer per track, at one rate.

    ``outbound`` is None for an inbound-only (mono) call. Construction raises ValueError for a
    rate that is not positive or a buffer that is not whole samples.
    """

    sample_rate: int
    inbound: bytes
    outbound: bytes | None = None

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"sample rate must be positive, got {self.sample_rate}")
        for name in TRACKS:
            pcm = getattr(self, name)
            if pcm is not None and len(pcm) % 2:
                raise ValueError(f"{name} audio of {len(pcm)} bytes is not whole 16-bit samples")

    @property
    def tracks(self) -> tuple[Track, ...]:
        """``("inbound",)`` or ``("inbound", "outbound")``."""
        return TRACKS if self.outbound is not None else ("inbound",)

    @property
    def samples(self) -> int:
        """Samples in the longest track."""
        return max(len(self.pcm(t)) for t in self.tracks) // 2

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate

    def pcm(self, track: Track) -> bytes:
        """One track's PCM16. Raises KeyError for a track the call does not have."""
        pcm = self.inbound if track == "inbound" else self.outbound
        if pcm is None:
            raise KeyError(track)
        return pcm

    def resampled(self, sample_rate: int) -> CallAudio:
        """The same audio at ``sample_rate`` (self when it already is). CPU-bound."""
        if sample_rate == self.sample_rate:
            return self
        out = self.outbound
        return CallAudio(
            sample_rate,
            _resample_pcm16(self.inbound, self.sample_rate, sample_rate),
            None if out is None else _resample_pcm16(out, self.sample_rate, sample_rate),
        )

    @classmethod
    def from_wav_bytes(cls, data: bytes, *, name: str = "") -> CallAudio:
        """Decode a whole WAV file (16-bit PCM or G.711, any rate) at its own sample rate.

        Channel 0 becomes inbound, channel 1 outbound. Raises
        :class:`~gateway.ingress.file.FileSourceError` (one line) for a file that is not a
        supported WAV, holds no audio, or has more than two channels.
        """
        decoder = WavDecoder(max_channels=8, name=name)
        events = decoder.feed(data)
        fmt = decoder.format
        if fmt is not None and fmt.channels > MAX_WAV_CHANNELS:
            raise FileSourceError(
                f"WAV has {fmt.channels} channels; a simulated call plays 1 (inbound) or "
                "2 (inbound, outbound)"
            )
        events += decoder.eof()
        fmt = decoder.format
        assert fmt is not None  # eof() raised otherwise
        parts: list[list[bytes]] = [[] for _ in range(fmt.channels)]
        for event in events:
            if isinstance(event, Audio):
                parts[event.channel].append(event.payload)
        pcm = [decode(fmt.codec, b"".join(chunks)) for chunks in parts]
        return cls(fmt.sample_rate, pcm[0], pcm[1] if len(pcm) > 1 else None)


@dataclass(frozen=True, slots=True)
class WireAudio:
    """A call's audio ready for the wire: per track, one base64 payload per frame.

    Immutable and shared by every call played from it. All tracks have the same number of
    frames; every frame holds ``frame_samples`` samples except possibly a shorter last one.
    """

    codec: Codec
    sample_rate: int
    frame_ms: int
    tracks: tuple[Track, ...]
    payloads: tuple[tuple[str, ...], ...]
    """Aligned with ``tracks``: the base64 payload of each frame."""
    samples: int
    """Samples per track."""

    @classmethod
    def from_audio(
        cls,
        audio: CallAudio,
        *,
        codec: Codec = Codec.PCMU,
        sample_rate: int = 8000,
        frame_ms: int = 20,
    ) -> WireAudio:
        """Resample, encode and frame ``audio`` (CPU-bound: run it off the event loop).

        A track shorter than the other is padded with silence to the same length.
        """
        audio = audio.resampled(sample_rate)
        samples = audio.samples
        frame_samples = sample_rate * frame_ms // 1000
        width = codec.sample_width
        payloads: list[tuple[str, ...]] = []
        for track in audio.tracks:
            pcm = audio.pcm(track)
            pcm += b"\x00" * (2 * samples - len(pcm))
            wire = encode(codec, pcm)
            step = frame_samples * width
            payloads.append(
                tuple(
                    base64.b64encode(wire[i : i + step]).decode("ascii")
                    for i in range(0, len(wire), step)
                )
            )
        return cls(codec, sample_rate, frame_ms, audio.tracks, tuple(payloads), samples)

    @classmethod
    def for_options(cls, audio: CallAudio, options: SimulationOptions) -> WireAudio:
        """:meth:`from_audio` with the codec, rate and frame size of ``options``."""
        return cls.from_audio(
            audio, codec=options.codec, sample_rate=options.sample_rate, frame_ms=options.frame_ms
        )

    def fits(self, options: SimulationOptions) -> bool:
        """Whether this audio has the codec, rate and frame size ``options`` asks for."""
        return (self.codec, self.sample_rate, self.frame_ms) == (
            options.codec,
            options.sample_rate,
            options.frame_ms,
        )

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * self.frame_ms // 1000

    @property
    def frames(self) -> int:
        """Frames per track."""
        return len(self.payloads[0]) if self.payloads else 0

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate

    def frame_end(self, frame: int) -> int:
        """The call position (in samples) where frame ``frame`` ends."""
        return min((frame + 1) * self.frame_samples, self.samples)


# -- scripts -----------------------------------------------------------------------------------


class ScriptEntry(NamedTuple):
    """One message of a stream script, with what the sender needs to account for it."""

    send_at_s: float
    """Call time (seconds from the call's first connect, at speed 1) to send the message at."""
    text: str
    track: Track | None
    """The media track, None for connected / start / stop."""
    samples: int
    """Samples of audio in the message (0 unless media)."""


class TwilioStreamScript:
    """Every message of one Media Streams WebSocket, in send order (see the module docstring).

    Built by :class:`TwilioCallScript`; covers frames ``first_frame`` to ``end_frame``
    (exclusive) of ``wire``, with timestamps counted from ``first_frame``. Iterating is cheap and
    repeatable (the same messages every time, the shuffle included): messages are built as they
    are consumed, so a long call costs no memory per call.
    """

    def __init__(
        self,
        wire: WireAudio,
        options: SimulationOptions,
        *,
        index: int,
        call_sid: str,
        account_sid: str,
        stream_sid: str,
        first_frame: int,
        end_frame: int,
    ) -> None:
        self.wire = wire
        self.options = options
        self.index = index
        self.call_sid = call_sid
        self.account_sid = account_sid
        self.stream_sid = stream_sid
        self.first_frame = first_frame
        self.end_frame = max(first_frame, end_frame)
        start = min(first_frame * wire.frame_samples, wire.samples)
        end = wire.frame_end(self.end_frame - 1) if self.end_frame > first_frame else start
        self.start_at_s = start / wire.sample_rate
        """Call time at which this stream connects and sends ``connected`` and ``start``."""
        self.end_at_s = end / wire.sample_rate
        """Call time at which this stream sends ``stop``."""
        self._telnyx = options.dialect == "telnyx"
        self._seq_key = "sequence_number" if self._telnyx else "sequenceNumber"
        self._sid_key = "stream_id" if self._telnyx else "streamSid"
        frame_ms = wire.frame_ms
        self._dropped: dict[str, list[tuple[int, int]]] = {t: [] for t in TRACKS}
        for track, start_ms, end_ms in options.drop:
            # Every frame overlapping [start_ms, end_ms) is lost.
            self._dropped[track].append(
                (math.floor(start_ms / frame_ms), math.ceil(end_ms / frame_ms))
            )

    def __iter__(self) -> Iterator[tuple[float, str]]:
        return self.messages()

    def messages(self) -> Iterator[tuple[float, str]]:
        """``(send_at_s, text)`` for every message, in send order (send times never decrease)."""
        for entry in self.entries():
            yield entry.send_at_s, entry.text

    def entries(self) -> Iterator[ScriptEntry]:
        """Like :meth:`messages`, with the track and samples of each media message."""
        wire = self.wire
        yield ScriptEntry(self.start_at_s, self.connected_message(), None, 0)
        yield ScriptEntry(self.start_at_s, self.start_message(), None, 0)
        window = self.options.shuffle_window
        rng = random.Random(f"{self.options.shuffle_seed}/{self.index}") if window > 1 else None
        block: list[ScriptEntry] = []
        head = f'{{"event":"media","{self._seq_key}":"'
        tail = f'"{self._sid_key}":{_dumps(self.stream_sid)}}}'
        order = [
            (t, wire.payloads[wire.tracks.index(t)], self._dropped[t])
            for t in SEND_ORDER
            if t in wire.tracks
        ]
        rate, frame_samples, total = wire.sample_rate, wire.frame_samples, wire.samples
        seq = 1  # `start` is 1
        for frame in range(self.first_frame, self.end_frame):
            start = frame * frame_samples
            end = min(start + frame_samples, total)
            at = end / rate
            ts = (frame - self.first_frame) * wire.frame_ms
            for track, payloads, dropped in order:
                if dropped and any(a <= frame < b for a, b in dropped):
                    continue
                seq += 1
                # Built by hand rather than json.dumps: this is the hot path of a many-call
                # load test, and every field is plain ASCII (the sid is JSON-encoded above).
                text = (
                    f'{head}{seq}","media":{{"track":"{track}","chunk":"{seq - 1}",'
                    f'"timestamp":"{ts}","payload":"{payloads[frame]}"}},{tail}'
                )
                entry = ScriptEntry(at, text, track, end - start)
                if rng is None:
                    yield entry
                    continue
                block.append(entry)
                if len(block) == window:
                    yield from _shuffled(block, rng)
                    block = []
        if block and rng is not None:
            yield from _shuffled(block, rng)
        yield ScriptEntry(self.end_at_s, self.stop_message(seq + 1), None, 0)

    def connected_message(self) -> str:
        if self._telnyx:
            return _dumps({"event": "connected", "version": "1.0.0"})
        return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start_message(self) -> str:
        wire = self.wire
        encoding = (_TELNYX_ENCODINGS if self._telnyx else _TWILIO_ENCODINGS)[wire.codec]
        params = dict(self.options.custom_parameters)
        start: dict[str, Any]
        if self._telnyx:
            start = {
                "user_id": self.account_sid,
                "call_control_id": self.call_sid,
                "media_format": {
                    "encoding": encoding,
                    "sample_rate": wire.sample_rate,
                    "channels": 1,
                },
            }
            if params:
                start["custom_parameters"] = params
        else:
            start = {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": list(wire.tracks),
                "mediaFormat": {
                    "encoding": encoding,
                    "sampleRate": wire.sample_rate,
                    "channels": 1,
                },
                "customParameters": params,
            }
        return _dumps(
            {"event": "start", self._seq_key: "1", "start": start, self._sid_key: self.stream_sid}
        )

    def stop_message(self, sequence_number: int) -> str:
        if self._telnyx:
            stop = {"user_id": self.account_sid, "call_control_id": self.call_sid}
        else:
            stop = {"accountSid": self.account_sid, "callSid": self.call_sid}
        return _dumps(
            {
                "event": "stop",
                self._seq_key: str(sequence_number),
                "stop": stop,
                self._sid_key: self.stream_sid,
            }
        )


def _shuffled(block: list[ScriptEntry], rng: random.Random) -> Iterator[ScriptEntry]:
    """The block's messages in a random order, in the block's send-time slots."""
    moved = block[:]
    rng.shuffle(moved)
    for slot, entry in zip(block, moved, strict=True):
        yield entry._replace(send_at_s=slot.send_at_s)


class TwilioCallScript:
    """The WebSocket streams of one simulated call: one, or two around a redirect.

    ``audio`` is prepared for ``options`` when it is a :class:`CallAudio` (CPU-bound). Raises
    ValueError when a :class:`WireAudio` does not fit ``options``, or a redirect does not fall
    inside the call.
    """

    def __init__(
        self, audio: WireAudio | CallAudio, options: SimulationOptions | None = None
    ) -> None:
        opts = options if options is not None else SimulationOptions()
        wire = audio if isinstance(audio, WireAudio) else WireAudio.for_options(audio, opts)
        if not wire.fits(opts):
            raise ValueError(
                f"audio prepared as {wire.codec.value}/{wire.sample_rate}/{wire.frame_ms} ms, "
                f"options ask for {opts.codec.value}/{opts.sample_rate}/{opts.frame_ms} ms"
            )
        self.wire = wire
        self.options = opts
        self.call_sid = opts.call_sid or new_call_sid(opts.dialect)
        self.account_sid = opts.account_sid or new_account_sid(opts.dialect)
        spans = [(0, wire.frames)]
        if opts.redirect_at_s is not None:
            at = round(opts.redirect_at_s * 1000 / wire.frame_ms)
            if not 0 < at < wire.frames:
                raise ValueError(
                    f"redirect_at_s={opts.redirect_at_s:g} is not inside the call's "
                    f"{wire.duration_s:.2f} s of audio"
                )
            resume = at + round(opts.redirect_gap_ms / wire.frame_ms)
            spans = [(0, at), (resume, wire.frames)]
        self.streams: tuple[TwilioStreamScript, ...] = tuple(
            TwilioStreamScript(
                wire,
                opts,
                index=i,
                call_sid=self.call_sid,
                account_sid=self.account_sid,
                stream_sid=(opts.stream_sid if i == 0 and opts.stream_sid else None)
                or new_stream_sid(opts.dialect),
                first_frame=first,
                end_frame=end,
            )
            for i, (first, end) in enumerate(spans)
        )


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """How one simulated call (or one :func:`send_raw` socket) went.

    ``close_code`` / ``close_reason``: the server's close frame when the server closed first
    (the reason is "" when it crossed our own close); otherwise our normal 1000 (1006 when the
    connection broke without a close frame). ``completed``: every message of every stream was
    sent (``stop`` included) and each socket then closed with 1000. ``error``: why the call
    could not connect at all (DNS, refused, TLS), None otherwise.
    """

    call_sid: str
    stream_sids: list[str]
    frames_sent: int
    messages_sent: int
    audio_ms: float
    """Audio sent on the track that sent the most, in ms."""
    elapsed_s: float
    close_code: int | None
    close_reason: str
    rejected_status: int | None
    """The HTTP status of a refused WebSocket upgrade (e.g. 403), else None."""
    completed: bool
    error: str | None = None


# -- the asyncio shell -------------------------------------------------------------------------


def _read_call_audio(path: Path) -> CallAudio:
    """Blocking: read and decode a WAV file. Raises FileSourceError with one line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileSourceError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise FileSourceError(f"is a directory, not a WAV file: {path}") from None
    except PermissionError:
        raise FileSourceError(f"permission denied: {path}") from None
    except OSError as exc:
        raise FileSourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    return CallAudio.from_wav_bytes(data, name=path.name)


async def load_call_audio(path: Path) -> CallAudio:
    """Read and decode a WAV file in a worker thread. Raises FileSourceError with one line."""
    import asyncio

    return await asyncio.to_thread(_read_call_audio, path)


async def prepare_audio(
    audio: Path | CallAudio | WireAudio, options: SimulationOptions
) -> WireAudio:
    """``audio`` as :class:`WireAudio` for ``options``; file reads and encoding run in a thread.

    Prepare once and pass the result to many :func:`simulate_call` calls to share it. Raises
    FileSourceError for an unusable WAV, ValueError for a WireAudio that does not fit.
    """
    import asyncio

    if isinstance(audio, WireAudio):
        wire = audio
        if not wire.fits(options):
            raise ValueError("the prepared audio does not have the codec/rate/frame of options")
        return wire
    decoded = await load_call_audio(audio) if isinstance(audio, Path) else audio
    return await asyncio.to_thread(WireAudio.for_options, decoded, options)


def signed_headers(
    url: str, auth_token: str | None, headers: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Upgrade headers: ``headers`` plus ``X-Twilio-Signature`` over ``url`` exactly as given
    (Twilio signs the ``wss://`` URL as written in the TwiML, no parameters) when a token is set.
    """
    out = dict(headers or {})
    if auth_token:
        out[SIGNATURE_HEADER] = compute_signature(auth_token, url)
    return out


@asynccontextmanager
async def _session_scope(
    session: aiohttp.ClientSession | None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """The caller's session, or a new one (closed on exit) sized for thousands of sockets."""
    if session is not None:
        yield session
        return
    import aiohttp

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        # These bound the upgrade only (aiohttp applies no request timeout to the socket after
        # it), so a stalled handshake fails while a long call, or a silent server, is fine.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=30),
    ) as own:
        yield own


T = TypeVar("T")


async def play_concurrently(
    n: int,
    stagger_s: float,
    play: Callable[[aiohttp.ClientSession], Awaitable[T]],
    session: aiohttp.ClientSession | None = None,
) -> list[T]:
    """Run ``play`` ``n`` times at once on one session (the caller's, or a new one without a
    connection limit); run i starts ``i * stagger_s`` after the first. Results in start order."""
    import asyncio

    async def one(i: int, s: aiohttp.ClientSession) -> T:
        if i and stagger_s:
            await asyncio.sleep(i * stagger_s)
        return await play(s)

    async with _session_scope(session) as s:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i, s)) for i in range(n)]
    return [task.result() for task in tasks]


class _Tally:
    """What one call has sent so far (one per call, never shared)."""

    def __init__(self) -> None:
        self.frames = 0
        self.messages = 0
        self.samples: dict[str, int] = dict.fromkeys(TRACKS, 0)

    def count(self, entry: ScriptEntry | None) -> None:
        self.messages += 1
        if entry is not None and entry.track is not None:
            self.frames += 1
            self.samples[entry.track] += entry.samples


class _Socket(NamedTuple):
    sent_all: bool
    close_code: int | None
    close_reason: str


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str] | None:
    """Read and ignore what the server sends until the socket closes.

    Returns the server's close frame (code, reason) when it closed first, else None. Reading is
    what lets aiohttp see (and answer) the server's close frame while we are still sending.
    """
    import aiohttp

    while True:
        msg = await ws.receive()
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return int(msg.data), str(msg.extra or "")
        if msg.type in (
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        ):
            return None


# (send_at_s, message, its script entry if any): str goes out as a text frame, bytes as binary.
_Outgoing = tuple[float, str | bytes, ScriptEntry | None]


async def _run_socket(
    ws: aiohttp.ClientWebSocketResponse,
    outgoing: Iterator[_Outgoing],
    *,
    t0: float,
    speed: float,
    tally: _Tally,
    linger_s: float = 0.0,
) -> _Socket:
    """Send ``outgoing`` on ``ws`` on schedule, then close it; never raises for the peer's doing.

    Message i goes out at ``t0 + send_at_s / speed`` on the loop clock (an absolute schedule, so
    no drift); speed 0 sends as fast as the socket takes it. Sending stops as soon as the server
    closes. After the last message, waits up to ``linger_s`` for the server to close first, then
    closes normally (1000) and waits for the close handshake.
    """
    import asyncio

    import aiohttp

    loop = asyncio.get_running_loop()
    reader = asyncio.create_task(_drain(ws))
    sent_all = True
    try:
        unyielded = 0
        for send_at_s, data, entry in outgoing:
            delay = t0 + send_at_s / speed - loop.time() if speed > 0 else 0.0
            if delay > 0:
                unyielded = 0
                await asyncio.sleep(delay)
            else:
                unyielded += 1
                if unyielded >= YIELD_EVERY:
                    unyielded = 0
                    await asyncio.sleep(0)
            if ws.closed or reader.done():
                sent_all = False
                break
            try:
                if isinstance(data, str):
                    await ws.send_str(data)
                else:
                    await ws.send_bytes(data)
            except (aiohttp.ClientConnectionError, ConnectionError):
                sent_all = False  # the server went away under us: its close frame says why
                break
            tally.count(entry)
        if not sent_all or linger_s > 0:
            # The server is closing (or may close, after a raw message): let the reader see it.
            await asyncio.wait({reader}, timeout=linger_s if sent_all else 10.0)
        await ws.close()
        await asyncio.wait({reader})
        server_close = (
            reader.result() if not reader.cancelled() and reader.exception() is None else None
        )
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait({reader})
        if not ws.closed:
            await ws.close()
    code = ws.close_code
    reason = server_close[1] if server_close is not None and server_close[0] == code else ""
    return _Socket(sent_all, code, reason)


async def _connect(
    session: aiohttp.ClientSession, url: str, headers: Mapping[str, str]
) -> aiohttp.ClientWebSocketResponse | tuple[int | None, str]:
    """The open socket, or (HTTP status of a refused upgrade or None, what went wrong)."""

    import aiohttp

    try:
        return await session.ws_connect(url, headers=headers, autoclose=True, autoping=True)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status, exc.message
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return None, f"cannot connect to {url}: {str(exc) or type(exc).__name__}"


async def _play(
    session: aiohttp.ClientSession,
    url: str,
    script: TwilioCallScript,
    headers: Mapping[str, str],
) -> SimulationResult:
    import asyncio

    loop = asyncio.get_running_loop()
    speed = script.options.speed
    tally = _Tally()
    stream_sids: list[str] = []
    t0 = loop.time()
    code: int | None = None
    reason = ""
    completed = True
    rejected: int | None = None
    error: str | None = None
    for stream in script.streams:
        if speed > 0:
            # A redirected stream reconnects at its own call time.
            await asyncio.sleep(max(0.0, t0 + stream.start_at_s / speed - loop.time()))
        ws = await _connect(session, url, headers)
        if isinstance(ws, tuple):
            status, detail = ws
            completed = False
            if status is None:
                error = detail
            else:
                rejected, reason = status, detail
            break
        stream_sids.append(stream.stream_sid)
        outgoing = ((e.send_at_s, e.text, e) for e in stream.entries())
        outcome = await _run_socket(
            ws, outgoing, t0=t0, speed=speed, tally=tally, linger_s=script.options.linger_s
        )
        code, reason = outcome.close_code, outcome.close_reason
        if not (outcome.sent_all and code == 1000):
            completed = False
            break
    return SimulationResult(
        call_sid=script.call_sid,
        stream_sids=stream_sids,
        frames_sent=tally.frames,
        messages_sent=tally.messages,
        audio_ms=max(tally.samples.values()) * 1000 / script.wire.sample_rate,
        elapsed_s=loop.time() - t0,
        close_code=code,
        close_reason=reason,
        rejected_status=rejected,
        completed=completed,
        error=error,
    )


async def simulate_call(
    url: str,
    audio: Path | CallAudio | WireAudio,
    options: SimulationOptions | None = None,
    *,
    auth_token: str | None = None,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
) -> SimulationResult:
    """Play one call into the Media Streams endpoint at ``url`` (``ws://`` or ``wss://``).

    ``audio`` is a WAV path (read in a worker thread), decoded audio, or audio prepared once
    with :func:`prepare_audio`. With ``auth_token`` the upgrade request carries
    ``X-Twilio-Signature`` for ``url`` exactly as given. ``session`` (e.g. shared by many calls)
    is left open; without one a session is made and closed.

    Never raises for what the server does: a refused upgrade, an early close or a broken
    connection is reported in the result. Raises FileSourceError for an unusable WAV and
    ValueError for options that do not fit the audio.
    """
    opts = options if options is not None else SimulationOptions()
    wire = await prepare_audio(audio, opts)
    script = TwilioCallScript(wire, opts)
    async with _session_scope(session) as s:
        return await _play(s, url, script, signed_headers(url, auth_token, headers))


async def simulate_calls(
    n: int,
    url: str,
    audio: Path | CallAudio | WireAudio,
    options: SimulationOptions | None = None,
    *,
    auth_token: str | None = None,
    stagger_s: float = 0.0,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[SimulationResult]:
    """Play ``n`` concurrent calls of the same audio, each with its own call and stream ids.

    The audio is prepared once and shared; one session (no connection limit) carries every
    socket. Call i starts ``i * stagger_s`` seconds after the first. Results are in start order.
    Raises ValueError for ``n`` < 1, a negative stagger, or fixed ids with ``n`` > 1 (the ids of
    ``options`` would repeat); otherwise as :func:`simulate_call`.
    """

    opts = options if options is not None else SimulationOptions()
    if n < 1:
        raise ValueError(f"need at least one call, got {n}")
    _finite(stagger_s, "stagger_s")
    if stagger_s < 0:
        raise ValueError(f"stagger_s must be >= 0, got {stagger_s}")
    if n > 1 and (opts.call_sid or opts.stream_sid):
        raise ValueError("call_sid/stream_sid would repeat across calls: leave them None")
    wire = await prepare_audio(audio, opts)
    signed = signed_headers(url, auth_token, headers)
    return await play_concurrently(
        n, stagger_s, lambda s: _play(s, url, TwilioCallScript(wire, opts), signed), session
    )


async def send_raw(
    url: str,
    messages: Sequence[str | bytes],
    *,
    auth_token: str | None = None,
    session: aiohttp.ClientSession | None = None,
    headers: Mapping[str, str] | None = None,
    interval_s: float = 0.0,
    linger_s: float = 1.0,
) -> SimulationResult:
    """Send arbitrary messages on one socket (str as text frames, bytes as binary frames).

    For tests of bad input (malformed JSON, huge messages, a stream cut short): messages go out
    ``interval_s`` apart, sending stops when the server closes, and after the last one the
    server gets up to ``linger_s`` to close before the socket is closed normally. The result
    counts every message in ``messages_sent``; ``frames_sent`` and ``audio_ms`` are 0 and the
    ids empty (nothing is interpreted); ``completed`` means everything was sent and the socket
    closed with 1000. Never raises for what the server does.
    """
    import asyncio

    _finite(interval_s, "interval_s")
    _finite(linger_s, "linger_s")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tally = _Tally()
    async with _session_scope(session) as s:
        ws = await _connect(s, url, signed_headers(url, auth_token, headers))
        if isinstance(ws, tuple):
            status, detail = ws
            return SimulationResult(
                call_sid="",
                stream_sids=[],
                frames_sent=0,
                messages_sent=0,
                audio_ms=0.0,
                elapsed_s=loop.time() - t0,
                close_code=None,
                close_reason=detail if status is not None else "",
                rejected_status=status,
                completed=False,
                error=detail if status is None else None,
            )
        outgoing = ((i * interval_s, m, None) for i, m in enumerate(messages))
        outcome = await _run_socket(
            ws, outgoing, t0=loop.time(), speed=1.0, tally=tally, linger_s=linger_s
        )
    return SimulationResult(
        call_sid="",
        stream_sids=[],
        frames_sent=0,
        messages_sent=tally.messages,
        audio_ms=0.0,
        elapsed_s=loop.time() - t0,
        close_code=outcome.close_code,
        close_reason=outcome.close_reason,
        rejected_status=None,
        completed=outcome.sent_all and outcome.close_code == 1000,
    )
