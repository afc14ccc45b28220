"""ChannelClock: sample index == call time, whatever order and shape the frames arrive in."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.media.clock import ChannelClock, TimestampJump

MU_SILENCE = b"\xff"
L16_SILENCE = b"\x00\x00"
FRAME = 160  # 20 ms at 8 kHz


def tone(n: int, seed: int = 0, width: int = 1) -> bytes:
    """Recognizable non-silent content (no 0xFF byte, so it never looks like µ-law silence)."""
    rng = random.Random(seed)
    return bytes(rng.randrange(0, 255) for _ in range(n * width))


class Model:
    """Per-sample reference: a dict of placed samples and a release cursor, nothing clever."""

    def __init__(self, silence: bytes, window: int) -> None:
        self.silence = silence
        self.width = len(silence)
        self.window = window
        self.placed: dict[int, bytes] = {}
        self.released = 0
        self.frontier = 0
        self.next = 0
        self.out = bytearray()
        self.late_samples = 0
        self.late_frames = 0
        self.filled = 0

    def _release(self, cut: int) -> None:
        while self.released < min(cut, self.frontier):
            sample = self.placed.pop(self.released, None)
            if sample is None:
                self.filled += 1
                sample = self.silence
            self.out += sample
            self.released += 1

    def push(self, start: int | None, payload: bytes) -> None:
        if start is None:
            start = self.next
        n = len(payload) // self.width
        if n == 0:
            return
        self.next = start + n
        dropped = 0
        for i in range(n):
            t = start + i
            if t < self.released or t in self.placed:
                dropped += 1
            else:
                self.placed[t] = payload[i * self.width : (i + 1) * self.width]
        if dropped:
            self.late_samples += dropped
            self.late_frames += 1
        self.frontier = max(self.frontier, start + n)
        self._release(self.frontier - self.window)

    def fill_to(self, t: int) -> None:
        self.frontier = max(self.frontier, t)
        self.next = max(self.next, t)
        self._release(max(t, self.frontier - self.window))

    def flush(self) -> None:
        self._release(self.frontier)


@dataclass(frozen=True)
class Push:
    start: int | None
    length: int
    seed: int


@dataclass(frozen=True)
class FillTo:
    t: int


ops = st.lists(
    st.one_of(
        st.builds(
            Push,
            start=st.one_of(st.none(), st.integers(-10, 120)),
            length=st.integers(0, 30),
            seed=st.integers(0, 1000),
        ),
        st.builds(FillTo, t=st.integers(-5, 150)),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, window=st.integers(0, 40), width=st.sampled_from([1, 2]))
def test_clock_matches_per_sample_model(ops: list[Push | FillTo], window: int, width: int) -> None:
    silence = MU_SILENCE if width == 1 else L16_SILENCE
    clock = ChannelClock(silence, reorder_window=window)
    model = Model(silence, window)
    out = bytearray()
    for op in ops:
        if isinstance(op, Push):
            payload = tone(op.length, op.seed, width)
            out += clock.push(op.start, payload)
            model.push(op.start, payload)
        else:
            out += clock.fill_to(op.t)
            model.fill_to(op.t)
        # Output length is exactly the call time covered, at every step.
        assert len(out) == clock.released * width
        assert clock.frontier == model.frontier
        assert clock.released >= clock.frontier - window
    out += clock.flush()
    model.flush()
    assert bytes(out) == bytes(model.out)
    assert clock.released == clock.frontier == len(out) // width
    assert clock.late_samples == model.late_samples
    assert clock.late_frames == model.late_frames
    assert clock.filled_samples == model.filled


# Non-overlapping frames: (gap before it, length) pairs laid end to end.
layouts = st.lists(st.tuples(st.integers(0, 25), st.integers(1, 40)), min_size=1, max_size=20)


def lay_out(layout: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    frames, t = [], 0
    for k, (gap, length) in enumerate(layout):
        t += gap
        frames.append((t, tone(length, seed=k)))
        t += length
    return frames


def expected(frames: list[tuple[int, bytes]]) -> bytes:
    end = max(start + len(p) for start, p in frames)
    line = bytearray(MU_SILENCE * end)
    for start, payload in frames:
        line[start : start + len(payload)] = payload
    return bytes(line)


@settings(max_examples=200, deadline=None)
@given(layout=layouts)
def test_in_order_frames_land_at_their_index(layout: list[tuple[int, int]]) -> None:
    frames = lay_out(layout)
    clock = ChannelClock(MU_SILENCE)
    out = b"".join(clock.push(start, payload) for start, payload in frames) + clock.flush()
    assert out == expected(frames)
    assert clock.late_samples == 0
    assert clock.filled_samples == sum(gap for gap, _ in layout)


@settings(max_examples=200, deadline=None)
@given(layout=layouts, order=st.randoms(use_true_random=False))
def test_frames_reordered_within_the_window_land_in_place(
    layout: list[tuple[int, int]], order: random.Random
) -> None:
    frames = lay_out(layout)
    order.shuffle(frames)
    # The smallest window that covers this arrival order: how far behind the frontier any
    # frame arrived.
    window, frontier = 0, 0
    for start, payload in frames:
        window = max(window, frontier - start)
        frontier = max(frontier, start + len(payload))
    clock = ChannelClock(MU_SILENCE, reorder_window=window)
    out = b"".join(clock.push(start, payload) for start, payload in frames) + clock.flush()
    assert out == expected(sorted(frames))
    assert (clock.late_samples, clock.late_frames) == (0, 0)


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(st.tuples(st.integers(-20, 200), st.integers(1, 50)), max_size=30),
    window=st.integers(0, 100),
)
def test_released_audio_always_equals_time_covered(
    frames: list[tuple[int, int]], window: int
) -> None:
    """Duplicates, overlaps, any order: the output is exactly as long as the call time covered."""
    clock = ChannelClock(L16_SILENCE, reorder_window=window)
    out = b"".join(clock.push(start, b"\x01\x02" * length) for start, length in frames)
    out += clock.flush()
    covered = max([0] + [start + length for start, length in frames])
    assert clock.frontier == covered
    assert len(out) == 2 * covered == 2 * clock.released


def test_gap_is_filled_with_silence_and_channels_stay_aligned() -> None:
    frames = [tone(FRAME, seed=k) for k in range(5)]
    full, gappy = ChannelClock(MU_SILENCE), ChannelClock(MU_SILENCE)
    a = b"".join(full.push(k * FRAME, f) for k, f in enumerate(frames))
    b = b"".join(gappy.push(k * FRAME, f) for k, f in enumerate(frames) if k != 2)
    assert len(a) == len(b) == 5 * FRAME
    assert b[2 * FRAME : 3 * FRAME] == MU_SILENCE * FRAME
    assert b[: 2 * FRAME] == a[: 2 * FRAME] and b[3 * FRAME :] == a[3 * FRAME :]
    assert gappy.filled_samples == FRAME and full.filled_samples == 0


def test_l16_gap_is_filled_with_zero_samples() -> None:
    clock = ChannelClock(L16_SILENCE)
    out = clock.push(2, b"\x10\x00")
    assert out == b"\x00\x00\x00\x00\x10\x00"
    assert clock.filled_samples == 2


def test_late_duplicate_is_dropped_and_counted() -> None:
    clock = ChannelClock(MU_SILENCE)
    first, second = tone(FRAME, 1), tone(FRAME, 2)
    assert clock.push(0, first) == first
    assert clock.push(FRAME, second) == second
    assert clock.push(0, tone(FRAME, 3)) == b""  # a retransmission of frame 0
    assert (clock.late_samples, clock.late_frames) == (FRAME, 1)
    assert clock.released == clock.frontier == 2 * FRAME


def test_overlapping_frame_keeps_only_its_new_part() -> None:
    clock = ChannelClock(MU_SILENCE)
    clock.push(0, b"\x01" * 10)
    assert clock.push(6, b"\x02" * 10) == b"\x02" * 6
    assert (clock.late_samples, clock.late_frames, clock.released) == (4, 1, 16)


def test_pending_duplicate_first_placed_wins() -> None:
    clock = ChannelClock(MU_SILENCE, reorder_window=100)
    assert clock.push(0, b"\x01" * 10) == b""
    assert clock.push(5, b"\x02" * 10) == b""
    assert clock.flush() == b"\x01" * 10 + b"\x02" * 5
    assert (clock.late_samples, clock.late_frames) == (5, 1)


def test_frame_before_call_start_is_cut_at_zero() -> None:
    clock = ChannelClock(MU_SILENCE)
    assert clock.push(-3, b"\x01\x02\x03\x04\x05") == b"\x04\x05"
    assert (clock.late_samples, clock.released) == (3, 2)


def test_out_of_order_frame_within_window_lands_in_place() -> None:
    f0, f1, f2 = (tone(FRAME, k) for k in range(3))
    clock = ChannelClock(MU_SILENCE, reorder_window=2 * FRAME)
    out = clock.push(0, f0) + clock.push(2 * FRAME, f2) + clock.push(FRAME, f1) + clock.flush()
    assert out == f0 + f1 + f2
    assert (clock.late_samples, clock.filled_samples) == (0, 0)


def test_window_holds_back_only_the_last_window_of_audio() -> None:
    clock = ChannelClock(MU_SILENCE, reorder_window=FRAME)
    assert clock.push(0, tone(FRAME)) == b""
    assert len(clock.push(FRAME, tone(FRAME))) == FRAME
    assert (clock.released, clock.frontier, clock.pending) == (FRAME, 2 * FRAME, FRAME)


def test_out_of_order_frame_without_window_is_late_and_its_place_silent() -> None:
    f0, f1, f2 = (tone(FRAME, k) for k in range(3))
    clock = ChannelClock(MU_SILENCE)
    out = clock.push(0, f0) + clock.push(2 * FRAME, f2) + clock.push(FRAME, f1)
    assert out == f0 + MU_SILENCE * FRAME + f2
    assert (clock.late_samples, clock.late_frames, clock.filled_samples) == (FRAME, 1, FRAME)


def test_timestamp_jump_raises_and_leaves_clock_usable() -> None:
    clock = ChannelClock(MU_SILENCE, reorder_window=FRAME, max_jump=8000)
    clock.push(0, tone(FRAME))
    before = (clock.released, clock.frontier, clock.pending, clock.late_samples)
    with pytest.raises(TimestampJump) as info:
        clock.push(10**9, tone(FRAME))
    assert isinstance(info.value, ValueError)
    assert (clock.released, clock.frontier, clock.pending, clock.late_samples) == before
    # A jump of exactly max_jump is accepted; the clock carries on normally.
    out = clock.push(FRAME + 8000, tone(FRAME, 1)) + clock.flush()
    assert len(out) == 2 * FRAME + 8000 and clock.frontier == 2 * FRAME + 8000


def test_fill_to_releases_silence_up_to_t_and_moves_append_point() -> None:
    clock = ChannelClock(MU_SILENCE, reorder_window=FRAME)
    f0 = tone(FRAME)
    assert clock.push(0, f0) == b""
    out = clock.fill_to(5 * FRAME)
    assert out == f0 + MU_SILENCE * 4 * FRAME
    assert (clock.released, clock.frontier, clock.filled_samples) == (
        5 * FRAME,
        5 * FRAME,
        4 * FRAME,
    )
    f1 = tone(FRAME, 1)
    clock.push(None, f1)  # after a declared gap, appended audio follows the gap
    assert clock.flush() == f1
    assert clock.fill_to(FRAME) == b""  # declaring the past again changes nothing
    assert clock.released == 6 * FRAME


def test_fill_to_keeps_audio_beyond_t_pending() -> None:
    clock = ChannelClock(MU_SILENCE, reorder_window=10 * FRAME)
    f = tone(FRAME)
    clock.push(2 * FRAME, f)
    assert clock.fill_to(FRAME) == MU_SILENCE * FRAME
    assert clock.flush() == MU_SILENCE * FRAME + f


def test_start_none_appends_after_latest_frame() -> None:
    clock = ChannelClock(MU_SILENCE, reorder_window=4 * FRAME)
    a, b, c, d = (tone(FRAME, k) for k in range(4))
    out = clock.push(None, a) + clock.push(None, b)
    out += clock.push(3 * FRAME, c) + clock.push(None, d) + clock.flush()
    assert out == a + b + MU_SILENCE * FRAME + c + d


def test_partial_sample_payload_is_rejected_without_side_effects() -> None:
    clock = ChannelClock(L16_SILENCE)
    with pytest.raises(ValueError, match="whole number"):
        clock.push(0, b"\x00\x01\x02")
    assert (clock.released, clock.frontier) == (0, 0)
    assert clock.push(None, b"\x01\x00") == b"\x01\x00"


def test_empty_payload_changes_nothing() -> None:
    clock = ChannelClock(MU_SILENCE)
    assert clock.push(500, b"") == b""
    assert (clock.released, clock.frontier, clock.filled_samples) == (0, 0, 0)


def test_long_in_order_stream_keeps_no_backlog() -> None:
    clock = ChannelClock(MU_SILENCE, reorder_window=3 * FRAME)
    total = 0
    for k in range(3000):  # a minute of 20 ms frames
        total += len(clock.push(k * FRAME, MU_SILENCE * FRAME))
        assert clock.pending <= 3 * FRAME
    assert total == clock.released == 3000 * FRAME - 3 * FRAME


def test_invalid_construction() -> None:
    with pytest.raises(ValueError):
        ChannelClock(b"")
    with pytest.raises(ValueError):
        ChannelClock(MU_SILENCE, reorder_window=-1)
    with pytest.raises(ValueError):
        ChannelClock(MU_SILENCE, max_jump=-1)
