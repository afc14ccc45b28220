"""The durable store: calls, their events and the webhook outbox (SQLite in WAL mode by default).

:class:`CallStore` is the interface (another engine, e.g. PostgreSQL, can implement it later);
:class:`SqliteStore` is the embedded default. Every method is a coroutine and every database call
runs off the event loop (invariant 9): one worker thread owns the *writer* connection and runs
every write, one after another (SQLite allows one writer at a time anyway, and a single owner
needs no locks); a second worker thread owns a *reader* connection, so a slow listing or
transcript read never delays a final's commit (WAL lets readers and the writer run concurrently).

What is stored (invariant 8, persist before publish):

- ``calls``: one row per call, from :func:`~gateway.outputs.events.call_summary` (``save_call``,
  and every ``call.started`` / ``call.updated`` / ``call.ended`` event). A call already ``ended``
  or ``failed`` is never moved back to a live state by a stale summary.
- ``events``: ``call.*``, ``turn.final`` and ``transcript.utterance`` events, unique by
  ``(call_id, seq)``; ``turn.partial`` is never stored (it is superseded by its final).
- ``source_ids``: each source id value (Twilio callSid, SIP Call-ID, ...) -> call id, so a call
  can be found by the id its platform knows it by.
- ``outbox``: webhook deliveries, pending or dead-lettered. Delivered rows are deleted. Sharing the
  database lets ``call.ended`` and its deliveries commit in one transaction
  (:meth:`SqliteStore.add_event_and_enqueue`): no event without its webhooks, and vice versa.

On :meth:`SqliteStore.open`, calls left in a live state (``new``/``active``/``ending``) by a crash
or kill are marked ``interrupted``; their transcript is rebuilt from their stored finals.

Durability: ``journal_mode=WAL`` with ``synchronous=NORMAL``. A transaction is committed once its
frames are written to the WAL file (into the OS page cache); only WAL checkpoints fsync. That
survives a crash or ``kill -9`` of the process (the kernel still writes the page cache out), which
is the requirement; only a power loss or kernel crash may lose the last few commits, and even then
the database stays consistent. ``synchronous=FULL`` would add an fsync to every final for a
guarantee (power loss) that the gateway does not promise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from gateway.outputs.events import CallEvent
from gateway.transcript.model import ChannelInfo, Transcript, TurnKey, Utterance, Word

T = TypeVar("T")

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the schema this module creates and understands."""

STORED_EVENT_TYPES = frozenset(
    {"call.started", "turn.final", "transcript.utterance", "call.updated", "call.ended"}
)
"""Event types :meth:`CallStore.add_event` persists; anything else (``turn.partial``) is skipped."""

LIVE_STATES = ("new", "active", "ending")
"""Stored states of a call still in progress; found on open, they become ``interrupted``."""

FINISHED_STATES = ("ended", "failed", "interrupted")
"""Stored states of a call that is over (``purge`` deletes these)."""

INTERRUPTED = "interrupted"

_TERMINAL = ("ended", "failed")  # a stale live summary never overwrites these
_CALL_EVENTS = frozenset({"call.started", "call.updated", "call.ended"})
_MAX_PAGE = 1000
_PURGE_BATCH = 500  # calls per purge transaction, so finals are not held up behind a big purge

_SCHEMA = """
CREATE TABLE calls (
    id          TEXT PRIMARY KEY,
    source      TEXT NOT NULL,
    source_ids  TEXT NOT NULL,             -- JSON object {name: value}
    state       TEXT NOT NULL,             -- new active ending ended failed interrupted
    end_reason  TEXT NOT NULL DEFAULT '',
    started_at  REAL,                      -- unix time, NULL until the call started
    ended_at    REAL,                      -- unix time, NULL while live
    duration_ms INTEGER,
    metadata    TEXT NOT NULL,             -- JSON object
    channels    TEXT NOT NULL,             -- JSON list of {index, role, participant, speaker}
    sort_at     REAL NOT NULL,             -- started_at (or first-save time): the paging key
    updated_at  REAL NOT NULL
);
CREATE INDEX calls_by_time ON calls (sort_at DESC, id DESC);
CREATE INDEX calls_by_state_time ON calls (state, sort_at DESC, id DESC);
CREATE INDEX calls_by_end ON calls (ended_at) WHERE ended_at IS NOT NULL;

CREATE TABLE source_ids (
    value   TEXT NOT NULL,                 -- e.g. a Twilio callSid
    call_id TEXT NOT NULL,
    name    TEXT NOT NULL,                 -- e.g. "callSid"
    PRIMARY KEY (value, call_id)
) WITHOUT ROWID;
CREATE INDEX source_ids_by_call ON source_ids (call_id);

CREATE TABLE events (
    call_id TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    type    TEXT NOT NULL,
    time    REAL NOT NULL,
    data    TEXT NOT NULL,                 -- JSON object
    PRIMARY KEY (call_id, seq)             -- rowid table: rows (turns with words) are KBs
);

CREATE TABLE outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is X-Callgate-Delivery
    url        TEXT NOT NULL,
    event_type TEXT NOT NULL,
    call_id    TEXT NOT NULL,
    body       BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    REAL NOT NULL,
    last_error TEXT,
    state      TEXT NOT NULL DEFAULT 'pending',    -- pending | dead (delivered rows are deleted)
    dead_at    REAL
);
CREATE INDEX outbox_due ON outbox (next_at, id) WHERE state = 'pending';
CREATE INDEX outbox_dead ON outbox (dead_at DESC, id DESC) WHERE state = 'dead';
CREATE INDEX outbox_by_call ON outbox (call_id);
"""

_CALL_FIELDS = (
    "id",
    "source",
    "source_ids",
    "state",
    "end_reason",
    "started_at",
    "ended_at",
    "duration_ms",
    "metadata",
    "channels",
    "sort_at",
)
_CALL_COLUMNS = ", ".join(_CALL_FIELDS)
_CALL_COLUMNS_C = ", ".join(f"c.{name}" for name in _CALL_FIELDS)  # in a join on calls c
_DELIVERY_COLUMNS = (
    "id, url, event_type, call_id, body, created_at, attempts, next_at, last_error, state, dead_at"
)


class StoreError(Exception):
    """The store cannot be used: not open, or a database newer than this code."""


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A webhook delivery to enqueue: POST ``body`` to ``url``."""

    url: str
    event_type: str
    call_id: str
    body: bytes
    created_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivery in the outbox; ``id`` is stable across retries (``X-Callgate-Delivery``)."""

    id: int
    url: str
    event_type: str
    call_id: str
    body: bytes
    created_at: float
    attempts: int
    next_at: float
    last_error: str | None
    state: str  # "pending" or "dead"
    dead_at: float | None


class Outbox(Protocol):
    """The durable webhook outbox (the part of the store :mod:`gateway.outputs.webhooks` uses).

    At-least-once: a delivery stays pending until ``mark_delivered`` or ``mark_dead``.
    """

    async def enqueue(self, deliveries: Sequence[NewDelivery]) -> list[int]:
        """Add pending deliveries, due at once; returns their ids (committed on return)."""
        ...

    async def due(self, now: float, limit: int, *, exclude: Collection[int] = ()) -> list[Delivery]:
        """Pending deliveries with ``next_at <= now``, earliest first, skipping ``exclude``."""
        ...

    async def next_due_at(self, *, exclude: Collection[int] = ()) -> float | None:
        """The earliest ``next_at`` of a pending delivery not in ``exclude``; None if none."""
        ...

    async def mark_delivered(self, delivery_id: int) -> None:
        """Remove a delivered delivery from the outbox."""
        ...

    async def mark_retry(self, delivery_id: int, attempts: int, next_at: float, error: str) -> None:
        """Record a failed attempt; the delivery is due again at ``next_at``."""
        ...

    async def mark_dead(
        self,
        delivery_id: int,
        error: str,
        *,
        attempts: int | None = None,
        at: float | None = None,
    ) -> None:
        """Give up on a delivery; it is kept as a dead letter (:meth:`dead_letters`)."""
        ...

    async def dead_letters(self, limit: int = 100) -> list[Delivery]:
        """Dead-lettered deliveries, most recently dead first."""
        ...

    async def outbox_depth(self) -> int:
        """How many deliveries are pending."""
        ...


class CallStore(Outbox, Protocol):
    """Durable calls, events and webhook outbox. Every write is committed when it returns."""

    async def open(self) -> int:
        """Create or migrate the schema; mark live calls ``interrupted`` and return how many."""
        ...

    async def close(self) -> None:
        """Finish queued work and release the database."""
        ...

    async def save_call(self, summary: Mapping[str, Any]) -> None:
        """Insert or update a call from :func:`~gateway.outputs.events.call_summary`."""
        ...

    async def add_event(self, event: CallEvent) -> bool:
        """Persist a stored event type (not ``turn.partial``); False if skipped or a duplicate."""
        ...

    async def add_event_and_enqueue(
        self, event: CallEvent, deliveries: Sequence[NewDelivery]
    ) -> list[int]:
        """``add_event`` and ``enqueue`` in one transaction (deliveries only for a new event)."""
        ...

    async def get_call(self, ident: str) -> dict[str, Any] | None:
        """A call by its id or by one of its source ids; None if unknown."""
        ...

    async def list_calls(
        self,
        *,
        state: str | Sequence[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Calls newest first and the cursor of the next page (None on the last page)."""
        ...

    async def events(
        self, call_id: str, after_seq: int = 0, *, limit: int | None = None
    ) -> list[CallEvent]:
        """The call's stored events with ``seq > after_seq``, in order."""
        ...

    async def last_seq(self, call_id: str) -> int:
        """The highest stored ``seq`` of the call (0 if none)."""
        ...

    async def transcript(self, call_id: str) -> Transcript | None:
        """The call's transcript rebuilt from stored events; None if the call is unknown."""
        ...

    async def delete_call(self, call_id: str) -> bool:
        """Delete a call, its events, source ids and deliveries; False if it was unknown."""
        ...

    async def purge(self, older_than: float) -> list[dict[str, Any]]:
        """Delete finished calls that ended before ``older_than`` (unix time). Returns each
        deleted call's ``id`` and ``metadata`` (what outside the store refers to it: files)."""
        ...


# ------------------------------------------------------------------------------------------------
# SQLite


@dataclass(slots=True)
class _QueuedWrite:
    job: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    queued_at: float


class _Worker:
    """One thread owning one connection; jobs run in submission order."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None  # touched only by the worker thread

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        return await self.call(partial(self._run, job))

    async def call(self, fn: Callable[[], T]) -> T:
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except RuntimeError:  # the executor was shut down
            raise StoreError("store is closed") from None
        return await future

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue ``fn`` without awaiting it (the caller attaches a done callback)."""
        try:
            return self._executor.submit(fn)
        except RuntimeError:  # the executor was shut down
            raise StoreError("store is closed") from None

    def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self.conn is None:
            raise StoreError("store is not open")
        return job(self.conn)

    def shutdown(self) -> None:
        # The close job already ran (it was queued last), so the thread is idle: don't wait.
        self._executor.shutdown(wait=False)


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE for writes).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit is durable against a process crash / kill -9 (see module doc).
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _read(conn: sqlite3.Connection, job: Callable[[], T]) -> T:
    """Run ``job`` in one read transaction: its queries see one consistent snapshot."""
    conn.execute("BEGIN")
    try:
        return job()
    finally:
        conn.execute("COMMIT")


def _encode_cursor(sort_at: float, call_id: str) -> str:
    raw = json.dumps([sort_at, call_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    if len(cursor) > 1024:
        raise ValueError("invalid cursor (too long)")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        sort_at, call_id = json.loads(raw)
        if not isinstance(call_id, str) or not isinstance(sort_at, int | float):
            raise ValueError
        return float(sort_at), call_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise ValueError(f"invalid cursor {cursor[:40]!r}") from None


def _call_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "id": row[0],
        "source": row[1],
        "source_ids": json.loads(row[2]),
        "state": row[3],
        "end_reason": row[4],
        "started_at": row[5],
        "ended_at": row[6],
        "duration_ms": row[7],
        "metadata": json.loads(row[8]),
        # Rows written before `on_hold` existed read as not on hold.
        "channels": [{"on_hold": False, **c} for c in json.loads(row[9])],
    }


def _delivery(row: tuple[Any, ...]) -> Delivery:
    return Delivery(
        id=row[0],
        url=row[1],
        event_type=row[2],
        call_id=row[3],
        body=bytes(row[4]),
        created_at=row[5],
        attempts=row[6],
        next_at=row[7],
        last_error=row[8],
        state=row[9],
        dead_at=row[10],
    )


def _words(items: Iterable[Mapping[str, Any]]) -> tuple[Word, ...]:
    return tuple(
        Word(str(w["text"]), int(w["start"]), int(w["end"]), float(w.get("confidence", 1.0)))
        for w in items
    )


def _turn_key(key: str) -> TurnKey:
    channel, epoch, order = (int(part) for part in key.split(":"))
    return TurnKey(channel, epoch, order)


def _utterance(data: Mapping[str, Any]) -> Utterance:
    """An utterance from ``transcript.utterance`` data (:func:`~.events.utterance_data`)."""
    return Utterance(
        channel=int(data["channel"]),
        speaker=str(data["speaker"]),
        role=str(data["role"]),
        start=int(data["start"]),
        end=int(data["end"]),
        text=str(data["text"]),
        confidence=float(data["confidence"]),
        words=_words(data.get("words", ())),
        turns=tuple(_turn_key(k) for k in data.get("turns", ())),
    )


def _final_utterance(data: Mapping[str, Any]) -> Utterance:
    """A one-turn utterance from ``turn.final`` data (:func:`~.events.turn_data`)."""
    return Utterance(
        channel=int(data["channel"]),
        speaker=str(data["speaker"]),
        role=str(data["role"]),
        start=int(data["start"]),
        end=int(data["end"]),
        text=str(data["text"]),
        confidence=float(data["confidence"]),
        words=_words(data.get("words", ())),
        turns=(TurnKey(int(data["channel"]), int(data["epoch"]), int(data["turn_order"])),),
    )


def build_transcript(
    call: Mapping[str, Any], events: Iterable[tuple[str, Mapping[str, Any]]]
) -> Transcript:
    """A call's transcript from its summary and its stored ``(type, data)`` events.

    Released utterances (``transcript.utterance``, all of them for an ended call) come first;
    any final that no released utterance covers (an interrupted call released only part of its
    finals, or none) becomes a one-turn utterance; then everything is ordered by
    (start, end, channel), as the merger orders (invariant 5).
    """
    released: list[tuple[int, Utterance]] = []
    finals: list[Utterance] = []
    for type_, data in events:
        if type_ == "transcript.utterance":
            released.append((int(data.get("index", len(released))), _utterance(data)))
        elif type_ == "turn.final":
            finals.append(_final_utterance(data))
    released.sort(key=lambda item: item[0])
    utterances = [u for _, u in released]
    covered = {key for u in utterances for key in u.turns}
    extra = [u for u in finals if u.turns[0] not in covered]
    if extra:
        utterances = sorted([*utterances, *extra], key=lambda u: (u.start, u.end, u.channel))
    channels = tuple(
        ChannelInfo(int(c["index"]), str(c["role"]), c.get("participant"))
        for c in call.get("channels", ())
    )
    duration = max([int(call.get("duration_ms") or 0), *(u.end for u in utterances)])
    return Transcript(
        call_id=str(call["id"]),
        channels=channels,
        utterances=tuple(utterances),
        duration_ms=duration,
        metadata={str(k): str(v) for k, v in dict(call.get("metadata") or {}).items()},
    )


class SqliteStore:
    """The embedded :class:`CallStore`: one SQLite file in WAL mode (see module docstring).

    ``on_write(seconds)``, if given, is called on the event loop after every committed write
    with its latency (queueing included: the time a final waits before it can be published).
    Outbox bookkeeping is kept in memory too: :attr:`pending_deliveries` can back a gauge
    without a query. One process per database file.
    """

    def __init__(self, path: Path, *, on_write: Callable[[float], None] | None = None) -> None:
        self.path = Path(path)
        self._on_write = on_write
        self._writer = _Worker("store-writer")
        self._reader = _Worker("store-reader")
        self._opened = False
        self._closed = False
        self._pending = 0  # pending deliveries; written only by the writer thread
        self._delta = 0  # change to _pending within the writer's open transaction
        # Group commit: writes queued while a batch is in the writer thread go together in the
        # next batch (one transaction, one thread hop), each in its own savepoint.
        self._queued: list[_QueuedWrite] = []
        self._flushing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending_deliveries(self) -> int:
        """Pending outbox deliveries as of the last committed write (no query)."""
        return self._pending

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> int:
        """Create the file and schema if needed, and mark live calls ``interrupted``.

        A call found ``new``/``active``/``ending`` was cut off by a crash or kill: it becomes
        ``interrupted``, its ``end_reason`` ``"interrupted"`` (unless it had one) and its
        ``ended_at`` the time of its last stored event. Returns how many calls were marked.
        Raises :class:`StoreError` for a database written by a newer schema.
        """
        if self._opened or self._closed:
            raise StoreError("store was already opened")
        marked = await self._writer.call(self._open_writer)
        await self._reader.call(self._open_reader)
        self._opened = True
        return marked

    def _open_writer(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        try:
            marked = self._transaction(conn, self._migrate_and_mark)
            self._pending = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE state = 'pending'"
            ).fetchone()[0]
        except BaseException:
            conn.close()
            raise
        self._writer.conn = conn
        return marked

    def _migrate_and_mark(self, conn: sqlite3.Connection) -> int:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this gateway's "
                f"({SCHEMA_VERSION})"
            )
        if version == 0:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        marks = ",".join("?" * len(LIVE_STATES))
        cur = conn.execute(
            f"""
            UPDATE calls SET
                state = ?,
                end_reason = CASE WHEN end_reason = '' THEN ? ELSE end_reason END,
                ended_at = COALESCE(
                    ended_at,
                    (SELECT MAX(time) FROM events WHERE events.call_id = calls.id),
                    started_at,
                    sort_at
                ),
                updated_at = ?
            WHERE state IN ({marks})
            """,
            (INTERRUPTED, INTERRUPTED, time.time(), *LIVE_STATES),
        )
        return cur.rowcount

    def _open_reader(self) -> None:
        self._reader.conn = _connect(self.path)

    async def close(self) -> None:
        """Run the work already queued, close both connections and stop the threads.

        Idempotent. Writes still being awaited when ``close`` is called complete first.
        """
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()  # writes already queued commit first
        for worker in (self._writer, self._reader):
            await worker.call(partial(self._close_worker, worker))
            worker.shutdown()

    @staticmethod
    def _close_worker(worker: _Worker) -> None:
        if worker.conn is not None:
            worker.conn.close()
            worker.conn = None

    def _transaction(self, conn: sqlite3.Connection, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` in one write transaction (writer thread): committed on return, rolled
        back on error. Outbox counter changes (``_delta``) apply only once committed."""
        self._delta = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = job(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._pending += self._delta
        return result

    async def _write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` in a write transaction; committed when this returns.

        Writes that arrive while the writer thread is busy are committed together in one
        transaction (group commit), each job in its own savepoint: a job that raises is rolled
        back alone and its caller gets the exception; the others commit. Cancelling the caller
        does not withdraw a queued job.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append(_QueuedWrite(job, future, time.perf_counter()))
        if not self._flushing:
            self._flush(loop)
        return cast(T, await future)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queued = self._queued, []
        jobs = [queued.job for queued in batch]
        try:
            done = self._writer.submit(partial(self._run_batch, jobs))
        except StoreError as exc:
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(exc)
            return
        self._flushing = True
        self._idle.clear()
        done.add_done_callback(
            lambda finished: loop.call_soon_threadsafe(self._flushed, loop, batch, finished)
        )

    def _flushed(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_QueuedWrite],
        finished: concurrent.futures.Future[list[tuple[bool, Any]]],
    ) -> None:
        error = finished.exception()
        outcomes = finished.result() if error is None else [(False, error)] * len(batch)
        now = time.perf_counter()
        for queued, (ok, value) in zip(batch, outcomes, strict=True):
            if ok and self._on_write is not None:
                self._on_write(now - queued.queued_at)  # queueing included
            if queued.future.done():
                continue  # the caller was cancelled; the write stands
            if ok:
                queued.future.set_result(value)
            else:
                queued.future.set_exception(value)
        self._flushing = False
        if self._queued:
            self._flush(loop)
        if not self._flushing:
            self._idle.set()

    def _run_batch(self, jobs: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        """Writer thread: run ``jobs`` in one transaction; per job (ok, result or exception)."""
        conn = self._writer.conn
        if conn is None:
            raise StoreError("store is not open")
        if len(jobs) == 1:
            try:
                return [(True, self._transaction(conn, jobs[0]))]
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                return [(False, exc)]
        outcomes: list[tuple[bool, Any]] = []
        self._delta = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in jobs:
                conn.execute("SAVEPOINT job")
                delta = self._delta
                try:
                    result = job(conn)
                except Exception as exc:  # noqa: BLE001 - handed to that job's caller
                    if not conn.in_transaction:
                        raise  # SQLite rolled the whole transaction back (disk full, I/O)
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    self._delta = delta
                    outcomes.append((False, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((True, result))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._pending += self._delta
        return outcomes

    async def _read(self, job: Callable[[sqlite3.Connection], T]) -> T:
        return await self._reader.run(lambda conn: _read(conn, lambda: job(conn)))

    # -- calls and events ------------------------------------------------------------------------

    async def save_call(self, summary: Mapping[str, Any]) -> None:
        """Upsert the call row (and its source ids) from a call summary; committed on return.

        A summary with a live state does not overwrite a call already ``ended``/``failed``.
        """
        await self._write(lambda conn: self._save_call(conn, summary))

    @staticmethod
    def _save_call(conn: sqlite3.Connection, summary: Mapping[str, Any]) -> None:
        now = time.time()
        call_id = str(summary["id"])
        started_at = summary.get("started_at")
        source_ids = {str(k): str(v) for k, v in dict(summary.get("source_ids") or {}).items()}
        terminal = ",".join(f"'{s}'" for s in _TERMINAL)
        cur = conn.execute(
            f"""
            INSERT INTO calls ({_CALL_COLUMNS}, updated_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (id) DO UPDATE SET
                source = excluded.source,
                source_ids = excluded.source_ids,
                state = excluded.state,
                end_reason = excluded.end_reason,
                started_at = excluded.started_at,
                ended_at = excluded.ended_at,
                duration_ms = excluded.duration_ms,
                metadata = excluded.metadata,
                channels = excluded.channels,
                updated_at = excluded.updated_at
                -- sort_at stays: a page cursor must never see a call move
            WHERE NOT (calls.state IN ({terminal}) AND excluded.state NOT IN ({terminal}))
            """,
            (
                call_id,
                str(summary.get("source") or ""),
                _dumps(source_ids),
                str(summary.get("state") or "new"),
                str(summary.get("end_reason") or ""),
                started_at,
                summary.get("ended_at"),
                summary.get("duration_ms"),
                _dumps(dict(summary.get("metadata") or {})),
                _dumps(list(summary.get("channels") or [])),
                float(started_at) if started_at is not None else now,
                now,
            ),
        )
        if cur.rowcount:
            conn.execute("DELETE FROM source_ids WHERE call_id = ?", (call_id,))
            conn.executemany(
                "INSERT OR IGNORE INTO source_ids (value, call_id, name) VALUES (?, ?, ?)",
                [(value, call_id, name) for name, value in source_ids.items() if value],
            )

    async def add_event(self, event: CallEvent) -> bool:
        """Persist ``event``; committed when this returns (a final survives ``kill -9`` then).

        ``turn.partial`` (and any type not in :data:`STORED_EVENT_TYPES`) returns False without
        touching the database. A ``(call_id, seq)`` already stored is a no-op (False). A
        ``call.*`` event also upserts the call row from its data (the call summary).
        """
        if event.type not in STORED_EVENT_TYPES:
            return False
        return await self._write(lambda conn: self._add_event(conn, event))

    def _add_event(self, conn: sqlite3.Connection, event: CallEvent) -> bool:
        cur = conn.execute(
            "INSERT OR IGNORE INTO events (call_id, seq, type, time, data) VALUES (?, ?, ?, ?, ?)",
            (event.call_id, event.seq, event.type, event.time, _dumps(event.data)),
        )
        if not cur.rowcount:
            return False  # a replay of a stored event
        if event.type in _CALL_EVENTS:
            self._save_call(conn, {**event.data, "id": event.call_id})
        return True

    async def add_event_and_enqueue(
        self, event: CallEvent, deliveries: Sequence[NewDelivery]
    ) -> list[int]:
        """Store ``event`` and enqueue ``deliveries`` in one transaction; their ids.

        Deliveries are enqueued only when the event is newly stored, so replaying an event does
        not send its webhooks twice; for a partial or a duplicate nothing is written and the
        result is ``[]``.
        """
        if event.type not in STORED_EVENT_TYPES:
            return []

        def job(conn: sqlite3.Connection) -> list[int]:
            if not self._add_event(conn, event):
                return []
            return self._enqueue(conn, deliveries)

        return await self._write(job)

    async def get_call(self, ident: str) -> dict[str, Any] | None:
        """The call summary by call id, else by a source id value (the newest such call)."""

        def job(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                f"SELECT {_CALL_COLUMNS} FROM calls WHERE id = ?", (ident,)
            ).fetchone()
            if row is None:
                row = conn.execute(
                    f"""
                    SELECT {_CALL_COLUMNS_C}
                    FROM source_ids s JOIN calls c ON c.id = s.call_id
                    WHERE s.value = ? ORDER BY c.sort_at DESC, c.id DESC LIMIT 1
                    """,
                    (ident,),
                ).fetchone()
            return _call_dict(row) if row is not None else None

        return await self._read(job)

    async def list_calls(
        self,
        *,
        state: str | Sequence[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Calls newest first (by start time, then id) and the next page's cursor or None.

        ``state`` filters by one state or any of several; ``since`` (inclusive) and ``until``
        (exclusive) bound the start time; ``limit`` is clamped to 1..1000. Paging is keyset
        paging on (start time, id): calls added meanwhile never shift a page, so pages hold no
        duplicates and no gaps. Raises ValueError for a cursor this store did not make.
        """
        limit = max(1, min(_MAX_PAGE, int(limit)))
        where: list[str] = []
        params: list[Any] = []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if since is not None:
            where.append("sort_at >= ?")
            params.append(float(since))
        if until is not None:
            where.append("sort_at < ?")
            params.append(float(until))
        if cursor is not None:
            sort_at, call_id = _decode_cursor(cursor)
            where.append("(sort_at < ? OR (sort_at = ? AND id < ?))")
            params.extend((sort_at, sort_at, call_id))
        sql = f"SELECT {_CALL_COLUMNS} FROM calls"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY sort_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)  # one more tells whether a next page exists

        def job(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, params).fetchall()

        rows = await self._read(job)
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1][10], page[-1][0]) if len(rows) > limit else None
        return [_call_dict(row) for row in page], next_cursor

    async def events(
        self, call_id: str, after_seq: int = 0, *, limit: int | None = None
    ) -> list[CallEvent]:
        """The call's stored events with ``seq > after_seq``, in ``seq`` order (at most
        ``limit``)."""

        def job(conn: sqlite3.Connection) -> list[CallEvent]:
            rows = conn.execute(
                "SELECT seq, type, time, data FROM events WHERE call_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (call_id, after_seq, -1 if limit is None else limit),
            ).fetchall()
            return [CallEvent(call_id, s, t, tm, json.loads(d)) for s, t, tm, d in rows]

        return await self._read(job)

    async def last_seq(self, call_id: str) -> int:
        """The highest stored ``seq`` of the call, 0 if none (to continue an :class:`EventLog`)."""

        def job(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT MAX(seq) FROM events WHERE call_id = ?", (call_id,))
            return int(row.fetchone()[0] or 0)

        return await self._read(job)

    async def transcript(self, call_id: str) -> Transcript | None:
        """The call's transcript from its stored events (:func:`build_transcript`); None if the
        call is unknown."""

        def job(conn: sqlite3.Connection) -> Transcript | None:
            row = conn.execute(
                f"SELECT {_CALL_COLUMNS} FROM calls WHERE id = ?", (call_id,)
            ).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT type, data FROM events WHERE call_id = ? "
                "AND type IN ('transcript.utterance', 'turn.final') ORDER BY seq",
                (call_id,),
            ).fetchall()
            # Decoding happens here too: a long call's JSON stays off the event loop.
            return build_transcript(_call_dict(row), ((t, json.loads(d)) for t, d in rows))

        return await self._read(job)

    async def delete_call(self, call_id: str) -> bool:
        """Delete the call, its events, source ids and outbox rows (pending and dead: they hold
        its transcript). True if anything of it was stored."""

        def job(conn: sqlite3.Connection) -> bool:
            found = self._delete_calls(conn, "SELECT ?", (call_id,))
            return found > 0

        return await self._write(job)

    def _delete_calls(
        self,
        conn: sqlite3.Connection,
        ids_sql: str,
        params: tuple[Any, ...],
        deleted: list[dict[str, Any]] | None = None,
    ) -> int:
        """Delete the calls ``ids_sql`` selects, with their events, source ids and deliveries;
        append each deleted call's id and metadata to ``deleted``."""
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (id TEXT PRIMARY KEY)")
        conn.execute("DELETE FROM doomed")
        conn.execute(f"INSERT OR IGNORE INTO doomed (id) {ids_sql}", params)
        if deleted is not None:
            rows = conn.execute(
                "SELECT id, metadata FROM calls WHERE id IN (SELECT id FROM doomed)"
            ).fetchall()
            deleted.extend({"id": row[0], "metadata": json.loads(row[1])} for row in rows)
        conn.execute("DELETE FROM source_ids WHERE call_id IN (SELECT id FROM doomed)")
        events = conn.execute("DELETE FROM events WHERE call_id IN (SELECT id FROM doomed)")
        pending = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE state = 'pending' "
            "AND call_id IN (SELECT id FROM doomed)"
        ).fetchone()[0]
        conn.execute("DELETE FROM outbox WHERE call_id IN (SELECT id FROM doomed)")
        calls = conn.execute("DELETE FROM calls WHERE id IN (SELECT id FROM doomed)")
        conn.execute("DELETE FROM doomed")
        self._delta -= pending
        return max(calls.rowcount, 1 if events.rowcount else 0)

    async def purge(self, older_than: float) -> list[dict[str, Any]]:
        """Delete finished (ended, failed, interrupted) calls that ended before ``older_than``
        (unix time), with their events, source ids and deliveries, and dead letters that died
        before it. A finished call without an end time (one that failed before it started)
        counts from its last update. Runs in batches, so live writes interleave. Returns each
        deleted call's id and metadata."""
        marks = ",".join("?" * len(FINISHED_STATES))
        select = (
            f"SELECT id FROM calls WHERE state IN ({marks}) "
            f"AND COALESCE(ended_at, updated_at) < ? LIMIT {_PURGE_BATCH}"
        )
        params = (*FINISHED_STATES, float(older_than))
        deleted: list[dict[str, Any]] = []

        def batch(conn: sqlite3.Connection) -> int:
            return self._delete_calls(conn, select, params, deleted)

        while True:
            n = await self._write(batch)
            if n < _PURGE_BATCH:
                break

        def dead(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM outbox WHERE state = 'dead' AND dead_at < ?", (float(older_than),)
            )

        await self._write(dead)
        return deleted

    # -- outbox ----------------------------------------------------------------------------------

    async def enqueue(self, deliveries: Sequence[NewDelivery]) -> list[int]:
        """Add pending deliveries, due at once; their ids, in order (committed on return)."""
        if not deliveries:
            return []
        return await self._write(lambda conn: self._enqueue(conn, deliveries))

    def _enqueue(self, conn: sqlite3.Connection, deliveries: Sequence[NewDelivery]) -> list[int]:
        ids: list[int] = []
        for d in deliveries:
            cur = conn.execute(
                "INSERT INTO outbox (url, event_type, call_id, body, created_at, next_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (d.url, d.event_type, d.call_id, bytes(d.body), d.created_at, d.created_at),
            )
            assert cur.lastrowid is not None
            ids.append(cur.lastrowid)
        self._delta += len(ids)
        return ids

    async def due(self, now: float, limit: int, *, exclude: Collection[int] = ()) -> list[Delivery]:
        """Pending deliveries due at ``now``, by (next_at, id), at most ``limit``; deliveries in
        ``exclude`` (the caller's attempts in flight) are skipped."""
        if limit <= 0:
            return []
        skip = list(exclude)

        def job(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM outbox WHERE state = 'pending' AND next_at <= ? "
                f"AND id NOT IN ({','.join('?' * len(skip))}) ORDER BY next_at, id LIMIT ?",
                (now, *skip, limit),
            ).fetchall()
            return [_delivery(row) for row in rows]

        return await self._read(job)

    async def next_due_at(self, *, exclude: Collection[int] = ()) -> float | None:
        """The earliest ``next_at`` among pending deliveries not in ``exclude``; None if none."""
        skip = list(exclude)

        def job(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT next_at FROM outbox WHERE state = 'pending' "
                f"AND id NOT IN ({','.join('?' * len(skip))}) ORDER BY next_at, id LIMIT 1",
                skip,
            ).fetchone()
            return float(row[0]) if row is not None else None

        return await self._read(job)

    async def mark_delivered(self, delivery_id: int) -> None:
        """Delete a delivered delivery (no-op if it is gone, e.g. its call was deleted)."""

        def job(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "DELETE FROM outbox WHERE id = ? AND state = 'pending'", (delivery_id,)
            )
            self._delta -= cur.rowcount

        await self._write(job)

    async def mark_retry(self, delivery_id: int, attempts: int, next_at: float, error: str) -> None:
        """Record failed attempt number ``attempts``; the delivery is due again at ``next_at``."""

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET attempts = ?, next_at = ?, last_error = ? "
                "WHERE id = ? AND state = 'pending'",
                (attempts, next_at, error, delivery_id),
            )

        await self._write(job)

    async def mark_dead(
        self,
        delivery_id: int,
        error: str,
        *,
        attempts: int | None = None,
        at: float | None = None,
    ) -> None:
        """Dead-letter a delivery: it is never attempted again but kept (``dead_letters``)
        until ``purge`` or ``delete_call`` removes it, or :meth:`revive` queues it again."""
        dead_at = time.time() if at is None else at

        def job(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE outbox SET state = 'dead', dead_at = ?, last_error = ?, "
                "attempts = COALESCE(?, attempts) WHERE id = ? AND state = 'pending'",
                (dead_at, error, attempts, delivery_id),
            )
            self._delta -= cur.rowcount

        await self._write(job)

    async def revive(self, delivery_id: int, now: float) -> bool:
        """Queue a dead letter again as if created at ``now`` (a manual replay). True if it was
        dead."""

        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE outbox SET state = 'pending', dead_at = NULL, attempts = 0, "
                "created_at = ?, next_at = ? WHERE id = ? AND state = 'dead'",
                (now, now, delivery_id),
            )
            self._delta += cur.rowcount
            return cur.rowcount > 0

        return await self._write(job)

    async def dead_letters(self, limit: int = 100) -> list[Delivery]:
        """Dead-lettered deliveries, most recently dead first (at most ``limit``)."""

        def job(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                f"SELECT {_DELIVERY_COLUMNS} FROM outbox WHERE state = 'dead' "
                "ORDER BY dead_at DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [_delivery(row) for row in rows]

        return await self._read(job)

    async def writable(self) -> None:
        """Raise unless the writer can take the write lock now (readiness probe; no change)."""

        def job(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT 1 FROM calls LIMIT 1").fetchall()

        await self._writer.run(partial(self._transaction, job=job))

    async def outbox_depth(self) -> int:
        """How many deliveries are pending (queried)."""

        def job(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()
            return int(row[0])

        return await self._read(job)
