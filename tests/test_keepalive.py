"""IdleSweep: which quiet media streams to ping and which to drop (sans I/O)."""

from __future__ import annotations

from gateway.ingress.keepalive import IdleSweep


def test_a_stream_quiet_for_an_interval_is_pinged_then_dropped_half_an_interval_later() -> None:
    sweep: IdleSweep[str] = IdleSweep()
    assert sweep.sweep([("a", 5)]) == ([], [])  # first seen
    assert sweep.sweep([("a", 5)]) == ([], [])  # quiet for half an interval
    assert sweep.sweep([("a", 5)]) == (["a"], [])  # a whole interval: ping
    assert sweep.sweep([("a", 5)]) == ([], ["a"])  # no pong within half an interval: drop


def test_any_message_or_pong_clears_a_pending_ping() -> None:
    sweep: IdleSweep[str] = IdleSweep()
    for _ in range(2):
        sweep.sweep([("a", 1)])
    assert sweep.sweep([("a", 1)]) == (["a"], [])
    assert sweep.sweep([("a", 2)]) == ([], [])  # the pong came
    assert sweep.sweep([("a", 2)]) == ([], [])
    assert sweep.sweep([("a", 2)]) == (["a"], [])  # quiet again for an interval: pinged again


def test_streams_are_judged_apart_and_forgotten_when_unwatched() -> None:
    sweep: IdleSweep[str] = IdleSweep()
    counts = {"busy": 0, "quiet": 0}
    pinged: list[str] = []
    dropped: list[str] = []
    for _ in range(6):
        counts["busy"] += 50  # media every sweep
        ping, drop = sweep.sweep(counts.items())
        pinged += ping
        dropped += drop
    assert pinged == ["quiet"] and dropped == ["quiet"]
    # Unwatched (not in the counts) and back with the same count: judged afresh.
    assert sweep.sweep([("busy", 999)]) == ([], [])
    assert sweep.sweep([("busy", 999), ("quiet", 0)]) == ([], [])
    assert sweep.sweep([("busy", 999), ("quiet", 0)]) == (["busy"], [])
    assert sweep.sweep([("busy", 999), ("quiet", 0)]) == (["quiet"], ["busy"])
