"""Every vendor SIPREC offer in tests/data/siprec parses to the right streams, roles and answer.

One test per fixture (see tests/data/siprec/README.md for their origin). Each goes through the
same path as a live INVITE: body split, SDP, metadata, negotiation, channel mapping, answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.ingress.siprec.message import Headers, SipRequest
from gateway.ingress.siprec.metadata import (
    MetadataError,
    RecordingMetadata,
    parse_metadata,
    split_body,
)
from gateway.ingress.siprec.participants import ChannelMap, RolePolicy, map_channels
from gateway.ingress.siprec.sdp import SessionDescription, answer, negotiate, parse_sdp
from gateway.media.codec import Codec

DATA = Path(__file__).resolve().parent / "data" / "siprec"


def fixture_body(name: str) -> tuple[str, bytes]:
    """(Content-Type, body) of a fixture, with CRLF line ends as on the wire."""
    text = (DATA / name).read_text()
    boundary = next((line[2:].strip() for line in text.splitlines() if line.startswith("--")), None)
    body = text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    if boundary is None:
        return "application/sdp", body.strip() + b"\r\n"
    return f"multipart/mixed;boundary={boundary}", body


def invite_for(
    name: str,
    *,
    call_id: str = "call-1@src.example",
    branch: str = "z9hG4bK-1",
    cseq: int = 1,
    from_tag: str = "src-tag",
    to_tag: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> SipRequest:
    """A SIPREC INVITE carrying a fixture body."""
    content_type, body = fixture_body(name)
    to = "<sip:srs@10.0.0.5>" + (f";tag={to_tag}" if to_tag else "")
    headers = Headers.of(
        [
            ("Via", f"SIP/2.0/UDP 192.0.2.10:5060;branch={branch}"),
            ("From", f"<sip:src@192.0.2.10>;tag={from_tag}"),
            ("To", to),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} INVITE"),
            ("Contact", "<sip:src@192.0.2.10:5060>;+sip.src"),
            ("Require", "siprec"),
            ("Max-Forwards", "70"),
            ("Content-Type", content_type),
            *extra,
        ]
    )
    return SipRequest("INVITE", "sip:srs@10.0.0.5", headers, body)


@dataclass(frozen=True)
class Parsed:
    offer: SessionDescription
    metadata: RecordingMetadata | None
    channels: ChannelMap
    answer: SessionDescription
    answer_body: bytes


def parse_fixture(name: str) -> Parsed:
    content_type, body = fixture_body(name)
    parts = split_body(content_type, body)
    assert parts.sdp is not None
    offer = parse_sdp(parts.sdp)
    metadata = parse_metadata(parts.metadata) if parts.metadata is not None else None
    chosen = negotiate(offer)
    channels = map_channels(offer, chosen, metadata, RolePolicy())
    ports = [40000 + 2 * i for i in range(len(offer.media))]
    result = answer(offer, address="10.0.0.5", ports=ports, negotiated=chosen)
    return Parsed(offer, metadata, channels, parse_sdp(result.body), result.body)


def summary(p: Parsed) -> list[tuple[str | None, str, str | None, Codec]]:
    """Per channel: (label, role, participant, codec)."""
    return [
        (p.offer.media[mline].label, spec.role, spec.participant, spec.codec)
        for spec, mline in zip(p.channels.channels, p.channels.mlines, strict=True)
    ]


def answer_shape(p: Parsed) -> list[tuple[int, tuple[str, ...], str, str | None]]:
    """Per answer m-line: (port, formats, direction, label)."""
    return [
        (m.port, m.formats, p.answer.direction_of(i), m.label) for i, m in enumerate(p.answer.media)
    ]


def test_cisco_cube() -> None:
    p = parse_fixture("cisco-siprec-offer.txt")
    assert p.metadata is not None and p.metadata.namespace == "urn:ietf:params:xml:ns:recording:1"
    assert [s.label for s in p.metadata.streams] == ["1", "2"]
    assert summary(p) == [
        ("1", "customer", "sip:7301@35.162.237.204", Codec.PCMU),
        ("2", "agent", "7300", Codec.PCMU),
    ]
    assert p.channels.role_source == "label"
    assert answer_shape(p) == [
        (40000, ("0", "101"), "recvonly", "1"),
        (40002, ("0", "101"), "recvonly", "2"),
    ]
    assert b"a=fmtp:101 0-16" in p.answer_body
    assert p.channels.metadata["siprec.session_id"] == "kQNhKFdEEeeJ9tD/VsPGWA=="
    assert p.channels.metadata["siprec.caller.aor"] == "sip:7301@35.162.237.204"
    assert p.channels.metadata["siprec.callee.name"] == "7300"


def test_oracle_acme_draft_namespace_and_calling_party() -> None:
    p = parse_fixture("acme-siprec-offer.txt")
    assert p.metadata is not None and p.metadata.namespace == "urn:ietf:params:xml:ns:recording"
    calling = {q.name: q.calling_party for q in p.metadata.participants}
    assert calling == {"9000": True, "1002": False}
    assert [s.mode for s in p.metadata.streams] == ["separate", "separate"]
    assert summary(p) == [
        ("16777227", "customer", "9000", Codec.PCMU),
        ("16777228", "agent", "1002", Codec.PCMU),
    ]
    assert p.channels.role_source == "calling_party"
    assert answer_shape(p) == [
        (40000, ("0",), "recvonly", "16777227"),
        (40002, ("0",), "recvonly", "16777228"),
    ]


def test_oracle_calling_party_wins_over_order() -> None:
    """Swap the m-lines: the calling party still decides who the customer is."""
    content_type, body = fixture_body("acme-siprec-offer.txt")
    parts = split_body(content_type, body)
    assert parts.sdp is not None and parts.metadata is not None
    sdp = (
        parts.sdp.decode()
        .replace("a=label:16777227", "a=label:X")
        .replace("a=label:16777228", "a=label:16777227")
    )
    offer = parse_sdp(sdp.replace("a=label:X", "a=label:16777228"))
    channels = map_channels(offer, negotiate(offer), parse_metadata(parts.metadata))
    assert [(c.role, c.participant) for c in channels.channels] == [
        ("agent", "1002"),
        ("customer", "9000"),
    ]


def test_sonus_call_data_decides_caller() -> None:
    p = parse_fixture("sonus-siprec-offer.txt")
    assert p.metadata is not None and p.metadata.root == "recording"
    assert p.metadata.group_ids == ("MTQ3YzA3YzAtNjdkNy0xMA==",)
    # The original From is extension 8500, which sends the stream labelled 2.
    assert summary(p) == [
        ("1", "agent", "2249888012@172.16.195.72", Codec.PCMU),
        ("2", "customer", "Extension 8500", Codec.PCMU),
    ]
    assert p.channels.role_source == "call_data"
    assert p.channels.metadata["siprec.original_call_id"] == "2da553f7-a48b-1235-d6a2-5254003a4988"
    assert p.channels.metadata["siprec.caller.name"] == "Extension 8500"
    assert answer_shape(p) == [
        (40000, ("0",), "recvonly", "1"),
        (40002, ("0",), "recvonly", "2"),
    ]


def test_broadworks_two_streams() -> None:
    p = parse_fixture("broadworks-offer-2.txt")
    assert p.metadata is not None and p.metadata.datamode == "complete"  # spelled dataMode
    assert summary(p) == [
        ("10", "customer", "sip:9878942259@212.188.68.145", Codec.PCMA),
        ("20", "agent", "sip:ASBCE@asbce.com", Codec.PCMA),
    ]
    assert answer_shape(p) == [
        (40000, ("8", "97"), "recvonly", "10"),
        (40002, ("8", "97"), "recvonly", "20"),
    ]


def test_broadworks_single_mixed_stream_old_metadata() -> None:
    p = parse_fixture("broadworks-offer.txt")
    # The metadata part's type is mangled; its disposition still marks it as metadata.
    assert p.metadata is not None and p.metadata.root == "recording_metadata"
    assert p.metadata.participants == ()
    assert summary(p) == [("1", "mixed", None, Codec.PCMU)]
    # PCMA is offered first, but PCMU is our preference; G.722 and G.729 are never chosen.
    assert answer_shape(p) == [(40000, ("0", "101"), "recvonly", "1")]
    assert b"a=fmtp:101 0-15" in p.answer_body


def test_procomm_a_leg_b_leg() -> None:
    content_type, body = fixture_body("procomm-siprec-offer.txt")
    assert split_body(content_type, body).metadata is not None  # application/rs-metadata
    p = parse_fixture("procomm-siprec-offer.txt")
    assert summary(p) == [
        ("a_leg", "customer", "016190200", Codec.PCMA),
        ("b_leg", "agent", "Speechpath-Main-Line 016190619", Codec.PCMA),
    ]
    assert answer_shape(p) == [
        (40000, ("8",), "recvonly", "a_leg"),
        (40002, ("8",), "recvonly", "b_leg"),
    ]


@pytest.mark.parametrize(
    ("name", "display"),
    [
        ("connectel-offer.txt", "test_user;lang=en-US;id=22"),
        ("connectel-offer2.txt", "test_user;lang=en-US"),
        ("connectel-offer3.txt", "test_user"),
    ],
)
def test_connectel(name: str, display: str) -> None:
    p = parse_fixture(name)
    assert p.metadata is not None
    assert all(not q.send for q in p.metadata.participants)  # no stream associations at all
    assert summary(p) == [
        ("1", "customer", display, Codec.PCMU),
        ("2", "agent", "sip:0760516936@sip-cust1.connectel.io", Codec.PCMU),
    ]
    # m-line 2 offers PCMA first; one codec per m-line, in our preference order.
    assert answer_shape(p) == [
        (40000, ("0", "101"), "recvonly", "1"),
        (40002, ("0", "101"), "recvonly", "2"),
    ]
    assert b"GSM" not in p.answer_body


def test_inactive_offer_is_answered_inactive() -> None:
    p = parse_fixture("inactive-sdp-offer.txt")
    assert [m.direction for m in p.offer.media] == ["inactive", "inactive"]
    assert summary(p) == [
        ("1", "customer", "sip:0733165805@192.168.40.34", Codec.PCMU),
        ("2", "agent", "sip:+972546136443@192.168.10.140", Codec.PCMU),
    ]
    assert answer_shape(p) == [
        (40000, ("0", "101"), "inactive", "1"),
        (40002, ("0", "101"), "inactive", "2"),
    ]


def test_sdp_only_offer_has_no_metadata() -> None:
    p = parse_fixture("non-siprec-payload.txt")
    assert p.metadata is None
    assert summary(p) == [("1", "mixed", None, Codec.PCMU)]
    assert answer_shape(p) == [(40000, ("0", "101"), "recvonly", "1")]


def test_role_policy_maps_caller_to_agent() -> None:
    content_type, body = fixture_body("cisco-siprec-offer.txt")
    parts = split_body(content_type, body)
    assert parts.sdp is not None and parts.metadata is not None
    offer = parse_sdp(parts.sdp)
    policy = RolePolicy(caller_role="agent", callee_role="customer")
    channels = map_channels(offer, negotiate(offer), parse_metadata(parts.metadata), policy)
    assert [c.role for c in channels.channels] == ["agent", "customer"]


def test_unusable_m_lines_get_port_zero_in_order() -> None:
    offer = parse_sdp(
        "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
        "m=video 5000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=label:v\r\n"
        "m=audio 5002 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\na=label:g\r\n"
        "m=audio 5004 RTP/SAVP 0\r\na=label:s\r\n"
        "m=audio 5006 RTP/AVP 96\r\na=rtpmap:96 L16/16000\r\na=label:1\r\na=sendonly\r\n"
    )
    result = answer(offer, address="10.0.0.5", ports=[1, 2, 3, 40006])
    parsed = parse_sdp(result.body)
    assert [m.port for m in parsed.media] == [0, 0, 0, 40006]
    assert [m.media for m in parsed.media] == ["video", "audio", "audio", "audio"]
    assert [m.label for m in parsed.media] == ["v", "g", "s", "1"]
    chosen = result.streams[3]
    assert chosen is not None and (chosen.codec, chosen.clock_rate) == (Codec.L16, 16000)
    channels = map_channels(offer, result.streams, None)
    assert [(c.index, c.codec, c.sample_rate) for c in channels.channels] == [(0, Codec.L16, 16000)]
    assert channels.mlines == (3,)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_metadata_with_a_dtd_or_entities_is_refused_in_any_encoding(encoding: str) -> None:
    # An entity expansion ("billion laughs") from the network: refused before any expansion,
    # also when the document is UTF-16 (no "<!DOCTYPE" bytes to spot).
    bomb = (
        f'<?xml version="1.0" encoding="{encoding}"?>'
        '<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        '<recording xmlns="urn:ietf:params:xml:ns:recording:1">'
        '<participant participant_id="p"><nameID aor="sip:&b;@x"/></participant></recording>'
    ).encode(encoding)
    with pytest.raises(MetadataError, match="DTD"):
        parse_metadata(bomb)
