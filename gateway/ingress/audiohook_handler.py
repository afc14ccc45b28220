"""AudioHookHandler: the aiohttp WebSocket shell around :class:`AudioHookSession`.

Per upgrade request:

1. Before the upgrade: HTTP 503 while draining or at capacity, 400 for a plain HTTP request.
   The API key and signature are checked here (:class:`AudioHookAuthenticator`) but, as the
   protocol prescribes, a failure is answered inside the WebSocket: after the client's ``open``
   the session gets ``disconnect{reason: "unauthorized"}``, never sooner than
   ``auth_failure_delay_s`` after the request arrived (the same delay whatever failed), and
   ``streams_rejected{source="audiohook", reason}`` counts it.
2. ``open`` starts a :class:`LiveCall` (or continues the one an earlier session of
   ``continuedSessions`` belongs to) and is answered with ``opened``; audio, gaps, pause and
   resume go to the call; ``ping`` gets ``pong`` at once.
3. ``close`` (reason ``end``): the call ends (its STT sessions Terminate and drain), then
   ``closed`` is sent. ``close`` with reason ``reconnect`` (or a dropped socket) leaves the call
   waiting ``reconnect_grace_s`` for the continuing session.
4. The gateway ending the call (drain, max duration) sends ``disconnect{reason: "completed"}``
   and waits up to ``close_timeout_s`` for the client's ``close``, answered with ``closed``.
5. A protocol error ends this session only: ``disconnect{reason: "error", info}``, the
   client's ``close`` answered with ``closed``, then a WebSocket close code and ``reason:
   detail`` text, ``stream_errors{source="audiohook", reason}`` and a warning line.

With ``send_transcripts`` the call's final turns (and partials with ``send_partials``) go back
to the client as ``event`` messages with ``transcript`` entities.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from gateway.calls.call import Call, CallOutput
from gateway.calls.live import LiveCall, StreamPlacement
from gateway.calls.registry import AdmissionRefused, CallRegistry
from gateway.config import AudioHookSettings, Settings
from gateway.ingress.audiohook import AudioHookProtocolError, AudioHookSession, SessionState
from gateway.ingress.audiohook_signature import (
    CORRELATION_HEADER,
    ORGANIZATION_HEADER,
    SESSION_HEADER,
    AudioHookAuthenticator,
    UpgradeRequest,
    parse_key_entries,
)
from gateway.ingress.events import Audio, CallEnded, CallStarted, Gap, IngressEvent
from gateway.ingress.ws_shell import (
    MediaCounter,
    RateGuard,
    StreamError,
    authorities,
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
from gateway.transcript.merger import TurnDelta
from gateway.transcript.model import TurnUpdate

log = get_logger("gateway.ingress")
SOURCE = "audiohook"
SESSIONS_KEY = "audiohook_sessions"


class AudioHookHandler:
    """aiohttp handler for the AudioHook endpoint (see module docstring)."""

    def __init__(
        self,
        conf: AudioHookSettings,
        *,
        settings: Settings,
        registry: CallRegistry,
        engines: EngineSet,
        metrics: Metrics,
    ) -> None:
        self.conf = conf
        self.settings = settings
        self.registry = registry
        self.engines = engines
        self.metrics = metrics
        self.authenticator = AudioHookAuthenticator(
            parse_key_entries(k.get_secret_value() for k in conf.api_keys),
            max_age_s=conf.max_signature_age_s,
            clock_skew_s=conf.clock_skew_s,
            min_nonce_length=conf.min_nonce_length,
            allow_unauthenticated=conf.allow_unauthenticated,
        )
        self.log = log.bind(source=SOURCE)

    def _refuse(self, request: web.Request, status: int, reason: str, detail: str) -> web.Response:
        return refuse_upgrade(self.metrics, self.log, SOURCE, request, status, reason, detail)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The route handler: refuse (HTTP status) or run the session until it closes."""
        arrived = asyncio.get_running_loop().time()
        ws = web.WebSocketResponse(
            max_msg_size=max(4 * self.conf.max_message_bytes, 1 << 20),
            autoping=True,
            heartbeat=self.settings.server.ws_heartbeat_s or None,
            compress=False,
        )
        if not ws.can_prepare(request).ok:
            return self._refuse(request, 400, "not_websocket", "expected a WebSocket upgrade")
        try:
            self.registry.check_stream(SOURCE)
        except AdmissionRefused as exc:
            return self._refuse(request, 503, exc.reason, str(exc))
        failure = self.authenticator.check(
            UpgradeRequest(
                # Raw, as Genesys signed it: path_qs decodes %2F, %3A, ... in the query.
                request_target=request.raw_path,
                authorities=authorities(request, self.settings),
                headers=request.headers,
            ),
            now=time.time(),
        )
        await ws.prepare(request)
        self.metrics.streams.labels(SOURCE).inc()
        session = AudioHookSession(
            session_id=(request.headers.get(SESSION_HEADER) or "").strip() or None,
            organization_id=(request.headers.get(ORGANIZATION_HEADER) or "").strip() or None,
            roles={"external": self.conf.external_role, "internal": self.conf.internal_role},
            formats=self.conf.formats,
            max_message_bytes=self.conf.max_message_bytes,
        )
        stream = _Session(
            self,
            ws,
            session,
            refused=None if failure is None else failure.value,
            arrived=arrived,
            correlation_id=(request.headers.get(CORRELATION_HEADER) or "").strip(),
        )
        await stream.run()
        return ws


class _Link:
    """The StreamLink a LiveCall uses to end this session (``disconnect``, then close)."""

    def __init__(self, stream: _Session) -> None:
        self.stream = stream
        self.closed_by_call: str | None = None

    async def close(self, code: int, reason: str) -> None:
        self.closed_by_call = reason
        await self.stream.server_disconnect("completed", reason, code)


class _Session:
    """One accepted AudioHook WebSocket."""

    def __init__(
        self,
        handler: AudioHookHandler,
        ws: web.WebSocketResponse,
        session: AudioHookSession,
        *,
        refused: str | None,
        arrived: float,
        correlation_id: str,
    ) -> None:
        self.h = handler
        self.conf = handler.conf
        self.ws = ws
        self.session = session
        self.refused = refused
        self.arrived = arrived
        self.correlation_id = correlation_id
        self.link = _Link(self)
        self.live: LiveCall | None = None
        self.placement: StreamPlacement | None = None
        # Call time at this session's position 0 (transcript offsets), once known.
        self.origin_ms: int | None = None
        self.counter = MediaCounter(handler.metrics, SOURCE)
        self.rate = RateGuard(handler.settings)
        self.log = handler.log
        self.client_closed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._transcripts: asyncio.Queue[TurnUpdate] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._listening = False

    # -- sending -----------------------------------------------------------------------------

    async def send(self, text: str | None) -> None:
        if text is None or self.ws.closed:
            return
        async with self._send_lock:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(text)

    async def _flush_outbox(self) -> None:
        for text in self.session.data_to_send():
            await self.send(text)

    # -- the receive loop --------------------------------------------------------------------

    async def run(self) -> None:
        detach_reason = "disconnected"
        try:
            detach_reason = await self._loop()
        finally:
            await self._stop_sender()
            self.counter.flush()
            if self.live is not None:
                self.live.detach(self.link, detach_reason)
            if not self.ws.closed:
                await self.ws.close(code=WSCloseCode.OK, message=b"closed")

    async def _receive(self) -> WSMessage | None:
        """The next message; None when the socket is gone or ``open`` did not come in time."""
        waiting_open = self.session.state is SessionState.PREPARING
        try:
            return await self.ws.receive(timeout=self.conf.open_timeout_s if waiting_open else None)
        except TimeoutError:
            await self._fail("open_timeout", "no open message", "error")
            return None

    async def _loop(self) -> str:
        """Handle messages until the session ends; returns the call's detach reason."""
        session = self.session
        while True:
            msg = await self._receive()
            if msg is None:
                return "stream_error"
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                try:
                    if msg.type is WSMsgType.TEXT:
                        events = session.receive_text(msg.data)
                    else:
                        events = session.receive_binary(msg.data)
                    await self._flush_outbox()
                    for event in events:
                        await self._event(event)
                except AudioHookProtocolError as exc:
                    await self._fail(exc.reason, str(exc), exc.disconnect_reason)
                    return "stream_error"
                except StreamError as exc:
                    await self._fail(exc.reason, str(exc), "error")
                    return "stream_error"
                if session.state is SessionState.CLOSING:
                    return await self._client_closed()
            elif msg.type is WSMsgType.ERROR:
                await self._fail("transport_error", repr(self.ws.exception()), "error")
                return "stream_error"
            else:  # CLOSE, CLOSING, CLOSED: the client went away
                return "disconnected" if session.close_reason != "reconnect" else "reconnect"

    async def _client_closed(self) -> str:
        """The client sent ``close``: end (or leave for reconnect) the call, send ``closed``."""
        reason = self.session.close_reason or "end"
        self.client_closed.set()
        live = self.live
        detach = "reconnect" if reason == "reconnect" else reason
        if live is not None and self.link.closed_by_call is None and reason != "reconnect":
            live.detach(self.link, reason)
            self.live = None  # detached here, not again in run()
            await live.end(reason)
            await self._drain_transcripts()
        await self.send(self.session.closed())
        await self._await_client_close()
        return detach

    async def _await_client_close(self) -> None:
        """After ``closed``: the client closes the socket; we close it after close_timeout_s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.conf.close_timeout_s):
                while not self.ws.closed:
                    msg = await self.ws.receive()
                    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                        break

    async def _wait_for_close_message(self) -> None:
        """After our ``disconnect``: read (and drop) until the client's ``close``, bounded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.conf.close_timeout_s):
                while not self.ws.closed:
                    msg = await self.ws.receive()
                    if msg.type is WSMsgType.TEXT:
                        with contextlib.suppress(AudioHookProtocolError):
                            self.session.receive_text(msg.data)
                        if self.session.state is SessionState.CLOSING:
                            self.client_closed.set()
                            await self.send(self.session.closed())
                            await self._await_client_close()
                            return
                    elif msg.type is not WSMsgType.BINARY:
                        return

    async def _fail(self, reason: str, detail: str, disconnect_reason: str) -> None:
        h = self.h
        if disconnect_reason == "unauthorized":
            # Same wait whatever failed, counted from the request: no timing oracle.
            due = self.arrived + self.conf.auth_failure_delay_s
            await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            h.metrics.streams_rejected.labels(SOURCE, reason).inc()
        else:
            h.metrics.stream_errors.labels(SOURCE, reason).inc()
        self.log.warning(
            "stream.closed_bad_input",
            reason=reason,
            detail=detail[:200],
            call_id=self.live.call_id if self.live else None,
            session_id=self.session.id,
        )
        await self.send(self.session.disconnect(disconnect_reason, detail if detail else reason))
        await self._wait_for_close_message()
        if not self.ws.closed:
            await self.ws.close(code=close_code(reason), message=close_text(reason, detail))

    async def server_disconnect(self, reason: str, info: str, code: int) -> None:
        """The gateway ends the session (drain, max duration): ``disconnect``, then close."""
        text = self.session.disconnect(reason, info)
        if text is not None:
            await self.send(text)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.conf.close_timeout_s):
                    await self.client_closed.wait()
        if not self.ws.closed:
            await self.ws.close(code=code, message=close_text(info, ""))

    # -- events ------------------------------------------------------------------------------

    async def _event(self, event: IngressEvent) -> None:
        if isinstance(event, Audio):
            await self._audio(event)
        elif isinstance(event, CallStarted):
            await self._start(event)
        elif isinstance(event, CallEnded):
            return  # handled by _client_closed once the message is processed
        elif isinstance(event, Gap):
            placement = self.placement
            assert placement is not None
            # A declared discard moves the timeline as audio does: it counts against real time
            # (a client claiming hours discarded in seconds is refused, not filled).
            self.rate.check(self.session.timeline_ms)
            channel = placement.channel_map.get(event.channel, event.channel)
            await self._call_handle(Gap(channel, event.duration_samples))
        else:
            await self._call_handle(event)

    async def _audio(self, event: Audio) -> None:
        live, placement = self.live, self.placement
        assert live is not None and placement is not None
        if placement.replaced:
            return  # a newer stream of this call took over its channels
        self.counter.add(len(event.payload))
        self.rate.check(self.session.timeline_ms)  # audio and discards
        now = time.monotonic()
        if live.first_media_at is None:
            live.first_media_at = now
        if placement.continuation or placement.channel_map.get(event.channel) != event.channel:
            event = placement.place(event, lambda: live.continuation_base(now))
        if self.origin_ms is None:
            self.origin_ms = live.stream_origin_ms(placement)
        await self._call_handle(event)

    async def _call_handle(self, event: IngressEvent) -> None:
        if self.live is not None and not (self.placement and self.placement.replaced):
            await feed_call(self.live.call, event, self.link)

    async def _start(self, started: CallStarted) -> None:
        h = self.h
        if self.refused is not None:
            raise AudioHookProtocolError(
                self.refused, "authentication failed", disconnect_reason="unauthorized"
            )
        session = self.session
        source_ids = dict(started.source_ids)
        if self.correlation_id:
            source_ids["correlationId"] = self.correlation_id
        metadata = dict(started.metadata)
        metadata[SESSIONS_KEY] = session.id or ""
        started = CallStarted(started.source, started.channels, source_ids, metadata)
        self.log.info(
            "audiohook.open",
            session_id=session.id,
            conversation_id=source_ids.get("conversationId"),
            format=metadata.get("format"),
            continues=len(session.continued_sessions),
        )
        self.log.debug("audiohook.participant", ani=metadata.get("ani"), dnis=metadata.get("dnis"))
        live = self._continued_call(session.continued_sessions, source_ids)
        if live is not None:
            self.placement = continue_call(live, started, self.link, h.metrics, SOURCE)
            self.live = live
            live.call.metadata[SESSIONS_KEY] += f",{session.id}"
            await fill_reconnect_gap(live, self.placement, self.link)
        else:
            live, self.placement = await start_call(
                h.registry,
                h.engines,
                h.settings,
                started,
                self.link,
                source=SOURCE,
                key=session.id,
                grace_s=self.conf.reconnect_grace_s,
            )
            self.live = live
        if self.conf.send_transcripts:
            self._listen(live.call)
        await self.send(session.accept())

    def _continued_call(self, ids: tuple[str, ...], source_ids: dict[str, str]) -> LiveCall | None:
        """The live call one of the sessions ``ids`` belonged to (None: a new call). Only a
        call of the same organization and conversation: session ids are no credential."""
        if not ids:
            return None
        wanted = set(ids)
        same = ("organizationId", "conversationId")
        for live in self.h.registry.active():
            if live.source != SOURCE or not live.accepting:
                continue
            sessions = set(live.call.metadata.get(SESSIONS_KEY, "").split(","))
            if not sessions & wanted:
                continue
            if all(live.call.source_ids.get(k) == source_ids.get(k) for k in same):
                return live
            self.log.warning(
                "audiohook.continuation_refused",
                session_id=self.session.id,
                reason="continuedSessions of another organization or conversation",
            )
            return None
        return None

    # -- transcripts back to the client ------------------------------------------------------

    def _listen(self, call: Call) -> None:
        queue: asyncio.Queue[TurnUpdate] = asyncio.Queue()
        self._transcripts = queue
        self._listening = True
        partials = self.conf.send_partials

        def on_output(_call: Call, output: CallOutput) -> None:
            if (
                self._listening
                and isinstance(output, TurnDelta)
                and (output.update.final or partials)
            ):
                queue.put_nowait(output.update)

        call.add_listener(on_output)
        self._sender = asyncio.create_task(self._send_transcripts(queue), name="audiohook-events")

    async def _send_transcripts(self, queue: asyncio.Queue[TurnUpdate]) -> None:
        language = None
        if self.session.started is not None:
            language = self.session.started.metadata.get("language")
        while True:
            update = await queue.get()
            try:
                origin = self._origin_ms()
                await self.send(
                    self.session.transcript_event(update, language=language, origin_ms=origin)
                )
            finally:
                queue.task_done()

    def _origin_ms(self) -> int:
        """Call time at this session's position 0 (later than 0 when it continues a call)."""
        if self.origin_ms is not None:
            return self.origin_ms
        if self.live is None or self.placement is None or not self.placement.continuation:
            return 0
        # Before its first audio a continuation starts where the call's audio ends now.
        return self.live.call.frontier_ms

    async def _drain_transcripts(self) -> None:
        if self._transcripts is not None and self._sender is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.conf.close_timeout_s):
                    await self._transcripts.join()

    async def _stop_sender(self) -> None:
        self._listening = False
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
