"""The SRS dialog core: INVITE/ACK/BYE/CANCEL/OPTIONS/UPDATE, timers, access control, errors.

Requests are serialized and parsed again on the way in, so every test also exercises the wire
format; no sockets, no clocks (``now`` is passed explicitly).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.ingress.events import (
    CallEnded,
    CallStarted,
    ChannelAdded,
    Hold,
    MetadataChanged,
    Resume,
)
from gateway.ingress.siprec.auth import DigestAuth, digest_response
from gateway.ingress.siprec.dialog import (
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
    uri_address,
)
from gateway.ingress.siprec.message import (
    Headers,
    SipParser,
    SipRequest,
    SipResponse,
    header_params,
    parse_name_addr,
)
from gateway.ingress.siprec.metadata import split_body
from gateway.ingress.siprec.sdp import parse_sdp
from gateway.media.codec import Codec
from tests.test_siprec_fixtures import fixture_body, invite_for

SRC = ("192.0.2.10", 5060)
CALL = "call-1@src.example"


class Ports:
    """A fake port allocator that records what it handed out."""

    def __init__(self, free: int = 100) -> None:
        self.next = 40000
        self.free = free
        self.owned: dict[str, list[int]] = {}

    def allocate(self, call_id: str, count: int) -> Sequence[int] | None:
        if count > self.free:
            return None
        ports = [self.next + 2 * i for i in range(count)]
        self.next += 2 * count
        self.free -= count
        self.owned[call_id] = ports
        return ports

    def release(self, call_id: str) -> None:
        self.free += len(self.owned.pop(call_id, []))


def server(**kwargs: object) -> tuple[SiprecServer, Ports]:
    ports = Ports()
    config = ServerConfig(host="10.0.0.5", **kwargs)  # type: ignore[arg-type]
    return SiprecServer(config, ports), ports


def deliver(
    srv: SiprecServer,
    message: SipRequest | bytes,
    now: float,
    source: tuple[str, int] = SRC,
    transport: str = "udp",
) -> list[Output]:
    data = message.to_bytes() if isinstance(message, SipRequest) else message
    parsed = SipParser().feed_datagram(data)
    assert parsed is not None
    return srv.receive(parsed, source, transport, now)


def sent(outputs: Sequence[Output]) -> list[SipResponse]:
    out = []
    for o in outputs:
        if isinstance(o, Send):
            assert isinstance(o.message, SipResponse)
            out.append(o.message)
    return out


def statuses(outputs: Sequence[Output]) -> list[int]:
    return [r.status for r in sent(outputs)]


def events(outputs: Sequence[Output]) -> list[object]:
    return [o.event for o in outputs if isinstance(o, CallEvent)]


def in_dialog(
    method: str, ok: SipResponse, cseq: int, *, body: bytes = b"", content_type: str = ""
) -> SipRequest:
    """A request inside the dialog that ``ok`` (our 2xx) established."""
    to = ok.headers.get("To") or ""
    pairs = [
        ("Via", f"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-{method}-{cseq}"),
        ("From", ok.headers.get("From") or ""),
        ("To", to),
        ("Call-ID", ok.call_id),
        ("CSeq", f"{cseq} {method}"),
        ("Max-Forwards", "70"),
    ]
    if content_type:
        pairs.append(("Content-Type", content_type))
    return SipRequest(method, "sip:srs@10.0.0.5", Headers.of(pairs), body)


def ack_for(invite: SipRequest, response: SipResponse) -> SipRequest:
    headers = Headers.of(
        [
            ("Via", invite.headers.get("Via") or ""),
            ("From", invite.headers.get("From") or ""),
            ("To", response.headers.get("To") or ""),
            ("Call-ID", invite.call_id),
            ("CSeq", f"{invite.cseq[0]} ACK"),
        ]
    )
    return SipRequest("ACK", invite.uri, headers)


def establish(srv: SiprecServer, fixture: str = "cisco-siprec-offer.txt") -> SipResponse:
    invite = invite_for(fixture, call_id=CALL)
    out = deliver(srv, invite, 0.0)
    ok = sent(out)[-1]
    assert ok.status == 200
    deliver(srv, ack_for(invite, ok), 0.01)
    return ok


def test_invite_is_answered_100_then_200_with_recvonly_answer() -> None:
    srv, ports = server()
    out = deliver(srv, invite_for("cisco-siprec-offer.txt", call_id=CALL), 0.0)
    kinds = [type(o).__name__ for o in out]
    assert kinds == ["Send", "IncomingCall", "MediaPlan", "CallEvent", "Send"]
    trying, ok = sent(out)
    assert (trying.status, ok.status) == (100, 200)
    assert trying.headers.get("To") == "<sip:srs@10.0.0.5>"
    assert parse_name_addr(ok.headers.get("To") or "").tag
    assert ok.headers.get("Content-Type") == "application/sdp"
    assert "+sip.srs" in (ok.headers.get("Contact") or "")
    assert "siprec" in (ok.headers.get("Supported") or "")
    answer = parse_sdp(ok.body)
    assert [(m.port, answer.direction_of(i)) for i, m in enumerate(answer.media)] == [
        (40000, "recvonly"),
        (40002, "recvonly"),
    ]
    plan = next(o for o in out if isinstance(o, MediaPlan))
    assert [(s.local_port, s.remote, s.config.channel, s.config.codec) for s in plan.streams] == [
        (40000, ("172.31.93.236", 10292), 0, Codec.PCMU),
        (40002, ("172.31.93.236", 10294), 1, Codec.PCMU),
    ]
    assert plan.streams[0].config.telephone_event == 101
    started = events(out)[0]
    assert isinstance(started, CallStarted) and started.source == "siprec"
    assert [(c.role, c.participant) for c in started.channels] == [
        ("customer", "sip:7301@35.162.237.204"),
        ("agent", "7300"),
    ]
    assert started.source_ids["sip_call_id"] == CALL
    assert ports.owned[CALL] == [40000, 40002]
    assert srv.state(CALL) is DialogState.CONFIRMING


def test_200_is_retransmitted_until_ack() -> None:
    srv, _ = server()
    invite = invite_for("cisco-siprec-offer.txt", call_id=CALL)
    ok = sent(deliver(srv, invite, 0.0))[-1]
    times = []
    now = 0.0
    while (deadline := srv.next_deadline()) is not None and deadline < 10:
        now = deadline
        out = srv.on_timer(now)
        assert sent(out) == [ok]
        times.append(now)
    # T1 = 0.5 s doubling, capped at T2 = 4 s.
    assert times == [0.5, 1.5, 3.5, 7.5]
    # A retransmitted INVITE gets the same 200 again.
    assert sent(deliver(srv, invite, now)) == [ok]
    assert deliver(srv, ack_for(invite, ok), now + 0.1) == []
    assert srv.next_deadline() is None
    assert srv.state(CALL) is DialogState.CONFIRMED


def test_no_ack_ends_the_call_after_64_t1() -> None:
    srv, ports = server()
    deliver(srv, invite_for("cisco-siprec-offer.txt", call_id=CALL), 0.0)
    out: list[Output] = []
    while (deadline := srv.next_deadline()) is not None:
        out += srv.on_timer(deadline)
    assert events(out) == [CallEnded("ack_timeout")]
    assert any(isinstance(o, CallReleased) for o in out)
    assert srv.calls == () and ports.owned == {}
    responses = [o for o in out if isinstance(o, Send) and isinstance(o.message, SipResponse)]
    assert len(responses) == 10  # 0.5, 1.5, 3.5, 7.5, ... 31.5
    assert {o.message.status for o in responses if isinstance(o.message, SipResponse)} == {200}
    # Then the session is ended with a BYE (RFC 3261 13.3.1.4), retransmitted like any request.
    requests = [o.message for o in out if isinstance(o, Send) and isinstance(o.message, SipRequest)]
    assert requests and {r.method for r in requests} == {"BYE"}
    assert len({r.to_bytes() for r in requests}) == 1


def test_no_retransmission_over_tcp() -> None:
    srv, _ = server()
    deliver(srv, invite_for("cisco-siprec-offer.txt", call_id=CALL), 0.0, transport="tcp")
    assert srv.next_deadline() == 32.0
    ok_contact = srv.on_timer(1.0)
    assert ok_contact == []


def test_cancel_before_answer() -> None:
    srv, ports = server(auto_accept=False)
    invite = invite_for("cisco-siprec-offer.txt", call_id=CALL)
    out = deliver(srv, invite, 0.0)
    assert statuses(out) == [100]
    assert isinstance(out[1], IncomingCall) and srv.state(CALL) is DialogState.PROCEEDING
    cancel = SipRequest(
        "CANCEL",
        invite.uri,
        Headers.of(
            [
                ("Via", invite.headers.get("Via") or ""),
                ("From", invite.headers.get("From") or ""),
                ("To", invite.headers.get("To") or ""),
                ("Call-ID", CALL),
                ("CSeq", f"{invite.cseq[0]} CANCEL"),
            ]
        ),
    )
    out = deliver(srv, cancel, 0.2)
    responses = sent(out)
    assert [(r.status, r.headers.get("CSeq")) for r in responses] == [
        (200, "1 CANCEL"),
        (487, "1 INVITE"),
    ]
    assert [type(o) for o in out if not isinstance(o, Send)] == [Cancelled, CallReleased]
    assert srv.calls == () and ports.owned == {}
    # The 487 is repeated until its ACK.
    assert sent(srv.on_timer(0.7)) == [responses[1]]
    deliver(srv, ack_for(invite, responses[1]), 0.8)
    assert srv.next_deadline() is None


def test_manual_accept_and_reject() -> None:
    srv, _ = server(auto_accept=False)
    deliver(srv, invite_for("cisco-siprec-offer.txt", call_id="a"), 0.0)
    assert statuses(srv.accept("a", 0.1)) == [200]
    deliver(srv, invite_for("cisco-siprec-offer.txt", call_id="b", branch="z9hG4bK-b"), 0.0)
    out = srv.reject("b", 486, 0.1)
    assert statuses(out) == [486] and any(isinstance(o, Rejected) for o in out)


def test_no_free_ports_is_503() -> None:
    srv, ports = server()
    ports.free = 1
    out = deliver(srv, invite_for("cisco-siprec-offer.txt", call_id=CALL), 0.0)
    assert statuses(out) == [100, 503] and srv.calls == ()


def test_options_and_draining() -> None:
    srv, _ = server()
    options = SipRequest(
        "OPTIONS",
        "sip:srs@10.0.0.5",
        Headers.of(
            [
                ("Via", "SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-o1"),
                ("From", "<sip:probe@192.0.2.10>;tag=p"),
                ("To", "<sip:srs@10.0.0.5>"),
                ("Call-ID", "probe-1"),
                ("CSeq", "1 OPTIONS"),
            ]
        ),
    )
    ok = sent(deliver(srv, options, 0.0))[0]
    assert ok.status == 200 and "INVITE" in (ok.headers.get("Allow") or "")
    establish(srv)
    srv.drain()
    again = SipRequest(
        options.method,
        options.uri,
        options.headers.replace("Via", "SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-o2"),
    )
    assert statuses(deliver(srv, again, 1.0)) == [503]
    new_call = invite_for("cisco-siprec-offer.txt", call_id="late", branch="z9hG4bK-late")
    assert statuses(deliver(srv, new_call, 1.0)) == [503]
    assert srv.calls == (CALL,)  # the call in progress is untouched


def test_reinvite_to_hold_and_back() -> None:
    srv, _ = server()
    ok = establish(srv)
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    hold_body = body.replace(b"a=sendonly", b"a=inactive")
    hold = in_dialog("INVITE", ok, 2, body=hold_body, content_type=content_type)
    out = deliver(srv, hold, 5.0)
    assert events(out) == [Hold()]
    answer = sent(out)[-1]
    sdp = parse_sdp(answer.body)
    assert [sdp.direction_of(i) for i in range(2)] == ["inactive", "inactive"]
    assert [m.port for m in sdp.media] == [40000, 40002]  # same ports
    assert "o=callgate" in answer.body.decode() and " 2 IN IP4" in answer.body.decode()
    deliver(srv, ack_for(hold, answer), 5.1)
    back = in_dialog("INVITE", ok, 3, body=body, content_type=content_type)
    out = deliver(srv, back, 9.0)
    assert events(out) == [Resume()]
    assert [parse_sdp(sent(out)[-1].body).direction_of(i) for i in range(2)] == [
        "recvonly",
        "recvonly",
    ]
    assert any(isinstance(o, MediaPlan) for o in out)


def test_inactive_initial_offer_starts_on_hold() -> None:
    srv, _ = server()
    out = deliver(srv, invite_for("inactive-sdp-offer.txt", call_id=CALL), 0.0)
    assert [type(e) for e in events(out)] == [CallStarted, Hold]


def test_update_with_metadata_changes_participants() -> None:
    srv, _ = server()
    ok = establish(srv)
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    start = body.index(b"<?xml")
    end = body.index(b"</recording>") + len(b"</recording>")
    document = body[start:end].replace(
        b'<nameID aor="sip:7301@35.162.237.204">',
        b'<nameID aor="sip:7301@35.162.237.204"><name>Alice</name>',
    )
    update = in_dialog("UPDATE", ok, 2, body=document, content_type="application/rs-metadata+xml")
    out = deliver(srv, update, 3.0)
    assert statuses(out) == [200] and sent(out)[0].body == b""
    (changed,) = events(out)
    assert isinstance(changed, MetadataChanged)
    assert [(c.index, c.role, c.participant) for c in changed.channels] == [
        (0, "customer", "Alice"),
        (1, "agent", "7300"),
    ]
    # The same document again changes nothing.
    again = in_dialog("UPDATE", ok, 3, body=document, content_type="application/rs-metadata+xml")
    assert events(deliver(srv, again, 4.0)) == []


def test_bye_ends_the_call() -> None:
    srv, ports = server()
    ok = establish(srv)
    out = deliver(srv, in_dialog("BYE", ok, 2), 60.0)
    assert statuses(out) == [200]
    assert events(out) == [CallEnded("bye")]
    assert srv.calls == () and ports.owned == {}
    # A second BYE (not a retransmission: new branch) finds no dialog.
    stray = in_dialog("BYE", ok, 3)
    assert statuses(deliver(srv, stray, 61.0)) == [481]


def test_unknown_dialog_is_481() -> None:
    srv, _ = server()
    ok = establish(srv)
    wrong_tag = in_dialog("BYE", ok, 2)
    wrong_tag = SipRequest(
        "BYE", wrong_tag.uri, wrong_tag.headers.replace("To", "<sip:srs@10.0.0.5>;tag=nope")
    )
    out = deliver(srv, wrong_tag, 1.0)
    assert statuses(out) == [481] and srv.calls == (CALL,)


def test_allowlist_403() -> None:
    srv, _ = server(allowlist=("10.0.0.0/8", "2001:db8::/32"))
    out = deliver(srv, invite_for("cisco-siprec-offer.txt"), 0.0, source=("192.0.2.99", 5060))
    assert statuses(out) == [403]
    rejected = [o for o in out if isinstance(o, Rejected)]
    assert rejected and rejected[0].status == 403 and srv.calls == ()
    allowed = invite_for("cisco-siprec-offer.txt", call_id="ok", branch="z9hG4bK-ok")
    out = deliver(srv, allowed, 0.0, source=("10.1.2.3", 5060))
    assert statuses(out) == [100, 200]


def test_digest_challenge_and_response() -> None:
    auth = DigestAuth("srs.example", {"sbc": "s3cret"}, secret=b"k" * 32)
    srv, _ = server(digest=auth)
    invite = invite_for("cisco-siprec-offer.txt", call_id=CALL)
    out = deliver(srv, invite, 100.0)
    (challenge,) = sent(out)
    assert challenge.status == 401
    offers = challenge.headers.get_all("WWW-Authenticate")
    assert [("SHA-256" in o, "MD5" in o) for o in offers] == [(True, False), (False, True)]
    deliver(srv, ack_for(invite, challenge), 100.1)
    params = header_params(offers[0].split(" ", 1)[1].replace(",", ";"))
    nonce = params["nonce"]
    assert nonce is not None
    for algorithm, branch, call_id in (("SHA-256", "z9hG4bK-2", CALL), ("MD5", "z9hG4bK-3", "c2")):
        authorization = digest_response(
            username="sbc",
            password="s3cret",
            realm="srs.example",
            nonce=nonce,
            method="INVITE",
            uri=invite.uri,
            algorithm=algorithm,
        )
        retry = invite_for(
            "cisco-siprec-offer.txt",
            call_id=call_id,
            branch=branch,
            cseq=2,
            extra=(("Authorization", authorization),),
        )
        assert statuses(deliver(srv, retry, 101.0)) == [100, 200]
    wrong = digest_response(
        username="sbc",
        password="guess",
        realm="srs.example",
        nonce=nonce,
        method="INVITE",
        uri=invite.uri,
    )
    bad = invite_for(
        "cisco-siprec-offer.txt",
        call_id="c3",
        branch="z9hG4bK-4",
        extra=(("Authorization", wrong),),
    )
    assert statuses(deliver(srv, bad, 101.0)) == [403]
    late = invite_for(
        "cisco-siprec-offer.txt",
        call_id="c4",
        branch="z9hG4bK-5",
        extra=(
            (
                "Authorization",
                digest_response(
                    username="sbc",
                    password="s3cret",
                    realm="srs.example",
                    nonce=nonce,
                    method="INVITE",
                    uri=invite.uri,
                ),
            ),
        ),
    )
    stale = sent(deliver(srv, late, 100.0 + 301))
    assert stale[0].status == 401
    assert "stale=true" in (stale[0].headers.get("WWW-Authenticate") or "")


def test_unsupported_content_type_require_and_codecs() -> None:
    srv, _ = server()
    base = invite_for("cisco-siprec-offer.txt")
    text = SipRequest(
        "INVITE", base.uri, base.headers.replace("Content-Type", "text/plain"), b"hello"
    )
    out = deliver(srv, text, 0.0)
    assert statuses(out) == [415] and "application/sdp" in (
        sent(out)[0].headers.get("Accept") or ""
    )
    req = invite_for(
        "cisco-siprec-offer.txt",
        call_id="r",
        branch="z9hG4bK-r",
        extra=(("Require", "siprec, 100rel, foo"),),
    )
    out = deliver(srv, req, 0.0)
    assert statuses(out) == [420]
    assert sent(out)[0].headers.get("Unsupported") == "100rel, foo"
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    g729 = body.replace(b"RTP/AVP 0 101", b"RTP/AVP 18").replace(b"a=rtpmap:0 PCMU", b"a=x:0")
    req = invite_for("cisco-siprec-offer.txt", call_id="g", branch="z9hG4bK-g")
    req = SipRequest(req.method, req.uri, req.headers, g729)
    assert statuses(deliver(srv, req, 0.0)) == [488]
    assert srv.calls == ()


def test_malformed_message_is_answered_400_and_other_calls_continue() -> None:
    srv, _ = server()
    establish(srv)
    broken = invite_for("cisco-siprec-offer.txt", call_id="x", branch="z9hG4bK-x").to_bytes()
    broken = broken.replace(b"Call-ID: x\r\n", b"")
    out = deliver(srv, broken, 1.0)
    assert statuses(out) == [400]
    assert [o.reason for o in out if isinstance(o, Rejected)] == ["missing_header"]
    assert srv.calls == (CALL,) and srv.state(CALL) is DialogState.CONFIRMED


def test_reinvite_may_change_the_codec_but_not_the_clock_rate() -> None:
    srv, _ = server()
    ok = establish(srv)
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    # m-line 1 moves to PCMA; m-line 2 offers only 16 kHz L16 (the channel is 8 kHz).
    first, second = body.split(b"m=audio 10294", 1)
    first = first.replace(b"RTP/AVP 0 101", b"RTP/AVP 8 101").replace(
        b"a=rtpmap:0 PCMU/8000", b"a=rtpmap:8 PCMA/8000"
    )
    second = second.replace(b"RTP/AVP 0 101", b"RTP/AVP 96 101").replace(
        b"a=rtpmap:0 PCMU/8000", b"a=rtpmap:96 L16/16000"
    )
    changed = in_dialog(
        "INVITE", ok, 2, body=first + b"m=audio 10294" + second, content_type=content_type
    )
    out = deliver(srv, changed, 5.0)
    answer = sent(out)[-1]
    assert answer.status == 200
    sdp = parse_sdp(answer.body)
    assert [m.port for m in sdp.media] == [40000, 0]
    assert sdp.media[0].payload_types[0] == 8
    (plan,) = [o for o in out if isinstance(o, MediaPlan)]
    assert [(s.config.channel, s.config.codec, s.config.payload_type) for s in plan.streams] == [
        (0, Codec.PCMA, 8)
    ]
    deliver(srv, ack_for(changed, answer), 5.1)
    # Offered again as it began (a transfer back): the refused m-line is taken again, on the
    # port it was granted at first, and the next re-offers work (they used to fail).
    for cseq in (3, 4):
        again = in_dialog("INVITE", ok, cseq, body=body, content_type=content_type)
        out = deliver(srv, again, 6.0 + cseq)
        answer = sent(out)[-1]
        assert answer.status == 200
        assert [m.port for m in parse_sdp(answer.body).media] == [
            m.port for m in parse_sdp(ok.body).media
        ]
        (plan,) = [o for o in out if isinstance(o, MediaPlan)]
        assert [(s.config.channel, s.config.codec) for s in plan.streams] == [
            (0, Codec.PCMU),
            (1, Codec.PCMU),
        ]
        deliver(srv, ack_for(again, answer), 6.5 + cseq)


CONFERENCE_MLINE = (
    b"m=audio 10296 RTP/AVP 0 101\r\nc=IN IP4 172.31.93.236\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=sendonly\r\na=label:3\r\n"
)
CONFERENCE_METADATA = (
    b'<participant participant_id="sup"><nameID aor="sip:7302@35.162.237.204">'
    b"<name>Sam Supervisor</name></nameID></participant>"
    b'<stream stream_id="s3" session_id="kQNhKFdEEeeJ9tD/VsPGWA=="><label>3</label></stream>'
    b'<participantstreamassoc participant_id="sup"><send>s3</send></participantstreamassoc>'
)


def conference_body(body: bytes) -> bytes:
    """The Cisco offer with a third leg (m-line 3, label 3, sent by a new participant)."""
    sdp_end = body.index(b"\r\n--uniqueBoundary", body.index(b"a=label:2"))
    body = body[:sdp_end] + b"\r\n" + CONFERENCE_MLINE.rstrip(b"\r\n") + body[sdp_end:]
    return body.replace(b"</recording>", CONFERENCE_METADATA + b"</recording>")


def test_reinvite_adding_an_mline_adds_a_channel() -> None:
    """A conference: the re-INVITE appends a third m-line. It gets a port of its own in the
    answer and the plan, and the call a ChannelAdded with the new participant; the next
    re-INVITE with the same three m-lines changes nothing."""
    srv, ports = server()
    ok = establish(srv)
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    body = body.replace(b"\n", b"\r\n") if b"\r\n" not in body else body
    three = conference_body(body)
    out = deliver(srv, in_dialog("INVITE", ok, 2, body=three, content_type=content_type), 5.0)
    answer = sent(out)[-1]
    assert answer.status == 200
    sdp = parse_sdp(answer.body)
    assert [m.port for m in sdp.media] == [40000, 40002, 40004]
    assert [sdp.direction_of(i) for i in range(3)] == ["recvonly"] * 3
    (added,) = events(out)
    assert isinstance(added, ChannelAdded)
    assert (added.channel.index, added.channel.participant) == (2, "Sam Supervisor")
    assert (added.channel.codec, added.channel.sample_rate) == (Codec.PCMU, 8000)
    assert added.metadata["siprec.channel.2.aor"] == "sip:7302@35.162.237.204"
    (plan,) = [o for o in out if isinstance(o, MediaPlan)]
    assert [(s.config.channel, s.local_port) for s in plan.streams] == [
        (0, 40000),
        (1, 40002),
        (2, 40004),
    ]
    assert ports.owned[CALL] == [40004]  # the new allocation (the fake keeps the latest)
    again = deliver(srv, in_dialog("INVITE", ok, 3, body=three, content_type=content_type), 6.0)
    assert events(again) == []
    assert [m.port for m in parse_sdp(sent(again)[-1].body).media] == [40000, 40002, 40004]


def test_an_added_mline_beyond_the_channel_limit_or_the_ports_is_refused() -> None:
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    body = body.replace(b"\n", b"\r\n") if b"\r\n" not in body else body
    three = conference_body(body)
    for srv, ports in (server(max_channels=2), server()):
        ok = establish(srv)
        ports.free = 0
        out = deliver(srv, in_dialog("INVITE", ok, 2, body=three, content_type=content_type), 5)
        answer = sent(out)[-1]
        assert answer.status == 200
        assert [m.port for m in parse_sdp(answer.body).media] == [40000, 40002, 0]
        assert not any(isinstance(e, ChannelAdded) for e in events(out))
        (plan,) = [o for o in out if isinstance(o, MediaPlan)]
        assert [s.config.channel for s in plan.streams] == [0, 1]


def savp(request: SipRequest) -> SipRequest:
    """The same INVITE offering SRTP: RTP/SAVP m-lines keyed by SDES."""
    inline = "A" * 40  # 30 bytes of zeros, base64
    body = request.body.replace(b"RTP/AVP", b"RTP/SAVP").replace(
        b"a=ptime:20", b"a=ptime:20\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + inline.encode()
    )
    return SipRequest(request.method, request.uri, request.headers, body)


def test_srtp_offers_follow_the_policy() -> None:
    plain = invite_for("cisco-siprec-offer.txt", call_id=CALL)
    srv, _ = server()
    out = deliver(srv, savp(plain), 0.0)
    (incoming,) = [o for o in out if isinstance(o, IncomingCall)]
    assert incoming.srtp and incoming.transport == "udp"  # keys in clear: the service warns
    ok = sent(out)[-1]
    assert ok.status == 200 and ok.body.count(b"RTP/SAVP") == 2
    assert ok.body.count(b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:") == 2
    assert b"A" * 40 not in ok.body  # our keys, not the offerer's
    (plan,) = [o for o in out if isinstance(o, MediaPlan)]
    assert all(s.config.srtp is not None and s.config.srtp.key == bytes(30) for s in plan.streams)
    # The same re-offer gets the same keys of ours back.
    content_type = plain.headers.get("Content-Type") or ""
    again = in_dialog("INVITE", ok, 2, body=savp(plain).body, content_type=content_type)
    assert sent(deliver(srv, again, 1.0))[-1].body.split(b"\r\n", 2)[2] == ok.body.split(
        b"\r\n", 2
    )[2].replace(b" 1 IN IP4", b" 2 IN IP4")
    for policy, request in (("off", savp(plain)), ("require", plain)):
        srv, _ = server(srtp=policy)
        assert statuses(deliver(srv, request, 0.0))[-1] == 488


def _with_headers(message: SipRequest, *lines: str) -> bytes:
    """``message`` with header lines added after its request line."""
    start, rest = message.to_bytes().split(b"\r\n", 1)
    return start + b"\r\n" + "".join(f"{line}\r\n" for line in lines).encode() + rest


def test_after_a_reinvite_we_answer_where_it_came_from_and_build_bye_from_the_dialog() -> None:
    srv, _ = server()
    invite = invite_for("cisco-siprec-offer.txt", call_id=CALL)
    out = deliver(srv, _with_headers(invite, "Record-Route: <sip:sbc.example;lr>"), 0.0)
    ok = sent(out)[-1]
    deliver(srv, ack_for(invite, ok), 0.01)
    # A re-INVITE on a new TCP connection, refreshing the target (Contact) and carrying a
    # Record-Route of its own, which must not change the dialog's route set (RFC 3261 12.2).
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    reinvite = in_dialog("INVITE", ok, 2, body=body, content_type=content_type)
    raw = _with_headers(
        reinvite, "Contact: <sip:src@192.0.2.99:5070>", "Record-Route: <sip:other.example;lr>"
    )
    out = deliver(srv, raw, 5.0, source=("192.0.2.10", 40001), transport="tcp")
    (answer,) = [o for o in out if isinstance(o, Send)]
    assert isinstance(answer.message, SipResponse) and answer.message.status == 200
    assert (answer.destination, answer.transport) == (("192.0.2.10", 40001), "tcp")
    (bye_send,) = [o for o in srv.hang_up(CALL, "max_duration", 6.0) if isinstance(o, Send)]
    bye = bye_send.message
    assert isinstance(bye, SipRequest) and bye.method == "BYE"
    assert bye.uri == "sip:src@192.0.2.99:5070"  # the refreshed target
    local_tag = parse_name_addr(ok.headers.get("To") or "").tag
    assert (bye.headers.get("From") or "").count(";tag=") == 1
    assert parse_name_addr(bye.headers.get("From") or "").tag == local_tag
    assert bye.headers.get_all("Route") == ["<sip:sbc.example;lr>"]


def test_cached_responses_to_health_checks_expire_without_any_call() -> None:
    # An idle recording server probed with OPTIONS every second for an hour: the responses it
    # keeps for retransmitted requests expire (64*T1) instead of piling up.
    srv, _ = server()
    for i in range(3600):
        probe = SipRequest(
            "OPTIONS",
            "sip:srs@10.0.0.5",
            Headers.of(
                [
                    ("Via", f"SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK-p{i}"),
                    ("From", "<sip:probe@192.0.2.10>;tag=p"),
                    ("To", "<sip:srs@10.0.0.5>"),
                    ("Call-ID", f"probe-{i}"),
                    ("CSeq", "1 OPTIONS"),
                ]
            ),
        )
        assert statuses(deliver(srv, probe, float(i))) == [200]
    assert srv.next_deadline() is None  # nothing to retransmit: on_timer never runs
    assert len(srv._cache) <= 64 * srv.config.t1 + 4 * srv.config.t1 + 1


def test_headers_and_bodies_that_fail_deeper_down_are_answered_not_raised() -> None:
    """Each of these used to raise out of receive(): the client got no answer at all."""
    srv, ports = server()
    # A From without its closing '>': 400, and no half-made dialog or ports left behind.
    bad_from = invite_for("cisco-siprec-offer.txt", call_id="broken-from")
    bad_from = SipRequest(
        bad_from.method,
        bad_from.uri,
        bad_from.headers.replace("From", "<sip:src@192.0.2.10;tag=x"),
        bad_from.body,
    )
    assert statuses(deliver(srv, bad_from, 0.0)) == [400]
    assert srv.calls == () and ports.owned == {}
    # A Contact without it: the call is recorded, and hanging up falls back to the From URI
    # (hang_up used to raise there, before releasing the dialog and its ports).
    bad_contact = invite_for("cisco-siprec-offer.txt", call_id="broken-contact")
    bad_contact = SipRequest(
        bad_contact.method,
        bad_contact.uri,
        bad_contact.headers.replace("Contact", "<sip:src@192.0.2.10:5060"),
        bad_contact.body,
    )
    ok = sent(deliver(srv, bad_contact, 0.0))[-1]
    assert ok.status == 200
    deliver(srv, ack_for(bad_contact, ok), 0.1)
    (bye,) = [o.message for o in srv.hang_up("broken-contact", "x", 1.0) if isinstance(o, Send)]
    assert isinstance(bye, SipRequest) and bye.uri == "sip:src@192.0.2.10"
    assert srv.calls == () and ports.owned == {}
    # rs-metadata declaring an encoding nobody knows: the call is recorded, the metadata error
    # noted (as for any malformed metadata).
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    odd = body.replace(b'encoding="UTF-8"', b'encoding="UTF-9"')
    assert odd != body
    invite = invite_for("cisco-siprec-offer.txt", call_id="odd-encoding")
    invite = SipRequest(invite.method, invite.uri, invite.headers, odd)
    assert statuses(deliver(srv, invite, 1.0))[-1] == 200
    # A digest answer with a non-ASCII nonce or response: refused, not a TypeError.
    auth = DigestAuth("srs.example", {"sbc": "s3cret"}, secret=b"k" * 32)
    guarded, _ = server(digest=auth)
    forged = (
        'Digest username="sbc", realm="srs.example", nonce="\u00e9t\u00e9.00", '
        'uri="sip:srs@10.0.0.5", response="\u00e9\u00e9", algorithm=MD5'
    )
    request = invite_for("cisco-siprec-offer.txt", extra=(("Authorization", forged),))
    assert statuses(deliver(guarded, request, 2.0))[-1] in (401, 403)


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("sip:src@192.0.2.10:5070", ("192.0.2.10", 5070)),
        ("sip:src@192.0.2.10;transport=tcp", ("192.0.2.10", 5060)),
        ("sip:src@sbc.example;transport=tls", ("sbc.example", 5061)),
        ("sips:sbc.example", ("sbc.example", 5061)),
        ("sip:src@[2001:db8::1]:5080;transport=tcp", ("2001:db8::1", 5080)),
        ("sip:", None),
    ],
)
def test_uri_address(uri: str, address: tuple[str, int] | None) -> None:
    assert uri_address(uri) == address


def test_offerless_reinvite_takes_hold_and_resume_from_the_answer_in_the_ack() -> None:
    # An SRC may re-INVITE without SDP (a session refresh, or a hold done that way): our 200
    # then carries the offer, and the SRC's answer comes in the ACK: inactive is a hold.
    srv, _ = server()
    ok = establish(srv)
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    sdp = split_body(content_type, body).sdp
    assert sdp is not None

    def reinvite_then_ack(cseq: int, ack_type: str | None, ack_body: bytes) -> list[object]:
        reinvite = in_dialog("INVITE", ok, cseq)
        out = deliver(srv, reinvite, float(cseq))
        assert events(out) == []
        ours = sent(out)[-1]
        assert ours.status == 200 and ours.headers.get("Content-Type") == "application/sdp"
        assert [m.port for m in parse_sdp(ours.body).media] == [40000, 40002]
        ack = ack_for(reinvite, ours)
        headers = ack.headers.replace("Content-Type", ack_type) if ack_type else ack.headers
        return events(deliver(srv, SipRequest("ACK", ack.uri, headers, ack_body), cseq + 0.1))

    held = sdp.replace(b"a=sendonly", b"a=inactive")
    assert [parse_sdp(held).direction_of(i) for i in range(2)] == ["inactive"] * 2
    assert reinvite_then_ack(2, "application/sdp", held) == [Hold()]
    assert reinvite_then_ack(3, content_type, body) == [Resume()]  # multipart, as the INVITE
    # A session refresh: an answer like the last changes nothing, and neither does an ACK that
    # carries none or a broken one (an ACK cannot be refused).
    assert reinvite_then_ack(4, "application/sdp", sdp) == []
    assert reinvite_then_ack(5, None, b"") == []
    assert reinvite_then_ack(6, "application/sdp", b"v=0\r\nnot sdp\r\n") == []
    assert reinvite_then_ack(7, "application/sdp", held[: held.rindex(b"m=audio")]) == []  # 1 of 2
