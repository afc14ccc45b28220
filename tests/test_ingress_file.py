"""Recorded calls: the sans-I/O WavDecoder (any chunking) and probe_wav on bad files."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from gateway.ingress.events import Audio, CallEnded, CallStarted, IngressEvent
from gateway.ingress.file import FileSourceError, WavDecoder, probe_wav
from gateway.media.codec import Codec, encode
from gateway.media.interleave import interleave
from gateway.media.wav import wav_header

RATE = 8000


def pcm_samples(frames: int, channels: int, seed: int = 0) -> npt.NDArray[np.int16]:
    """Distinct noise per channel, shape (frames, channels)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32767, size=(frames, channels), endpoint=True).astype(np.int16)


def pcm_wav(samples: npt.NDArray[np.int16], rate: int = RATE) -> bytes:
    audio = samples.astype("<i2").tobytes()
    return wav_header(Codec.L16, samples.shape[1], rate, len(audio)) + audio


def streaming_header(codec: Codec, channels: int, rate: int) -> bytes:
    """A header whose data size is 0xFFFFFFFF: a streaming writer's "until end of file"."""
    head = bytearray(wav_header(codec, channels, rate, 0))
    struct.pack_into("<I", head, len(head) - 4, 0xFFFFFFFF)
    return bytes(head)


def random_chunks(data: bytes, seed: int) -> Iterator[bytes]:
    """``data`` cut at random: sizes log-uniform from 1 byte up to the whole file."""
    rng = np.random.default_rng(seed)
    pos = 0
    while pos < len(data):
        size = int(np.exp(rng.uniform(0, np.log(len(data) + 1))))
        size = max(1, min(size, len(data) - pos))
        yield data[pos : pos + size]
        pos += size


def decode(
    data: bytes | Sequence[bytes], decoder: WavDecoder | None = None
) -> tuple[list[IngressEvent], list[IngressEvent]]:
    """Feed all chunks, then eof(): (events from feed, events from eof)."""
    decoder = decoder or WavDecoder()
    chunks = [data] if isinstance(data, bytes) else data
    fed: list[IngressEvent] = []
    for chunk in chunks:
        fed.extend(decoder.feed(chunk))
    return fed, decoder.eof()


def check_stream(
    events: list[IngressEvent], channels: list[bytes], sample_width: int
) -> CallStarted:
    """One CallStarted first, CallEnded last, and per-channel audio exactly ``channels``."""
    started = events[0]
    assert isinstance(started, CallStarted)
    assert sum(isinstance(e, CallStarted) for e in events) == 1
    assert isinstance(events[-1], CallEnded)
    assert sum(isinstance(e, CallEnded) for e in events) == 1
    audio = [e for e in events[1:-1] if isinstance(e, Audio)]
    assert len(audio) == len(events) - 2, "only Audio between start and end"
    assert len(started.channels) == len(channels)
    for index, expected in enumerate(channels):
        mine = [e for e in audio if e.channel == index]
        assert b"".join(e.payload for e in mine) == expected
        position = 0
        for event in mine:
            assert event.payload, "no empty Audio events"
            assert event.timestamp == position, "timestamp = frame index of the first frame"
            position += len(event.payload) // sample_width
    assert {e.channel for e in audio} == set(range(len(channels)))
    return started


def channel_bytes(samples: npt.NDArray[np.int16]) -> list[bytes]:
    return [samples[:, c].astype("<i2").tobytes() for c in range(samples.shape[1])]


# --- valid files -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_two_channel_pcm_in_random_chunks(seed: int) -> None:
    samples = pcm_samples(5003, 2, seed)
    data = pcm_wav(samples)
    decoder = WavDecoder()
    fed, ended = decode(list(random_chunks(data, seed)), decoder)
    assert not any(isinstance(e, CallEnded) for e in fed), "the call ends only at eof()"
    assert ended and isinstance(ended[-1], CallEnded)
    started = check_stream(fed + ended, channel_bytes(samples), 2)
    assert [(c.index, c.role) for c in started.channels] == [(0, "customer"), (1, "agent")]
    assert all(c.codec is Codec.L16 and c.sample_rate == RATE for c in started.channels)
    assert decoder.frames == 5003


@pytest.mark.parametrize("size", [1, 3, 4, 44, 45, 6400, 6401, None])
def test_two_channel_pcm_in_fixed_chunks(size: int | None) -> None:
    samples = pcm_samples(3333, 2, seed=11)
    data = pcm_wav(samples, rate=16000)
    step = size or len(data)
    fed, ended = decode([data[i : i + step] for i in range(0, len(data), step)])
    started = check_stream(fed + ended, channel_bytes(samples), 2)
    assert all(c.sample_rate == 16000 for c in started.channels)


def test_ulaw_keeps_its_codec() -> None:
    pcm = pcm_samples(2001, 2, seed=5)
    ulaw = [encode(Codec.PCMU, ch) for ch in channel_bytes(pcm)]
    audio = interleave(ulaw, 1)
    data = wav_header(Codec.PCMU, 2, RATE, len(audio)) + audio + b"\x00" * (len(audio) & 1)
    fed, ended = decode(list(random_chunks(data, 5)))
    started = check_stream(fed + ended, ulaw, 1)
    assert all(c.codec is Codec.PCMU and c.sample_rate == RATE for c in started.channels)
    audio_events = [e for e in fed + ended if isinstance(e, Audio)]
    assert sum(len(e.payload) for e in audio_events) == 2 * 2001, "1 byte per sample"


def test_alaw_keeps_its_codec() -> None:
    alaw = encode(Codec.PCMA, pcm_samples(1600, 1, seed=6).astype("<i2").tobytes())
    data = wav_header(Codec.PCMA, 1, RATE, len(alaw)) + alaw
    fed, ended = decode(data)
    started = check_stream(fed + ended, [alaw], 1)
    assert started.channels[0].codec is Codec.PCMA


def test_trailing_partial_frame_is_dropped() -> None:
    samples = pcm_samples(1000, 2, seed=3)
    audio = samples.astype("<i2").tobytes() + b"\x01\x02\x03"  # 3 of a 4-byte frame
    data = wav_header(Codec.L16, 2, RATE, len(audio)) + audio + b"\x00"  # pad byte
    decoder = WavDecoder()
    fed, ended = decode(list(random_chunks(data, 3)), decoder)
    check_stream(fed + ended, channel_bytes(samples), 2)
    assert decoder.frames == 1000


def test_trailing_partial_frame_of_a_streaming_file_is_dropped() -> None:
    samples = pcm_samples(700, 2, seed=4)
    data = streaming_header(Codec.L16, 2, RATE) + samples.astype("<i2").tobytes() + b"\x09"
    fed, ended = decode(data)
    check_stream(fed + ended, channel_bytes(samples), 2)


def test_custom_roles_and_default_for_unnamed_channels() -> None:
    samples = pcm_samples(400, 3, seed=8)
    fed, ended = decode(pcm_wav(samples), WavDecoder(roles=("caller", "agent")))
    started = check_stream(fed + ended, channel_bytes(samples), 2)
    assert [c.role for c in started.channels] == ["caller", "agent", "channel2"]
    assert [c.index for c in started.channels] == [0, 1, 2]


def test_data_size_smaller_than_the_file_stops_at_data_size() -> None:
    samples = pcm_samples(1200, 2, seed=9)
    junk = (
        b"LIST" + struct.pack("<I", 26) + b"INFOISFT" + struct.pack("<I", 14) + b"Lavf58.76.100\x00"
    )
    data = pcm_wav(samples) + junk
    for seed in range(3):
        fed, ended = decode(list(random_chunks(data, seed)))
        check_stream(fed + ended, channel_bytes(samples), 2)


def test_streaming_data_size_reads_until_eof() -> None:
    samples = pcm_samples(4321, 2, seed=10)
    data = streaming_header(Codec.L16, 2, RATE) + samples.astype("<i2").tobytes()
    decoder = WavDecoder()
    fed, ended = decode(list(random_chunks(data, 10)), decoder)
    check_stream(fed + ended, channel_bytes(samples), 2)
    assert decoder.format is not None and decoder.format.data_size is None
    assert decoder.frames == 4321


def test_feed_after_eof_is_refused() -> None:
    decoder = WavDecoder()
    decode(pcm_wav(pcm_samples(10, 2)), decoder)
    with pytest.raises(RuntimeError):
        decoder.feed(b"\x00\x00\x00\x00")


# --- bad input: decoder and probe agree ------------------------------------------------------

BAD_FILES: dict[str, tuple[bytes, int, tuple[str, ...]]] = {
    # name: (file bytes, max_channels, words the message must hold)
    "empty": (b"", 8, ("empty",)),
    "text": (b"Customer called about the invoice.\n", 8, ("not a wav",)),
    "mp3": (b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64" + bytes(400), 8, ("not a wav",)),
    "too-many-channels": (pcm_wav(pcm_samples(10, 5)), 4, ("5 channels", "at most 4")),
    "nine-channels-default-limit": (pcm_wav(pcm_samples(10, 9)), 8, ("9 channels", "at most 8")),
    "zero-frames": (wav_header(Codec.L16, 2, RATE, 0), 8, ("no audio", "0 frames")),
    "declared-data-missing": (wav_header(Codec.L16, 2, RATE, 400), 8, ("no audio", "0 frames")),
    # An empty data chunk, then metadata: the LIST chunk is not audio.
    "empty-data-then-list": (
        wav_header(Codec.L16, 2, RATE, 0) + b"LIST" + struct.pack("<I", 12) + b"INFOISFTcg\0\0",
        8,
        ("no audio", "0 frames"),
    ),
    "streaming-less-than-a-frame": (
        streaming_header(Codec.L16, 2, RATE) + b"\x01",
        8,
        ("no audio", "0 frames"),
    ),
    "truncated-header": (wav_header(Codec.L16, 2, RATE, 400)[:30], 8, ("truncated",)),
}


def decoder_error(data: bytes, max_channels: int) -> str:
    decoder = WavDecoder(max_channels=max_channels)
    with pytest.raises(FileSourceError) as info:
        for chunk in random_chunks(data, 0) if data else []:
            decoder.feed(chunk)
        decoder.eof()
    return str(info.value)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_decoder_rejects_bad_input(name: str) -> None:
    data, max_channels, words = BAD_FILES[name]
    message = decoder_error(data, max_channels)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_probe_rejects_the_same_files(name: str, tmp_path: Path) -> None:
    data, max_channels, words = BAD_FILES[name]
    path = tmp_path / f"{name}.wav"
    path.write_bytes(data)
    with pytest.raises(FileSourceError) as info:
        probe_wav(path, max_channels=max_channels)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


def test_probe_reads_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    path.write_bytes(pcm_wav(pcm_samples(2500, 2)))
    fmt = probe_wav(path)
    assert (fmt.codec, fmt.channels, fmt.sample_rate, fmt.frames) == (Codec.L16, 2, RATE, 2500)


def test_probe_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileSourceError, match="no such file"):
        probe_wav(tmp_path / "absent.wav")
    with pytest.raises(FileSourceError, match="directory"):
        probe_wav(tmp_path)
