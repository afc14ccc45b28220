"""RTP: header parsing, the jitter buffer, DTMF and comfort noise, and alignment on the call clock.

The alignment tests play one or two 20 ms PCMU streams through :class:`CallMedia`, place the
events on a :class:`ChannelClock` exactly as ``Call`` does (Audio by timestamp, Gap by
``fill_to``), and check that every packet's audio sits where its send time says it belongs.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingress.events import Audio, Dtmf, Gap, IngressEvent
from gateway.ingress.siprec.rtp import (
    CallMedia,
    JitterBuffer,
    MediaEpoch,
    RtpError,
    RtpPacket,
    RtpReceiver,
    StreamConfig,
    is_rtcp,
    parse_rtp,
    parse_telephone_event,
)
from gateway.media.clock import ChannelClock
from gateway.media.codec import Codec, decode, encode

FRAME = 160  # 20 ms of 8 kHz PCMU
PT_TE = 101


def payload(k: int) -> bytes:
    """Recognizable audio of packet k (never 0xFF, the µ-law silence)."""
    return bytes([1 + k % 200]) * FRAME


def packet(k: int, *, seq0: int = 1000, ts0: int = 5000, ssrc: int = 0x1234, pt: int = 0) -> bytes:
    return RtpPacket(
        pt, (seq0 + k) % 65536, (ts0 + k * FRAME) % (1 << 32), ssrc, payload(k)
    ).to_bytes()


def render(events: list[IngressEvent], channel: int = 0) -> bytes:
    """The channel's audio on the call clock, placed as gateway.calls.call.Call places it."""
    clock = ChannelClock(b"\xff")
    out = bytearray()
    for e in events:
        if isinstance(e, Audio) and e.channel == channel:
            out += clock.push(e.timestamp, e.payload)
        elif isinstance(e, Gap) and e.channel == channel:
            out += clock.fill_to(clock.frontier + e.duration_samples)
    return bytes(out + clock.flush())


def media(*channels: int) -> CallMedia:
    return CallMedia([StreamConfig(c, Codec.PCMU, 0, 8000, PT_TE) for c in channels])


def play(
    m: CallMedia, datagrams: list[tuple[float, bytes]], channel: int = 0
) -> list[IngressEvent]:
    events: list[IngressEvent] = []
    for arrival, data in datagrams:
        events += m.receive(channel, data, arrival)
    return events + m.flush()


def assert_aligned(audio: bytes, expected: dict[int, int], *, tolerance: int = 0) -> None:
    """``expected`` maps packet k -> the sample where its audio must start (± tolerance)."""
    for k, start in expected.items():
        want = payload(k)[:1]
        window = range(max(0, start - tolerance), start + tolerance + 1)
        found = [s for s in window if audio[s : s + FRAME] == want * FRAME]
        assert found, f"packet {k} not within {tolerance} samples of {start}"


def test_parse_header_with_csrcs_extension_and_padding() -> None:
    ext = struct.pack("!HH", 0xBEDE, 1) + b"\x10\xaa\x00\x00"
    body = b"\x11" * 10
    raw = (
        struct.pack("!BBHII", 0x80 | 0x20 | 0x10 | 2, 0x80 | 8, 7, 99, 0xCAFE)
        + struct.pack("!II", 1, 2)
        + ext
        + body
        + b"\x00\x00\x03"
    )
    p = parse_rtp(raw)
    assert (p.version, p.padding, p.extension, p.marker) == (2, True, True, True)
    assert (p.payload_type, p.sequence, p.timestamp, p.ssrc) == (8, 7, 99, 0xCAFE)
    assert p.csrcs == (1, 2) and p.extension_profile == 0xBEDE
    assert p.payload == body


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x00",  # short
        b"\x40" + b"\x00" * 11,  # version 1
        b"\x83" + b"\x00" * 11,  # 3 CSRCs missing
        b"\x90" + b"\x00" * 11 + b"\x00\x00\x00\x09",  # extension longer than the packet
        b"\xa0" + b"\x00" * 11 + b"\x05",  # padding longer than the payload
    ],
)
def test_malformed_rtp(raw: bytes) -> None:
    with pytest.raises(RtpError):
        parse_rtp(raw)


def test_rtcp_is_detected_and_ignored() -> None:
    sender_report = struct.pack("!BBH", 0x80, 200, 6) + b"\x00" * 24
    assert is_rtcp(sender_report) and not is_rtcp(packet(0))
    m = media(0)
    assert m.receive(0, sender_report, 0.0) == []
    assert m.receivers[0].stats.rtcp == 1
    assert m.receive(0, b"\x00\x01", 0.0) == [] and m.receivers[0].stats.malformed == 1


def test_in_order_stream_is_placed_by_timestamp() -> None:
    events = play(media(0), [(k * 0.02, packet(k)) for k in range(50)])
    assert events[0] == Audio(0, b"", 0)  # pins the call clock's origin
    audio = render(events)
    assert audio == b"".join(payload(k) for k in range(50))


def test_reordered_packets_land_in_place() -> None:
    order = list(range(60))
    # Packet 0 arrives first: a stream's first packet anchors it (earlier ones would be late).
    for i in range(1, 40, 3):
        order[i], order[i + 1] = order[i + 1], order[i]
    order[45:48] = [47, 45, 46]
    m = media(0)
    events = play(m, [(i * 0.02, packet(k)) for i, k in enumerate(order)])
    assert render(events) == b"".join(payload(k) for k in range(60))
    assert m.receivers[0].buffer.stats.reordered > 0 and m.receivers[0].buffer.stats.lost == 0


def test_duplicates_are_dropped() -> None:
    datagrams = []
    for k in range(40):
        datagrams += [(k * 0.02, packet(k)), (k * 0.02 + 0.001, packet(k))]
    datagrams.append((0.9, packet(3)))  # a very late copy
    m = media(0)
    assert render(play(m, datagrams)) == b"".join(payload(k) for k in range(40))
    stats = m.receivers[0].buffer.stats
    assert stats.duplicates == 41 and stats.released == 40


def test_lost_packets_become_silence_and_keep_alignment() -> None:
    lost = {5, 6, 30}
    m = media(0)
    events = play(m, [(k * 0.02, packet(k)) for k in range(50) if k not in lost])
    audio = render(events)
    assert len(audio) == 50 * FRAME
    for k in range(50):
        want = b"\xff" * FRAME if k in lost else payload(k)
        assert audio[k * FRAME : (k + 1) * FRAME] == want
    assert m.receivers[0].buffer.stats.lost == 3
    assert any(isinstance(e, Gap) for e in events)


def test_sequence_and_timestamp_wrap() -> None:
    m = media(0)
    datagrams = [(k * 0.02, packet(k, seq0=65530, ts0=(1 << 32) - 3 * FRAME)) for k in range(30)]
    datagrams[8], datagrams[9] = datagrams[9], datagrams[8]  # reordered across the wrap
    assert render(play(m, datagrams)) == b"".join(payload(k) for k in range(30))
    assert m.receivers[0].buffer.stats.lost == 0


def test_ssrc_change_keeps_the_channel_aligned() -> None:
    m = media(0)
    first = [(k * 0.02, packet(k)) for k in range(40)]
    # A transfer: new SSRC, unrelated sequence and timestamp bases, same wall-clock pacing,
    # arriving with 7 ms of network delay more than before.
    second = [
        (k * 0.02 + 0.007, packet(k, seq0=40000 - 40, ts0=123456789, ssrc=0xBEEF))
        for k in range(40, 80)
    ]
    audio = render(play(m, first + second))
    assert_aligned(audio, {k: k * FRAME for k in range(80)}, tolerance=FRAME)
    assert m.receivers[0].buffer.stats.ssrc_changes == 1


def test_two_senders_interleaved_on_one_port_keep_the_first_and_real_time() -> None:
    # A misbehaving SBC (or a stray sender) interleaves a second SSRC 1:1 with the first: the
    # stream stays locked to the first; the timeline runs at real time, not twice as fast.
    m = media(0)
    datagrams = []
    for k in range(50):
        datagrams.append((k * 0.02, packet(k)))
        datagrams.append((k * 0.02 + 0.01, packet(k + 100, seq0=7, ts0=99, ssrc=0xF00)))
    audio = render(play(m, datagrams))
    assert len(audio) == 50 * FRAME  # 1 s of audio for 1 s of call
    assert_aligned(audio, {k: k * FRAME for k in range(50)})
    stats = m.receivers[0].buffer.stats
    assert stats.ssrc_changes == 0
    assert stats.foreign_ssrc == 49  # and the last one, still held when the call ended


def test_ssrc_change_after_a_pause_uses_arrival_time() -> None:
    m = media(0)
    first = [(k * 0.02, packet(k)) for k in range(20)]
    # 2 s of nothing, then a new SSRC: its audio belongs 2 s later on the clock.
    second = [(k * 0.02 + 2.0, packet(k, seq0=7, ts0=42, ssrc=0xD00D)) for k in range(20, 40)]
    audio = render(play(m, first + second))
    assert_aligned(audio, {k: k * FRAME for k in range(20)})
    assert_aligned(audio, {k: k * FRAME + 16000 for k in range(20, 40)}, tolerance=FRAME)


def test_two_streams_share_one_timeline() -> None:
    m = media(0, 1)
    a = [(k * 0.02, 0, packet(k, ssrc=1)) for k in range(50)]
    # Leg B starts 100 ms later with its own random bases.
    b = [(0.1 + k * 0.02, 1, packet(k, seq0=9, ts0=777, ssrc=2)) for k in range(45)]
    events: list[IngressEvent] = []
    for arrival, channel, data in sorted(a + b, key=lambda x: x[0]):
        events += m.receive(channel, data, arrival)
    events += m.flush()
    assert events[0] == Audio(0, b"", 0)
    assert_aligned(render(events, 0), {k: k * FRAME for k in range(50)})
    assert_aligned(render(events, 1), {k: 800 + k * FRAME for k in range(45)}, tolerance=FRAME)


def test_timestamp_jump_resyncs_to_arrival() -> None:
    """Timestamps that froze during a hold (no packets for 5 s) are re-anchored by arrival."""
    m = media(0)
    first = [(k * 0.02, packet(k)) for k in range(20)]
    resumed = [(5.0 + (k - 20) * 0.02, packet(k)) for k in range(20, 30)]
    audio = render(play(m, first + resumed))
    assert_aligned(audio, {k: 40000 + (k - 20) * FRAME for k in range(20, 30)}, tolerance=FRAME)
    assert m.receivers[0].buffer.stats.resyncs == 1


def telephone_event(event: int, end: bool, duration: int) -> bytes:
    return struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)


def test_telephone_event_gives_one_digit() -> None:
    assert parse_telephone_event(telephone_event(11, True, 800)).digit == "#"
    m = media(0)
    datagrams = [(k * 0.02, packet(k)) for k in range(5)]
    te_ts = 5000 + 5 * FRAME
    for i, (end, duration) in enumerate(
        [(False, 160), (False, 320), (False, 480), (True, 640), (True, 640), (True, 640)]
    ):
        data = RtpPacket(PT_TE, 1005 + i, te_ts, 0x1234, telephone_event(5, end, duration))
        datagrams.append((0.1 + i * 0.02, data.to_bytes()))
    datagrams.append((0.1 + 6 * 0.02, packet(11)))
    datagrams.append((0.1 + 7 * 0.02, packet(11)))  # a duplicate of the audio
    events = play(m, datagrams)
    assert [e for e in events if isinstance(e, Dtmf)] == [Dtmf(0, "5")]
    audio = render(events)
    # The DTMF span (packets 5-10) is silence; packet 11's audio is where it belongs.
    assert audio[5 * FRAME : 11 * FRAME] == b"\xff" * 6 * FRAME
    assert audio[11 * FRAME : 12 * FRAME] == payload(11)


def test_dtmf_whose_end_was_lost_is_still_reported() -> None:
    r = RtpReceiver(StreamConfig(0, Codec.PCMU, 0, 8000, PT_TE))
    data = RtpPacket(PT_TE, 1, 800, 9, telephone_event(1, False, 160)).to_bytes()
    assert [e for e in r.receive(data, 0.0) if isinstance(e, Dtmf)] == []
    second = RtpPacket(PT_TE, 2, 1600, 9, telephone_event(2, True, 160)).to_bytes()
    digits = [e for e in r.receive(second, 0.02) if isinstance(e, Dtmf)]
    assert digits == [Dtmf(0, "1"), Dtmf(0, "2")]


def test_comfort_noise_is_a_gap() -> None:
    m = media(0)
    datagrams = [(k * 0.02, packet(k)) for k in range(10)]
    datagrams.append((0.2, RtpPacket(13, 1010, 5000 + 10 * FRAME, 0x1234, b"\x40").to_bytes()))
    # 1 s of comfort noise; the sender skips sequence numbers only by one.
    datagrams += [
        (
            1.2 + j * 0.02,
            RtpPacket(0, 1011 + j, 5000 + (60 + j) * FRAME, 0x1234, payload(60 + j)).to_bytes(),
        )
        for j in range(5)
    ]
    events = play(m, datagrams)
    assert sum(e.duration_samples for e in events if isinstance(e, Gap)) == 50 * FRAME
    audio = render(events)
    assert audio[10 * FRAME : 60 * FRAME] == b"\xff" * 50 * FRAME
    assert audio[60 * FRAME : 61 * FRAME] == payload(60)
    assert m.receivers[0].stats.comfort_noise == 1


def test_l16_is_converted_to_little_endian() -> None:
    r = RtpReceiver(StreamConfig(0, Codec.L16, 96, 16000))
    data = RtpPacket(96, 1, 0, 5, b"\x01\x02\x03\x04").to_bytes()
    audio = [e for e in r.receive(data, 0.0) if isinstance(e, Audio)]
    assert audio == [Audio(0, b"\x02\x01\x04\x03", 0)]


def test_unknown_payload_type_is_counted() -> None:
    r = RtpReceiver(StreamConfig(0, Codec.PCMU, 0))
    assert r.receive(RtpPacket(18, 1, 0, 5, b"\x00" * 20).to_bytes(), 0.0) == []
    assert r.stats.unknown_payload == 1


def test_poll_releases_held_packets_after_the_delay() -> None:
    jb = JitterBuffer(8000, epoch=MediaEpoch(0.0), max_delay_s=0.2)
    first = parse_rtp(packet(0))
    assert len(jb.push(first, 0.0)) == 1
    assert jb.push(parse_rtp(packet(2)), 0.04) == []  # waits for packet 1
    assert jb.next_deadline() == pytest.approx(0.24)
    assert jb.poll(0.1) == []
    frames = jb.poll(0.25)
    assert [(f.position, f.lost) for f in frames] == [(2 * FRAME, 1)]


@settings(max_examples=60, deadline=None)
@given(
    seq0=st.integers(0, 65535),
    ts0=st.integers(0, (1 << 32) - 1),
    seed=st.integers(0, 10_000),
    drop=st.floats(0, 0.2),
    dup=st.floats(0, 0.3),
)
def test_property_released_frames_sit_at_their_timestamps(
    seq0: int, ts0: int, seed: int, drop: float, dup: float
) -> None:
    """Whatever the wrap, reordering (within the window), loss and duplication: every released
    frame is at its timestamp's place, positions never decrease, no sequence comes out twice."""
    rng = random.Random(seed)
    n = 120
    sends = []
    for k in range(n):
        if rng.random() < drop:
            continue
        arrival = k * 0.02 + rng.uniform(0, 0.035)  # up to 35 ms of jitter: within 60 ms
        sends.append((arrival, k))
        if rng.random() < dup:
            sends.append((arrival + rng.uniform(0, 0.05), k))
    sends.sort()
    jb = JitterBuffer(8000, epoch=MediaEpoch())
    frames = []
    for arrival, k in sends:
        frames += jb.push(parse_rtp(packet(k, seq0=seq0, ts0=ts0)), arrival)
    frames += jb.flush()
    first_k = sends[0][1]
    origin = frames[0].position - first_k * FRAME
    seqs = [f.packet.sequence for f in frames]
    assert len(seqs) == len(set(seqs))
    positions = [f.position for f in frames]
    assert positions == sorted(positions)
    for f in frames:
        k = (f.packet.sequence - seq0) % 65536
        assert f.position - origin == k * FRAME
    delivered = {(f.packet.sequence - seq0) % 65536 for f in frames}
    sent = {k for _, k in sends}
    # Everything sent after the first arrival is delivered (earlier ones may be late).
    assert {k for k in sent if k >= first_k} <= delivered


def test_codec_change_is_transcoded_to_the_channels_codec() -> None:
    """A re-INVITE switching the stream from PCMU to PCMA: PCMA packets come out as the
    channel's PCMU, packets of the old type still in flight decode as sent, and the timeline
    runs on without a gap."""
    r = RtpReceiver(StreamConfig(0, Codec.PCMU, 0, 8000, PT_TE))
    events = r.receive(packet(0), 0.0) + r.receive(packet(1), 0.02)
    r.reconfigure(StreamConfig(0, Codec.PCMA, 8, 8000, PT_TE))
    pcm = encode(Codec.L16, decode(Codec.PCMU, payload(3)))  # what the caller says, as PCM
    alaw = encode(Codec.PCMA, decode(Codec.L16, pcm))
    events += r.receive(packet(2), 0.04)  # late PCMU, sent before the switch
    events += r.receive(RtpPacket(8, 1003, 5000 + 3 * FRAME, 0x1234, alaw).to_bytes(), 0.06)
    events += r.flush()
    assert not any(isinstance(e, Gap) for e in events)
    audio = [e for e in events if isinstance(e, Audio)]
    assert [e.timestamp for e in audio] == [0, FRAME, 2 * FRAME, 3 * FRAME]
    assert [e.payload for e in audio[:3]] == [payload(0), payload(1), payload(2)]
    assert audio[3].payload == encode(Codec.PCMU, decode(Codec.PCMA, alaw))
    assert r.stats.unknown_payload == 0
    with pytest.raises(ValueError):
        r.reconfigure(StreamConfig(0, Codec.L16, 96, 16000))


def test_a_stream_added_mid_call_is_placed_by_its_arrival_without_a_leading_gap() -> None:
    """A leg that joins 1 s into the call (re-INVITE): its first packet sits at its arrival
    on the call's epoch, and no gap from position 0 comes before it (the call's channel for it
    begins where the call had got to, so such a gap would push its audio late)."""
    m = media(0, 1)
    events = play(m, [(k * 0.02, packet(k)) for k in range(50)], channel=0)
    m.add(StreamConfig(2, Codec.PCMU, 0, 8000, PT_TE))
    joined = play(m, [(1.0 + k * 0.02, packet(k, ssrc=0x77, ts0=9)) for k in range(5)], channel=2)
    own = [e for e in joined if getattr(e, "channel", None) == 2]
    assert not any(isinstance(e, Gap) for e in own)
    first = next(e for e in own if isinstance(e, Audio))
    assert first.timestamp == 8000 and first.payload == payload(0)
    assert [e.timestamp for e in own if isinstance(e, Audio)] == [
        8000 + k * FRAME for k in range(5)
    ]
    assert len(events) > 0
    with pytest.raises(ValueError, match="twice"):
        m.add(StreamConfig(2, Codec.PCMU, 0, 8000, PT_TE))
