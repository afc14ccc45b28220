"""G.711 / L16 codecs, codec names, float conversion."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.media.codec import (
    Codec,
    UnsupportedCodec,
    decode,
    encode,
    float32_to_pcm16,
    parse_codec,
    pcm16_to_float32,
    silence,
)


def sine(n: int = 8000, freq: float = 440.0, amplitude: float = 0.5, rate: int = 8000) -> bytes:
    t = np.arange(n) / rate
    return float32_to_pcm16(amplitude * np.sin(2 * np.pi * freq * t))


def snr_db(reference: bytes, decoded: bytes) -> float:
    ref = np.frombuffer(reference, "<i2").astype(np.float64)
    err = np.frombuffer(decoded, "<i2").astype(np.float64) - ref
    return float(10 * np.log10(np.sum(ref**2) / np.sum(err**2)))


@pytest.mark.parametrize(
    "name",
    ["pcmu", "PCMU", "mulaw", "ulaw", "mu-law", "g711u", "G711_ULAW", "audio/x-mulaw",
     "audio/pcmu", "pcm_mulaw", " Audio/X-MULAW "],
)  # fmt: skip
def test_mulaw_aliases(name: str) -> None:
    assert parse_codec(name) is Codec.PCMU


@pytest.mark.parametrize(
    "name",
    ["pcma", "alaw", "A-Law", "g711a", "g711_alaw", "audio/x-alaw", "audio/PCMA"],
)
def test_alaw_aliases(name: str) -> None:
    assert parse_codec(name) is Codec.PCMA


@pytest.mark.parametrize(
    "name",
    ["l16", "audio/L16", "LINEAR16", "pcm_s16le", "pcm16", "slin", "s16le"],
)
def test_l16_aliases(name: str) -> None:
    assert parse_codec(name) is Codec.L16


@pytest.mark.parametrize("name", ["opus", "g729", "", "pcm_s24le", "l8", "mulaw8"])
def test_unsupported_codec_names_the_codec_and_the_supported_ones(name: str) -> None:
    with pytest.raises(UnsupportedCodec) as info:
        parse_codec(name)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert repr(name) in message
    assert all(codec.value in message for codec in Codec)


def test_canonical_names_and_widths() -> None:
    assert [(c.value, c.sample_width) for c in Codec] == [("pcmu", 1), ("pcma", 1), ("l16", 2)]
    assert Codec("pcmu") is Codec.PCMU and f"{Codec.L16}" == "l16"


@pytest.mark.parametrize("codec", [Codec.PCMU, Codec.PCMA])
def test_g711_round_trip_is_close(codec: Codec) -> None:
    pcm = sine()
    coded = encode(codec, pcm)
    assert len(coded) == len(pcm) // 2
    decoded = decode(codec, coded)
    assert len(decoded) == len(pcm)
    assert snr_db(pcm, decoded) > 30  # G.711 is about 38 dB for a full-scale-ish tone
    # Companding: the error is relative to the sample, so quiet audio stays precise too.
    quiet = sine(amplitude=0.01)
    assert snr_db(quiet, decode(codec, encode(codec, quiet))) > 25


@pytest.mark.parametrize("codec", [Codec.PCMU, Codec.PCMA])
def test_g711_every_codeword_decodes_to_a_value_that_encodes_back(codec: Codec) -> None:
    levels = decode(codec, bytes(range(256)))
    assert decode(codec, encode(codec, levels)) == levels


def test_g711_decodes_known_codewords() -> None:
    # µ-law 0x00 is the most negative level, 0x80 the most positive; A-law 0xD5 is +8.
    assert np.frombuffer(decode(Codec.PCMU, b"\x00\x80"), "<i2").tolist() == [-32124, 32124]
    assert np.frombuffer(decode(Codec.PCMA, b"\xd5\x55"), "<i2").tolist() == [8, -8]


def test_silence_decodes_to_zero() -> None:
    assert silence(Codec.PCMU, 3) == b"\xff\xff\xff"
    assert silence(Codec.PCMA, 2) == b"\xd5\xd5"
    assert silence(Codec.L16, 2) == b"\x00" * 4
    assert decode(Codec.PCMU, silence(Codec.PCMU, 160)) == b"\x00" * 320
    assert decode(Codec.L16, silence(Codec.L16, 160)) == b"\x00" * 320
    # A-law has no zero codeword; its idle pattern is the smallest level.
    alaw = np.frombuffer(decode(Codec.PCMA, silence(Codec.PCMA, 160)), "<i2")
    assert np.abs(alaw).max() <= 8
    assert silence(Codec.PCMU, 0) == b""
    with pytest.raises(ValueError):
        silence(Codec.PCMU, -1)


def test_l16_passes_through_and_is_little_endian() -> None:
    pcm = b"\x01\x00\xff\x7f\x00\x80"
    assert decode(Codec.L16, pcm) == pcm and encode(Codec.L16, pcm) == pcm
    assert pcm16_to_float32(pcm).tolist() == [1 / 32768, 32767 / 32768, -1.0]


@pytest.mark.parametrize("codec", list(Codec))
def test_partial_samples_are_rejected(codec: Codec) -> None:
    with pytest.raises(ValueError, match="whole number"):
        encode(codec, b"\x00\x00\x00")
    if codec is Codec.L16:
        with pytest.raises(ValueError, match="whole number"):
            decode(codec, b"\x00\x00\x00")


def test_float_conversion_round_trips_every_pcm16_value() -> None:
    pcm = np.arange(-32768, 32768, dtype="<i2").tobytes()
    x = pcm16_to_float32(pcm)
    assert x.dtype == np.float32
    assert x.min() == -1.0 and x.max() < 1.0
    assert float32_to_pcm16(x) == pcm


def test_float_to_pcm16_clips() -> None:
    out = float32_to_pcm16(np.array([1.0, 1.5, -1.0, -3.0, 0.0], dtype=np.float32))
    assert np.frombuffer(out, "<i2").tolist() == [32767, 32767, -32768, -32768, 0]


def test_pcm16_to_float32_rejects_odd_length() -> None:
    with pytest.raises(ValueError):
        pcm16_to_float32(b"\x00")
