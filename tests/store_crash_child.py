"""Child process for the crash test in tests/test_store.py: ``python store_crash_child.py DB``.

Opens the store, starts an active call and then writes finals as fast as it can, printing
``ready SEQ`` after each ``add_event`` returned (the event is committed), until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from gateway.outputs.events import CallEvent
from gateway.outputs.store import SqliteStore

CALL_ID = "crash-call"


def summary() -> dict[str, object]:
    return {
        "id": CALL_ID,
        "source": "twilio",
        "source_ids": {"callSid": "CA-crash", "streamSid": "MZ-crash"},
        "state": "active",
        "end_reason": "",
        "started_at": time.time(),
        "ended_at": None,
        "duration_ms": 0,
        "metadata": {"campaign": "crash"},
        "channels": [
            {"index": 0, "role": "customer", "participant": None, "speaker": "customer"},
            {"index": 1, "role": "agent", "participant": "Ann", "speaker": "Ann"},
        ],
    }


def final(seq: int) -> CallEvent:
    n = seq - 2  # turn number from 0
    channel = n % 2
    start = n * 500
    return CallEvent(
        CALL_ID,
        seq,
        "turn.final",
        time.time(),
        {
            "key": f"{channel}:0:{n // 2}",
            "channel": channel,
            "epoch": 0,
            "turn_order": n // 2,
            "speaker": "customer" if channel == 0 else "Ann",
            "role": "customer" if channel == 0 else "agent",
            "start": start,
            "end": start + 400,
            "text": f"turn {n}",
            "confidence": 0.9,
            "words": [
                {"text": "turn", "start": start, "end": start + 200, "confidence": 0.9},
                {"text": str(n), "start": start + 200, "end": start + 400, "confidence": 0.9},
            ],
            "final": True,
        },
    )


def ready(seq: int) -> None:
    sys.stdout.write(f"ready {seq}\n")
    sys.stdout.flush()


async def main(path: Path) -> None:
    store = SqliteStore(path)
    await store.open()
    await store.add_event(CallEvent(CALL_ID, 1, "call.started", time.time(), summary()))
    ready(1)
    seq = 2
    while True:  # until SIGKILL
        await store.add_event(final(seq))
        ready(seq)
        seq += 1


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
