"""The v3 server's documented behaviour, driven by a raw WebSocket client (websockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import websockets
from aiohttp import web
from websockets.exceptions import ConnectionClosed

from gateway.stt.scripted import ScriptedEngine, parse_script
from gateway.stt.v3_server import V3Server, V3ServerOptions, make_app

SCRIPT = parse_script([[["hello", 100, 300], ["world", 350, 600]], [["again", 2000, 2300]]])
CHUNK = b"\0\0" * 800  # 100 ms of 16-bit audio at 8 kHz
QUERY = "sample_rate=8000&encoding=pcm_s16le&speech_model=universal-streaming-english"


@asynccontextmanager
async def server(**options: object) -> AsyncIterator[tuple[str, V3Server]]:
    srv = V3Server(ScriptedEngine(SCRIPT), V3ServerOptions(**options))  # type: ignore[arg-type]
    runner = web.AppRunner(make_app(srv))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/v3/ws", srv
    finally:
        await runner.cleanup()


async def messages_until_close(ws: websockets.ClientConnection) -> list[dict[str, object]]:
    out = []
    try:
        while True:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    except ConnectionClosed:
        return out


async def test_begin_turns_terminate_termination_and_clean_close() -> None:
    async with server() as (url, _):
        async with websockets.connect(f"{url}?{QUERY}&format_turns=true") as ws:
            begin = json.loads(await ws.recv())
            assert begin["type"] == "Begin" and isinstance(begin["expires_at"], int)
            for _ in range(12):
                await ws.send(CHUNK)
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "Terminate"}))
            msgs = await messages_until_close(ws)
        assert ws.close_code == 1000
    turns = [m for m in msgs if m["type"] == "Turn"]
    finals = [m for m in turns if m["end_of_turn"]]
    assert [f["transcript"] for f in finals] == ["hello world"]
    assert all(w["word_is_final"] for w in finals[0]["words"])  # type: ignore[index]
    assert [w["start"] for w in finals[0]["words"]] == [100, 350]  # type: ignore[index]
    assert msgs[-1] == {
        "type": "Termination",
        "audio_duration_seconds": 1,
        "session_duration_seconds": 1,
    }


async def test_force_endpoint_ends_the_turn_with_the_words_so_far() -> None:
    async with server() as (url, _):
        async with websockets.connect(f"{url}?{QUERY}") as ws:
            await ws.recv()
            for _ in range(4):  # 400 ms: "hello" heard, "world" not yet
                await ws.send(CHUNK)
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "ForceEndpoint"}))
            await ws.send(json.dumps({"type": "UpdateConfiguration", "max_turn_silence": 900}))
            await ws.send(json.dumps({"type": "Terminate"}))
            msgs = await messages_until_close(ws)
    finals = [m["transcript"] for m in msgs if m.get("end_of_turn")]
    assert finals == ["hello"]


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (b"\0\0" * 160, 3007, "Input duration violation: 20.0 ms. Expected between 50 and 1000 ms"),
        ("not json", 3006, "Invalid JSON: not json"),
        ('{"type": "Dance"}', 3006, "Invalid Message Type"),
        ("[1, 2]", 3006, "Invalid Message"),
    ],
)
async def test_bad_client_frames_get_an_error_frame_and_the_documented_close(
    frame: bytes | str, code: int, reason: str
) -> None:
    async with server() as (url, srv):
        async with websockets.connect(f"{url}?{QUERY}") as ws:
            await ws.recv()
            await ws.send(frame)
            msgs = await messages_until_close(ws)
        assert ws.close_code == code
    assert msgs[-1]["type"] == "Error" and msgs[-1]["error_code"] == code
    assert str(msgs[-1]["error"]).startswith(reason)
    assert srv.stats.closes == {code: 1}


async def test_faster_than_real_time_is_refused_with_3007() -> None:
    async with server(realtime_allowance_s=0.5) as (url, _):
        async with websockets.connect(f"{url}?{QUERY}") as ws:
            await ws.recv()
            with pytest.raises(ConnectionClosed):
                for _ in range(50):  # 5 s of audio as fast as possible
                    await ws.send(CHUNK)
                await asyncio.wait_for(ws.recv(), 5)
                await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 3007
        assert "Audio Transmission Rate Exceeded" in (ws.close_reason or "")


async def test_auth_concurrency_expiry_and_inactivity() -> None:
    async with server(api_keys=frozenset({"k"})) as (url, _):
        async with websockets.connect(f"{url}?{QUERY}") as ws:
            await messages_until_close(ws)
        assert ws.close_code == 1008 and "Missing Authorization" in (ws.close_reason or "")
        async with websockets.connect(f"{url}?{QUERY}&token=k") as ws:
            assert json.loads(await ws.recv())["type"] == "Begin"  # a token in the query works
    async with server(max_sessions=1) as (url, _):
        async with websockets.connect(f"{url}?{QUERY}") as first:
            await first.recv()
            async with websockets.connect(f"{url}?{QUERY}") as second:
                await messages_until_close(second)
            assert second.close_code == 3009
    async with server(max_session_s=0.5) as (url, _):
        async with websockets.connect(f"{url}?{QUERY}") as ws:
            await ws.recv()
            msgs = await messages_until_close(ws)
        assert ws.close_code == 3008 and msgs[-1]["error_code"] == 3008
    async with server() as (url, _):
        async with websockets.connect(f"{url}?{QUERY}&inactivity_timeout=5") as ws:
            await ws.recv()
            await asyncio.sleep(3)
            await ws.send(json.dumps({"type": "KeepAlive"}))  # resets the timer
            await asyncio.sleep(3)
            assert ws.close_code is None
            msgs = await messages_until_close(ws)
        assert ws.close_code == 3006


async def test_bad_query_and_legacy_formatting() -> None:
    async with server() as (url, _):
        async with websockets.connect(f"{url}?sample_rate=abc") as ws:
            await messages_until_close(ws)
        assert ws.close_code == 3006
    async with server(legacy_formatting=True) as (url, _):
        async with websockets.connect(f"{url}?{QUERY}&format_turns=true") as ws:
            await ws.recv()
            for _ in range(10):
                await ws.send(CHUNK)
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "Terminate"}))
            msgs = await messages_until_close(ws)
    eot = [(m["turn_is_formatted"], m["transcript"]) for m in msgs if m.get("end_of_turn")]
    assert eot == [(False, "hello world"), (True, "hello world")]
