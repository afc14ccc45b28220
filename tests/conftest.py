"""Shared fixtures: the blocking-call guard (invariant 9), the corpus, and one loaded engine."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from gateway.config import LocalEngineSettings
from gateway.stt.local import LocalEngine

ROOT = Path(__file__).resolve().parent.parent
CALLS = ROOT / "tests" / "data" / "calls"
TRANSCRIBED_CALLS = ("composed_library", "mfa_two_michaels", "phone_diane_sheila")


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster | None]:
    """Fail any test whose code makes a blocking call on a running event loop."""
    with blockbuster_ctx("gateway") as bb:
        yield bb


@pytest.fixture(scope="session")
def local_engine() -> Iterator[LocalEngine]:
    """The embedded engine with the bundled model, loaded once for the whole run.

    It holds no loop-bound state (thread pools only), so tests on their own loops share it.
    """
    engine = LocalEngine(LocalEngineSettings())
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


def channel_audio(name: str, channel: int, start_s: float, end_s: float) -> bytes:
    """16-bit PCM of one channel of a test call between two times (8 kHz)."""
    with wave.open(str(call_path(name))) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())
    return frames[int(start_s * 8000) : int(end_s * 8000), channel].tobytes()


def call_path(name: str) -> Path:
    path = CALLS / f"{name}.wav"
    assert path.is_file(), f"test call {path} is missing"
    return path
