"""Library use without configure_logging: no debug lines (they carry transcript text)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROGRAM = """
from gateway.observability.logging import get_logger
log = get_logger("embedder")
log.debug("turn.final", text="my card number is 4111")
log.info("call.started", call_id="c1")
"""


def test_unconfigured_logging_drops_debug_lines() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = done.stdout + done.stderr
    assert "call.started" in out
    assert "4111" not in out and "turn.final" not in out
