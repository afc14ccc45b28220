"""An AssemblyAI-Universal-Streaming-v3-compatible server around any of our speech engines.

``GET /v3/ws?<params>`` upgrades to the v3 protocol (``gateway/stt/v3_protocol.py`` holds the wire
format): ``Begin``, partial and final ``Turn``s with words, ``Termination``; ``Terminate``,
``ForceEndpoint``, ``UpdateConfiguration`` and ``KeepAlive`` from the client. Faithful to the
documented service where tests depend on it: auth by ``Authorization`` header or ``token`` query
(close 1008), the 50-1000 ms chunk rule and the faster-than-real-time rule (close 3007, each with an
``Error`` frame first), invalid client messages (3006), inactivity timeout, maximum session duration
(3008), a concurrency cap (3009), and messages over 128 KiB (1009).

Partials carry the whole running text of the turn with every word non-final (as the U3-Pro models
do): a Whisper-style recognizer revises earlier words, so it never promises them final early.

:class:`Fault` plans let tests break sessions on purpose: drop the TCP connection, close with a
code, stall, or send malformed JSON, after a given amount of audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import WSMsgType, web

from gateway.media.codec import Codec
from gateway.observability.logging import get_logger
from gateway.stt.session import SessionParams, SttEngine, SttError, SttSession
from gateway.stt.v3_protocol import (
    Begin,
    ClientMessageError,
    ErrorMessage,
    ForceEndpoint,
    KeepAlive,
    QueryError,
    RealtimeGuard,
    StreamingParams,
    Terminate,
    Termination,
    Turn,
    UpdateConfiguration,
    Word,
    chunk_violation,
    encode_server_message,
    parse_client_message,
)
from gateway.transcript.model import TurnUpdate

log = get_logger("gateway.stt.v3_server")

MAX_MESSAGE_BYTES = 128 * 1024
_PUNCT = re.compile(r"[^\w\s']")


@dataclass(frozen=True, slots=True)
class Fault:
    """Break one session on purpose, once ``after_ms`` of audio has arrived.

    ``drop``: the TCP connection is cut (the client sees 1006). ``close``: an ``Error`` frame (for
    codes >= 3000) then a close with ``code``/``reason``. ``stall``: the server stops reading,
    answering and sending for ``stall_s``. ``malformed``: a text frame that is not JSON.
    ``before_begin`` fires it before ``Begin`` (a session that fails to start).
    """

    kind: Literal["drop", "close", "stall", "malformed"]
    after_ms: int = 0
    code: int = 3005
    reason: str = "Session Cancelled: An error occurred"
    stall_s: float = 30.0
    before_begin: bool = False


@dataclass(slots=True)
class V3ServerOptions:
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_session_s: float = 10800.0
    realtime_allowance_s: float = 10.0
    max_sessions: int = 0  # 0: unlimited
    legacy_formatting: bool = False  # the June 2025 - March 2026 double final when formatting
    require_speech_model: bool = False
    faults: Sequence[Fault | None] = ()  # the n-th session gets faults[n]
    partials: bool = True


@dataclass(slots=True)
class _Stats:
    sessions: int = 0
    active: int = 0
    closes: dict[int, int] = field(default_factory=dict)
    audio_bytes: int = 0  # audio received, all sessions


class V3Server:
    """The v3 endpoint; mount :meth:`routes` into an aiohttp app, or use :func:`make_app`."""

    def __init__(self, engine: SttEngine, options: V3ServerOptions | None = None) -> None:
        self.engine = engine
        self.options = options or V3ServerOptions()
        self.stats = _Stats()
        self._handlers: set[asyncio.Task[object]] = set()

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v3/ws", self.handle)]

    async def close(self) -> None:
        """Cancel every open session (server shutdown)."""
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        index = self.stats.sessions
        self.stats.sessions += 1
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, autoping=True)
        await ws.prepare(request)
        try:
            await _Connection(self, request, ws, index).run()
        finally:
            self._handlers.discard(task)
            if not ws.closed:
                await ws.close()
            code = ws.close_code if ws.close_code is not None else 1006
            self.stats.closes[code] = self.stats.closes.get(code, 0) + 1
        return ws


class _Closed(Exception):
    """The connection is over (we closed it, or the client went away)."""


class _Connection:
    def __init__(
        self, server: V3Server, request: web.Request, ws: web.WebSocketResponse, index: int
    ) -> None:
        self.server = server
        self.options = server.options
        self.request = request
        self.ws = ws
        faults = self.options.faults
        self.fault = faults[index] if index < len(faults) else None
        self.session: SttSession | None = None
        self.params: StreamingParams | None = None
        self.audio_bytes = 0
        self.started = time.monotonic()
        self._forwarder: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._log = log.bind(session=index)

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._open()
            await self._loop()
        except _Closed:
            pass
        finally:
            await self._teardown()

    async def _open(self) -> None:
        opts = self.options
        query = self.request.query
        key = self.request.headers.get("Authorization") or query.get("token")
        if opts.api_keys:
            if not key:
                await self._fail(1008, "Unauthorized Connection: Missing Authorization header")
            if key not in opts.api_keys:
                await self._fail(1008, "Unauthorized Connection: Invalid API key")
        if opts.max_sessions and self.server.stats.active >= opts.max_sessions:
            await self._fail(3009, "Unauthorized Connection: Too many concurrent sessions")
        try:
            if opts.require_speech_model and "speech_model" not in query:
                raise QueryError("speech_model is required")
            self.params = StreamingParams.from_query(query)
        except QueryError as exc:
            await self._fail(3006, f"Invalid Query Parameter: {exc}")
        if self.fault is not None and self.fault.before_begin:
            await self._inject(self.fault)
        params = self.params
        assert params is not None
        codec = Codec.PCMU if params.encoding == "pcm_mulaw" else Codec.L16
        self.server.stats.active += 1
        self.session = self.server.engine.open_session(
            SessionParams(0, codec, params.sample_rate, 0, partials=self.options.partials)
        )
        self._forwarder = asyncio.create_task(self._forward(self.session))
        begin = Begin(
            id=str(uuid.uuid4()),
            expires_at=time.time() + opts.max_session_s,
            configuration={"model": params.speech_model, "api_version": "callgate"},
        )
        await self._send(encode_server_message(begin))

    async def _teardown(self) -> None:
        if self.session is not None:
            self.server.stats.active -= 1
            await self.session.aclose()
        if self._forwarder is not None:
            self._forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._forwarder

    # -- client -> server -----------------------------------------------------------------------

    async def _loop(self) -> None:
        params = self.params
        session = self.session
        assert params is not None and session is not None
        guard = RealtimeGuard(self.options.realtime_allowance_s)
        deadline = self.started + self.options.max_session_s
        idle = params.inactivity_timeout
        while True:
            timeout = deadline - time.monotonic()
            if idle is not None:
                timeout = min(timeout, float(idle))
            try:
                msg = await self.ws.receive(timeout=max(timeout, 0.001))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    await self._fail(3008, "Session Expired: Maximum session duration exceeded")
                await self._fail(3006, f"Inactivity timeout: no audio or messages for {idle} s")
            if msg.type == WSMsgType.BINARY:
                data: bytes = msg.data
                reason = chunk_violation(len(data), params)
                if reason is not None:
                    await self._fail(3007, reason)
                self.audio_bytes += len(data)
                self.server.stats.audio_bytes += len(data)
                audio_ms = params.ms_of(self.audio_bytes)
                reason = guard.on_audio(audio_ms, time.monotonic())
                if reason is not None:
                    await self._fail(3007, reason)
                await session.send(data)
                fault = self.fault
                if fault is not None and not fault.before_begin and audio_ms >= fault.after_ms:
                    self.fault = None
                    await self._inject(fault)
            elif msg.type == WSMsgType.TEXT:
                try:
                    message = parse_client_message(msg.data)
                except ClientMessageError as exc:
                    await self._fail(exc.code, exc.reason)
                if isinstance(message, Terminate):
                    await self._terminate()
                elif isinstance(message, ForceEndpoint):
                    force = getattr(session, "force_endpoint", None)
                    if force is not None:
                        await force()
                elif isinstance(message, UpdateConfiguration):
                    configure = getattr(session, "configure", None)
                    if configure is not None:
                        configure(message)
                elif isinstance(message, KeepAlive):
                    pass  # receiving it already reset the inactivity timer
            elif msg.type == WSMsgType.ERROR and self.ws.close_code == 1009:
                raise _Closed
            else:  # CLOSE, CLOSING, CLOSED, ERROR: the client went away
                raise _Closed

    async def _terminate(self) -> None:
        session = self.session
        assert session is not None and self._forwarder is not None and self.params is not None
        # The last recognition may take a while (a long final turn, a busy pool). Keep reading
        # meanwhile: aiohttp answers pings only inside receive(), and a client whose pings go
        # unanswered drops the connection and starts over.
        finishing = asyncio.ensure_future(self._finish_turns())
        try:
            while not finishing.done():
                receiving = asyncio.ensure_future(self.ws.receive())
                await asyncio.wait({finishing, receiving}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await receiving
                    break
                if receiving.result().type in (
                    WSMsgType.CLOSE,
                    WSMsgType.CLOSING,
                    WSMsgType.CLOSED,
                    WSMsgType.ERROR,
                ):
                    raise _Closed  # the client went away: nobody waits for the Termination
                # Anything else after Terminate is ignored.
            await finishing
        finally:
            if not finishing.done():
                finishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await finishing
        elapsed = time.monotonic() - self.started
        termination = Termination(
            audio_duration_seconds=round(self.params.ms_of(self.audio_bytes) / 1000),
            session_duration_seconds=round(elapsed),
        )
        await self._send(encode_server_message(termination))
        await self.ws.close(code=1000)
        raise _Closed

    async def _finish_turns(self) -> None:
        session = self.session
        assert session is not None and self._forwarder is not None
        await session.finish()
        with contextlib.suppress(asyncio.CancelledError):
            await self._forwarder  # every turn reaches the client before Termination

    # -- server -> client -----------------------------------------------------------------------

    async def _forward(self, session: SttSession) -> None:
        params = self.params
        assert params is not None
        async for event in session.events():
            if isinstance(event, TurnUpdate):
                for turn in turn_messages(
                    event, params.format_turns, self.options.legacy_formatting
                ):
                    await self._send(encode_server_message(turn))
            elif isinstance(event, SttError) and event.fatal:
                self._log.warning("v3.engine_error", reason=event.reason)
                with contextlib.suppress(_Closed):
                    await self._fail(3005, "Session Cancelled: An error occurred")
                return

    async def _send(self, text: str) -> None:
        async with self._send_lock:
            if self.ws.closed:
                raise _Closed
            try:
                await self.ws.send_str(text)
            except (ConnectionResetError, RuntimeError):
                raise _Closed from None

    async def _fail(self, code: int, reason: str) -> None:
        """Send the Error frame (new behaviour) and close with the same code; never returns."""
        self._log.info("v3.close", code=code, reason=reason)
        with contextlib.suppress(_Closed):
            await self._send(encode_server_message(ErrorMessage(code, reason)))
        # Close reasons are limited to 123 bytes by the WebSocket protocol.
        short = reason if len(reason.encode()) <= 123 else "See Error message for details"
        await self.ws.close(code=code, message=short.encode())
        raise _Closed

    async def _inject(self, fault: Fault) -> None:
        self._log.info("v3.fault", kind=fault.kind, after_ms=fault.after_ms)
        if fault.kind == "drop":
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise _Closed
        if fault.kind == "close":
            if fault.code >= 3000 or fault.code == 1008:
                with contextlib.suppress(_Closed):
                    await self._send(encode_server_message(ErrorMessage(fault.code, fault.reason)))
            await self.ws.close(code=fault.code, message=fault.reason.encode()[:123])
            raise _Closed
        if fault.kind == "stall":
            await asyncio.sleep(fault.stall_s)
            return
        await self._send('{"type": "Turn", "turn_order": ')  # malformed JSON


def turn_messages(u: TurnUpdate, format_turns: bool, legacy: bool) -> list[Turn]:
    """The v3 ``Turn`` frame(s) for one update, with words in session-relative ms."""

    def build(formatted: bool, *, eot: bool) -> Turn:
        def shape(text: str) -> str:
            return text if formatted else _PUNCT.sub("", text).lower()

        words = tuple(Word(shape(w.text), w.start, w.end, w.confidence, u.final) for w in u.words)
        text = shape(u.text).strip()
        return Turn(
            turn_order=u.turn_order,
            turn_is_formatted=formatted,
            end_of_turn=eot,
            transcript=text,
            end_of_turn_confidence=1.0 if eot else 0.0,
            words=words,
            utterance=text if eot else "",
        )

    if not u.final:
        return [build(format_turns and not legacy, eot=False)]
    if legacy and format_turns:
        return [build(False, eot=True), build(True, eot=True)]
    return [build(format_turns, eot=True)]


def make_app(server: V3Server) -> web.Application:
    """A standalone aiohttp app serving ``/v3/ws`` and ``/healthz`` for ``gateway stt-server``."""
    app = web.Application()
    app.add_routes(server.routes())

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "engine": server.engine.name})

    app.add_routes([web.get("/healthz", healthz)])

    async def lifecycle(_app: web.Application):  # type: ignore[no-untyped-def]
        await server.engine.start()
        yield
        await server.close()
        await server.engine.close()

    app.cleanup_ctx.append(lifecycle)
    return app
