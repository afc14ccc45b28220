"""Test helpers for SIPREC over real loopback sockets: a small SIP UDP/TCP client acting as the
Session Recording Client (an SBC), offer bodies with rs-metadata, and an RTP sender that plays
two channels as PCMU at real time to the ports of the gateway's answer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pylibsrtp

from gateway.config import Settings
from gateway.ingress.siprec.message import (
    ParseError,
    SipParser,
    SipRequest,
    SipResponse,
    parse_name_addr,
)
from gateway.ingress.siprec.service import SIPREC, SiprecService
from gateway.media.codec import Codec, encode, silence
from gateway.stt.session import SttEngine
from tests.gateway_server import Gateway, ingress_settings_for, running_gateway

NAMES = ("Alice Customer", "Bob Agent")
AORS = ("sip:+15550100001@carrier.example", "sip:agent-7@pbx.example")
BOUNDARY = "callgate-test-boundary"


def siprec_settings(
    data_dir: Path, *, sections: dict[str, dict[str, Any]] | None = None, **siprec: Any
) -> Settings:
    """Gateway settings with SIPREC on loopback (ephemeral SIP ports) plus ``[siprec]``
    overrides, and other sections' overrides in ``sections``."""
    conf: dict[str, Any] = {
        "enabled": True,
        "host": "127.0.0.1",
        "udp_port": 0,
        "tcp_port": 0,
        "allowlist": ["127.0.0.0/8"],
        "rtp_port_min": 42000,
        "rtp_port_max": 43999,
    }
    conf.update(siprec)
    return ingress_settings_for(data_dir, **(sections or {}), siprec=conf)


@asynccontextmanager
async def siprec_gateway(
    settings: Settings, engine: SttEngine | None = None
) -> AsyncIterator[tuple[Gateway, SiprecService]]:
    """The gateway app with its SIPREC service started; drained and cleaned up on exit."""
    async with running_gateway(settings, engine) as gw:
        yield gw, gw.app[SIPREC]


# -- bodies ------------------------------------------------------------------------------------


PAYLOAD_TYPES = {Codec.PCMU: 0, Codec.PCMA: 8}


def sdp_offer(
    ports: Sequence[int],
    *,
    direction: str = "sendonly",
    address: str = "127.0.0.1",
    codec: Codec = Codec.PCMU,
    srtp_key: bytes | None = None,
) -> str:
    """One m-line per port; with ``srtp_key``, RTP/SAVP keyed by it (AES_CM_128_HMAC_SHA1_80)."""
    pt = PAYLOAD_TYPES[codec]
    lines = ["v=0", f"o=SRC 4242 1 IN IP4 {address}", "s=SIPREC", f"c=IN IP4 {address}", "t=0 0"]
    proto = "RTP/AVP" if srtp_key is None else "RTP/SAVP"
    for i, port in enumerate(ports):
        lines += [
            f"m=audio {port} {proto} {pt} 101",
            f"a=rtpmap:{pt} {codec.value.upper()}/8000",
            "a=rtpmap:101 telephone-event/8000",
            "a=ptime:20",
            f"a=label:{i + 1}",
            f"a={direction}",
        ]
        if srtp_key is not None:
            inline = base64.b64encode(srtp_key).decode()
            lines.append(f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{inline}")
    return "\r\n".join(lines) + "\r\n"


def rs_metadata(names: Sequence[str] = NAMES, aors: Sequence[str] = AORS) -> str:
    """RFC 7865 metadata: participant i sends stream label i+1."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<recording xmlns="urn:ietf:params:xml:ns:recording:1">',
        "<datamode>complete</datamode>",
        '<session session_id="c2Vzc2lvbi0x"><sipSessionID>abc;remote=def</sipSessionID></session>',
    ]
    for i, (name, aor) in enumerate(zip(names, aors, strict=True)):
        parts.append(
            f'<participant participant_id="p{i}"><nameID aor="{aor}"><name>{name}</name>'
            "</nameID></participant>"
        )
    for i in range(len(names)):
        parts.append(
            f'<stream stream_id="s{i}" session_id="c2Vzc2lvbi0x"><label>{i + 1}</label></stream>'
        )
    for i in range(len(names)):
        recv = "".join(f"<recv>s{j}</recv>" for j in range(len(names)) if j != i)
        parts.append(
            f'<participantstreamassoc participant_id="p{i}"><send>s{i}</send>{recv}'
            "</participantstreamassoc>"
        )
    parts.append("</recording>")
    return "\r\n".join(parts) + "\r\n"


def multipart(sdp: str, metadata: str | None) -> tuple[str, bytes]:
    """(Content-Type, body) of a SIPREC offer: SDP plus rs-metadata."""
    if metadata is None:
        return "application/sdp", sdp.encode()
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/sdp\r\n\r\n{sdp}"
        f"--{BOUNDARY}\r\nContent-Type: application/rs-metadata+xml\r\n"
        f"Content-Disposition: recording-session\r\n\r\n{metadata}"
        f"--{BOUNDARY}--\r\n"
    )
    return f"multipart/mixed;boundary={BOUNDARY}", body.encode()


# -- SIP messages ------------------------------------------------------------------------------


@dataclass
class Dialog:
    """What the client side knows of one recording dialog."""

    call_id: str
    local: tuple[str, int]
    target: tuple[str, int]
    transport: str = "UDP"
    from_tag: str = field(default_factory=lambda: secrets.token_hex(4))
    to_tag: str | None = None
    cseq: int = 1
    invite_branch: str = ""

    @property
    def _uri_params(self) -> str:
        # A TLS client's Contact says so (where in-dialog requests must come over TLS).
        return ";transport=tls" if self.transport == "TLS" else ""

    def request(
        self,
        method: str,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        cseq: int | None = None,
        branch: str | None = None,
        in_dialog: bool = True,
        extra: Sequence[tuple[str, str]] = (),
        omit: Sequence[str] = (),
    ) -> bytes:
        host, port = self.target
        to = f"<sip:srs@{host}:{port}>"
        if in_dialog and self.to_tag:
            to += f";tag={self.to_tag}"
        branch = branch or f"z9hG4bK{secrets.token_hex(6)}"
        headers = [
            ("Via", f"SIP/2.0/{self.transport} {self.local[0]}:{self.local[1]};branch={branch}"),
            ("Max-Forwards", "70"),
            ("From", f'"SBC" <sip:src@{self.local[0]}>;tag={self.from_tag}'),
            ("To", to),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq if cseq is None else cseq} {method}"),
            ("Contact", f"<sip:src@{self.local[0]}:{self.local[1]}{self._uri_params}>;+sip.src"),
            *extra,
        ]
        if content_type:
            headers.append(("Content-Type", content_type))
        headers.append(("Content-Length", str(len(body))))
        head = f"{method} sip:srs@{host}:{port} SIP/2.0\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers if k not in omit)
        if method == "INVITE" and not in_dialog:
            self.invite_branch = branch
        return head.encode() + b"\r\n" + body

    def invite(self, ports: Sequence[int] = (30000, 30002), **kwargs: Any) -> bytes:
        metadata = kwargs.pop("metadata", rs_metadata())
        content_type, body = multipart(sdp_offer(ports, **kwargs), metadata)
        extra = [("Require", "siprec"), ("Supported", "siprec")]
        return self.request(
            "INVITE", body=body, content_type=content_type, in_dialog=False, extra=extra
        )

    def reinvite(
        self,
        ports: Sequence[int] = (30000, 30002),
        direction: str = "sendonly",
        codec: Codec = Codec.PCMU,
        metadata: str | None = None,
    ) -> bytes:
        self.cseq += 1
        sdp = sdp_offer(ports, direction=direction, codec=codec)
        content_type, body = multipart(sdp, metadata)
        return self.request("INVITE", body=body, content_type=content_type)

    def ack(self, cseq: int | None = None) -> bytes:
        return self.request("ACK", cseq=cseq if cseq is not None else self.cseq)

    def bye(self) -> bytes:
        self.cseq += 1
        return self.request("BYE")

    def cancel(self) -> bytes:
        return self.request("CANCEL", branch=self.invite_branch, in_dialog=False)


def answer_ports(response: SipResponse) -> list[int]:
    """The m-line ports of an SDP answer, in order."""
    return [int(p) for p in re.findall(rb"^m=audio (\d+) ", response.body, re.MULTILINE)]


def _lenient(result: SipResponse | SipRequest | ParseError | None, data: bytes) -> Any:
    """A response our strict parser refuses (a 400 to a request without Call-ID has none
    either) still shows its status."""
    if isinstance(result, ParseError) and data.startswith(b"SIP/2.0 "):
        status, _, reason = data.split(b"\r\n", 1)[0][8:].decode().partition(" ")
        return SipResponse(int(status), reason, result.headers)
    return result


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[SipResponse | SipRequest] = asyncio.Queue()
        self.parser = SipParser(max_body_bytes=1 << 20)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        result = _lenient(self.parser.feed_datagram(data), data)
        if isinstance(result, SipResponse | SipRequest):
            self.queue.put_nowait(result)


class SipTcpClient:
    """A TCP SIP peer: one connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        sockname = writer.get_extra_info("sockname")
        self.local: tuple[str, int] = (sockname[0], sockname[1])
        self.parser = SipParser(max_body_bytes=1 << 20)
        self.pending: list[SipResponse | SipRequest] = []

    @classmethod
    async def open(cls, port: int) -> SipTcpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def dialog(self, target: tuple[str, int]) -> Dialog:
        return Dialog(f"{secrets.token_hex(8)}@sbc.test", self.local, target, "TCP")

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def expect(self, *statuses: int, within_s: float = 5.0) -> SipResponse:
        async with asyncio.timeout(within_s):
            while not self.pending:
                chunk = await self.reader.read(65536)
                assert chunk, "connection closed"
                for result in self.parser.feed(chunk):
                    result = _lenient(result, chunk)
                    if isinstance(result, SipResponse | SipRequest):
                        self.pending.append(result)
        msg = self.pending.pop(0)
        assert isinstance(msg, SipResponse), msg
        assert msg.status in statuses, (msg.status, msg.reason)
        return msg

    def close(self) -> None:
        self.writer.close()


class SipUdpClient:
    """A UDP SIP peer on ``host`` (any free port)."""

    def __init__(self, transport: asyncio.DatagramTransport, protocol: _Client) -> None:
        self.transport = transport
        self.protocol = protocol
        sockname = transport.get_extra_info("sockname")
        self.local: tuple[str, int] = (sockname[0], sockname[1])

    @classmethod
    async def open(cls, host: str = "127.0.0.1") -> SipUdpClient:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(_Client, local_addr=(host, 0))
        return cls(transport, protocol)

    def dialog(self, target: tuple[str, int], call_id: str | None = None) -> Dialog:
        return Dialog(call_id or f"{secrets.token_hex(8)}@sbc.test", self.local, target)

    def send(self, data: bytes, target: tuple[str, int]) -> None:
        self.transport.sendto(data, target)

    async def receive(self, within_s: float = 5.0) -> SipResponse | SipRequest:
        return await asyncio.wait_for(self.protocol.queue.get(), within_s)

    async def expect(self, *statuses: int, within_s: float = 5.0) -> SipResponse:
        """The next response, which must have one of ``statuses``."""
        msg = await self.receive(within_s)
        assert isinstance(msg, SipResponse), msg
        assert msg.status in statuses, (msg.status, msg.reason)
        return msg

    async def quiet(self, seconds: float) -> list[SipResponse | SipRequest]:
        """Everything received within ``seconds``."""
        got: list[SipResponse | SipRequest] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    got.append(await self.protocol.queue.get())
        return got

    def close(self) -> None:
        self.transport.close()


async def establish(
    client: SipUdpClient, target: tuple[str, int], **offer: Any
) -> tuple[Dialog, SipResponse]:
    """INVITE -> 100, 200 -> ACK; returns the dialog and the 200."""
    dialog = client.dialog(target)
    client.send(dialog.invite(**offer), target)
    await client.expect(100)
    ok = await client.expect(200)
    dialog.to_tag = parse_name_addr(ok.headers.get("To") or "").tag
    client.send(dialog.ack(), target)
    return dialog, ok


async def establish_stream(client: SipTcpClient, dialog: Dialog) -> SipResponse:
    """:func:`establish` over a TCP or TLS connection: INVITE -> 100, 200 -> ACK (drained);
    returns the 200."""
    client.send(dialog.invite())
    await client.expect(100)
    ok = await client.expect(200)
    dialog.to_tag = parse_name_addr(ok.headers.get("To") or "").tag
    client.send(dialog.ack())
    await client.writer.drain()
    return ok


# -- RTP ---------------------------------------------------------------------------------------


def rtp_packet(seq: int, ts: int, ssrc: int, payload: bytes, pt: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


async def play_rtp(
    targets: Sequence[tuple[str, int]],
    pcm16: Sequence[bytes],
    *,
    frame_ms: int = 20,
    speed: float = 1.0,
    codec: Codec = Codec.PCMU,
    srtp_key: bytes | None = None,
) -> int:
    """Send each channel's PCM16 (8 kHz) as ``codec`` RTP to its target at real time
    (x ``speed``), from one socket per stream (as an SBC does); with ``srtp_key``, as SRTP
    protected by libsrtp (AES_CM_128_HMAC_SHA1_80). Returns the packets sent per stream."""
    loop = asyncio.get_running_loop()
    socks = []
    for _ in targets:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    payloads = [encode(codec, pcm) for pcm in pcm16]
    pt = PAYLOAD_TYPES[codec]
    step = 8 * frame_ms
    frames = max(len(p) for p in payloads) // step
    ssrcs = [secrets.randbits(32) for _ in targets]
    seq0 = [secrets.randbits(16) for _ in targets]
    ts0 = [secrets.randbits(32) for _ in targets]
    protect = None
    if srtp_key is not None:
        policy = pylibsrtp.Policy(
            key=srtp_key,
            ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
            srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
        )
        protect = pylibsrtp.Session(policy=policy).protect
    t0 = loop.time()
    try:
        for i in range(frames):
            due = t0 + i * frame_ms / 1000 / speed
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            for k, (sock, target) in enumerate(zip(socks, targets, strict=True)):
                chunk = payloads[k][i * step : (i + 1) * step]
                if len(chunk) < step:
                    chunk += silence(codec, step - len(chunk))
                packet = rtp_packet(seq0[k] + i, ts0[k] + i * step, ssrcs[k], chunk, pt)
                if protect is not None:
                    packet = protect(packet)
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(packet, target)
    finally:
        for sock in socks:
            sock.close()
    return frames
