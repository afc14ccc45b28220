"""Streaming resampling: chunking-independent, right length, right pitch."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import soxr

from gateway.media.resample import Resampler


def tone(freq: float, rate: int, seconds: float = 1.0) -> npt.NDArray[np.float32]:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def stream(r: Resampler, x: npt.NDArray[np.float32], seed: int) -> npt.NDArray[np.float32]:
    """Feed ``x`` in random-size chunks (including empty ones), then flush."""
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    while pos < len(x):
        n = int(rng.integers(0, 400))
        out.append(r.process(x[pos : pos + n]))
        pos += n
    out.append(r.flush())
    return np.concatenate(out)


def peak_hz(y: npt.NDArray[np.float32], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.fft.rfftfreq(len(y), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (44100, 16000), (16000, 8000)])
def test_chunked_stream_equals_one_shot(in_rate: int, out_rate: int) -> None:
    x = np.random.default_rng(1).uniform(-0.5, 0.5, in_rate).astype(np.float32)
    one_shot = soxr.resample(x, in_rate, out_rate, quality="HQ")
    for seed in range(3):
        y = stream(Resampler(in_rate, out_rate), x, seed)
        assert y.dtype == np.float32
        assert len(y) == len(one_shot)
        np.testing.assert_allclose(y, one_shot, atol=1e-5)


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (48000, 16000), (11025, 16000)])
def test_output_length_follows_the_rate_ratio(in_rate: int, out_rate: int) -> None:
    x = tone(300, in_rate, seconds=0.5)
    y = stream(Resampler(in_rate, out_rate), x, seed=0)
    assert abs(len(y) - len(x) * out_rate / in_rate) <= 1


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 16000), (16000, 8000), (44100, 16000)])
def test_a_1khz_tone_stays_1khz(in_rate: int, out_rate: int) -> None:
    y = stream(Resampler(in_rate, out_rate), tone(1000, in_rate), seed=2)
    assert abs(peak_hz(y, out_rate) - 1000) <= 2
    # Same level after conversion (away from the filter's edges).
    middle = y[len(y) // 4 : -len(y) // 4]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_equal_rates_pass_through_unchanged() -> None:
    r = Resampler(16000, 16000)
    x = tone(440, 16000, seconds=0.1)
    assert np.array_equal(r.process(x), x)
    assert r.flush().size == 0


def test_input_is_converted_to_float32() -> None:
    y = Resampler(8000, 16000).process(np.zeros(800, dtype=np.float64))
    assert y.dtype == np.float32


def test_process_after_flush_is_an_error() -> None:
    r = Resampler(8000, 16000)
    r.process(tone(440, 8000, seconds=0.1))
    assert r.flush().size > 0  # the filter's delayed tail
    assert r.flush().size == 0
    with pytest.raises(RuntimeError):
        r.process(np.zeros(10, dtype=np.float32))


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError):
        Resampler(0, 16000)
    with pytest.raises(ValueError):
        Resampler(8000, 16000).process(np.zeros((10, 2), dtype=np.float32))
