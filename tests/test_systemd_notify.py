"""`gateway serve` under systemd Type=notify: READY, watchdog pings, STOPPING on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

from gateway.observability.systemd import SystemdNotifier

ROOT = Path(__file__).resolve().parent.parent


async def _datagrams(sock: socket.socket, until: str, within_s: float) -> list[str]:
    loop = asyncio.get_running_loop()
    got: list[str] = []
    async with asyncio.timeout(within_s):
        while not any(until in g for g in got):
            got.append((await loop.sock_recv(sock, 4096)).decode())
    return got


async def test_serve_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        NOTIFY_SOCKET=str(path),
        WATCHDOG_USEC="200000",
        GATEWAY_SERVER__DATA_DIR=str(tmp_path / "data"),
        GATEWAY_LOGGING__LEVEL="warning",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", "0",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ready = await _datagrams(sock, "READY=1", 120)
        assert any(g.startswith("READY=1") and "STATUS=serving on" in g for g in ready)
        pings = await _datagrams(sock, "WATCHDOG=1", 5)
        more = [g for g in await _datagrams(sock, "WATCHDOG=1", 5) if g == "WATCHDOG=1"]
        assert "WATCHDOG=1" in pings and more
        proc.send_signal(signal.SIGTERM)
        stopping = await _datagrams(sock, "STOPPING=1", 30)
        assert any(g.startswith("STOPPING=1") for g in stopping)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.watchdog_s is None


def test_watchdog_for_another_pid_is_ignored() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_s is None
