"""Interleaved multichannel frames to per-channel buffers and back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.media.interleave import deinterleave, interleave


def test_stereo_l16_layout() -> None:
    # Frames: (L0, R0), (L1, R1), 2 bytes each.
    data = b"L0R0L1R1"
    assert deinterleave(data, 2, 2) == [b"L0L1", b"R0R1"]
    assert interleave([b"L0L1", b"R0R1"], 2) == data


def test_three_channel_g711_layout() -> None:
    assert deinterleave(b"abcABC", 3, 1) == [b"aA", b"bB", b"cC"]


def test_mono_is_unchanged() -> None:
    assert deinterleave(b"\x01\x02\x03\x04", 1, 2) == [b"\x01\x02\x03\x04"]
    assert interleave([b"\x01\x02"], 2) == b"\x01\x02"


def test_empty_input_gives_empty_channels() -> None:
    assert deinterleave(b"", 2, 2) == [b"", b""]
    assert interleave([b"", b""], 2) == b""


@settings(max_examples=200, deadline=None)
@given(
    channels=st.integers(1, 8),
    width=st.sampled_from([1, 2]),
    frames=st.integers(0, 50),
    data=st.data(),
)
def test_round_trip(channels: int, width: int, frames: int, data: st.DataObject) -> None:
    size = channels * width * frames
    raw = data.draw(st.binary(min_size=size, max_size=size))
    parts = deinterleave(raw, channels, width)
    assert len(parts) == channels
    assert all(len(p) == frames * width for p in parts)
    assert interleave(parts, width) == raw


def test_partial_frame_is_rejected() -> None:
    with pytest.raises(ValueError, match="whole number"):
        deinterleave(b"\x00" * 6, 2, 2)


def test_unequal_channels_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        interleave([b"\x00\x00", b"\x00\x00\x00\x00"], 2)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        deinterleave(b"", 0, 2)
    with pytest.raises(ValueError):
        deinterleave(b"", 2, 0)
    with pytest.raises(ValueError):
        interleave([], 2)
    with pytest.raises(ValueError, match="whole number"):
        interleave([b"\x00", b"\x00"], 2)
