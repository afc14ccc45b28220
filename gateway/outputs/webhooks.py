"""Signed webhooks, delivered from the store's durable outbox (invariant 8).

Flow: the app enqueues deliveries (:func:`deliveries_for`) in the same transaction as the event
they announce (:meth:`~gateway.outputs.store.SqliteStore.add_event_and_enqueue`) and calls
:meth:`WebhookSender.notify`; the sender's background task posts every due delivery, at most
``concurrency`` at a time, and records the outcome in the outbox:

- a 2xx answer: delivered (removed from the outbox);
- anything else (non-2xx, 3xx included since redirects are not followed, a timeout after
  ``timeout_s``, a connection error): retried after an exponential backoff with full jitter,
  ``uniform(0, min(backoff_max_s, backoff_initial_s * 2 ** (attempts - 1)))``;
- still failing ``give_up_after_s`` after the event was created: dead-lettered (kept in the
  outbox as a dead letter, queryable, never retried by itself).

Delivery is at least once: an attempt cut short by a shutdown or crash stays pending and is tried
again after restart, even if the receiver had already processed it. ``X-Callgate-Delivery`` (the
outbox id) is the same on every attempt, so receivers de-duplicate on it.

Each request carries ``Content-Type: application/json``, ``X-Callgate-Event`` (the event type),
``X-Callgate-Delivery``, ``X-Callgate-Timestamp`` (unix seconds) and ``X-Callgate-Signature:
t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``; :func:`verify` checks one.
Log lines name the delivery, event, call and the URL without its query; never the body (it holds
transcripts) or the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.config import WebhookSettings
from gateway.observability.logging import get_logger
from gateway.outputs.events import CallEvent
from gateway.outputs.store import Delivery, NewDelivery, Outbox

log = get_logger("gateway.webhooks")

EVENT_HEADER = "X-Callgate-Event"
DELIVERY_HEADER = "X-Callgate-Delivery"
TIMESTAMP_HEADER = "X-Callgate-Timestamp"
SIGNATURE_HEADER = "X-Callgate-Signature"
USER_AGENT = "Callgate-Webhooks/1"

OUTCOMES = ("delivered", "retry", "dead")
"""What ``on_outcome`` is called with after each attempt."""


# ------------------------------------------------------------------------------------------------
# Signatures


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Callgate-Signature`` value: ``t=<timestamp>,v1=<hex HMAC-SHA256>``."""
    return f"t={int(timestamp)},v1={_digest(secret, int(timestamp), body)}"


def verify(
    secret: str | bytes,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance_s`` of ``now``.

    Accepts any of several ``v1=`` entries (a sender rotating secrets may send two); compares in
    constant time. A malformed header is simply invalid (False), never an exception.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False  # a replay of an old request, or a badly wrong clock
    expected = _digest(secret, timestamp, body).encode()
    valid = False
    for candidate in candidates:  # no early exit: the time does not depend on which matched
        valid |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    return valid


# ------------------------------------------------------------------------------------------------
# Building deliveries


def _body_bytes(body: bytes | str | Mapping[str, Any]) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def event_body(event: CallEvent, transcript: Mapping[str, Any] | None = None) -> bytes:
    """The JSON body announcing ``event``: the event itself (``seq``, ``call_id``, ``type``,
    ``time``, ``data``) plus, when given, ``transcript`` (for ``call.ended``)."""
    doc: dict[str, Any] = event.to_json()
    if transcript is not None:
        doc["transcript"] = dict(transcript)
    return _body_bytes(doc)


def deliveries_for(
    event_type: str,
    call_id: str,
    body: bytes | str | Mapping[str, Any],
    urls: Iterable[str],
    created_at: float,
) -> list[NewDelivery]:
    """One outbox delivery of ``body`` per URL (a mapping is encoded as compact JSON)."""
    data = _body_bytes(body)
    return [NewDelivery(url, event_type, call_id, data, created_at) for url in urls]


def _safe_url(url: str) -> str:
    """The URL for logs: no credentials, query or fragment (they may hold tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


# ------------------------------------------------------------------------------------------------
# The sender


class WebhookSender:
    """Posts the outbox's due deliveries in an owned background task (see module docstring).

    ``on_outcome(outcome)`` is called after every attempt with ``"delivered"``, ``"retry"`` or
    ``"dead"`` (a metrics hook). ``clock`` gives unix time for signatures, backoff and give-up.
    The task wakes on :meth:`notify`, when an attempt finishes, at the earliest ``next_at`` of a
    pending delivery, and at least every ``poll_s`` (so a delivery enqueued without ``notify``
    still goes out). One sender per outbox: attempts in flight are tracked in memory.
    """

    def __init__(
        self,
        store: Outbox,
        settings: WebhookSettings,
        *,
        on_outcome: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        secret = settings.secret.get_secret_value()
        if not secret:
            raise ValueError("webhooks.secret is required to sign deliveries")
        self._store = store
        self._settings = settings
        self._secret = secret.encode()
        self._on_outcome = on_outcome
        self._clock = clock
        self._poll_s = poll_s
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        # Deliveries whose outcome the store could not record (disk full, I/O error): still due
        # there, so held back here by the same backoff instead of being posted in a tight loop.
        self._not_before: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Attempts in progress now."""
        return len(self._in_flight)

    async def start(self) -> None:
        """Open the HTTP client and start the background task (once)."""
        if self._task is not None or self._closed:
            raise RuntimeError("WebhookSender was already started")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            connector=aiohttp.TCPConnector(limit=self._settings.concurrency),
            headers={"User-Agent": USER_AGENT},
        )
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    def notify(self) -> None:
        """Something was enqueued: look at the outbox now instead of at the next timer."""
        self._wake.set()

    async def close(self) -> None:
        """Stop: cancel the task and every attempt in flight, and wait for them.

        Cancelled attempts leave their delivery pending, so it is sent after a restart.
        Idempotent.
        """
        self._closed = True
        tasks = [t for t in (self._task, *self._in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._in_flight.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking, so a notify() during the look is not lost
            try:
                wait = await self._dispatch()
            except Exception as exc:  # noqa: BLE001 - a store error must not end the sender
                log.error("webhook.outbox_failed", error=repr(exc))
                wait = self._poll_s
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _dispatch(self) -> float:
        """Start attempts for due deliveries; returns how long to sleep at most."""
        limit = self._settings.concurrency
        now = self._clock()
        for delivery_id in [i for i, at in self._not_before.items() if at <= now]:
            del self._not_before[delivery_id]
        held = set(self._in_flight) | set(self._not_before)
        free = limit - len(self._in_flight)
        if free > 0:
            due = await self._store.due(now, free, exclude=held)
            for delivery in due:
                self._spawn(delivery)
                held.add(delivery.id)
        if len(self._in_flight) >= limit:
            return self._poll_s  # a finishing attempt wakes the loop
        wait = self._poll_s
        if self._not_before:
            wait = min(wait, max(0.0, min(self._not_before.values()) - now))
        next_at = await self._store.next_due_at(exclude=held)
        if next_at is None:
            return wait
        return min(wait, max(0.0, next_at - self._clock()))

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._attempt(delivery), name=f"webhook-{delivery.id}")
        self._in_flight[delivery.id] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._in_flight.get(delivery.id) is task:
                del self._in_flight[delivery.id]
            self._wake.set()

        task.add_done_callback(done)

    # -- one attempt -----------------------------------------------------------------------------

    async def _attempt(self, d: Delivery) -> None:
        """One attempt and its bookkeeping; never raises (the sender outlives any failure)."""
        attempts = d.attempts + 1
        fields: dict[str, Any] = {
            "delivery": d.id,
            "event_type": d.event_type,  # not "event": structlog's own key
            "call_id": d.call_id,
            "url": _safe_url(d.url),
            "attempts": attempts,
        }
        try:
            error = await self._post(d)
            outcome, retry_at = await self._record(d, attempts, error)
        except Exception as exc:  # noqa: BLE001 - the delivery stays pending and is retried
            log.error("webhook.attempt_failed", error=repr(exc), **fields)
            pause = max(self._settings.backoff_initial_s, self._backoff(attempts))
            self._not_before[d.id] = self._clock() + pause
            return
        if outcome == "delivered":
            log.info("webhook.delivered", **fields)
        elif outcome == "dead":
            log.error("webhook.dead_lettered", error=error, **fields)
        else:
            log.warning("webhook.retry", error=error, retry_at=retry_at, **fields)
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    async def _record(self, d: Delivery, attempts: int, error: str | None) -> tuple[str, float]:
        """Write the attempt's outcome to the outbox; returns it and the retry time (if any)."""
        now = self._clock()
        if error is None:
            await self._store.mark_delivered(d.id)
            return "delivered", 0.0
        give_up_at = d.created_at + self._settings.give_up_after_s
        if now >= give_up_at:
            await self._store.mark_dead(d.id, error, attempts=attempts, at=now)
            return "dead", 0.0
        # The last retry lands on the give-up time, so the dead letter is declared then and not
        # up to one backoff later.
        next_at = min(now + self._backoff(attempts), give_up_at)
        await self._store.mark_retry(d.id, attempts, next_at, error)
        return "retry", next_at

    def _backoff(self, attempts: int) -> float:
        """Full jitter: uniform over [0, min(max, initial * 2^(attempts-1))]."""
        s = self._settings
        ceiling = min(s.backoff_max_s, s.backoff_initial_s * 2 ** min(attempts - 1, 64))
        return self._rng.uniform(0.0, ceiling)

    async def _post(self, d: Delivery) -> str | None:
        """POST the delivery once; None if it was accepted (2xx), else a short error text
        (status, timeout or exception type: never the body)."""
        session = self._session
        if session is None:
            raise RuntimeError("WebhookSender is not started")
        timestamp = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            EVENT_HEADER: d.event_type,
            DELIVERY_HEADER: str(d.id),
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, d.body),
        }
        try:
            async with session.post(
                d.url, data=d.body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
        except TimeoutError:
            return f"timeout after {self._settings.timeout_s:g} s"
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            return f"connection failed: {reason}"
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            # The type only: messages of some (InvalidURL) repeat the URL, query included.
            return type(exc).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"
