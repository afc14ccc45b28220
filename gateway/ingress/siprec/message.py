"""SIP messages (RFC 3261): a sans-I/O parser, the message model and response building.

:class:`SipParser` is fed what the transport read and returns parsed messages or typed
:class:`ParseError` values; it never raises on input and never does I/O:

- datagram transports (UDP) call :meth:`SipParser.feed_datagram` once per datagram, which is one
  message (RFC 3261 18.3: bytes beyond ``Content-Length`` are discarded, fewer are an error);
- stream transports (TCP, TLS) call :meth:`SipParser.feed` with whatever arrived; messages are
  framed by ``Content-Length`` (missing means 0), keep-alive CRLFs between messages are skipped.

A :class:`ParseError` carries the status to answer (400, 413, 513) or ``None`` for "drop": no
response is possible (no Via, or the message was a response). :func:`error_response` builds that
answer from the headers the error kept. ``ParseError.fatal`` tells a stream transport the framing
is lost and the connection must be closed after answering.

Header names are case-insensitive and compact forms (``i``, ``f``, ``t``, ``v``, ``m``, ``l``,
``c``, ``k``, ``s``, ...) are expanded to their long names on parse; folded lines (a line starting
with blanks continues the previous one) are unfolded. Serialization always writes long names and
computes ``Content-Length``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "COMPACT_FORMS",
    "REASONS",
    "Headers",
    "NameAddr",
    "ParseError",
    "ParseErrorKind",
    "SipMessage",
    "SipParser",
    "SipRequest",
    "SipResponse",
    "build_response",
    "error_response",
    "header_params",
    "parse_cseq",
    "parse_name_addr",
    "split_list",
]

SIP_VERSION = "SIP/2.0"

COMPACT_FORMS: dict[str, str] = {
    "i": "Call-ID",
    "f": "From",
    "t": "To",
    "v": "Via",
    "m": "Contact",
    "l": "Content-Length",
    "c": "Content-Type",
    "k": "Supported",
    "s": "Subject",
    "e": "Content-Encoding",
    "o": "Event",
    "r": "Refer-To",
    "b": "Referred-By",
    "u": "Allow-Events",
    "x": "Session-Expires",
    "a": "Accept-Contact",
    "j": "Reject-Contact",
    "d": "Request-Disposition",
    "y": "Identity",
}

# Canonical spellings for headers whose capitalization is not plain Title-Case.
_CANONICAL: dict[str, str] = {
    name.lower(): name
    for name in (
        "Call-ID",
        "CSeq",
        "WWW-Authenticate",
        "Session-ID",
        "MIME-Version",
        "RSeq",
        "RAck",
        "P-Asserted-Identity",
    )
}

REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    513: "Message Too Large",
}

_TOKEN = r"[A-Za-z0-9.!%*_+`'~-]+"
_REQUEST_LINE = re.compile(rf"^({_TOKEN}) (\S+) (SIP/\d+\.\d+)$")
_STATUS_LINE = re.compile(r"^(SIP/\d+\.\d+) ([1-6]\d\d) ?(.*)$")
_HEADER_NAME = re.compile(rf"^{_TOKEN}$")
_REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")


def canonical_name(name: str) -> str:
    """The long, conventionally capitalized form of a header name (compact forms expanded)."""
    low = name.strip().lower()
    if low in COMPACT_FORMS:
        return COMPACT_FORMS[low]
    if low in _CANONICAL:
        return _CANONICAL[low]
    return "-".join(part.capitalize() for part in low.split("-"))


@dataclass(frozen=True, slots=True)
class Headers:
    """Ordered header fields; lookups are case-insensitive and know the compact forms.

    Each item is one header line as ``(canonical name, value)``. A header that appears on several
    lines, or with comma-separated values on one line, is read with :meth:`get_list`.
    """

    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> Headers:
        """Headers from ``(name, value)`` pairs, names canonicalized."""
        return cls(tuple((canonical_name(n), v) for n, v in pairs))

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        key = canonical_name(name)
        for n, v in self.items:
            if n == key:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        """Every line's value of ``name``, in order (not split at commas)."""
        key = canonical_name(name)
        return [v for n, v in self.items if n == key]

    def get_list(self, name: str) -> list[str]:
        """Every value of a list header (``Via``, ``Require``, ...), split at top-level commas."""
        return [item for v in self.get_all(name) for item in split_list(v)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def replace(self, name: str, value: str | None) -> Headers:
        """A copy with every ``name`` line removed and, unless ``value`` is None, one appended."""
        key = canonical_name(name)
        kept = tuple((n, v) for n, v in self.items if n != key)
        return Headers(kept + (((key, value),) if value is not None else ()))


@dataclass(frozen=True, slots=True)
class SipRequest:
    """A parsed (or to-be-sent) SIP request."""

    method: str
    uri: str
    headers: Headers
    body: bytes = b""
    version: str = SIP_VERSION

    @property
    def call_id(self) -> str:
        """The Call-ID (the parser guarantees it is present)."""
        return self.headers.get("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        """``(sequence number, method)`` from CSeq (the parser guarantees it parses)."""
        return parse_cseq(self.headers.get("CSeq") or "")

    @property
    def content_type(self) -> str | None:
        """The Content-Type value, or None."""
        return self.headers.get("Content-Type")

    def to_bytes(self) -> bytes:
        """Serialize with long header names and a computed Content-Length."""
        return _serialize(f"{self.method} {self.uri} {self.version}", self.headers, self.body)


@dataclass(frozen=True, slots=True)
class SipResponse:
    """A parsed (or to-be-sent) SIP response."""

    status: int
    reason: str
    headers: Headers
    body: bytes = b""
    version: str = SIP_VERSION

    @property
    def call_id(self) -> str:
        """The Call-ID, or "" if missing."""
        return self.headers.get("Call-ID") or ""

    def to_bytes(self) -> bytes:
        """Serialize with long header names and a computed Content-Length."""
        return _serialize(f"{self.version} {self.status} {self.reason}", self.headers, self.body)


SipMessage = SipRequest | SipResponse


def _serialize(start: str, headers: Headers, body: bytes) -> bytes:
    lines = [start]
    lines += [f"{n}: {v}" for n, v in headers.items if n != "Content-Length"]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


class ParseErrorKind(StrEnum):
    """Why a message could not be accepted."""

    BAD_START_LINE = "bad_start_line"
    BAD_HEADER = "bad_header"
    MISSING_HEADER = "missing_header"
    BAD_CSEQ = "bad_cseq"
    BAD_CONTENT_LENGTH = "bad_content_length"
    CONTENT_LENGTH_MISMATCH = "content_length_mismatch"
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    MESSAGE_TOO_LARGE = "message_too_large"
    BAD_ENCODING = "bad_encoding"


@dataclass(frozen=True, slots=True)
class ParseError:
    """A message that cannot be processed.

    ``status`` is what to answer (400, 413 or 513) or None to drop it silently (a response, or a
    request with no Via to answer to). ``headers`` holds whatever headers could be read, for
    :func:`error_response`. ``fatal`` means a stream transport lost the framing and must close.
    """

    kind: ParseErrorKind
    detail: str
    status: int | None
    headers: Headers = field(default_factory=Headers)
    method: str | None = None
    fatal: bool = False


ParseResult = SipRequest | SipResponse | ParseError


class SipParser:
    """Sans-I/O SIP message parser for one transport connection (or one UDP socket).

    Limits: ``max_header_bytes`` bounds the start line plus headers (larger: 513),
    ``max_body_bytes`` bounds the body (larger: 413), ``max_datagram_bytes`` bounds a datagram
    (larger: 513). One parser per TCP connection; one can serve a whole UDP socket.
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = 16 * 1024,
        max_body_bytes: int = 64 * 1024,
        max_datagram_bytes: int = 65535,
    ) -> None:
        """Create a parser with the given size limits (bytes)."""
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_datagram_bytes = max_datagram_bytes
        self._buf = bytearray()
        self._discard = 0  # stream bytes of an oversized body still to skip
        # RFC 5626 4.4.1 keep-alive pings (CRLFCRLF between messages) seen on the stream; the
        # transport answers each with a CRLF pong.
        self.pings = 0
        self._crlfs = 0  # consecutive CRLFs at a message boundary

    # -- datagrams -------------------------------------------------------------------------

    def feed_datagram(self, data: bytes) -> ParseResult | None:
        """Parse one datagram as one message. None for a keep-alive (only blanks)."""
        if not data.strip():
            return None
        if len(data) > self.max_datagram_bytes:
            head = self._peek_head(data)
            return self._error(
                ParseErrorKind.MESSAGE_TOO_LARGE,
                f"datagram of {len(data)} bytes (max {self.max_datagram_bytes})",
                513,
                head,
            )
        data = data.lstrip(b"\r\n")
        end = data.find(b"\r\n\r\n")
        sep = 4
        if end < 0:
            end = data.find(b"\n\n")
            sep = 2
        if end < 0:  # no blank line: headers only
            end, sep = len(data), 0
        if end > self.max_header_bytes:
            return self._error(
                ParseErrorKind.HEADERS_TOO_LARGE,
                f"header section of {end} bytes (max {self.max_header_bytes})",
                513,
                self._peek_head(data),
            )
        parsed = self._parse_head(bytes(data[:end]))
        if isinstance(parsed, ParseError):
            return parsed
        body = bytes(data[end + sep :])
        length_value = parsed.headers.get("Content-Length")
        if length_value is not None:
            length = _parse_length(length_value)
            if length is None:
                return _from_message(
                    parsed, ParseErrorKind.BAD_CONTENT_LENGTH, f"Content-Length {length_value!r}"
                )
            if length > self.max_body_bytes:
                return _from_message(
                    parsed,
                    ParseErrorKind.BODY_TOO_LARGE,
                    f"body of {length} bytes (max {self.max_body_bytes})",
                    413,
                )
            if len(body) < length:
                return _from_message(
                    parsed,
                    ParseErrorKind.CONTENT_LENGTH_MISMATCH,
                    f"Content-Length {length} but {len(body)} body bytes",
                )
            body = body[:length]
        elif len(body) > self.max_body_bytes:
            return _from_message(
                parsed,
                ParseErrorKind.BODY_TOO_LARGE,
                f"body of {len(body)} bytes (max {self.max_body_bytes})",
                413,
            )
        return _with_body(parsed, body)

    # -- streams ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[ParseResult]:
        """Add stream bytes; return every message (or error) completed by them, in order."""
        out: list[ParseResult] = []
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
        self._buf += data
        while True:
            if self._discard:
                skip = min(self._discard, len(self._buf))
                self._discard -= skip
                del self._buf[:skip]
                if self._discard:
                    break
            while self._buf[:2] == b"\r\n":  # keep-alives between messages (RFC 5626)
                del self._buf[:2]
                self._crlfs += 1
                if self._crlfs == 2:
                    self.pings += 1
                    self._crlfs = 0
            if not self._buf:
                break
            self._crlfs = 0
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > self.max_header_bytes:
                    out.append(
                        self._error(
                            ParseErrorKind.HEADERS_TOO_LARGE,
                            f"no end of headers within {self.max_header_bytes} bytes",
                            513,
                            self._peek_head(bytes(self._buf)),
                            fatal=True,
                        )
                    )
                    self._buf.clear()
                break
            if end > self.max_header_bytes:
                out.append(
                    self._error(
                        ParseErrorKind.HEADERS_TOO_LARGE,
                        f"header section of {end} bytes (max {self.max_header_bytes})",
                        513,
                        self._peek_head(bytes(self._buf)),
                        fatal=True,
                    )
                )
                self._buf.clear()
                break
            parsed = self._parse_head(bytes(self._buf[:end]))
            if isinstance(parsed, ParseError):
                # The head is consumed; without a Content-Length we cannot skip a body.
                del self._buf[: end + 4]
                out.append(_fatal(parsed))
                self._buf.clear()
                break
            length_value = parsed.headers.get("Content-Length") or "0"
            length = _parse_length(length_value)
            if length is None:
                out.append(
                    _fatal(
                        _from_message(
                            parsed,
                            ParseErrorKind.BAD_CONTENT_LENGTH,
                            f"Content-Length {length_value!r}",
                        )
                    )
                )
                self._buf.clear()
                break
            if length > self.max_body_bytes:
                del self._buf[: end + 4]
                self._discard = length
                out.append(
                    _from_message(
                        parsed,
                        ParseErrorKind.BODY_TOO_LARGE,
                        f"body of {length} bytes (max {self.max_body_bytes})",
                        413,
                    )
                )
                continue
            total = end + 4 + length
            if len(self._buf) < total:
                break
            body = bytes(self._buf[end + 4 : total])
            del self._buf[:total]
            out.append(_with_body(parsed, body))
        return out

    @property
    def buffered(self) -> int:
        """Stream bytes held for an incomplete message."""
        return len(self._buf)

    # -- internals -------------------------------------------------------------------------

    def _error(
        self,
        kind: ParseErrorKind,
        detail: str,
        status: int,
        head: tuple[Headers, str | None, bool],
        *,
        fatal: bool = False,
    ) -> ParseError:
        headers, method, is_request = head
        answerable = is_request and headers.get("Via") is not None
        return ParseError(kind, detail, status if answerable else None, headers, method, fatal)

    def _peek_head(self, data: bytes) -> tuple[Headers, str | None, bool]:
        """Best-effort headers of an oversized message (bounded work), for an error answer."""
        head = data[: self.max_header_bytes]
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            head = head[:end]
        parsed = self._parse_head(head, lenient=True)
        if isinstance(parsed, SipRequest):
            return parsed.headers, parsed.method, True
        if isinstance(parsed, SipResponse):
            return parsed.headers, None, False
        return parsed.headers, parsed.method, parsed.method is not None

    def _parse_head(self, raw: bytes, *, lenient: bool = False) -> SipMessage | ParseError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
            if not lenient:
                return ParseError(
                    ParseErrorKind.BAD_ENCODING, "header section is not UTF-8", None, Headers()
                )
        lines = re.split(r"\r?\n", text)
        start = lines[0].strip()
        headers, bad = _parse_header_lines(lines[1:])
        request = _REQUEST_LINE.match(start)
        status = None if request else _STATUS_LINE.match(start)
        if request is None and status is None:
            # We cannot tell request from response; answer 400 only if it can be routed back.
            answerable = headers.get("Via") is not None and not start.startswith("SIP/")
            return ParseError(
                ParseErrorKind.BAD_START_LINE,
                f"bad start line {start[:80]!r}",
                400 if answerable else None,
                headers,
            )
        if bad is not None and not lenient:
            if request:
                return ParseError(
                    ParseErrorKind.BAD_HEADER,
                    f"malformed header line {bad[:80]!r}",
                    400 if headers.get("Via") else None,
                    headers,
                    request.group(1),
                )
            return ParseError(
                ParseErrorKind.BAD_HEADER, f"malformed header line {bad[:80]!r}", None, headers
            )
        if status is not None:
            version, code, reason = status.groups()
            message: SipMessage = SipResponse(int(code), reason, headers, b"", version)
        else:
            assert request is not None
            method, uri, version = request.groups()
            message = SipRequest(method.upper(), uri, headers, b"", version)
        if lenient:
            return message
        missing = [name for name in _REQUIRED if headers.get(name) is None]
        if missing:
            return _from_message(
                message, ParseErrorKind.MISSING_HEADER, f"missing {', '.join(missing)}"
            )
        try:
            _, cseq_method = parse_cseq(headers.get("CSeq") or "")
        except ValueError as exc:
            return _from_message(message, ParseErrorKind.BAD_CSEQ, str(exc))
        if isinstance(message, SipRequest) and cseq_method != message.method:
            return _from_message(
                message, ParseErrorKind.BAD_CSEQ, f"CSeq method {cseq_method} != {message.method}"
            )
        return message


def _parse_header_lines(lines: list[str]) -> tuple[Headers, str | None]:
    """Unfold and split header lines; returns the headers and the first malformed line."""
    pairs: list[tuple[str, str]] = []
    bad: str | None = None
    for line in lines:
        if not line:
            continue
        if line[0] in " \t" and pairs:  # folded continuation (RFC 3261 7.3.1)
            name, value = pairs[-1]
            pairs[-1] = (name, f"{value} {line.strip()}")
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not _HEADER_NAME.match(name):
            bad = bad or line
            continue
        pairs.append((canonical_name(name), value.strip()))
    return Headers(tuple(pairs)), bad


def _parse_length(value: str) -> int | None:
    value = value.strip()
    if not value.isdigit() or len(value) > 12:
        return None
    return int(value)


def _with_body(message: SipMessage, body: bytes) -> SipMessage:
    if isinstance(message, SipRequest):
        return SipRequest(message.method, message.uri, message.headers, body, message.version)
    return SipResponse(message.status, message.reason, message.headers, body, message.version)


def _from_message(
    message: SipMessage, kind: ParseErrorKind, detail: str, status: int = 400
) -> ParseError:
    """An error about a message whose start line parsed: requests with a Via get ``status``."""
    if isinstance(message, SipRequest):
        answerable = message.headers.get("Via") is not None and message.method != "ACK"
        return ParseError(
            kind, detail, status if answerable else None, message.headers, message.method
        )
    return ParseError(kind, detail, None, message.headers)


def _fatal(error: ParseError) -> ParseError:
    return ParseError(
        error.kind, error.detail, error.status, error.headers, error.method, fatal=True
    )


# -- header value helpers ------------------------------------------------------------------


def split_list(value: str) -> list[str]:
    """Split a header value at commas outside quotes and angle brackets; blanks stripped."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    current: list[str] = []
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and not quoted and depth == 0:
            item = "".join(current).strip()
            if item:
                out.append(item)
            current = []
            continue
        current.append(ch)
    item = "".join(current).strip()
    if item:
        out.append(item)
    return out


def parse_cseq(value: str) -> tuple[int, str]:
    """``"101 INVITE"`` -> ``(101, "INVITE")``. Raises ValueError when malformed."""
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 10:
        raise ValueError(f"bad CSeq {value!r}")
    number = int(parts[0])
    if number >= 2**31:
        raise ValueError(f"CSeq number out of range: {number}")
    return number, parts[1].upper()


@dataclass(frozen=True, slots=True)
class NameAddr:
    """A From/To/Contact value: optional display name, URI and ``;param`` parameters."""

    display_name: str | None
    uri: str
    params: dict[str, str | None]

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (From/To), or None."""
        return self.params.get("tag")


def parse_name_addr(value: str) -> NameAddr:
    """Parse ``"Name" <sip:u@h>;tag=x`` or ``sip:u@h;tag=x`` (params then belong to the header)."""
    value = value.strip()
    display: str | None = None
    lt = value.find("<")
    if lt >= 0:
        gt = value.find(">", lt)
        if gt < 0:
            raise ValueError(f"unterminated <URI> in {value!r}")
        display = value[:lt].strip().strip('"').strip() or None
        uri = value[lt + 1 : gt].strip()
        rest = value[gt + 1 :]
    else:
        uri, _, rest = value.partition(";")
        rest = ";" + rest if rest else ""
    return NameAddr(display, uri, header_params(rest))


def header_params(text: str) -> dict[str, str | None]:
    """``;a=1;b`` -> ``{"a": "1", "b": None}`` (names lower-cased, quotes kept off)."""
    params: dict[str, str | None] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, val = part.partition("=")
        params[name.strip().lower()] = val.strip().strip('"') if sep else None
    return params


def via_branch(via: str) -> str | None:
    """The ``branch`` parameter of one Via value."""
    _, _, params = via.partition(";")
    return header_params(params).get("branch")


def new_tag() -> str:
    """A fresh random tag for To/From (RFC 3261 19.3: at least 32 bits of randomness)."""
    return secrets.token_hex(6)


def build_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    to_tag: str | None = None,
) -> SipResponse:
    """A response to ``request`` (RFC 3261 8.2.6).

    Copies every Via (in order), From, To, Call-ID and CSeq; adds ``;tag=`` to To unless the
    request already had one (in-dialog) or ``status`` is 100. ``to_tag`` None picks a random tag.
    ``headers`` are appended after those; ``Content-Length`` is computed on serialization.
    """
    return _response(request.headers, status, reason, headers, body, to_tag)


def error_response(error: ParseError, *, to_tag: str | None = None) -> SipResponse | None:
    """The answer to a :class:`ParseError` (with a ``Warning``-free reason), or None to drop."""
    if error.status is None:
        return None
    return _response(error.headers, error.status, None, (), b"", to_tag)


def _response(
    req_headers: Headers,
    status: int,
    reason: str | None,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    to_tag: str | None,
) -> SipResponse:
    pairs: list[tuple[str, str]] = [("Via", v) for v in req_headers.get_all("Via")]
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = req_headers.get(name)
        if value is None:
            continue
        if name == "To" and status != 100 and ";tag=" not in value.replace(" ", "").lower():
            value = f"{value};tag={to_tag or new_tag()}"
        pairs.append((name, value))
    pairs += [(canonical_name(n), v) for n, v in headers]
    return SipResponse(
        status, reason or REASONS.get(status, "Unknown"), Headers(tuple(pairs)), body
    )
