"""systemd service notifications (``Type=notify``): READY, STOPPING, STATUS and the watchdog.

Implements the ``sd_notify`` datagram protocol directly (a unix datagram to ``$NOTIFY_SOCKET``,
``@`` meaning the abstract namespace), so there is no dependency on libsystemd. Without
``$NOTIFY_SOCKET`` (not started by systemd) every call is a no-op. Sends never block: the socket is
non-blocking and a failed send is dropped (systemd would restart us anyway if the watchdog
starves).

The watchdog task pings ``WATCHDOG=1`` from the event loop every half ``$WATCHDOG_USEC``, so a
loop that stops turning stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


class SystemdNotifier:
    """Talks to the service manager named by the environment (see module docstring)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address and address[0] in "/@":
            self._address = "\0" + address[1:] if address[0] == "@" else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines; True if the datagram went out."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str = "") -> None:
        self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def start_watchdog(self) -> None:
        """Ping from the event loop at half the watchdog interval (if systemd asked for it)."""
        if self.watchdog_s is None or not self.enabled or self._watchdog is not None:
            return
        self._watchdog = asyncio.create_task(self._ping(self.watchdog_s / 2), name="watchdog")

    async def _ping(self, every_s: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(every_s)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
