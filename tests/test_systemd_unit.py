"""systemd/gateway.service: systemd accepts it, and its hardening rates 2.5 or better."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "gateway.service"


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as installed, with ExecStart pointing at this checkout's gateway."""
    text = UNIT.read_text().replace(
        "/opt/callgate/.venv/bin/gateway", str(ROOT / ".venv/bin/gateway")
    )
    path = tmp_path / "gateway.service"
    path.write_text(text)
    return path


def test_unit_verifies(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "gateway.service" not in result.stderr, result.stderr


def test_unit_security_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for gateway\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, result.stdout


def test_unit_is_type_notify_with_watchdog_and_drain_timeout() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "TimeoutStopSec=", "StateDirectory=callgate"):
        assert line in text
    assert "LoadCredential=twilio.auth_token:" in text
