"""WAV header parsing (sans-I/O) and writing."""

from __future__ import annotations

import io
import struct
import wave

import pytest

from gateway.media.codec import Codec
from gateway.media.wav import WavError, WavFormat, WavNeedMoreData, parse_wav_header, wav_header

GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


def fmt_chunk(
    tag: int, channels: int = 1, rate: int = 8000, bits: int = 16, extra: bytes = b""
) -> bytes:
    block = channels * bits // 8
    body = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits) + extra
    return b"fmt " + struct.pack("<I", len(body)) + body


def chunk(chunk_id: bytes, body: bytes) -> bytes:
    return chunk_id + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) & 1)


def riff(*chunks: bytes, size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if size is None else size) + body


def extensible(sub_tag: int, bits: int = 16, channels: int = 2) -> bytes:
    ext = struct.pack("<HHI", 22, bits, 0x3) + struct.pack("<H", sub_tag) + GUID_TAIL
    return fmt_chunk(0xFFFE, channels=channels, bits=bits, extra=ext)


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize(
    ("channels", "rate", "frames"), [(1, 8000, 0), (2, 16000, 801), (8, 44100, 3)]
)
def test_parses_what_wav_header_writes(codec: Codec, channels: int, rate: int, frames: int) -> None:
    size = frames * channels * codec.sample_width
    head = wav_header(codec, channels, rate, size)
    # The whole file: a data size of 0 then needs to know what follows it (here: nothing).
    fmt = parse_wav_header(head + b"\x00" * size, at_eof=size == 0)
    assert fmt == WavFormat(codec, channels, rate, data_offset=len(head), data_size=size or None)
    assert fmt.frame_size == channels * codec.sample_width
    # The RIFF size counts everything after its own field, pad byte included.
    (riff_size,) = struct.unpack_from("<I", head, 4)
    assert riff_size == len(head) - 8 + size + (size & 1)


def test_g711_header_has_18_byte_fmt_and_fact_chunk() -> None:
    head = wav_header(Codec.PCMU, 2, 8000, 3200)
    assert head[16:20] == struct.pack("<I", 18)
    assert head[12 + 8 + 18 : 12 + 8 + 18 + 12] == b"fact" + struct.pack("<II", 4, 1600)
    assert len(wav_header(Codec.L16, 1, 8000, 0)) == 44  # the canonical PCM header


def test_stdlib_wave_reads_pcm_we_write() -> None:
    audio = bytes(range(256)) * 8  # 1024 stereo frames
    data = wav_header(Codec.L16, 2, 16000, len(audio)) + audio
    with wave.open(io.BytesIO(data), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 16000)
        assert w.getnframes() == 512
        assert w.readframes(512) == audio


def test_parses_stdlib_wave_output() -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x01\x00" * 200)
    fmt = parse_wav_header(buf.getvalue())
    assert fmt == WavFormat(Codec.L16, 2, 8000, data_offset=44, data_size=400)
    assert fmt.frames == 100


def test_chunks_before_data_are_skipped_with_pad_byte() -> None:
    head = riff(
        fmt_chunk(7, channels=2, bits=8),
        chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00Lavf\x00"),  # odd size: one pad byte
        chunk(b"JUNK", b"\x00" * 4000),
        chunk(b"data", b"\xff" * 10),
    )
    fmt = parse_wav_header(head)
    assert (fmt.codec, fmt.channels, fmt.data_size, fmt.frames) == (Codec.PCMU, 2, 10, 5)
    assert head[fmt.data_offset :] == b"\xff" * 10


def test_short_head_asks_for_enough_bytes() -> None:
    head = riff(fmt_chunk(1), chunk(b"LIST", b"x" * 5001), chunk(b"data", b"\x00\x00" * 100))
    offset = len(head) - 200
    have = 0
    requests = []
    while True:
        try:
            fmt = parse_wav_header(head[:have])
            break
        except WavNeedMoreData as more:
            assert not isinstance(more, WavError)
            assert more.needed > have
            requests.append(more.needed)
            have = more.needed
    assert fmt.data_offset == offset and fmt.data_size == 200
    # Reads only what the header needs: it never asks past the data chunk's header.
    assert max(requests) == offset


@pytest.mark.parametrize("n", [0, 3, 11, 20, 30, 40])
def test_any_prefix_of_a_header_needs_more_data(n: int) -> None:
    head = wav_header(Codec.L16, 1, 8000, 100)
    with pytest.raises(WavNeedMoreData) as info:
        parse_wav_header(head[:n])
    assert n < info.value.needed <= len(head)


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF])
def test_open_ended_data_size_is_none(size: int) -> None:
    head = riff(fmt_chunk(1, channels=2), b"data" + struct.pack("<I", size), size=0xFFFFFFFF)
    fmt = parse_wav_header(head + bytes(8))  # audio follows (a streaming writer, a crash)
    assert fmt.data_size is None and fmt.frames is None
    assert fmt.data_offset == len(head)


def test_empty_data_chunk_followed_by_another_chunk_is_empty() -> None:
    """Size 0 is also an empty data chunk: a LIST chunk right after it is not audio."""
    head = riff(
        fmt_chunk(1, channels=2), chunk(b"data", b""), chunk(b"LIST", b"INFOISFT" + bytes(8))
    )
    with pytest.raises(WavNeedMoreData) as info:
        parse_wav_header(head[:44])  # which one it is needs the next chunk's header
    assert info.value.needed == 52
    assert parse_wav_header(head).data_size == 0
    # The whole file with fewer than 8 bytes after a size 0: open-ended (audio or nothing).
    assert parse_wav_header(head[:46], at_eof=True).data_size is None


def test_extensible_format_uses_the_subformat_tag() -> None:
    fmt = parse_wav_header(riff(extensible(1), chunk(b"data", b"")), at_eof=True)
    assert (fmt.codec, fmt.channels) == (Codec.L16, 2)
    fmt = parse_wav_header(
        riff(extensible(6, bits=8, channels=1), chunk(b"data", b"")), at_eof=True
    )
    assert fmt.codec is Codec.PCMA


def error(head: bytes, *, at_eof: bool = False) -> str:
    with pytest.raises(WavError) as info:
        parse_wav_header(head, at_eof=at_eof)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_not_a_wav() -> None:
    assert error(b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 50) == (
        "not a WAV file (no RIFF/WAVE header)"
    )
    assert error(b"RIFF\x00\x00\x00\x00AVI LIST") == "not a WAV file (no RIFF/WAVE header)"
    assert error(b"", at_eof=True) == "not a WAV file (no RIFF/WAVE header)"


def test_float_is_named() -> None:
    message = error(riff(fmt_chunk(3, bits=32), chunk(b"data", b"")))
    assert message == (
        "unsupported WAV codec: format 0x0003 (IEEE float); "
        "supported: 16-bit PCM, G.711 µ-law, G.711 A-law"
    )


@pytest.mark.parametrize(
    ("tag", "name"),
    [(2, "MS ADPCM"), (0x11, "IMA ADPCM"), (0x31, "GSM 6.10"), (0x55, "MPEG Layer 3")],
)
def test_compressed_codecs_are_named(tag: int, name: str) -> None:
    message = error(riff(fmt_chunk(tag, bits=4), chunk(b"data", b"")))
    assert message.startswith(f"unsupported WAV codec: format 0x{tag:04X} ({name}); supported:")


def test_unknown_tag_and_extensible_float() -> None:
    assert "format 0x1234;" in error(riff(fmt_chunk(0x1234), chunk(b"data", b"")))
    assert "0x0003 (IEEE float)" in error(riff(extensible(3, bits=32), chunk(b"data", b"")))


@pytest.mark.parametrize(
    ("tag", "bits", "kind"), [(1, 24, "24-bit PCM"), (1, 8, "8-bit PCM"), (7, 16, "16-bit µ-law")]
)
def test_unsupported_sample_width(tag: int, bits: int, kind: str) -> None:
    assert error(riff(fmt_chunk(tag, bits=bits), chunk(b"data", b""))) == (
        f"unsupported WAV sample width: {kind} (supported: 16-bit PCM, G.711 µ-law, G.711 A-law)"
    )


def test_extensible_24_bit_pcm_is_rejected() -> None:
    assert "24-bit PCM" in error(riff(extensible(1, bits=24), chunk(b"data", b"")))


def test_zero_channels() -> None:
    assert error(riff(fmt_chunk(1, channels=0), chunk(b"data", b""))) == "WAV declares 0 channels"


def test_truncated_header_at_eof() -> None:
    head = wav_header(Codec.L16, 1, 8000, 100)
    for n in (6, 20, 30, 40):
        assert error(head[:n], at_eof=True) == "WAV header is truncated"
    # Whole chunks but no data chunk, and a file with no fmt chunk at all.
    assert error(riff(fmt_chunk(1), chunk(b"LIST", b"abcd")), at_eof=True) == (
        "WAV has no data chunk"
    )
    assert error(riff(chunk(b"LIST", b"abcd")), at_eof=True) == "WAV has no fmt chunk"
    with pytest.raises(WavNeedMoreData):  # without at_eof, the rest may still come
        parse_wav_header(riff(fmt_chunk(1)))


def test_data_before_fmt() -> None:
    assert "no fmt chunk" in error(riff(chunk(b"data", b"\x00\x00"), fmt_chunk(1)))


def test_channel_count_is_not_limited() -> None:
    fmt = parse_wav_header(wav_header(Codec.PCMA, 64, 8000, 640))
    assert fmt.channels == 64 and fmt.frames == 10


def test_writer_rejects_impossible_headers() -> None:
    with pytest.raises(ValueError):
        wav_header(Codec.L16, 0, 8000, 0)
    with pytest.raises(ValueError):
        wav_header(Codec.L16, 1, 0, 0)
    with pytest.raises(ValueError):
        wav_header(Codec.L16, 1, 8000, -2)
    with pytest.raises(ValueError):
        wav_header(Codec.L16, 1, 8000, 0xFFFFFFFF)
