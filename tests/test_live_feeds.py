"""Live feeds over real sockets: SSE and WebSocket subscribers that drop and resume mid-call."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from gateway.api.routes import HUB, STORE
from gateway.calls.call import CallState
from gateway.ingress.events import Audio, CallStarted, ChannelSpec
from gateway.ingress.ws_shell import call_options
from gateway.stt.scripted import ScriptedEngine, parse_script
from tests.gateway_server import (
    Gateway,
    call_messages,
    poll_until,
    running_gateway,
    send_messages,
    settings_for,
)

CALL_S = 4.0


def talkative_engine() -> ScriptedEngine:
    """Four turns per channel over 4 s: partials at each word, finals 200 ms after each turn."""
    turns = []
    for t in range(4):
        base = t * 1000
        turns.append([[f"w{t}a", base + 50, base + 200], [f"w{t}b", base + 250, base + 500]])
    return ScriptedEngine(parse_script(turns), final_delay_ms=200)


async def _start_call(gw: Gateway, call_sid: str) -> asyncio.Task[Any]:
    """Stream a call at about real time (so feeds can drop and resume during it)."""
    messages = call_messages(call_sid, CALL_S)
    task = asyncio.create_task(send_messages(gw.ws(), messages, interval_s=0.0095))
    await poll_until(lambda: gw.registry.get(call_sid) is not None)
    return task


def _parse_sse(chunk: str) -> list[tuple[int | None, str, dict[str, Any]]]:
    out = []
    for block in chunk.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.lstrip(" ")
        if "data" in fields:
            event_id = int(fields["id"]) if "id" in fields else None
            out.append((event_id, fields.get("event", "message"), json.loads(fields["data"])))
    return out


async def _sse_session(
    url: str, last_id: int | None, max_events: int | None
) -> tuple[list[dict[str, Any]], bool]:
    """Read SSE events (resuming after ``last_id``); stop after ``max_events`` (a drop)."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    events: list[dict[str, Any]] = []
    buffer = ""
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content.iter_any():
            buffer += raw.decode()
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for event_id, kind, data in _parse_sse(block + "\n\n"):
                    assert kind == data["type"]
                    assert event_id == data["seq"]
                    events.append(data)
                    if max_events is not None and len(events) >= max_events:
                        return events, False  # drop the connection mid-call
    return events, True


async def _ws_session(
    url: str, after: int | None, max_events: int | None
) -> tuple[list[dict[str, Any]], bool]:
    full = url if after is None else f"{url}?after={after}"
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(full) as ws:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            events.append(json.loads(msg.data))
            if max_events is not None and len(events) >= max_events:
                return events, False
        assert ws.close_code == 1000
    return events, True


async def _follow(kind: str, url: str) -> list[dict[str, Any]]:
    """Follow a call's feed, dropping the connection twice and resuming each time."""
    got: list[dict[str, Any]] = []
    drops = [6, 10]
    while True:
        last = got[-1]["seq"] if got else None
        limit = drops.pop(0) if drops else None
        if kind == "sse":
            events, ended = await _sse_session(url, last, limit)
        else:
            events, ended = await _ws_session(url, last, limit)
        got.extend(events)
        if ended:
            return got
        await asyncio.sleep(0.25)  # the call goes on while we are away


def _check_exactly_once(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert events[0]["type"] == "call.started"
    assert events[-1]["type"] == "call.ended"


async def test_sse_and_ws_subscribers_resume_without_gaps_or_repeats(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), talkative_engine()) as gw:
        sender = await _start_call(gw, "CALIVE1")
        call = gw.registry.get("CALIVE1")
        assert call is not None
        base = f"{gw.http}/v1/calls/{call.call_id}"
        sse, ws = await asyncio.gather(
            _follow("sse", base + "/events"),
            _follow("ws", base.replace("http://", "ws://") + "/live"),
        )
        assert (await sender).code == 1000
        await gw.idle()
        doc = await gw.transcript("CALIVE1")

    for events in (sse, ws):
        _check_exactly_once(events)
    assert sse == ws
    types = [e["type"] for e in sse]
    assert types.count("turn.partial") >= 8
    finals = [e["data"] for e in sse if e["type"] == "turn.final"]
    assert len(finals) == 8
    # No partial of a turn comes after its final.
    final_at = {e["data"]["key"]: i for i, e in enumerate(sse) if e["type"] == "turn.final"}
    for i, e in enumerate(sse):
        if e["type"] == "turn.partial":
            assert i < final_at[e["data"]["key"]]
    # The ordered stream equals the stored transcript.
    released = [e["data"] for e in sse if e["type"] == "transcript.utterance"]
    assert [(u["channel"], u["start"], u["text"]) for u in released] == [
        (u["channel"], u["start"], u["text"]) for u in doc["utterances"]
    ]
    for channel in (0, 1):
        said = " ".join(f["text"] for f in finals if f["channel"] == channel)
        stored = " ".join(u["text"] for u in doc["utterances"] if u["channel"] == channel)
        assert said == stored == "w0a w0b w1a w1b w2a w2b w3a w3b"


async def test_subscriber_joining_late_gets_the_state_so_far(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), talkative_engine()) as gw:
        sender = await _start_call(gw, "CALIVE2")
        await asyncio.sleep(2.0)
        call = gw.registry.get("CALIVE2")
        assert call is not None
        events, ended = await _ws_session(
            f"ws://127.0.0.1:{gw.port}/v1/calls/{call.call_id}/live", None, None
        )
        assert ended
        _check_exactly_once(events)
        await sender
        # After the call, a new subscriber still gets the whole log, then the feed ends.
        again, ended = await _sse_session(f"{gw.http}/v1/calls/{call.call_id}/events", None, None)
        assert ended
        assert again == events


async def test_firehose_carries_every_call_with_resume(tmp_path: Path) -> None:
    async with running_gateway(settings_for(tmp_path), talkative_engine()) as gw:
        url = f"{gw.http}/v1/events"
        seen: list[tuple[int, dict[str, Any]]] = []

        async def follow() -> None:
            buffer = ""
            async with aiohttp.ClientSession() as s, s.get(url) as resp:
                async for raw in resp.content.iter_any():
                    buffer += raw.decode()
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        for event_id, _, data in _parse_sse(block + "\n\n"):
                            assert event_id is not None
                            seen.append((event_id, data))
                    if sum(1 for _, d in seen if d["type"] == "call.ended") == 2:
                        return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.1)
        await asyncio.gather(
            send_messages(gw.ws(), call_messages("CAFH1", 1.0)),
            send_messages(gw.ws(), call_messages("CAFH2", 1.0)),
        )
        await asyncio.wait_for(follower, 20)
        ids = [i for i, _ in seen]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        per_call: dict[str, list[int]] = {}
        for _, data in seen:
            per_call.setdefault(data["call_id"], []).append(data["seq"])
        assert len(per_call) == 2
        for seqs in per_call.values():
            assert seqs == list(range(1, len(seqs) + 1))
        # Resume from the middle: exactly the rest.
        middle = ids[len(ids) // 2]
        rest: list[int] = []
        async with (
            aiohttp.ClientSession() as s,
            s.get(url, headers={"Last-Event-ID": str(middle)}) as resp,
        ):
            buffer = ""
            while len(rest) < len(ids) - len(ids) // 2 - 1:
                raw = await asyncio.wait_for(resp.content.readany(), 5)
                buffer += raw.decode()
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    rest += [i for i, _, _ in _parse_sse(block + "\n\n") if i is not None]
        assert rest == ids[len(ids) // 2 + 1 :]


async def test_a_resume_from_before_the_events_in_memory_is_served_from_the_store(
    tmp_path: Path,
) -> None:
    # Only the newest 10 events of a call stay in memory; a subscriber joining mid-call from
    # the start gets the older ones (all but partials) from the store, then the rest, once.
    settings = settings_for(tmp_path, live={"events_in_memory": 10})
    async with running_gateway(settings, talkative_engine()) as gw:
        sender = await _start_call(gw, "CALIVE3")
        call = gw.registry.get("CALIVE3")
        assert call is not None
        hub = gw.app[HUB]
        await poll_until(
            lambda: (log := hub.log_of(call.call_id)) is not None and log.first_seq > 5
        )
        url = f"{gw.http}/v1/calls/{call.call_id}/events"
        sse, ended = await _sse_session(url, None, None)
        assert ended
        ws, ended = await _ws_session(url.replace("http://", "ws://")[:-7] + "/live", 0, None)
        assert ended
        assert (await sender).code == 1000
        await gw.idle()
        doc = await gw.transcript("CALIVE3")
        stored = await gw.app[STORE].events(call.call_id, 0)

    for events in (sse, ws):
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)) and seqs[0] == 1
        assert events[0]["type"] == "call.started" and events[-1]["type"] == "call.ended"
        finals = [e["data"] for e in events if e["type"] == "turn.final"]
        assert len(finals) == len({f["key"] for f in finals}) == 8
        released = [e["data"] for e in events if e["type"] == "transcript.utterance"]
        assert [(u["channel"], u["start"], u["text"]) for u in released] == [
            (u["channel"], u["start"], u["text"]) for u in doc["utterances"]
        ]
        # Every event but partials is in the store; each of them reached the subscriber.
        assert [e["seq"] for e in events if e["type"] != "turn.partial"] == [e.seq for e in stored]
    assert [e for e in sse if e["type"] != "turn.partial"] == [
        e for e in ws if e["type"] != "turn.partial"
    ]


async def test_a_call_can_be_followed_before_it_starts(tmp_path: Path) -> None:
    # SIPREC admits a call at the INVITE and starts it on its own task a moment later. A
    # dashboard that opens the feed in between must follow the call: a 204 would stop an
    # EventSource for good, and the WebSocket feed would close as if the call had ended.
    settings = settings_for(tmp_path)
    async with running_gateway(settings, talkative_engine()) as gw:
        live = gw.registry.create(
            talkative_engine(),
            call_options(settings),
            source="test",
            key="CANEW",
            grace_s=0.0,
            max_call_s=60.0,
        )
        call = live.call
        assert call.state is CallState.NEW
        base = f"{gw.http}/v1/calls/{call.call_id}"
        followers = [
            asyncio.create_task(_sse_session(f"{base}/events", None, None)),
            asyncio.create_task(
                _ws_session(f"ws://127.0.0.1:{gw.port}/v1/calls/{call.call_id}/live", None, None)
            ),
        ]
        await poll_until(lambda: gw.app[HUB].subscriber_count == 2)
        await call.handle(CallStarted("test", (ChannelSpec(0, "customer"),)))
        await call.audio(Audio(0, b"\x00\x00" * 8000))
        await call.end("hangup")
        for events, ended in await asyncio.gather(*followers):
            assert ended
            _check_exactly_once(events)
