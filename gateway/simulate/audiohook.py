"""Genesys AudioHook client simulator: a recorded call played into a gateway's AudioHook endpoint.

A stereo WAV (channel 0 = ``external``, the customer; channel 1 = ``internal``, the agent; a
mono WAV is ``external`` only) is sent as Genesys Cloud's AudioHook Monitor client does
(reference notes, section 3): the upgrade carries ``Audiohook-*`` headers, ``X-API-KEY`` and,
with a client secret, the HTTP message signature; then ``open`` offering the stereo format,
binary interleaved frames after ``opened`` (every ``frame_ms`` on the call clock), ``ping``
every ``ping_interval_s``, optional pauses (``paused`` ... ``resumed{start, discarded}``) and
discards (frames not sent, then ``discarded{start, discarded}``), and ``close{reason: end}``;
the session ends when the server answers ``closed``. A server ``disconnect`` is answered with
``close{reason: disconnect}``.

Two layers, as the Twilio simulator: :class:`AudioHookScript` (sans-I/O: audio in, the ordered
``(send_at_s, message)`` plan out, no sockets, no clock) and the asyncio shell
(:func:`simulate_audiohook`, :func:`simulate_audiohook_calls`). ``asyncio`` and ``aiohttp``
are imported only inside the shell functions.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from gateway.ingress.audiohook import format_duration
from gateway.ingress.audiohook_signature import (
    CORRELATION_HEADER,
    ORGANIZATION_HEADER,
    SESSION_HEADER,
    sign_headers,
)
from gateway.media.codec import Codec, encode
from gateway.media.interleave import interleave
from gateway.simulate.twilio import CallAudio, load_call_audio, play_concurrently

if TYPE_CHECKING:
    import aiohttp
from yarl import URL

RATE = 8000
Format = Literal["PCMU", "L16"]


@dataclass(frozen=True, slots=True)
class AudioHookOptions:
    """How one simulated AudioHook session is sent. Construction raises ValueError.

    ``pauses`` / ``discards``: ``(start_s, end_s)`` spans of call time (rounded to frames)
    with no audio; a pause is announced with ``paused`` and ended with ``resumed``, a discard
    declared afterwards with ``discarded``. Both carry the span as ``start`` / ``discarded``.
    ``speed`` 1.0 is real time, 0 as fast as possible. ``api_key`` / ``client_secret`` (base64)
    authenticate the upgrade; ``continued_sessions`` lists earlier session ids this one
    continues; ``close_reason`` is sent in the final ``close`` (``reconnect`` leaves the call
    open for a continuing session).
    """

    format: Format = "PCMU"
    frame_ms: int = 100
    speed: float = 1.0
    api_key: str = ""
    client_secret: str = ""
    organization_id: str = "d7934305-0972-4844-938e-9060eef73d05"
    session_id: str | None = None
    conversation_id: str | None = None
    participant: Mapping[str, str] = field(
        default_factory=lambda: {
            "id": "883efee8-3d6c-4537-b500-6d7ca4b92fa0",
            "ani": "+1-555-555-1234",
            "aniName": "John Doe",
            "dnis": "+1-800-555-6789",
        }
    )
    language: str = "en-US"
    pauses: tuple[tuple[float, float], ...] = ()
    discards: tuple[tuple[float, float], ...] = ()
    ping_interval_s: float = 5.0
    continued_sessions: tuple[str, ...] = ()
    close_reason: str = "end"
    close_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.format not in ("PCMU", "L16"):
            raise ValueError(f"format must be PCMU or L16, got {self.format!r}")
        if not 10 <= self.frame_ms <= 1000 or self.frame_ms % 10:
            raise ValueError(f"frame_ms must be a multiple of 10 in 10-1000, got {self.frame_ms}")
        if not math.isfinite(self.speed) or self.speed < 0:
            raise ValueError(f"speed must be >= 0, got {self.speed}")
        for a, b in (*self.pauses, *self.discards):
            if not (math.isfinite(a) and math.isfinite(b) and 0 <= a < b):
                raise ValueError(f"span ({a}, {b}): need 0 <= start < end")
        if self.ping_interval_s <= 0:
            raise ValueError("ping_interval_s must be positive")


class Planned(NamedTuple):
    """One step of the plan: a client message (``type`` + parameters) or an audio frame."""

    send_at_s: float
    kind: Literal["message", "audio"]
    type: str
    parameters: dict[str, Any]
    audio: bytes
    position_s: float
    """The stream position after this step (audio sent plus declared gaps), in seconds."""


@dataclass(frozen=True, slots=True)
class AudioHookWire:
    """A call's audio as interleaved AudioHook frames (shared by concurrent sessions)."""

    format: Format
    frame_ms: int
    channels: tuple[str, ...]
    frames: tuple[bytes, ...]
    samples: int

    @classmethod
    def from_audio(
        cls, audio: CallAudio, fmt: Format = "PCMU", frame_ms: int = 100
    ) -> AudioHookWire:
        """Resample to 8 kHz, encode and interleave (CPU-bound: run it off the event loop)."""
        audio = audio.resampled(RATE)
        codec = Codec.PCMU if fmt == "PCMU" else Codec.L16
        samples = audio.samples
        tracks = [audio.inbound] + ([audio.outbound] if audio.outbound is not None else [])
        wires = [encode(codec, pcm + b"\x00" * (2 * samples - len(pcm))) for pcm in tracks]
        whole = interleave(wires, codec.sample_width)
        step = RATE * frame_ms // 1000 * codec.sample_width * len(wires)
        frames = tuple(whole[i : i + step] for i in range(0, len(whole), step))
        channels = ("external", "internal")[: len(wires)]
        return cls(fmt, frame_ms, channels, frames, samples)

    @property
    def duration_s(self) -> float:
        return self.samples / RATE


class AudioHookScript:
    """The plan of one AudioHook session over ``wire`` (see the module docstring)."""

    def __init__(self, wire: AudioHookWire, options: AudioHookOptions) -> None:
        self.wire = wire
        self.options = options
        self.session_id = options.session_id or str(uuid.uuid4())
        self.conversation_id = options.conversation_id or str(uuid.uuid4())
        self.correlation_id = str(uuid.uuid4())

    def open_parameters(self) -> dict[str, Any]:
        wire, o = self.wire, self.options
        media = [
            {"type": "audio", "format": wire.format, "channels": list(wire.channels), "rate": RATE}
        ]
        if len(wire.channels) == 2:
            for ch in wire.channels:
                media.append(
                    {"type": "audio", "format": wire.format, "channels": [ch], "rate": RATE}
                )
        params: dict[str, Any] = {
            "organizationId": o.organization_id,
            "conversationId": self.conversation_id,
            "participant": dict(o.participant),
            "media": media,
            "language": o.language,
        }
        if o.continued_sessions:
            params["continuedSessions"] = [
                {"id": sid, "serverseq": 0, "clientseq": 0} for sid in o.continued_sessions
            ]
        return params

    def steps(self) -> Iterator[Planned]:
        """Everything after ``open``/``opened``, in send order (times never decrease)."""
        wire, o = self.wire, self.options
        frame_s = o.frame_ms / 1000
        samples_per_frame = RATE * o.frame_ms // 1000

        def frame_of(t: float) -> int:
            return round(t / frame_s)

        pauses = [(frame_of(a), frame_of(b)) for a, b in o.pauses]
        discards = [(frame_of(a), frame_of(b)) for a, b in o.discards]
        next_ping = o.ping_interval_s
        position = 0.0
        paused_since: int | None = None
        discarding_since: int | None = None
        for i, frame in enumerate(wire.frames):
            at = i * frame_s
            while at >= next_ping:
                yield Planned(next_ping, "message", "ping", {"rtt": "PT0.01S"}, b"", position)
                next_ping += o.ping_interval_s
            in_pause = any(a <= i < b for a, b in pauses)
            in_discard = any(a <= i < b for a, b in discards)
            if paused_since is not None and not in_pause:
                lost = (i - paused_since) * frame_s
                position += lost
                params = {"start": format_duration(paused_since * frame_s)}
                params["discarded"] = format_duration(lost)
                yield Planned(at, "message", "resumed", params, b"", position)
                paused_since = None
            if discarding_since is not None and not in_discard:
                lost = (i - discarding_since) * frame_s
                position += lost
                params = {"start": format_duration(discarding_since * frame_s)}
                params["discarded"] = format_duration(lost)
                yield Planned(at, "message", "discarded", params, b"", position)
                discarding_since = None
            if in_pause:
                if paused_since is None:
                    paused_since = i
                    yield Planned(at, "message", "paused", {}, b"", position)
                continue
            if in_discard:
                if discarding_since is None:
                    discarding_since = i
                continue
            n = min(samples_per_frame, wire.samples - i * samples_per_frame)
            position += n / RATE
            yield Planned(at + n / RATE, "audio", "", {}, frame, position)
        end = wire.duration_s
        yield Planned(end, "message", "close", {"reason": o.close_reason}, b"", position)


@dataclass(frozen=True, slots=True)
class AudioHookResult:
    """How one simulated session went.

    ``completed``: everything was sent, the server answered ``close`` with ``closed`` and the
    socket closed normally. ``disconnect``: the server's ``disconnect`` reason (and ``info``),
    if it sent one. ``transcripts``: the ``transcript`` entities received in ``event`` messages.
    """

    session_id: str
    conversation_id: str
    completed: bool
    frames_sent: int
    audio_ms: float
    elapsed_s: float
    close_code: int | None
    close_reason: str
    rejected_status: int | None
    disconnect: str | None = None
    disconnect_info: str | None = None
    transcripts: tuple[dict[str, Any], ...] = ()
    error: str | None = None


def upgrade_headers(
    url: str, script: AudioHookScript, *, now: float | None = None
) -> dict[str, str]:
    """The upgrade headers Genesys sends for ``script`` (signed when a client secret is set)."""
    o = script.options
    headers = {
        ORGANIZATION_HEADER: o.organization_id,
        SESSION_HEADER: script.session_id,
        CORRELATION_HEADER: script.correlation_id,
    }
    if o.api_key:
        headers["X-API-KEY"] = o.api_key
    if o.api_key and o.client_secret:
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        created = int(time.time() if now is None else now)
        headers.update(
            sign_headers(
                request_target=target,
                authority=parts.netloc,
                headers=headers,
                api_key=o.api_key,
                secret_b64=o.client_secret,
                nonce=base64.urlsafe_b64encode(secrets.token_bytes(24)).decode().rstrip("="),
                created=created,
                expires=created + 10,
            )
        )
    return headers


# -- the asyncio shell -------------------------------------------------------------------------


class _Client:
    """Client-side seq bookkeeping and what the server said."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.seq = 0
        self.serverseq = 0
        self.position_s = 0.0
        self.transcripts: list[dict[str, Any]] = []
        self.disconnect: str | None = None
        self.disconnect_info: str | None = None

    def message(self, type_: str, parameters: dict[str, Any]) -> str:
        self.seq += 1
        return json.dumps(
            {
                "version": "2",
                "id": self.session_id,
                "type": type_,
                "seq": self.seq,
                "serverseq": self.serverseq,
                "position": format_duration(self.position_s),
                "parameters": parameters,
            },
            separators=(",", ":"),
        )


async def prepare_audiohook_audio(
    audio: Path | CallAudio | AudioHookWire, options: AudioHookOptions
) -> AudioHookWire:
    """``audio`` as frames for ``options`` (file read and encoding in a worker thread)."""
    import asyncio

    if isinstance(audio, AudioHookWire):
        return audio
    decoded = await load_call_audio(audio) if isinstance(audio, Path) else audio
    return await asyncio.to_thread(
        AudioHookWire.from_audio, decoded, options.format, options.frame_ms
    )


async def simulate_audiohook(
    url: str,
    audio: Path | CallAudio | AudioHookWire,
    options: AudioHookOptions | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
) -> AudioHookResult:
    """Play one AudioHook session into ``url``. Never raises for what the server does."""
    import asyncio

    import aiohttp

    opts = options if options is not None else AudioHookOptions()
    wire = await prepare_audiohook_audio(audio, opts)
    script = AudioHookScript(wire, opts)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    client = _Client(script.session_id)
    frames = 0
    audio_s = 0.0

    def result(
        completed: bool, code: int | None, reason: str, status: int | None = None, error: str = ""
    ) -> AudioHookResult:
        return AudioHookResult(
            session_id=script.session_id,
            conversation_id=script.conversation_id,
            completed=completed,
            frames_sent=frames,
            audio_ms=audio_s * 1000,
            elapsed_s=loop.time() - t0,
            close_code=code,
            close_reason=reason,
            rejected_status=status,
            disconnect=client.disconnect,
            disconnect_info=client.disconnect_info,
            transcripts=tuple(client.transcripts),
            error=error or None,
        )

    own = session is None
    s = session or aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    )
    try:
        try:
            # encoded=True: the request target goes out byte for byte as it was signed (yarl
            # would otherwise normalize it, e.g. decode %2F in the query).
            ws = await s.ws_connect(
                URL(url, encoded=True), headers=upgrade_headers(url, script), autoping=True
            )
        except aiohttp.WSServerHandshakeError as exc:
            return result(False, None, exc.message, exc.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return result(False, None, "", None, f"cannot connect: {exc or type(exc).__name__}")
        opened = asyncio.Event()
        closed = asyncio.Event()
        gone = asyncio.Event()

        async def read() -> tuple[int, str] | None:
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    client.serverseq = data.get("seq", client.serverseq)
                    kind = data.get("type")
                    params = data.get("parameters") or {}
                    if kind == "opened":
                        opened.set()
                    elif kind == "closed":
                        closed.set()
                    elif kind == "event":
                        client.transcripts.extend(
                            e.get("data", {})
                            for e in params.get("entities", [])
                            if e.get("type") == "transcript"
                        )
                    elif kind == "disconnect":
                        client.disconnect = params.get("reason")
                        client.disconnect_info = params.get("info")
                        gone.set()
                        with_reason = client.message("close", {"reason": "disconnect"})
                        await ws.send_str(with_reason)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    gone.set()
                    return int(msg.data), str(msg.extra or "")
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    gone.set()
                    return None

        reader = asyncio.create_task(read())
        sent_all = False
        try:
            await ws.send_str(client.message("open", script.open_parameters()))
            await _first(reader, opened, gone, within_s=30)
            if opened.is_set():
                start = loop.time()
                sent_all = True
                for step in script.steps():
                    if opts.speed > 0:
                        delay = start + step.send_at_s / opts.speed - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    elif frames % 50 == 49:
                        await asyncio.sleep(0)
                    if gone.is_set() or ws.closed:
                        sent_all = False
                        break
                    try:
                        if step.kind == "audio":
                            await ws.send_bytes(step.audio)
                            frames += 1
                            audio_s = step.position_s
                        else:
                            await ws.send_str(client.message(step.type, step.parameters))
                        client.position_s = step.position_s
                    except (aiohttp.ClientConnectionError, ConnectionError):
                        sent_all = False
                        break
            if sent_all or gone.is_set():
                # Our close (or the close answering the server's disconnect) gets `closed`.
                await _first(reader, closed, within_s=opts.close_timeout_s)
            await ws.close()
            await asyncio.wait({reader}, timeout=5)
            server = reader.result() if reader.done() and not reader.cancelled() else None
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.wait({reader})
            if not ws.closed:
                await ws.close()
        code = ws.close_code
        reason = server[1] if server is not None and server[0] == code else ""
        completed = sent_all and closed.is_set() and client.disconnect is None
        return result(completed and code == 1000, code, reason)
    finally:
        if own:
            await s.close()


async def _first(reader: Any, *events: Any, within_s: float) -> None:
    """Wait until one of ``events`` is set or ``reader`` ends, at most ``within_s``."""
    import asyncio

    waiters = {asyncio.create_task(e.wait()) for e in events}
    try:
        await asyncio.wait(
            {*waiters, reader}, return_when=asyncio.FIRST_COMPLETED, timeout=within_s
        )
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.wait(waiters)


async def simulate_audiohook_calls(
    n: int,
    url: str,
    audio: Path | CallAudio | AudioHookWire,
    options: AudioHookOptions | None = None,
    *,
    stagger_s: float = 0.0,
) -> list[AudioHookResult]:
    """``n`` concurrent sessions of the same audio (fresh session ids), starts staggered."""
    opts = options if options is not None else AudioHookOptions()
    if n < 1:
        raise ValueError(f"need at least one call, got {n}")
    if n > 1 and opts.session_id:
        raise ValueError("session_id would repeat across calls: leave it None")
    wire = await prepare_audiohook_audio(audio, opts)

    return await play_concurrently(
        n, stagger_s, lambda session: simulate_audiohook(url, wire, opts, session=session)
    )
