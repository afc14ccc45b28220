"""Sans-I/O WAV (RIFF/WAVE) header parsing and writing, for 16-bit PCM and G.711 files.

:func:`parse_wav_header` is fed the beginning of a file and either returns the format and where
the audio starts, asks for more bytes (:class:`WavNeedMoreData`), or rejects the file with a
:class:`WavError` whose message is one line a user can act on. :func:`wav_header` writes a header
that this parser and the stdlib ``wave`` module (PCM) read back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.media.codec import Codec

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_ALAW = 0x0006
WAVE_FORMAT_MULAW = 0x0007
WAVE_FORMAT_EXTENSIBLE = 0xFFFE

_TAG_CODEC = {
    WAVE_FORMAT_PCM: Codec.L16,
    WAVE_FORMAT_ALAW: Codec.PCMA,
    WAVE_FORMAT_MULAW: Codec.PCMU,
}
_CODEC_TAG = {codec: tag for tag, codec in _TAG_CODEC.items()}

# Names for tags people actually meet, so the error says what the file is (from mmreg.h).
_TAG_NAMES = {
    0x0000: "unknown",
    0x0001: "PCM",
    0x0002: "MS ADPCM",
    0x0003: "IEEE float",
    0x0006: "A-law",
    0x0007: "µ-law",
    0x0011: "IMA ADPCM",
    0x0014: "G.723 ADPCM",
    0x0031: "GSM 6.10",
    0x0050: "MPEG",
    0x0055: "MPEG Layer 3",
    0x0064: "G.726 ADPCM",
    0x0065: "G.722 ADPCM",
    0x0083: "G.729A",
    0x00FF: "AAC",
    0x0161: "Windows Media Audio",
    0x704F: "Opus",
    0xF1AC: "FLAC",
}

_SUPPORTED = "16-bit PCM, G.711 µ-law, G.711 A-law"

# KSDATAFORMAT_SUBTYPE_* GUIDs are the format tag followed by this fixed tail.
_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")

_TRUNCATED = "WAV header is truncated"

# An all-ones (or zero) size is how streaming writers say "until the end of the file".
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)
# Chunks that follow the audio in WAV files. A data chunk of size 0 followed by one of these is
# empty, not open-ended (a streaming writer's size 0 is followed by audio).
_TRAILING_CHUNKS = frozenset(
    {b"LIST", b"list", b"id3 ", b"ID3 ", b"fact", b"cue ", b"smpl", b"inst", b"bext", b"JUNK"}
    | {b"junk", b"PAD ", b"cart", b"iXML", b"_PMX", b"acid", b"DISP", b"plst", b"labl", b"note"}
)


class WavError(ValueError):
    """The bytes are not a WAV file this package can decode; the message is one line."""


class WavNeedMoreData(Exception):
    """The header continues past the bytes given; retry with at least ``needed`` bytes in total."""

    def __init__(self, needed: int, have: int) -> None:
        super().__init__(f"WAV header needs {needed} bytes, have {have}")
        self.needed = needed


@dataclass(frozen=True, slots=True)
class WavFormat:
    """What a WAV header says about the audio that follows it."""

    codec: Codec
    channels: int
    sample_rate: int
    data_offset: int
    """Byte offset of the first audio byte in the file."""
    data_size: int | None
    """Bytes of audio, or None when the header leaves it open (read until end of file)."""

    @property
    def frame_size(self) -> int:
        """Bytes per frame (one sample of every channel)."""
        return self.channels * self.codec.sample_width

    @property
    def frames(self) -> int | None:
        """Whole frames of audio, or None when ``data_size`` is None."""
        return None if self.data_size is None else self.data_size // self.frame_size


def _tag_name(tag: int) -> str:
    name = _TAG_NAMES.get(tag)
    return f"format 0x{tag:04X} ({name})" if name else f"format 0x{tag:04X}"


def _parse_fmt(body: bytes) -> tuple[Codec, int, int]:
    """Codec, channels and sample rate from a fmt chunk body; raises WavError if unsupported."""
    if len(body) < 16:
        raise WavError(f"WAV fmt chunk is too short ({len(body)} bytes, need 16)")
    tag, channels, rate, _byte_rate, _block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        # cbSize, wValidBitsPerSample, dwChannelMask, then the SubFormat GUID.
        if len(body) < 40:
            raise WavError("WAV extensible fmt chunk is too short (no SubFormat)")
        guid = body[24:40]
        if guid[2:] != _GUID_TAIL:
            raise WavError(
                f"unsupported WAV codec: extensible SubFormat {guid.hex()}; supported: {_SUPPORTED}"
            )
        tag = int.from_bytes(guid[:2], "little")
    codec = _TAG_CODEC.get(tag)
    if codec is None:
        raise WavError(f"unsupported WAV codec: {_tag_name(tag)}; supported: {_SUPPORTED}")
    if bits != codec.sample_width * 8:
        kind = "PCM" if codec is Codec.L16 else _TAG_NAMES[tag]
        raise WavError(f"unsupported WAV sample width: {bits}-bit {kind} (supported: {_SUPPORTED})")
    if channels == 0:
        raise WavError("WAV declares 0 channels")
    if rate == 0:
        raise WavError("WAV declares a sample rate of 0 Hz")
    # nBlockAlign and nAvgBytesPerSec are derived values that some writers get wrong; the layout
    # follows from the fields above, as the stdlib wave module also assumes.
    return codec, channels, rate


def parse_wav_header(head: bytes, *, at_eof: bool = False) -> WavFormat:
    """Parse the WAV header at the start of ``head`` (the first bytes of a file).

    Chunks before ``data`` (LIST, fact, JUNK, bext, ...) are skipped, honoring the pad byte after
    odd-sized chunks. A data size of 0xFFFFFFFF means "until the end of the file"; so does 0,
    unless another chunk (LIST, id3, ...) follows at once, which makes it an empty data chunk
    (to tell, the 8 bytes after the data chunk's header are needed). Raises
    :class:`WavNeedMoreData` when the header runs past ``head``, unless ``at_eof`` says ``head``
    is the whole file: then the file is truncated or lacks a chunk, and :class:`WavError` says
    which. Raises :class:`WavError` for anything that is not a supported
    WAV file. The channel count is not limited here.
    """

    def need(n: int, problem: str) -> Exception:
        return WavError(problem) if at_eof else WavNeedMoreData(n, len(head))

    if head[:4] != b"RIFF"[: len(head)] or head[8:12] != b"WAVE"[: max(0, len(head) - 8)]:
        if head[:4] in (b"RF64", b"BW64"):
            raise WavError("RF64/BW64 (64-bit) WAV files are not supported")
        raise WavError("not a WAV file (no RIFF/WAVE header)")
    if len(head) < 12:
        raise need(12, "not a WAV file (no RIFF/WAVE header)" if len(head) < 4 else _TRUNCATED)
    fmt: tuple[Codec, int, int] | None = None
    pos = 12
    while True:
        if pos + 8 > len(head):
            if pos == len(head):  # the bytes end cleanly between chunks
                missing = "WAV has no fmt chunk" if fmt is None else "WAV has no data chunk"
                raise need(pos + 8, missing)
            raise need(pos + 8, _TRUNCATED)
        chunk_id = head[pos : pos + 4]
        (size,) = struct.unpack_from("<I", head, pos + 4)
        body = pos + 8
        if chunk_id == b"data":
            if fmt is None:
                raise WavError("WAV has no fmt chunk before its data chunk")
            codec, channels, rate = fmt
            data_size = None if size in _UNKNOWN_SIZES else size
            if size == 0:
                # Empty, or open-ended? What follows tells: another chunk, or audio (or nothing).
                if body + 8 > len(head) and not at_eof:
                    raise WavNeedMoreData(body + 8, len(head))
                if head[body : body + 4] in _TRAILING_CHUNKS:
                    data_size = 0
            return WavFormat(
                codec=codec,
                channels=channels,
                sample_rate=rate,
                data_offset=body,
                data_size=data_size,
            )
        if chunk_id == b"fmt ":
            if body + size > len(head):
                raise need(body + size, _TRUNCATED)
            fmt = _parse_fmt(head[body : body + size])
        pos = body + size + (size & 1)


def wav_header(codec: Codec, channels: int, sample_rate: int, data_size: int) -> bytes:
    """The bytes before ``data_size`` bytes of interleaved audio in a WAV file.

    16-bit PCM gets the classic 16-byte fmt chunk; G.711 gets an 18-byte fmt chunk (cbSize 0) and
    the fact chunk that non-PCM formats require. An odd ``data_size`` needs one pad byte after the
    audio, which the caller writes (the RIFF size here counts it). Raises ValueError for values
    the header cannot hold.
    """
    if not 1 <= channels <= 0xFFFF:
        raise ValueError(f"channel count out of range: {channels}")
    if not 1 <= sample_rate <= 0xFFFFFFFF:
        raise ValueError(f"sample rate out of range: {sample_rate}")
    width = codec.sample_width
    block_align = channels * width
    if block_align > 0xFFFF or sample_rate * block_align > 0xFFFFFFFF:
        raise ValueError(
            f"format out of range: {channels} channels x {width} bytes x {sample_rate} Hz"
        )
    if not 0 <= data_size <= 0xFFFFFFFF:
        raise ValueError(f"data size out of range for a WAV file: {data_size}")
    fmt = struct.pack(
        "<HHIIHH",
        _CODEC_TAG[codec],
        channels,
        sample_rate,
        sample_rate * block_align,
        block_align,
        width * 8,
    )
    extra = b""
    if codec is not Codec.L16:
        fmt += struct.pack("<H", 0)  # cbSize: no extension
        extra = b"fact" + struct.pack("<II", 4, data_size // block_align)
    head_size = 12 + 8 + len(fmt) + len(extra) + 8
    riff_size = head_size - 8 + data_size + (data_size & 1)
    if riff_size > 0xFFFFFFFF:
        raise ValueError(f"data size out of range for a WAV file: {data_size}")
    return b"".join(
        (
            b"RIFF",
            struct.pack("<I", riff_size),
            b"WAVE",
            b"fmt ",
            struct.pack("<I", len(fmt)),
            fmt,
            extra,
            b"data",
            struct.pack("<I", data_size),
        )
    )
