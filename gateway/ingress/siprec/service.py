"""SiprecService: the SIPREC Session Recording Server inside ``gateway serve`` (asyncio shell).

It owns the sans-I/O :class:`~gateway.ingress.siprec.dialog.SiprecServer`, the SIP listeners
(:class:`~gateway.ingress.siprec.transport.SipTransports`), the RTP sockets
(:class:`~gateway.ingress.siprec.rtp_ports.RtpPorts`), one timer handle for the core's
retransmissions, and one task per recorded call; and carries out what the core returns:

- ``Send``: written on the transport the request came in on.
- ``IncomingCall``: an owned admission task runs the admission hook (default: the registry's
  :meth:`~gateway.calls.registry.CallRegistry.check_admission`: 503 when draining or at
  capacity), then creates the :class:`~gateway.calls.live.LiveCall` exactly like the WebSocket
  ingresses (``source="siprec"``, the default engine, :func:`call_options`) and accepts (200) or
  rejects. A CANCEL that arrives while admission runs wins (487).
- ``MediaPlan``: the call's :class:`~gateway.ingress.siprec.rtp.CallMedia` (kept across re-INVITEs
  while its streams keep their codecs) and the RTP readers of its ports. A stream latches onto
  the address its first packet comes from (symmetric RTP); packets from elsewhere are dropped
  unless the latched source has been silent for ``RELATCH_S``.
- ``CallEvent``: into the call's queue, in order with its media events; the call's task applies
  them to :meth:`Call.handle <gateway.calls.call.Call.handle>` (``CallStarted`` through
  :meth:`LiveCall.start`); a ``Hold`` first flushes the jitter buffers. ``CallEnded`` (BYE, ACK
  timeout) flushes the media and detaches the call, which ends it (STT drained, stored).
- ``CallReleased``: the RTP sockets are closed (the core released the ports); ``Rejected``: one
  ``streams_rejected{source="siprec", reason}`` and one warning line; malformed SIP counts
  ``stream_errors{source="siprec", reason=<parse error kind>}``.

When the registry stops accepting (app drain), the core is put into drain on the next SIP
message: new INVITEs and OPTIONS get 503. :meth:`stop` (the app's cleanup) closes listeners,
cancels and awaits the admission and call tasks, and closes every RTP socket. The event loop is
never blocked: sockets are non-blocking, the TLS context is loaded in a thread.

Logs carry SIP Call-IDs, methods, statuses and peer IPs; participant AORs and From/To appear
only at debug level (they are phone numbers).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.calls.call import CallError
from gateway.calls.live import LiveCall
from gateway.calls.registry import AdmissionRefused, CallRegistry
from gateway.calls.tasks import TaskSet
from gateway.config import Settings, SiprecSettings
from gateway.ingress.audio_batcher import AudioBatcher
from gateway.ingress.events import Audio, CallEnded, CallStarted, Hold, IngressEvent
from gateway.ingress.siprec.auth import DigestAuth
from gateway.ingress.siprec.dialog import (
    Address,
    CallEvent,
    CallReleased,
    Cancelled,
    DialogState,
    IncomingCall,
    MediaPlan,
    Output,
    Rejected,
    Send,
    ServerConfig,
    SiprecServer,
)
from gateway.ingress.siprec.message import ParseError, ParseResult, SipRequest
from gateway.ingress.siprec.participants import RolePolicy
from gateway.ingress.siprec.rtp import CallMedia
from gateway.ingress.siprec.rtp_ports import RECV_BYTES, RtpPorts
from gateway.ingress.siprec.transport import SipTransports, tls_client_context, tls_context
from gateway.ingress.ws_shell import call_options
from gateway.media.clock import TimestampJump
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.stt.engines import EngineSet
from gateway.stt.session import SttEngine

__all__ = ["SIPREC", "AdmissionHook", "SiprecService"]

log = get_logger("gateway.siprec")

SOURCE = "siprec"
RELATCH_S = 1.0  # a stream's latched source silent this long: another source may take over
DELAY_SAMPLE = 5  # observe the packet-to-clock delay of every Nth block placed
COUNT_EVERY = 50  # add media frames/bytes to the counters every N packets

# (status, reason) to refuse an INVITE with, or None to accept it.
AdmissionHook = Callable[[IncomingCall], Awaitable[tuple[int, str] | None]]

# Rejected.reason texts of the core that are metric tokens as they are (after a space -> _).
_REASONS = {
    "not in allowlist": "not_in_allowlist",
    "bad credentials": "bad_credentials",
    "draining": "draining",
    "no media ports": "no_media_ports",
    "duplicate call-id": "duplicate_call_id",
    "unsupported extension": "bad_extension",
    "no SDP offer": "no_sdp",
    "no acceptable m-line": "not_acceptable",
    "unknown dialog": "unknown_dialog",
    "no transaction to cancel": "unknown_transaction",
    "method not allowed": "method_not_allowed",
    "at_capacity": "at_capacity",
}
_STATUS_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    413: "message_too_large",
    415: "unsupported_media_type",
    420: "bad_extension",
    481: "unknown_dialog",
    488: "not_acceptable",
    503: "unavailable",
    513: "message_too_large",
}


def reason_token(rejected: Rejected) -> str:
    """A bounded metric token for a refusal (the core's reason texts may carry details)."""
    token = _REASONS.get(rejected.reason)
    if token is not None:
        return token
    if rejected.reason.startswith("auth "):
        return "unauthorized"
    if rejected.status is None:
        return "dropped"
    return _STATUS_REASONS.get(rejected.status, f"status_{rejected.status}")


def _primary_address(host: str) -> str:
    """``host``, or for a wildcard the address of the default route (no packet is sent)."""
    if host not in ("", "0.0.0.0", "::"):
        return host
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    target = ("2001:db8::1", 9) if family == socket.AF_INET6 else ("192.0.2.1", 9)
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return str(probe.getsockname()[0])
    except OSError:
        return "::1" if family == socket.AF_INET6 else "127.0.0.1"


class _Link:
    """The StreamLink through which the LiveCall stops this call's media (shutdown, limits)."""

    def __init__(self, call: _SipCall) -> None:
        self.call = call

    async def close(self, code: int, reason: str) -> None:
        self.call.stop(reason)
        # Ended on our side (max duration, drain): tell the recording client with a BYE, so it
        # stops sending RTP (nothing happens when its own BYE ended the call).
        self.call.service.hang_up(self.call.sip_call_id, reason)


@dataclass(slots=True)
class _Stream:
    channel: int
    port: int
    latched: Address | None = None
    last_at: float = 0.0
    dropped: int = 0


class _SipCall:
    """One recorded call: its LiveCall, media, RTP streams and the queue its task applies."""

    def __init__(self, service: SiprecService, sip_call_id: str, live: LiveCall) -> None:
        self.service = service
        self.sip_call_id = sip_call_id
        self.live = live
        self.link = _Link(self)
        self.media: CallMedia | None = None
        self.streams: dict[int, _Stream] = {}  # by local port
        # Events to apply, with their arrival time; None ends the call (BYE, ACK timeout).
        self.queue: deque[tuple[IngressEvent | None, float]] = deque()
        self.end_reason = "bye"
        self.wake = asyncio.Event()
        self.stopped: str | None = None
        self.packets = self.bytes = self.packets_counted = self.bytes_counted = 0
        self.dropped_counted = Counter[str]()  # receivers' drop counters already in the metric
        # Each channel's consecutive packets go on to the call in siprec.batch_ms blocks.
        self.batchers: dict[int, AudioBatcher] = {}
        self.blocks_placed = 0
        self.last_audio_at = 0.0  # loop time of the last packet's arrival
        self.release_due = False
        # Audio events the queue may hold per RTP stream (siprec.max_backlog_s of 20 ms
        # packets); beyond it arriving packets are dropped (UDP has no backpressure).
        self.backlog_per_stream = max(1, round(service.settings.siprec.max_backlog_s * 50))
        self.backlog_dropped = 0
        self.task: asyncio.Task[None] | None = None

    # -- called on the loop by the service (synchronous) -----------------------------------------

    def push(self, item: IngressEvent | None, at: float) -> None:
        self.queue.append((item, at))
        self.wake.set()

    def stop(self, reason: str) -> None:
        """Stop taking media (the LiveCall is ending, or the call broke)."""
        if self.stopped is None:
            self.stopped = reason
            for port in list(self.streams):
                self.service.ports.unlisten(port)
            self.wake.set()

    def plan(self, plan: MediaPlan, conf: SiprecSettings) -> None:
        configs = {s.config.channel: s.config for s in plan.streams}
        if self.media is None:
            self.media = CallMedia(
                list(configs.values()),
                window_ms=conf.jitter_window_ms,
                max_delay_s=conf.jitter_max_delay_ms / 1000,
            )
        else:
            for channel, config in configs.items():
                receiver = self.media.receivers.get(channel)
                if receiver is None:
                    self.media.add(config)  # a leg added by a re-INVITE
                    log.info("siprec.stream_added", sip_call_id=self.sip_call_id, channel=channel)
                    continue
                if receiver.config == config:
                    continue
                receiver.reconfigure(config)  # the dialog keeps channel and clock rate
                log.info(
                    "siprec.stream_changed",
                    sip_call_id=self.sip_call_id,
                    channel=channel,
                    codec=config.codec.value,
                    payload_type=config.payload_type,
                )
        wanted = {s.local_port: s.config.channel for s in plan.streams}
        for port in [p for p in self.streams if p not in wanted]:
            self.service.ports.unlisten(port)
            del self.streams[port]
        if self.stopped is not None:
            return
        for port, channel in wanted.items():
            if channel not in self.media.receivers:
                continue
            stream = self.streams.get(port)
            if stream is None:
                stream = self.streams[port] = _Stream(channel, port)
                self.service.ports.listen(port, functools.partial(self.readable, stream))
            stream.latched = None  # a new offer may move the sender

    def readable(self, stream: _Stream, sock: socket.socket) -> None:
        """Read one datagram from a stream's socket; its events go to the queue.

        One per readiness callback: readiness is level-triggered, so the loop calls again while
        more wait, and trying for another costs a failing syscall and an exception per packet
        at real-time rates (bench/siprec_calls.py, paired: 4 % of the CPU per call)."""
        try:
            data, addr = sock.recvfrom(RECV_BYTES)
        except OSError:  # BlockingIOError (a spurious wakeup), ICMP errors
            return
        if self.media is not None and self.stopped is None:
            if self._take(stream, data, addr, self.service.loop.time()):
                self.wake.set()
            if self.packets - self.packets_counted >= COUNT_EVERY:
                self.count_media()

    def _take(self, stream: _Stream, data: bytes, source: Address, now: float) -> bool:
        """One datagram from ``source`` (the address as the socket reports it) through the
        call's media; whether it queued events."""
        media = self.media
        assert media is not None
        latched = stream.latched
        if latched is not None and latched != source and now - stream.last_at < RELATCH_S:
            stream.dropped += 1  # another sender while the latched one is alive
            return False
        queue = self.queue
        limit = self.backlog_per_stream * len(media.receivers)
        receiver = media.receivers[stream.channel]
        accepted = receiver.stats.accepted
        self.packets += 1
        self.bytes += len(data)
        got = False
        for event in media.receive(stream.channel, data, now):
            if len(queue) >= limit and type(event) is Audio:
                self._drop_backlog()
                continue
            queue.append((event, now))
            got = True
        if receiver.stats.accepted == accepted:
            return got  # forged, malformed or foreign: it must not capture the stream
        if stream.latched != source:
            # Latch (or move) only on a packet the receiver took: with SRTP, authentic.
            if stream.latched is not None:
                log.info("siprec.rtp_relatched", sip_call_id=self.sip_call_id)
            stream.latched = source
        stream.last_at = now
        return got

    def release_if_quiet(self, now: float, quiet_s: float) -> None:
        """No packet for ``quiet_s`` (silence suppression, a pause) while the batchers hold
        audio: have the task hand it on, so the tail of the speech does not wait for a next
        packet that may not come for seconds. Called again each sweep until it is done."""
        if (
            self.stopped is None
            and now - self.last_audio_at >= quiet_s
            and any(b.waiting for b in self.batchers.values())
        ):
            self.release_due = True
            self.wake.set()

    def _drop_backlog(self) -> None:
        if not self.backlog_dropped:
            # Once per call: recognition is slower than real time (an overloaded local engine).
            log.warning(
                "siprec.backlog_full",
                sip_call_id=self.sip_call_id,
                call_id=self.live.call_id,
                max_backlog_s=self.service.settings.siprec.max_backlog_s,
            )
        self.backlog_dropped += 1

    def count_media(self) -> None:
        metrics = self.service.metrics
        metrics.media_frames.labels(SOURCE).inc(self.packets - self.packets_counted)
        metrics.media_bytes.labels(SOURCE).inc(self.bytes - self.bytes_counted)
        self.packets_counted, self.bytes_counted = self.packets, self.bytes
        if self.media is None:
            return
        dropped = Counter[str]()
        for receiver in self.media.receivers.values():
            stats, jitter = receiver.stats, receiver.buffer.stats
            dropped["malformed"] += stats.malformed
            dropped["unknown_payload"] += stats.unknown_payload
            dropped["srtp_rejected"] += stats.srtp_rejected
            dropped["duplicate"] += jitter.duplicates + stats.srtp_replayed
            dropped["late"] += jitter.late
            dropped["foreign_ssrc"] += jitter.foreign_ssrc
        dropped["backlog"] = self.backlog_dropped
        for reason, total in dropped.items():
            if total > self.dropped_counted[reason]:
                metrics.siprec_rtp_dropped.labels(reason).inc(total - self.dropped_counted[reason])
                self.dropped_counted[reason] = total

    # -- the call's task -----------------------------------------------------------------------

    async def run(self) -> None:
        """Apply queued events to the call until it ends; poll the jitter buffers on time."""
        loop = self.service.loop
        reason = "released"
        try:
            while True:
                if not self.queue:
                    if self.stopped is not None:
                        return
                    if self.release_due:  # the streams went quiet (release_if_quiet)
                        self.release_due = False
                        await self._flush_batches()
                        continue
                    deadline = self.media.next_deadline() if self.media else None
                    self.wake.clear()
                    if deadline is None:
                        await self.wake.wait()
                    else:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout_at(deadline):
                                await self.wake.wait()
                    if self.media is not None and self.stopped is None:
                        now = loop.time()
                        for event in self.media.poll(now):
                            self.queue.append((event, now))
                while self.queue:
                    item, at = self.queue.popleft()
                    if item is None:
                        reason = self.end_reason
                        await self._flush()
                        return
                    if self.stopped is None:
                        await self._apply(item, at)
        except (CallError, TimestampJump) as exc:
            if self.stopped is None:
                self.service.stream_error(self, "call_error", str(exc))
                # The call cannot go on: end the recording session too (BYE), or the client
                # would keep sending media to a call that no longer takes it.
                self.service.hang_up(self.sip_call_id, "stream_error")
            reason = "stream_error"
        finally:
            self.count_media()
            if self.dropped_counted["srtp_rejected"]:
                # Once per call, not per packet: a wrong key or an attacker fails every packet.
                log.warning(
                    "siprec.srtp_rejected",
                    sip_call_id=self.sip_call_id,
                    packets=self.dropped_counted["srtp_rejected"],
                )
            self.stop(reason)
            self.live.detach(self.link, reason)

    async def _apply(self, event: IngressEvent, at: float) -> None:
        call = self.live.call
        if type(event) is Audio and event.payload:  # nearly every event: one packet's audio
            self.last_audio_at = at
            blocks = self._batched(event)
            for block in blocks:
                await call.handle(block)
            if blocks:
                self.blocks_placed += 1
                if self.blocks_placed % DELAY_SAMPLE == 0:
                    self.service.packet_delay.observe(self.service.loop.time() - at)
            return
        # Anything else comes after the audio before it: what the batchers hold goes first.
        await self._flush_batches()
        if isinstance(event, CallStarted):
            await self.live.start(event, self.link)
            return
        if isinstance(event, Hold) and self.media is not None:
            for flushed in self.media.flush():
                await self._apply(flushed, at)
            await self._flush_batches()
        if isinstance(event, Audio) and self.live.first_media_at is None:
            self.live.first_media_at = time.monotonic()  # the empty Audio pinning call time
        await call.handle(event)

    def _batched(self, audio: Audio) -> list[Audio]:
        """``audio`` into its channel's batcher; the blocks it completes (usually none)."""
        batcher = self.batchers.get(audio.channel)
        if batcher is None:
            assert self.media is not None  # audio comes from the call's media
            receiver = self.media.receivers[audio.channel]
            batcher = self.batchers[audio.channel] = AudioBatcher(
                self.service.conf.batch_ms,
                receiver.config.clock_rate,
                receiver.target.sample_width,  # Audio is in the receiver's target codec
            )
        return batcher.push(audio)

    async def _flush_batches(self) -> None:
        for channel in sorted(self.batchers):
            for block in self.batchers[channel].flush():
                await self.live.call.handle(block)

    async def _flush(self) -> None:
        if self.media is None or self.stopped is not None:
            return
        if self.live.call.channels:  # started: place what the jitter buffers still hold
            for event in self.media.flush():
                await self._apply(event, self.service.loop.time())
            await self._flush_batches()


class SiprecService:
    """The SIPREC ingress of one gateway (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CallRegistry,
        engines: EngineSet,
        metrics: Metrics,
        admission: AdmissionHook | None = None,
    ) -> None:
        """Nothing is bound until :meth:`start`. ``admission`` replaces the default check."""
        self.settings = settings
        self.conf = settings.siprec
        self.registry = registry
        self.engines = engines
        self.metrics = metrics
        self.admission: AdmissionHook = admission or self._default_admission
        self.packet_delay = metrics.siprec_packet_delay
        self._server: SiprecServer | None = None
        self._transports: SipTransports | None = None
        self._ports: RtpPorts | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: SttEngine | None = None
        self._calls: dict[str, _SipCall] = {}
        self._tasks = TaskSet("siprec")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._sweep: asyncio.TimerHandle | None = None  # release_if_quiet, every batch_ms

    # -- accessors -----------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "SiprecService not started"
        return self._loop

    @property
    def server(self) -> SiprecServer:
        """The SIP core (after :meth:`start`)."""
        assert self._server is not None, "SiprecService not started"
        return self._server

    @property
    def ports(self) -> RtpPorts:
        """The RTP port allocator (after :meth:`start`)."""
        assert self._ports is not None, "SiprecService not started"
        return self._ports

    @property
    def sip_ports(self) -> dict[str, int]:
        """Bound SIP ports by transport (``udp``, ``tcp``, ``tls``)."""
        return dict(self._transports.ports) if self._transports else {}

    def media_ports(self, sip_call_id: str) -> tuple[int, ...]:
        """The RTP ports of a call, in m-line order of its accepted streams."""
        return self.ports.ports_of(sip_call_id)

    # -- lifecycle -----------------------------------------------------------------------------

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: start on startup, :meth:`stop` on cleanup."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        """Load the default engine, bind the SIP listeners and prepare the RTP range."""
        conf = self.conf
        self._loop = asyncio.get_running_loop()
        self._engine = await self.engines.get()
        address = conf.media_address or await asyncio.to_thread(_primary_address, conf.host)
        tls = client_tls = None
        if conf.tls_cert and conf.tls_key:
            tls, client_tls = await asyncio.to_thread(
                lambda: (
                    tls_context(conf.tls_cert, conf.tls_key),
                    tls_client_context(conf.tls_cert, conf.tls_key, conf.tls_ca),
                )
            )
        self._ports = RtpPorts(conf.host, conf.rtp_port_min, conf.rtp_port_max, loop=self._loop)
        rejected = self.metrics.streams_rejected
        transports = self._transports = SipTransports(
            self._on_message,
            max_body_bytes=conf.max_message_bytes,
            max_connections=conf.max_connections,
            idle_timeout_s=conf.tcp_idle_timeout_s,
            on_closed=lambda reason: rejected.labels(SOURCE, reason).inc(),
            client_tls=client_tls,
        )
        try:
            if "udp" in conf.transports:
                await transports.start_udp(conf.host, conf.udp_port)
            if "tcp" in conf.transports:
                await transports.start_stream(conf.host, conf.tcp_port)
            if tls is not None:
                await transports.start_stream(conf.host, conf.tls_port, tls)
        except BaseException:
            await transports.close()
            raise
        users = {}
        for entry in conf.digest_users:
            user, _, password = entry.get_secret_value().partition(":")
            users[user] = password
        port = next(iter(transports.ports.values()), 5060)
        self._server = SiprecServer(
            ServerConfig(
                host=address,
                port=port,
                transport_ports=tuple(transports.ports.items()),
                media_address=address,
                allowlist=tuple(conf.allowlist),
                digest=DigestAuth(conf.digest_realm, users) if users else None,
                auto_accept=False,
                roles=RolePolicy(
                    caller_role=conf.caller_role,
                    callee_role=conf.callee_role,
                    caller_labels=frozenset(conf.caller_labels),
                ),
                max_channels=self.settings.calls.max_channels,
                srtp=conf.srtp,
            ),
            self._ports,
        )
        if conf.batch_ms:
            self._sweep = self._loop.call_later(conf.batch_ms / 1000, self._sweep_quiet)
        log.info(
            "siprec.listening",
            host=conf.host,
            media_address=address,
            rtp_ports=f"{conf.rtp_port_min}-{conf.rtp_port_max}",
            **{f"{name}_port": p for name, p in transports.ports.items()},
        )

    async def stop(self) -> None:
        """Close listeners, cancel and await every task, close every RTP socket."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._transports is not None:
            await self._transports.close()
        for call in self._calls.values():
            call.stop("shutdown")
        await self._tasks.close()
        self._calls.clear()
        if self._ports is not None:
            self._ports.close()

    def _sweep_quiet(self) -> None:
        """Every batch_ms: calls whose streams went quiet hand on what their batchers hold."""
        quiet_s = self.conf.batch_ms / 1000
        now = self.loop.time()
        for call in self._calls.values():
            call.release_if_quiet(now, quiet_s)
        self._sweep = self.loop.call_later(quiet_s, self._sweep_quiet)

    # -- SIP in --------------------------------------------------------------------------------

    def _on_message(self, message: ParseResult, source: Address, transport: str) -> None:
        server = self._server
        if server is None:
            return
        if not self.registry.accepting and not server.draining:
            server.drain()
            log.info("siprec.draining")
        if isinstance(message, ParseError):
            self.metrics.stream_errors.labels(SOURCE, message.kind.value).inc()
            log.warning(
                "siprec.malformed",
                reason=message.kind.value,
                detail=message.detail[:200],
                status=message.status,
                transport=transport,
                remote=source[0],
            )
            outputs = server.receive(message, source, transport, self.loop.time())
            self._apply([o for o in outputs if not isinstance(o, Rejected)])
            return
        if isinstance(message, SipRequest):
            log.debug(
                "siprec.request",
                method=message.method,
                call_id=message.call_id,
                remote=source[0],
                transport=transport,
            )
        self._apply(server.receive(message, source, transport, self.loop.time()))

    def hang_up(self, sip_call_id: str, reason: str) -> None:
        """End the recording dialog from our side (BYE); the call's media is released."""
        if self._server is not None:
            self._apply(self._server.hang_up(sip_call_id, reason, self.loop.time()))

    def _apply(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                self._transports_send(out)
            elif isinstance(out, IncomingCall):
                self._tasks.spawn(self._admit(out), f"siprec-admit-{out.call_id}")
            elif isinstance(out, MediaPlan):
                call = self._calls.get(out.call_id)
                if call is not None:
                    call.plan(out, self.conf)
            elif isinstance(out, CallEvent):
                self._call_event(out)
            elif isinstance(out, CallReleased):
                self._release(out)
            elif isinstance(out, Cancelled):
                log.info("siprec.cancelled", sip_call_id=out.call_id)
            elif isinstance(out, Rejected):
                self._rejected(out)
        self._arm_timer()

    def _transports_send(self, out: Send) -> None:
        assert self._transports is not None
        if not self._transports.send(out.data, out.destination, out.transport, out.target):
            log.debug("siprec.send_dropped", transport=out.transport, remote=out.destination[0])

    def _call_event(self, out: CallEvent) -> None:
        call = self._calls.get(out.call_id)
        if call is None:
            return  # ended by the gateway earlier (shutdown, max duration)
        event = out.event
        if isinstance(event, CallEnded):
            call.end_reason = event.reason
            call.push(None, self.loop.time())
            return
        if isinstance(event, CallStarted):
            log.debug("siprec.participants", sip_call_id=out.call_id, metadata=event.metadata)
        call.push(event, self.loop.time())

    def _release(self, out: CallReleased) -> None:
        call = self._calls.pop(out.call_id, None)
        self.ports.release(out.call_id)  # the core did already; harmless, and sure
        if call is not None:
            for port in list(call.streams):
                call.streams.pop(port)
            if not any(item is None for item, _ in call.queue):
                # Released without a CallEnded (refused after admission: no media ports, an
                # offer we could not answer): end the call, or it would hold a call slot.
                call.end_reason = out.reason
                call.push(None, self.loop.time())
            log.info("siprec.call_released", sip_call_id=out.call_id, reason=out.reason)

    def _rejected(self, out: Rejected) -> None:
        token = reason_token(out)
        self.metrics.streams_rejected.labels(SOURCE, token).inc()
        log.warning(
            "siprec.rejected",
            status=out.status,
            reason=token,
            method=out.method,
            sip_call_id=out.call_id,
            remote=out.source[0],
        )

    def stream_error(self, call: _SipCall, reason: str, detail: str) -> None:
        """A call's media could not be applied: metric and one warning line."""
        self.metrics.stream_errors.labels(SOURCE, reason).inc()
        log.warning(
            "siprec.call_error",
            reason=reason,
            detail=detail[:200],
            sip_call_id=call.sip_call_id,
            call_id=call.live.call_id,
        )

    # -- admission -----------------------------------------------------------------------------

    async def _default_admission(self, incoming: IncomingCall) -> tuple[int, str] | None:
        try:
            self.registry.check_admission()
        except AdmissionRefused as exc:
            return 503, exc.reason
        return None

    async def _admit(self, incoming: IncomingCall) -> None:
        call_id = incoming.call_id
        refusal = await self.admission(incoming)
        server = self.server
        if server.state(call_id) is not DialogState.PROCEEDING:
            return  # cancelled (or gone) meanwhile
        live: LiveCall | None = None
        if refusal is None:
            assert self._engine is not None
            try:
                live = self.registry.create(
                    self._engine,
                    call_options(self.settings),
                    source=SOURCE,
                    key=call_id,
                    grace_s=0.0,
                    max_call_s=self.settings.calls.max_call_s,
                )
            except AdmissionRefused as exc:
                refusal = (503, exc.reason)
        now = self.loop.time()
        if refusal is not None or live is None:
            status, reason = refusal or (503, "unavailable")
            self._apply(server.reject(call_id, status, now, reason=reason))
            return
        call = self._calls[call_id] = _SipCall(self, call_id, live)
        call.task = self._tasks.spawn(call.run(), f"siprec-call-{call_id}")
        try:
            outputs = server.accept(call_id, now)
        except Exception as exc:  # noqa: BLE001 - answer the INVITE whatever went wrong
            log.error("siprec.accept_failed", sip_call_id=call_id, error=repr(exc))
            outputs = server.reject(call_id, 500, now, reason="internal_error")
        if any(isinstance(o, CallEvent) and isinstance(o.event, CallStarted) for o in outputs):
            self.metrics.streams.labels(SOURCE).inc()
            log.info(
                "siprec.call_accepted",
                sip_call_id=call_id,
                call_id=live.call_id,
                channels=len(incoming.channels.channels),
                role_source=incoming.channels.role_source,
                remote=incoming.source[0],
                transport=incoming.transport,
                srtp=incoming.srtp,
            )
            if incoming.srtp and incoming.transport != "tls":
                # SDES keys travel in the SDP: over plain UDP/TCP anyone on the path has them.
                log.warning(
                    "siprec.srtp_keys_in_clear", sip_call_id=call_id, transport=incoming.transport
                )
        self._apply(outputs)

    # -- timers and tasks ----------------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self._server is None:
            return
        deadline = self._server.next_deadline()
        if deadline == self._timer_at and (deadline is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and not (self._transports and self._transports.closed):
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self._apply(self.server.on_timer(self.loop.time()))
        except Exception as exc:  # noqa: BLE001 - the timer must keep running
            log.error("siprec.timer_failed", error=repr(exc))
            self._arm_timer()


SIPREC = web.AppKey("siprec", SiprecService)
