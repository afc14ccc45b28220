"""Call audio codecs: G.711 µ-law / A-law and 16-bit linear PCM.

Everything downstream of ingress works on L16 (signed 16-bit little-endian PCM) or float32;
this module converts between those and the codecs telephony platforms send. Pure functions,
no state.
"""

from __future__ import annotations

import sys
import warnings
from enum import StrEnum

import numpy as np
import numpy.typing as npt

# audioop is deprecated in 3.11/3.12 (removed in 3.13, where the audioop-lts backport provides the
# same module); it is still the fastest correct G.711 implementation, so silence the import warning.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


class Codec(StrEnum):
    """A channel's payload encoding. The value is the canonical lower-case name."""

    PCMU = "pcmu"
    """G.711 µ-law, 8 bits per sample."""
    PCMA = "pcma"
    """G.711 A-law, 8 bits per sample."""
    L16 = "l16"
    """Signed 16-bit little-endian linear PCM."""

    @property
    def sample_width(self) -> int:
        """Bytes per sample of one channel."""
        return 2 if self is Codec.L16 else 1


class UnsupportedCodec(ValueError):
    """A codec name that is neither a supported codec nor one of its known aliases."""

    def __init__(self, name: str) -> None:
        supported = ", ".join(f"{c.value} ({_DESCRIPTIONS[c]})" for c in Codec)
        super().__init__(f"unsupported codec {name!r}; supported: {supported}")
        self.name = name


_DESCRIPTIONS: dict[Codec, str] = {
    Codec.PCMU: "G.711 µ-law",
    Codec.PCMA: "G.711 A-law",
    Codec.L16: "16-bit linear PCM",
}

# Spellings seen in Twilio, Genesys AudioHook, SIP/SDP, ffmpeg and cloud STT APIs.
_ALIASES: dict[str, Codec] = {
    **dict.fromkeys(
        (
            "pcmu",
            "mulaw",
            "ulaw",
            "mu-law",
            "µ-law",
            "μ-law",
            "g711u",
            "g711_ulaw",
            "audio/x-mulaw",
            "audio/pcmu",
            "pcm_mulaw",
        ),
        Codec.PCMU,
    ),
    **dict.fromkeys(
        ("pcma", "alaw", "a-law", "g711a", "g711_alaw", "audio/x-alaw", "audio/pcma", "pcm_alaw"),
        Codec.PCMA,
    ),
    **dict.fromkeys(
        ("l16", "audio/l16", "linear16", "pcm_s16le", "pcm16", "slin", "s16le"),
        Codec.L16,
    ),
}


def parse_codec(name: str) -> Codec:
    """Map a codec name or alias (case-insensitive, surrounding blanks ignored) to a :class:`Codec`.

    Raises :class:`UnsupportedCodec` for anything else.
    """
    try:
        return _ALIASES[name.strip().lower()]
    except KeyError:
        raise UnsupportedCodec(name) from None


def _check_whole_samples(codec: Codec, data: bytes, what: str) -> None:
    if len(data) % codec.sample_width:
        raise ValueError(
            f"{what} of {len(data)} bytes is not a whole number of {codec.value} samples "
            f"({codec.sample_width} bytes each)"
        )


def decode(codec: Codec, payload: bytes) -> bytes:
    """Decode ``payload`` in ``codec`` to L16 (one 16-bit sample per input sample).

    Raises ValueError if ``payload`` is not a whole number of samples.
    """
    _check_whole_samples(codec, payload, "payload")
    if codec is Codec.L16:
        return bytes(payload)
    pcm: bytes = (
        audioop.ulaw2lin(payload, 2) if codec is Codec.PCMU else audioop.alaw2lin(payload, 2)
    )
    # audioop works in native byte order; L16 here is always little-endian.
    return audioop.byteswap(pcm, 2) if sys.byteorder == "big" else pcm


def encode(codec: Codec, pcm16: bytes) -> bytes:
    """Encode L16 audio to ``codec`` (lossy for G.711: 14/13-bit companding).

    Raises ValueError if ``pcm16`` has an odd length.
    """
    _check_whole_samples(Codec.L16, pcm16, "L16 audio")
    if codec is Codec.L16:
        return bytes(pcm16)
    if sys.byteorder == "big":
        pcm16 = audioop.byteswap(pcm16, 2)
    out: bytes = audioop.lin2ulaw(pcm16, 2) if codec is Codec.PCMU else audioop.lin2alaw(pcm16, 2)
    return out


# The codeword that decodes to 0 (µ-law 0xFF; A-law 0xD5, the even bits inverted, decodes to +8,
# the smallest magnitude A-law has: the customary A-law idle pattern).
_SILENCE: dict[Codec, bytes] = {Codec.PCMU: b"\xff", Codec.PCMA: b"\xd5", Codec.L16: b"\x00\x00"}


def silence(codec: Codec, samples: int) -> bytes:
    """``samples`` samples of silence in ``codec``. Raises ValueError if ``samples`` < 0."""
    if samples < 0:
        raise ValueError(f"negative sample count: {samples}")
    return _SILENCE[codec] * samples


def pcm16_to_float32(pcm16: bytes) -> npt.NDArray[np.float32]:
    """L16 bytes to a new float32 array in [-1, 1) (sample / 32768).

    Raises ValueError if ``pcm16`` has an odd length.
    """
    _check_whole_samples(Codec.L16, pcm16, "L16 audio")
    return np.frombuffer(pcm16, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)


def float32_to_pcm16(x: npt.ArrayLike) -> bytes:
    """Float samples (nominally [-1, 1)) to L16 bytes, rounded and clipped to the 16-bit range."""
    scaled = np.rint(np.asarray(x, dtype=np.float32) * np.float32(32768))
    out: bytes = np.clip(scaled, -32768, 32767).astype("<i2").tobytes()
    return out
