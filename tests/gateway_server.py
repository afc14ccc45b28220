"""Test helpers: a real `gateway serve` application on a loopback port, and raw Twilio messages."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import REGISTRY, drain, make_app
from gateway.calls.registry import CallRegistry
from gateway.config import Settings
from gateway.ingress.twilio_signature import compute_signature
from gateway.stt.engines import EngineSet
from gateway.stt.scripted import ScriptedEngine, parse_script
from gateway.stt.session import SttEngine

TOKEN = "test-auth-token-0123456789abcdef"


async def poll_until(condition: Callable[[], bool], within_s: float = 20.0) -> None:
    """Wait until ``condition()`` holds; TimeoutError after ``within_s``."""
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"condition not met within {within_s} s")


@dataclass
class Gateway:
    app: web.Application
    port: int
    data_dir: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str = "/twilio/stream") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def registry(self) -> CallRegistry:
        return self.app[REGISTRY]

    async def idle(self, within_s: float = 20.0) -> None:
        """Wait until no call is active (every finished call stored)."""
        await poll_until(lambda: self.registry.active_count == 0, within_s)

    async def transcript(self, call_sid: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.http}/v1/calls/{call_sid}/transcript") as resp,
        ):
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data

    def stored(self, call_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.data_dir / "transcripts" / f"{call_id}.json").read_text()
        )
        return data

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{self.http}/metrics") as resp:
            return await resp.text()


def settings_for(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings with the data dir in ``data_dir``, a Twilio auth token, and section overrides."""
    merged: dict[str, dict[str, Any]] = {
        "server": {"data_dir": str(data_dir), "drain_timeout_s": 5.0},
        "twilio": {"auth_token": TOKEN, "redirect_grace_s": 0.0},
        "telnyx": {"allow_unsigned": True, "redirect_grace_s": 0.0},
        "signalwire": {"allow_unsigned": True, "redirect_grace_s": 0.0},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return Settings(**merged)  # type: ignore[arg-type]


def hello_engine() -> ScriptedEngine:
    """Each channel says "hello there" at 0.1-0.8 s of its audio, then "goodbye" at 1.2-1.5 s."""
    return ScriptedEngine(
        parse_script([[["hello", 100, 400], ["there", 500, 800]], [["goodbye", 1200, 1500]]]),
        final_delay_ms=200,
    )


@asynccontextmanager
async def running_gateway(
    settings: Settings, engine: SttEngine | None = None
) -> AsyncIterator[Gateway]:
    """`gateway serve`'s app on 127.0.0.1 (any free port); drained and cleaned up on exit."""
    engines = EngineSet(settings, preset={"local": engine}) if engine is not None else None
    app = make_app(settings, engines=engines)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Gateway(app, port, Path(settings.server.data_dir))
    finally:
        await drain(app)
        await runner.cleanup()


# -- raw Twilio messages -------------------------------------------------------------------------


def connected() -> str:
    return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start(
    call_sid: str,
    *,
    stream_sid: str = "MZ00000000000000000000000000000001",
    tracks: Sequence[str] = ("inbound", "outbound"),
    encoding: str = "audio/x-mulaw",
    rate: int = 8000,
    params: dict[str, str] | None = None,
) -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": "AC00000000000000000000000000000000",
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": list(tracks),
                "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
                "customParameters": params or {},
            },
            "streamSid": stream_sid,
        }
    )


def media(track: str, ts_ms: int, payload: bytes = b"\xff" * 160, seq: int = 2) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "media": {
                "track": track,
                "chunk": str(seq),
                "timestamp": str(ts_ms),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": "MZ00000000000000000000000000000001",
        }
    )


def stop(call_sid: str) -> str:
    return json.dumps(
        {
            "event": "stop",
            "sequenceNumber": "9999",
            "stop": {"accountSid": "AC00000000000000000000000000000000", "callSid": call_sid},
            "streamSid": "MZ00000000000000000000000000000001",
        }
    )


def call_messages(call_sid: str, seconds: float = 2.0, **start_args: Any) -> list[str]:
    """A whole both-tracks µ-law call of ``seconds`` of silence, as Twilio would send it."""
    out = [connected(), start(call_sid, **start_args)]
    for i in range(int(seconds * 50)):
        out.append(media("outbound", i * 20, seq=2 * i + 2))
        out.append(media("inbound", i * 20, seq=2 * i + 3))
    out.append(stop(call_sid))
    return out


@dataclass
class Closed:
    code: int | None
    reason: str
    status: int | None = None  # HTTP status when the upgrade was refused


async def send_messages(
    url: str,
    messages: Sequence[str | bytes],
    *,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    interval_s: float = 0.0,
) -> Closed:
    """Open a stream (signed with ``token``), send ``messages``, report how it closed."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs.setdefault("X-Twilio-Signature", compute_signature(token, url))
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, headers=hdrs, autoclose=False)
        except aiohttp.WSServerHandshakeError as exc:
            return Closed(None, exc.message, exc.status)
        for i, msg in enumerate(messages):
            if ws.closed:
                break
            try:
                if isinstance(msg, bytes):
                    await ws.send_bytes(msg)
                else:
                    await ws.send_str(msg)
            except (ConnectionResetError, aiohttp.ClientConnectionError):
                break
            if interval_s:
                await asyncio.sleep(interval_s)
            elif i % 50 == 49:
                await asyncio.sleep(0)
        reply = await ws.receive(timeout=30)
        if reply.type is aiohttp.WSMsgType.CLOSE:
            code, reason = reply.data, reply.extra or ""
            await ws.close()
        else:
            await ws.close()
            code, reason = ws.close_code, ""
        return Closed(code, reason)


# -- AudioHook and stereo PCM WebSockets ---------------------------------------------------------

AUDIOHOOK_KEY = "audiohook-test-api-key"
AUDIOHOOK_SECRET = "c2VjcmV0LWZvci1hdWRpb2hvb2stdGVzdHMtMDEyMzQ1"  # base64
STEREO_SECRET = "stereo-shared-secret"


async def expect_replaced(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The gateway closes ``ws`` because a newer stream of its call took over (1000, replaced)."""
    closing = await ws.receive(timeout=10)
    assert (closing.type, closing.data, closing.extra) == (
        aiohttp.WSMsgType.CLOSE,
        1000,
        "replaced",
    )


def ingress_settings_for(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """:func:`settings_for` plus an AudioHook key with a client secret and a stereo-WS shared
    secret; calls end as soon as their stream does (no reconnect grace)."""
    merged: dict[str, dict[str, Any]] = {
        "audiohook": {
            "api_keys": [f"{AUDIOHOOK_KEY}:{AUDIOHOOK_SECRET}"],
            "reconnect_grace_s": 0.0,
            "close_timeout_s": 5.0,
        },
        "stereo_ws": {"shared_secret": STEREO_SECRET},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return settings_for(data_dir, **merged)


def silent_call(seconds: float, rate: int = 8000) -> Any:
    """A two-channel CallAudio of silence (the scripted engine hears words anyway)."""
    from gateway.simulate.twilio import CallAudio

    pcm = b"\x00\x00" * int(seconds * rate)
    return CallAudio(rate, pcm, pcm)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def by_role(doc: dict[str, Any]) -> dict[str, str]:
    """Each role's words in a transcript document, in order."""
    out: dict[str, list[str]] = {}
    for u in doc["utterances"]:
        out.setdefault(u["role"], []).append(u["text"])
    return {role: " ".join(texts) for role, texts in out.items()}
