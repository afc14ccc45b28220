"""TaskSet: the background tasks one component owns (invariant: every task has an owner)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from gateway.observability.logging import get_logger

log = get_logger("gateway.tasks")


class TaskSet:
    """Spawns named tasks, logs the ones that fail, and cancels and awaits them all on
    :meth:`close`. ``owner`` names the component in the failure log line."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as an owned task named ``name``."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def close(self) -> None:
        """Cancel every task still running and wait for each to finish."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "task.failed", owner=self.owner, task=task.get_name(), error=repr(task.exception())
            )
