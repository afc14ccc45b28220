"""Our AssemblyAI v3 client against our v3 server over loopback, under each fault.

The server runs the scripted recognizer in timecode mode: it hears words where they are in the
audio, so a client that reconnects and replays from the middle of the call gets exactly the
words of the replayed audio. Every case must end with every scripted word exactly once, on its
channel, at its call time within 20 ms.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from gateway.calls.call import Call, CallOptions, ChannelFailed
from gateway.config import AssemblyAISettings
from gateway.ingress.events import Audio, CallEnded, CallStarted, ChannelSpec
from gateway.media.codec import Codec
from gateway.stt.assemblyai import AssemblyAIEngine, AssemblyAISession
from gateway.stt.scripted import ScriptedEngine, parse_script, timecode_audio
from gateway.stt.session import SessionParams, SttError
from gateway.stt.v3_protocol import Begin, encode_server_message
from gateway.stt.v3_server import Fault, V3Server, V3ServerOptions, make_app, turn_messages
from gateway.transcript.model import Transcript, TurnUpdate
from tests.gateway_server import poll_until

RATE = 8000
DURATION_MS = 3200
SCRIPTS = {
    0: [
        [["hello", 200, 450], ["there", 500, 800]],
        [["how", 1700, 1900], ["are", 1950, 2150], ["you", 2200, 2500]],
    ],
    1: [
        [["good", 900, 1150], ["morning", 1200, 1500]],
        [["fine", 2600, 2800], ["thanks", 2850, 3000]],
    ],
}


@dataclass
class Harness:
    servers: dict[int, V3Server]
    engines: dict[int, AssemblyAIEngine]


class ChannelRouter:
    """One client engine per channel, so each channel talks to its own scripted server."""

    name = "assemblyai"

    def __init__(self, engines: dict[int, AssemblyAIEngine]) -> None:
        self.engines = engines

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.close()

    def open_session(self, params: SessionParams) -> AssemblyAISession:
        return self.engines[params.channel].open_session(params)


def client_settings(url: str, **overrides: object) -> AssemblyAISettings:
    base: dict[str, object] = dict(
        url=url,
        api_key="test-key",
        chunk_ms=100,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        ping_interval_s=0.3,
        ping_timeout_s=0.3,
        begin_timeout_s=1.0,
        terminate_timeout_s=2.0,
        max_retries=5,
        watermark_lag_ms=500,
    )
    base.update(overrides)
    return AssemblyAISettings.model_validate(base)


@asynccontextmanager
async def harness(
    faults: dict[int, Sequence[Fault | None]] | None = None,
    server_options: dict[str, object] | None = None,
    client: dict[str, object] | None = None,
) -> AsyncIterator[Harness]:
    runners: list[web.AppRunner] = []
    servers: dict[int, V3Server] = {}
    engines: dict[int, AssemblyAIEngine] = {}
    try:
        for channel, script in SCRIPTS.items():
            options = V3ServerOptions(
                api_keys=frozenset({"test-key"}),
                faults=tuple((faults or {}).get(channel, ())),
                **(server_options or {}),  # type: ignore[arg-type]
            )
            server = V3Server(ScriptedEngine(parse_script(script), timecode=True), options)
            runner = web.AppRunner(make_app(server))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            port = runner.addresses[0][1]
            servers[channel] = server
            engines[channel] = AssemblyAIEngine(
                client_settings(f"ws://127.0.0.1:{port}/v3/ws", **(client or {}))
            )
        yield Harness(servers, engines)
    finally:
        for runner in runners:
            await runner.cleanup()


async def play(h: Harness) -> tuple[Call, list[object]]:
    call = Call(ChannelRouter(h.engines), CallOptions(join_same_speaker=False))
    outputs: list[object] = []
    call.add_listener(lambda _c, o: outputs.append(o))
    await call.handle(
        CallStarted(
            "test",
            tuple(ChannelSpec(i, ("customer", "agent")[i], None, Codec.L16, RATE) for i in (0, 1)),
        )
    )
    frame = RATE // 50  # 20 ms, as telephony sends it
    for start in range(0, DURATION_MS * RATE // 1000, frame):
        for channel in (0, 1):
            await call.handle(Audio(channel, timecode_audio(start, frame), start))
        await asyncio.sleep(0)
    await asyncio.wait_for(call.handle(CallEnded()), 60)
    return call, outputs


def check_exact(transcript: Transcript) -> None:
    """Every scripted word once, on its channel, within 20 ms of its script time."""
    for channel, script in SCRIPTS.items():
        expected = [(w[0], w[1], w[2]) for turn in script for w in turn]
        got = [
            (w.text, w.start, w.end)
            for u in transcript.utterances
            if u.channel == channel
            for w in u.words
        ]
        assert [g[0] for g in got] == [e[0] for e in expected], (channel, got)
        for (_, gs, ge), (_, es, ee) in zip(got, expected, strict=True):
            assert abs(gs - es) <= 20 and abs(ge - ee) <= 20, (channel, got)


async def test_clean_session_delivers_every_word_on_the_call_clock() -> None:
    async with harness() as h:
        call, _ = await play(h)
    check_exact(call.transcript())
    assert all(s.stats.sessions == 1 for s in h.servers.values())
    assert all(e.reconnects == 0 for e in h.engines.values())
    assert all(s.stats.closes == {1000: 1} for s in h.servers.values())


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault("drop", after_ms=1800), id="dropped-mid-turn-1006"),
        pytest.param(Fault("close", after_ms=1000, code=3005), id="server-error-3005"),
        pytest.param(Fault("stall", after_ms=600, stall_s=3.0), id="stall-past-timeout"),
        pytest.param(Fault("malformed", after_ms=1000), id="malformed-json"),
        pytest.param(
            Fault(
                "close",
                after_ms=1200,
                code=3008,
                reason="Session Expired: Maximum session duration exceeded",
            ),
            id="expired-3008",
        ),
        pytest.param(
            Fault(
                "close",
                before_begin=True,
                code=3009,
                reason="Unauthorized Connection: Too many concurrent sessions",
            ),
            id="too-many-sessions-3009-then-success",
        ),
    ],
)
async def test_faults_lose_and_duplicate_nothing(fault: Fault) -> None:
    async with harness(faults={0: [fault], 1: [fault]}) as h:
        call, outputs = await play(h)
    check_exact(call.transcript())
    assert not [o for o in outputs if isinstance(o, ChannelFailed)]
    for channel, server in h.servers.items():
        assert server.stats.sessions == 2, (channel, server.stats)
        assert h.engines[channel].reconnects == 1


async def test_sessions_roll_over_before_expiry_at_a_turn_boundary() -> None:
    # Sessions expire after 2.5 s; the client opens a fresh one when within 2.0 s of expiry.
    async with harness(
        server_options={"max_session_s": 2.5}, client={"rollover_margin_s": 2.0}
    ) as h:
        call, _ = await play(h)
    check_exact(call.transcript())
    for server in h.servers.values():
        assert server.stats.sessions >= 2
        assert 3008 not in server.stats.closes  # rolled over before the server expired it


async def test_auth_failure_ends_the_channel_without_a_retry_storm() -> None:
    async with harness(client={"api_key": "wrong-key"}) as h:
        call, outputs = await play(h)
    failures = [o for o in outputs if isinstance(o, ChannelFailed)]
    assert sorted(f.channel for f in failures) == [0, 1]
    assert all("1008" in f.reason and "Invalid API key" in f.reason for f in failures)
    assert all(s.stats.sessions == 1 for s in h.servers.values())  # no retry
    assert call.transcript().utterances == ()


@pytest.mark.parametrize("seed", [1, 2])
async def test_any_frame_sizes_are_rechunked_and_paced_to_the_rules(seed: int) -> None:
    """Frames of 1-2000 bytes (whole samples), all handed over at once like a file: the server
    closes with 3007 on any chunk under 50 ms or over 1000 ms, or on audio more than 0.15 s
    ahead of real time; neither may happen, and no word may be lost."""
    import random

    rnd = random.Random(seed)
    async with harness(
        server_options={"realtime_allowance_s": 0.15}, client={"max_catchup_ms": 0}
    ) as h:
        call = Call(ChannelRouter(h.engines), CallOptions(join_same_speaker=False))
        await call.handle(
            CallStarted(
                "test",
                tuple(
                    ChannelSpec(i, ("customer", "agent")[i], None, Codec.L16, RATE) for i in (0, 1)
                ),
            )
        )
        total = DURATION_MS * RATE // 1000
        for channel in (0, 1):
            position = 0
            while position < total:
                samples = min(rnd.randint(1, 1000), total - position)  # 2..2000 bytes
                await call.handle(Audio(channel, timecode_audio(position, samples), position))
                position += samples
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(call.handle(CallEnded()), 60)
        elapsed = asyncio.get_running_loop().time() - started
    check_exact(call.transcript())
    for server in h.servers.values():
        assert server.stats.closes == {1000: 1}, server.stats  # no 3007, one session
    assert elapsed >= DURATION_MS / 1000 - 0.2  # paced: the file took real time


async def test_a_law_is_sent_as_16_bit_pcm_of_the_same_duration() -> None:
    """v3 has no A-law encoding: the client must transcode, or the server would hear half."""
    script = parse_script([[["early", 200, 500]], [["late", 2500, 2800]]])
    server = V3Server(ScriptedEngine(script), V3ServerOptions())
    async with serving(make_app(server)) as url:
        engine = AssemblyAIEngine(client_settings(url))
        call = Call(engine, CallOptions(join_same_speaker=False))
        await call.handle(
            CallStarted("test", (ChannelSpec(0, "customer", None, Codec.PCMA, RATE),))
        )
        for start in range(0, 3400 * RATE // 1000, 160):
            await call.handle(Audio(0, b"\xd5" * 160, start))
        await asyncio.wait_for(call.handle(CallEnded()), 30)
    assert [u.text for u in call.transcript().utterances] == ["early", "late"]


async def _session_events(session: AssemblyAISession) -> list[object]:
    return [event async for event in session.events()]


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a loopback port; yields the v3 URL a client connects to."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}/v3/ws"
    finally:
        await runner.cleanup()


def v3_app(handle: Callable[[web.Request], Awaitable[web.WebSocketResponse]]) -> web.Application:
    """A hand-written v3 peer: ``handle`` serves /v3/ws."""
    app = web.Application()
    app.add_routes([web.get("/v3/ws", handle)])
    return app


async def answer_terminate(ws: web.WebSocketResponse) -> None:
    """What the service does on Terminate: Termination, then a clean close."""
    termination = {
        "type": "Termination",
        "audio_duration_seconds": 1,
        "session_duration_seconds": 1,
    }
    await ws.send_json(termination)
    await ws.close()


async def stream(
    session: AssemblyAISession, samples: int, *, pause_s: float = 0.02, silence: bool = False
) -> list[object]:
    """Send ``samples`` of audio in 20 ms frames (``pause_s`` apart), finish, return the
    session's events."""
    reader = asyncio.create_task(_session_events(session))
    for start in range(0, samples, 160):
        await session.send(b"\0\0" * 160 if silence else timecode_audio(start, 160))
        await asyncio.sleep(pause_s)
    await asyncio.wait_for(session.finish(), 30)
    return await reader


async def test_a_session_that_dies_after_every_begin_gives_up() -> None:
    # Each session reaches Begin and is closed (3005) before any final: that is no progress, so
    # the retries run out (they used to start over at every Begin: endless reconnects, and the
    # call end never returned).
    faults = {0: [Fault("close", after_ms=300, code=3005)] * 50}
    async with harness(faults=faults, client={"max_retries": 3}) as h:
        session = h.engines[0].open_session(SessionParams(0, Codec.L16, RATE))
        events = await stream(session, 2 * RATE, pause_s=0.005)
    fatal = [e for e in events if isinstance(e, SttError) and e.fatal]
    assert fatal and "gave up after 3 retries" in fatal[0].reason, events
    assert h.servers[0].stats.sessions == 4


async def test_finish_while_pacing_still_sends_the_last_partial_chunk() -> None:
    # 1050 ms pushed at once (a file, a replay backlog), then finish(): the last 50 ms, less
    # than a chunk, reaches the service before Terminate (it used to be dropped).
    async with harness(client={"max_catchup_ms": 0}) as h:
        session = h.engines[0].open_session(SessionParams(0, Codec.L16, RATE))
        reader = asyncio.create_task(_session_events(session))
        await session.send(timecode_audio(0, RATE * 1050 // 1000))
        await asyncio.sleep(0.3)  # connected, and pacing the backlog
        await asyncio.wait_for(session.finish(), 30)
        await reader
    assert h.servers[0].stats.audio_bytes == RATE * 1050 // 1000 * 2


async def test_time_connected_before_any_audio_is_no_credit_to_send_faster() -> None:
    # A leg whose media starts 3 s late: the clock then releases those 3 s at once. The service
    # measures real time from the first audio, so must the client (it paced from Begin and got
    # closed 3007, "faster than real time", which failed the channel).
    async with harness(server_options={"realtime_allowance_s": 1.0}) as h:
        session = h.engines[0].open_session(SessionParams(0, Codec.L16, RATE))
        reader = asyncio.create_task(_session_events(session))
        await asyncio.sleep(3.0)
        await session.send(timecode_audio(0, RATE * 3))
        for start in range(RATE * 3, RATE * 4, 160):
            await session.send(timecode_audio(start, 160))
            await asyncio.sleep(0.02)
        await asyncio.wait_for(session.finish(), 30)
        events = await reader
    assert not [e for e in events if isinstance(e, SttError)], events
    assert 3007 not in h.servers[0].stats.closes


async def test_a_session_expiring_before_begin_every_time_backs_off_and_gives_up() -> None:
    # 3008 before Begin is no rollover of a working session: it backs off and counts as a retry
    # (it used to reconnect at once, forever: hundreds of sessions a second).
    expired = Fault(
        "close", before_begin=True, code=3008, reason="Session Expired: Maximum session duration"
    )
    async with harness(faults={0: [expired] * 1000}, client={"max_retries": 3}) as h:
        session = h.engines[0].open_session(SessionParams(0, Codec.L16, RATE))
        reader = asyncio.create_task(_session_events(session))
        await session.send(timecode_audio(0, 800))
        await asyncio.wait_for(session.finish(), 30)
        events = await reader
    assert [e for e in events if isinstance(e, SttError) and e.fatal], events
    assert h.servers[0].stats.sessions == 4


async def test_a_termination_we_did_not_ask_for_is_followed_by_a_new_session() -> None:
    # The docs: Termination also comes "when the session expires". Without our Terminate it is
    # not the end of the channel: a new session takes the audio after the last final (the
    # channel used to end silently, dropping everything sent afterwards).
    sessions: list[int] = []

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sessions.append(0)
        await ws.send_json({"type": "Begin", "id": f"s{len(sessions)}", "expires_at": 4102444800})
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                sessions[-1] += len(msg.data)
                if len(sessions) == 1 and sessions[-1] >= 5 * 1600:
                    await ws.send_json(
                        {
                            "type": "Termination",
                            "audio_duration_seconds": 0,
                            "session_duration_seconds": 10800,
                        }
                    )
                    await ws.close(code=3008, message=b"Session Expired")
                    break
            elif msg.type is WSMsgType.TEXT and "Terminate" in msg.data:
                await answer_terminate(ws)
                break
        return ws

    async with serving(v3_app(handle)) as url:
        session = AssemblyAIEngine(client_settings(url)).open_session(
            SessionParams(0, Codec.L16, RATE)
        )
        events = await stream(session, 2 * RATE)
    assert len(sessions) == 2 and sessions[1] > 0
    assert not [e for e in events if isinstance(e, SttError) and e.fatal], events


async def test_a_caller_waiting_on_finish_can_still_be_cancelled() -> None:
    # wait_for(finish(), t) on a stalled service raises TimeoutError (finish used to swallow
    # the cancellation and return as if the session had flushed).
    stall = Fault("stall", after_ms=300, stall_s=5.0)
    client = {"ping_interval_s": 30.0, "ping_timeout_s": 30.0, "terminate_timeout_s": 5.0}
    async with harness(faults={0: [stall]}, client=client) as h:
        session = h.engines[0].open_session(SessionParams(0, Codec.L16, RATE))
        for start in range(0, RATE, 160):
            await session.send(timecode_audio(start, 160))
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.finish(), 0.3)
        await session.aclose()


async def test_an_empty_end_of_turn_closes_that_turns_partial() -> None:
    # A partial "uh", then the engine drops the blip: an end of turn with no words (what
    # v3_server sends for the local engine's dropped turn). The partial is closed with an empty
    # final (it stayed open: a ghost partial in the merger until the call ended).
    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "Begin", "id": "s1", "expires_at": 4102444800})
        chunks = 0
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                chunks += 1
                update = None
                if chunks == 3:
                    update = TurnUpdate(0, 0, 0, (), "uh", 100, 200, False, 0.5)
                elif chunks == 6:
                    update = TurnUpdate(0, 0, 0, (), "", 100, 200, True, 0.0)
                if update is not None:
                    for message in turn_messages(update, True, False):
                        await ws.send_str(encode_server_message(message))
            elif msg.type is WSMsgType.TEXT and "Terminate" in msg.data:
                await answer_terminate(ws)
                break
        return ws

    async with serving(v3_app(handle)) as url:
        session = AssemblyAIEngine(client_settings(url)).open_session(
            SessionParams(0, Codec.L16, RATE)
        )
        events = await stream(session, 50 * 160, silence=True)
    updates = [(e.turn_order, e.final, e.text) for e in events if isinstance(e, TurnUpdate)]
    assert updates == [(0, False, "uh"), (0, True, "")]


async def test_a_sporadic_incorrect_padding_at_connect_is_retried() -> None:
    # AssemblyAI sometimes closes a good connection 1008 "Incorrect padding" before Begin
    # (node-sdk #97); a retry works, so the channel goes on and loses nothing.
    padding = Fault(
        "close", before_begin=True, code=1008, reason="Unauthorized connection: Incorrect padding"
    )
    async with harness(faults={0: [padding]}) as h:
        call, _ = await play(h)
    check_exact(call.transcript())
    assert h.servers[0].stats.sessions == 2


async def test_the_v3_server_answers_pings_while_the_last_recognition_runs() -> None:
    # The engine takes 3 s to finish (a long last turn, a busy pool); the client pings every
    # 0.5 s with a 1 s timeout. The server keeps answering, so the session ends once, cleanly
    # (it stopped reading, the client dropped the connection and replayed, again and again).
    class SlowFinish(ScriptedEngine):
        def open_session(self, params: SessionParams) -> Any:
            session = super().open_session(params)
            finish = session.finish

            async def slow() -> None:
                await asyncio.sleep(3.0)
                await finish()

            session.finish = slow  # type: ignore[method-assign]
            return session

    engine = SlowFinish(parse_script(SCRIPTS[0]), timecode=True)
    server = V3Server(engine, V3ServerOptions(api_keys=frozenset({"test-key"})))
    async with serving(make_app(server)) as url:
        client = client_settings(url, ping_interval_s=0.5, ping_timeout_s=1.0)
        session = AssemblyAIEngine(client).open_session(SessionParams(0, Codec.L16, RATE))
        await stream(session, 2 * RATE)
    assert server.stats.sessions == 1 and server.stats.closes == {1000: 1}
    assert session.reconnects == 0


async def test_a_long_stretch_without_turns_is_not_kept_or_replayed_whole() -> None:
    # 30 s with no turn at all (a muted leg, a hold), then the connection drops. The audio kept
    # for a replay used to grow with the whole silence (16 KB/s at 8 kHz), and the reconnect
    # replayed all of it at real time, leaving the channel that far behind the call. Now only
    # the last seconds before what was sent are kept (a turn may have begun there unreported).
    fault = Fault("drop", after_ms=30_000)
    options = V3ServerOptions(api_keys=frozenset({"test-key"}), realtime_allowance_s=1000.0)
    server = V3Server(
        ScriptedEngine(parse_script([]), timecode=True), replace(options, faults=(fault,))
    )
    async with serving(make_app(server)) as url:
        engine = AssemblyAIEngine(client_settings(url, max_catchup_ms=60_000))
        session = engine.open_session(SessionParams(0, Codec.L16, RATE))
        reader = asyncio.create_task(_session_events(session))
        for _ in range(0, 35 * RATE, 1600):
            await session.send(b"\0\0" * 1600)
            await asyncio.sleep(0.001)
        await poll_until(lambda: session.queued_ms == 0)
        # Kept once all was sent: the last 5 s, trimmed a second at a time.
        kept_s = len(session._kept) / (2 * RATE)
        await asyncio.wait_for(session.finish(), 30)
        events = await reader
    assert not [e for e in events if isinstance(e, SttError) and e.fatal], events
    assert server.stats.sessions == 2 and session.reconnects == 1
    assert 5 <= kept_s < 6, kept_s
    # 35 s of audio arrived once, and at most ~7 s of it twice (the replay after the drop).
    assert server.stats.audio_bytes <= 2 * RATE * 42, server.stats.audio_bytes


async def test_audio_waits_in_the_session_while_the_service_is_not_reading() -> None:
    # Flow control: once the socket has unsent data, chunks wait in the session (its backlog,
    # ``queued_ms``, kept for a replay) until the socket drains; they are not written on
    # regardless, piling up unbounded in the transport where no backlog figure sees them.
    stalled = asyncio.Event()

    async def handle(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(encode_server_message(Begin("stalled", time.time() + 3600)))
        await stalled.wait()  # never reads again: its socket buffers fill, then ours
        return ws

    rate = 48_000  # 96 KB/s of L16: past the socket buffers within the pacer's 60 s lead
    seconds = 60
    runner = web.AppRunner(v3_app(handle))
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    url = f"ws://127.0.0.1:{sock.getsockname()[1]}/v3/ws"
    try:
        engine = AssemblyAIEngine(client_settings(url, max_catchup_ms=60_000))
        session = engine.open_session(SessionParams(0, Codec.L16, rate))
        block = b"\1\0" * (rate // 10)
        for _ in range(seconds * 10):
            await session.send(block)
            await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        backlog_ms = session.queued_ms
        stalled.set()
        await session.aclose()
    finally:
        await runner.cleanup()
    # What left the session fits the socket buffers (the peer's is 4 KB; ours grows to ~4 MB,
    # about 35 s here): the rest, ~25 s, waits in the session. Written regardless: 0.
    assert backlog_ms >= 10_000, backlog_ms
