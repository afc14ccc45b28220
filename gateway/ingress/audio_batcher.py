"""AudioBatcher: consecutive media frames of a channel joined into blocks before the call.

Telephony platforms send 20 ms frames (Twilio: 50 messages per second per track). Everything
after the decoder (placement, the channel clock, the STT session's chunker) costs about the same
per call whether it gets 20 ms or 100 ms at a time, so an ingress shell joins each channel's
frames into ``batch_ms`` blocks first. A block no longer than the STT chunk adds no delay to
recognition: the chunk cannot leave before its last sample arrives anyway.

Only frames that follow each other exactly are joined: a frame whose timestamp is not where the
block ends (a gap, a reordered or repeated frame), or that has no timestamp when the block has
one, first releases the block, so the clock still sees every gap, duplicate and late frame as
it would have frame by frame. Sans-I/O: the shell pushes the decoder's Audio events and feeds
what comes back, and calls :meth:`flush` before any other event and when the stream ends.
"""

from __future__ import annotations

from gateway.ingress.events import Audio


class _Block:
    __slots__ = ("parts", "size", "timestamp", "next_timestamp")

    def __init__(self, audio: Audio, samples: int) -> None:
        self.parts = [audio.payload]
        self.size = len(audio.payload)
        self.timestamp = audio.timestamp
        self.next_timestamp = None if audio.timestamp is None else audio.timestamp + samples


class AudioBatcher:
    """Joins each channel's consecutive Audio events into blocks of at least ``batch_ms``.

    ``sample_rate`` and ``sample_width`` (bytes per sample) are the stream's codec; timestamps
    are in samples at that rate, as the decoders give them. ``batch_ms`` 0 passes every event
    straight through.
    """

    def __init__(self, batch_ms: int, sample_rate: int, sample_width: int) -> None:
        if batch_ms < 0 or sample_rate <= 0 or sample_width <= 0:
            raise ValueError("batch_ms must be >= 0, sample_rate and sample_width > 0")
        self._width = sample_width
        self._limit = sample_rate * batch_ms // 1000 * sample_width  # bytes per block
        self._blocks: dict[int, _Block] = {}

    @property
    def waiting(self) -> int:
        """Payload bytes held, all channels."""
        return sum(b.size for b in self._blocks.values())

    def push(self, audio: Audio) -> list[Audio]:
        """Take one frame; return the blocks it completes or cuts off (usually none)."""
        if not self._limit:
            return [audio]
        samples = len(audio.payload) // self._width
        block = self._blocks.get(audio.channel)
        if block is None:
            block = self._blocks[audio.channel] = _Block(audio, samples)
            out: list[Audio] = []
        elif audio.timestamp == block.next_timestamp:  # both None: untimed audio runs on
            block.parts.append(audio.payload)
            block.size += len(audio.payload)
            if block.next_timestamp is not None:
                block.next_timestamp += samples
            out = []
        else:  # not where the block ends: the block goes first, this frame starts the next
            out = [self._release(audio.channel, block)]
            block = self._blocks[audio.channel] = _Block(audio, samples)
        if block.size >= self._limit:
            out.append(self._release(audio.channel, block))
            del self._blocks[audio.channel]
        return out

    def flush(self) -> list[Audio]:
        """Every held block, in channel order; the batcher is then empty."""
        out = [self._release(ch, self._blocks[ch]) for ch in sorted(self._blocks)]
        self._blocks.clear()
        return out

    @staticmethod
    def _release(channel: int, block: _Block) -> Audio:
        payload = block.parts[0] if len(block.parts) == 1 else b"".join(block.parts)
        return Audio(channel, payload, block.timestamp)
