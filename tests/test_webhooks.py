"""Signed webhooks from the SQLite outbox, against a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from gateway.config import WebhookSettings
from gateway.outputs.events import CallEvent
from gateway.outputs.store import SqliteStore
from gateway.outputs.webhooks import WebhookSender, deliveries_for, event_body, sign, verify

SECRET = "whsec-test-0123456789"


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    status: int | None  # None: never answered


@dataclass
class Receiver:
    """Answers ``statuses`` in turn, then ``then``; ``hang`` holds those attempts (1-based)
    unanswered until released; ``delay_s`` before each answer (to observe concurrency)."""

    statuses: list[int] = field(default_factory=list)
    then: int = 200
    hang: set[int] = field(default_factory=set)
    delay_s: float = 0.0
    requests: list[Request] = field(default_factory=list)
    active: int = 0
    peak: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        n = len(self.requests) + 1
        req = Request(dict(request.headers), body, None)
        self.requests.append(req)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if n in self.hang:
                await self.release.wait()
                return web.Response(status=599)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            status = self.statuses[n - 1] if n <= len(self.statuses) else self.then
            req.status = status
            return web.Response(status=status, text="ok" if status < 300 else "nope")
        finally:
            self.active -= 1

    def delivered(self) -> list[Request]:
        return [r for r in self.requests if r.status is not None and 200 <= r.status < 300]


@asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"http://127.0.0.1:{port}/hook?token=t0p-secret"
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()


def settings(url: str, **kw: Any) -> WebhookSettings:
    values: dict[str, Any] = {
        "urls": (url,),
        "secret": SecretStr(SECRET),
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 2.0,
        "give_up_after_s": 30.0,
        "concurrency": 4,
    }
    values.update(kw)
    return WebhookSettings(**values)


async def poll_until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.005)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "callgate.sqlite3")
    await s.open()
    yield s
    await s.close()


def ended_event(call_id: str = "c1") -> CallEvent:
    return CallEvent(call_id, 7, "call.ended", time.time(), {"id": call_id, "state": "ended"})


async def enqueue(store: SqliteStore, url: str, call_id: str = "c1") -> int:
    event = ended_event(call_id)
    body = event_body(event, {"text": "customer: my card number is secret"})
    deliveries = deliveries_for("call.ended", call_id, body, [url], time.time())
    (delivery_id,) = await store.enqueue(deliveries)
    return delivery_id


# ------------------------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    body = b'{"a":1}'
    header = sign(SECRET, 1700000000, body)
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify(SECRET, header, body, now=1700000000)
    assert verify(SECRET.encode(), header, body, now=1700000299)
    assert not verify(SECRET, header, body, now=1700000301)  # too old: a replay
    assert not verify(SECRET, header, body, now=1699999600)  # from the future
    assert not verify(SECRET, header, body + b" ", now=1700000000)
    assert not verify("other", header, body, now=1700000000)
    # Several v1 entries (secret rotation): any valid one is enough.
    rotated = f"t=1700000000,v1={'0' * 64},v1={expected}"
    assert verify(SECRET, rotated, body, now=1700000000)
    for bad in ["", "garbage", "t=abc,v1=00", f"v1={expected}", "t=1700000000", "t=1,v1=é"]:
        assert not verify(SECRET, bad, body, now=1700000000), bad


def test_deliveries_for_encodes_mappings_as_json() -> None:
    urls = ["http://a/x", "http://b/y"]
    out = deliveries_for("turn.final", "c1", {"text": "héllo"}, urls, 5.0)
    assert [d.url for d in out] == urls
    assert {d.body for d in out} == {'{"text":"héllo"}'.encode()}
    assert all((d.event_type, d.call_id, d.created_at) == ("turn.final", "c1", 5.0) for d in out)
    assert deliveries_for("call.ended", "c1", "raw", urls[:1], 1.0)[0].body == b"raw"
    body = json.loads(event_body(ended_event(), {"text": "t"}))
    assert body["type"] == "call.ended" and body["seq"] == 7 and body["transcript"] == {"text": "t"}


async def test_retried_until_accepted_then_delivered_exactly_once(store: SqliteStore) -> None:
    outcomes: list[str] = []
    async with serving(Receiver(statuses=[500, 500])) as rx:
        delivery_id = await enqueue(store, rx.url)
        sender = WebhookSender(store, settings(rx.url), on_outcome=outcomes.append)
        await sender.start()
        sender.notify()
        try:
            await poll_until(lambda: outcomes[-1:] == ["delivered"])
            await asyncio.sleep(0.1)  # nothing else arrives
        finally:
            await sender.close()
    assert outcomes == ["retry", "retry", "delivered"]
    assert [r.status for r in rx.requests] == [500, 500, 200]
    assert len(rx.delivered()) == 1
    for r in rx.requests:
        assert r.headers["X-Callgate-Delivery"] == str(delivery_id)  # stable across retries
        assert r.headers["X-Callgate-Event"] == "call.ended"
        assert r.headers["Content-Type"] == "application/json"
        assert verify(SECRET, r.headers["X-Callgate-Signature"], r.body)
        ts = r.headers["X-Callgate-Timestamp"]
        assert r.headers["X-Callgate-Signature"].startswith(f"t={ts},v1=")
    assert json.loads(rx.requests[-1].body)["data"]["id"] == "c1"
    assert await store.outbox_depth() == 0
    assert await store.dead_letters() == []


async def test_a_store_that_cannot_record_an_attempt_does_not_cause_a_retry_storm(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox cannot record the outcome (disk full): the delivery stays due in the store, and
    # the sender holds it back by the backoff itself instead of posting it again at once.
    async def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk I/O error")

    for name in ("mark_retry", "mark_dead", "mark_delivered"):
        monkeypatch.setattr(store, name, broken)
    async with serving(Receiver(statuses=[500] * 100)) as rx:
        await enqueue(store, rx.url)
        sender = WebhookSender(store, settings(rx.url, backoff_initial_s=0.5, backoff_max_s=0.5))
        await sender.start()
        sender.notify()
        try:
            await poll_until(lambda: len(rx.requests) >= 1)
            await asyncio.sleep(1.2)
        finally:
            await sender.close()
    assert 2 <= len(rx.requests) <= 4, len(rx.requests)  # about one every 0.5 s, not hundreds


async def test_a_restart_after_a_failure_still_delivers_once(tmp_path: Path) -> None:
    path = tmp_path / "callgate.sqlite3"
    async with serving(Receiver(statuses=[500])) as rx:
        store = SqliteStore(path)
        await store.open()
        delivery_id = await enqueue(store, rx.url)
        outcomes: list[str] = []
        # A long first backoff, so the first sender is surely closed before it would retry.
        first = WebhookSender(
            store,
            settings(rx.url, backoff_initial_s=0.5, backoff_max_s=0.5),
            on_outcome=outcomes.append,
        )
        await first.start()
        first.notify()
        await poll_until(lambda: outcomes == ["retry"])
        await first.close()
        await store.close()
        assert len(rx.requests) == 1

        store = SqliteStore(path)  # the restart: the same file, reopened
        await store.open()
        try:
            assert await store.outbox_depth() == 1
            outcomes2: list[str] = []
            second = WebhookSender(store, settings(rx.url), on_outcome=outcomes2.append)
            await second.start()  # no notify: it finds the pending delivery by itself
            try:
                await poll_until(lambda: outcomes2 == ["delivered"])
            finally:
                await second.close()
            assert await store.outbox_depth() == 0
        finally:
            await store.close()
    assert [r.status for r in rx.requests] == [500, 200]
    assert {r.headers["X-Callgate-Delivery"] for r in rx.requests} == {str(delivery_id)}


async def test_an_attempt_in_flight_at_close_stays_pending(store: SqliteStore) -> None:
    async with serving(Receiver(hang={1})) as rx:
        await enqueue(store, rx.url)
        sender = WebhookSender(store, settings(rx.url))
        await sender.start()
        sender.notify()
        await poll_until(lambda: len(rx.requests) == 1)
        assert sender.in_flight == 1
        await sender.close()
        assert sender.in_flight == 0
        (pending,) = await store.due(time.time(), 10)
        assert pending.attempts == 0  # untouched: it goes out again after a restart


async def test_always_failing_receiver_gets_the_delivery_dead_lettered(
    store: SqliteStore,
) -> None:
    outcomes: list[str] = []
    async with serving(Receiver(then=503)) as rx:
        started = time.time()
        delivery_id = await enqueue(store, rx.url)
        sender = WebhookSender(
            store, settings(rx.url, give_up_after_s=0.3), on_outcome=outcomes.append
        )
        await sender.start()
        sender.notify()
        try:
            await poll_until(lambda: "dead" in outcomes)
            await asyncio.sleep(0.1)  # and no further attempts
        finally:
            await sender.close()
    assert outcomes[-1] == "dead" and set(outcomes[:-1]) == {"retry"}
    assert len(rx.requests) == len(outcomes) >= 2
    assert time.time() - started < 3.0  # dead-lettered at give-up, not a backoff later
    assert await store.outbox_depth() == 0
    (dead,) = await store.dead_letters()
    assert dead.id == delivery_id
    assert dead.attempts == len(rx.requests)
    assert dead.last_error == "HTTP 503"
    assert dead.dead_at is not None and dead.dead_at - dead.created_at >= 0.3


async def test_concurrency_limit_is_honoured(store: SqliteStore) -> None:
    outcomes: list[str] = []
    async with serving(Receiver(delay_s=0.05)) as rx:
        for i in range(10):
            await enqueue(store, rx.url, call_id=f"c{i}")
        sender = WebhookSender(store, settings(rx.url, concurrency=3), on_outcome=outcomes.append)
        await sender.start()
        sender.notify()
        try:
            await poll_until(lambda: len(outcomes) == 10)
        finally:
            await sender.close()
    assert outcomes == ["delivered"] * 10
    assert rx.peak == 3
    assert len({r.headers["X-Callgate-Delivery"] for r in rx.requests}) == 10
    assert await store.outbox_depth() == 0


async def test_a_receiver_that_never_answers_times_out_and_is_retried(
    store: SqliteStore,
) -> None:
    outcomes: list[str] = []
    async with serving(Receiver(hang={1})) as rx:
        await enqueue(store, rx.url)
        sender = WebhookSender(store, settings(rx.url, timeout_s=0.2), on_outcome=outcomes.append)
        await sender.start()
        sender.notify()
        try:
            await poll_until(lambda: outcomes == ["retry", "delivered"])
        finally:
            await sender.close()
    assert [r.status for r in rx.requests] == [None, 200]
    assert (
        rx.requests[0].headers["X-Callgate-Delivery"]
        == rx.requests[1].headers["X-Callgate-Delivery"]
    )


async def test_connection_refused_is_retried_and_logged_without_secrets(
    store: SqliteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    # A port nothing listens on: bind one, then close it.
    async with serving(Receiver()) as rx:
        dead_url = rx.url
    outcomes: list[str] = []
    await enqueue(store, dead_url)
    sender = WebhookSender(
        store, settings(dead_url, give_up_after_s=0.2), on_outcome=outcomes.append
    )
    await sender.start()
    sender.notify()
    try:
        await poll_until(lambda: "dead" in outcomes)
    finally:
        await sender.close()
    (dead,) = await store.dead_letters()
    assert dead.last_error is not None and dead.last_error.startswith("connection failed")
    logs = capsys.readouterr()
    text = logs.out + logs.err
    assert "webhook.dead_lettered" in text
    assert "t0p-secret" not in text  # the URL's query is never logged
    assert "my card number" not in text  # nor the body
    assert SECRET not in text


async def test_enqueued_while_idle_goes_out_on_notify(store: SqliteStore) -> None:
    outcomes: list[str] = []
    async with serving(Receiver()) as rx:
        # A long poll interval: only notify() can make this prompt.
        sender = WebhookSender(store, settings(rx.url), on_outcome=outcomes.append, poll_s=60)
        await sender.start()
        try:
            await asyncio.sleep(0.05)  # the sender is idle, waiting
            ev = ended_event()
            ids = await store.add_event_and_enqueue(
                ev, deliveries_for(ev.type, ev.call_id, event_body(ev), [rx.url], time.time())
            )
            assert len(ids) == 1
            sender.notify()
            await poll_until(lambda: outcomes == ["delivered"], within_s=2.0)
        finally:
            await sender.close()


def test_a_secret_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="secret"):
        WebhookSender(SqliteStore(tmp_path / "x.sqlite3"), WebhookSettings())
