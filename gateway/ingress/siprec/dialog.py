"""The Session Recording Server's SIP core: UAS transactions and dialogs, sans-I/O.

:class:`SiprecServer` is fed parsed messages (or parse errors) with their source address,
transport and the current time, and returns a list of :data:`Output` values, in order:

- :class:`Send`: a message to write to ``destination`` over ``transport``;
- :class:`IncomingCall`: a new SIPREC INVITE passed every check (100 Trying already sent); with
  ``auto_accept`` the accept outputs follow at once, else call :meth:`SiprecServer.accept` or
  :meth:`SiprecServer.reject`;
- :class:`MediaPlan`: which RTP streams to receive (local port, remote, payload types) for a
  call; sent before ``CallStarted`` and again whenever a re-INVITE or UPDATE changes the media;
- :class:`CallEvent`: a normalized ingress event (``CallStarted``, ``CallEnded``, ``Hold``,
  ``Resume``, ``MetadataChanged``) for the call ``call_id``;
- :class:`CallReleased`: the call is gone; free its ports and receivers;
- :class:`Cancelled`: an INVITE reported by ``IncomingCall`` was cancelled before the answer;
- :class:`Rejected`: a request was refused or dropped (for a metric and a log line).

Nothing here reads a clock or touches a socket. Timers are exposed as :meth:`next_deadline`
and driven by :meth:`on_timer`: the 2xx to an INVITE is retransmitted over unreliable
transports at T1, 2*T1, ... capped at T2 until the ACK arrives or 64*T1 passes (RFC 3261
13.3.1.4), after which the call ends with reason ``ack_timeout``; final non-2xx answers to
INVITE are retransmitted the same way until their ACK (Timer G/H). Retransmitted requests get
the cached response again. When the gateway ends a call itself (maximum duration, shutdown),
:meth:`SiprecServer.hang_up` sends BYE (a non-INVITE client transaction: retransmitted over UDP
at T1, 2*T1, ... capped at T2 until any response or 64*T1, RFC 3261 17.1.2).

Rules (h11 style):

1. Every request gets exactly one final answer; ACK never gets one.
2. Access control (allowlist, then digest for out-of-dialog INVITE) runs before anything else.
3. In-dialog requests must match Call-ID and both tags, or get 481.
4. The SRS only receives: answers are ``recvonly`` (``inactive`` for ``inactive`` offers).
   SRTP m-lines keyed by SDES are taken as :attr:`ServerConfig.srtp` allows; the answer carries
   a key of ours per SRTP m-line (kept for the dialog's life while the suite's key length
   stays), and the plan the offerer's key to decrypt with.
5. A channel keeps its m-line and clock rate for the life of the call: an m-line offering only
   other clock rates is refused (port 0). Its codec may change (PCMU, PCMA, L16 at the same
   rate; the previous one is preferred): the RTP receiver transcodes to the codec the call
   started with. A re-INVITE may add legs (a conference, a transfer): m-lines appended after
   every recorded one become new channels (``ChannelAdded``, new ports in the answer and the
   plan), up to ``max_channels`` and while the port range lasts; other new m-lines (one
   re-enabling a slot refused earlier, one beyond the limit) are refused (port 0).
"""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from gateway.ingress.events import (
    CallEnded,
    CallStarted,
    ChannelAdded,
    Hold,
    IngressEvent,
    MetadataChanged,
    Resume,
)
from gateway.ingress.siprec.auth import Allowlist, AuthResult, DigestAuth
from gateway.ingress.siprec.message import (
    Headers,
    ParseError,
    SipMessage,
    SipRequest,
    SipResponse,
    build_response,
    error_response,
    new_tag,
    parse_name_addr,
    via_branch,
)
from gateway.ingress.siprec.metadata import (
    BodyError,
    MetadataError,
    RecordingMetadata,
    merge_metadata,
    parse_metadata,
    split_body,
)
from gateway.ingress.siprec.participants import ChannelMap, RolePolicy, map_channels
from gateway.ingress.siprec.rtp import StreamConfig
from gateway.ingress.siprec.sdp import (
    DEFAULT_CODECS,
    SRTP_SUITES,
    Negotiated,
    SdpAnswer,
    SdpError,
    SessionDescription,
    answer,
    negotiate,
    parse_sdp,
)

__all__ = [
    "Address",
    "CallEvent",
    "CallReleased",
    "Cancelled",
    "DialogState",
    "IncomingCall",
    "MediaPlan",
    "MediaStream",
    "Output",
    "PortAllocator",
    "Rejected",
    "Send",
    "ServerConfig",
    "SiprecServer",
]

Address = tuple[str, int]
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, INFO"
ACCEPT = "application/sdp, multipart/mixed, application/rs-metadata+xml, application/rs-metadata"
RELIABLE = frozenset({"tcp", "tls", "ws", "wss"})


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``message`` to ``destination`` over ``transport`` (the one it came in on).

    ``target`` (requests we originate, a BYE) is where to open a new connection when the one
    the dialog used is gone (RFC 3261 18.1.1): the host and port of the Request-URI.
    """

    message: SipMessage
    destination: Address
    transport: str
    target: Address | None = None

    @property
    def data(self) -> bytes:
        """The serialized message."""
        return self.message.to_bytes()


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """A SIPREC INVITE that passed every check, awaiting accept (or already auto-accepted)."""

    call_id: str
    source: Address
    channels: ChannelMap
    transport: str = "udp"  # the INVITE's: udp, tcp or tls
    srtp: bool = False  # the accepted media is SRTP (its SDES keys came over ``transport``)


@dataclass(frozen=True, slots=True)
class MediaStream:
    """One RTP stream to receive: on ``local_port``, for ``config.channel``.

    ``remote`` is the offer's address and port (None if unknown, e.g. ``0.0.0.0``); receivers
    should latch onto the address packets actually come from (symmetric RTP).
    """

    mline: int
    local_port: int
    remote: Address | None
    config: StreamConfig
    direction: str


@dataclass(frozen=True, slots=True)
class MediaPlan:
    """The complete set of streams a call receives now (replaces any earlier plan)."""

    call_id: str
    streams: tuple[MediaStream, ...]


@dataclass(frozen=True, slots=True)
class CallEvent:
    """A normalized ingress event for one call."""

    call_id: str
    event: IngressEvent


@dataclass(frozen=True, slots=True)
class CallReleased:
    """The call is over (or never started): free its ports and receivers."""

    call_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The caller cancelled an INVITE before we answered it."""

    call_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request refused (``status``) or dropped (None): one metric and one log line each."""

    source: Address
    status: int | None
    reason: str
    method: str | None = None
    call_id: str | None = None


Output = Send | IncomingCall | MediaPlan | CallEvent | CallReleased | Cancelled | Rejected


class PortAllocator(Protocol):
    """Hands out local RTP ports (the transport binds them; RTCP is port + 1)."""

    def allocate(self, call_id: str, count: int) -> Sequence[int] | None:
        """``count`` ports for ``call_id``, or None when none are free (answered 503)."""
        ...

    def release(self, call_id: str) -> None:
        """Every port of ``call_id`` is free again."""
        ...


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Static settings of the SRS core.

    ``host``/``port`` go into our Contact, with ``transport_ports`` naming the port of each
    transport we listen on (TLS is usually not UDP's port); ``media_address`` into the SDP
    answer. ``allowlist``
    holds CIDRs (empty: everyone). ``digest`` challenges out-of-dialog INVITEs when set.
    ``supported`` are the option tags a ``Require`` may name. Times are seconds.
    """

    host: str
    port: int = 5060
    transport_ports: tuple[tuple[str, int], ...] = ()  # ("tls", 5061), ...; else ``port``
    media_address: str | None = None
    user: str = "srs"
    allowlist: tuple[str, ...] = ()
    digest: DigestAuth | None = None
    auto_accept: bool = True
    codecs: tuple[tuple[str, int], ...] = DEFAULT_CODECS
    roles: RolePolicy = field(default_factory=RolePolicy)
    supported: frozenset[str] = frozenset({"siprec"})
    t1: float = 0.5
    t2: float = 4.0
    user_agent: str = "callgate-srs"
    max_channels: int = 8
    srtp: str = "allow"  # off | allow | require (sdp.SRTP_POLICIES)

    def port_for(self, transport: str) -> int:
        """Our port for ``transport`` (udp, tcp, tls)."""
        return dict(self.transport_ports).get(transport.lower(), self.port)


def uri_address(uri: str) -> Address | None:
    """The (host, port) a SIP URI names (``sip:user@host:port;params``; port 5060, or 5061
    for ``sips:`` and ``transport=tls``); None when it names none."""
    scheme, _, rest = uri.partition(":")
    rest, _, params = rest.partition(";")
    hostport = rest.rpartition("@")[2]
    secure = scheme.lower() == "sips" or "transport=tls" in params.lower()
    default = 5061 if secure else 5060
    if hostport.startswith("["):  # [IPv6]:port
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        return None
    port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else default
    return (host, port)


class DialogState(StrEnum):
    """A recording dialog's life: PROCEEDING -> CONFIRMING -> CONFIRMED -> (gone)."""

    PROCEEDING = "proceeding"  # INVITE received, not answered yet
    CONFIRMING = "confirming"  # 2xx sent, waiting for ACK
    CONFIRMED = "confirmed"


@dataclass(slots=True)
class _Dialog:
    call_id: str
    remote_tag: str
    local_tag: str
    source: Address
    transport: str
    invite: SipRequest  # the latest INVITE (re-INVITEs refresh the remote target)
    offer: SessionDescription
    negotiated: tuple[Negotiated | None, ...]
    metadata: RecordingMetadata | None
    channels: ChannelMap
    extra_metadata: dict[str, str]
    first_negotiated: tuple[Negotiated | None, ...] = ()
    state: DialogState = DialogState.PROCEEDING
    ports: list[int] = field(default_factory=list)
    # The port each recorded m-line was granted, kept while a re-offer refuses the m-line (its
    # port 0 in the answer) so that it gets the same port back when it is offered again.
    granted: dict[int, int] = field(default_factory=dict)
    answer: SdpAnswer | None = None
    remote_cseq: int = 0
    sdp_version: int = 1
    session_id: int = 1
    held: bool = False
    # An offerless re-INVITE was answered with our SDP as the offer: the SRC's answer (hold or
    # resume) comes in the ACK of that CSeq (RFC 3264, 3261 13.2.1).
    offer_in_2xx: int | None = None
    local_cseq: int = 0  # CSeq of requests we send in this dialog (BYE)
    srtp_keys: list[bytes | None] = field(default_factory=list)  # ours, per m-line (answers)
    local_uuid: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The INVITE that made the dialog: its From/To and Record-Route set (RFC 3261 12.1.1,
    # 12.2: a re-INVITE does not change the route set) are what our requests are built from.
    first_invite: SipRequest | None = None


@dataclass(slots=True)
class _Retransmit:
    response: SipResponse
    destination: Address
    transport: str
    next_at: float
    interval: float
    give_up_at: float
    call_id: str
    success: bool  # a 2xx: the dialog ends when it is never acknowledged


@dataclass(slots=True)
class _Outgoing:
    """A request we sent (BYE), retransmitted over UDP until a response or give-up."""

    request: SipRequest
    destination: Address
    transport: str
    next_at: float
    interval: float
    give_up_at: float


@dataclass(slots=True)
class _Cached:
    response: SipResponse
    expires: float


def _address(connection_address: str | None, port: int) -> Address | None:
    if not connection_address or connection_address in ("0.0.0.0", "::") or port == 0:
        return None
    return (connection_address, port)


class SiprecServer:
    """All SIPREC dialogs of one gateway process (see the module docstring for the contract)."""

    def __init__(self, config: ServerConfig, ports: PortAllocator) -> None:
        """Create the core; ``ports`` is asked for RTP ports when a call is accepted."""
        self.config = config
        self.ports = ports
        self.allowlist = Allowlist(config.allowlist)
        self._dialogs: dict[str, _Dialog] = {}
        self._retransmits: dict[tuple[str, int], _Retransmit] = {}
        self._cache: dict[tuple[str, str, int, str], _Cached] = {}
        self._outgoing: dict[str, _Outgoing] = {}  # by Via branch
        self._draining = False
        self._prune_at = 0.0  # next sweep of expired cached responses

    # -- public API ------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` was called: new INVITEs and OPTIONS get 503."""
        return self._draining

    def drain(self) -> None:
        """Stop taking new calls; dialogs in progress continue."""
        self._draining = True

    @property
    def calls(self) -> tuple[str, ...]:
        """Call-IDs of the dialogs in progress."""
        return tuple(self._dialogs)

    def state(self, call_id: str) -> DialogState | None:
        """The state of a dialog, or None if unknown."""
        dialog = self._dialogs.get(call_id)
        return dialog.state if dialog else None

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next run (None: no timer pending)."""
        return min(
            [r.next_at for r in self._retransmits.values()]
            + [o.next_at for o in self._outgoing.values()],
            default=None,
        )

    def on_timer(self, now: float) -> list[Output]:
        """Retransmit due responses and give up on unacknowledged ones."""
        out: list[Output] = []
        for key, r in list(self._retransmits.items()):
            if r.next_at > now:
                continue
            if now >= r.give_up_at:
                del self._retransmits[key]
                if r.success and r.call_id in self._dialogs:
                    dialog = self._dialogs[r.call_id]
                    if dialog.state is DialogState.CONFIRMING and dialog.remote_cseq == key[1]:
                        # RFC 3261 13.3.1.4: no ACK for our 2xx, so end the session with a BYE.
                        out.append(CallEvent(dialog.call_id, CallEnded("ack_timeout")))
                        out += self.hang_up(dialog.call_id, "ack_timeout", now)
                continue
            out.append(Send(r.response, r.destination, r.transport))
            r.interval = min(r.interval * 2, self.config.t2)
            r.next_at = min(now + r.interval, r.give_up_at)
        for branch, o in list(self._outgoing.items()):
            if o.next_at > now:
                continue
            if now >= o.give_up_at:
                del self._outgoing[branch]  # no answer to our BYE: the dialog is gone anyway
                continue
            out.append(Send(o.request, o.destination, o.transport))
            o.interval = min(o.interval * 2, self.config.t2)
            o.next_at = min(now + o.interval, o.give_up_at)
        self._cache = {k: c for k, c in self._cache.items() if c.expires > now}
        return out

    def hang_up(self, call_id: str, reason: str, now: float) -> list[Output]:
        """End a call from our side: BYE to the recording client, then the call is released.

        Only a confirmed dialog can be hung up with BYE; one still being set up is released
        without a request (its INVITE gets no further retransmissions). Unknown ids: nothing.
        """
        dialog = self._dialogs.get(call_id)
        if dialog is None:
            return []
        out: list[Output] = []
        if dialog.state is not DialogState.PROCEEDING:
            bye = self._bye(dialog)
            out.append(Send(bye, dialog.source, dialog.transport, uri_address(bye.uri)))
            if dialog.transport not in RELIABLE:
                t1 = self.config.t1
                branch = via_branch(bye.headers.get("Via") or "") or ""
                self._outgoing[branch] = _Outgoing(
                    bye, dialog.source, dialog.transport, now + t1, t1, now + 64 * t1
                )
        self._dialogs.pop(dialog.call_id, None)
        for key in [k for k in self._retransmits if k[0] == dialog.call_id]:
            del self._retransmits[key]
        self.ports.release(dialog.call_id)
        return [*out, CallReleased(dialog.call_id, reason)]

    def _bye(self, dialog: _Dialog) -> SipRequest:
        """BYE within ``dialog`` (RFC 3261 12.2.1.1): to the client's Contact, through its
        Record-Route set, From/To swapped from the INVITE."""
        invite = dialog.first_invite or dialog.invite
        target = ""
        for value in (
            dialog.invite.headers.get("Contact"),
            invite.headers.get("Contact"),
            invite.headers.get("From"),
        ):
            try:
                target = parse_name_addr(value or "").uri
            except ValueError:
                continue  # unparseable: the next candidate (never fail to hang up)
            if target:
                break
        dialog.local_cseq += 1
        to = invite.headers.get("To") or ""
        headers: list[tuple[str, str]] = [
            (
                "Via",
                f"SIP/2.0/{dialog.transport.upper()} {self.config.host}"
                f":{self.config.port_for(dialog.transport)}"
                f";branch=z9hG4bK{uuid.uuid4().hex}",
            ),
            ("Max-Forwards", "70"),
            ("From", f"{to};tag={dialog.local_tag}"),
            ("To", invite.headers.get("From") or ""),
            ("Call-ID", dialog.call_id),
            ("CSeq", f"{dialog.local_cseq} BYE"),
        ]
        headers += [("Route", route) for route in invite.headers.get_all("Record-Route")]
        headers.append(("User-Agent", self.config.user_agent))
        return SipRequest("BYE", target, Headers.of(headers))

    def receive(
        self, message: SipMessage | ParseError, source: Address, transport: str, now: float
    ) -> list[Output]:
        """Handle one parsed message (or parse error) from ``source`` over ``transport``."""
        transport = transport.lower()
        if isinstance(message, ParseError):
            response = error_response(message)
            out: list[Output] = [Rejected(source, message.status, message.kind, message.method)]
            if response is not None:
                out.insert(0, Send(response, source, transport))
            return out
        if isinstance(message, SipResponse):
            # The answer to a BYE we sent (any final or provisional stops retransmissions).
            self._outgoing.pop(via_branch(message.headers.get("Via") or "") or "", None)
            return []
        request = message
        if now >= self._prune_at:
            # Every request may leave a cached response (OPTIONS pings, 403s): sweep them here
            # too, not only from on_timer, which runs only while something is retransmitted.
            self._cache = {k: c for k, c in self._cache.items() if c.expires > now}
            self._prune_at = now + 4 * self.config.t1
        try:
            return self._request(request, source, transport, now)
        except (ValueError, LookupError, TypeError) as exc:
            # A header or body that parsed as SIP but not deeper down (a From without its '>',
            # an XML encoding nobody knows, ...): answer 400 and keep no half-made dialog.
            return self._bad_request(request, source, transport, now, exc)

    def _bad_request(
        self, request: SipRequest, source: Address, transport: str, now: float, exc: Exception
    ) -> list[Output]:
        dialog = self._dialogs.get(request.call_id)
        if dialog is not None and dialog.invite is request:
            if dialog.state is not DialogState.PROCEEDING:
                raise exc  # a dialog set up by this very request: a defect, not bad input
            del self._dialogs[request.call_id]
            self.ports.release(request.call_id)
        reason = f"bad request: {type(exc).__name__}"
        if request.method == "ACK":
            return [Rejected(source, 400, reason, "ACK", request.call_id)]
        try:
            return self._refuse(request, source, transport, 400, reason, now)
        except (ValueError, LookupError, TypeError):
            return [Rejected(source, 400, reason, request.method, request.call_id)]

    def _request(
        self, request: SipRequest, source: Address, transport: str, now: float
    ) -> list[Output]:
        if request.method == "ACK":
            return self._ack(request)
        if not self.allowlist.allows(source[0]):
            return self._refuse(request, source, transport, 403, "not in allowlist", now)
        key = self._cache_key(request)
        cached = self._cache.get(key)
        if cached is not None and cached.expires > now:
            return [Send(cached.response, source, transport)]
        method = request.method
        if method == "INVITE":
            to_tag = parse_name_addr(request.headers.get("To") or "").tag
            if to_tag is None:
                return self._new_invite(request, source, transport, now)
            return self._in_dialog(request, source, transport, now)
        if method == "CANCEL":
            return self._cancel(request, source, transport, now)
        if method == "OPTIONS":
            if parse_name_addr(request.headers.get("To") or "").tag is not None:
                return self._in_dialog(request, source, transport, now)
            if self._draining:
                return self._refuse(request, source, transport, 503, "draining", now)
            return [self._reply(request, 200, source, transport, now, self._capabilities())]
        if method in ("BYE", "UPDATE", "INFO"):
            return self._in_dialog(request, source, transport, now)
        return [
            self._reply(request, 405, source, transport, now, [("Allow", ALLOW)]),
            Rejected(source, 405, "method not allowed", method, request.call_id),
        ]

    def accept(self, call_id: str, now: float) -> list[Output]:
        """Answer a pending INVITE with 200 OK (after :class:`IncomingCall`, manual mode).

        Returns ``MediaPlan``, ``CallEvent(CallStarted)`` and the 200; or a 503 when no ports are
        free. Raises KeyError for a call that is not pending.
        """
        dialog = self._dialogs[call_id]
        if dialog.state is not DialogState.PROCEEDING:
            raise KeyError(f"call {call_id} is not waiting for an answer")
        accepted = [i for i, n in enumerate(dialog.negotiated) if n is not None]
        granted = self.ports.allocate(call_id, len(accepted))
        if granted is None or len(granted) < len(accepted):
            if granted is not None:
                self.ports.release(call_id)
            return self.reject(call_id, 503, now, reason="no media ports")
        ports = [0] * len(dialog.offer.media)
        for mline, port in zip(accepted, granted, strict=False):
            ports[mline] = port
        dialog.ports = ports
        dialog.granted = dict(zip(accepted, granted, strict=False))
        try:
            sdp = self._answer(dialog)
        except ValueError as exc:  # an offer we negotiated but cannot answer: refuse it whole
            self.ports.release(call_id)
            dialog.ports = []
            return self.reject(call_id, 488, now, reason=f"cannot answer the offer: {exc}"[:120])
        dialog.state = DialogState.CONFIRMING
        started = CallStarted(
            source="siprec",
            channels=dialog.channels.channels,
            source_ids=self._source_ids(dialog),
            metadata={**dialog.channels.metadata, **dialog.extra_metadata},
        )
        out: list[Output] = [self._plan(dialog), CallEvent(call_id, started)]
        if dialog.held:
            out.append(CallEvent(call_id, Hold()))
        out.append(self._answer_invite(dialog, dialog.invite, 200, sdp, now))
        return out

    def reject(
        self, call_id: str, status: int, now: float, *, reason: str | None = None
    ) -> list[Output]:
        """Refuse a pending INVITE with ``status`` (a 4xx-6xx). Raises KeyError if not pending."""
        dialog = self._dialogs[call_id]
        if dialog.state is not DialogState.PROCEEDING:
            raise KeyError(f"call {call_id} is not waiting for an answer")
        del self._dialogs[call_id]
        response = build_response(dialog.invite, status, to_tag=dialog.local_tag)
        out: list[Output] = [
            self._send_final(dialog.invite, response, dialog.source, dialog.transport, now),
            Rejected(dialog.source, status, reason or "rejected", "INVITE", call_id),
            CallReleased(call_id, reason or "rejected"),
        ]
        return out

    # -- request handlers ------------------------------------------------------------------

    def _new_invite(
        self, request: SipRequest, source: Address, transport: str, now: float
    ) -> list[Output]:
        call_id = request.call_id
        if call_id in self._dialogs:
            # Same Call-ID without a To tag but a new transaction: a forked or broken SRC.
            return self._refuse(request, source, transport, 482, "duplicate call-id", now)
        if self._draining:
            return self._refuse(request, source, transport, 503, "draining", now)
        unsupported = [
            tag
            for tag in request.headers.get_list("Require")
            if tag.lower() not in self.config.supported
        ]
        if unsupported:
            return self._refuse(
                request,
                source,
                transport,
                420,
                "unsupported extension",
                now,
                [("Unsupported", ", ".join(unsupported))],
            )
        digest = self.config.digest
        if digest is not None:
            result = digest.verify(request, now)
            if result is AuthResult.BAD:
                return self._refuse(request, source, transport, 403, "bad credentials", now)
            if result is not AuthResult.OK:
                return self._refuse(
                    request,
                    source,
                    transport,
                    401,
                    f"auth {result.value}",
                    now,
                    digest.challenge(now, stale=result is AuthResult.STALE),
                )
        try:
            parts = split_body(request.content_type, request.body)
        except BodyError as exc:
            headers = [("Accept", ACCEPT)] if exc.status == 415 else []
            return self._refuse(request, source, transport, exc.status, str(exc), now, headers)
        if parts.sdp is None:
            return self._refuse(request, source, transport, 488, "no SDP offer", now)
        try:
            offer = parse_sdp(parts.sdp)
        except SdpError as exc:
            return self._refuse(request, source, transport, 400, f"bad SDP: {exc}", now)
        negotiated = negotiate(offer, self.config.codecs, srtp=self.config.srtp)
        if not any(negotiated):
            return self._refuse(request, source, transport, 488, "no acceptable m-line", now)
        # A call records at most max_channels streams: the first ones, the others get port 0.
        kept = [i for i, n in enumerate(negotiated) if n is not None][: self.config.max_channels]
        negotiated = tuple(n if i in kept else None for i, n in enumerate(negotiated))
        extra: dict[str, str] = {}
        metadata: RecordingMetadata | None = None
        if parts.metadata is not None:
            try:
                metadata = parse_metadata(parts.metadata)
            except MetadataError as exc:
                extra["siprec.metadata_error"] = str(exc)[:200]
        else:
            extra["siprec.metadata"] = "none"
        from_value = request.headers.get("From") or ""
        extra["sip.from"] = from_value
        extra["sip.to"] = request.headers.get("To") or ""
        channels = map_channels(offer, negotiated, metadata, self.config.roles)
        dialog = _Dialog(
            call_id=call_id,
            remote_tag=parse_name_addr(from_value).tag or "",
            local_tag=new_tag(),
            source=source,
            transport=transport,
            invite=request,
            first_invite=request,
            offer=offer,
            negotiated=negotiated,
            metadata=metadata,
            channels=channels,
            extra_metadata=extra,
            first_negotiated=negotiated,
            remote_cseq=request.cseq[0],
            session_id=int(now * 1000) % 2**31 + 1,
            held=self._all_inactive(offer, negotiated),
        )
        self._dialogs[call_id] = dialog
        trying = build_response(request, 100)
        self._cache[self._cache_key(request)] = _Cached(trying, now + 64 * self.config.t1)
        out: list[Output] = [
            Send(trying, source, transport),
            IncomingCall(
                call_id,
                source,
                channels,
                transport,
                any(n is not None and n.crypto is not None for n in negotiated),
            ),
        ]
        if self.config.auto_accept:
            out += self.accept(call_id, now)
        return out

    def _ack(self, request: SipRequest) -> list[Output]:
        key = (request.call_id, request.cseq[0])
        self._retransmits.pop(key, None)
        dialog = self._dialogs.get(request.call_id)
        if (
            dialog is not None
            and dialog.state is DialogState.CONFIRMING
            and dialog.remote_cseq == request.cseq[0]
        ):
            dialog.state = DialogState.CONFIRMED
            if dialog.offer_in_2xx == request.cseq[0]:
                dialog.offer_in_2xx = None
                return self._answer_in_ack(dialog, request)
        return []

    def _answer_in_ack(self, dialog: _Dialog, ack: SipRequest) -> list[Output]:
        """The SRC's answer to the offer in our 2xx: a hold (inactive) or a resume. An ACK
        cannot be refused: an answer that does not parse or fit our offer changes nothing."""
        try:
            sdp = split_body(ack.content_type, ack.body).sdp
            answer = parse_sdp(sdp) if sdp is not None else None
        except (BodyError, SdpError):
            return []
        if answer is None or len(answer.media) != len(dialog.negotiated):
            return []
        held = self._all_inactive(answer, dialog.negotiated)
        if held == dialog.held:
            return []
        dialog.held = held
        return [CallEvent(dialog.call_id, Hold() if held else Resume())]

    def _cancel(
        self, request: SipRequest, source: Address, transport: str, now: float
    ) -> list[Output]:
        dialog = self._dialogs.get(request.call_id)
        branch = via_branch(request.headers.get("Via") or "")
        if (
            dialog is None
            or via_branch(dialog.invite.headers.get("Via") or "") != branch
            or dialog.invite.cseq[0] != request.cseq[0]
        ):
            return [
                self._reply(request, 481, source, transport, now),
                Rejected(source, 481, "no transaction to cancel", "CANCEL", request.call_id),
            ]
        out: list[Output] = [self._reply(request, 200, source, transport, now)]
        if dialog.state is not DialogState.PROCEEDING:
            return out  # already answered: CANCEL has no effect (RFC 3261 9.2)
        del self._dialogs[dialog.call_id]
        terminated = build_response(dialog.invite, 487, to_tag=dialog.local_tag)
        out.append(self._send_final(dialog.invite, terminated, dialog.source, transport, now))
        out += [Cancelled(dialog.call_id), CallReleased(dialog.call_id, "cancelled")]
        return out

    def _in_dialog(
        self, request: SipRequest, source: Address, transport: str, now: float
    ) -> list[Output]:
        dialog = self._dialogs.get(request.call_id)
        from_tag = parse_name_addr(request.headers.get("From") or "").tag
        to_tag = parse_name_addr(request.headers.get("To") or "").tag
        if dialog is None or from_tag != dialog.remote_tag or to_tag != dialog.local_tag:
            return [
                self._reply(request, 481, source, transport, now),
                Rejected(source, 481, "unknown dialog", request.method, request.call_id),
            ]
        cseq = request.cseq[0]
        if cseq <= dialog.remote_cseq and request.method != "CANCEL":
            return [self._reply(request, 500, source, transport, now, [("Retry-After", "1")])]
        dialog.remote_cseq = cseq
        method = request.method
        if method == "BYE":
            out: list[Output] = [self._reply(request, 200, source, transport, now)]
            return out + self._end(dialog, "bye")
        if method in ("OPTIONS", "INFO"):
            return [self._reply(request, 200, source, transport, now, self._capabilities())]
        return self._modify(dialog, request, source, transport, now)

    def _modify(
        self, dialog: _Dialog, request: SipRequest, source: Address, transport: str, now: float
    ) -> list[Output]:
        """re-INVITE or UPDATE: new SDP (hold, resume, ports) and/or new metadata."""
        try:
            parts = split_body(request.content_type, request.body)
        except BodyError as exc:
            headers = [("Accept", ACCEPT)] if exc.status == 415 else []
            return self._refuse(request, source, transport, exc.status, str(exc), now, headers)
        offer = dialog.offer
        negotiated = dialog.negotiated
        if parts.sdp is not None:
            try:
                offer = parse_sdp(parts.sdp)
            except SdpError as exc:
                return self._refuse(request, source, transport, 400, f"bad SDP: {exc}", now)
            negotiated = self._renegotiate(dialog, offer)
            if not any(negotiated):
                return self._refuse(request, source, transport, 488, "no acceptable m-line", now)
        recorded = dialog.channels.mlines
        added: dict[int, int] = {}  # new m-line -> its port
        if parts.sdp is not None:
            added = {i: 0 for i, n in enumerate(negotiated) if n is not None and i not in recorded}
            if added and max(recorded, default=-1) >= len(offer.media):
                added = {}  # a recorded m-line went away: the layout stays as the call began
        if added:
            granted = self.ports.allocate(dialog.call_id, len(added))
            if granted is None or len(granted) < len(added):
                added = {}  # no ports: the new streams are refused, the call goes on as it was
            else:
                added = dict(zip(added, granted, strict=True))
        if parts.sdp is not None:
            negotiated = tuple(
                n if i in added or i in recorded else None for i, n in enumerate(negotiated)
            )
        metadata = dialog.metadata
        if parts.metadata is not None:
            try:
                metadata = merge_metadata(dialog.metadata, parse_metadata(parts.metadata))
            except MetadataError as exc:
                dialog.extra_metadata["siprec.metadata_error"] = str(exc)[:200]
        out: list[Output] = []
        events: list[Output] = []
        if parts.sdp is not None:
            first = dialog.first_negotiated
            dialog.first_negotiated = tuple(
                negotiated[i] if i in added else (first[i] if i < len(first) else None)
                for i in range(max(len(first), len(offer.media)))
            )
            dialog.offer, dialog.negotiated = offer, negotiated
            dialog.granted.update(added)
            dialog.ports = [
                dialog.granted.get(i, 0) if negotiated[i] is not None else 0
                for i in range(len(offer.media))
            ]
            dialog.sdp_version += 1
        if parts.metadata is not None or parts.sdp is not None:
            dialog.metadata = metadata
            events += [CallEvent(dialog.call_id, e) for e in self._remap(dialog, tuple(added))]
        if parts.sdp is not None:
            out.append(self._plan(dialog))  # after _remap: it names the new streams' channels
            held = self._all_inactive(offer, negotiated)
            if held != dialog.held:
                dialog.held = held
                events.append(CallEvent(dialog.call_id, Hold() if held else Resume()))
        sdp: bytes | None = None
        if request.method == "INVITE" or parts.sdp is not None:
            sdp = self._answer(dialog)
        out += events
        if request.method == "INVITE":
            dialog.invite = request
            dialog.state = DialogState.CONFIRMING
            dialog.offer_in_2xx = request.cseq[0] if parts.sdp is None else None
            out.append(self._answer_invite(dialog, request, 200, sdp, now, source, transport))
        else:
            extra: list[tuple[str, str]] = [("Contact", self._contact(transport))]
            if sdp is not None:
                extra.append(("Content-Type", "application/sdp"))
            out.append(self._reply(request, 200, source, transport, now, extra, sdp or b""))
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _renegotiate(
        self, dialog: _Dialog, offer: SessionDescription
    ) -> tuple[Negotiated | None, ...]:
        """Negotiate a new offer, holding each existing channel to its m-line and codec."""
        out: list[Negotiated | None] = []
        fixed = dict(zip(dialog.channels.mlines, dialog.channels.channels, strict=True))
        last = max(dialog.channels.mlines, default=-1)
        room = self.config.max_channels - len(fixed)
        for i, media in enumerate(offer.media):
            spec = fixed.get(i)
            if spec is None:
                # Rule 5: an m-line appended after every recorded one is a new leg.
                n = None
                if i > last and room > 0:
                    single = dataclasses.replace(offer, media=(media,))
                    n = negotiate(single, self.config.codecs, srtp=self.config.srtp)[0]
                    room -= n is not None
                out.append(n)
                continue
            # The codec it has now, or, when the last offer refused it, the one it began with.
            previous = dialog.negotiated[i] if i < len(dialog.negotiated) else None
            if previous is None and i < len(dialog.first_negotiated):
                previous = dialog.first_negotiated[i]
            if previous is None:
                out.append(None)
                continue
            # The channel's clock rate is fixed; its codec may change (the receiver transcodes).
            same_rate = [
                (name, rate)
                for name, rate in self.config.codecs
                if rate == previous.clock_rate and name.upper() != previous.encoding.upper()
            ]
            single = dataclasses.replace(offer, media=(media,))
            prefs = [(previous.encoding, previous.clock_rate), *same_rate]
            out.append(negotiate(single, prefs, srtp=self.config.srtp)[0])
        return tuple(out)

    def _remap(self, dialog: _Dialog, added: tuple[int, ...] = ()) -> list[IngressEvent]:
        """Recompute roles and participants, with the m-lines in ``added`` as new channels: a
        ChannelAdded per new channel, and a MetadataChanged when the others' roles or
        participants differ (or, with nothing added, the metadata)."""
        recorded = set(dialog.channels.mlines) | set(added)
        first = dialog.first_negotiated
        mask = [first[i] if i < len(first) and i in recorded else None for i in range(len(first))]
        mask = (mask + [None] * len(dialog.offer.media))[: len(dialog.offer.media)]
        mapped = map_channels(dialog.offer, mask, dialog.metadata, self.config.roles)
        if mapped.mlines != tuple(sorted(recorded)):
            return []  # m-lines went away: keep the layout the call started with
        before = dialog.channels
        dialog.channels = mapped
        metadata = {**mapped.metadata, **dialog.extra_metadata}
        old = len(before.channels)
        events: list[IngressEvent] = [ChannelAdded(s, metadata) for s in mapped.channels[old:]]
        if mapped.channels[:old] != before.channels or (
            not events and mapped.metadata != before.metadata
        ):
            events.append(MetadataChanged(mapped.channels[:old], metadata))
        return events

    @staticmethod
    def _all_inactive(offer: SessionDescription, negotiated: Sequence[Negotiated | None]) -> bool:
        """Hold: no accepted m-line will send us media (inactive, recvonly)."""
        taken = [i for i, n in enumerate(negotiated) if n is not None]
        return bool(taken) and all(offer.direction_of(i) in ("inactive", "recvonly") for i in taken)

    def _answer(self, dialog: _Dialog) -> bytes:
        media_address = self.config.media_address or self.config.host
        # Our own SRTP key per SRTP m-line (RFC 4568 puts one in the answer; we never send
        # with it): kept while the suite's key length stays, so answers repeat it.
        keys = dialog.srtp_keys
        keys += [None] * (len(dialog.negotiated) - len(keys))
        for i, n in enumerate(dialog.negotiated):
            size = SRTP_SUITES[n.crypto.suite] if n is not None and n.crypto is not None else 0
            key = keys[i]
            if size and (key is None or len(key) != size):
                keys[i] = secrets.token_bytes(size)
        result = answer(
            dialog.offer,
            address=media_address,
            ports=dialog.ports,
            session_id=dialog.session_id,
            session_version=dialog.sdp_version,
            negotiated=dialog.negotiated,
            keys=keys,
        )
        dialog.answer = result
        return result.body

    def _plan(self, dialog: _Dialog) -> MediaPlan:
        streams: list[MediaStream] = []
        for channel, mline in enumerate(dialog.channels.mlines):
            n = dialog.negotiated[mline] if mline < len(dialog.negotiated) else None
            port = dialog.ports[mline] if mline < len(dialog.ports) else 0
            if n is None or port == 0:
                continue
            connection = dialog.offer.connection_of(mline)
            media = dialog.offer.media[mline]
            streams.append(
                MediaStream(
                    mline=mline,
                    local_port=port,
                    remote=_address(connection.address if connection else None, media.port),
                    config=StreamConfig(
                        channel=channel,
                        codec=n.codec,
                        payload_type=n.payload_type,
                        clock_rate=n.clock_rate,
                        telephone_event=n.telephone_event,
                        comfort_noise=tuple(sorted({13, *n.comfort_noise})),
                        srtp=n.crypto,
                    ),
                    direction=dialog.offer.direction_of(mline),
                )
            )
        return MediaPlan(dialog.call_id, tuple(streams))

    def _source_ids(self, dialog: _Dialog) -> dict[str, str]:
        ids = {"sip_call_id": dialog.call_id}
        md = dialog.metadata
        if md is not None and md.session_ids:
            ids["siprec_session_id"] = md.session_ids[0]
        session = dialog.invite.headers.get("Session-ID")
        if session:
            ids["session_id"] = session.split(";", 1)[0].strip()
        return ids

    def _contact(self, transport: str) -> str:
        suffix = "" if transport == "udp" else f";transport={transport}"
        port = self.config.port_for(transport)
        return f"<sip:{self.config.user}@{self.config.host}:{port}{suffix}>;+sip.srs"

    def _capabilities(self) -> list[tuple[str, str]]:
        return [
            ("Allow", ALLOW),
            ("Accept", ACCEPT),
            ("Supported", ", ".join(sorted(self.config.supported))),
            ("Server", self.config.user_agent),
        ]

    def _answer_invite(
        self,
        dialog: _Dialog,
        request: SipRequest,
        status: int,
        sdp: bytes | None,
        now: float,
        source: Address | None = None,
        transport: str | None = None,
    ) -> Send:
        """The final response to an INVITE of ``dialog``, sent where the INVITE came from
        (``source``/``transport``; by default the dialog's first INVITE's)."""
        source = source or dialog.source
        transport = transport or dialog.transport
        headers = [
            ("Contact", self._contact(transport)),
            *self._capabilities(),
        ]
        session = request.headers.get("Session-ID")
        if session:
            remote = session.split(";", 1)[0].strip()
            headers.append(("Session-ID", f"{dialog.local_uuid};remote={remote}"))
        if sdp is not None:
            headers.append(("Content-Type", "application/sdp"))
        response = build_response(
            request, status, None, headers, sdp or b"", to_tag=dialog.local_tag
        )
        return self._send_final(request, response, source, transport, now)

    def _send_final(
        self,
        request: SipRequest,
        response: SipResponse,
        destination: Address,
        transport: str,
        now: float,
    ) -> Send:
        """Send a final answer to INVITE: cached for retransmitted INVITEs, repeated until ACK."""
        t1 = self.config.t1
        self._cache[self._cache_key(request)] = _Cached(response, now + 64 * t1)
        reliable = transport in RELIABLE
        self._retransmits[(request.call_id, request.cseq[0])] = _Retransmit(
            response=response,
            destination=destination,
            transport=transport,
            next_at=now + (64 * t1 if reliable else t1),
            interval=t1,
            give_up_at=now + 64 * t1,
            call_id=request.call_id,
            success=200 <= response.status < 300,
        )
        return Send(response, destination, transport)

    def _reply(
        self,
        request: SipRequest,
        status: int,
        source: Address,
        transport: str,
        now: float,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Send:
        """Answer a request; INVITE finals go through :meth:`_send_final`."""
        dialog = self._dialogs.get(request.call_id)
        tag = dialog.local_tag if dialog is not None else None
        response = build_response(request, status, None, headers, body, to_tag=tag)
        if request.method == "INVITE" and status >= 200:
            return self._send_final(request, response, source, transport, now)
        if status >= 200:
            self._cache[self._cache_key(request)] = _Cached(response, now + 64 * self.config.t1)
        return Send(response, source, transport)

    def _refuse(
        self,
        request: SipRequest,
        source: Address,
        transport: str,
        status: int,
        reason: str,
        now: float,
        headers: Sequence[tuple[str, str]] = (),
    ) -> list[Output]:
        return [
            self._reply(request, status, source, transport, now, headers),
            Rejected(source, status, reason, request.method, request.call_id),
        ]

    def _end(self, dialog: _Dialog, reason: str) -> list[Output]:
        self._dialogs.pop(dialog.call_id, None)
        for key in [k for k in self._retransmits if k[0] == dialog.call_id]:
            del self._retransmits[key]
        self.ports.release(dialog.call_id)
        return [
            CallEvent(dialog.call_id, CallEnded(reason)),
            CallReleased(dialog.call_id, reason),
        ]

    @staticmethod
    def _cache_key(request: SipRequest) -> tuple[str, str, int, str]:
        via = request.headers.get("Via") or ""
        branch = via_branch(via) or via
        method = "INVITE" if request.method == "ACK" else request.method
        return (request.call_id, branch, request.cseq[0], method)
