"""Benchmark: N live SSE subscribers on one busy call.

Processes: `gateway stt-server --engine scripted` (a turn every ~0.6 s per channel), one
`gateway serve` using it as its AssemblyAI engine, and this process, which streams one Twilio call
at real time with the simulator and holds N Server-Sent-Events subscribers on that call.

Each event carries ``time``, the wall-clock moment the gateway produced it (for a final: when it
left the merger). For every ``turn.final`` each subscriber receives, the delay is its arrival time
minus that ``time``: the store commit, the publish, the socket and the client's parsing, end to
end. Target: p99 under 20 ms with 200 subscribers.

    .venv/bin/python bench/live_subscribers.py [--subscribers 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.simulate.twilio import (  # noqa: E402
    CallAudio,
    SimulationOptions,
    new_call_sid,
    simulate_call,
)

TOKEN = "bench-live-subscribers"


def script(seconds: int) -> list[list[list[object]]]:
    """Short turns back to back: a final every ~600 ms per channel (a busy call)."""
    turns = []
    for i in range(int(seconds / 0.6)):
        t = int(i * 600)
        turns.append([["busy", t + 50, t + 200], ["call", t + 220, t + 350]])
    return turns


async def _start(*cmd: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode()
    return proc, line


class _Subscriber(asyncio.Protocol):
    """A minimal SSE client on a raw socket: the measuring instrument must cost far less than
    what it measures (aiohttp's client spends ~70 µs per chunk, which with 200 subscribers in one
    process would itself add ~15 ms to the last one's delay)."""

    def __init__(self, request: bytes, delays: list[float], counts: list[int]) -> None:
        self.request = request
        self.delays = delays
        self.counts = counts
        self.buffer = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        # Chunk-size lines and headers never contain "\n\n"+"event:", so scanning for whole
        # SSE messages in the raw (chunked) stream is enough for the two fields we read.
        while True:
            at = self.buffer.find(b"event: ")
            if at < 0:
                break
            end = self.buffer.find(b"\n\n", at)
            if end < 0:
                break
            block = self.buffer[at:end]
            self.buffer = self.buffer[end + 2 :]
            self.counts[0] += 1
            if block.startswith(b"event: turn.final\n"):
                t = block.index(b'"time":') + 7
                self.delays.append((now - float(block[t : block.index(b",", t)])) * 1000)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def subscriber(
    port: int, path: str, delays: list[float], counts: list[int], ready: asyncio.Event
) -> None:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: _Subscriber(request, delays, counts), "127.0.0.1", port
    )
    ready.set()
    await proto.done


async def run(args: argparse.Namespace) -> dict[str, object]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base_env["GATEWAY_LOGGING__LEVEL"] = "warning"
    with tempfile.TemporaryDirectory() as tmp:
        script_path = Path(tmp) / "script.json"
        script_path.write_text(json.dumps(script(args.seconds)))
        stt, line = await _start(
            sys.executable, "-m", "gateway", "stt-server", "--engine", "scripted",
            "--script", str(script_path), "--port", "0", env=base_env,
        )  # fmt: skip
        stt_url = line.strip().rsplit(" ", 1)[-1]
        env = {
            **base_env,
            "GATEWAY_STT__ENGINE": "assemblyai",
            "GATEWAY_STT__ASSEMBLYAI__URL": stt_url,
            "GATEWAY_SERVER__DATA_DIR": tmp,
            "GATEWAY_TWILIO__AUTH_TOKEN": TOKEN,
            "GATEWAY_API__TOKENS": json.dumps([TOKEN]),
            "GATEWAY_LIVE__QUEUE_LIMIT": "100000",
        }
        gw, banner = await _start(
            sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", "0",
            env=env,
        )  # fmt: skip
        try:
            m = re.search(r":(\d+)\s*$", banner.strip())
            assert m, banner
            port = int(m.group(1))
            http = f"http://127.0.0.1:{port}"
            seconds = args.seconds
            # Silence is enough: the scripted recognizer counts audio time, not content.
            audio = CallAudio(8000, b"\0\0" * 8000 * seconds, b"\0\0" * 8000 * seconds)
            sid = new_call_sid()
            call = asyncio.create_task(
                simulate_call(
                    f"ws://127.0.0.1:{port}/twilio/stream",
                    audio,
                    SimulationOptions(call_sid=sid),
                    auth_token=TOKEN,
                )
            )
            call_id = None
            async with aiohttp.ClientSession() as s:
                for _ in range(500):
                    async with s.get(
                        f"{http}/v1/calls/{sid}", headers={"Authorization": f"Bearer {TOKEN}"}
                    ) as resp:
                        if resp.status == 200:
                            call_id = (await resp.json())["id"]
                            break
                    await asyncio.sleep(0.01)
            assert call_id, "the call did not start"
            delays: list[float] = []
            counts = [0]
            readies = [asyncio.Event() for _ in range(args.subscribers)]
            path = f"/v1/calls/{call_id}/events"
            subs = [asyncio.create_task(subscriber(port, path, delays, counts, r)) for r in readies]
            await asyncio.gather(*(r.wait() for r in readies))
            result = await call
            await asyncio.wait_for(asyncio.gather(*subs), 30)
        finally:
            for proc in (gw, stt):
                proc.terminate()
                await proc.wait()
    delays.sort()

    def pct(p: float) -> float:
        return round(delays[min(len(delays) - 1, int(p * len(delays)))], 2) if delays else -1.0

    return {
        "subscribers": args.subscribers,
        "call_seconds": args.seconds,
        "call_completed": result.completed,
        "events_received": counts[0],
        "finals_received": len(delays),
        "finals_per_subscriber": len(delays) / args.subscribers,
        "final_delay_ms_p50": pct(0.50),
        "final_delay_ms_p99": pct(0.99),
        "final_delay_ms_max": round(delays[-1], 2) if delays else -1.0,
        "final_delay_ms_mean": round(statistics.fmean(delays), 2) if delays else -1.0,
        "target_p99_ms": 20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
