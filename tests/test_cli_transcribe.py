"""`gateway transcribe` end to end as a user runs it: a subprocess on the sample call."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "diane_sheila.wav"


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_text_json_vtt_and_srt_of_the_sample_call(tmp_path: Path) -> None:
    text = gateway("transcribe", str(SAMPLE), "--roles", "customer,agent")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines and all(re.match(r"^\[\d\d:\d\d\.\d\] (customer|agent): \S", s) for s in lines)
    assert lines[0].startswith("[00:06.") and ": Hello" in lines[0]
    assert "Diane in New Jersey" in text.stdout and "Yankee" in text.stdout
    assert text.stderr == ""

    out = tmp_path / "call.json"
    result = gateway(
        "transcribe",
        str(SAMPLE),
        "--format",
        "json",
        "--speakers",
        "Diane,Sheila",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    doc = json.loads(out.read_text())
    utterances = doc["utterances"]
    assert {u["speaker"] for u in utterances} == {"Diane", "Sheila"}
    assert {(u["speaker"], u["role"], u["channel"]) for u in utterances} == {
        ("Diane", "customer", 0),
        ("Sheila", "agent", 1),
    }
    starts = [u["start"] for u in utterances]
    assert starts == sorted(starts) and all(isinstance(s, int) for s in starts)
    assert all(u["words"] and u["start"] <= u["words"][0]["start"] for u in utterances)

    vtt = gateway("transcribe", str(SAMPLE), "--format", "vtt")
    assert vtt.returncode == 0 and vtt.stdout.startswith("WEBVTT")
    assert "<v customer>" in vtt.stdout and "<v agent>" in vtt.stdout
    srt = gateway("transcribe", str(SAMPLE), "--format", "srt")
    assert srt.returncode == 0 and srt.stdout.startswith("1\n00:00:0")
