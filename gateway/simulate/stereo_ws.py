"""Stereo PCM WebSocket client simulator (FreeSWITCH mod_audio_fork / jambonz ``listen``).

A stereo WAV (channel 0 = left, the caller; channel 1 = right, the callee; a mono WAV with
``mix_type="mono"``) is sent as jambonz' ``listen`` verb does (reference notes, section 4.3):
the upgrade offers the subprotocol (``audio.jambonz.org``) with basic auth or a shared-secret
header; the first text frame is the call metadata (``sampleRate``, ``mixType``, ``callSid``,
``from``, ``to``, ...); then binary interleaved 16-bit little-endian PCM every ``frame_ms``,
``{"event": "dtmf", ...}`` text frames at the given times, and finally the socket closes (the
call hung up).

Layers as the other simulators: :class:`StereoWsScript` (sans-I/O plan) and the asyncio shell
(:func:`simulate_stereo_ws`, :func:`simulate_stereo_ws_calls`); ``asyncio``/``aiohttp`` are
imported inside the shell functions only.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from gateway.media.interleave import interleave
from gateway.simulate.twilio import CallAudio, load_call_audio, play_concurrently

if TYPE_CHECKING:
    import aiohttp

MixType = Literal["stereo", "mono"]


@dataclass(frozen=True, slots=True)
class StereoWsOptions:
    """How one simulated stream is sent. Construction raises ValueError."""

    sample_rate: int = 8000
    frame_ms: int = 20
    mix_type: MixType = "stereo"
    speed: float = 1.0
    subprotocol: str = "audio.jambonz.org"
    call_sid: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Extra fields of the first text frame (jambonz call attributes, user metadata)."""
    send_metadata: bool = True
    """False: no text frame first (mod_audio_fork without metadata): query/config decide."""
    username: str = ""
    password: str = ""
    secret: str = ""
    secret_header: str = "X-Callgate-Secret"
    dtmf: tuple[tuple[float, str], ...] = ()

    def __post_init__(self) -> None:
        if self.sample_rate not in (8000, 16000, 24000, 32000, 48000):
            raise ValueError(f"unsupported sample_rate {self.sample_rate}")
        if not 10 <= self.frame_ms <= 1000 or self.sample_rate * self.frame_ms % 1000:
            raise ValueError(f"frame_ms {self.frame_ms} is not whole samples")
        if not math.isfinite(self.speed) or self.speed < 0:
            raise ValueError(f"speed must be >= 0, got {self.speed}")
        if self.mix_type not in ("stereo", "mono"):
            raise ValueError("mix_type must be stereo or mono")


@dataclass(frozen=True, slots=True)
class StereoWire:
    """A call's audio as interleaved L16 frames (shared by concurrent streams)."""

    sample_rate: int
    frame_ms: int
    channels: int
    frames: tuple[bytes, ...]
    samples: int

    @classmethod
    def from_audio(cls, audio: CallAudio, options: StereoWsOptions) -> StereoWire:
        """Resample and interleave (CPU-bound: run it off the event loop)."""
        audio = audio.resampled(options.sample_rate)
        samples = audio.samples
        tracks = [audio.inbound]
        if options.mix_type == "stereo":
            tracks.append(audio.outbound if audio.outbound is not None else b"")
        padded = [pcm + b"\x00" * (2 * samples - len(pcm)) for pcm in tracks]
        whole = interleave(padded, 2)
        step = options.sample_rate * options.frame_ms // 1000 * 2 * len(padded)
        frames = tuple(whole[i : i + step] for i in range(0, len(whole), step))
        return cls(options.sample_rate, options.frame_ms, len(padded), frames, samples)

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate


class Step(NamedTuple):
    send_at_s: float
    data: str | bytes
    samples: int


class StereoWsScript:
    """The messages of one stream, in send order (see the module docstring)."""

    def __init__(self, wire: StereoWire, options: StereoWsOptions) -> None:
        self.wire = wire
        self.options = options
        self.call_sid = options.call_sid or secrets.token_hex(16)

    def metadata_message(self) -> str:
        o = self.options
        meta: dict[str, Any] = {
            "sampleRate": self.wire.sample_rate,
            "mixType": o.mix_type,
            "callSid": self.call_sid,
            "direction": "inbound",
            "from": "+15555551234",
            "to": "+18005556789",
            "callStatus": "in-progress",
        }
        meta.update(o.metadata)
        return json.dumps(meta, separators=(",", ":"))

    def steps(self) -> Iterator[Step]:
        wire, o = self.wire, self.options
        if o.send_metadata:
            yield Step(0.0, self.metadata_message(), 0)
        frame_samples = wire.sample_rate * wire.frame_ms // 1000
        dtmf = sorted(o.dtmf)
        for i, frame in enumerate(wire.frames):
            start = i * frame_samples
            n = min(frame_samples, wire.samples - start)
            at = (start + n) / wire.sample_rate
            while dtmf and dtmf[0][0] <= at:
                when, digit = dtmf.pop(0)
                text = json.dumps({"event": "dtmf", "dtmf": digit, "duration": 250})
                yield Step(when, text, 0)
            yield Step(at, frame, n)


@dataclass(frozen=True, slots=True)
class StereoWsResult:
    """How one simulated stream went (``completed``: all sent, then a normal close)."""

    call_sid: str
    completed: bool
    frames_sent: int
    audio_ms: float
    elapsed_s: float
    close_code: int | None
    close_reason: str
    rejected_status: int | None
    subprotocol: str | None = None
    error: str | None = None


def upgrade_headers(options: StereoWsOptions) -> dict[str, str]:
    """Basic auth and/or the shared-secret header, as configured in ``options``."""
    headers: dict[str, str] = {}
    if options.username:
        token = base64.b64encode(f"{options.username}:{options.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    if options.secret:
        headers[options.secret_header] = options.secret
    return headers


async def prepare_stereo_audio(
    audio: Path | CallAudio | StereoWire, options: StereoWsOptions
) -> StereoWire:
    import asyncio

    if isinstance(audio, StereoWire):
        return audio
    decoded = await load_call_audio(audio) if isinstance(audio, Path) else audio
    return await asyncio.to_thread(StereoWire.from_audio, decoded, options)


async def simulate_stereo_ws(
    url: str,
    audio: Path | CallAudio | StereoWire,
    options: StereoWsOptions | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
) -> StereoWsResult:
    """Play one stream into ``url``. Never raises for what the server does."""
    import asyncio

    import aiohttp

    opts = options if options is not None else StereoWsOptions()
    wire = await prepare_stereo_audio(audio, opts)
    script = StereoWsScript(wire, opts)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    frames = 0
    samples = 0

    def result(
        completed: bool,
        code: int | None,
        reason: str,
        status: int | None = None,
        proto: str | None = None,
        error: str = "",
    ) -> StereoWsResult:
        return StereoWsResult(
            call_sid=script.call_sid,
            completed=completed,
            frames_sent=frames,
            audio_ms=samples * 1000 / wire.sample_rate,
            elapsed_s=loop.time() - t0,
            close_code=code,
            close_reason=reason,
            rejected_status=status,
            subprotocol=proto,
            error=error or None,
        )

    own = session is None
    s = session or aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    )
    try:
        try:
            ws = await s.ws_connect(
                url,
                headers=upgrade_headers(opts),
                protocols=(opts.subprotocol,) if opts.subprotocol else (),
                autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            return result(False, None, exc.message, exc.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return result(False, None, "", None, None, f"cannot connect: {exc}")
        server_close: tuple[int, str] | None = None

        async def read() -> None:
            nonlocal server_close
            while True:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    server_close = (int(msg.data), str(msg.extra or ""))
                    return
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

        reader = asyncio.create_task(read())
        sent_all = True
        try:
            start = loop.time()
            for i, step in enumerate(script.steps()):
                if opts.speed > 0:
                    delay = start + step.send_at_s / opts.speed - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                elif i % 50 == 49:
                    await asyncio.sleep(0)
                if reader.done() or ws.closed:
                    sent_all = False
                    break
                try:
                    if isinstance(step.data, str):
                        await ws.send_str(step.data)
                    else:
                        await ws.send_bytes(step.data)
                        frames += 1
                        samples += step.samples
                except (aiohttp.ClientConnectionError, ConnectionError):
                    sent_all = False
                    break
            if not sent_all:
                await asyncio.wait({reader}, timeout=10)
            await ws.close()
            await asyncio.wait({reader}, timeout=10)
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.wait({reader})
        code = ws.close_code
        reason = server_close[1] if server_close is not None and server_close[0] == code else ""
        return result(sent_all and code == 1000, code, reason, None, ws.protocol)
    finally:
        if own:
            await s.close()


async def simulate_stereo_ws_calls(
    n: int,
    url: str,
    audio: Path | CallAudio | StereoWire,
    options: StereoWsOptions | None = None,
    *,
    stagger_s: float = 0.0,
) -> list[StereoWsResult]:
    """``n`` concurrent streams of the same audio (fresh call ids), starts staggered."""
    opts = options if options is not None else StereoWsOptions()
    if n < 1:
        raise ValueError(f"need at least one call, got {n}")
    if n > 1 and opts.call_sid:
        raise ValueError("call_sid would repeat across calls: leave it None")
    wire = await prepare_stereo_audio(audio, opts)
    return await play_concurrently(
        n, stagger_s, lambda session: simulate_stereo_ws(url, wire, opts, session=session)
    )
