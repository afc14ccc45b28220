"""`gateway serve` as a process: the `make run` demo, simulated calls, and SIGTERM drain."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.transcript.scoring import normalize

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "diane_sheila.wav"
TOKEN = "cli-serve-test-token"


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_SERVER__DATA_DIR=str(data_dir),
        GATEWAY_TWILIO__AUTH_TOKEN=TOKEN,
        GATEWAY_CALLS__MAX_SPEED="4",
        GATEWAY_SERVER__DRAIN_TIMEOUT_S="120",
    )
    return env


@pytest.mark.slow
def test_demo_and_two_simulated_calls_survive_sigterm(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--demo",
            str(SAMPLE),
            "--demo-speed",
            "3",
            "--demo-param",
            "inbound_participant=Diane",
            "--demo-param",
            "outbound_participant=Sheila",
        ],
        cwd=ROOT,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        match = re.match(r"callgate \S+ serving on 127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        port = int(match.group(1))
        urls: list[str] = []
        while not urls or "health:" not in urls[-1]:  # the URL lines end with health
            urls.append(server.stdout.readline())
            assert urls[-1], urls
        assert any(f"ws://127.0.0.1:{port}/twilio/stream" in u for u in urls), urls
        assert any(f"http://127.0.0.1:{port}/metrics" in u for u in urls), urls
        simulate = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "simulate",
                "twilio",
                str(SAMPLE),
                "--url",
                f"ws://127.0.0.1:{port}/twilio/stream",
                "--auth-token",
                TOKEN,
                "--calls",
                "2",
                "--speed",
                "3",
            ],
            cwd=ROOT,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4.0)  # all three calls are mid-stream (10 s each at 3x)
        assert simulate.poll() is None
        server.send_signal(signal.SIGTERM)
        sim_out, sim_err = simulate.communicate(timeout=120)
        assert simulate.returncode == 0, sim_out + sim_err
        out, err = server.communicate(timeout=180)
        assert server.returncode == 0, err
    finally:
        for proc in (server,):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # The console printed each call's finals in order, as lines; the demo call (#1, or no
    # number while it was alone) with the participants' names from its <Parameter>s.
    calls: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        m = re.match(r"^(?:#(\d+) )?\[(\d\d:\d\d\.\d)\] ([^:]+):", line)
        if m:
            calls.setdefault(m.group(1) or "1", []).append((m.group(2), m.group(3)))
    assert sorted(calls) == ["1", "2", "3"], out + err
    for finals in calls.values():
        stamps = [stamp for stamp, _ in finals]
        assert stamps == sorted(stamps), out
    assert {speaker for _, speaker in calls["1"]} == {"Diane", "Sheila"}
    assert {speaker for _, speaker in calls["2"]} == {"customer", "agent"}

    stored = sorted((tmp_path / "transcripts").glob("*.json"))
    assert len(stored) == 3
    docs = [json.loads(p.read_text()) for p in stored]
    texts = []
    for doc in docs:
        assert doc["state"] == "ended"
        assert doc["end_reason"] == "stop"  # every call streamed to its end before the exit
        assert doc["duration_ms"] >= 29_900
        assert {u["role"] for u in doc["utterances"]} == {"customer", "agent"}
        texts.append(normalize(" ".join(u["text"] for u in doc["utterances"])))
    assert all("new jersey" in t for t in texts)
