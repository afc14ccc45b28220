"""Re-chunking and real-time pacing of streaming audio, sans I/O.

The v3 service closes a session (3007) when one binary message holds less than 50 or more than
1000 ms of audio, or when audio arrives faster than real time (reference §2.1). Call audio comes
in 20 ms frames at irregular times, so the client re-chunks it (:class:`AudioChunker`) and paces
the chunks (:class:`Pacer`). Neither class reads a clock: callers pass times in.
"""

from __future__ import annotations

import math


class AudioChunker:
    """Cuts a byte stream of mono audio into messages of exactly ``chunk_ms``.

    ``push`` returns every complete chunk (``chunk_samples`` whole samples each, i.e. exactly
    ``chunk_ms`` when ``sample_rate * chunk_ms`` is a multiple of 1000, else rounded up to the
    next sample) and keeps the rest. ``flush`` returns the rest, padded with silence at its end to
    at least ``min_ms``; it is always between ``min_ms`` and ``max_ms`` since the rest is shorter
    than a chunk. Output is the input, in order, plus padding only at the end of flushed chunks.

    ``silence_byte`` is the silence pattern: one byte, or one whole sample (e.g. ``b"\\xff"`` for
    µ-law, ``b"\\x00\\x00"`` for L16); it is repeated per sample. Bytes of an incomplete last
    sample are dropped by ``flush`` (counted in ``dropped_bytes``): they cannot be played.
    """

    def __init__(
        self,
        sample_rate: int,
        bytes_per_sample: int,
        chunk_ms: int = 100,
        min_ms: int = 50,
        max_ms: int = 1000,
        silence_byte: bytes = b"\x00",
    ) -> None:
        if sample_rate <= 0 or bytes_per_sample <= 0:
            raise ValueError(
                f"sample_rate and bytes_per_sample must be positive, got {sample_rate}, "
                f"{bytes_per_sample}"
            )
        if not 0 < min_ms <= chunk_ms <= max_ms:
            raise ValueError(
                f"chunk_ms must be between min_ms and max_ms (0 < {min_ms} <= {chunk_ms} <= "
                f"{max_ms} does not hold)"
            )
        if not silence_byte or bytes_per_sample % len(silence_byte):
            raise ValueError(
                f"silence_byte must be one byte or one {bytes_per_sample}-byte sample, "
                f"got {silence_byte!r}"
            )
        self.sample_rate = sample_rate
        self.bytes_per_sample = bytes_per_sample
        self.chunk_ms = chunk_ms
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.silence_sample = silence_byte * (bytes_per_sample // len(silence_byte))
        # Rounding up keeps a chunk >= its nominal duration, hence >= min_ms.
        self.chunk_samples = math.ceil(sample_rate * chunk_ms / 1000)
        if self.chunk_samples * 1000 > sample_rate * max_ms:
            raise ValueError(f"{chunk_ms} ms is not a whole number of samples within {max_ms} ms")
        self.chunk_bytes = self.chunk_samples * bytes_per_sample
        self.min_bytes = math.ceil(sample_rate * min_ms / 1000) * bytes_per_sample
        self._pending = bytearray()
        self.bytes_in = 0
        self.bytes_out = 0
        self.padding_bytes = 0
        self.dropped_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes pushed but not yet returned."""
        return len(self._pending)

    def ms_of(self, nbytes: int) -> float:
        """Duration of ``nbytes`` of this stream's audio, in ms."""
        return nbytes * 1000 / (self.sample_rate * self.bytes_per_sample)

    def push(self, data: bytes | bytearray) -> list[bytes]:
        """Add audio (any length, even split mid-sample) and return the chunks it completes."""
        self.bytes_in += len(data)
        self._pending += data
        size = self.chunk_bytes
        count = len(self._pending) // size
        if count == 0:
            return []
        view = bytes(self._pending[: count * size])
        del self._pending[: count * size]
        self.bytes_out += len(view)
        return [view[i * size : (i + 1) * size] for i in range(count)]

    def flush(self) -> bytes | None:
        """The pending rest as one last chunk padded to ``min_ms``, or None if nothing is
        pending. The chunker stays usable afterwards."""
        partial = len(self._pending) % self.bytes_per_sample
        if partial:
            del self._pending[-partial:]
            self.dropped_bytes += partial
        if not self._pending:
            return None
        tail = bytes(self._pending)
        self._pending.clear()
        missing = max(0, self.min_bytes - len(tail)) // self.bytes_per_sample
        padding = self.silence_sample * missing
        self.padding_bytes += len(padding)
        self.bytes_out += len(tail) + len(padding)
        return tail + padding


class Pacer:
    """Real-time pacing of one session's chunks, sans I/O.

    Rule: the chunk covering audio ``[t, t + d)`` (ms since the session's first sample) may be
    sent at ``start + (t - lead_ms) / 1000`` (never before ``start``). So when a chunk leaves,
    audio sent so far ``t + d <= elapsed + d + lead_ms``: it never runs ahead of wall time by more
    than one chunk (plus ``lead_ms``), which the service's rate check accepts, and a sender that
    keeps up never waits longer than that rule requires. Times are seconds on the caller's clock
    (the one ``now`` came from); durations are ms.

    Contract: call :meth:`due` once per chunk, in sending order, with the total audio sent once
    that chunk is sent (the pacer remembers the previous total as the chunk's start). Calling it
    again with the same total returns the same time.
    """

    def __init__(self, now: float, lead_ms: float = 0.0) -> None:
        if lead_ms < 0:
            raise ValueError(f"lead_ms must be >= 0, got {lead_ms}")
        self.lead_ms = lead_ms
        self.reset(now)

    def reset(self, now: float) -> None:
        """Start pacing a new session at ``now`` with no audio sent."""
        self.start = now
        self._before_ms = 0.0  # audio sent before the last chunk due() was asked about
        self._after_ms = 0.0  # ... and including it

    @property
    def sent_ms(self) -> float:
        """Total audio of the chunks :meth:`due` has been asked about."""
        return self._after_ms

    def due(self, audio_ms_total: float) -> float:
        """The earliest time at which the chunk ending at ``audio_ms_total`` may be sent.

        Raises ValueError if ``audio_ms_total`` is less than the previous call's.
        """
        if audio_ms_total < self._after_ms:
            raise ValueError(
                f"audio total went backwards: {audio_ms_total} ms after {self._after_ms} ms"
            )
        if audio_ms_total > self._after_ms:
            self._before_ms, self._after_ms = self._after_ms, audio_ms_total
        return self.earliest(self._before_ms)

    def earliest(self, chunk_start_ms: float) -> float:
        """When a chunk beginning ``chunk_start_ms`` into the session may be sent, by the rule
        above; unlike :meth:`due` it changes nothing (a sender asks before committing)."""
        return self.start + max(0.0, chunk_start_ms - self.lead_ms) / 1000
