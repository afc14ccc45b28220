"""Durability end to end: kill -9 mid-call and restart; webhooks across a gateway restart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.outputs.webhooks import verify
from gateway.simulate.twilio import CallAudio, SimulationOptions, new_call_sid, simulate_call
from tests.gateway_server import (
    TOKEN,
    call_messages,
    hello_engine,
    poll_until,
    running_gateway,
    send_messages,
    settings_for,
)

ROOT = Path(__file__).resolve().parent.parent


def _script(seconds: int) -> list[list[list[object]]]:
    return [
        [[f"turn{i}", i * 500 + 50, i * 500 + 200], ["done", i * 500 + 220, i * 500 + 300]]
        for i in range(seconds * 2)
    ]


async def _spawn(*args: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, (await proc.stdout.readline()).decode()


async def _serve(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int]:
    proc, banner = await _spawn("serve", "--host", "127.0.0.1", "--port", "0", env=env)
    match = re.search(r":(\d+)\s*$", banner.strip())
    assert match, banner
    return proc, int(match.group(1))


async def test_kill_9_mid_call_keeps_every_published_final(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(_script(20)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_LOGGING__LEVEL"] = "warning"
    stt, line = await _spawn(
        "stt-server", "--engine", "scripted", "--script", str(script), "--port", "0", env=env
    )
    env.update(
        GATEWAY_STT__ENGINE="assemblyai",
        GATEWAY_STT__ASSEMBLYAI__URL=line.strip().rsplit(" ", 1)[-1],
        GATEWAY_SERVER__DATA_DIR=str(tmp_path / "data"),
        GATEWAY_TWILIO__AUTH_TOKEN=TOKEN,
    )
    gw, port = await _serve(env)
    try:
        sid = new_call_sid()
        audio = CallAudio(8000, b"\0\0" * 8000 * 20, b"\0\0" * 8000 * 20)
        call = asyncio.create_task(
            simulate_call(
                f"ws://127.0.0.1:{port}/twilio/stream",
                audio,
                SimulationOptions(call_sid=sid),
                auth_token=TOKEN,
            )
        )
        http = f"http://127.0.0.1:{port}"
        summary: dict[str, Any] = {}
        async with aiohttp.ClientSession() as s:

            async def started() -> bool:
                async with s.get(f"{http}/v1/calls/{sid}") as resp:
                    if resp.status == 200:
                        summary.update(await resp.json())
                return bool(summary)

            for _ in range(300):
                if await started():
                    break
                await asyncio.sleep(0.02)
            # Every final seen live was committed first (persist before publish).
            seen: list[dict[str, Any]] = []
            async with s.get(f"{http}/v1/calls/{summary['id']}/events") as resp:
                buffer = ""
                async for raw in resp.content.iter_any():
                    buffer += raw.decode()
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        for ln in block.splitlines():
                            if ln.startswith("data: "):
                                event = json.loads(ln[6:])
                                if event["type"] == "turn.final":
                                    seen.append(event)
                    if len(seen) >= 8:
                        break
        gw.send_signal(signal.SIGKILL)
        await gw.wait()
        result = await call
        assert not result.completed
    finally:
        if gw.returncode is None:
            gw.kill()
            await gw.wait()

    gw, port = await _serve(env)
    try:
        http = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{http}/v1/calls/{sid}") as resp:
                assert resp.status == 200
                after = await resp.json()
            async with s.get(f"{http}/v1/calls/{sid}/transcript") as resp:
                assert resp.status == 200
                doc = await resp.json()
            async with s.get(f"{http}/v1/calls?state=interrupted") as resp:
                listed = await resp.json()
        assert after["state"] == "interrupted"
        assert [c["id"] for c in listed["calls"]] == [summary["id"]]
        stored = {(u["channel"], u["start"], u["text"]) for u in doc["utterances"]}
        for final in seen:
            data = final["data"]
            assert (data["channel"], data["start"], data["text"]) in stored
    finally:
        gw.send_signal(signal.SIGTERM)
        assert await gw.wait() == 0
        stt.terminate()
        await stt.wait()


async def test_webhook_is_delivered_once_across_a_gateway_restart(tmp_path: Path) -> None:
    secret = "whsec-test-0123456789"
    received: list[tuple[int, str, bytes]] = []
    statuses = [500, 500, 200]

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        assert verify(secret, request.headers["X-Callgate-Signature"], body)
        status = statuses.pop(0) if statuses else 200
        received.append((status, request.headers["X-Callgate-Delivery"], body))
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    webhooks = {
        "urls": [url],
        "secret": secret,
        "backoff_initial_s": 1.0,
        "backoff_max_s": 1.0,
    }
    try:
        settings = settings_for(tmp_path, webhooks=webhooks)
        async with running_gateway(settings, hello_engine()) as gw:
            await send_messages(gw.ws(), call_messages("CAHOOK", 1.0))
            await gw.idle()
            await poll_until(lambda: len(received) >= 1, 10)
        # The gateway is down between attempts; a new one on the same data dir goes on.
        assert len(received) == 1
        async with running_gateway(settings, hello_engine()):
            await poll_until(lambda: len(received) >= 3, 20)
            await asyncio.sleep(0.5)
        assert [status for status, _, _ in received] == [500, 500, 200]
        assert len({delivery for _, delivery, _ in received}) == 1  # one delivery, retried
        body = json.loads(received[-1][2])
        assert body["type"] == "call.ended"
        assert body["data"]["source_ids"]["callSid"] == "CAHOOK"
        texts = " ".join(u["text"] for u in body["transcript"]["utterances"])
        assert "hello there" in texts
    finally:
        await runner.cleanup()
