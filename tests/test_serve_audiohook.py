"""`gateway serve` with Genesys AudioHook over real loopback sockets (scripted recognizer).

Signed sessions are transcribed; failed authentication gets ``disconnect{unauthorized}`` after
the minimum delay; protocol errors end only their own session (``disconnect{error}``, the
client's ``close`` answered with ``closed``, a close code) while a concurrent call completes;
pauses and discards keep both channels on one clock; drain disconnects with ``completed``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import drain
from gateway.simulate.audiohook import (
    AudioHookOptions,
    AudioHookScript,
    AudioHookWire,
    simulate_audiohook,
    upgrade_headers,
)
from gateway.stt.scripted import ScriptedEngine, parse_script
from tests.gateway_server import (
    AUDIOHOOK_KEY,
    AUDIOHOOK_SECRET,
    Gateway,
    by_role,
    hello_engine,
    ingress_settings_for,
    metric,
    running_gateway,
    silent_call,
)

PATH = "/audiohook/ws"


def _options(**kwargs: Any) -> AudioHookOptions:
    base: dict[str, Any] = {"api_key": AUDIOHOOK_KEY, "client_secret": AUDIOHOOK_SECRET}
    base.update(kwargs)
    return AudioHookOptions(**base)


async def _doc(gw: Gateway, session_id: str) -> dict[str, Any]:
    await gw.idle()
    return await gw.transcript(session_id)


async def test_signed_session_is_transcribed_with_call_metadata(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        result = await simulate_audiohook(gw.ws(PATH), silent_call(2.0), _options(speed=0))
        assert result.completed, result
        assert result.disconnect is None
        doc = await _doc(gw, result.session_id)
        assert by_role(doc) == {"customer": "hello there goodbye", "agent": "hello there goodbye"}
        assert doc["source"] == "audiohook"
        assert doc["state"] == "ended"
        assert doc["duration_ms"] == 2000
        assert doc["source_ids"]["conversationId"] == result.conversation_id
        assert doc["source_ids"]["sessionId"] == result.session_id
        assert doc["metadata"]["ani"] == "+1-555-555-1234"
        assert doc["metadata"]["dnis"] == "+1-800-555-6789"
        assert [(c["index"], c["role"]) for c in doc["channels"]] == [
            (0, "customer"),
            (1, "agent"),
        ]
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_streams_total", source="audiohook") == 1
        assert (
            metric(metrics, "callgate_calls_ended_total", source="audiohook", outcome="ended") == 1
        )


async def test_l16_session(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        result = await simulate_audiohook(
            gw.ws(PATH), silent_call(1.0), _options(speed=0, format="L16")
        )
        assert result.completed, result
        doc = await _doc(gw, result.session_id)
        assert doc["metadata"]["format"] == "L16"
        assert by_role(doc) == {"customer": "hello there", "agent": "hello there"}


@pytest.mark.parametrize(
    ("case", "options", "reason"),
    [
        ("wrong secret", {"client_secret": "d3Jvbmctc2VjcmV0"}, "bad_signature"),
        ("unknown key", {"api_key": "nope"}, "bad_api_key"),
        ("unsigned", {"client_secret": ""}, "missing_signature"),
    ],
)
async def test_failed_authentication_is_a_delayed_unauthorized_disconnect(
    tmp_path: Path, case: str, options: dict[str, Any], reason: str
) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        result = await simulate_audiohook(gw.ws(PATH), silent_call(1.0), _options(**options))
        assert not result.completed
        assert result.disconnect == "unauthorized", case
        assert result.elapsed_s >= 0.5  # the constant minimum delay
        assert result.close_code is not None  # the client closes after `closed`
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_streams_rejected_total", reason=reason) == 1
        assert gw.registry.active_count == 0
        assert list(gw.registry.recent()) == []


async def test_organization_must_match_the_header(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        url = gw.ws(PATH)
        wire = AudioHookWire.from_audio(silent_call(0.5))
        script = AudioHookScript(wire, _options())
        headers = upgrade_headers(url, script)
        params = script.open_parameters()
        params["organizationId"] = "another-org"
        replies = await _raw(url, headers, script.session_id, [("open", params)])
        assert replies[0]["type"] == "disconnect"
        assert replies[0]["parameters"]["reason"] == "unauthorized"


# -- protocol errors -------------------------------------------------------------------------


async def _raw(
    url: str,
    headers: dict[str, str],
    session_id: str,
    steps: list[tuple[str, Any]],
    *,
    close_code: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Send raw steps (("open"|type, params) / ("binary", bytes) / ("text", str)), answer a
    disconnect with close, and return the server's messages."""
    seq = 0
    serverseq = 0
    out: list[dict[str, Any]] = []

    def message(type_: str, params: dict[str, Any], **extra: Any) -> str:
        nonlocal seq
        seq += 1
        body = {
            "version": "2",
            "id": session_id,
            "type": type_,
            "seq": seq,
            "serverseq": serverseq,
            "position": "PT0S",
            "parameters": params,
        }
        body.update(extra)
        return json.dumps(body)

    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(url, headers=headers)
        for kind, value in steps:
            if kind == "binary":
                await ws.send_bytes(value)
            elif kind == "text":
                await ws.send_str(value)
            elif kind == "skip_seq":
                seq += 1
            else:
                await ws.send_str(message(kind, value))
                if kind == "open":
                    reply = await ws.receive(timeout=10)
                    data = json.loads(reply.data)
                    out.append(data)
                    serverseq = data["seq"]
                    if data["type"] != "opened":
                        await ws.send_str(message("close", {"reason": "disconnect"}))
                        break
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                if close_code is not None:
                    close_code.append(int(msg.data) if msg.data is not None else 0)
                break
            data = json.loads(msg.data)
            out.append(data)
            serverseq = data["seq"]
            if data["type"] == "disconnect":
                await ws.send_str(message("close", {"reason": "disconnect"}))
            if data["type"] == "closed":
                break
        await ws.close()
        if close_code is not None and not close_code:
            close_code.append(ws.close_code or 0)
    return out


def _bad_steps(name: str, script: AudioHookScript) -> list[tuple[str, Any]]:
    open_ = ("open", script.open_parameters())
    if name == "bad_seq":
        return [open_, ("skip_seq", None), ("ping", {})]
    if name == "binary_before_open":
        return [("binary", b"\xff" * 1600)]
    if name == "message_too_large":
        return [open_, ("ping", {"padding": "x" * 70_000})]
    if name == "unsupported_format":
        params = script.open_parameters()
        params["media"] = [
            {"type": "audio", "format": "OPUS", "channels": ["external", "internal"], "rate": 8000}
        ]
        return [("open", params)]
    if name == "unknown_type":
        return [open_, ("dance", {})]
    if name == "malformed_json":
        return [open_, ("text", "{nope")]
    if name == "rate_exceeded":
        # 10 hours "discarded" 100 ms into the session: the timeline moves faster than real
        # time allows (it used to fill 10 hours of silence at once: ~1 GB, the loop blocked).
        discard = {"start": "PT0.1S", "discarded": "PT36000S"}
        return [open_, ("binary", b"\xff" * 1600), ("discarded", discard)]
    raise AssertionError(name)


BAD = {
    "bad_seq": 1008,
    "binary_before_open": 1008,
    "message_too_large": 1009,
    "unsupported_format": 1003,
    "unknown_type": 1008,
    "malformed_json": 1008,
    "rate_exceeded": 1008,
}


async def test_protocol_errors_end_only_their_session(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        url = gw.ws(PATH)
        good = asyncio.create_task(simulate_audiohook(url, silent_call(2.0), _options(speed=1)))
        wire = AudioHookWire.from_audio(silent_call(0.5))
        codes: dict[str, list[int]] = {}
        replies: dict[str, list[dict[str, Any]]] = {}
        for name in BAD:
            script = AudioHookScript(wire, _options())
            codes[name] = []
            replies[name] = await _raw(
                url,
                upgrade_headers(url, script),
                script.session_id,
                _bad_steps(name, script),
                close_code=codes[name],
            )
        result = await good
        assert result.completed, result
        for name, code in BAD.items():
            disconnect = [r for r in replies[name] if r["type"] == "disconnect"]
            assert len(disconnect) == 1, (name, replies[name])
            assert disconnect[0]["parameters"]["reason"] == "error"
            assert replies[name][-1]["type"] == "closed", name
            # The client closes after `closed` (1000); a client that lingers gets ours.
            assert codes[name] in ([1000], [code]), name
        doc = await _doc(gw, result.session_id)
        assert by_role(doc) == {"customer": "hello there goodbye", "agent": "hello there goodbye"}
        metrics = await gw.metrics()
        for name in BAD:
            assert (
                metric(metrics, "callgate_stream_errors_total", source="audiohook", reason=name)
                == 1
            ), name


# -- timeline --------------------------------------------------------------------------------


async def test_pause_and_discard_fill_both_channels_on_the_call_clock(tmp_path: Path) -> None:
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        options = _options(speed=0, pauses=((1.0, 1.5),), discards=((2.0, 2.3),))
        result = await simulate_audiohook(gw.ws(PATH), silent_call(3.0), options)
        assert result.completed, result
        await gw.idle()
        call = gw.registry.get(result.session_id)
        assert call is not None
        assert {i: c.filled_ms for i, c in call.channels.items()} == {0: 800, 1: 800}
        assert {i: c.duration_ms for i, c in call.channels.items()} == {0: 3000, 1: 3000}


async def test_transcripts_go_back_as_events(tmp_path: Path) -> None:
    settings = ingress_settings_for(tmp_path, audiohook={"send_transcripts": True})
    async with running_gateway(settings, hello_engine()) as gw:
        result = await simulate_audiohook(gw.ws(PATH), silent_call(2.0), _options(speed=0))
        assert result.completed, result
        finals = [t for t in result.transcripts if t["isFinal"]]
        texts = sorted(
            (t["channelId"], t["alternatives"][0]["interpretations"][0]["transcript"])
            for t in finals
        )
        assert texts == [(0, "goodbye"), (0, "hello there"), (1, "goodbye"), (1, "hello there")]


async def test_reconnect_continues_the_call(tmp_path: Path) -> None:
    settings = ingress_settings_for(tmp_path, audiohook={"reconnect_grace_s": 5.0})
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws(PATH)
        first = await simulate_audiohook(
            url, silent_call(1.0), _options(speed=0, close_reason="reconnect")
        )
        assert first.completed, first
        assert gw.registry.active_count == 1
        second = await simulate_audiohook(
            url,
            silent_call(1.0),
            _options(
                speed=0,
                conversation_id=first.conversation_id,
                continued_sessions=(first.session_id,),
            ),
        )
        assert second.completed, second
        await gw.idle()
        assert len(list(gw.registry.recent())) == 1
        doc = await gw.transcript(first.session_id)
        assert doc["duration_ms"] >= 2000
        assert by_role(doc)["customer"] == "hello there goodbye"
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_continuations_total", source="audiohook") == 1


async def test_a_session_of_another_conversation_cannot_continue_a_call(tmp_path: Path) -> None:
    # continuedSessions names a live call's session, but the organization and conversation are
    # someone else's: a new call, never the other one (session ids are no credential).
    settings = ingress_settings_for(tmp_path, audiohook={"reconnect_grace_s": 5.0})
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws(PATH)
        first = await simulate_audiohook(
            url, silent_call(1.0), _options(speed=0, close_reason="reconnect")
        )
        assert first.completed, first
        for organization, conversation in (
            ("11111111-2222-3333-4444-555555555555", first.conversation_id),
            (None, "99999999-0000-0000-0000-000000000000"),
        ):
            other = await simulate_audiohook(
                url,
                silent_call(0.5),
                _options(
                    speed=0,
                    continued_sessions=(first.session_id,),
                    conversation_id=conversation,
                    **({"organization_id": organization} if organization else {}),
                ),
            )
            assert other.completed, other
        await gw.idle()
        assert len(list(gw.registry.recent())) == 3
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_continuations_total", source="audiohook") == 0


async def test_a_signature_over_a_percent_encoded_query_verifies(tmp_path: Path) -> None:
    # Genesys signs the request target as sent: %2F in the query must not be decoded first.
    async with running_gateway(ingress_settings_for(tmp_path), hello_engine()) as gw:
        result = await simulate_audiohook(
            gw.ws(PATH) + "?tenant=acme%2Feu&next=https%3A%2F%2Fx",
            silent_call(0.5),
            _options(speed=0),
        )
        assert result.completed, result


async def test_transcripts_after_a_reconnect_are_on_the_new_sessions_timeline(
    tmp_path: Path,
) -> None:
    """Genesys reads a transcript's offset on the session that carries it: after a reconnect
    the continued session starts at call time 1 s, so "goodbye" (1.6-1.9 s of the call) is at
    0.6 s of it."""
    settings = ingress_settings_for(
        tmp_path, audiohook={"reconnect_grace_s": 5.0, "send_transcripts": True}
    )
    engine = ScriptedEngine(
        parse_script([[["hello", 100, 400]], [["goodbye", 1600, 1900]]]), final_delay_ms=200
    )
    async with running_gateway(settings, engine) as gw:
        url = gw.ws(PATH)
        # Half real time, so "hello" is final (at 0.6 s of audio) well before the close.
        first = await simulate_audiohook(
            url, silent_call(1.0), _options(speed=2, close_reason="reconnect")
        )
        assert first.completed, first
        second = await simulate_audiohook(
            url,
            silent_call(1.0),
            _options(
                speed=0,
                conversation_id=first.conversation_id,
                continued_sessions=(first.session_id,),
            ),
        )
        assert second.completed, second
        await gw.idle()

    def finals(result: Any) -> list[tuple[str, str]]:
        return sorted(
            (t["alternatives"][0]["interpretations"][0]["transcript"], t["offset"])
            for t in result.transcripts
            if t["isFinal"]
        )

    assert finals(first) == [("hello", "PT0.1S"), ("hello", "PT0.1S")]
    assert finals(second) == [("goodbye", "PT0.6S"), ("goodbye", "PT0.6S")]
    words = [
        tok["offset"]
        for t in second.transcripts
        if t["isFinal"]
        for tok in t["alternatives"][0]["interpretations"][0]["tokens"]
    ]
    assert words == ["PT0.6S", "PT0.6S"]


async def test_drain_disconnects_with_completed(tmp_path: Path) -> None:
    settings = ingress_settings_for(tmp_path, server={"drain_timeout_s": 0.2})
    async with running_gateway(settings, hello_engine()) as gw:
        task = asyncio.create_task(
            simulate_audiohook(gw.ws(PATH), silent_call(5.0), _options(speed=1))
        )
        await asyncio.sleep(1.5)
        await drain(gw.app)
        result = await task
        assert result.disconnect == "completed"
        doc = await gw.transcript(result.session_id)
        assert doc["state"] == "ended"
        assert by_role(doc)["customer"].startswith("hello there")


def _write_wav(path: Path, seconds: float) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00\x00\x00" * int(seconds * 8000))


async def test_cli_simulate_audiohook_signs_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:

    wav = tmp_path / "call.wav"
    await asyncio.to_thread(_write_wav, wav, 1.0)
    monkeypatch.setenv(
        "GATEWAY_AUDIOHOOK__API_KEYS", json.dumps([f"{AUDIOHOOK_KEY}:{AUDIOHOOK_SECRET}"])
    )
    async with running_gateway(ingress_settings_for(tmp_path / "gw"), hello_engine()) as gw:
        argv = ["simulate", "audiohook", str(wav), "--url", gw.ws(PATH), "--speed", "0"]
        argv += ["--calls", "2", "--discard", "0.2-0.4"]
        assert await asyncio.to_thread(_cli, argv) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if " frames=" in ln]
        assert len(lines) == 2 and all("completed (1000)" in line for line in lines), lines
        monkeypatch.delenv("GATEWAY_AUDIOHOOK__API_KEYS")
        bad = [*argv[:7], "--client-secret", "d3Jvbmc="]
        assert await asyncio.to_thread(_cli, bad, AUDIOHOOK_KEY) == 1
        assert "disconnected (unauthorized" in capsys.readouterr().out


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
