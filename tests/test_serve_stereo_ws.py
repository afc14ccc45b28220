"""`gateway serve` with stereo PCM WebSockets (jambonz listen / FreeSWITCH mod_audio_fork) over
real loopback sockets (scripted recognizer)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.simulate.stereo_ws import StereoWsOptions, simulate_stereo_ws
from tests.gateway_server import (
    STEREO_SECRET,
    by_role,
    expect_replaced,
    hello_engine,
    ingress_settings_for,
    metric,
    poll_until,
    running_gateway,
    silent_call,
)

PATH = "/stereo/ws"


def _options(**kwargs: Any) -> StereoWsOptions:
    base: dict[str, Any] = {"secret": STEREO_SECRET}
    base.update(kwargs)
    return StereoWsOptions(**base)


async def test_jambonz_stream_is_transcribed(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        result = await simulate_stereo_ws(
            gw.ws(PATH), silent_call(2.0), _options(speed=0, dtmf=((0.5, "7"),))
        )
        assert result.completed, result
        assert result.subprotocol == "audio.jambonz.org"
        await gw.idle()
        doc = await gw.transcript(result.call_sid)
        assert by_role(doc) == {"customer": "hello there goodbye", "agent": "hello there goodbye"}
        assert doc["source"] == "stereo_ws"
        assert doc["duration_ms"] == 2000
        assert doc["metadata"]["from"] == "+15555551234"
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_streams_total", source="stereo_ws") == 1


async def test_freeswitch_16k_basic_auth_and_subprotocol(tmp_path: Path) -> None:
    settings = ingress_settings_for(
        tmp_path, stereo_ws={"shared_secret": "", "username": "fs", "password": "pw-123"}
    )
    async with running_gateway(settings, hello_engine()) as gw:
        options = StereoWsOptions(
            speed=0,
            sample_rate=16000,
            subprotocol="audio.drachtio.org",
            username="fs",
            password="pw-123",
        )
        result = await simulate_stereo_ws(gw.ws(PATH), silent_call(1.0), options)
        assert result.completed, result
        assert result.subprotocol == "audio.drachtio.org"
        await gw.idle()
        doc = await gw.transcript(result.call_sid)
        assert doc["metadata"]["sampleRate"] == "16000"
        assert by_role(doc) == {"customer": "hello there", "agent": "hello there"}
        wrong = await simulate_stereo_ws(
            gw.ws(PATH), silent_call(1.0), StereoWsOptions(username="fs", password="nope")
        )
        assert wrong.rejected_status == 403


async def test_mono_stream_without_metadata_uses_the_query(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        url = gw.ws(PATH) + f"?mixType=mono&token={STEREO_SECRET}"
        options = StereoWsOptions(speed=0, mix_type="mono", send_metadata=False)
        result = await simulate_stereo_ws(url, silent_call(1.0), options)
        assert result.completed, result
        await gw.idle()
        (call,) = gw.registry.recent()
        assert [c.spec.role for c in call.channels.values()] == ["customer"]
        assert "token" not in str(call.metadata)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [({}, "missing_credentials"), ({"X-Callgate-Secret": "wrong"}, "bad_credentials")],
)
async def test_credentials_are_required(
    tmp_path: Path, headers: dict[str, str], reason: str
) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(gw.ws(PATH), headers=headers)
        assert exc.value.status == 403
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_streams_rejected_total", source="stereo_ws", reason=reason)


async def _raw(url: str, messages: list[str | bytes]) -> tuple[int | None, str]:
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(url, headers={"X-Callgate-Secret": STEREO_SECRET})
        for m in messages:
            if ws.closed:
                break
            try:
                if isinstance(m, str):
                    await ws.send_str(m)
                else:
                    await ws.send_bytes(m)
            except ConnectionError:
                break
        msg = await ws.receive(timeout=10)
        code, reason = (msg.data, msg.extra) if msg.type is aiohttp.WSMsgType.CLOSE else (None, "")
        await ws.close()
        return code, reason or ""


async def test_bad_input_closes_only_its_stream(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        good = asyncio.create_task(
            simulate_stereo_ws(gw.ws(PATH), silent_call(2.0), _options(speed=1))
        )
        cases = {
            "unsupported_format": (['{"sampleRate": 11025}'], 1003),
            "message_too_large": (["{}", "x" * 70_000], 1009),
            "bad_message": (["{}", '{"event": "dtmf", "dtmf": "??"}'], 1008),
            # Each metadata frame is a published, stored event: a flood is refused.
            "rate_exceeded": (["{}", *[json.dumps({"n": i}) for i in range(80)]], 1008),
        }
        for name, (messages, code) in cases.items():
            closed = await _raw(gw.ws(PATH), list(messages))
            assert closed[0] == code, (name, closed)
            assert closed[1].startswith(f"{name}: "), closed
        result = await good
        assert result.completed, result
        await gw.idle()
        doc = await gw.transcript(result.call_sid)
        assert by_role(doc) == {"customer": "hello there goodbye", "agent": "hello there goodbye"}
        metrics = await gw.metrics()
        for name in cases:
            value = metric(metrics, "callgate_stream_errors_total", source="stereo_ws", reason=name)
            assert value == 1, name


async def test_audio_still_in_the_batch_is_kept_when_the_stream_ends(tmp_path: Path) -> None:
    # The handler hands audio on in 100 ms batches; 1.06 s is not a whole number of them. The
    # rest must reach the call whether the peer closes or the stream is closed for bad input.
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        for sid, last in (("CACLOSED", None), ("CABAD", "x" * 70_000)):
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(
                    gw.ws(PATH), headers={"X-Callgate-Secret": STEREO_SECRET}
                )
                await ws.send_str(json.dumps({"sampleRate": 8000, "callSid": sid}))
                for _ in range(53):
                    await ws.send_bytes(b"\x00\x00" * 2 * 160)
                if last is not None:
                    await ws.send_str(last)
                    msg = await ws.receive()
                    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg
                await ws.close()
        await gw.idle()
        for sid in ("CACLOSED", "CABAD"):
            doc = await gw.transcript(sid)
            assert doc["duration_ms"] == 1060, sid


async def test_audio_far_faster_than_real_time_closes_the_stream(tmp_path: Path) -> None:
    # 4 s of stereo frames at once, against 1.5x real time plus a 1 s burst: rate_exceeded,
    # checked on the per-frame fast path of a started call.
    settings = ingress_settings_for(tmp_path, calls={"max_speed": 1.5, "burst_s": 1.0})
    async with running_gateway(settings, hello_engine()) as gw:
        frame = b"\x00\x00" * 2 * 160  # 20 ms of 8 kHz stereo L16
        code, reason = await _raw(gw.ws(PATH), ["{}", *[frame] * 200])
        assert code == 1008 and reason.startswith("rate_exceeded: "), (code, reason)
        await gw.idle()
        metrics = await gw.metrics()
        reasons = {"source": "stereo_ws", "reason": "rate_exceeded"}
        assert metric(metrics, "callgate_stream_errors_total", **reasons) == 1


async def test_cli_simulate_stereo_ws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import wave

    def write() -> Path:
        path = tmp_path / "call.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\x00" * 4 * 8000)
        return path

    wav = await asyncio.to_thread(write)
    monkeypatch.setenv("GATEWAY_STEREO_WS__SHARED_SECRET", STEREO_SECRET)
    async with running_gateway(ingress_settings_for(tmp_path / "gw"), hello_engine()) as gw:
        argv = ["simulate", "stereo-ws", str(wav), "--url", gw.ws(PATH), "--speed", "0"]
        argv += ["--subprotocol", "audio.drachtio.org"]
        assert await asyncio.to_thread(_cli, argv) == 0
        (line,) = [ln for ln in capsys.readouterr().out.splitlines() if " frames=" in ln]
        assert "completed (1000" in line and "subprotocol=audio.drachtio.org" in line
        await gw.idle()
        assert len(list(gw.registry.recent())) == 1


def _cli(argv: list[str], api_key: str | None = None) -> int:
    """Parse and run ``gateway simulate ...`` (blocking: call it in a thread)."""
    import argparse

    from gateway.simulate import cli as simulate_cli

    parser = argparse.ArgumentParser(prog="gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate_cli.register(sub, [])
    args = parser.parse_args(argv)
    if api_key is not None:
        args.api_key = api_key
    return simulate_cli.run(args)


async def test_stream_metadata_cannot_name_a_file_for_the_gateway_to_delete(
    tmp_path: Path,
) -> None:
    # A client puts "recording" in its metadata (first frame or a later text frame): the call's
    # metadata keeps no such key, and deleting the call removes only the gateway's own files.
    victim = tmp_path / "victim.txt"
    await asyncio.to_thread(victim.write_text, "precious")
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(gw.ws(PATH), headers={"X-Callgate-Secret": STEREO_SECRET})
            start = {"sampleRate": 8000, "mixType": "stereo", "callSid": "CAREC", "recording": "x"}
            await ws.send_str(json.dumps(start))
            for _ in range(50):
                await ws.send_bytes(b"\x00\x00" * 320)
            await ws.send_str(json.dumps({"recording": str(victim)}))
            await asyncio.sleep(0.2)
            await ws.close()
        await gw.idle()
        doc = await gw.transcript("CAREC")
        assert "recording" not in doc["metadata"]
        async with aiohttp.ClientSession() as session:
            async with session.delete(f"{gw.http}/v1/calls/CAREC") as resp:
                assert resp.status == 204
    assert await asyncio.to_thread(victim.exists)


async def _stream_seconds(url: str, call_sid: str, seconds: float) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url, headers={"X-Callgate-Secret": STEREO_SECRET})
        await ws.send_str(
            json.dumps({"sampleRate": 8000, "mixType": "stereo", "callSid": call_sid})
        )
        for _ in range(int(seconds * 50)):
            await ws.send_bytes(b"\x00\x00" * 2 * 160)
        await asyncio.sleep(0.2)
        await ws.close()


async def test_a_reconnect_after_a_gap_keeps_the_call_clock(tmp_path: Path) -> None:
    # 1 s, then the stream is gone for ~2 s, then it reconnects with 1 s more: this wire has no
    # timestamps, so the time it was gone becomes silence (it used to be appended at once,
    # pulling the rest of the call 2 s early).
    settings = ingress_settings_for(tmp_path, stereo_ws={"reconnect_grace_s": 5.0})
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws(PATH)
        await _stream_seconds(url, "CASTEREO", 1.0)
        await asyncio.sleep(2.0)
        await _stream_seconds(url, "CASTEREO", 1.0)
        await gw.idle(within_s=15)
        doc = await gw.transcript("CASTEREO")
        assert doc["duration_ms"] >= 3000
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_continuations_total", source="stereo_ws") == 1


async def test_a_peer_that_stops_answering_pings_is_dropped(tmp_path: Path) -> None:
    # The media server vanished without closing TCP: after a quiet interval it is pinged, no
    # pong comes, the connection is dropped and the call ends with what it had.
    settings = ingress_settings_for(tmp_path, server={"ws_heartbeat_s": 0.4})
    async with running_gateway(settings, hello_engine()) as gw:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(
                gw.ws(PATH), headers={"X-Callgate-Secret": STEREO_SECRET}, autoping=False
            )
            await ws.send_str(json.dumps({"sampleRate": 8000, "callSid": "CAGONE"}))
            for _ in range(50):
                await ws.send_bytes(b"\x00\x00" * 2 * 160)
            await poll_until(lambda: gw.registry.get("CAGONE") is not None)
            # Never reading again: no pong goes back.
            await gw.idle(within_s=10)
            await ws.close()
        doc = await gw.transcript("CAGONE")
        assert doc["duration_ms"] == 1000
        metrics = await gw.metrics()
        reasons = {"source": "stereo_ws", "reason": "ping_timeout"}
        assert metric(metrics, "callgate_stream_errors_total", **reasons) == 1


async def test_a_reconnect_while_the_old_connection_lingers_replaces_it(tmp_path: Path) -> None:
    # The media server reconnects after a blip before the gateway knows the old connection is
    # dead: the new stream takes over the call, the old one is closed ("replaced") and what it
    # might still deliver is dropped, so the legs are never fed twice.
    settings = ingress_settings_for(tmp_path, stereo_ws={"reconnect_grace_s": 5.0})
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws(PATH)
        async with aiohttp.ClientSession() as session:
            old = await session.ws_connect(
                url, headers={"X-Callgate-Secret": STEREO_SECRET}, autoping=False
            )
            await old.send_str(json.dumps({"sampleRate": 8000, "callSid": "CAHALF"}))
            for _ in range(50):
                await old.send_bytes(b"\x00\x00" * 2 * 160)
            await poll_until(lambda: gw.registry.find("stereo_ws", "CAHALF") is not None)
            new = asyncio.create_task(_stream_seconds(url, "CAHALF", 1.0))
            await expect_replaced(old)
            await old.close()
            await new
        await gw.idle(within_s=15)
        doc = await gw.transcript("CAHALF")
        assert doc["state"] == "ended"
        assert 2000 <= doc["duration_ms"] < 3000  # 1 s, then the new connection's 1 s
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_continuations_total", source="stereo_ws") == 1
        assert metric(metrics, "callgate_stream_errors_total", source="stereo_ws") == 0
