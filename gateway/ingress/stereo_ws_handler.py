"""StereoWsHandler: the aiohttp WebSocket shell around :class:`StereoStreamDecoder`.

Per upgrade request:

1. Before the upgrade: HTTP 503 while draining or at capacity, 400 for a plain HTTP request,
   403 when credentials are configured and none matches (``Authorization: Basic`` with the
   configured username and password, the shared secret in ``secret_header`` or as ``?token=``)
   or when none are configured and ``allow_unsigned`` is false. The offered subprotocol
   (``audio.drachtio.org``, ``audio.jambonz.org``, ...) is echoed.
2. After the upgrade: frames go through the decoder and its events to a :class:`LiveCall`
   (a new one, or the one a stream with the same ``callSid`` left within
   ``reconnect_grace_s``). The socket closing ends the call (STT drained, transcript stored).
3. Bad input closes this one WebSocket with a close code and ``reason: detail`` text, counts
   ``stream_errors{source="stereo_ws", reason}`` and logs a warning; other calls never notice.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time

from aiohttp import WSMsgType, web

from gateway.calls.live import LiveCall, StreamPlacement
from gateway.calls.registry import AdmissionRefused, CallRegistry
from gateway.config import Settings, StereoWsSettings
from gateway.ingress.events import Audio, CallEnded, CallStarted, Dtmf, IngressEvent
from gateway.ingress.keepalive import StreamKeepalive
from gateway.ingress.stereo_ws import SOURCE, StereoStreamDecoder, StereoWsProtocolError
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
    fill_reconnect_gap,
    refuse_upgrade,
    start_call,
)
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.stt.engines import EngineSet

log = get_logger("gateway.ingress")


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class StereoWsHandler:
    """aiohttp handler for the stereo PCM WebSocket endpoint (see module docstring)."""

    def __init__(
        self,
        conf: StereoWsSettings,
        *,
        settings: Settings,
        registry: CallRegistry,
        engines: EngineSet,
        metrics: Metrics,
        keepalive: StreamKeepalive,
    ) -> None:
        self.conf = conf
        self.settings = settings
        self.registry = registry
        self.engines = engines
        self.metrics = metrics
        self.keepalive = keepalive
        self._password = conf.password.get_secret_value()
        self._secret = conf.shared_secret.get_secret_value()
        self.log = log.bind(source=SOURCE)

    def _refuse(self, request: web.Request, status: int, reason: str, detail: str) -> web.Response:
        return refuse_upgrade(self.metrics, self.log, SOURCE, request, status, reason, detail)

    def _authenticate(self, request: web.Request) -> tuple[str, str] | None:
        """(reason, detail) if the upgrade must be refused with 403, else None."""
        basic = bool(self.conf.username and self._password)
        if not basic and not self._secret:
            if self.conf.allow_unsigned:
                return None
            return (
                "unsigned_refused",
                "no credentials are configured for stereo_ws and allow_unsigned is false",
            )
        offered = False
        ok = False
        header = request.headers.get("Authorization", "")
        if basic and header[:6].lower() == "basic ":
            offered = True
            try:
                user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                user = password = ""
            ok |= _same(user, self.conf.username) & _same(password, self._password)
        if self._secret:
            for given in (
                request.headers.get(self.conf.secret_header),
                request.query.get("token"),
            ):
                if given is not None:
                    offered = True
                    ok |= _same(given, self._secret)
        if ok:
            return None
        if not offered:
            return "missing_credentials", "no basic auth or shared secret"
        return "bad_credentials", "the credentials do not match"

    def _subprotocol(self, request: web.Request) -> tuple[str, ...]:
        raw = request.headers.get("Sec-WebSocket-Protocol", "")
        offered = [p.strip() for p in raw.split(",") if p.strip()]
        for proto in offered:
            if proto in self.conf.subprotocols:
                return (proto,)
        if offered and self.conf.accept_any_subprotocol:
            return (offered[0],)
        return ()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The route handler: refuse (HTTP status) or run the stream until it closes."""
        ws = web.WebSocketResponse(
            max_msg_size=max(4 * self.conf.max_message_bytes, 1 << 20),
            autoping=False,  # pings answered in the loop, pongs counted for the keepalive
            compress=False,
            protocols=self._subprotocol(request),
        )
        if not ws.can_prepare(request).ok:
            return self._refuse(request, 400, "not_websocket", "expected a WebSocket upgrade")
        try:
            self.registry.check_stream(SOURCE)
        except AdmissionRefused as exc:
            return self._refuse(request, 503, exc.reason, str(exc))
        refused = self._authenticate(request)
        if refused is not None:
            return self._refuse(request, 403, *refused)
        await ws.prepare(request)
        self.metrics.streams.labels(SOURCE).inc()
        decoder = StereoStreamDecoder(
            sample_rate=self.conf.sample_rate,
            mix_type=self.conf.mix_type,
            roles={
                "left": self.conf.left_role,
                "right": self.conf.right_role,
                "mono": self.conf.mono_role,
            },
            query={k: v for k, v in request.query.items() if k != "token"},
            max_message_bytes=self.conf.max_message_bytes,
            batch_ms=self.conf.batch_ms,
        )
        stream = _Stream(self, ws, request, decoder)
        with self.keepalive.watching(stream.link, SOURCE):
            await stream.run()
        return ws


class _Stream:
    """One accepted WebSocket: decode, feed the call, close on bad input."""

    def __init__(
        self,
        handler: StereoWsHandler,
        ws: web.WebSocketResponse,
        request: web.Request,
        decoder: StereoStreamDecoder,
    ) -> None:
        self.h = handler
        self.ws = ws
        self.decoder = decoder
        self.link = SocketLink(ws, request.transport)
        self.live: LiveCall | None = None
        self.placement: StreamPlacement | None = None
        self.counter = MediaCounter(handler.metrics, SOURCE)
        self.rate = RateGuard(handler.settings)
        self.control = ControlRate()
        self.log = handler.log

    async def run(self) -> None:
        detach_reason = "hangup"
        link = self.link
        try:
            async for msg in self.ws:
                link.received += 1
                try:
                    if msg.type is WSMsgType.TEXT:
                        self.control.take()
                        events = self.decoder.receive_text(msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        self.counter.add(len(msg.data))
                        events = self.decoder.receive_binary(msg.data)
                        if self.live is not None:  # the hot path: one frame of a started call
                            self.rate.check(self.decoder.media_ms_received)
                            for event in events:
                                if type(event) is Audio:
                                    await self._audio(event)
                                else:
                                    await self._event(event)
                            continue
                    elif msg.type is WSMsgType.PING:
                        await self.ws.pong(msg.data)
                        continue
                    elif msg.type is WSMsgType.ERROR:
                        raise StreamError("transport_error", repr(self.ws.exception()))
                    else:
                        continue
                    for event in events:
                        await self._event(event)
                except (StereoWsProtocolError, StreamError) as exc:
                    await self._hand_on(self.decoder.flush())
                    await self._fail(exc.reason, str(exc))
                    detach_reason = "stream_error"
                    break
            else:
                # The batch's audio; CallEnded: the call ends when the stream detaches.
                await self._hand_on(self.decoder.close())
        finally:
            detach_reason = link.dropped or detach_reason
            self.counter.flush()
            if self.live is not None:
                self.live.detach(self.link, detach_reason)

    async def _hand_on(self, events: list[IngressEvent]) -> None:
        """The audio the decoder still held in its batch goes to the call before the stream
        ends; a call that refuses it (it ended, it failed) is left alone."""
        if self.live is None:
            return
        for event in events:
            if type(event) is Audio:
                try:
                    await self._audio(event)
                except StreamError:
                    return

    async def _fail(self, reason: str, detail: str) -> None:
        self.h.metrics.stream_errors.labels(SOURCE, reason).inc()
        self.log.warning(
            "stream.closed_bad_input",
            reason=reason,
            detail=detail[:200],
            call_id=self.live.call_id if self.live else None,
        )
        if not self.ws.closed:
            await self.ws.close(code=close_code(reason), message=close_text(reason, detail))

    async def _event(self, event: IngressEvent) -> None:
        if isinstance(event, Audio):
            await self._audio(event)
        elif isinstance(event, CallStarted):
            await self._start(event)
        elif isinstance(event, CallEnded):
            return  # the call ends when this stream detaches (after any reconnect grace)
        elif isinstance(event, Dtmf):
            if self.placement is not None:
                channel = self.placement.channel_map.get(event.channel, event.channel)
                await self._call_handle(Dtmf(channel, event.digit))
        else:
            await self._call_handle(event)

    async def _audio(self, event: Audio) -> None:
        """One channel's part of a frame (the caller checked the rate for the frame)."""
        live, placement = self.live, self.placement
        assert live is not None and placement is not None
        if placement.replaced:
            return  # a newer stream of this call took over its channels
        if live.first_media_at is None:
            live.first_media_at = time.monotonic()
        if placement.continuation or placement.channel_map.get(event.channel) != event.channel:
            now = time.monotonic()
            event = placement.place(event, lambda: live.continuation_base(now))
        await feed_call(live.call, event, self.link)

    async def _call_handle(self, event: IngressEvent) -> None:
        if self.live is not None and not (self.placement and self.placement.replaced):
            await feed_call(self.live.call, event, self.link)

    async def _start(self, started: CallStarted) -> None:
        h = self.h
        key = self.decoder.call_key
        self.log.info(
            "stereo_ws.start",
            channels=len(started.channels),
            sample_rate=started.channels[0].sample_rate,
            call_sid=key,
        )
        live = h.registry.find(SOURCE, key) if key else None
        if live is not None:
            self.placement = continue_call(live, started, self.link, h.metrics, SOURCE)
            self.live = live
            # No timestamps on this wire: the time the stream was gone is silence, or the new
            # audio would be placed right after the old.
            await fill_reconnect_gap(live, self.placement, self.link)
            return
        self.live, self.placement = await start_call(
            h.registry,
            h.engines,
            h.settings,
            started,
            self.link,
            source=SOURCE,
            key=key,
            grace_s=h.conf.reconnect_grace_s,
        )
