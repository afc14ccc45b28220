"""SRTP for SIPREC media: SDES ``a=crypto`` in the offer and answer (RFC 4568), the ``srtp``
policy, and libsrtp decryption in the RTP receiver, against packets protected by libsrtp as an
SBC would send them. Keys here are test constants; the gateway's own keys are random."""

from __future__ import annotations

import base64

import pylibsrtp
import pytest

from gateway.ingress.events import Audio
from gateway.ingress.siprec.rtp import RtpPacket, RtpReceiver, StreamConfig
from gateway.ingress.siprec.sdp import (
    SRTP_SUITES,
    Crypto,
    answer,
    negotiate,
    parse_crypto,
    parse_sdp,
)
from gateway.media.codec import Codec

KEY = bytes(range(30))  # master key (16) + salt (14) of the AES-CM suites
INLINE = base64.b64encode(KEY).decode()
FRAME = 160


def offer(*mlines: str) -> str:
    head = "v=0\r\no=SBC 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    return head + "".join(mlines)


def mline(port: int, proto: str = "RTP/SAVP", *crypto: str, label: str = "1") -> str:
    lines = [f"m=audio {port} {proto} 0", "a=rtpmap:0 PCMU/8000", "a=sendonly"]
    lines += [f"a=crypto:{c}" for c in crypto] + [f"a=label:{label}"]
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}", Crypto(1, "AES_CM_128_HMAC_SHA1_80", KEY)),
        (
            f"7 aes_cm_128_hmac_sha1_32 inline:{INLINE}|2^31",
            Crypto(7, "AES_CM_128_HMAC_SHA1_32", KEY),
        ),
        (
            f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE.rstrip('=')}",
            Crypto(1, "AES_CM_128_HMAC_SHA1_80", KEY),
        ),
        (
            f"2 AEAD_AES_128_GCM inline:{base64.b64encode(KEY[:28]).decode().rstrip('=')}",
            Crypto(2, "AEAD_AES_128_GCM", KEY[:28]),
        ),
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}|2^20|1:4", None),  # an MKI
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE} UNENCRYPTED_SRTP", None),  # session params
        (f"1 AES_256_CM_HMAC_SHA1_80 inline:{INLINE}", None),  # a suite we do not decrypt
        (f"1 AES_CM_128_HMAC_SHA1_80 inline:{base64.b64encode(KEY[:29]).decode()}", None),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:not*base64", None),
        ("x AES_CM_128_HMAC_SHA1_80 inline:AAAA", None),
    ],
)
def test_crypto_attributes(value: str, expected: Crypto | None) -> None:
    assert parse_crypto(value) == expected


def test_the_key_stays_out_of_repr() -> None:
    assert INLINE not in repr(parse_crypto(f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"))
    assert "key" not in repr(parse_crypto(f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"))


def test_policy_decides_which_transports_are_taken() -> None:
    sdp = parse_sdp(
        offer(
            mline(20000, "RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}"),
            mline(20002, "RTP/AVP", label="2"),
            mline(20004, "RTP/SAVP", f"1 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}|1:4", label="3"),
        )
    )
    taken = {
        p: [n is not None for n in negotiate(sdp, srtp=p)] for p in ("off", "allow", "require")
    }
    # The third m-line is SRTP with only an MKI-keyed crypto line: never usable.
    assert taken == {
        "off": [False, True, False],
        "allow": [True, True, False],
        "require": [True, False, False],
    }
    first = negotiate(sdp)[0]
    assert first is not None and first.crypto == Crypto(1, "AES_CM_128_HMAC_SHA1_80", KEY)
    assert negotiate(sdp)[1] is not None and negotiate(sdp)[1].crypto is None  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="srtp policy"):
        negotiate(sdp, srtp="maybe")


def test_first_usable_crypto_line_is_taken_and_answered_with_our_key() -> None:
    gcm = base64.b64encode(KEY[:28]).decode()
    sdp = parse_sdp(
        offer(
            mline(
                20000,
                "RTP/SAVP",
                f"1 AES_256_CM_HMAC_SHA1_80 inline:{INLINE}",  # not ours: skipped
                f"2 AEAD_AES_128_GCM inline:{gcm}",
                f"3 AES_CM_128_HMAC_SHA1_80 inline:{INLINE}",
            )
        )
    )
    (n,) = negotiate(sdp)
    assert (
        n is not None
        and n.crypto is not None
        and (n.crypto.tag, n.crypto.suite)
        == (
            2,
            "AEAD_AES_128_GCM",
        )
    )
    ours = bytes(reversed(range(28)))
    body = answer(sdp, address="10.0.0.5", ports=[40000], keys=[ours]).body.decode()
    assert "m=audio 40000 RTP/SAVP 0" in body
    assert f"a=crypto:2 AEAD_AES_128_GCM inline:{base64.b64encode(ours).decode()}" in body
    assert gcm not in body  # never the offerer's key
    with pytest.raises(ValueError, match="key of our own"):
        answer(sdp, address="10.0.0.5", ports=[40000])
    with pytest.raises(ValueError, match="key of our own"):
        answer(sdp, address="10.0.0.5", ports=[40000], keys=[KEY])  # 30 bytes: wrong length


def protector(key: bytes = KEY, suite: str = "AES_CM_128_HMAC_SHA1_80") -> pylibsrtp.Session:
    profile = {
        "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
        "AEAD_AES_128_GCM": pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
    }[suite]
    policy = pylibsrtp.Policy(
        key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile
    )
    return pylibsrtp.Session(policy=policy)


def srtp_packets(session: pylibsrtp.Session, n: int, *, seq0: int = 100) -> list[bytes]:
    return [
        session.protect(
            RtpPacket(0, seq0 + k, 1000 + k * FRAME, 0xBEEF, bytes([1 + k]) * FRAME).to_bytes()
        )
        for k in range(n)
    ]


@pytest.mark.parametrize("suite", ["AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM"])
def test_receiver_decrypts_srtp_and_drops_what_fails_authentication(suite: str) -> None:
    key = KEY[: SRTP_SUITES[suite]]
    crypto = Crypto(1, suite, key)
    receiver = RtpReceiver(StreamConfig(0, Codec.PCMU, 0, 8000, srtp=crypto))
    packets = srtp_packets(protector(key, suite), 6)
    assert all(bytes([1 + k]) * FRAME not in p for k, p in enumerate(packets))  # encrypted
    tampered = bytearray(packets[2])
    tampered[20] ^= 0xFF
    forged = srtp_packets(protector(bytes(len(key)), suite), 1, seq0=150)[0]  # another key
    events = []
    sequence = [packets[0], packets[1], bytes(tampered), forged, packets[1], *packets[2:], b"\x80"]
    for i, data in enumerate(sequence):
        events += receiver.receive(data, i * 0.02)
    events += receiver.flush()
    audio = [e.payload for e in events if isinstance(e, Audio)]
    assert audio == [bytes([1 + k]) * FRAME for k in range(6)]
    stats = receiver.stats
    assert (stats.srtp_rejected, stats.srtp_replayed, stats.malformed) == (2, 1, 1)


def test_new_keys_in_a_reinvite_take_effect() -> None:
    receiver = RtpReceiver(
        StreamConfig(0, Codec.PCMU, 0, 8000, srtp=Crypto(1, "AES_CM_128_HMAC_SHA1_80", KEY))
    )
    first = srtp_packets(protector(), 2)
    new_key = bytes(30 - i for i in range(30))
    receiver.reconfigure(
        StreamConfig(0, Codec.PCMU, 0, 8000, srtp=Crypto(2, "AES_CM_128_HMAC_SHA1_80", new_key))
    )
    second = srtp_packets(protector(new_key), 2, seq0=102)
    events = [*receiver.receive(first[0], 0.0), *receiver.receive(second[0], 0.04)]
    events += [*receiver.receive(second[1], 0.06), *receiver.flush()]
    assert len([e for e in events if isinstance(e, Audio)]) == 2  # the old key's packet fails
    assert receiver.stats.srtp_rejected == 1
