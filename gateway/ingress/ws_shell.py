"""Pieces the thin aiohttp WebSocket shells of the Twilio, AudioHook and stereo PCM ingresses share.

The same rules for every WebSocket ingress (Twilio and its cousins, AudioHook, stereo PCM): a
refusal before the upgrade is an HTTP status plus ``streams_rejected{source, reason}`` and one
warning line without headers or query string (they may carry secrets); a stream error is a
close code plus ``reason: detail`` text, ``stream_errors{source, reason}`` and one warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

from aiohttp import WSCloseCode, web
from structlog.typing import FilteringBoundLogger

from gateway.calls.call import Call, CallError, CallOptions
from gateway.calls.live import ContinuationError, LiveCall, StreamLink, StreamPlacement
from gateway.calls.registry import AdmissionRefused, CallRegistry
from gateway.config import Settings
from gateway.ingress.events import Audio, CallStarted, Gap, IngressEvent
from gateway.media.clock import TimestampJump
from gateway.observability.metrics import Metrics
from gateway.stt.engines import EngineSet

# Close codes for stream errors: 1009 for size, 1003 for data we cannot take, 1008 otherwise.
CLOSE_CODES = {
    "message_too_large": WSCloseCode.MESSAGE_TOO_BIG,
    "unsupported_format": WSCloseCode.UNSUPPORTED_DATA,
    "unsupported_codec": WSCloseCode.UNSUPPORTED_DATA,
    "format_changed": WSCloseCode.UNSUPPORTED_DATA,
    # No room for a new call now (a stream let through because another call waited for its
    # continuation): 1013 Try Again Later, as a 503 would have said before the upgrade.
    "at_capacity": WSCloseCode.TRY_AGAIN_LATER,
    "draining": WSCloseCode.TRY_AGAIN_LATER,
}


class StreamError(Exception):
    """This stream must close: ``reason`` is the metric token, the message the detail."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def close_code(reason: str) -> int:
    return int(CLOSE_CODES.get(reason, WSCloseCode.POLICY_VIOLATION))


def close_text(reason: str, detail: str) -> bytes:
    """``reason: detail`` cut to the 123 bytes a close frame can carry."""
    text = f"{reason}: {detail}" if detail else reason
    return text.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")


class SocketLink:
    """The StreamLink a LiveCall uses to close a stream's WebSocket (max duration, drain), and
    the stream a :class:`~gateway.ingress.keepalive.StreamKeepalive` watches."""

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        self.ws = ws
        self.closed_by_call: str | None = None
        self.received = 0  # messages, pings and pongs included: the handler's loop counts them
        self.dropped: str | None = None  # the keepalive gave up on the peer
        self._transport = transport

    async def ping(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.ping()

    def drop(self, reason: str) -> None:
        """Abort the connection (no close handshake: the peer is gone)."""
        self.dropped = reason
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()

    async def close(self, code: int, reason: str) -> None:
        self.closed_by_call = reason
        await self.ws.close(code=code, message=close_text(reason, ""))


class _ClosedByCall(Protocol):
    closed_by_call: str | None  # set when the call itself closed the stream (shutdown, limit)


async def feed_call(call: Call, event: IngressEvent, link: _ClosedByCall) -> None:
    """``call.handle(event)``, with the call's refusals raised as :class:`StreamError`
    (``bad_timestamp``, ``call_error``); none once the call itself closed the stream."""
    try:
        if type(event) is Audio:  # nearly every event: skip the dispatch
            await call.audio(event)
        else:
            await call.handle(event)
    except TimestampJump as exc:
        raise StreamError("bad_timestamp", str(exc)) from None
    except CallError as exc:
        if link.closed_by_call is None:
            raise StreamError("call_error", str(exc)) from None


async def fill_reconnect_gap(
    live: LiveCall, placement: StreamPlacement, link: _ClosedByCall
) -> None:
    """Audio lost while a stream reconnected becomes silence on the channels it continues
    (wall clock since the call's first media), for sources without media timestamps."""
    if live.first_media_at is None:
        return
    elapsed_ms = int((time.monotonic() - live.first_media_at) * 1000)
    missing_ms = elapsed_ms - live.call.frontier_ms
    if missing_ms <= 0:
        return
    for channel in placement.channel_map.values():
        spec = live.call.channels[channel].spec
        await feed_call(live.call, Gap(channel, missing_ms * spec.sample_rate // 1000), link)


def continue_call(
    live: LiveCall, started: CallStarted, link: StreamLink, metrics: Metrics, source: str
) -> StreamPlacement:
    """Attach a stream that continues ``live`` (a redirect, a reconnect) and count it; a
    stream that cannot continue it raises :class:`StreamError`."""
    try:
        placement = live.continue_with(started, link)
    except ContinuationError as exc:
        raise StreamError(exc.reason, str(exc)) from None
    metrics.stream_continuations.labels(source).inc()
    return placement


async def start_call(
    registry: CallRegistry,
    engines: EngineSet,
    settings: Settings,
    started: CallStarted,
    link: StreamLink,
    *,
    source: str,
    key: str | None,
    grace_s: float,
    engine_name: str | None = None,
) -> tuple[LiveCall, StreamPlacement]:
    """Admit a new call for the stream's ``started`` and start it; refusals (unknown engine,
    admission, a start the Call rejects) raise :class:`StreamError`. A call that was created
    but could not start is detached here, so it ends like any call whose stream went away."""
    try:
        engine = await engines.get(engine_name)
    except ValueError as exc:
        raise StreamError("unknown_engine", str(exc)) from None
    try:
        live = registry.create(
            engine,
            call_options(settings),
            source=source,
            key=key,
            grace_s=grace_s,
            max_call_s=settings.calls.max_call_s,
        )
    except AdmissionRefused as exc:
        raise StreamError(exc.reason, str(exc)) from None
    try:
        placement = await live.start(started, link)
    except CallError as exc:
        live.detach(link, "stream_error")
        raise StreamError("bad_start", str(exc)) from None
    return live, placement


def refuse_upgrade(
    metrics: Metrics,
    logger: FilteringBoundLogger,
    source: str,
    request: web.Request,
    status: int,
    reason: str,
    detail: str,
) -> web.Response:
    """Answer an upgrade request with ``status`` and ``reason: detail`` before any WebSocket:
    counted in ``callgate_streams_rejected{source, reason}`` and logged as one warning line
    without headers or query string (they may carry secrets)."""
    metrics.streams_rejected.labels(source, reason).inc()
    logger.warning(
        "stream.refused", reason=reason, status=status, path=request.path, remote=request.remote
    )
    return web.Response(status=status, text=f"{reason}: {detail}\n")


def call_options(settings: Settings) -> CallOptions:
    """The per-call options every live ingress uses (as the Twilio shell's)."""
    return CallOptions(
        default_roles=settings.calls.default_roles,
        join_same_speaker=settings.transcript.join_same_speaker,
        max_join_gap_ms=settings.transcript.max_join_gap_ms,
        partials=True,
        max_channels=settings.calls.max_channels,
        max_timestamp_jump_s=settings.calls.max_timestamp_jump_s,
        log_transcripts=settings.logging.log_transcripts,
    )


def authorities(request: web.Request, settings: Settings) -> tuple[str, ...]:
    """Hosts the client may have addressed: Host, X-Forwarded-Host (trusted), public URL."""
    out = [request.host]
    if settings.server.trust_forwarded:
        fwd = (request.headers.get("X-Forwarded-Host") or "").split(",")[0].strip()
        if fwd:
            out.append(fwd)
    public = settings.server.public_url
    if public:
        out.append(public.split("://", 1)[1].rstrip("/"))
    return tuple(dict.fromkeys(h.lower() for h in out if h))


class RateGuard:
    """Refuses audio arriving far faster than real time (``calls.max_speed`` plus burst)."""

    def __init__(self, settings: Settings) -> None:
        self.max_speed = settings.calls.max_speed
        self.burst_ms = settings.calls.burst_s * 1000
        self.started_at: float | None = None

    def start(self) -> None:
        """Start the allowance now (else it starts at the first :meth:`check`)."""
        self.started_at = time.monotonic()

    def check(self, media_ms: float) -> None:
        """Raise StreamError(rate_exceeded) when ``media_ms`` is beyond what time allows."""
        now = time.monotonic()
        if self.started_at is None:
            self.started_at = now
        elapsed_ms = (now - self.started_at) * 1000
        if media_ms > self.burst_ms + self.max_speed * elapsed_ms:
            raise StreamError(
                "rate_exceeded",
                f"{media_ms / 1000:.1f} s of audio in {elapsed_ms / 1000:.1f} s (limit "
                f"{self.max_speed}x real time + {self.burst_ms / 1000:.0f} s)",
            )


class ControlRate:
    """Refuses control messages (metadata, DTMF) beyond ``per_s`` a second with a burst of
    ``burst``: each becomes an event that is published and stored, so a flood is a load on
    every subscriber and the store, not just on this stream."""

    def __init__(self, per_s: float = 10.0, burst: int = 50) -> None:
        self.per_s = per_s
        self.burst = burst
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self) -> None:
        """Count one message; raise StreamError(rate_exceeded) past the allowance."""
        now = time.monotonic()
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if self._tokens < 1:
            raise StreamError(
                "rate_exceeded",
                f"control messages beyond {self.per_s:g} a second (burst {self.burst})",
            )
        self._tokens -= 1


class MediaCounter:
    """Frames and bytes, added to the labelled Prometheus counters in batches."""

    def __init__(self, metrics: Metrics, source: str) -> None:
        self._frames = metrics.media_frames.labels(source)
        self._bytes = metrics.media_bytes.labels(source)
        self.frames = self.bytes = self._frames_counted = self._bytes_counted = 0

    def add(self, nbytes: int) -> None:
        self.frames += 1
        self.bytes += nbytes
        if self.frames - self._frames_counted >= 50:
            self.flush()

    def flush(self) -> None:
        self._frames.inc(self.frames - self._frames_counted)
        self._bytes.inc(self.bytes - self._bytes_counted)
        self._frames_counted, self._bytes_counted = self.frames, self.bytes
