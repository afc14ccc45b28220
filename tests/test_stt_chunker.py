"""AudioChunker and Pacer: exact-size chunks, lossless re-chunking, real-time pacing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.stt.chunker import AudioChunker, Pacer


def payload(n: int, seed: int) -> bytes:
    """Non-silent recognizable bytes (never 0x00 nor 0xFF)."""
    return bytes((seed + i) % 250 + 1 for i in range(n))


@given(
    rate=st.sampled_from([8000, 16000, 48000]),
    width=st.sampled_from([1, 2]),
    chunk_ms=st.sampled_from([50, 100, 200, 1000]),
    frames=st.lists(st.integers(1, 2000), max_size=60),
)
@settings(max_examples=300, deadline=None)
def test_chunks_are_exact_and_lossless(
    rate: int, width: int, chunk_ms: int, frames: list[int]
) -> None:
    silence = b"\xff" if width == 1 else b"\x00\x00"
    chunker = AudioChunker(rate, width, chunk_ms=chunk_ms, silence_byte=silence)
    chunk_bytes = rate * chunk_ms // 1000 * width
    sent = bytearray()
    out: list[bytes] = []
    for i, n in enumerate(frames):
        frame = payload(n * width, i)  # whole samples
        sent += frame
        for chunk in chunker.push(frame):
            assert len(chunk) == chunk_bytes
            out.append(chunk)
        assert chunker.pending_bytes < chunk_bytes
    tail = chunker.flush()
    assert chunker.flush() is None
    if tail is not None:
        ms = len(tail) * 1000 / (rate * width)
        assert 50 <= ms <= 1000
        assert len(tail) % width == 0
        out.append(tail)
    joined = b"".join(out)
    padding = len(joined) - len(sent)
    assert padding >= 0
    assert joined[: len(sent)] == bytes(sent)  # input, in order
    assert joined[len(sent) :] == silence * (padding // width)  # padding only at the end
    if len(sent) % chunk_bytes == 0:
        assert tail is None
    assert chunker.bytes_in == len(sent)
    assert chunker.bytes_out == len(joined)
    assert chunker.padding_bytes == padding


def test_flush_pads_to_min_and_not_beyond() -> None:
    chunker = AudioChunker(8000, 1, chunk_ms=100, silence_byte=b"\xff")
    assert chunker.push(b"\x01" * 100) == []
    tail = chunker.flush()
    assert tail == b"\x01" * 100 + b"\xff" * 300  # 12.5 ms -> 50 ms
    assert chunker.push(b"\x02" * 700) == []  # 87.5 ms: no padding needed
    assert chunker.flush() == b"\x02" * 700
    assert chunker.padding_bytes == 300
    assert chunker.flush() is None


def test_push_splits_many_chunks_at_once() -> None:
    chunker = AudioChunker(16000, 2, chunk_ms=50)
    chunks = chunker.push(payload(1600 * 3 + 10, 0))
    assert [len(c) for c in chunks] == [1600, 1600, 1600]
    assert chunker.pending_bytes == 10


def test_partial_sample_is_dropped_at_flush() -> None:
    chunker = AudioChunker(16000, 2, silence_byte=b"\x00\x00")
    chunker.push(b"\x01\x02\x03")
    assert chunker.flush() == b"\x01\x02" + b"\x00" * 1598
    assert chunker.dropped_bytes == 1


def test_uneven_rate_rounds_chunks_up_to_whole_samples() -> None:
    chunker = AudioChunker(11025, 2, chunk_ms=50)
    assert chunker.chunk_samples == 552  # 551.25 samples -> 552 (50.07 ms)
    assert chunker.ms_of(chunker.chunk_bytes) >= 50


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_ms": 20}, "chunk_ms"),
        ({"chunk_ms": 1001}, "chunk_ms"),
        ({"chunk_ms": 100, "min_ms": 0}, "chunk_ms"),
        ({"silence_byte": b""}, "silence_byte"),
        ({"silence_byte": b"\x00\x00\x00"}, "silence_byte"),
    ],
)
def test_chunker_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AudioChunker(16000, 2, **kwargs)  # type: ignore[arg-type]


def test_chunker_rejects_bad_format() -> None:
    with pytest.raises(ValueError):
        AudioChunker(0, 2)
    with pytest.raises(ValueError):
        AudioChunker(16000, 0)


# -- Pacer --------------------------------------------------------------------------------------


def test_pacer_rule() -> None:
    pacer = Pacer(now=10.0)
    assert pacer.due(100) == 10.0  # the first chunk goes at once
    assert pacer.due(100) == 10.0  # asking again about the same chunk
    assert pacer.due(200) == pytest.approx(10.1)  # chunk [100, 200) at start + 100 ms
    assert pacer.due(1200) == pytest.approx(10.2)
    assert pacer.due(1250) == pytest.approx(11.2)
    assert pacer.sent_ms == 1250
    with pytest.raises(ValueError, match="backwards"):
        pacer.due(1000)
    pacer.reset(50.0)
    assert pacer.due(100) == 50.0
    assert pacer.due(200) == pytest.approx(50.1)


def test_pacer_lead() -> None:
    pacer = Pacer(now=0.0, lead_ms=150)
    assert [pacer.due(t) for t in (100, 200, 300, 400)] == pytest.approx([0.0, 0.0, 0.05, 0.15])
    with pytest.raises(ValueError):
        Pacer(0.0, lead_ms=-1)


@given(
    durations=st.lists(st.sampled_from([50.0, 100.0, 20.0 * 7, 500.0, 1000.0]), max_size=80),
    lags=st.lists(st.floats(0.0, 0.5), max_size=80),
    lead_ms=st.sampled_from([0.0, 40.0, 300.0]),
    start=st.floats(0.0, 1e6),
)
@settings(max_examples=300, deadline=None)
def test_pacer_never_runs_ahead_and_never_waits_needlessly(
    durations: list[float], lags: list[float], lead_ms: float, start: float
) -> None:
    pacer = Pacer(start, lead_ms=lead_ms)
    now = start
    sent = 0.0
    eps = 1e-3  # ms; float rounding of wall times
    for i, d in enumerate(durations):
        now += lags[i] if i < len(lags) else 0.0  # the producer may be late with the next chunk
        due = pacer.due(sent + d)
        send_at = max(now, due)  # a sender sleeps until due
        elapsed_ms = (send_at - start) * 1000
        # audio sent, this chunk included, never exceeds elapsed wall time + one chunk (+ lead)
        assert sent + d <= elapsed_ms + d + lead_ms + eps
        # never waits longer than needed: sending any earlier than due would break that bound
        # never waits longer than needed: due is the earliest time that keeps that bound
        assert abs((due - start) * 1000 - max(0.0, sent - lead_ms)) < 1e-3
        sent += d
        now = send_at
