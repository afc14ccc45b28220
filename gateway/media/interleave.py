"""Split interleaved multichannel audio into per-channel buffers and back.

Works on raw sample bytes of any fixed width (G.711 or L16 alike) without decoding them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Unsigned integer dtypes whose item size is the sample width: moving samples needs no decoding.
_DTYPES: dict[int, type[np.unsignedinteger[Any]]] = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _check_width(sample_width: int) -> None:
    if sample_width < 1:
        raise ValueError(f"sample width must be at least 1 byte, not {sample_width}")


def deinterleave(data: bytes, channels: int, sample_width: int) -> list[bytes]:
    """Split frames of ``channels`` interleaved samples into one bytes object per channel.

    Raises ValueError if ``channels`` < 1 or ``data`` is not a whole number of frames
    (``channels * sample_width`` bytes each).
    """
    if channels < 1:
        raise ValueError(f"channel count must be at least 1, not {channels}")
    _check_width(sample_width)
    frame = channels * sample_width
    if len(data) % frame:
        raise ValueError(
            f"{len(data)} bytes is not a whole number of {channels}-channel frames "
            f"({frame} bytes each)"
        )
    if channels == 1:
        return [bytes(data)]
    dtype = _DTYPES.get(sample_width)
    if dtype is not None:
        # One transposing copy to planar order, then a slice per channel: about half the cost of
        # a strided copy per channel for the 20 ms frames of live streams (hundreds of bytes).
        planar = np.frombuffer(data, dtype=dtype).reshape(-1, channels).T.tobytes()
        size = len(planar) // channels
        if channels == 2:
            return [planar[:size], planar[size:]]
        return [planar[c * size : (c + 1) * size] for c in range(channels)]
    # One row per frame, one column per byte: channel c is a column slice, copied out by tobytes.
    grid = np.frombuffer(data, dtype=np.uint8).reshape(-1, frame)
    return [grid[:, c * sample_width : (c + 1) * sample_width].tobytes() for c in range(channels)]


def interleave(channels: Sequence[bytes], sample_width: int) -> bytes:
    """Join per-channel sample bytes into interleaved frames (channel 0 first in each frame).

    Raises ValueError if there are no channels, the channels differ in length, or a channel is
    not a whole number of samples.
    """
    _check_width(sample_width)
    if not channels:
        raise ValueError("no channels to interleave")
    length = len(channels[0])
    if any(len(ch) != length for ch in channels):
        lengths = ", ".join(str(len(ch)) for ch in channels)
        raise ValueError(f"channels differ in length ({lengths} bytes)")
    if length % sample_width:
        raise ValueError(
            f"channel of {length} bytes is not a whole number of {sample_width}-byte samples"
        )
    if len(channels) == 1:
        return bytes(channels[0])
    columns = [np.frombuffer(ch, dtype=np.uint8).reshape(-1, sample_width) for ch in channels]
    return np.concatenate(columns, axis=1).tobytes()
