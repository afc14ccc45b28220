"""Event-loop lag: how late the loop runs a timer, i.e. how long it was busy with other work.

A blocked or saturated loop delays every call's audio; this is the signal behind the
``callgate_event_loop_lag_seconds`` histogram and its alert.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = 0.25) -> None:
    """Sleep ``interval_s`` over and over and ``observe`` how much later than asked each sleep
    ended (seconds, >= 0). Runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, loop.time() - asked))
