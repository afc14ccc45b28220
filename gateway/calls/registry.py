"""CallRegistry: the live calls of one gateway, their limits, and graceful drain.

The registry owns every :class:`~gateway.calls.live.LiveCall` and every background task they
need (grace timers, max-duration timers, endings): :meth:`CallRegistry.close` cancels and awaits
them all. Finished calls move to a bounded list of recent calls that the API reads.

Drain (SIGTERM): :meth:`drain` stops admitting new calls, lets active ones finish for up to a
timeout, then ends the rest (their STT sessions Terminate and their transcripts are flushed)
and waits until every finish hook has run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from gateway.calls.call import Call, CallOptions, CallState, Listener
from gateway.calls.live import LiveCall, LiveState
from gateway.calls.tasks import TaskSet
from gateway.observability.logging import get_logger
from gateway.stt.session import SttEngine

log = get_logger("gateway.registry")

FinishHook = Callable[[LiveCall], Awaitable[None]]


class AdmissionRefused(Exception):
    """A new call cannot be admitted; ``reason`` is a metric token (at_capacity, draining)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CallRegistry:
    """See module docstring."""

    def __init__(self, *, max_calls: int, recent: int = 1000) -> None:
        self.max_calls = max_calls
        self.accepting = True
        self._recent_limit = recent
        self._active: dict[str, LiveCall] = {}
        self._by_key: dict[tuple[str, str], LiveCall] = {}
        self._recent: OrderedDict[str, Call] = OrderedDict()
        self._tasks = TaskSet("registry")
        self._listeners: list[Listener] = []
        self._finish_hooks: list[FinishHook] = []
        self._idle = asyncio.Event()
        self._idle.set()

    # -- wiring ----------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Attach ``listener`` to every call created from now on (live outputs, consoles)."""
        self._listeners.append(listener)

    def on_finished(self, hook: FinishHook) -> None:
        """``await hook(live)`` after each call has ended (store it, count it)."""
        self._finish_hooks.append(hook)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task the registry owns (cancelled and awaited by :meth:`close`)."""
        return self._tasks.spawn(coro, name)

    # -- lookup ----------------------------------------------------------------------------------

    @property
    def active_count(self) -> int:
        return len(self._active)

    def active(self) -> Iterator[LiveCall]:
        return iter(list(self._active.values()))

    def finishing(self, call_id: str) -> bool:
        """Whether the call is still active or running its finish hooks (store, files,
        webhooks): until then its outputs are incomplete and deleting it would race them."""
        return call_id in self._active

    def recent(self) -> Iterator[Call]:
        """Finished calls, newest last."""
        return iter(list(self._recent.values()))

    def find(self, source: str, key: str) -> LiveCall | None:
        """The live call a new stream with this source and call id would continue."""
        live = self._by_key.get((source, key))
        return live if live is not None and live.accepting else None

    def get(self, ident: str) -> Call | None:
        """A call by its call id, or by one of its source ids (e.g. Twilio's callSid)."""
        live = self._active.get(ident)
        if live is not None:
            return live.call
        call = self._recent.get(ident)
        if call is not None:
            return call
        for candidate in [*(lv.call for lv in self._active.values()), *self._recent.values()]:
            if ident in candidate.source_ids.values():
                return candidate
        return None

    def forget(self, call_id: str) -> None:
        """Drop a finished call from the recent list (it was deleted)."""
        self._recent.pop(call_id, None)

    # -- admission -------------------------------------------------------------------------------

    def check_stream(self, source: str) -> None:
        """Raise AdmissionRefused if a stream of ``source`` arriving now cannot be taken: no new
        call may start, and no call of that source waits for a continuation (a Twilio redirect,
        an AudioHook or jambonz reconnect), which needs no admission. A stream let through
        that turns out to start a new call is still refused when it does (:meth:`create`)."""
        try:
            self.check_admission()
        except AdmissionRefused:
            if not any(
                live.source == source and live.state is LiveState.LINGERING
                for live in self._active.values()
            ):
                raise

    def check_admission(self) -> None:
        """Raise AdmissionRefused if no new call may start now."""
        if not self.accepting:
            raise AdmissionRefused("draining", "the gateway is shutting down")
        if len(self._active) >= self.max_calls:
            raise AdmissionRefused(
                "at_capacity", f"the gateway is at its limit of {self.max_calls} calls"
            )

    def create(
        self,
        engine: SttEngine,
        options: CallOptions,
        *,
        source: str,
        key: str | None,
        grace_s: float,
        max_call_s: float,
    ) -> LiveCall:
        """A new LiveCall (its Call not started yet). Raises AdmissionRefused."""
        self.check_admission()
        call = Call(engine, options)
        for listener in self._listeners:
            call.add_listener(listener)
        live = LiveCall(
            call,
            source=source,
            key=key,
            grace_s=grace_s,
            max_call_s=max_call_s,
            spawn=self.spawn,
            on_finished=self._finished,
        )
        self._active[call.call_id] = live
        if key:
            self._by_key[(source, key)] = live
        self._idle.clear()
        return live

    async def _finished(self, live: LiveCall) -> None:
        # The call counts as active until its finish hooks (store, files, webhooks) have run,
        # so "no active calls" means everything is flushed.
        if live.key and self._by_key.get((live.source, live.key)) is live:
            del self._by_key[(live.source, live.key)]
        if live.call.state is not CallState.NEW and self._recent_limit:
            self._recent[live.call_id] = live.call
            while len(self._recent) > self._recent_limit:
                self._recent.popitem(last=False)
        try:
            for hook in self._finish_hooks:
                try:
                    await hook(live)
                except Exception as exc:  # noqa: BLE001 - one bad hook must not stop the others
                    log.error("registry.finish_hook_failed", call_id=live.call_id, error=repr(exc))
        finally:
            self._active.pop(live.call_id, None)
            if not self._active:
                self._idle.set()

    # -- shutdown --------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting, wait up to ``timeout_s`` for calls to end, then end the rest."""
        self.accepting = False
        remaining = len(self._active)
        log.info("gateway.draining", active_calls=remaining, timeout_s=timeout_s)
        if remaining:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout_s)
        lives = list(self._active.values())
        if lives:
            log.info("gateway.ending_calls", calls=len(lives))
            await asyncio.gather(
                *(live.end("shutdown", code=1001) for live in lives), return_exceptions=True
            )
        await self._idle.wait()

    async def close(self) -> None:
        """Cancel and await every task the registry owns; abort calls still running."""
        for live in list(self._active.values()):
            with contextlib.suppress(Exception):
                await live.call.abort("gateway stopped")
        await self._tasks.close()
