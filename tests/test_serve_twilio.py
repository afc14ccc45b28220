"""`gateway serve` with Twilio Media Streams over real loopback sockets (scripted recognizer).

Every bad input closes only its own stream, with a close code and reason and a metric, while a
concurrent call still completes its transcript.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.ingress.twilio_signature import compute_signature
from tests.gateway_server import (
    TOKEN,
    Closed,
    Gateway,
    by_role,
    call_messages,
    connected,
    expect_replaced,
    hello_engine,
    media,
    metric,
    poll_until,
    running_gateway,
    send_messages,
    settings_for,
    start,
    stop,
)


async def _good_call(gw: Gateway, call_sid: str) -> dict[str, Any]:
    closed = await send_messages(gw.ws(), call_messages(call_sid, 2.0))
    assert (closed.code, closed.reason) == (1000, "stop")
    await gw.idle()
    return await gw.transcript(call_sid)


async def test_signed_stream_is_transcribed_stored_and_listed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with running_gateway(settings, hello_engine()) as gw:
        closed = await send_messages(
            gw.ws(), call_messages("CA0001", 2.0, params={"agent_id": "42", "FirstName": "Jane"})
        )
        assert (closed.code, closed.reason) == (1000, "stop")
        await gw.idle()
        doc = await gw.transcript("CA0001")
        assert by_role(doc) == {"customer": "hello there goodbye", "agent": "hello there goodbye"}
        assert doc["state"] == "ended"
        assert doc["source"] == "twilio"
        assert doc["source_ids"]["callSid"] == "CA0001"
        assert doc["metadata"]["param.agent_id"] == "42"
        assert doc["duration_ms"] == 2000
        # The stored file is the same document.
        assert gw.stored(doc["call_id"]) == doc
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{gw.http}/v1/calls") as resp,
        ):
            listed = await resp.json()
        assert [c["source_ids"]["callSid"] for c in listed["calls"]] == ["CA0001"]
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{gw.http}/v1/calls/CA0001/transcript?format=text") as resp,
        ):
            text = await resp.text()
        assert text.splitlines()[0] == "[00:00.1] customer: hello there"
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_calls_ended_total", source="twilio", outcome="ended") == 1
        assert metric(metrics, "callgate_media_frames_total", source="twilio") == 200


async def test_roles_and_participants_from_custom_parameters(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        params = {
            "inbound_role": "agent",
            "outbound_role": "customer",
            "inbound_participant": "Ann",
        }
        await send_messages(gw.ws(), call_messages("CA0002", 1.0, params=params))
        await gw.idle()
        doc = await gw.transcript("CA0002")
        assert [(c["index"], c["role"], c["participant"]) for c in doc["channels"]] == [
            (0, "agent", "Ann"),
            (1, "customer", None),
        ]


# -- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "headers"),
    [
        ("missing header", {"X-Twilio-Signature": ""}),
        ("wrong token", {"X-Twilio-Signature": "WRONG"}),
        ("changed path", {"X-Twilio-Signature": "OTHER_PATH"}),
    ],
)
async def test_bad_signature_is_refused_with_403(
    tmp_path: Path, case: str, headers: dict[str, str]
) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        url = gw.ws()
        if headers["X-Twilio-Signature"] == "WRONG":
            headers = {"X-Twilio-Signature": compute_signature("not-the-token", url)}
        elif headers["X-Twilio-Signature"] == "OTHER_PATH":
            headers = {"X-Twilio-Signature": compute_signature(TOKEN, gw.ws("/twilio/other"))}
        closed = await send_messages(url, call_messages("CA0003", 0.2), headers=headers, token=None)
        assert closed.status == 403, case
        reason = "missing_signature" if case == "missing header" else "bad_signature"
        assert metric(await gw.metrics(), "callgate_streams_rejected_total", reason=reason) == 1
        assert gw.registry.active_count == 0
        assert list(gw.registry.recent()) == []


async def test_signature_over_the_public_url_behind_a_proxy(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        public = "wss://gw.example.com/twilio/stream"
        headers = {
            "X-Twilio-Signature": compute_signature(TOKEN, public),
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "gw.example.com",
        }
        closed = await send_messages(gw.ws(), call_messages("CA0004", 0.5), headers=headers)
        assert (closed.code, closed.reason) == (1000, "stop")
        # Without the proxy headers the same signature is for another URL.
        closed = await send_messages(
            gw.ws(),
            call_messages("CA0005", 0.5),
            headers={"X-Twilio-Signature": headers["X-Twilio-Signature"]},
        )
        assert closed.status == 403


async def test_unsigned_streams_need_allow_unsigned(tmp_path: Path) -> None:
    refuse = settings_for(tmp_path, twilio={"auth_token": ""})
    async with running_gateway(refuse, hello_engine()) as gw:
        closed = await send_messages(gw.ws(), call_messages("CA0006", 0.2), token=None)
        assert closed.status == 403
        assert (
            metric(await gw.metrics(), "callgate_streams_rejected_total", reason="unsigned_refused")
            == 1
        )
    allow = settings_for(tmp_path, twilio={"auth_token": "", "allow_unsigned": True})
    async with running_gateway(allow, hello_engine()) as gw:
        doc = await _good_call_unsigned(gw, "CA0007")
        assert by_role(doc)["customer"] == "hello there goodbye"


async def _good_call_unsigned(gw: Gateway, call_sid: str) -> dict[str, Any]:
    closed = await send_messages(gw.ws(), call_messages(call_sid, 2.0), token=None)
    assert (closed.code, closed.reason) == (1000, "stop")
    await gw.idle()
    return await gw.transcript(call_sid)


async def test_shared_secret_parameter(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, telnyx={"allow_unsigned": False, "shared_secret": "s3cret-value"}
    )
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws("/telnyx/stream")
        missing = await send_messages(url, call_messages("CA0008", 0.5), token=None)
        assert missing.code == 1008
        assert missing.reason.startswith("missing_secret")
        wrong = await send_messages(
            url, call_messages("CA0009", 0.5, params={"token": "nope"}), token=None
        )
        assert (wrong.code, wrong.reason.split(":")[0]) == (1008, "bad_secret")
        refused = await send_messages(url + "?token=nope", call_messages("CA0010", 0.5), token=None)
        assert refused.status == 403
        ok = await send_messages(
            url, call_messages("CA0011", 1.0, params={"token": "s3cret-value"}), token=None
        )
        assert (ok.code, ok.reason) == (1000, "stop")
        await gw.idle()
        doc = await gw.transcript("CA0011")
        assert "param.token" not in doc["metadata"]  # the secret is never stored
        assert "s3cret-value" not in json.dumps(doc)


# -- bad input: one stream closes, the other call completes ------------------------------------

_HUGE = json.dumps({"event": "media", "media": {"payload": "A" * 70_000}})


def _bad(name: str) -> list[str]:
    head = [connected(), start("CABAD")]
    if name == "malformed_json":
        return [*head, media("inbound", 0), '{"event": "media", "media": {']
    if name == "bad_base64":
        msg = json.loads(media("inbound", 20))
        msg["media"]["payload"] = "not*base64!"
        return [*head, media("inbound", 0), json.dumps(msg)]
    if name == "unknown_event":
        return [*head, json.dumps({"event": "dance", "streamSid": "MZ1"})]
    if name == "media_before_start":
        return [connected(), media("inbound", 0)]
    if name == "message_too_large":
        return [*head, _HUGE]
    if name == "unsupported_codec":
        return [connected(), start("CABAD", encoding="audio/opus", rate=48000)]
    if name == "rate_exceeded":
        return [*head, *(media("inbound", i * 20, seq=i + 2) for i in range(1500))]
    raise AssertionError(name)


async def test_timestamps_leaping_ahead_count_against_real_time(tmp_path: Path) -> None:
    # Frames 599 s apart (each under calls.max_timestamp_jump_s): 60 of them would add 10 hours
    # of silence to the call in well under a second. The timeline they claim counts against
    # real time like audio does: rate_exceeded.
    settings = settings_for(tmp_path, calls={"max_speed": 1.5, "burst_s": 5.0})
    async with running_gateway(settings, hello_engine()) as gw:
        messages = [connected(), start("CAJUMP", tracks=("inbound",))]
        messages += [media("inbound", i * 599_000, seq=i + 2) for i in range(60)]
        closed = await send_messages(gw.ws(), [*messages, stop("CAJUMP")])
        assert closed.code == 1008 and closed.reason.startswith("rate_exceeded: "), closed
        await gw.idle()
        doc = await gw.transcript("CAJUMP")
        assert doc["duration_ms"] < 700_000  # at most the one jump that was allowed


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("malformed_json", 1008),
        ("bad_base64", 1008),
        ("unknown_event", 1008),
        ("media_before_start", 1008),
        ("message_too_large", 1009),
        ("unsupported_codec", 1003),
        ("rate_exceeded", 1008),
    ],
)
async def test_bad_input_closes_only_its_stream(tmp_path: Path, name: str, code: int) -> None:
    settings = settings_for(tmp_path, calls={"max_speed": 1.5, "burst_s": 5.0})
    async with running_gateway(settings, hello_engine()) as gw:
        good_task = asyncio.create_task(
            send_messages(gw.ws(), call_messages("CAGOOD", 2.0), interval_s=0.002)
        )
        bad: Closed = await send_messages(gw.ws(), _bad(name))
        good = await good_task
        assert bad.code == code, bad
        assert bad.reason.startswith(f"{name}: "), bad.reason
        assert (good.code, good.reason) == (1000, "stop")
        await gw.idle()
        doc = await gw.transcript("CAGOOD")
        assert by_role(doc) == {"customer": "hello there goodbye", "agent": "hello there goodbye"}
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_errors_total", source="twilio", reason=name) == 1
        failed = metric(metrics, "callgate_calls_ended_total", source="twilio", outcome="failed")
        assert failed == 0


async def test_a_bad_stream_keeps_the_audio_it_delivered(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        # 1.06 s: not a whole number of the handler's 100 ms batches; the rest is kept too.
        messages = call_messages("CAKEEP", 1.06)[:-1] + ['{"event": "media", "media": {']
        closed = await send_messages(gw.ws(), messages)
        assert closed.code == 1008
        await gw.idle()
        doc = await gw.transcript("CAKEEP")
        assert doc["end_reason"] == "stream_error"
        assert doc["duration_ms"] == 1060
        assert by_role(doc) == {"customer": "hello there", "agent": "hello there"}


async def test_a_stream_gone_without_stop_keeps_its_last_frames(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        url = gw.ws()
        async with aiohttp.ClientSession() as session:
            signature = {"X-Twilio-Signature": compute_signature(TOKEN, url)}
            async with session.ws_connect(url, headers=signature) as ws:
                for message in call_messages("CAGONE", 1.06)[:-1]:  # no stop
                    await ws.send_str(message)
        await gw.idle()
        doc = await gw.transcript("CAGONE")
        assert doc["duration_ms"] == 1060


# -- redirects, TwiML, drain ----------------------------------------------------------------------


async def test_a_second_stream_with_the_same_call_sid_continues_the_call(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, twilio={"redirect_grace_s": 3.0})
    async with running_gateway(settings, hello_engine()) as gw:
        first = await send_messages(gw.ws(), call_messages("CAREDIR", 1.0))
        assert first.code == 1000
        second = call_messages(
            "CAREDIR", 1.0, stream_sid="MZ00000000000000000000000000000002"
        )  # its timestamps restart at 0
        assert (await send_messages(gw.ws(), second)).code == 1000
        assert gw.registry.active_count == 1  # lingering for another continuation
        await gw.idle(within_s=10)
        calls = list(gw.registry.recent())
        assert len(calls) == 1
        doc = await gw.transcript("CAREDIR")
        assert doc["duration_ms"] == 2000
        # "goodbye" (1.2-1.5 s of the session's audio) comes from the second stream.
        assert by_role(doc)["customer"] == "hello there goodbye"
        assert metric(await gw.metrics(), "callgate_stream_continuations_total") == 1


async def test_twiml_helper_starts_a_both_tracks_stream(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        server={"public_url": "https://gw.example.com"},
        twilio={"voice_dial": "+15550001111"},
    )
    async with running_gateway(settings, hello_engine()) as gw:
        form = {"CallSid": "CA0012", "From": "+15551234567", "To": "+15557654321"}
        url = "https://gw.example.com/twilio/voice"
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{gw.http}/twilio/voice",
                data=form,
                headers={"X-Twilio-Signature": compute_signature(TOKEN, url, form)},
            ) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/xml"
                body = await resp.text()
            async with s.post(f"{gw.http}/twilio/voice", data=form) as resp:
                assert resp.status == 403
        root = ET.fromstring(body)
        stream = root.find("./Start/Stream")
        assert stream is not None
        assert stream.attrib == {
            "url": "wss://gw.example.com/twilio/stream",
            "track": "both_tracks",
        }
        params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
        assert params["from"] == "+15551234567"
        assert root.findtext("./Dial") == "+15550001111"


async def test_drain_ends_active_calls_and_flushes_their_transcripts(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, server={"drain_timeout_s": 0.3})
    async with running_gateway(settings, hello_engine()) as gw:
        # 1.8 s of a call, then the stream stays open (no stop): only the drain ends it.
        messages = call_messages("CADRAIN", 1.8)[:-1]
        sender = asyncio.create_task(send_messages(gw.ws(), messages))
        await poll_until(lambda: gw.registry.get("CADRAIN") is not None)
        await asyncio.sleep(0.3)
        from gateway.app import drain

        await drain(gw.app)
        closed = await sender
        assert closed.code == 1001
        assert closed.reason == "shutdown"
        doc = gw.stored(gw.registry.get("CADRAIN").call_id)  # type: ignore[union-attr]
        assert doc["end_reason"] == "shutdown"
        assert by_role(doc)["customer"] == "hello there goodbye"
        # No new streams while draining.
        refused = await send_messages(gw.ws(), call_messages("CALATE", 0.2))
        assert refused.status == 503


async def test_capacity_limit_refuses_with_503(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, server={"max_calls": 1})
    async with running_gateway(settings, hello_engine()) as gw:
        messages = call_messages("CAFULL1", 1.0)[:-1]
        sender = asyncio.create_task(send_messages(gw.ws(), messages, interval_s=0.01))
        await poll_until(lambda: gw.registry.active_count > 0)
        refused = await send_messages(gw.ws(), call_messages("CAFULL2", 0.2))
        assert refused.status == 503
        assert (
            metric(await gw.metrics(), "callgate_streams_rejected_total", reason="at_capacity") == 1
        )
        sender.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sender


def test_close_reason_fits_a_close_frame() -> None:
    from gateway.ingress.ws_shell import close_text

    text = close_text("bad_message", "é" * 200)
    assert len(text) <= 123
    text.decode("utf-8")
    assert re.match(rb"^bad_message: ", text)


def test_payload_helper_is_base64() -> None:
    msg = json.loads(media("inbound", 0, b"\x00\x01"))
    assert base64.b64decode(msg["media"]["payload"]) == b"\x00\x01"
    assert json.loads(stop("CA1"))["event"] == "stop"


# -- Telnyx and SignalWire dialects ---------------------------------------------------------------


def _telnyx_call(call_control_id: str, seconds: float, order: list[int]) -> list[str]:
    """A Telnyx both-tracks PCMU stream; media frames sent in the slot ``order`` given."""
    stream_id = "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"
    out = [
        json.dumps({"event": "connected", "version": "1.0.0"}),
        json.dumps(
            {
                "event": "start",
                "sequence_number": "1",
                "start": {
                    "call_control_id": call_control_id,
                    "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
                },
                "stream_id": stream_id,
            }
        ),
    ]
    slots = int(seconds * 50)
    assert sorted(order) == list(range(slots))
    payload = base64.b64encode(b"\xff" * 160).decode()
    seq = 2
    for slot in order:
        for track in ("inbound", "outbound"):
            out.append(
                json.dumps(
                    {
                        "event": "media",
                        "sequence_number": str(seq),
                        "media": {
                            "track": track,
                            "chunk": str(seq),
                            "timestamp": str(slot * 20),
                            "payload": payload,
                        },
                        "stream_id": stream_id,
                    }
                )
            )
            seq += 1
    out.append(
        json.dumps(
            {
                "event": "stop",
                "sequence_number": str(seq),
                "stop": {"call_control_id": call_control_id},
                "stream_id": stream_id,
            }
        )
    )
    return out


async def test_telnyx_frames_out_of_order_are_put_back_in_order(tmp_path: Path) -> None:
    # Swap neighbouring slots all through the call: every frame arrives 20 ms out of place.
    order = list(range(100))
    for i in range(0, 100, 2):
        order[i], order[i + 1] = order[i + 1], order[i]
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        closed = await send_messages(
            gw.ws("/telnyx/stream"), _telnyx_call("v2:T02llQxIyaRkh", 2.0, order), token=None
        )
        assert (closed.code, closed.reason) == (1000, "stop")
        await gw.idle()
        doc = await gw.transcript("v2:T02llQxIyaRkh")
        assert doc["source"] == "telnyx"
        assert doc["duration_ms"] == 2000
        assert by_role(doc) == {"customer": "hello there goodbye", "agent": "hello there goodbye"}
        call = gw.registry.get("v2:T02llQxIyaRkh")
        assert call is not None
        assert sum(c.clock.late_frames for c in call.channels.values()) == 0
        assert sum(c.filled_ms for c in call.channels.values()) == 0


async def test_signalwire_path_takes_the_twilio_wire_format(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        closed = await send_messages(
            gw.ws("/signalwire/stream"), call_messages("CASW01", 2.0), token=None
        )
        assert (closed.code, closed.reason) == (1000, "stop")
        await gw.idle()
        doc = await gw.transcript("CASW01")
        assert doc["source"] == "signalwire"
        assert by_role(doc)["agent"] == "hello there goodbye"


async def test_max_call_duration_ends_the_call_and_closes_its_stream(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, calls={"max_call_s": 0.5})
    async with running_gateway(settings, hello_engine()) as gw:
        messages = call_messages("CALONG", 3.0)[:-1]
        closed = await send_messages(gw.ws(), messages, interval_s=0.005)
        assert (closed.code, closed.reason) == (1000, "max_duration")
        await gw.idle()
        doc = await gw.transcript("CALONG")
        assert doc["end_reason"] == "max_duration"
        assert doc["state"] == "ended"


async def test_unknown_engine_parameter_closes_the_stream(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        params = {"stt_engine": "assemblyai"}  # no key or URL configured here
        closed = await send_messages(gw.ws(), call_messages("CAENG", 0.5, params=params))
        assert closed.code == 1008
        assert closed.reason.startswith("unknown_engine: ")
        assert gw.registry.active_count == 0


async def test_a_continuation_in_another_format_is_refused(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, twilio={"redirect_grace_s": 3.0})
    async with running_gateway(settings, hello_engine()) as gw:
        assert (await send_messages(gw.ws(), call_messages("CAFMT", 1.0))).code == 1000
        alaw = call_messages(
            "CAFMT", 1.0, stream_sid="MZ00000000000000000000000000000002", encoding="audio/x-alaw"
        )
        closed = await send_messages(gw.ws(), alaw)
        assert closed.code == 1003
        assert closed.reason.startswith("format_changed: ")
        await gw.idle(within_s=10)
        doc = await gw.transcript("CAFMT")
        assert doc["duration_ms"] == 1000  # the first stream's audio is kept, nothing else


async def test_readyz_turns_503_when_a_drain_starts_while_calls_finish(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, server={"drain_timeout_s": 10.0})
    async with running_gateway(settings, hello_engine()) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{gw.http}/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ready"
            assert metric(await gw.metrics(), "callgate_ready") == 1
            messages = call_messages("CAREADY", 1.6)
            sender = asyncio.create_task(send_messages(gw.ws(), messages, interval_s=0.01))
            await poll_until(lambda: gw.registry.active_count > 0)
            from gateway.app import drain

            draining = asyncio.create_task(drain(gw.app))
            await poll_until(lambda: not gw.registry.accepting)
            async with s.get(f"{gw.http}/readyz") as resp:
                assert resp.status == 503
                assert "draining" in (await resp.json())["problems"]
            async with s.get(f"{gw.http}/healthz") as resp:
                assert resp.status == 200  # alive while draining
            assert metric(await gw.metrics(), "callgate_ready") == 0
            assert gw.registry.active_count == 1  # the active call goes on
            closed = await sender
            await draining
        assert (closed.code, closed.reason) == (1000, "stop")
        doc = gw.stored(gw.registry.get("CAREADY").call_id)  # type: ignore[union-attr]
        assert doc["end_reason"] == "stop"


async def test_a_redirect_continues_its_call_even_at_the_call_limit(tmp_path: Path) -> None:
    # One call allowed, and it is waiting for its redirected stream: that stream adds no call,
    # so it is taken (it used to get 503 and the call was cut off after the grace period).
    # A stream for another call is still refused.
    settings = settings_for(tmp_path, server={"max_calls": 1}, twilio={"redirect_grace_s": 3.0})
    async with running_gateway(settings, hello_engine()) as gw:
        first = await send_messages(gw.ws(), call_messages("CACAP", 1.0))
        assert (first.code, first.reason) == (1000, "stop")
        assert gw.registry.active_count == 1  # lingering for the redirect
        other = await send_messages(gw.ws(), call_messages("CAOTHER", 0.2))
        assert other.code == 1013 and other.reason.startswith("at_capacity: "), other
        redirected = call_messages("CACAP", 1.0, stream_sid="MZ00000000000000000000000000000002")
        second = await send_messages(gw.ws(), redirected)
        assert (second.code, second.reason) == (1000, "stop"), second
        await gw.idle(within_s=10)
        doc = await gw.transcript("CACAP")
        assert doc["duration_ms"] >= 2000
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_continuations_total", source="twilio") == 1


async def test_a_peer_that_stops_answering_is_dropped_and_its_call_ends(tmp_path: Path) -> None:
    # The platform's side vanished without closing TCP (a crashed host, a dead NAT): it no
    # longer answers WebSocket pings, so after ws_heartbeat_s and a half the stream is closed
    # and the call ends (it stayed open until calls.max_call_s).
    settings = settings_for(
        tmp_path, server={"ws_heartbeat_s": 0.5}, twilio={"redirect_grace_s": 0}
    )
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws()
        headers = {"X-Twilio-Signature": compute_signature(TOKEN, url)}
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url, headers=headers, autoping=False)
            for message in call_messages("CAGONE", 0.5)[:-1]:  # no stop: it just goes quiet
                await ws.send_str(message)
            await poll_until(lambda: gw.registry.get("CAGONE") is not None)
            # Never reading again: no pong goes back.
            await gw.idle(within_s=10)
            call = gw.registry.get("CAGONE")
            assert call is not None and call.state.value == "ended"
            await ws.close()
        metrics = await gw.metrics()
        reasons = {"source": "twilio", "reason": "ping_timeout"}
        assert metric(metrics, "callgate_stream_errors_total", **reasons) == 1


async def test_a_quiet_peer_that_answers_pings_keeps_its_stream(tmp_path: Path) -> None:
    # Media stops for several heartbeat intervals (a stalled media server, a long hold) but
    # the peer answers our pings: the stream stays, and its own pings are answered too.
    settings = settings_for(
        tmp_path, server={"ws_heartbeat_s": 0.4}, twilio={"redirect_grace_s": 0}
    )
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws()
        headers = {"X-Twilio-Signature": compute_signature(TOKEN, url)}
        messages = call_messages("CAQUIET", 1.0)
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url, headers=headers, autoping=False)
            for message in messages[:52]:
                await ws.send_str(message)
            await ws.ping(b"are-you-there")
            pings, pongs = 0, []
            loop = asyncio.get_running_loop()
            quiet_until = loop.time() + 2.0  # five intervals without media
            while (left := quiet_until - loop.time()) > 0:
                try:
                    msg = await ws.receive(timeout=left)
                except TimeoutError:
                    break
                if msg.type is aiohttp.WSMsgType.PING:
                    pings += 1
                    await ws.pong(msg.data)
                elif msg.type is aiohttp.WSMsgType.PONG:
                    pongs.append(msg.data)
                else:
                    raise AssertionError(f"unexpected {msg.type}: {msg.data!r}")
            assert pongs == [b"are-you-there"]
            assert pings >= 2  # pinged about once an interval while quiet
            for message in messages[52:]:
                await ws.send_str(message)
            closing = await ws.receive(timeout=10)
            assert (closing.type, closing.data, closing.extra) == (
                aiohttp.WSMsgType.CLOSE,
                1000,
                "stop",
            )
        await gw.idle(within_s=10)
        doc = await gw.transcript("CAQUIET")
        assert doc["duration_ms"] == 1000  # all of it (media timestamps: no gap for the quiet)
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_errors_total", source="twilio") == 0


async def test_a_continuation_while_the_old_stream_is_attached_replaces_it(tmp_path: Path) -> None:
    # A redirect's new stream (or a reconnect) starts before the old stream stops: the newest
    # stream wins. The old one is closed with reason "replaced" and its detach does not end
    # the call; the two never feed the same channels at once.
    settings = settings_for(tmp_path, twilio={"redirect_grace_s": 0})
    async with running_gateway(settings, hello_engine()) as gw:
        url = gw.ws()
        headers = {"X-Twilio-Signature": compute_signature(TOKEN, url)}
        first = call_messages("CAREPL", 0.5)[:-1]  # no stop: still attached
        async with aiohttp.ClientSession() as session:
            old = await session.ws_connect(url, headers=headers, autoping=False)
            for message in first:
                await old.send_str(message)
            await poll_until(lambda: gw.registry.find("twilio", "CAREPL") is not None)
            second = call_messages("CAREPL", 1.0, stream_sid="MZ00000000000000000000000000000002")
            new = asyncio.create_task(send_messages(url, second))
            await expect_replaced(old)
            await old.close()
            closed = await new
            assert (closed.code, closed.reason) == (1000, "stop"), closed
        await gw.idle(within_s=10)
        doc = await gw.transcript("CAREPL")
        assert doc["state"] == "ended"
        assert 1500 <= doc["duration_ms"] < 2500  # 0.5 s, then the second stream's 1 s
        metrics = await gw.metrics()
        assert metric(metrics, "callgate_stream_continuations_total", source="twilio") == 1
        assert metric(metrics, "callgate_stream_errors_total", source="twilio") == 0


async def test_a_dtmf_flood_is_refused(tmp_path: Path) -> None:
    # Each digit is a published, stored event: beyond 10 a second (burst 50) the stream closes.
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        digits = [
            json.dumps(
                {
                    "event": "dtmf",
                    "streamSid": "MZ00000000000000000000000000000001",
                    "sequenceNumber": str(i + 3),
                    "dtmf": {"track": "inbound_track", "digit": "5"},
                }
            )
            for i in range(80)
        ]
        messages = [connected(), start("CADTMF"), media("inbound", 0), *digits]
        closed = await send_messages(gw.ws(), messages)
        assert closed.code == 1008 and closed.reason.startswith("rate_exceeded: control"), closed
        await gw.idle()
        metrics = await gw.metrics()
        reasons = {"source": "twilio", "reason": "rate_exceeded"}
        assert metric(metrics, "callgate_stream_errors_total", **reasons) == 1
