"""Streaming sample-rate conversion of mono float32 audio (e.g. 8 kHz calls to 16 kHz for STT)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

QUALITY = "HQ"  # libsoxr's 20-bit quality: transparent for speech at a fraction of VHQ's cost


class Resampler:
    """One continuous mono stream converted from ``in_rate`` to ``out_rate`` Hz.

    Stateful: chunks must be fed in order, and the output of all :meth:`process` calls plus
    :meth:`flush` equals a one-shot conversion of the whole stream. The filter delays output, so a
    chunk may yield fewer samples than ``len(x) * out_rate / in_rate`` until :meth:`flush`.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        """Raises ValueError for a rate that is not positive."""
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, not {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=QUALITY)
        )
        self._flushed = False

    def process(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Convert the next chunk of the stream (1-D, converted to float32) and return new output.

        With equal rates the input comes back unchanged (as float32, not copied when it already
        is). Raises RuntimeError after :meth:`flush` and ValueError for input that is not 1-D.
        """
        if self._flushed:
            raise RuntimeError("Resampler.process() after flush()")
        # soxr wants a contiguous float32 ndarray of exactly that type.
        chunk = np.ascontiguousarray(x, dtype=np.float32)
        if chunk.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {chunk.shape}")
        if self._stream is None:
            return chunk
        out: npt.NDArray[np.float32] = self._stream.resample_chunk(chunk)
        return out

    def flush(self) -> npt.NDArray[np.float32]:
        """End the stream and return the output still held in the filter.

        :meth:`process` must not be called afterwards; a second flush returns an empty array.
        """
        if self._flushed or self._stream is None:
            self._flushed = True
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        out: npt.NDArray[np.float32] = self._stream.resample_chunk(
            np.zeros(0, dtype=np.float32), last=True
        )
        return out
