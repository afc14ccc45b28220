"""SIP message parsing and serialization: datagrams, streams, compact forms, malformed input."""

from __future__ import annotations

import pytest

from gateway.ingress.siprec.message import (
    Headers,
    ParseError,
    ParseErrorKind,
    SipParser,
    SipRequest,
    SipResponse,
    build_response,
    error_response,
    parse_name_addr,
    split_list,
)

INVITE = (
    b"INVITE sip:srs@10.0.0.5 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-1\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-0\r\n"
    b'From: "Source" <sip:src@192.0.2.10>;tag=abc\r\n'
    b"To: <sip:srs@10.0.0.5>\r\n"
    b"Call-ID: call-1@192.0.2.10\r\n"
    b"CSeq: 101 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"v=0\r\n"
)


def request(data: bytes) -> SipRequest:
    parsed = SipParser().feed_datagram(data)
    assert isinstance(parsed, SipRequest), parsed
    return parsed


def error(data: bytes, parser: SipParser | None = None) -> ParseError:
    parsed = (parser or SipParser()).feed_datagram(data)
    assert isinstance(parsed, ParseError), parsed
    return parsed


def test_invite_roundtrip() -> None:
    req = request(INVITE)
    assert (req.method, req.uri, req.call_id, req.cseq) == (
        "INVITE",
        "sip:srs@10.0.0.5",
        "call-1@192.0.2.10",
        (101, "INVITE"),
    )
    assert req.body == b"v=0\r\n"
    assert len(req.headers.get_all("via")) == 2
    again = request(req.to_bytes())
    assert again == req


def test_compact_forms_and_case_insensitive_names() -> None:
    data = (
        b"OPTIONS sip:srs@10.0.0.5 SIP/2.0\r\n"
        b"v: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-2\r\n"
        b"f: <sip:a@b>;tag=1\r\n"
        b"t: <sip:srs@10.0.0.5>\r\n"
        b"i: opt-1\r\n"
        b"cseq: 7 OPTIONS\r\n"
        b"m: <sip:a@192.0.2.10>\r\n"
        b"k: siprec, timer\r\n"
        b"s: hello\r\n"
        b"c: application/sdp\r\n"
        b"l: 0\r\n\r\n"
    )
    req = request(data)
    assert req.call_id == "opt-1"
    assert req.headers.get("CALL-ID") == "opt-1"
    assert req.headers.get("Contact") == "<sip:a@192.0.2.10>"
    assert req.headers.get_list("Supported") == ["siprec", "timer"]
    assert req.headers.get("subject") == "hello"
    assert req.content_type == "application/sdp"
    assert b"Call-ID: opt-1\r\n" in req.to_bytes()  # long forms on the way out


def test_folded_header_lines_are_unfolded() -> None:
    data = INVITE.replace(b"CSeq: 101 INVITE\r\n", b"Subject: one\r\n two\r\nCSeq: 101 INVITE\r\n")
    assert request(data).headers.get("Subject") == "one two"


def test_multiple_values_and_quoted_commas() -> None:
    assert split_list('"Doe, John" <sip:j@x>, <sip:k@y>;q=1') == [
        '"Doe, John" <sip:j@x>',
        "<sip:k@y>;q=1",
    ]
    na = parse_name_addr('"Doe, John" <sip:j@x;transport=tcp>;tag=9')
    assert (na.display_name, na.uri, na.tag) == ("Doe, John", "sip:j@x;transport=tcp", "9")


def test_bad_start_line_is_answered_400_when_routable() -> None:
    err = error(INVITE.replace(b"INVITE sip:srs@10.0.0.5 SIP/2.0", b"INVITE sip:srs@10.0.0.5"))
    assert (err.kind, err.status) == (ParseErrorKind.BAD_START_LINE, 400)
    response = error_response(err)
    assert response is not None and response.status == 400
    assert response.headers.get("Call-ID") == "call-1@192.0.2.10"
    # Nothing to route an answer by: dropped.
    assert error(b"garbage\r\n\r\n").status is None


def test_missing_call_id_is_400() -> None:
    err = error(INVITE.replace(b"Call-ID: call-1@192.0.2.10\r\n", b""))
    assert (err.kind, err.status, err.method) == (ParseErrorKind.MISSING_HEADER, 400, "INVITE")
    assert "Call-ID" in err.detail
    response = error_response(err)
    assert response is not None and response.headers.get("Call-ID") is None


def test_missing_via_is_dropped() -> None:
    err = error(
        INVITE.replace(b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-1\r\n", b"").replace(
            b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-0\r\n", b""
        )
    )
    assert err.status is None and error_response(err) is None


def test_content_length_mismatch() -> None:
    short = INVITE.replace(b"Content-Length: 5", b"Content-Length: 50")
    err = error(short)
    assert (err.kind, err.status) == (ParseErrorKind.CONTENT_LENGTH_MISMATCH, 400)
    # Extra bytes beyond Content-Length in a datagram are discarded (RFC 3261 18.3).
    assert request(INVITE + b"junk").body == b"v=0\r\n"
    bad = error(INVITE.replace(b"Content-Length: 5", b"Content-Length: five"))
    assert bad.kind is ParseErrorKind.BAD_CONTENT_LENGTH


def test_one_mebibyte_body() -> None:
    body = b"x" * (1 << 20)
    big = INVITE.replace(b"Content-Length: 5", f"Content-Length: {len(body)}".encode())
    big = big[: -len(b"v=0\r\n")] + body
    # As a datagram it exceeds any UDP size: 513.
    err = error(big)
    assert (err.kind, err.status) == (ParseErrorKind.MESSAGE_TOO_LARGE, 513)
    assert error_response(err) is not None
    # Within the datagram limit but over the body limit: 413.
    err = error(big, SipParser(max_datagram_bytes=2 << 20))
    assert (err.kind, err.status) == (ParseErrorKind.BODY_TOO_LARGE, 413)
    # On a stream: 413, the body is skipped, and the next message still parses.
    parser = SipParser()
    results = []
    for i in range(0, len(big), 65536):
        results += parser.feed(big[i : i + 65536])
    results += parser.feed(INVITE)
    assert [type(r) for r in results] == [ParseError, SipRequest]
    first = results[0]
    assert isinstance(first, ParseError) and first.status == 413 and not first.fatal


def test_header_section_too_large() -> None:
    huge = INVITE.replace(b"CSeq:", b"X-Pad: " + b"a" * 20000 + b"\r\nCSeq:")
    err = error(huge)
    assert (err.kind, err.status) == (ParseErrorKind.HEADERS_TOO_LARGE, 513)


def test_stream_framing_by_content_length() -> None:
    parser = SipParser()
    stream = b"\r\n\r\n" + INVITE + INVITE.replace(b"CSeq: 101", b"CSeq: 102")
    results = []
    for i in range(len(stream)):  # one byte at a time
        results += parser.feed(stream[i : i + 1])
    assert [r.cseq[0] for r in results if isinstance(r, SipRequest)] == [101, 102]
    assert parser.buffered == 0


def test_stream_garbage_is_fatal() -> None:
    results = SipParser().feed(b"NOT SIP AT ALL\r\nVia: x\r\n\r\n")
    assert len(results) == 1 and isinstance(results[0], ParseError) and results[0].fatal


def test_response_parsing_and_cseq_method_check() -> None:
    data = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bK-9\r\n"
        b"From: <sip:srs@10.0.0.5>;tag=a\r\nTo: <sip:src@192.0.2.10>;tag=b\r\n"
        b"Call-ID: c\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    parsed = SipParser().feed_datagram(data)
    assert isinstance(parsed, SipResponse) and (parsed.status, parsed.reason) == (200, "OK")
    err = error(INVITE.replace(b"CSeq: 101 INVITE", b"CSeq: 101 BYE"))
    assert err.kind is ParseErrorKind.BAD_CSEQ


def test_keepalive_datagram_is_ignored() -> None:
    assert SipParser().feed_datagram(b"\r\n\r\n") is None


def test_build_response_copies_headers_and_adds_to_tag() -> None:
    req = request(INVITE)
    ok = build_response(req, 200, headers=[("Contact", "<sip:srs@10.0.0.5>")], to_tag="srs1")
    assert ok.headers.get_all("Via") == req.headers.get_all("Via")
    for name in ("From", "Call-ID", "CSeq"):
        assert ok.headers.get(name) == req.headers.get(name)
    assert ok.headers.get("To") == "<sip:srs@10.0.0.5>;tag=srs1"
    assert build_response(req, 100).headers.get("To") == "<sip:srs@10.0.0.5>"
    in_dialog = SipRequest(req.method, req.uri, req.headers.replace("To", "<sip:s@h>;tag=x"))
    assert build_response(in_dialog, 200).headers.get("To") == "<sip:s@h>;tag=x"
    wire = ok.to_bytes()
    assert wire.startswith(b"SIP/2.0 200 OK\r\n") and wire.endswith(b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize("cut", [1, 12, 40, len(INVITE) - 1])
def test_truncated_datagrams_never_raise(cut: int) -> None:
    result = SipParser().feed_datagram(INVITE[:cut])
    assert isinstance(result, ParseError | SipRequest)


def test_headers_replace() -> None:
    h = Headers.of([("via", "a"), ("To", "b")])
    assert h.replace("t", "c").get("To") == "c" and h.replace("To", None).get("To") is None


def test_stream_keepalive_pings_are_counted_even_when_split() -> None:
    # RFC 5626: a client pings with CRLFCRLF between messages; the transport answers each with
    # a CRLF pong, so the parser counts them, across reads too.
    parser = SipParser()
    assert parser.feed(b"\r\n\r\n") == [] and parser.pings == 1
    assert parser.feed(b"\r\n") == [] and parser.pings == 1
    assert parser.feed(b"\r\n") == [] and parser.pings == 2
    options = (
        b"OPTIONS sip:srs@h SIP/2.0\r\nVia: SIP/2.0/TCP c;branch=z9hG4bK1\r\n"
        b"From: <sip:c@h>;tag=1\r\nTo: <sip:srs@h>\r\nCall-ID: k\r\nCSeq: 1 OPTIONS\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    [message] = parser.feed(b"\r\n" + options)
    assert isinstance(message, SipRequest) and message.method == "OPTIONS"
    assert parser.pings == 2  # one CRLF before a message is not a ping
