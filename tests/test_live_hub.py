"""LiveHub and EventLog without sockets: ordering, late partials, slow subscribers, compaction."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.outputs.events import CallEvent, EventLog
from gateway.outputs.live import _COALESCE_AFTER, CallPublisher, LiveHub, Subscription
from tests.gateway_server import poll_until


def _turn(key: str, text: str) -> dict[str, Any]:
    return {"key": key, "text": text}


def test_a_partial_after_its_final_is_never_logged() -> None:
    log = EventLog("c1")
    assert log.append("call.started", {}) is not None
    assert log.append("turn.partial", _turn("0:0:0", "hel")) is not None
    final = log.append("turn.final", _turn("0:0:0", "hello"))
    assert final is not None and final.seq == 3
    assert log.append("turn.partial", _turn("0:0:0", "hel")) is None
    assert log.dropped_partials == 1
    with pytest.raises(ValueError):
        log.append("turn.final", _turn("0:0:0", "again"))
    assert [e.seq for e in log.after(1)] == [2, 3]


def test_compaction_drops_only_superseded_partials_outside_the_recent_window() -> None:
    log = EventLog("c1")
    for i in range(10):
        log.append("turn.partial", _turn(f"0:0:{i}", "x"))
        log.append("turn.final", _turn(f"0:0:{i}", "x"))
    log.append("turn.partial", _turn("0:0:10", "open turn"))
    dropped = log.compact(keep_last=4)
    assert dropped == 9  # partials of turns 0-8; turn 9's partial is among the last 4 events
    seqs = [e.seq for e in log.after(0)]
    assert seqs == sorted(seqs)
    assert log.last_seq == 21
    assert any(e.type == "turn.partial" and e.data["key"] == "0:0:10" for e in log.after(0))


def test_events_beyond_the_recent_window_keep_only_their_json_text() -> None:
    log = EventLog("c1", keep_full=5)
    texts = {}
    for i in range(12):
        log.append("turn.partial", _turn(f"0:0:{i}", "x"))
        event = log.append("turn.final", _turn(f"0:0:{i}", f"final {i}"))
        assert event is not None
        texts[event.seq] = event.json_text
    before = list(log.after(0))
    # Partials beyond the window are slim too, keeping the key compaction needs.
    assert all(len(e.data) == 1 and "key" in e.data for e in before[:-5])
    assert log.compact(keep_last=5) == 10
    events = list(log.after(0))
    old, recent = events[:-5], events[-5:]
    assert all(e.data for e in recent)
    assert [e.type for e in old] == ["turn.final"] * len(old) and len(old) == 9
    assert all(e.data == {"key": f"0:0:{i}"} for i, e in enumerate(old))
    # A resuming subscriber gets exactly what was sent the first time.
    assert all(e.json_text == texts[e.seq] for e in events if e.type == "turn.final")


def test_firehose_items_beyond_the_recent_window_keep_only_their_json_text() -> None:
    hub = LiveHub(firehose_buffer=1000)
    publisher: Any = SimpleNamespace(subscribers=set())
    texts = []
    for i in range(400):
        event = CallEvent("c1", i + 1, "turn.final", 0.0, {"key": f"0:0:{i}", "text": f"t{i}"})
        texts.append(event.json_text)
        hub.publish(publisher, event)
    backlog, _sub, complete = hub.subscribe_all(0)
    assert complete and [item.gseq for item in backlog] == list(range(1, 401))
    assert [item.event.json_text for item in backlog] == texts
    assert [len(item.event.data) for item in backlog] == [1] * 380 + [2] * 20


def test_a_slow_subscriber_is_closed_and_others_go_on() -> None:
    slow, fast = Subscription(limit=3), Subscription(limit=3)
    for i in range(5):
        slow.push(i)
        fast.push(i)
        if fast.pending == 3:  # the fast one keeps reading
            fast._queue.get_nowait()
    assert slow.closed_reason == "slow_consumer"
    assert fast.closed_reason is None


def test_sink_fast_path_keeps_order_with_queued_items() -> None:
    written: list[int] = []
    sub = Subscription(limit=100)
    accept = [True]
    sub.sink = lambda item: accept[0] and (written.append(item) or True)
    sub.push(1)
    accept[0] = False  # the socket buffer is full: items queue up
    sub.push(2)
    accept[0] = True
    sub.push(3)  # must not overtake 2, which is still queued
    assert written == [1]
    assert sub.pending == 2


def _behind_a_gated_store() -> tuple[LiveHub, CallPublisher, asyncio.Event, list[CallEvent]]:
    """A hub whose store saves only once the gate is set (a stalled store), the publisher of
    call c1 on it, the gate, and the events saved so far."""
    gate = asyncio.Event()
    stored: list[CallEvent] = []

    async def persist(event: CallEvent, extra: object) -> None:
        await gate.wait()
        stored.append(event)

    hub = LiveHub(persist=persist)
    call: Any = SimpleNamespace(call_id="c1")
    publisher = hub._publishers["c1"] = CallPublisher(hub, call)
    return hub, publisher, gate, stored


async def test_a_subscriber_joining_during_a_save_gets_that_event_once_and_after_it_is_saved() -> (
    None
):
    # The publisher has logged the final and is waiting for the store: a subscriber joining now
    # must not get it in its backlog (not saved yet), but live once it is, and only once.
    hub, publisher, gate, stored = _behind_a_gated_store()
    publisher.enqueue("call.started", {}, at=0.0)
    publisher.enqueue("turn.final", {"key": "0:0:0", "text": "hi"}, at=0.0)
    await asyncio.sleep(0.01)  # seq 1 is logged and waiting for the store
    subscribed = hub.subscribe("c1", 0)
    assert subscribed is not None
    assert subscribed.backlog == [] and stored == []
    gate.set()
    await asyncio.sleep(0.01)
    live = [subscribed.sub._queue.get_nowait().seq for _ in range(subscribed.sub.pending)]
    assert live == [1, 2] and [e.seq for e in stored] == [1, 2]
    # Once everything is published, a new subscriber gets it all as backlog.
    late = hub.subscribe("c1", 0)
    assert late is not None and [e.seq for e in late.backlog] == [1, 2]
    await publisher.cancel()


def test_a_firehose_resume_from_before_a_restart_reports_a_gap_and_replays_the_buffer() -> None:
    # The gateway restarted: its ids start again at 1, and a dashboard comes back with 5000.
    hub = LiveHub(firehose_buffer=100)
    publisher: Any = SimpleNamespace(subscribers=set())
    for i in range(30):
        hub.publish(publisher, CallEvent("c1", i + 1, "turn.final", 0.0, {"key": f"0:0:{i}"}))
    backlog, _sub, complete = hub.subscribe_all(5000)
    assert not complete
    assert [item.gseq for item in backlog] == list(range(1, 31))
    current, _sub, complete = hub.subscribe_all(30)
    assert complete and current == []


async def test_partials_do_not_pile_up_behind_a_stalled_store() -> None:
    # The store hangs (a full disk, a locked database) while a call goes on talking: once a few
    # events wait, each turn waits as one partial with its newest text, and a turn that became
    # final as its final only.
    hub, publisher, gate, stored = _behind_a_gated_store()
    publisher.enqueue("call.started", {}, at=0.0)
    await asyncio.sleep(0.01)  # call.started is waiting for the store
    full = " ".join(f"w{i}" for i in range(20))
    for turn in range(50):
        words = []
        for word in range(20):
            words.append(f"w{word}")
            publisher.enqueue("turn.partial", _turn(f"0:0:{turn}", " ".join(words)), at=0.0)
            publisher.enqueue("turn.partial", _turn(f"1:0:{turn}", " ".join(words)), at=0.0)
        publisher.enqueue("turn.final", _turn(f"0:0:{turn}", full), at=0.0)
    # 2,050 events offered; what waits is about one per turn and channel.
    assert 100 <= publisher.backlog <= 100 + _COALESCE_AFTER
    assert hub.publish_backlog == publisher.backlog
    assert hub.partials_coalesced >= 2050 - 100 - _COALESCE_AFTER
    sub = hub.subscribe("c1", 0)
    assert sub is not None
    waiting = publisher.backlog
    gate.set()
    await poll_until(lambda: publisher.backlog == 0 and sub.sub.pending == 1 + waiting)
    got = [sub.sub._queue.get_nowait() for _ in range(1 + waiting)]
    assert [e.seq for e in got] == list(range(1, 2 + waiting))
    assert got[0].type == "call.started"
    assert [e.type for e in stored] == ["call.started"] + ["turn.final"] * 50
    finals = [e.data["key"] for e in got if e.type == "turn.final"]
    assert finals == [f"0:0:{t}" for t in range(50)]
    # Channel 1's turns never became final: each one's last partial has its whole text.
    last: dict[str, str] = {}
    for e in got:
        if e.type == "turn.partial":
            last[e.data["key"]] = e.data["text"]
    assert {k: v for k, v in last.items() if k.startswith("1:")} == {
        f"1:0:{t}": full for t in range(50)
    }
    # Once the store keeps up, every partial is published again.
    for text in ("a", "a b", "a b c"):
        publisher.enqueue("turn.partial", _turn("1:0:50", text), at=0.0)
    await poll_until(lambda: sub.sub.pending == 3)
    assert [sub.sub._queue.get_nowait().data["text"] for _ in range(3)] == ["a", "a b", "a b c"]
    await publisher.cancel()
