"""`gateway` as a user runs it, on bad input: one line on stderr, exit 2, no traceback, fast.

Every case must fail before the speech model is loaded, so each run takes well under 10 s.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gateway.media.codec import Codec
from gateway.media.wav import wav_header

ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG = ROOT / "config" / "gateway.toml"
FAST_S = 10.0


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


def gateway(*args: str, env: dict[str, str] | None = None) -> Run:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("GATEWAY_") and k != "CREDENTIALS_DIRECTORY"
    }
    clean.update(env or {})
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Run(result.returncode, result.stdout, result.stderr, time.monotonic() - start)


# --- files -----------------------------------------------------------------------------------


def fmt_chunk(tag: int, channels: int, rate: int, bits: int, extra: bytes = b"") -> bytes:
    block = channels * bits // 8
    body = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits) + extra
    return b"fmt " + struct.pack("<I", len(body)) + body


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def data_chunk(audio: bytes) -> bytes:
    return b"data" + struct.pack("<I", len(audio)) + audio + b"\x00" * (len(audio) & 1)


def valid_wav(path: Path, channels: int = 2, frames: int = 800) -> Path:
    """A short, valid 16-bit PCM call (quiet noise), enough for everything but the bad option."""
    rng = np.random.default_rng(1)
    audio = rng.integers(-200, 200, size=(frames, channels)).astype("<i2").tobytes()
    path.write_bytes(wav_header(Codec.L16, channels, 8000, len(audio)) + audio)
    return path


def streaming_header(channels: int, rate: int) -> bytes:
    """A header whose data size is 0xFFFFFFFF: a streaming writer's "until end of file"."""
    head = bytearray(wav_header(Codec.L16, channels, rate, 0))
    struct.pack_into("<I", head, len(head) - 4, 0xFFFFFFFF)
    return bytes(head)


# Each case: (tmp_path) -> (argv, extra env); and the key words its one stderr line must hold.
Case = Callable[[Path], tuple[list[str], dict[str, str]]]


def _missing(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["transcribe", str(tmp / "no_such_call.wav")], {}


def _directory(tmp: Path) -> tuple[list[str], dict[str, str]]:
    (tmp / "calls.wav").mkdir()
    return ["transcribe", str(tmp / "calls.wav")], {}


def _text(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "notes.wav"
    path.write_text("Customer called about the invoice.\nAgent resolved it.\n")
    return ["transcribe", str(path)], {}


def _mp3(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "call.mp3"
    rng = np.random.default_rng(7)
    frame = b"\xff\xfb\x90\x64" + rng.integers(0, 256, 413, dtype=np.uint8).tobytes()
    path.write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + frame * 20)
    return ["transcribe", str(path)], {}


def _random(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "noise.bin"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return ["transcribe", str(path)], {}


def _empty(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "empty.wav"
    path.write_bytes(b"")
    return ["transcribe", str(path)], {}


def _zero_frames(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "silent_header.wav"
    path.write_bytes(wav_header(Codec.L16, 2, 8000, 0))
    return ["transcribe", str(path)], {}


def _declared_data_missing(tmp: Path) -> tuple[list[str], dict[str, str]]:
    # The header promises 400 bytes of audio, the file ends right after the header.
    path = tmp / "cut_after_header.wav"
    path.write_bytes(wav_header(Codec.L16, 2, 8000, 400))
    return ["transcribe", str(path)], {}


def _streaming_less_than_a_frame(tmp: Path) -> tuple[list[str], dict[str, str]]:
    # Open-ended data size, then a single byte: not even one 4-byte frame.
    path = tmp / "stream_one_byte.wav"
    path.write_bytes(streaming_header(2, 8000) + b"\x01")
    return ["transcribe", str(path)], {}


def _truncated(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "truncated.wav"
    path.write_bytes(wav_header(Codec.L16, 2, 8000, 3200)[:30])
    return ["transcribe", str(path)], {}


def _ieee_float(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "float.wav"
    path.write_bytes(riff(fmt_chunk(0x0003, 1, 8000, 32), data_chunk(b"\x00" * 400)))
    return ["transcribe", str(path)], {}


def _ima_adpcm(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "ima.wav"
    # cbSize 2, wSamplesPerBlock 505: the usual IMA ADPCM fmt extension.
    extra = struct.pack("<HH", 2, 505)
    path.write_bytes(riff(fmt_chunk(0x0011, 1, 8000, 4, extra), data_chunk(b"\x00" * 256)))
    return ["transcribe", str(path)], {}


def _pcm24(tmp: Path) -> tuple[list[str], dict[str, str]]:
    path = tmp / "pcm24.wav"
    path.write_bytes(riff(fmt_chunk(0x0001, 2, 8000, 24), data_chunk(b"\x00" * 600)))
    return ["transcribe", str(path)], {}


def _nine_channels(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["transcribe", str(valid_wav(tmp / "nine.wav", channels=9, frames=10))], {}


def _config(tmp: Path, text: str) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(text)
    return path


def _bad_config_value(tmp: Path) -> tuple[list[str], dict[str, str]]:
    cfg = _config(tmp, "[stt.local]\nbeam_size = 0\n")
    return ["--config", str(cfg), "transcribe", str(valid_wav(tmp / "call.wav"))], {}


def _unknown_config_key(tmp: Path) -> tuple[list[str], dict[str, str]]:
    cfg = _config(tmp, "[stt.local]\nbeam_size = 5\nbeam_width = 3\n")
    return ["--config", str(cfg), "transcribe", str(valid_wav(tmp / "call.wav"))], {}


def _invalid_toml(tmp: Path) -> tuple[list[str], dict[str, str]]:
    cfg = _config(tmp, "[stt.local\nbeam_size = 5\n")
    return ["--config", str(cfg), "transcribe", str(valid_wav(tmp / "call.wav"))], {}


def _missing_config(tmp: Path) -> tuple[list[str], dict[str, str]]:
    cfg = tmp / "absent.toml"
    return ["--config", str(cfg), "transcribe", str(valid_wav(tmp / "call.wav"))], {}


def _bad_env_value(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["transcribe", str(valid_wav(tmp / "call.wav"))], {
        "GATEWAY_STT__LOCAL__BEAM_SIZE": "abc"
    }


def _unknown_env(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["transcribe", str(valid_wav(tmp / "call.wav"))], {"GATEWAY_STT__LOCAL__BEAM": "5"}


def _env_list_not_json(tmp: Path) -> tuple[list[str], dict[str, str]]:
    # Lists come from the environment as JSON; a plain comma list is a user error, not a crash.
    env = {"GATEWAY_CALLS__DEFAULT_ROLES": "caller,agent"}
    return ["transcribe", str(valid_wav(tmp / "call.wav"))], env


def _format_pdf(tmp: Path) -> tuple[list[str], dict[str, str]]:
    return ["transcribe", str(valid_wav(tmp / "call.wav")), "--format", "pdf"], {}


def _roles_empty_entry(tmp: Path) -> tuple[list[str], dict[str, str]]:
    wav = valid_wav(tmp / "call.wav", channels=3)
    return ["transcribe", str(wav), "--roles", "customer,,agent"], {}


CASES: dict[str, tuple[Case, tuple[str, ...]]] = {
    "missing-file": (_missing, ("no such file", "no_such_call.wav")),
    "directory": (_directory, ("directory", "calls.wav")),
    "text-file": (_text, ("not a wav",)),
    "mp3-file": (_mp3, ("not a wav",)),
    "random-binary": (_random, ("not a wav",)),
    "empty-file": (_empty, ("empty",)),
    "zero-frames": (_zero_frames, ("no audio", "0 frames")),
    "declared-data-missing": (_declared_data_missing, ("no audio", "0 frames")),
    "streaming-less-than-a-frame": (_streaming_less_than_a_frame, ("no audio", "0 frames")),
    "truncated-header": (_truncated, ("truncated",)),
    "ieee-float": (_ieee_float, ("unsupported", "codec", "ieee float")),
    "ima-adpcm": (_ima_adpcm, ("unsupported", "codec", "ima adpcm")),
    "pcm-24-bit": (_pcm24, ("unsupported", "24-bit")),
    "nine-channels": (_nine_channels, ("9 channels", "at most 8")),
    "config-bad-value": (_bad_config_value, ("config", "stt.local.beam_size", "greater")),
    "config-unknown-key": (_unknown_config_key, ("config", "stt.local.beam_width", "unknown")),
    "config-invalid-toml": (_invalid_toml, ("config", "invalid toml", "gateway.toml")),
    "config-missing-file": (_missing_config, ("config", "absent.toml", "not found")),
    "env-bad-value": (_bad_env_value, ("config", "stt.local.beam_size", "abc")),
    "env-unknown-variable": (_unknown_env, ("config", "gateway_stt__local__beam", "unknown")),
    "env-list-not-json": (_env_list_not_json, ("config", "default_roles")),
    "format-pdf": (_format_pdf, ("--format", "pdf")),
    "roles-empty-entry": (_roles_empty_entry, ("--roles", "empty")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_on_stderr_and_exit_2(name: str, tmp_path: Path) -> None:
    make, words = CASES[name]
    argv, env = make(tmp_path)
    run = gateway(*argv, env=env)

    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{run.stderr}"
    line = lines[0]
    assert line.strip() and line.startswith("gateway:"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    # Failing before the speech model loads keeps these far under this bound.
    assert run.elapsed < FAST_S, f"took {run.elapsed:.1f} s: did it load the model?"


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", str(REPO_CONFIG), "check-config"],
        ["check-config", "--config", str(REPO_CONFIG)],
    ],
    ids=["config-before-command", "config-after-command"],
)
def test_check_config_prints_the_effective_settings_as_json(argv: list[str]) -> None:
    expected = tomllib.loads(REPO_CONFIG.read_text())["stt"]["local"]["beam_size"]
    run = gateway(*argv)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    doc = json.loads(run.stdout)
    assert doc["stt"]["local"]["beam_size"] == expected
    assert doc["calls"]["default_roles"] == ["customer", "agent"]
    assert run.elapsed < FAST_S


def test_check_config_reflects_a_changed_value(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[stt.local]\nbeam_size = 2\n")
    run = gateway("--config", str(cfg), "check-config", env={"GATEWAY_CALLS__MAX_CHANNELS": "3"})
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["stt"]["local"]["beam_size"] == 2
    assert doc["calls"]["max_channels"] == 3


def test_assemblyai_engine_without_a_key_is_refused_before_connecting(tmp_path: Path) -> None:
    wav = valid_wav(tmp_path / "call.wav")
    result = gateway("transcribe", str(wav), "--engine", "assemblyai")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API key" in lines[0] and "Traceback" not in result.stderr
