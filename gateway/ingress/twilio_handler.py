"""MediaStreamHandler: the aiohttp WebSocket shell around :class:`TwilioDecoder`.

One handler per dialect path (Twilio, Telnyx, SignalWire). Per upgrade request:

1. Before the upgrade: refuse with HTTP 503 while draining or at capacity, 400 for a plain HTTP
   request, 403 for a missing or wrong ``X-Twilio-Signature`` (when an auth token is set), a
   wrong ``?token=`` shared secret, or an unsigned stream that the config does not allow.
2. After the upgrade: every text message goes through the decoder; the events go to the call
   (a new :class:`LiveCall`, or the one with the same call id if this stream continues it).
3. Bad input (anything the decoder rejects, a shared secret missing from ``start``, audio far
   beyond real time, a continuation that does not fit) closes this one WebSocket with a close
   code and ``reason: detail`` text, counts ``callgate_stream_errors{reason}`` and logs a
   warning line; the call keeps what it has and other calls never notice.
"""

from __future__ import annotations

import dataclasses
import hmac
import time

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.calls.call import CallError
from gateway.calls.live import LiveCall, StreamPlacement
from gateway.calls.registry import AdmissionRefused, CallRegistry
from gateway.config import MediaStreamSettings, Settings
from gateway.ingress.audio_batcher import AudioBatcher
from gateway.ingress.events import Audio, CallEnded, CallStarted, Dtmf, IngressEvent
from gateway.ingress.keepalive import StreamKeepalive
from gateway.ingress.twilio import Dialect, TwilioDecoder, TwilioProtocolError
from gateway.ingress.twilio_signature import SignedRequest, TwilioSignatureValidator
from gateway.ingress.ws_shell import (
    ControlRate,
    MediaCounter,
    RateGuard,
    SocketLink,
    StreamError,
    close_code,
    close_text,
    continue_call,
    feed_call,
    refuse_upgrade,
    start_call,
)
from gateway.media.clock import TimestampJump
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.stt.engines import EngineSet

log = get_logger("gateway.ingress")

_ENGINE_PARAMETER = "stt_engine"


class MediaStreamHandler:
    """aiohttp handler for one Media Streams dialect (see module docstring)."""

    def __init__(
        self,
        dialect: Dialect,
        conf: MediaStreamSettings,
        *,
        settings: Settings,
        registry: CallRegistry,
        engines: EngineSet,
        metrics: Metrics,
        keepalive: StreamKeepalive,
    ) -> None:
        self.dialect = dialect
        self.conf = conf
        self._settings = settings
        self._registry = registry
        self._engines = engines
        self._metrics = metrics
        self._keepalive = keepalive
        token = conf.auth_token.get_secret_value()
        self._validator = (
            TwilioSignatureValidator(
                token,
                public_url=settings.server.public_url,
                trust_forwarded=settings.server.trust_forwarded,
            )
            if token
            else None
        )
        self._secret = conf.shared_secret.get_secret_value()
        self._log = log.bind(source=dialect)

    # -- before the upgrade ----------------------------------------------------------------------

    def _refuse(self, request: web.Request, status: int, reason: str, detail: str) -> web.Response:
        return refuse_upgrade(
            self._metrics, self._log, self.dialect, request, status, reason, detail
        )

    def _authenticate(self, request: web.Request) -> tuple[str, str] | None:
        """(reason, detail) if the upgrade must be refused with 403, else None."""
        if self._validator is not None:
            failure = self._validator.check(
                SignedRequest(
                    scheme=request.scheme,
                    host=request.host,
                    path=request.path,
                    query_string=request.query_string,
                    headers=request.headers,
                    websocket=True,
                )
            )
            if failure is not None:
                return failure.value, "X-Twilio-Signature is missing or does not match"
        query_secret = request.query.get("token")
        if (
            self._secret
            and query_secret is not None
            and not hmac.compare_digest(query_secret.encode(), self._secret.encode())
        ):
            return "bad_secret", "the shared secret does not match"
        if self._validator is None and not self._secret and not self.conf.allow_unsigned:
            return (
                "unsigned_refused",
                f"no auth_token or shared_secret is configured for {self.dialect} and "
                "allow_unsigned is false",
            )
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The route handler: refuse (HTTP status) or run the stream until it closes."""
        ws = web.WebSocketResponse(
            # The decoder enforces the configured limit with a clear reason; aiohttp's own cap
            # only bounds memory for absurd frames.
            max_msg_size=max(4 * self.conf.max_message_bytes, 1 << 20),
            autoping=False,  # pings answered in the loop, pongs counted for the keepalive
            compress=False,
        )
        if not ws.can_prepare(request).ok:
            return self._refuse(request, 400, "not_websocket", "expected a WebSocket upgrade")
        try:
            self._registry.check_stream(self.dialect)
        except AdmissionRefused as exc:
            return self._refuse(request, 503, exc.reason, str(exc))
        refused = self._authenticate(request)
        if refused is not None:
            return self._refuse(request, 403, *refused)
        await ws.prepare(request)
        self._metrics.streams.labels(self.dialect).inc()
        stream = _Stream(
            self, ws, request, query_secret_ok=self._secret != "" and "token" in request.query
        )
        with self._keepalive.watching(stream.link, self.dialect):
            await stream.run()
        return ws

    # -- after the upgrade -----------------------------------------------------------------------

    def decoder(self) -> TwilioDecoder:
        c = self.conf
        return TwilioDecoder(
            self.dialect,
            roles={"inbound": c.inbound_role, "outbound": c.outbound_role},
            max_message_bytes=c.max_message_bytes,
            reorder_window_ms=c.reorder_window_ms,
            default_tracks=c.default_tracks,
            l16_byte_order=c.l16_byte_order,
        )


class _Stream:
    """One accepted WebSocket: decode, authorize at start, feed the call, close on bad input."""

    def __init__(
        self,
        handler: MediaStreamHandler,
        ws: web.WebSocketResponse,
        request: web.Request,
        *,
        query_secret_ok: bool,
    ) -> None:
        self.h = handler
        self.ws = ws
        self.link = SocketLink(ws, request.transport)
        self.decoder = handler.decoder()
        self.live: LiveCall | None = None
        self.placement: StreamPlacement | None = None
        self.query_secret_ok = query_secret_ok
        self.log = handler._log
        self.rate = RateGuard(handler._settings)
        self.control = ControlRate()
        # Counted here, added to the Prometheus counters in batches: two locked counter
        # increments per frame were a measurable share of the per-frame cost.
        self.counter = MediaCounter(handler._metrics, handler.dialect)
        self.batcher: AudioBatcher | None = None  # at start, when the codec is known

    async def run(self) -> None:
        detach_reason = "disconnected"
        link = self.link
        try:
            async for msg in self.ws:
                link.received += 1
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    try:
                        done = await self._message(msg.data)
                    except TwilioProtocolError as exc:
                        await self._fail(exc.reason, str(exc))
                        detach_reason = "stream_error"
                        break
                    except StreamError as exc:
                        await self._fail(exc.reason, str(exc))
                        detach_reason = "stream_error"
                        break
                    if done:
                        detach_reason = "stop"
                        await self.ws.close(code=WSCloseCode.OK, message=b"stop")
                        break
                elif msg.type is WSMsgType.PING:
                    await self.ws.pong(msg.data)
                elif msg.type is WSMsgType.ERROR:
                    await self._fail("transport_error", repr(self.ws.exception()))
                    detach_reason = "stream_error"
                    break
        finally:
            detach_reason = link.dropped or detach_reason
            await self._flush_held()
            self.counter.flush()
            if self.live is not None:
                self.live.detach(self.link, detach_reason)

    async def _flush_held(self) -> None:
        """The stream ends: frames still in the reorder buffer and the batch go to the call."""
        if self.live is None:
            return
        try:
            for event in self.decoder.flush():
                if type(event) is Audio:
                    await self._batched(event)
            await self._flush_batch()
        except (StreamError, CallError, TimestampJump):
            pass  # the stream is already closing; held frames of a broken stream are dropped

    async def _fail(self, reason: str, detail: str) -> None:
        h = self.h
        h._metrics.stream_errors.labels(h.dialect, reason).inc()
        self.log.warning(
            "stream.closed_bad_input",
            reason=reason,
            detail=detail[:200],
            call_id=self.live.call_id if self.live else None,
            stream_id=self.decoder.stream_id,
        )
        if not self.ws.closed:
            await self.ws.close(code=close_code(reason), message=close_text(reason, detail))

    async def _message(self, data: str | bytes) -> bool:
        """Handle one message; True once the stream has said stop."""
        for event in self.decoder.receive(data):
            if type(event) is Audio:  # the hot path: every 20 ms frame
                await self._batched(event)
            else:
                await self._flush_batch()  # audio before a DTMF or the stop lands first
                if await self._event(event):
                    return True
        return False

    async def _batched(self, event: Audio) -> None:
        """One frame from the decoder: counted, then on to the call in its block."""
        self.counter.add(len(event.payload))
        batcher = self.batcher
        if batcher is None:
            await self._audio(event)
            return
        for block in batcher.push(event):
            await self._audio(block)

    async def _flush_batch(self) -> None:
        if self.batcher is not None and self.live is not None:
            for block in self.batcher.flush():
                await self._audio(block)

    async def _event(self, event: IngressEvent) -> bool:
        """A non-audio event (audio goes through :meth:`_batched`); True at the stop."""
        if isinstance(event, CallStarted):
            await self._start(event)
            return False
        if isinstance(event, CallEnded):
            return True
        if isinstance(event, Dtmf) and self.live is not None and self.placement is not None:
            self.control.take()
            channel = self.placement.channel_map.get(event.channel, event.channel)
            await self._call_handle(Dtmf(channel, event.digit))
        return False

    async def _audio(self, event: Audio) -> None:
        live, placement = self.live, self.placement
        assert live is not None and placement is not None
        if placement.replaced:
            return  # a newer stream of this call took over its channels
        self.rate.check(self.decoder.timeline_ms)
        now = time.monotonic()
        if live.first_media_at is None:
            live.first_media_at = now
        if placement.continuation or placement.channel_map.get(event.channel) != event.channel:
            event = placement.place(event, lambda: live.continuation_base(now))
        await feed_call(live.call, event, self.link)

    async def _call_handle(self, event: IngressEvent) -> None:
        assert self.live is not None
        if not (self.placement and self.placement.replaced):
            await feed_call(self.live.call, event, self.link)

    async def _start(self, started: CallStarted) -> None:
        h = self.h
        self.rate.start()
        codec = self.decoder.codec
        if h.conf.batch_ms and codec is not None:
            self.batcher = AudioBatcher(
                h.conf.batch_ms, self.decoder.sample_rate, codec.sample_width
            )
        params = started.metadata
        secret_key = f"param.{h.conf.secret_parameter}"
        if h._secret and not self.query_secret_ok:
            given = params.get(secret_key)
            if given is None:
                raise StreamError(
                    "missing_secret",
                    f"start has no custom parameter {h.conf.secret_parameter!r} (shared secret)",
                )
            if not hmac.compare_digest(given.encode(), h._secret.encode()):
                raise StreamError("bad_secret", "the shared secret does not match")
        # The secret never reaches the call's metadata (stored, served by the API).
        metadata = {k: v for k, v in params.items() if k != secret_key}
        started = dataclasses.replace(started, metadata=metadata)
        key = started.source_ids.get("callSid") or started.source_ids.get("call_control_id")
        live = h._registry.find(h.dialect, key) if key else None
        if live is not None:
            self.placement = continue_call(live, started, self.link, h._metrics, h.dialect)
            self.live = live
            self.log.info(
                "stream.continues_call", call_id=live.call_id, stream_id=self.decoder.stream_id
            )
            return
        self.live, self.placement = await start_call(
            h._registry,
            h._engines,
            h._settings,
            started,
            self.link,
            source=h.dialect,
            key=key,
            grace_s=h.conf.redirect_grace_s,
            engine_name=metadata.get(f"param.{_ENGINE_PARAMETER}") or None,
        )
