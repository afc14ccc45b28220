"""LiveCall without sockets: which stream feeds which channels when streams overlap."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.calls.call import CallState
from gateway.calls.live import LiveCall
from gateway.calls.registry import CallRegistry
from gateway.ingress.events import CallStarted, ChannelSpec
from gateway.ingress.ws_shell import call_options
from tests.gateway_server import hello_engine, poll_until, settings_for


class _Link:
    """A stream handler's side: records how the LiveCall closed it."""

    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def _started(tracks: str) -> CallStarted:
    names = tracks.split(",")
    return CallStarted(
        "twilio",
        tuple(ChannelSpec(i, name) for i, name in enumerate(names)),
        {"callSid": "CA1"},
        {"tracks": tracks},
    )


def _live(tmp: Path, grace_s: float) -> LiveCall:
    settings = settings_for(tmp)
    registry = CallRegistry(max_calls=4)
    return registry.create(
        hello_engine(),
        call_options(settings),
        source="twilio",
        key="CA1",
        grace_s=grace_s,
        max_call_s=60.0,
    )


async def test_a_continuation_replaces_the_stream_feeding_its_channels(tmp_path: Path) -> None:
    # The old stream still looks attached when its continuation arrives (a reconnect before the
    # old TCP connection is known dead): from that moment the old one is marked replaced, so
    # its handler drops whatever it still reads, it is closed, and its detach, whenever it
    # comes, does not end the call; the new stream's does.
    live = _live(tmp_path, grace_s=0.2)
    old, new = _Link(), _Link()
    first = await live.start(_started("inbound,outbound"), old)
    assert not first.replaced
    second = live.continue_with(_started("inbound,outbound"), new)
    assert first.replaced and not second.replaced
    assert second.channel_map == {0: 0, 1: 1}
    await poll_until(lambda: old.closed is not None, within_s=2)
    assert old.closed == (1000, "replaced") and new.closed is None
    live.detach(old, "disconnected")
    await asyncio.sleep(0.4)  # beyond the grace period: the call goes on with the new stream
    assert live.accepting and live.call.state is CallState.ACTIVE
    live.detach(new, "stop")
    await asyncio.wait_for(live.finished.wait(), 5.0)
    assert live.call.state is CallState.ENDED


async def test_continuations_of_different_tracks_both_feed_the_call(tmp_path: Path) -> None:
    # A both_tracks call continued by one stream per track: the first takes over the original
    # stream (it overlaps channel 0), the second feeds channel 1 beside it, replacing nothing.
    live = _live(tmp_path, grace_s=0.2)
    both, inbound, outbound = _Link(), _Link(), _Link()
    original = await live.start(_started("inbound,outbound"), both)
    first = live.continue_with(_started("inbound"), inbound)
    second = live.continue_with(_started("outbound"), outbound)
    assert (first.channel_map, second.channel_map) == ({0: 0}, {0: 1})
    assert original.replaced and not first.replaced and not second.replaced
    await poll_until(lambda: both.closed is not None, within_s=2)
    live.detach(both, "disconnected")
    live.detach(inbound, "stop")
    await asyncio.sleep(0.4)  # the outbound stream still feeds the call
    assert live.accepting and inbound.closed is None and outbound.closed is None
    live.detach(outbound, "stop")
    await asyncio.wait_for(live.finished.wait(), 5.0)
    assert live.call.state is CallState.ENDED


async def test_a_replaced_stream_detaching_late_does_not_end_a_continued_call(
    tmp_path: Path,
) -> None:
    # The race: the new stream goes away first (a redirect), the call lingers for its grace
    # period, and only then does the replaced stream's handler notice its socket is gone. Its
    # detach must not start a second countdown that a third stream's arrival would not cancel.
    live = _live(tmp_path, grace_s=0.3)
    old, new, third = _Link(), _Link(), _Link()
    await live.start(_started("inbound,outbound"), old)
    live.continue_with(_started("inbound,outbound"), new)
    live.detach(new, "stop")  # lingering now
    live.detach(old, "disconnected")  # late
    live.continue_with(_started("inbound,outbound"), third)
    await asyncio.sleep(0.6)  # twice the grace period
    assert live.accepting and live.call.state is CallState.ACTIVE
    live.detach(third, "stop")
    await asyncio.wait_for(live.finished.wait(), 5.0)
    assert live.call.state is CallState.ENDED
