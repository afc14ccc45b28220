"""Interop: the official AssemblyAI Python SDK, and our own client, against `gateway stt-server`.

The SDK's asyncio v3 client streams a corpus call channel to our v3 server (local engine) and must
see Begin, Turns with words, and Termination; its final turns must equal what the local engine
produces directly for the same audio.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from assemblyai.streaming.v3 import (
    AsyncRealTimeTranscriber,
    RealTimeEvents,
    RealTimeParameters,
    RealTimeTranscriberOptions,
)

from gateway.media.codec import Codec
from gateway.stt.local import LocalEngine
from gateway.stt.session import SessionParams
from gateway.stt.v3_server import V3Server, V3ServerOptions
from gateway.transcript.model import TurnUpdate
from tests.conftest import channel_audio

RATE = 8000


@asynccontextmanager
async def v3_server(engine: LocalEngine, **options: object) -> AsyncIterator[tuple[int, V3Server]]:
    server = V3Server(engine, V3ServerOptions(**options))  # type: ignore[arg-type]
    app = web.Application()
    app.add_routes(server.routes())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], server
    finally:
        await server.close()
        await runner.cleanup()


async def direct_finals(engine: LocalEngine, audio: bytes) -> list[tuple[str, int, int]]:
    session = engine.open_session(SessionParams(0, Codec.L16, RATE, 0, partials=False))
    finals: list[tuple[str, int, int]] = []

    async def read() -> None:
        async for event in session.events():
            if isinstance(event, TurnUpdate) and event.final and event.text:
                finals.append((event.text, event.start_ms, event.end_ms))

    reader = asyncio.create_task(read())
    for i in range(0, len(audio), 1600):
        await session.send(audio[i : i + 1600])
    await session.finish()
    await reader
    return finals


@pytest.mark.slow
async def test_official_sdk_streams_to_our_server(local_engine: LocalEngine) -> None:
    # 11 s of composed_library channel 1: two read turns.
    audio = channel_audio("composed_library", 1, 0.0, 11.0)
    expected = await direct_finals(local_engine, audio)
    assert len(expected) >= 1

    seen: dict[str, list[object]] = {"begin": [], "turn": [], "termination": [], "error": []}
    async with v3_server(local_engine, api_keys=frozenset({"sdk-key"})) as (port, _server):
        client = AsyncRealTimeTranscriber(
            RealTimeTranscriberOptions(
                api_host=f"ws://127.0.0.1:{port}", api_key="sdk-key", connect_timeout=5.0
            )
        )
        client.on(RealTimeEvents.Begin, lambda _c, e: seen["begin"].append(e))
        client.on(RealTimeEvents.Turn, lambda _c, e: seen["turn"].append(e))
        client.on(RealTimeEvents.Termination, lambda _c, e: seen["termination"].append(e))
        client.on(RealTimeEvents.Error, lambda _c, e: seen["error"].append(e))
        await client.connect(
            RealTimeParameters(
                sample_rate=RATE,
                encoding="pcm_s16le",
                speech_model="universal-streaming-english",
                format_turns=True,
            )
        )
        chunk = 1600  # 100 ms at 8 kHz, 16-bit
        for i in range(0, len(audio), chunk):
            await client.stream(audio[i : i + chunk])
            await asyncio.sleep(0.1)  # real time, as the protocol requires
        await client.disconnect(terminate=True)

    assert seen["error"] == []
    assert len(seen["begin"]) == 1 and len(seen["termination"]) == 1
    turns = seen["turn"]
    assert turns and all(t.words for t in turns)  # type: ignore[attr-defined]
    finals = [t for t in turns if t.end_of_turn]  # type: ignore[attr-defined]
    got = [(t.transcript, t.words[0].start, t.words[-1].end) for t in finals]  # type: ignore[attr-defined]
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, gs, ge), (_, es, ee) in zip(got, expected, strict=True):
        assert abs(gs - es) <= 20 and abs(ge - ee) <= 20
    assert seen["termination"][0].audio_duration_seconds == 11  # type: ignore[attr-defined]


async def test_sdk_with_a_wrong_key_gets_1008(local_engine: LocalEngine) -> None:
    errors: list[object] = []
    async with v3_server(local_engine, api_keys=frozenset({"right"})) as (port, server):
        client = AsyncRealTimeTranscriber(
            RealTimeTranscriberOptions(api_host=f"ws://127.0.0.1:{port}", api_key="wrong")
        )
        client.on(RealTimeEvents.Error, lambda _c, e: errors.append(e))
        await client.connect(RealTimeParameters(sample_rate=RATE, encoding="pcm_s16le"))
        for _ in range(50):
            if errors:
                break
            await asyncio.sleep(0.05)
        await client.disconnect()
    assert errors and "Invalid API key" in str(errors[0])
    assert server.stats.closes.get(1008) == 1


async def test_sdk_chunk_rule_violation_gets_3007(local_engine: LocalEngine) -> None:
    errors: list[object] = []
    async with v3_server(local_engine) as (port, server):
        client = AsyncRealTimeTranscriber(
            RealTimeTranscriberOptions(api_host=f"ws://127.0.0.1:{port}", api_key="any")
        )
        client.on(RealTimeEvents.Error, lambda _c, e: errors.append(e))
        await client.connect(RealTimeParameters(sample_rate=RATE, encoding="pcm_s16le"))
        await client.stream(b"\0\0" * 160)  # 20 ms: a raw telephony frame, too short
        for _ in range(50):
            if errors:
                break
            await asyncio.sleep(0.05)
        await client.disconnect()
    assert errors and "Input duration violation: 20.0 ms" in str(errors[0])
    assert server.stats.closes.get(3007) == 1
