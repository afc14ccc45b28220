"""LiveHub: every call's events, persisted then published to live subscribers, with resume.

Flow per call (one :class:`CallPublisher`)::

    Call listener (sync) --(type, data)--> queue --consumer task--> EventLog.append (seq)
        --> persist (turn.final, call.* and utterances: awaited, invariant 8) --> publish

The listener turns each :class:`~gateway.calls.call.CallOutput` into event data at once (so it
describes the call as it was), the consumer assigns sequence numbers in order, awaits the store for
everything but partials, and only then hands the event to subscribers: a final a subscriber sees is
already durable.

Subscribers (:class:`Subscription`) get a bounded queue: one that falls ``queue_limit`` events
behind is closed with reason ``slow_consumer`` and never slows the call or other subscribers. A
subscriber joining mid-call gets the events so far first (resume = the events after a given seq).
The firehose (:meth:`LiveHub.subscribe_all`) carries every call's events with a gateway-wide
sequence number and keeps the last ``firehose_buffer`` for resume.

Memory: a call's log keeps every event while the call is active, except that partials of turns
already final are compacted away (beyond the newest 300 events) once the log is long (a
resuming client skips those superseded partials; their turn's final carries the whole text).
Finished calls' logs stay for the most recent ``keep_finished`` calls; older ones are served
from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.calls.call import (
    Call,
    CallOutput,
    CallState,
    CallStateChanged,
    CallUpdated,
    ChannelFailed,
)
from gateway.observability.logging import get_logger
from gateway.outputs.events import (
    CallEvent,
    EventLog,
    call_summary,
    turn_data,
    utterance_data,
)
from gateway.transcript.merger import TurnDelta, UtteranceReleased

log = get_logger("gateway.live")

Persist = Callable[[CallEvent, "dict[str, Any] | None"], Awaitable[None]]
"""``persist(event, extra)``: commit the event (and, for call.ended, ``extra`` = the document)."""

_COMPACT_AT = 600  # events in a log before superseded partials are first compacted
# The newest events are kept whole and never compacted (clients resuming soon after a drop);
# older ones keep only their JSON text (CallEvent.slim): every consumer of an older event
# (persist, webhooks, subscribers' queues) has taken its data by then.
_KEEP_RECENT = 20
# Builds the extra document of an event (call.ended's transcript) in a worker thread.
_Document = Callable[[], dict[str, Any]]
# Waiting events (the store is slow) beyond which partials are coalesced (CallPublisher).
_COALESCE_AFTER = 20
_TRIM_SLACK = 100  # at most this many events beyond live.events_in_memory, then trimmed at once


@dataclass(frozen=True, slots=True)
class Subscribed:
    """What :meth:`LiveHub.subscribe` hands a feed: the backlog in memory, the subscription,
    and where the store must fill in first (``store_before``: None when nothing is missing)."""

    backlog: list[CallEvent]
    sub: Subscription
    store_before: int | None


@dataclass(frozen=True, slots=True)
class FirehoseEvent:
    gseq: int
    event: CallEvent


class Subscription:
    """A bounded queue of events for one live client. ``closed_reason`` once closed.

    ``sink`` (optional) is a fast path for feeds whose transport can take a whole message
    without waiting (SSE): while nothing is queued and no write is in flight, :meth:`push` hands
    the item to ``sink`` synchronously, which returns False if it cannot take it now (its socket
    buffer is full), and the item is queued for the feed's task instead. Fan-out to many
    subscribers then costs one socket write each, not one task switch each; order is kept
    because the fast path is only taken when the queue is empty and the task is idle.
    """

    def __init__(self, limit: int) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._limit = limit
        self.closed_reason: str | None = None
        self.sink: Callable[[Any], bool] | None = None
        self.busy = False  # the feed's task is writing an item it took from the queue

    def push(self, item: Any) -> None:
        if self.closed_reason is not None:
            return
        if self.sink is not None and not self.busy and self._queue.empty() and self.sink(item):
            return
        if self._queue.qsize() >= self._limit:
            self.close("slow_consumer")
            return
        self._queue.put_nowait(item)

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._queue.put_nowait(None)  # wakes the reader; may exceed the limit by one

    async def get(self) -> Any | None:
        """The next item; None when closed. Callers bound the wait with ``asyncio.timeout``."""
        if self._queue.empty() and self.closed_reason is not None:
            return None
        return await self._queue.get()

    @property
    def pending(self) -> int:
        return self._queue.qsize()


class _Pending:
    """An event described by the listener, waiting for the publisher's task. Mutable: a newer
    partial of the same turn replaces its text in place, and the turn's final voids it."""

    __slots__ = ("at", "data", "describe", "type")

    def __init__(
        self, type_: str | None, data: dict[str, Any], describe: _Document | None, at: float
    ) -> None:
        self.type = type_  # None: superseded by its turn's final, skipped
        self.data = data
        self.describe = describe
        self.at = at


class CallPublisher:
    """One call's ordered path from listener to store to subscribers (see module docstring).

    Events wait in an unbounded queue while the store is slow, but partials do not pile up
    there: once ``_COALESCE_AFTER`` events wait, a waiting partial is replaced by its turn's
    newer partial, and dropped when the turn's final arrives (``LiveHub.partials_coalesced``).
    What waits is then at most one partial per open turn plus the finals and call events,
    which must all be kept. Below that (the store keeping up) every partial is published.
    """

    def __init__(self, hub: LiveHub, call: Call) -> None:
        self.hub = hub
        self.call_id = call.call_id
        self.log = EventLog(call.call_id, keep_full=_KEEP_RECENT)
        # The newest event handed to subscribers. The log runs ahead of it while an event is
        # being persisted: a subscriber joining then gets that event live, not in its backlog
        # (persist before publish, and each event once).
        self.published_seq = 0
        self.subscribers: set[Subscription] = set()
        self._compact_at = _COMPACT_AT
        self._pending: deque[_Pending | None] = deque()  # None: the call ended, stop
        self._waiting_partials: dict[str, _Pending] = {}  # turn key -> its partial in _pending
        self._voided = 0  # superseded partials still in _pending (skipped when taken)
        self._more = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"publish-{call.call_id}")
        self.done = asyncio.Event()

    @property
    def backlog(self) -> int:
        """Events offered but not yet published (waiting for the store, or for the task)."""
        return len(self._pending) - self._voided

    def offer(self, call: Call, output: CallOutput) -> None:
        """The Call listener: describe ``output`` now, publish it in order later."""
        item = _describe(call, output)
        if item is not None:
            # The event's time is when the call produced it (a final leaving the merger), so
            # subscribers can measure the whole path: persist, publish, network.
            self.enqueue(*item, at=time.time())
        if isinstance(output, CallStateChanged) and output.state in (
            CallState.ENDED,
            CallState.FAILED,
        ):
            self._pending.append(None)  # nothing follows call.ended
            self._more.set()

    def enqueue(
        self, type_: str, data: dict[str, Any], describe: _Document | None = None, *, at: float
    ) -> None:
        """Queue one described event for the task (partials coalesced, see the class)."""
        behind = self.backlog >= _COALESCE_AFTER
        if type_ == "turn.partial":
            waiting = self._waiting_partials.get(data["key"])
            if waiting is not None and behind:
                waiting.data, waiting.at = data, at  # the newest text, where the older one was
                self.hub.partials_coalesced += 1
                return
            pending = self._waiting_partials[data["key"]] = _Pending(type_, data, describe, at)
        else:
            if type_ == "turn.final":
                superseded = self._waiting_partials.pop(data["key"], None)
                if superseded is not None and behind:
                    superseded.type = None  # the final carries the whole text
                    self._voided += 1
                    self.hub.partials_coalesced += 1
            pending = _Pending(type_, data, describe, at)
        self._pending.append(pending)
        self._more.set()

    async def _next(self) -> _Pending | None:
        while not self._pending:
            self._more.clear()
            await self._more.wait()
        item = self._pending.popleft()
        if item is not None and item.type is None:
            self._voided -= 1
        elif item is not None and item.type == "turn.partial":
            key = item.data["key"]
            if self._waiting_partials.get(key) is item:
                del self._waiting_partials[key]
        return item

    async def _run(self) -> None:
        persist = self.hub.persist
        try:
            while (item := await self._next()) is not None:
                type_, data, describe, at = item.type, item.data, item.describe, item.at
                if type_ is None:
                    continue  # a partial its turn's final superseded while both waited
                extra = await asyncio.to_thread(describe) if describe is not None else None
                event = self.log.append(type_, data, at=at)
                if event is None:
                    continue  # a partial after its turn's final
                if persist is not None and type_ != "turn.partial":
                    try:
                        await persist(event, extra)
                    except Exception as exc:  # noqa: BLE001 - publish anyway, loudly
                        self.hub.persist_failures += 1
                        log.error(
                            "store.write_failed",
                            call_id=self.call_id,
                            seq=event.seq,
                            error=repr(exc),
                        )
                self.hub.publish(self, event)
                limit = self.hub.events_in_memory
                if persist is not None and len(self.log) > limit + min(_TRIM_SLACK, limit // 4):
                    # Amortized; every event but partials is committed by now, so resumes from
                    # before the log's first event are served from the store.
                    self.log.forget_oldest(limit)
                if len(self.log) > self._compact_at:
                    self.log.compact(keep_last=_KEEP_RECENT)
                    # Amortized: finals and utterances stay, so compact again only once the log
                    # has doubled (each compaction scans the whole log).
                    self._compact_at = max(_COMPACT_AT, 2 * len(self.log))
        finally:
            self.done.set()

    async def finish(self) -> None:
        """Wait until everything offered so far is published (the call has ended)."""
        await self.done.wait()

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _describe(
    call: Call, output: CallOutput
) -> tuple[str, dict[str, Any], _Document | None] | None:
    if isinstance(output, TurnDelta):
        u = output.update
        return ("turn.final" if u.final else "turn.partial", turn_data(call, u), None)
    if isinstance(output, UtteranceReleased):
        return ("transcript.utterance", utterance_data(output.index, output.utterance), None)
    if isinstance(output, CallStateChanged):
        if output.state is CallState.ACTIVE:
            return ("call.started", call_summary(call), None)
        if output.state in (CallState.ENDED, CallState.FAILED):
            from gateway.outputs.transcript_files import call_document

            # The document is built later, in a worker: the call no longer changes, and a
            # long call's transcript takes a second or more to build.
            return ("call.ended", call_summary(call), lambda: call_document(call))
        return None
    if isinstance(output, ChannelFailed):
        data = call_summary(call)
        data["change"] = "channel_failed"
        data["channel_failed"] = {"channel": output.channel, "reason": output.reason}
        return ("call.updated", data, None)
    if isinstance(output, CallUpdated):
        data = call_summary(call)
        data["change"] = output.change
        return ("call.updated", data, None)
    return None


class LiveHub:
    """All calls' publishers and subscribers (see module docstring)."""

    def __init__(
        self,
        *,
        queue_limit: int = 1000,
        firehose_buffer: int = 10000,
        events_in_memory: int = 200,
        keep_finished: int = 200,
        persist: Persist | None = None,
    ) -> None:
        self.queue_limit = queue_limit
        self.events_in_memory = events_in_memory
        self.persist = persist
        self.persist_failures = 0
        self.published = 0
        self.dropped_subscribers = 0
        self.partials_coalesced = 0
        self._publishers: dict[str, CallPublisher] = {}
        self._finished: OrderedDict[str, CallPublisher] = OrderedDict()
        self._keep_finished = keep_finished
        self._firehose: deque[FirehoseEvent] = deque(maxlen=firehose_buffer)
        self._gseq = 0
        self._all: set[Subscription] = set()

    # -- the Call side ---------------------------------------------------------------------------

    def listener(self, call: Call, output: CallOutput) -> None:
        """Attach to every call (``CallRegistry.add_listener``)."""
        publisher = self._publishers.get(call.call_id)
        if publisher is None:
            if call.call_id in self._finished:
                return
            publisher = self._open(call)
        publisher.offer(call, output)

    def _open(self, call: Call) -> CallPublisher:
        publisher = self._publishers[call.call_id] = CallPublisher(self, call)
        return publisher

    async def finished(self, call_id: str) -> None:
        """Wait until the call's events are all published; keep its log among the recent."""
        publisher = self._publishers.get(call_id)
        if publisher is None:
            return
        await publisher.finish()
        del self._publishers[call_id]
        self._finished[call_id] = publisher
        while len(self._finished) > self._keep_finished:
            self._finished.popitem(last=False)

    def publish(self, publisher: CallPublisher, event: CallEvent) -> None:
        self.published += 1
        publisher.published_seq = event.seq
        for sub in list(publisher.subscribers):
            sub.push(event)
            if sub.closed_reason is not None:
                publisher.subscribers.discard(sub)
                self.dropped_subscribers += sub.closed_reason == "slow_consumer"
        if event.type == "call.ended":
            for sub in list(publisher.subscribers):
                sub.close("call_ended")
            publisher.subscribers.clear()
        self._gseq += 1
        item = FirehoseEvent(self._gseq, event)
        firehose = self._firehose
        firehose.append(item)
        if len(firehose) > _KEEP_RECENT:
            # Older items are only ever resent as text: keep just that (a deque is cheap to
            # index near its ends).
            old = firehose[-_KEEP_RECENT - 1]
            firehose[-_KEEP_RECENT - 1] = FirehoseEvent(old.gseq, old.event.slim())
        for sub in list(self._all):
            sub.push(item)
            if sub.closed_reason is not None:
                self._all.discard(sub)
                self.dropped_subscribers += sub.closed_reason == "slow_consumer"

    # -- the subscriber side ---------------------------------------------------------------------

    def log_of(self, call_id: str) -> EventLog | None:
        publisher = self._publishers.get(call_id) or self._finished.get(call_id)
        return publisher.log if publisher else None

    @property
    def publish_backlog(self) -> int:
        """Events waiting to be stored and published, on the call with the most."""
        return max((p.backlog for p in self._publishers.values()), default=0)

    @property
    def subscriber_count(self) -> int:
        return len(self._all) + sum(len(p.subscribers) for p in self._publishers.values())

    def subscribe(self, call_id: str, after: int, call: Call | None = None) -> Subscribed | None:
        """The events after ``after`` so far, and a subscription for the rest.

        None if the call's log is not in memory (finished long ago: read the store). ``call`` is
        the Call when it is in memory: one admitted but not started yet has no events, and gets
        its publisher now, so the subscription follows it from its first event. For a call
        already ended the subscription is closed at once (``call_ended``). When ``after`` is
        older than the first event in memory, ``store_before`` says the events in between
        (``after`` < seq < ``store_before``) must be read from the store, before the backlog.
        """
        publisher = self._publishers.get(call_id) or self._finished.get(call_id)
        if publisher is None:
            if call is None or call.state is not CallState.NEW:
                return None
            publisher = self._open(call)
        log = publisher.log
        published = publisher.published_seq
        backlog = [event for event in log.after(after) if event.seq <= published]
        first = log.first_seq
        sub = Subscription(self.queue_limit)
        if log.closed and published >= log.last_seq:
            sub.close("call_ended")
        else:
            publisher.subscribers.add(sub)
        return Subscribed(backlog, sub, first if after < first - 1 else None)

    def unsubscribe(self, call_id: str, sub: Subscription) -> None:
        publisher = self._publishers.get(call_id) or self._finished.get(call_id)
        if publisher is not None:
            publisher.subscribers.discard(sub)

    def subscribe_all(self, after: int | None) -> tuple[list[FirehoseEvent], Subscription, bool]:
        """(backlog, subscription, complete): ``complete`` is False when ``after`` is older than
        the buffer (some events cannot be replayed), or beyond the newest id: an id from before
        a restart (ids start again at 1), so the whole buffer is replayed. ``after`` None = only
        new events."""
        sub = Subscription(self.queue_limit)
        self._all.add(sub)
        if after is None:
            return [], sub, True
        if after > self._gseq:
            return list(self._firehose), sub, False
        backlog = [item for item in self._firehose if item.gseq > after]
        oldest = self._firehose[0].gseq if self._firehose else self._gseq + 1
        complete = after >= oldest - 1
        return backlog, sub, complete

    def unsubscribe_all(self, sub: Subscription) -> None:
        self._all.discard(sub)

    @property
    def last_gseq(self) -> int:
        return self._gseq

    def forget(self, call_id: str) -> None:
        """Drop a deleted call's events from memory (its finished log and the firehose buffer)."""
        self._finished.pop(call_id, None)
        if any(item.event.call_id == call_id for item in self._firehose):
            kept = [item for item in self._firehose if item.event.call_id != call_id]
            self._firehose.clear()
            self._firehose.extend(kept)

    def close_subscriptions(self, reason: str) -> None:
        """End every live feed now (shutdown): their handlers return at once."""
        for sub in list(self._all):
            sub.close(reason)
        self._all.clear()
        for publisher in [*self._publishers.values(), *self._finished.values()]:
            for sub in list(publisher.subscribers):
                sub.close(reason)
            publisher.subscribers.clear()

    async def close(self) -> None:
        """Close every subscription and cancel every publisher."""
        for sub in list(self._all):
            sub.close("shutdown")
        self._all.clear()
        for publisher in [*self._publishers.values(), *self._finished.values()]:
            for sub in list(publisher.subscribers):
                sub.close("shutdown")
            await publisher.cancel()
        self._publishers.clear()
