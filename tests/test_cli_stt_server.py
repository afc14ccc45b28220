"""`gateway stt-server` + `gateway transcribe --stt-url`: the v3 path gives the local transcript."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "diane_sheila.wav"


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


@pytest.mark.slow
def test_transcribe_through_stt_server_equals_local_engine() -> None:
    local = subprocess.run(
        [sys.executable, "-m", "gateway", "transcribe", str(SAMPLE), "--format", "json"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr
    server = subprocess.Popen(
        [sys.executable, "-m", "gateway", "stt-server", "--port", "0"],
        cwd=ROOT,
        env={**env(), "GATEWAY_LOGGING__LEVEL": "warning"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("stt-server listening on ws://127.0.0.1:"), line
        url = line.strip().rsplit(" ", 1)[-1]
        remote = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "transcribe",
                str(SAMPLE),
                "--format",
                "json",
                "--engine",
                "assemblyai",
                "--stt-url",
                url,
            ],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.terminate()
        server.wait(30)
    assert remote.returncode == 0, remote.stderr
    assert server.returncode == 0  # SIGTERM is a clean shutdown
    assert remote.stdout == local.stdout


def test_stt_server_refuses_a_busy_port_with_one_line() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "stt-server", "--port", str(port)],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen" in lines[0], result.stderr
