"""RTP sockets for recorded streams: a port allocator over a configured range (asyncio shell).

:class:`RtpPorts` implements the :class:`~gateway.ingress.siprec.dialog.PortAllocator` the SIP
core asks when it accepts a call: :meth:`RtpPorts.allocate` binds, synchronously, one
non-blocking UDP socket pair per stream (an even RTP port and RTCP on port + 1) from
``[port_min, port_max]``, skipping ports another process holds, and returns the RTP ports (None
when the range has too few free pairs: the core answers 503). :meth:`RtpPorts.listen` hands a
port's datagrams to a callback through the event loop's reader (no task, no thread); RTCP is
read and discarded so the peer never sees ICMP errors. :meth:`RtpPorts.release` (called by the
core when a call ends, and by the service) stops the readers and closes every socket of the call.
:meth:`RtpPorts.close` does that for every call. Ports are handed out round-robin, so a port just
released is not reused at once (late packets of the old call land nowhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["RtpPorts"]

# RTCP datagrams drained per readiness callback at most (a flood cannot starve the loop).
# RTP sockets read one per callback (_SipCall.readable).
MAX_READS = 64
RECV_BYTES = 4096

Reader = Callable[[socket.socket], None]


@dataclass(slots=True)
class _Pair:
    port: int
    rtp: socket.socket
    rtcp: socket.socket
    listening: bool = False


@dataclass(slots=True)
class _Allocation:
    pairs: list[_Pair] = field(default_factory=list)


def _drain_rtcp(sock: socket.socket) -> None:
    for _ in range(MAX_READS):
        try:
            sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return


class RtpPorts:
    """Allocates RTP/RTCP socket pairs for calls (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port_min: int,
        port_max: int,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Ports come from ``[port_min, port_max]`` (the RTP port is even); bound on ``host``."""
        first = port_min + (port_min % 2)
        if port_max - first < 1:
            raise ValueError(f"RTP port range {port_min}-{port_max} holds no even/odd pair")
        self.host = host
        self.port_min = first
        self.port_max = port_max
        self._loop = loop or asyncio.get_running_loop()
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._calls: dict[str, _Allocation] = {}
        self._by_port: dict[int, _Pair] = {}
        self._next = first

    @property
    def capacity(self) -> int:
        """Socket pairs the range holds."""
        return (self.port_max - self.port_min + 1) // 2

    @property
    def in_use(self) -> int:
        """Socket pairs currently allocated."""
        return len(self._by_port)

    def ports_of(self, call_id: str) -> tuple[int, ...]:
        """The RTP ports allocated to ``call_id`` (empty when none)."""
        allocation = self._calls.get(call_id)
        return tuple(p.port for p in allocation.pairs) if allocation else ()

    # -- PortAllocator -------------------------------------------------------------------------

    def allocate(self, call_id: str, count: int) -> Sequence[int] | None:
        """Bind ``count`` socket pairs for ``call_id``; None (nothing kept) if the range is full."""
        pairs: list[_Pair] = []
        tries = self.capacity
        while len(pairs) < count and tries > 0:
            tries -= 1
            port = self._next
            self._next += 2
            if self._next + 1 > self.port_max:
                self._next = self.port_min
            if port in self._by_port:
                continue
            pair = self._bind(port)
            if pair is not None:
                pairs.append(pair)
                self._by_port[port] = pair
        if len(pairs) < count:
            for pair in pairs:
                self._close(pair)
            return None
        allocation = self._calls.setdefault(call_id, _Allocation())
        allocation.pairs += pairs
        return [p.port for p in pairs]

    def release(self, call_id: str) -> None:
        """Stop reading and close every socket of ``call_id`` (no-op for an unknown call)."""
        allocation = self._calls.pop(call_id, None)
        if allocation is None:
            return
        for pair in allocation.pairs:
            self._close(pair)

    # -- reading -------------------------------------------------------------------------------

    def listen(self, port: int, reader: Reader) -> None:
        """Call ``reader(sock)`` on the loop whenever RTP port ``port`` is readable.

        The reader must read with ``sock.recvfrom`` until ``BlockingIOError``. Raises KeyError
        for a port that is not allocated. Listening again replaces the reader.
        """
        pair = self._by_port[port]
        self._loop.add_reader(pair.rtp.fileno(), reader, pair.rtp)
        if not pair.listening:
            self._loop.add_reader(pair.rtcp.fileno(), _drain_rtcp, pair.rtcp)
        pair.listening = True

    def unlisten(self, port: int) -> None:
        """Stop reading ``port`` (its sockets stay bound until the call is released)."""
        pair = self._by_port.get(port)
        if pair is None or not pair.listening:
            return
        self._loop.remove_reader(pair.rtp.fileno())
        self._loop.remove_reader(pair.rtcp.fileno())
        pair.listening = False

    def close(self) -> None:
        """Release every call (shutdown)."""
        for call_id in list(self._calls):
            self.release(call_id)

    # -- internals -----------------------------------------------------------------------------

    def _bind(self, port: int) -> _Pair | None:
        socks: list[socket.socket] = []
        try:
            for p in (port, port + 1):
                sock = socket.socket(self._family, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.setblocking(False)
                sock.bind((self.host, p))
        except OSError:
            for sock in socks:
                sock.close()
            return None
        return _Pair(port, socks[0], socks[1])

    def _close(self, pair: _Pair) -> None:
        self.unlisten(pair.port)
        self._by_port.pop(pair.port, None)
        for sock in (pair.rtp, pair.rtcp):
            with contextlib.suppress(OSError):
                sock.close()
