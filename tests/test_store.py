"""The SQLite store on a real file: round trips, paging, idempotence, crash safety, outbox."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.outputs.events import CallEvent
from gateway.outputs.store import SCHEMA_VERSION, NewDelivery, SqliteStore, StoreError
from gateway.transcript.model import TurnKey
from gateway.transcript.render import to_json

ROOT = Path(__file__).resolve().parent.parent
CRASH_CHILD = ROOT / "tests" / "store_crash_child.py"

CHANNELS = [
    {"index": 0, "role": "customer", "participant": None, "speaker": "customer", "on_hold": False},
    {"index": 1, "role": "agent", "participant": "Ann", "speaker": "Ann", "on_hold": False},
]


def summary(call_id: str, state: str = "active", started_at: float = 1000.0, **kw: Any) -> dict:
    doc: dict[str, Any] = {
        "id": call_id,
        "source": "twilio",
        "source_ids": {"callSid": f"CA-{call_id}", "streamSid": f"MZ-{call_id}"},
        "state": state,
        "end_reason": "",
        "started_at": started_at,
        "ended_at": None,
        "duration_ms": 0,
        "metadata": {"queue": "support"},
        "channels": CHANNELS,
    }
    doc.update(kw)
    return doc


def turn(channel: int, order: int, start: int, end: int, text: str, final: bool = True) -> dict:
    words = text.split()
    step = (end - start) // max(1, len(words))
    return {
        "key": f"{channel}:0:{order}",
        "channel": channel,
        "epoch": 0,
        "turn_order": order,
        "speaker": "customer" if channel == 0 else "Ann",
        "role": "customer" if channel == 0 else "agent",
        "start": start,
        "end": end,
        "text": text,
        "confidence": 0.9,
        "words": [
            {"text": w, "start": start + i * step, "end": start + (i + 1) * step, "confidence": 0.9}
            for i, w in enumerate(words)
        ],
        "final": final,
    }


def utterance(index: int, t: dict) -> dict:
    return {
        "index": index,
        "channel": t["channel"],
        "speaker": t["speaker"],
        "role": t["role"],
        "start": t["start"],
        "end": t["end"],
        "text": t["text"],
        "confidence": t["confidence"],
        "words": t["words"],
        "turns": [t["key"]],
    }


class Seq:
    """Builds one call's events with consecutive sequence numbers."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self.seq = 0

    def __call__(self, type_: str, data: dict) -> CallEvent:
        self.seq += 1
        return CallEvent(self.call_id, self.seq, type_, 2000.0 + self.seq, data)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "data" / "callgate.sqlite3")
    assert await s.open() == 0
    yield s
    await s.close()


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the file directly (a separate connection, in a thread: never on the loop)."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    return await asyncio.to_thread(_rows, path, sql)


# ------------------------------------------------------------------------------------------------


async def test_round_trip_of_an_ended_call(store: SqliteStore) -> None:
    ev = Seq("c1")
    t1 = turn(0, 0, 0, 900, "hello there")
    t2 = turn(1, 0, 1000, 2000, "hi how can I help")
    events = [
        ev("call.started", summary("c1")),
        ev("turn.final", t1),
        ev("turn.final", t2),
        ev("transcript.utterance", utterance(0, t1)),
        ev("transcript.utterance", utterance(1, t2)),
        ev(
            "call.ended",
            summary("c1", "ended", end_reason="hangup", ended_at=1060.0, duration_ms=2100),
        ),
    ]
    for event in events:
        assert await store.add_event(event) is True

    call = await store.get_call("c1")
    assert call == summary("c1", "ended", end_reason="hangup", ended_at=1060.0, duration_ms=2100)
    assert await store.get_call("CA-c1") == call  # by a source id
    assert await store.get_call("MZ-c1") == call
    assert await store.get_call("nope") is None
    assert await store.events("c1") == events
    assert await store.events("c1", after_seq=4) == events[4:]
    assert await store.events("c1", after_seq=1, limit=2) == events[1:3]
    assert await store.last_seq("c1") == 6
    assert await store.last_seq("nope") == 0

    transcript = await store.transcript("c1")
    assert transcript is not None
    doc = to_json(transcript)
    assert doc["call_id"] == "c1"
    assert doc["duration_ms"] == 2100
    assert doc["text"] == "customer: hello there\nAnn: hi how can I help"
    assert [c["speaker"] for c in doc["channels"]] == ["customer", "Ann"]
    assert doc["metadata"] == {"queue": "support"}
    assert transcript.utterances[1].turns == (TurnKey(1, 0, 0),)
    assert transcript.utterances[0].words[1].text == "there"
    assert await store.transcript("nope") is None


async def test_save_call_upserts_and_a_stale_summary_never_reopens_a_call(
    store: SqliteStore,
) -> None:
    await store.save_call(summary("c1", "new"))
    await store.save_call(summary("c1", "active", metadata={"a": "b"}))
    assert (await store.get_call("c1"))["metadata"] == {"a": "b"}  # type: ignore[index]
    await store.save_call(summary("c1", "failed", end_reason="stt down", ended_at=1001.0))
    await store.save_call(summary("c1", "active"))  # late, out of order: ignored
    call = await store.get_call("c1")
    assert call is not None
    assert (call["state"], call["end_reason"], call["ended_at"]) == ("failed", "stt down", 1001.0)
    # Source ids are replaced with the call's current ones.
    await store.save_call(summary("c1", "ended", source_ids={"callSid": "CA-new"}, ended_at=1002.0))
    assert await store.get_call("CA-c1") is None
    assert (await store.get_call("CA-new"))["id"] == "c1"  # type: ignore[index]


async def test_partials_are_never_stored(store: SqliteStore, tmp_path: Path) -> None:
    ev = Seq("c1")
    await store.add_event(ev("call.started", summary("c1")))
    partial = ev("turn.partial", turn(0, 0, 0, 500, "hel", final=False))
    assert await store.add_event(partial) is False
    assert await store.add_event_and_enqueue(partial, [_new("c1")]) == []
    final = ev("turn.final", turn(0, 0, 0, 900, "hello"))
    assert await store.add_event(final) is True
    assert [e.type for e in await store.events("c1")] == ["call.started", "turn.final"]
    types = await rows(store.path, "SELECT type FROM events")
    assert ("turn.partial",) not in types
    assert await store.outbox_depth() == 0


async def test_duplicate_seq_is_an_idempotent_no_op(store: SqliteStore) -> None:
    ev = Seq("c1")
    started = ev("call.started", summary("c1"))
    final = ev("turn.final", turn(0, 0, 0, 900, "hello"))
    assert await store.add_event(started) is True
    assert await store.add_event(final) is True
    assert await store.add_event(final) is False
    # The same seq with other content (a replay after a restart) keeps the first: finals are
    # immutable (invariant 4).
    other = CallEvent("c1", final.seq, "turn.final", 9.0, turn(0, 0, 0, 900, "changed"))
    assert await store.add_event(other) is False
    ended = ev("call.ended", summary("c1", "ended", ended_at=1010.0))
    assert await store.add_event_and_enqueue(ended, [_new("c1")]) != []
    assert await store.add_event_and_enqueue(ended, [_new("c1")]) == []  # no second webhook
    assert await store.events("c1") == [started, final, ended]
    assert await store.outbox_depth() == 1


async def test_add_event_and_enqueue_is_one_transaction(store: SqliteStore) -> None:
    ev = Seq("c1")
    await store.add_event(ev("call.started", summary("c1")))
    ended = ev("call.ended", summary("c1", "ended", ended_at=1010.0))
    bad = NewDelivery("http://x", "call.ended", "c1", None, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.add_event_and_enqueue(ended, [_new("c1"), bad])
    # Neither the event nor the first delivery was committed.
    assert [e.type for e in await store.events("c1")] == ["call.started"]
    assert (await store.get_call("c1"))["state"] == "active"  # type: ignore[index]
    assert await store.outbox_depth() == 0
    assert store.pending_deliveries == 0
    ids = await store.add_event_and_enqueue(ended, [_new("c1"), _new("c1", url="http://b")])
    assert len(ids) == 2
    assert store.pending_deliveries == 2
    assert (await store.get_call("c1"))["state"] == "ended"  # type: ignore[index]


async def test_paging_has_no_duplicates_or_gaps_while_calls_are_added(
    store: SqliteStore,
) -> None:
    # 25 calls, several sharing a start time (ties are broken by id).
    for i in range(25):
        await store.save_call(summary(f"c{i:02d}", "ended", started_at=1000.0 + i // 3))
    seen: list[str] = []
    cursor: str | None = None
    added = 0
    while True:
        page, cursor = await store.list_calls(limit=7, cursor=cursor)
        seen += [c["id"] for c in page]
        # New calls arrive between pages (newer start times): they belong before page 1.
        await store.save_call(summary(f"new{added}", "active", started_at=5000.0 + added))
        added += 1
        if cursor is None:
            break
    expected = sorted((f"c{i:02d}" for i in range(25)), key=lambda c: (int(c[1:]) // 3, c))
    assert seen == expected[::-1]
    # Newest first on a fresh listing, the new calls included.
    page, _ = await store.list_calls(limit=3)
    assert [c["id"] for c in page] == [f"new{added - 1}", f"new{added - 2}", f"new{added - 3}"]
    # A listing of exactly one page has no next cursor.
    page, cursor = await store.list_calls(state="ended", since=1008.0)
    assert [c["id"] for c in page] == ["c24"] and cursor is None


async def test_list_filters(store: SqliteStore) -> None:
    await store.save_call(summary("a", "active", started_at=100.0))
    await store.save_call(summary("b", "ended", started_at=200.0, ended_at=210.0))
    await store.save_call(summary("c", "failed", started_at=300.0, ended_at=310.0))
    ids = lambda page: [c["id"] for c in page[0]]  # noqa: E731
    assert ids(await store.list_calls()) == ["c", "b", "a"]
    assert ids(await store.list_calls(state="active")) == ["a"]
    assert ids(await store.list_calls(state=("ended", "failed"))) == ["c", "b"]
    assert ids(await store.list_calls(since=200.0)) == ["c", "b"]
    assert ids(await store.list_calls(until=200.0)) == ["a"]
    assert ids(await store.list_calls(since=150.0, until=250.0)) == ["b"]
    assert ids(await store.list_calls(limit=0)) == ["c"]  # clamped to at least one
    with pytest.raises(ValueError, match="invalid cursor"):
        await store.list_calls(cursor="not-a-cursor")


async def test_a_final_survives_kill_9_once_add_event_returned(tmp_path: Path) -> None:
    path = tmp_path / "callgate.sqlite3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CRASH_CHILD),
        str(path),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    acked: list[int] = []
    try:
        while len(acked) < 40:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.startswith(b"ready "), line
            acked.append(int(line.split()[1]))
    finally:
        # The child is still writing finals as fast as it can: the kill lands mid-write.
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert acked == list(range(1, 41))

    store = SqliteStore(path)
    assert await store.open() == 1  # the call the child left active
    try:
        call = await store.get_call("CA-crash")
        assert call is not None
        assert call["state"] == "interrupted"
        assert call["end_reason"] == "interrupted"
        events = await store.events("crash-call")
        seqs = [e.seq for e in events]
        assert seqs == list(range(1, len(seqs) + 1))  # no gap: commits are in order
        assert set(acked) <= set(seqs)  # every acknowledged final is there
        assert call["ended_at"] == events[-1].time  # the last thing we know of the call
        transcript = await store.transcript("crash-call")
        assert transcript is not None
        assert len(transcript.utterances) == len(seqs) - 1  # one per final
        assert transcript.utterances[0].text == "turn 0"
        assert transcript.utterances[38].text == "turn 38"
    finally:
        await store.close()


async def test_interrupted_call_transcript_comes_from_its_finals(tmp_path: Path) -> None:
    path = tmp_path / "callgate.sqlite3"
    store = SqliteStore(path)
    await store.open()
    ev = Seq("c1")
    a = turn(0, 0, 0, 1000, "first customer")
    b = turn(1, 0, 500, 1500, "agent overlaps")
    c = turn(0, 1, 2000, 2600, "customer again")
    d = turn(1, 1, 2000, 2400, "agent same start")
    await store.add_event(ev("call.started", summary("c1")))
    # Finals arrive in any order across channels; only the first was released as an utterance.
    for t in (b, a, d, c):
        await store.add_event(ev("turn.final", t))
    await store.add_event(ev("transcript.utterance", utterance(0, a)))
    await store.save_call(summary("other", "ended", ended_at=1001.0))
    await store.close()  # the process "dies" without ending c1

    store = SqliteStore(path)
    assert await store.open() == 1
    try:
        assert (await store.get_call("c1"))["state"] == "interrupted"  # type: ignore[index]
        assert (await store.get_call("other"))["state"] == "ended"  # type: ignore[index]
        transcript = await store.transcript("c1")
        assert transcript is not None
        # Ordered by (start, end, channel); the released utterance is not repeated.
        assert [u.text for u in transcript.utterances] == [
            "first customer",
            "agent overlaps",
            "agent same start",
            "customer again",
        ]
        assert transcript.duration_ms == 2600
        assert [u.speaker for u in transcript.utterances] == ["customer", "Ann", "Ann", "customer"]
    finally:
        await store.close()
    # A third open finds nothing left to mark.
    store = SqliteStore(path)
    assert await store.open() == 0
    await store.close()


async def test_delete_and_purge(store: SqliteStore) -> None:
    for call_id, state, ended in [
        ("old-ended", "ended", 100.0),
        ("old-failed", "failed", 150.0),
        ("recent", "ended", 900.0),
        ("live", "active", None),
    ]:
        ev = Seq(call_id)
        await store.add_event(ev("call.started", summary(call_id)))
        await store.add_event(ev("turn.final", turn(0, 0, 0, 500, "words")))
        await store.save_call(summary(call_id, state, ended_at=ended))
    ids = await store.enqueue([_new("old-ended"), _new("recent")])
    await store.mark_dead(ids[1], "HTTP 500", at=120.0)

    assert await store.delete_call("old-failed") is True
    assert await store.delete_call("old-failed") is False
    assert await store.get_call("CA-old-failed") is None
    assert await store.events("old-failed") == []

    purged = await store.purge(older_than=500.0)  # old-ended (live and recent stay)
    assert [(c["id"], c["metadata"]) for c in purged] == [("old-ended", {"queue": "support"})]
    remaining, _ = await store.list_calls()
    assert sorted(c["id"] for c in remaining) == ["live", "recent"]
    assert await store.events("old-ended") == []
    assert await store.get_call("CA-old-ended") is None
    assert await store.outbox_depth() == 0  # the purged call's delivery went with it
    assert await store.dead_letters() == []  # died before the cutoff
    leftovers = await rows(
        store.path,
        "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM source_ids)",
    )
    assert leftovers == [(4, 4)]  # two events and two source ids each for live and recent


async def test_a_call_that_failed_before_it_started_is_purged_too(store: SqliteStore) -> None:
    # No end time: retention counts from its last update instead of keeping it forever.
    await store.save_call(summary("never", "failed", started_at=None))
    assert await store.purge(older_than=500.0) == []  # updated just now
    purged = await store.purge(older_than=time.time() + 60)
    assert [c["id"] for c in purged] == ["never"]


async def test_purge_in_batches(store: SqliteStore) -> None:
    for i in range(1203):
        await store.save_call(summary(f"c{i}", "ended", ended_at=10.0))
    assert len(await store.purge(older_than=20.0)) == 1203
    assert await store.list_calls() == ([], None)


def _new(call_id: str, url: str = "http://a", created_at: float = 10.0) -> NewDelivery:
    return NewDelivery(url, "call.ended", call_id, b'{"x":1}', created_at)


async def test_outbox_due_retry_and_dead_ordering(store: SqliteStore) -> None:
    a, b, c = await store.enqueue(
        [_new("c1", "http://a", 10.0), _new("c1", "http://b", 11.0), _new("c2", "http://c", 12.0)]
    )
    assert a < b < c
    assert await store.outbox_depth() == 3 == store.pending_deliveries
    assert [d.id for d in await store.due(now=11.5, limit=10)] == [a, b]  # next_at = created_at
    assert [d.id for d in await store.due(now=20.0, limit=2)] == [a, b]
    assert [d.id for d in await store.due(now=20.0, limit=10, exclude={a})] == [b, c]
    assert await store.next_due_at() == 10.0
    assert await store.next_due_at(exclude=[a, b]) == 12.0

    await store.mark_retry(a, 1, 30.0, "HTTP 500")
    due = await store.due(now=20.0, limit=10)
    assert [d.id for d in due] == [b, c]
    later = await store.due(now=30.0, limit=10)
    assert [d.id for d in later] == [b, c, a]  # by next_at, then id
    retried = later[2]
    assert (retried.attempts, retried.last_error, retried.next_at) == (1, "HTTP 500", 30.0)
    assert retried.body == b'{"x":1}' and retried.url == "http://a" and retried.state == "pending"

    await store.mark_delivered(b)
    await store.mark_dead(c, "timeout", attempts=4, at=40.0)
    await store.mark_dead(a, "HTTP 404", at=50.0)
    await store.mark_delivered(a)  # already dead: stays a dead letter
    assert await store.outbox_depth() == 0 == store.pending_deliveries
    assert await store.due(now=1e12, limit=10) == []
    assert await store.next_due_at() is None
    dead = await store.dead_letters()
    assert [(d.id, d.attempts, d.last_error, d.dead_at) for d in dead] == [
        (a, 1, "HTTP 404", 50.0),
        (c, 4, "timeout", 40.0),
    ]
    assert await store.revive(c, now=60.0) is True
    assert await store.revive(b, now=60.0) is False  # delivered: gone
    assert [(d.id, d.attempts, d.created_at) for d in await store.due(60.0, 10)] == [(c, 0, 60.0)]
    assert store.pending_deliveries == 1


async def test_outbox_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(path)
    await store.open()
    ids = await store.enqueue([_new("c1"), _new("c2")])
    await store.mark_dead(ids[1], "HTTP 500")
    await store.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert store.pending_deliveries == 1
        assert [d.id for d in await store.due(1e12, 10)] == [ids[0]]
        assert [d.id for d in await store.dead_letters()] == [ids[1]]
    finally:
        await store.close()


async def test_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    assert await rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert await rows(path, "PRAGMA journal_mode") == [("wal",)]

    def bump() -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    await asyncio.to_thread(bump)
    newer = SqliteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await newer.open()
    await newer.close()


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite3")
    with pytest.raises(StoreError):
        await store.get_call("x")  # not open yet
    await store.open()
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError):
        await store.get_call("x")


async def test_on_write_reports_commit_latency(tmp_path: Path) -> None:
    latencies: list[float] = []
    store = SqliteStore(tmp_path / "db.sqlite3", on_write=latencies.append)
    await store.open()
    try:
        await store.save_call(summary("c1"))
        await store.add_event(CallEvent("c1", 1, "turn.partial", 1.0, {}))  # not written
        await store.add_event(CallEvent("c1", 1, "turn.final", 1.0, turn(0, 0, 0, 10, "a")))
        assert len(latencies) == 2 and all(x >= 0 for x in latencies)
    finally:
        await store.close()


async def test_concurrent_writers_and_readers(store: SqliteStore) -> None:
    """Many calls writing at once, readers alongside: every write lands, nothing blocks."""

    async def one_call(i: int) -> None:
        ev = Seq(f"c{i}")
        await store.add_event(ev("call.started", summary(f"c{i}", started_at=float(i))))
        for k in range(20):
            await store.add_event(ev("turn.final", turn(k % 2, k, k * 100, k * 100 + 90, "w")))
            await store.get_call(f"c{i}")

    await asyncio.gather(*(one_call(i) for i in range(10)))
    page, _ = await store.list_calls(limit=100)
    assert len(page) == 10
    for i in range(10):
        assert await store.last_seq(f"c{i}") == 21


async def test_group_commit_rolls_back_only_the_failing_write(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes queued behind a busy writer share one transaction, each in its own savepoint:
    the one that fails (after enqueuing a delivery) takes nothing of the others with it."""
    batches: list[int] = []
    run_batch = store._run_batch

    def counted(jobs: list[Any]) -> list[tuple[bool, Any]]:
        batches.append(len(jobs))
        return run_batch(jobs)

    monkeypatch.setattr(store, "_run_batch", counted)
    a, b, c = Seq("a"), Seq("b"), Seq("c")
    bad = NewDelivery("http://x", "call.ended", "b", None, 1.0)  # type: ignore[arg-type]
    results = await asyncio.gather(
        store.save_call(summary("z")),  # occupies the writer; the rest queue behind it
        store.add_event_and_enqueue(a("call.ended", summary("a", "ended")), [_new("a")]),
        store.add_event_and_enqueue(b("call.ended", summary("b", "ended")), [_new("b"), bad]),
        store.add_event(c("turn.final", turn(0, 0, 0, 90, "hello"))),
        return_exceptions=True,
    )
    assert batches[:2] == [1, 3]
    assert results[0] is None and len(results[1]) == 1 and results[3] is True  # type: ignore[arg-type]
    assert isinstance(results[2], TypeError)
    assert [e.type for e in await store.events("a")] == ["call.ended"]
    assert await store.events("b") == []
    assert await store.get_call("b") is None
    assert [e.type for e in await store.events("c")] == ["turn.final"]
    assert await store.outbox_depth() == 1 and store.pending_deliveries == 1


async def test_close_commits_writes_still_queued(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = SqliteStore(path)
    await store.open()
    ev = Seq("c1")
    writes = [
        asyncio.ensure_future(store.add_event(ev("turn.final", turn(0, k, k, k + 1, "w"))))
        for k in range(50)
    ]
    await asyncio.sleep(0)  # every write is queued; most wait behind the first batch
    await store.close()
    assert all(w.done() and w.result() is True for w in writes)
    assert await rows(path, "SELECT COUNT(*) FROM events") == [(50,)]
