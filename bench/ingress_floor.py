"""Benchmark: the CPU floor of *receiving* call media in one Python process, before any work.

The capacity targets (500 Twilio calls, 300 SIPREC calls, 300 stereo streams on one core) are
bounded below by what it costs just to take the messages off the sockets. This measures that
floor with the gateway's own stack and nothing else:

* ``ws``: an aiohttp WebSocket server on uvloop (``gateway serve``'s stack) whose handler only
  counts messages, fed Twilio-shaped ``media`` JSON text messages (~370 bytes), 50 per second per
  track (``--tracks 2``: Twilio ``both_tracks``, 100 messages per call-second) or binary 20 ms
  stereo L16 frames (``--binary``: a stereo PCM WebSocket, 50 per call-second);
* ``rtp``: UDP sockets read with ``loop.add_reader`` and a ``recvfrom`` loop (the SIPREC
  receiver's shape) that only counts datagrams: 172-byte RTP packets, 50 per second per stream,
  two streams per call.

The receiver runs in a child process pinned to one core (``--core``, default 0); the sender, this
script, runs on the other cores and writes pre-built frames with plain socket calls, so it can
keep up with hundreds of calls. Over the window the receiver's CPU (utime + stime from /proc)
gives the cost per message and the share of its core that ``--calls`` calls take; scaled
linearly, the share at the target's call count. The gateway does all its real work (decode,
clock, STT, merger, events) on top of this.

    .venv/bin/python bench/ingress_floor.py [--kind ws|rtp] [--calls 200] [--seconds 20]
        [--tracks 2] [--binary] [--target 500]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from twilio_calls import cpu_s, pin, raise_nofile  # noqa: E402 - the shared harness

FRAME_S = 0.02


# -- the receiver (a child process) --------------------------------------------------------------


async def _receive_ws(port_file: Path) -> None:
    from aiohttp import WSMsgType, web

    counted = [0]

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 16)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                counted[0] += 1
        return ws

    async def count(request: web.Request) -> web.Response:
        return web.Response(text=str(counted[0]))

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    await asyncio.to_thread(port_file.write_text, str(runner.addresses[0][1]))
    await asyncio.Event().wait()


async def _receive_rtp(port_file: Path, sockets: int) -> None:
    loop = asyncio.get_running_loop()
    counted = [0]
    ports = []

    def readable(sock: socket.socket) -> None:
        for _ in range(64):  # as gateway/ingress/siprec/rtp_ports.py: MAX_READS per wake
            try:
                sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                break
            counted[0] += 1

    for _ in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), readable, sock)
        ports.append(sock.getsockname()[1])

    async def report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(f"{counted[0]}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(report, "127.0.0.1", 0)
    control = server.sockets[0].getsockname()[1]
    await asyncio.to_thread(port_file.write_text, json.dumps({"control": control, "ports": ports}))
    await asyncio.Event().wait()


def receiver_main(kind: str, port_file: Path, sockets: int) -> None:
    import uvloop

    coro = _receive_ws(port_file) if kind == "ws" else _receive_rtp(port_file, sockets)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# -- the sender (this process) -------------------------------------------------------------------


def _twilio_media(track: str, chunk: int) -> bytes:
    payload = base64.b64encode(bytes([0xFF]) * 160).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(chunk + 3),
            "media": {
                "track": track,
                "chunk": str(chunk + 1),
                "timestamp": str(chunk * 20),
                "payload": payload,
            },
            "streamSid": "MZ" + "0" * 32,
        }
    ).encode()


def _ws_frame(payload: bytes, *, binary: bool) -> bytes:
    """A masked client frame (the mask is fixed: the receiver's unmasking costs the same)."""
    head = bytes([0x82 if binary else 0x81])
    n = len(payload)
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    mask = b"\x11\x22\x33\x44"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _ws_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    if b" 101 " not in response.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"no WebSocket upgrade: {response[:80]!r}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _pace(
    frames: list[tuple[socket.socket, list[bytes], tuple[str, int] | None]], seconds: float
) -> int:
    """Every 20 ms, one frame per (socket, track); calls are spread across the 20 ms so the
    receiver sees a steady stream, as from calls that started at different times."""
    sent = 0
    start = time.monotonic()
    n = len(frames)
    tick = 0
    while time.monotonic() - start < seconds:
        base = start + tick * FRAME_S
        for i, (sock, per_track, addr) in enumerate(frames):
            due = base + FRAME_S * i / n
            delay = due - time.monotonic()
            if delay > 0.0005:
                time.sleep(delay)
            for frame in per_track:
                if addr is None:
                    sock.send(frame)
                else:
                    sock.sendto(frame, addr)
                sent += 1
        tick += 1
    return sent


def _rtp_packet(seq: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + bytes([0xFF]) * 160


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_receiver":
        receiver_main(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kind", choices=("ws", "rtp"), default="ws")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--tracks", type=int, default=2, help="messages per 20 ms per call")
    parser.add_argument("--binary", action="store_true", help="ws: 640-byte stereo L16 frames")
    parser.add_argument("--target", type=int, default=500, help="calls to scale the floor to")
    parser.add_argument("--core", type=int, default=0, help="the receiver's core")
    args = parser.parse_args()
    raise_nofile()
    available = os.sched_getaffinity(0)
    others = (available - {args.core}) or available
    os.sched_setaffinity(0, others)
    port_file = Path(f"/tmp/ingress-floor-{os.getpid()}.json")
    streams = args.calls * args.tracks
    proc = subprocess.Popen(
        [sys.executable, __file__, "_receiver", args.kind, str(port_file), str(streams)]
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the receiver did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        pin(proc.pid, {args.core})
        info = port_file.read_text()
        frames: list[tuple[socket.socket, list[bytes], tuple[str, int] | None]] = []
        if args.kind == "ws":
            port = int(info)
            if args.binary:
                payload = [_ws_frame(b"\x00" * 640, binary=True)]
            else:
                tracks = ("inbound", "outbound", "third", "fourth")[: args.tracks]
                payload = [_ws_frame(_twilio_media(t, 7), binary=False) for t in tracks]
            for _ in range(args.calls):
                frames.append((_ws_connect(port), payload, None))
            size = len(payload[0])

            def received() -> int:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/count") as resp:
                    return int(resp.read())
        else:
            ports = json.loads(info)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(True)
            for c in range(args.calls):
                for t in range(args.tracks):
                    addr = ("127.0.0.1", ports["ports"][c * args.tracks + t])
                    frames.append((sock, [_rtp_packet(7, c * 16 + t)], addr))
            size = len(frames[0][1][0])

            def received() -> int:
                with socket.create_connection(("127.0.0.1", ports["control"])) as control:
                    control.sendall(b"count\n")
                    return int(control.makefile().readline())

        _pace(frames, 3.0)  # warm-up
        got0, cpu0, t0 = received(), cpu_s(proc.pid), time.monotonic()
        sent = _pace(frames, args.seconds)
        time.sleep(0.3)
        got1, cpu1, t1 = received(), cpu_s(proc.pid), time.monotonic()
        wall = t1 - t0
        messages = got1 - got0
        cpu = cpu1 - cpu0
        per_call_s = messages / wall / args.calls
        us_per_message = cpu / messages * 1e6 if messages else float("nan")
        share = cpu / wall
        result = {
            "kind": args.kind + (" binary" if args.binary else ""),
            "calls": args.calls,
            "message_bytes": size,
            "messages_per_call_second": round(per_call_s, 1),
            "sent": sent,
            "received": messages,
            "receiver_core_percent": round(100 * share, 1),
            "cpu_us_per_message": round(us_per_message, 2),
            "target_calls": args.target,
            "floor_core_percent_at_target": round(100 * share * args.target / args.calls, 1),
        }
        print(json.dumps(result))
        return 0
    finally:
        proc.terminate()
        proc.wait(10)
        port_file.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
