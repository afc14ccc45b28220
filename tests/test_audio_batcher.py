"""AudioBatcher: consecutive frames joined into blocks, everything else passed on as before."""

from __future__ import annotations

import pytest

from gateway.ingress.audio_batcher import AudioBatcher
from gateway.ingress.events import Audio


def _frame(channel: int, ts: int | None, fill: int = 1, samples: int = 160) -> Audio:
    return Audio(channel, bytes([fill]) * samples, ts)


def test_consecutive_frames_of_a_channel_become_one_block() -> None:
    batcher = AudioBatcher(100, 8000, 1)  # 800 samples of 1-byte µ-law per block
    out = []
    for i in range(5):
        out += batcher.push(_frame(0, i * 160, fill=i))
        if i < 4:
            assert out == []
    assert out == [Audio(0, b"".join(bytes([i]) * 160 for i in range(5)), 0)]
    assert batcher.waiting == 0


def test_channels_are_batched_apart() -> None:
    batcher = AudioBatcher(40, 8000, 1)
    assert batcher.push(_frame(0, 0, 1)) == []
    assert batcher.push(_frame(1, 0, 2)) == []
    assert batcher.push(_frame(0, 160, 3)) == [Audio(0, b"\x01" * 160 + b"\x03" * 160, 0)]
    assert batcher.waiting == 160
    assert batcher.flush() == [Audio(1, b"\x02" * 160, 0)]


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (480, "a gap: the clock must fill it"),
        (0, "a repeat: the clock must drop it as late"),
        (100, "an overlap"),
        (None, "untimed after timed"),
    ],
)
def test_a_frame_that_does_not_follow_releases_the_block_first(
    second: int | None, why: str
) -> None:
    batcher = AudioBatcher(100, 8000, 1)
    assert batcher.push(_frame(0, 0, 1)) == []
    assert batcher.push(_frame(0, 160, 2)) == []
    released = batcher.push(_frame(0, second, 3))
    assert released == [Audio(0, b"\x01" * 160 + b"\x02" * 160, 0)], why
    assert batcher.flush() == [Audio(0, b"\x03" * 160, second)], why


def test_untimed_frames_run_on_and_widths_count_samples() -> None:
    batcher = AudioBatcher(20, 16000, 2)  # 320 samples of L16 = 640 bytes
    assert batcher.push(Audio(0, b"\x00" * 320)) == []
    assert batcher.push(Audio(0, b"\x01" * 320)) == [Audio(0, b"\x00" * 320 + b"\x01" * 320)]


def test_timestamps_advance_by_samples_not_bytes() -> None:
    batcher = AudioBatcher(100, 8000, 2)  # L16: 160 samples are 320 bytes
    assert batcher.push(Audio(0, b"\x00" * 320, 0)) == []
    assert batcher.push(Audio(0, b"\x00" * 320, 160)) == []  # follows: joined
    assert batcher.flush() == [Audio(0, b"\x00" * 640, 0)]


def test_zero_passes_every_frame_through() -> None:
    batcher = AudioBatcher(0, 8000, 1)
    frame = _frame(0, 0)
    assert batcher.push(frame) == [frame]
    assert batcher.flush() == []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        AudioBatcher(-1, 8000, 1)
    with pytest.raises(ValueError):
        AudioBatcher(100, 0, 1)
