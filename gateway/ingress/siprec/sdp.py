"""SDP (RFC 4566) offers from a SIPREC client and the recording server's answer (RFC 3264, 7866).

:func:`parse_sdp` reads what a Session Recording Client offers: one ``m=audio`` per recorded
stream with ``a=label`` (RFC 4574), a direction (``sendonly`` normally, ``inactive`` on hold),
``c=`` at session or media level, ``a=rtpmap``/``a=fmtp``, ``a=rtcp``, ``a=ptime``/``maxptime``.

:func:`negotiate` picks, per m-line, one offered codec in our preference order (PCMU, PCMA, L16
at 8 and 16 kHz by default) plus ``telephone-event`` and comfort noise when offered; m-lines we
cannot take (not audio, no supported codec, port 0, a transport we do not speak) get None.
:func:`answer` renders the answer: the offer's m-line count and order, ``recvonly``
(``inactive`` for an inactive or recvonly offer), port 0 for rejected m-lines, ``a=label``
echoed, our address and ports as given.

SRTP (``RTP/SAVP``, ``RTP/SAVPF``) is keyed by SDES (RFC 4568): the offer's ``a=crypto`` lines
are read in order and the first one we can use is taken (:class:`Crypto`: one of
:data:`SRTP_SUITES`, one inline key of the suite's length, no MKI, no session parameters); the
answer repeats its tag and suite with our own key. Whether SRTP and plain RTP are taken is the
``srtp`` policy: ``off`` (plain RTP only), ``allow`` (both), ``require`` (SRTP only). The keys are
secrets: nothing here logs or renders them but the answer's own ``a=crypto`` line.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.media.codec import Codec

__all__ = [
    "DEFAULT_CODECS",
    "SRTP_SUITES",
    "Connection",
    "Crypto",
    "MediaDescription",
    "Negotiated",
    "RtpMap",
    "SdpAnswer",
    "SdpError",
    "SessionDescription",
    "answer",
    "negotiate",
    "parse_sdp",
]

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")

# RFC 3551 static payload types that matter here (name, clock rate, channels).
STATIC_PAYLOADS: dict[int, tuple[str, int, int]] = {
    0: ("PCMU", 8000, 1),
    3: ("GSM", 8000, 1),
    4: ("G723", 8000, 1),
    8: ("PCMA", 8000, 1),
    9: ("G722", 8000, 1),
    10: ("L16", 44100, 2),
    11: ("L16", 44100, 1),
    13: ("CN", 8000, 1),
    18: ("G729", 8000, 1),
}

# Our preference order: (encoding name, clock rate) -> codec.
DEFAULT_CODECS: tuple[tuple[str, int], ...] = (
    ("PCMU", 8000),
    ("PCMA", 8000),
    ("L16", 8000),
    ("L16", 16000),
)
_CODECS: dict[str, Codec] = {"PCMU": Codec.PCMU, "PCMA": Codec.PCMA, "L16": Codec.L16}
_PLAIN_RTP = frozenset({"RTP/AVP", "RTP/AVPF"})
_SECURE_RTP = frozenset({"RTP/SAVP", "RTP/SAVPF"})
SRTP_POLICIES = ("off", "allow", "require")

# SDES crypto suites we decrypt (RFC 4568, 7714) -> master key + salt length in bytes.
SRTP_SUITES: dict[str, int] = {
    "AES_CM_128_HMAC_SHA1_80": 30,
    "AES_CM_128_HMAC_SHA1_32": 30,
    "AEAD_AES_128_GCM": 28,
    "AEAD_AES_256_GCM": 44,
}


class SdpError(ValueError):
    """The body is not a usable SDP session description."""


@dataclass(frozen=True, slots=True)
class Connection:
    """A ``c=`` line: network type, address type and address (TTL/count suffixes dropped)."""

    nettype: str
    addrtype: str
    address: str


@dataclass(frozen=True, slots=True)
class RtpMap:
    """An ``a=rtpmap`` (or the static default): encoding name, clock rate, channel count."""

    payload_type: int
    encoding: str
    clock_rate: int
    channels: int = 1


@dataclass(frozen=True, slots=True)
class Crypto:
    """One usable SDES ``a=crypto`` line: its tag, suite and master key + salt (a secret:
    kept out of ``repr``)."""

    tag: int
    suite: str
    key: bytes = field(repr=False)


def parse_crypto(value: str) -> Crypto | None:
    """An ``a=crypto`` value, or None when we cannot use it (unknown suite, a key of the wrong
    length, several keys, an MKI, session parameters, or it does not parse)."""
    parts = value.split()
    if len(parts) != 3 or not parts[0].isdigit():
        return None  # a fourth field is a session parameter (UNENCRYPTED_SRTP, KDR, ...)
    tag, suite, params = int(parts[0]), parts[1].upper(), parts[2]
    size = SRTP_SUITES.get(suite)
    if size is None or ";" in params or not params.lower().startswith("inline:"):
        return None
    key_text, *rest = params[len("inline:") :].split("|")
    if any(":" in r for r in rest):  # an MKI (value:length): libsrtp here is keyed without one
        return None
    try:
        key = base64.b64decode(key_text + "=" * (-len(key_text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return Crypto(tag, suite, key) if len(key) == size else None


@dataclass(frozen=True, slots=True)
class MediaDescription:
    """One ``m=`` section. ``direction`` is the media-level attribute (None: not given)."""

    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int = 1
    connection: Connection | None = None
    rtpmaps: tuple[RtpMap, ...] = ()
    fmtp: tuple[tuple[int, str], ...] = ()
    direction: str | None = None
    label: str | None = None
    rtcp_port: int | None = None
    ptime: int | None = None
    maxptime: int | None = None
    attributes: tuple[tuple[str, str | None], ...] = ()

    def rtpmap(self, payload_type: int) -> RtpMap | None:
        """The rtpmap of a payload type, falling back to the RFC 3551 static assignment."""
        for m in self.rtpmaps:
            if m.payload_type == payload_type:
                return m
        static = STATIC_PAYLOADS.get(payload_type)
        if static is None:
            return None
        return RtpMap(payload_type, static[0], static[1], static[2])

    @property
    def payload_types(self) -> tuple[int, ...]:
        """The numeric formats, in offer order (non-numeric formats skipped)."""
        return tuple(int(f) for f in self.formats if f.isdigit() and int(f) < 128)

    @property
    def secure(self) -> bool:
        """SRTP (``RTP/SAVP`` or ``RTP/SAVPF``)."""
        return self.proto.upper() in _SECURE_RTP

    @property
    def crypto(self) -> Crypto | None:
        """The first ``a=crypto`` line we can use, in offer order (the offerer's preference)."""
        for attr, value in self.attributes:
            if attr == "crypto" and value:
                crypto = parse_crypto(value)
                if crypto is not None:
                    return crypto
        return None


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """A parsed SDP body. ``direction`` is the session-level attribute (None: not given)."""

    origin: str
    session_name: str
    connection: Connection | None
    media: tuple[MediaDescription, ...]
    direction: str | None = None
    attributes: tuple[tuple[str, str | None], ...] = field(default=())

    def direction_of(self, index: int) -> str:
        """The effective direction of m-line ``index`` (media, then session, then sendrecv)."""
        return self.media[index].direction or self.direction or "sendrecv"

    def connection_of(self, index: int) -> Connection | None:
        """The effective ``c=`` of m-line ``index`` (media level, else session level)."""
        return self.media[index].connection or self.connection


def _connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SdpError(f"bad c= line {value!r}")
    return Connection(parts[0], parts[1], parts[2].split("/")[0])


def _int(value: str, what: str) -> int:
    value = value.strip()
    if not value.isdigit():
        raise SdpError(f"bad {what}: {value!r}")
    return int(value)


@dataclass(slots=True)
class _MediaBuilder:
    media: str
    port: int
    port_count: int
    proto: str
    formats: tuple[str, ...]
    connection: Connection | None = None
    rtpmaps: list[RtpMap] = field(default_factory=list)
    fmtp: list[tuple[int, str]] = field(default_factory=list)
    direction: str | None = None
    label: str | None = None
    rtcp_port: int | None = None
    ptime: int | None = None
    maxptime: int | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)

    def add_attribute(self, attr: str, val: str | None) -> None:
        self.attributes.append((attr, val))
        if attr in DIRECTIONS:
            self.direction = attr
        elif attr == "label" and val:
            self.label = val
        elif attr == "rtpmap" and val:
            rtpmap = _rtpmap(val)
            if rtpmap is not None:
                self.rtpmaps.append(rtpmap)
        elif attr == "fmtp" and val:
            pt_text, _, params = val.partition(" ")
            if pt_text.isdigit():
                self.fmtp.append((int(pt_text), params.strip()))
        elif attr == "rtcp" and val:
            port = val.split()[0]
            if port.isdigit():
                self.rtcp_port = int(port)
        elif attr in ("ptime", "maxptime") and val:
            number = val.split(".")[0]
            if number.isdigit():
                if attr == "ptime":
                    self.ptime = int(number)
                else:
                    self.maxptime = int(number)

    def build(self) -> MediaDescription:
        return MediaDescription(
            media=self.media,
            port=self.port,
            proto=self.proto,
            formats=self.formats,
            port_count=self.port_count,
            connection=self.connection,
            rtpmaps=tuple(self.rtpmaps),
            fmtp=tuple(self.fmtp),
            direction=self.direction,
            label=self.label,
            rtcp_port=self.rtcp_port,
            ptime=self.ptime,
            maxptime=self.maxptime,
            attributes=tuple(self.attributes),
        )


def parse_sdp(body: bytes | str) -> SessionDescription:
    """Parse an SDP body (CRLF or LF line ends). Raises :class:`SdpError` when unusable.

    Lenient where vendors are sloppy: unknown lines and attributes are kept or skipped, a
    missing ``v=`` or ``o=`` is tolerated; an ``m=`` line must parse.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    origin = ""
    name = ""
    connection: Connection | None = None
    direction: str | None = None
    attributes: list[tuple[str, str | None]] = []
    media: list[_MediaBuilder] = []
    for raw in re.split(r"\r?\n", text):
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:].strip()
        current = media[-1] if media else None
        if kind == "m":
            parts = value.split()
            if len(parts) < 3:
                raise SdpError(f"bad m= line {value!r}")
            port_text, _, count_text = parts[1].partition("/")
            media.append(
                _MediaBuilder(
                    media=parts[0].lower(),
                    port=_int(port_text, "m= port"),
                    port_count=_int(count_text, "m= port count") if count_text else 1,
                    proto=parts[2],
                    formats=tuple(parts[3:]),
                )
            )
        elif kind == "o" and current is None:
            origin = value
        elif kind == "s" and current is None:
            name = value
        elif kind == "c":
            if current is None:
                connection = _connection(value)
            else:
                current.connection = _connection(value)
        elif kind == "a":
            attr, sep, attr_value = value.partition(":")
            attr = attr.strip().lower()
            val: str | None = attr_value.strip() if sep else None
            if current is not None:
                current.add_attribute(attr, val)
                continue
            if attr in DIRECTIONS:
                direction = attr
            attributes.append((attr, val))
    if not media and not origin:
        raise SdpError("no o= and no m= line: not an SDP body")
    return SessionDescription(
        origin=origin,
        session_name=name,
        connection=connection,
        media=tuple(m.build() for m in media),
        direction=direction,
        attributes=tuple(attributes),
    )


def _rtpmap(value: str) -> RtpMap | None:
    pt_text, _, spec = value.partition(" ")
    parts = spec.strip().split("/")
    if not pt_text.isdigit() or len(parts) < 2 or not parts[1].isdigit():
        return None
    channels = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 1
    return RtpMap(int(pt_text), parts[0], int(parts[1]), channels)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What we take on one m-line: the audio codec and the auxiliary payload types.

    ``payload_type`` carries ``codec`` at ``clock_rate``; ``telephone_event`` (RFC 4733) and
    ``comfort_noise`` (RFC 3389) payload types are the offered ones at the same clock rate.
    """

    codec: Codec
    payload_type: int
    clock_rate: int
    encoding: str
    telephone_event: int | None = None
    telephone_event_fmtp: str | None = None
    comfort_noise: tuple[int, ...] = ()
    ptime: int | None = None
    crypto: Crypto | None = None  # SRTP: the offerer's key we decrypt with (None: plain RTP)


def _transport_ok(m: MediaDescription, srtp: str) -> bool:
    proto = m.proto.upper()
    if proto in _PLAIN_RTP:
        return srtp != "require"
    return proto in _SECURE_RTP and srtp != "off" and m.crypto is not None


def negotiate(
    offer: SessionDescription,
    codecs: Sequence[tuple[str, int]] = DEFAULT_CODECS,
    *,
    telephone_event: bool = True,
    srtp: str = "allow",
) -> tuple[Negotiated | None, ...]:
    """Per m-line of ``offer``: the codec we take, or None when we cannot record it.

    ``codecs`` is our preference order of (encoding name, clock rate); mono only. An m-line is
    rejected when it is not audio, has port 0, offers none of ``codecs``, or its transport is
    not one ``srtp`` (see :data:`SRTP_POLICIES`) lets us take: plain RTP, or SRTP with a usable
    ``a=crypto`` line (UDPTL and others never).
    """
    if srtp not in SRTP_POLICIES:
        raise ValueError(f"srtp policy {srtp!r} is not one of {', '.join(SRTP_POLICIES)}")
    wanted = [(name.upper(), rate) for name, rate in codecs]
    out: list[Negotiated | None] = []
    for m in offer.media:
        if m.media != "audio" or m.port == 0 or not _transport_ok(m, srtp):
            out.append(None)
            continue
        maps = [r for r in (m.rtpmap(pt) for pt in m.payload_types) if r is not None]
        choice: RtpMap | None = None
        for name, rate in wanted:
            choice = next(
                (
                    r
                    for r in maps
                    if r.encoding.upper() == name and r.clock_rate == rate and r.channels == 1
                ),
                None,
            )
            if choice is not None:
                break
        if choice is None or choice.encoding.upper() not in _CODECS:
            out.append(None)
            continue
        rate = choice.clock_rate
        te = next(
            (
                r.payload_type
                for r in maps
                if r.encoding.lower() == "telephone-event" and r.clock_rate == rate
            ),
            None,
        )
        if not telephone_event:
            te = None
        te_fmtp = dict(m.fmtp).get(te) if te is not None else None
        cn = tuple(r.payload_type for r in maps if r.encoding.upper() == "CN")
        out.append(
            Negotiated(
                codec=_CODECS[choice.encoding.upper()],
                payload_type=choice.payload_type,
                clock_rate=rate,
                encoding=choice.encoding,
                telephone_event=te,
                telephone_event_fmtp=te_fmtp,
                comfort_noise=cn,
                ptime=m.ptime,
                crypto=m.crypto if m.secure else None,
            )
        )
    return tuple(out)


def answer_direction(offered: str) -> str:
    """Our direction for an offered one: we only ever receive (RFC 3264 6.1)."""
    return "recvonly" if offered in ("sendonly", "sendrecv") else "inactive"


@dataclass(frozen=True, slots=True)
class SdpAnswer:
    """The rendered answer and, per offered m-line, what was accepted (None: port 0)."""

    body: bytes
    streams: tuple[Negotiated | None, ...]

    @property
    def accepted(self) -> int:
        """How many m-lines were accepted."""
        return sum(1 for s in self.streams if s is not None)


def answer(
    offer: SessionDescription,
    *,
    address: str,
    ports: Sequence[int],
    session_id: int = 1,
    session_version: int = 1,
    username: str = "callgate",
    negotiated: Sequence[Negotiated | None] | None = None,
    codecs: Sequence[tuple[str, int]] = DEFAULT_CODECS,
    keys: Sequence[bytes | None] = (),
) -> SdpAnswer:
    """Render the SRS answer to ``offer``.

    ``ports[i]`` is our RTP port for m-line ``i`` (ignored where the m-line is rejected; RTCP is
    the next port up, as RFC 3550 defaults). ``negotiated`` is :func:`negotiate`'s result (computed
    from ``codecs`` when None); an accepted m-line whose port is 0 is rejected too. ``address``
    is our media address (IPv4 or IPv6). ``keys[i]`` is our own SRTP master key + salt for an
    accepted SRTP m-line ``i`` (RFC 4568 wants one in the answer even from a receiver; its
    length must suit the chosen suite). Raises ValueError when ``ports`` is too short or an SRTP
    m-line has no key of the right length.
    """
    chosen = tuple(negotiated) if negotiated is not None else negotiate(offer, codecs)
    if len(ports) < len(offer.media) or len(chosen) != len(offer.media):
        raise ValueError(f"need one port and one choice per m-line ({len(offer.media)})")
    addrtype = "IP6" if ":" in address else "IP4"
    lines = [
        "v=0",
        f"o={username} {session_id} {session_version} IN {addrtype} {address}",
        "s=-",
        f"c=IN {addrtype} {address}",
        "t=0 0",
    ]
    final: list[Negotiated | None] = []
    for i, m in enumerate(offer.media):
        n = chosen[i]
        if n is None or ports[i] == 0:
            final.append(None)
            lines.append(f"m={m.media} 0 {m.proto} {' '.join(m.formats[:1]) or '0'}")
            if m.label is not None:
                lines.append(f"a=label:{m.label}")
            continue
        final.append(n)
        pts = [n.payload_type] + ([n.telephone_event] if n.telephone_event is not None else [])
        lines.append(f"m=audio {ports[i]} {m.proto} {' '.join(str(p) for p in pts)}")
        lines.append(f"a=rtpmap:{n.payload_type} {n.encoding}/{n.clock_rate}")
        if n.telephone_event is not None:
            lines.append(f"a=rtpmap:{n.telephone_event} telephone-event/{n.clock_rate}")
            if n.telephone_event_fmtp:
                lines.append(f"a=fmtp:{n.telephone_event} {n.telephone_event_fmtp}")
        if n.ptime is not None:
            lines.append(f"a=ptime:{n.ptime}")
        if n.crypto is not None:
            key = keys[i] if i < len(keys) else None
            if key is None or len(key) != SRTP_SUITES[n.crypto.suite]:
                raise ValueError(f"m-line {i}: no {n.crypto.suite} key of our own")
            inline = base64.b64encode(key).decode("ascii")
            lines.append(f"a=crypto:{n.crypto.tag} {n.crypto.suite} inline:{inline}")
        if m.label is not None:
            lines.append(f"a=label:{m.label}")
        lines.append(f"a={answer_direction(offer.direction_of(i))}")
    # UTF-8: SDP's default character set (RFC 4566 5.13); an offer's a=label may use it.
    return SdpAnswer(("\r\n".join(lines) + "\r\n").encode("utf-8"), tuple(final))
