"""/metrics around simulated calls: every signal moves the way an operator relies on (issue 6).

Real sockets: the gateway app on loopback, Twilio streams from an aiohttp client, and for the
reconnect case the AssemblyAI client against our v3 server with a fault that cuts one session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.stt.assemblyai import AssemblyAIEngine
from gateway.stt.scripted import ScriptedEngine, parse_script
from gateway.stt.v3_server import Fault, V3Server, V3ServerOptions, make_app
from tests.gateway_server import (
    Gateway,
    call_messages,
    connected,
    hello_engine,
    media,
    running_gateway,
    send_messages,
    settings_for,
    start,
    stop,
)
from tests.test_stt_assemblyai import client_settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(gw: Gateway) -> Samples:
    return parse(await gw.metrics())


async def test_metrics_follow_a_call_from_start_to_end(tmp_path: Path) -> None:
    seconds = 3.0
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        before = await scrape(gw)
        assert value(before, "callgate_calls_active", source="twilio") == 0
        assert value(before, "callgate_ready") == 1
        assert value(before, "callgate_calls_started_total") == 0
        # Paced so that the call is observably active for a while.
        sending = asyncio.create_task(
            send_messages(gw.ws(), call_messages("CA0001", seconds), interval_s=0.004)
        )
        during: Samples = {}

        async def active() -> bool:
            nonlocal during
            during = await scrape(gw)
            return value(during, "callgate_calls_active", source="twilio") == 1

        for _ in range(200):
            if await active():
                break
            await asyncio.sleep(0.01)
        assert value(during, "callgate_calls_active", source="twilio") == 1
        assert value(during, "callgate_calls_started_total", source="twilio") == 1
        assert value(during, "callgate_stt_sessions_active", engine="scripted") == 2
        closed = await sending
        assert (closed.code, closed.reason) == (1000, "stop")
        await gw.idle()
        after = await scrape(gw)

    assert value(after, "callgate_calls_active", source="twilio") == 0
    assert value(after, "callgate_stt_sessions_active", engine="scripted") == 0
    assert value(after, "callgate_calls_started_total", source="twilio") == 1
    assert value(after, "callgate_calls_ended_total", source="twilio", outcome="ended") == 1
    assert value(after, "callgate_call_duration_seconds_count", source="twilio") == 1
    assert value(after, "callgate_call_duration_seconds_sum", source="twilio") == seconds
    assert value(after, "callgate_stt_session_starts_total", engine="scripted") == 2
    for role in ("customer", "agent"):
        got = value(after, "callgate_audio_received_seconds_total", source="twilio", role=role)
        assert abs(got - seconds) <= seconds * 0.01, (role, got)
        assert (
            value(after, "callgate_audio_gap_filled_seconds_total", source="twilio", role=role) == 0
        )
    finals = value(after, "callgate_turn_finals_total", engine="scripted")
    assert finals == 4  # "hello there" and "goodbye" on each channel
    assert value(after, "callgate_stt_final_latency_seconds_count", engine="scripted") == finals
    # The scripted engine finalizes once 200 ms more audio has arrived (80 ms of wall time at
    # this pacing): each latency is that, plus the trip through the call.
    latency_sum = value(after, "callgate_stt_final_latency_seconds_sum", engine="scripted")
    assert 0.05 * finals <= latency_sum <= 1.0 * finals
    assert value(after, "callgate_turn_partials_total", engine="scripted") > 0
    assert value(after, "callgate_events_published_total") > 0
    assert value(after, "callgate_media_frames_total", source="twilio") == seconds * 100
    assert value(after, "callgate_event_loop_lag_seconds_count") > 0
    assert value(after, "process_resident_memory_bytes") > 0


async def test_gaps_and_late_frames_are_counted_per_role(tmp_path: Path) -> None:
    # Inbound (customer) skips 200 ms of frames; outbound (agent) repeats one frame, late.
    msgs = [connected(), start("CA0002")]
    for i in range(50):
        msgs.append(media("outbound", i * 20, seq=2 * i + 2))
        if not 10 <= i < 20:
            msgs.append(media("inbound", i * 20, seq=2 * i + 3))
    msgs.append(media("outbound", 100, seq=200))  # 20 ms of audio at 0.1 s, long released
    msgs.append(stop("CA0002"))
    async with running_gateway(settings_for(tmp_path), hello_engine()) as gw:
        closed = await send_messages(gw.ws(), msgs)
        assert closed.code == 1000
        await gw.idle()
        after = await scrape(gw)
    received = {
        role: value(after, "callgate_audio_received_seconds_total", role=role)
        for role in ("customer", "agent")
    }
    filled = {
        role: value(after, "callgate_audio_gap_filled_seconds_total", role=role)
        for role in ("customer", "agent")
    }
    assert received == {"customer": 0.8, "agent": 1.0}
    assert filled == {"customer": 0.2, "agent": 0.0}
    assert value(after, "callgate_media_frames_dropped_total", reason="late") == 1
    assert value(after, "callgate_media_frames_dropped_total", reason="duplicate") == 0


@asynccontextmanager
async def v3_server(*faults: Fault | None) -> AsyncIterator[str]:
    script = parse_script([[["hello", 100, 400], ["there", 500, 800]], [["bye", 1300, 1600]]])
    server = V3Server(
        ScriptedEngine(script, timecode=False),
        V3ServerOptions(api_keys=frozenset({"test-key"}), faults=faults),
    )
    runner = web.AppRunner(make_app(server))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/v3/ws"
    finally:
        await runner.cleanup()


async def test_a_forced_stt_reconnect_is_counted_once(tmp_path: Path) -> None:
    # The first STT session is cut (TCP drop: the client sees 1006) after 1 s of audio; the
    # client reconnects once and replays. Two channels: sessions 0 and 1 start together.
    async with v3_server(Fault("drop", after_ms=1000)) as url:
        engine = AssemblyAIEngine(client_settings(url))
        async with running_gateway(settings_for(tmp_path), engine) as gw:
            before = await scrape(gw)
            assert value(before, "callgate_stt_reconnects_total") == 0
            closed = await send_messages(gw.ws(), call_messages("CA0003", 2.0), interval_s=0.002)
            assert closed.code == 1000
            await gw.idle(within_s=30)
            after = await scrape(gw)
    assert value(after, "callgate_stt_reconnects_total", engine="assemblyai") == 1
    assert (
        value(after, "callgate_stt_reconnects_total", engine="assemblyai", reason="close_1006")
        + value(
            after, "callgate_stt_reconnects_total", engine="assemblyai", reason="connection_lost"
        )
        == 1
    )
    assert value(after, "callgate_stt_failures_total") == 0
    assert value(after, "callgate_stt_session_starts_total", engine="assemblyai") == 2
    assert value(after, "callgate_calls_ended_total", outcome="ended") == 1
