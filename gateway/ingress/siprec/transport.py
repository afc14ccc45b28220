"""SIP transports of the Session Recording Server: UDP, TCP and TLS listeners (asyncio shell).

:class:`SipTransports` owns the listening sockets and the connections, parses what arrives with
:class:`~gateway.ingress.siprec.message.SipParser` and hands every result, in arrival order, to
one synchronous ``handler(message_or_error, (ip, port), transport)``; :meth:`SipTransports.send`
writes the bytes the core produced back out. Contract:

- UDP: one parser for the socket, one datagram is one message (``feed_datagram``); keep-alive
  datagrams (blank) are ignored.
- TCP/TLS: one parser per connection (``feed``); after a :class:`ParseError` with ``fatal`` the
  handler has answered it and the connection is closed (the framing is lost). Connections are
  kept by peer address so answers go back on the connection the request came in on; a send to a
  connection that is gone is dropped (returns False). A peer that does not read (more than
  ``MAX_WRITE_BUFFER`` queued) is disconnected. At most ``max_connections`` are open at once
  (a connection beyond that is closed at once); one that sends nothing, not even a keep-alive,
  for ``idle_timeout_s`` is closed (an SBC reopens one when it next has something to send).
  Each refusal or idle close calls ``on_closed(reason)``: ``too_many_connections``,
  ``idle_timeout``.
- :meth:`SipTransports.close` closes the listeners, cancels and awaits every connection task and
  closes every connection. The handler never runs after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import typing
from collections.abc import Callable

from gateway.ingress.siprec.message import ParseError, ParseResult, SipParser
from gateway.observability.logging import get_logger

__all__ = ["Address", "MessageHandler", "SipTransports", "tls_client_context", "tls_context"]

log = get_logger("gateway.siprec")

Address = tuple[str, int]
MessageHandler = Callable[[ParseResult, Address, str], None]
MAX_WRITE_BUFFER = 1 << 20
READ_BYTES = 65536
CLOSE_WAIT_S = 2.0  # connections still open this long after close() are cancelled
CONNECT_TIMEOUT_S = 5.0  # a new connection for a request whose dialog connection is gone


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from PEM files (blocking file reads: call it in a thread)."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key)


def tls_client_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """The context for TLS connections the SRS opens itself: the peer's certificate must chain
    to ``ca`` (PEM file; empty: the system's trust store) and name the host connected to; our
    own certificate is offered for peers that ask for one (mutual TLS, common between SBCs).
    Blocking file reads: call it in a thread."""
    return _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)


def _context(purpose: ssl.Purpose, cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    context = ssl.create_default_context(purpose, cafile=ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransports) -> None:
        self.owner = owner
        self.parser = SipParser(max_body_bytes=owner.max_body_bytes)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        result = self.parser.feed_datagram(data)
        if result is not None and not self.owner.closed:
            self.owner.deliver(result, (str(addr[0]), int(str(addr[1]))), "udp")

    def error_received(self, exc: Exception) -> None:
        log.debug("siprec.udp_error", error=repr(exc))


class SipTransports:
    """The SRS's SIP listeners and connections (see the module docstring)."""

    def __init__(
        self,
        handler: MessageHandler,
        *,
        max_body_bytes: int = 64 * 1024,
        max_connections: int = 1024,
        idle_timeout_s: float = 0.0,
        on_closed: Callable[[str], None] | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        """``handler`` gets every parsed message or parse error (synchronously, on the loop).
        ``idle_timeout_s`` 0: connections may stay idle forever. ``client_tls``: the context
        for TLS connections we open (None: requests whose TLS connection is gone are dropped)."""
        self.handler = handler
        self.client_tls = client_tls
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._on_closed = on_closed
        self.ports: dict[str, int] = {}
        self.closed = False
        self._udp: asyncio.DatagramTransport | None = None
        self._servers: list[asyncio.Server] = []
        self._writers: dict[tuple[str, Address], asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def deliver(self, result: ParseResult, source: Address, transport: str) -> None:
        """Hand one result to the handler; an exception there is logged, never propagated."""
        try:
            self.handler(result, source, transport)
        except Exception as exc:  # noqa: BLE001 - one bad message must not kill a listener
            log.error("siprec.handler_failed", transport=transport, error=repr(exc))

    # -- listeners -----------------------------------------------------------------------------

    async def start_udp(self, host: str, port: int) -> int:
        """Listen for SIP over UDP; returns the bound port."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port)
        )
        self._udp = transport
        bound = int(transport.get_extra_info("sockname")[1])
        self.ports["udp"] = bound
        return bound

    async def start_stream(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen for SIP over TCP, or TLS with ``tls``; returns the bound port."""
        name = "tls" if tls is not None else "tcp"

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._connection(reader, writer, name)

        server = await asyncio.start_server(serve, host, port, ssl=tls, reuse_address=True)
        self._servers.append(server)
        bound = int(server.sockets[0].getsockname()[1])
        self.ports[name] = bound
        return bound

    # -- sending -------------------------------------------------------------------------------

    def send(
        self, data: bytes, destination: Address, transport: str, target: Address | None = None
    ) -> bool:
        """Write ``data`` to ``destination`` over ``transport``; False if that is impossible.

        Over TCP or TLS, when the connection to ``destination`` is gone and ``target`` is given
        (a request we originate), a new connection to ``target`` carries it (RFC 3261 18.1.1;
        over TLS verified with ``client_tls``); its responses are read like any connection's.
        """
        if self.closed:
            return False
        if transport == "udp":
            if self._udp is None or self._udp.is_closing():
                return False
            self._udp.sendto(data, destination)
            return True
        writer = self._writers.get((transport, destination))
        if writer is None or writer.is_closing():
            can_open = transport == "tcp" or (transport == "tls" and self.client_tls is not None)
            if can_open and target is not None:
                task = asyncio.get_running_loop().create_task(
                    self._connect(data, target, transport)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return True
            log.debug("siprec.no_connection", transport=transport, remote=destination[0])
            return False
        writer.write(data)
        if writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("siprec.slow_peer", transport=transport, remote=destination[0])
            writer.close()
        return True

    # -- connections ---------------------------------------------------------------------------

    async def _connect(self, data: bytes, target: Address, transport: str) -> None:
        """Open a TCP (or TLS) connection to ``target``, send ``data``, then serve it as any
        other. A TLS peer whose certificate does not verify gets nothing."""
        tls = self.client_tls if transport == "tls" else None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    target[0], target[1], ssl=tls, server_hostname=target[0] if tls else None
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            log.warning(
                "siprec.connect_failed", transport=transport, remote=target[0], error=repr(exc)
            )
            return
        writer.write(data)
        await self._connection(reader, writer, transport)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.closed:
            writer.close()
            return
        peer = writer.get_extra_info("peername")
        source: Address = (str(peer[0]), int(peer[1]))
        if len(self._writers) >= self.max_connections:
            log.warning("siprec.too_many_connections", transport=name, limit=self.max_connections)
            self._closed_because("too_many_connections")
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self._tasks.add(task)
        key = (name, source)
        self._writers[key] = writer
        parser = SipParser(max_body_bytes=self.max_body_bytes)
        try:
            idle = self.idle_timeout_s or None
            while not self.closed:
                try:
                    async with asyncio.timeout(idle):
                        data = await reader.read(READ_BYTES)
                except TimeoutError:
                    log.info("siprec.idle_connection_closed", transport=name, idle_s=idle)
                    self._closed_because("idle_timeout")
                    break
                if not data:
                    break
                fatal = False
                pings = parser.pings
                results = parser.feed(data)
                if parser.pings > pings:
                    writer.write(b"\r\n" * (parser.pings - pings))  # RFC 5626 4.4.1 pong
                for result in results:
                    if self.closed:
                        break
                    self.deliver(result, source, name)
                    if isinstance(result, ParseError) and result.fatal:
                        fatal = True
                        break
                if fatal:
                    with contextlib.suppress(ConnectionError, ssl.SSLError):
                        await writer.drain()
                    break
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("siprec.connection_error", transport=name, error=repr(exc))
        finally:
            if self._writers.get(key) is writer:
                del self._writers[key]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    def _closed_because(self, reason: str) -> None:
        if self._on_closed is not None:
            self._on_closed(reason)

    async def close(self) -> None:
        """Close listeners and connections; cancel and await every connection task."""
        self.closed = True
        if self._udp is not None:
            self._udp.close()
        for server in self._servers:
            server.close()
        for writer in list(self._writers.values()):
            writer.close()  # the connection's read sees EOF and its task ends by itself
        tasks = list(self._tasks)
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
            for task in stuck:
                task.cancel()
            for task in stuck:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
