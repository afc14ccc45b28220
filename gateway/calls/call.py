"""Call: normalized ingress events in, one STT session per channel, merged transcript out.

The Call is the only object that knows both sides: adapters feed it events (:meth:`Call.handle`),
output sinks receive :class:`CallOutput`s through listeners. It owns its channel clocks, its STT
sessions and one reader task per session, and cancels and awaits them on every exit path.

Lifecycle (explicit table, see ``_TRANSITIONS``)::

    NEW --CallStarted--> ACTIVE --CallEnded--> ENDING --sessions drained--> ENDED
    any state but ENDED --error/abort--> FAILED
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fractions import Fraction

from gateway.calls.channel import Channel, channel_info
from gateway.ingress.events import (
    Audio,
    CallEnded,
    CallStarted,
    ChannelAdded,
    ChannelSpec,
    Dtmf,
    Gap,
    Hold,
    IngressEvent,
    MetadataChanged,
    Resume,
)
from gateway.observability.logging import get_logger
from gateway.stt.session import SessionParams, SttEngine, SttError, Watermark
from gateway.transcript.merger import MergerOutput, TurnMerger
from gateway.transcript.model import ChannelInfo, Transcript, TurnUpdate

log = get_logger("gateway.call")


class CallState(Enum):
    NEW = "new"
    ACTIVE = "active"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


_TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.NEW: frozenset({CallState.ACTIVE, CallState.FAILED}),
    CallState.ACTIVE: frozenset({CallState.ENDING, CallState.FAILED}),
    CallState.ENDING: frozenset({CallState.ENDED, CallState.FAILED}),
    CallState.ENDED: frozenset(),
    CallState.FAILED: frozenset(),
}


class CallError(Exception):
    """An event that this call cannot accept (wrong state, unknown channel, bad timestamps)."""


@dataclass(frozen=True, slots=True)
class CallStateChanged:
    state: CallState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ChannelFailed:
    channel: int
    reason: str


@dataclass(frozen=True, slots=True)
class CallUpdated:
    """Roles, participants or metadata changed (``metadata``), or channels were put on hold
    (``hold``) or taken off it (``resume``); ``channel`` None means every channel."""

    change: str
    channel: int | None = None


CallOutput = MergerOutput | CallStateChanged | ChannelFailed | CallUpdated
Listener = Callable[["Call", CallOutput], None]
# observer(call, update, latency_s): every TurnUpdate from a session; latency_s (finals only) is
# the time from the arrival of the audio at the turn's end to the final (the STT latency).
TurnObserver = Callable[["Call", TurnUpdate, float | None], None]


@dataclass(slots=True)
class CallOptions:
    """Per-call knobs; the CLI and server fill them from config plus per-call overrides."""

    roles: Sequence[str] | None = None
    participants: Sequence[str | None] | None = None
    default_roles: Sequence[str] = ("customer", "agent")
    join_same_speaker: bool = True
    max_join_gap_ms: int = 1000
    partials: bool = True
    max_channels: int = 8
    max_timestamp_jump_s: int = 600
    log_transcripts: bool = False
    stt_options: dict[str, object] = field(default_factory=dict)


class Call:
    """One call's pipeline (see module docstring)."""

    def __init__(
        self,
        engine: SttEngine,
        options: CallOptions | None = None,
        *,
        call_id: str | None = None,
    ) -> None:
        self.call_id = call_id or uuid.uuid4().hex
        self.engine = engine
        self.options = options or CallOptions()
        self.state = CallState.NEW
        self.source = ""
        self.source_ids: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        self.channels: dict[int, Channel] = {}
        self.merger: TurnMerger | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason = ""
        self.finals = 0
        self._origin: Fraction | None = None  # call t=0 in seconds of the source media clock
        self._origin_at: dict[int, int] = {}  # the origin in samples, per rate where integral
        self._listeners: list[Listener] = []
        self.turn_observer: TurnObserver | None = None
        self._audio_taps: list[Callable[[int, bytes], None]] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._log = log.bind(call_id=self.call_id)

    # -- wiring ---------------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """``listener(call, output)`` is called synchronously for every output, in order."""
        self._listeners.append(listener)

    def add_audio_tap(self, tap: Callable[[int, bytes], None]) -> None:
        """``tap(channel, data)`` gets each channel's audio as it is placed on the call clock
        (gap fill included, in order), before it reaches the STT session. Call it no later than
        on ACTIVE (a CallStateChanged listener), before the first audio."""
        self._audio_taps.append(tap)
        for channel in self.channels.values():
            channel.tap = self._tap

    def _tap(self, index: int, data: bytes) -> None:
        for tap in self._audio_taps:
            tap(index, data)

    def _emit(self, output: CallOutput) -> None:
        for listener in self._listeners:
            listener(self, output)

    def _set_state(self, state: CallState, reason: str = "") -> None:
        if state not in _TRANSITIONS[self.state]:
            raise CallError(
                f"call {self.call_id}: cannot go from {self.state.value} to {state.value}"
            )
        self.state = state
        self._emit(CallStateChanged(state, reason))

    # -- events ---------------------------------------------------------------------------------

    async def handle(self, event: IngressEvent) -> None:
        """Apply one normalized ingress event. May wait for STT backpressure."""
        if isinstance(event, Audio):
            await self.audio(event)
        elif isinstance(event, Gap):
            await self._gap(event)
        elif isinstance(event, CallStarted):
            await self._start(event)
        elif isinstance(event, CallEnded):
            await self.end(event.reason)
        elif isinstance(event, MetadataChanged):
            self._metadata(event)
        elif isinstance(event, ChannelAdded):
            self._add_channel(event)
        elif isinstance(event, Hold | Resume):
            self._hold(event)
        elif isinstance(event, Dtmf):
            self._require(CallState.ACTIVE)
        else:  # pragma: no cover - exhaustive over IngressEvent
            raise CallError(f"unknown event {event!r}")

    def _require(self, *states: CallState) -> None:
        if self.state not in states:
            raise CallError(f"call {self.call_id} is {self.state.value}")

    async def _start(self, event: CallStarted) -> None:
        self._require(CallState.NEW)
        opts = self.options
        if not event.channels:
            raise CallError("call has no channels")
        if len(event.channels) > opts.max_channels:
            raise CallError(
                f"call has {len(event.channels)} channels (at most {opts.max_channels})"
            )
        self.source = event.source
        self.source_ids = dict(event.source_ids)
        self.metadata = _source_metadata(event.metadata)
        self.started_at = time.time()
        specs = [self._with_overrides(spec) for spec in event.channels]
        self.merger = TurnMerger(
            [channel_info(s) for s in specs],
            join_same_speaker=opts.join_same_speaker,
            max_join_gap_ms=opts.max_join_gap_ms,
        )
        try:
            for spec in specs:
                self._open_channel(spec, 0)
        except BaseException:
            await self.abort("failed to open STT sessions")
            raise
        self._set_state(CallState.ACTIVE)
        self._log.info(
            "call.started",
            source=self.source,
            channels=len(specs),
            roles=[s.role for s in specs],
            engine=self.engine.name,
        )

    def _open_channel(self, spec: ChannelSpec, start: int) -> Channel:
        """The channel's STT session and reader task, its clock beginning at sample ``start``."""
        opts = self.options
        session = self.engine.open_session(
            SessionParams(
                channel=spec.index,
                codec=spec.codec,
                sample_rate=spec.sample_rate,
                offset_ms=start * 1000 // spec.sample_rate,
                partials=opts.partials,
                options=dict(opts.stt_options),
                call_id=self.call_id,
            )
        )
        channel = Channel(
            spec,
            session,
            max_jump=opts.max_timestamp_jump_s * spec.sample_rate,
            start=start,
        )
        if self._audio_taps:
            channel.tap = self._tap
        self.channels[spec.index] = channel
        task = asyncio.create_task(self._read(channel), name=f"call-{self.call_id}-ch{spec.index}")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        return channel

    def _add_channel(self, event: ChannelAdded) -> None:
        """A leg joins mid-call: it begins where the call's slowest moving leg is now, on a whole
        millisecond (so its STT offset is exact), and the merger waits for it from there."""
        self._require(CallState.ACTIVE)
        spec = self._with_overrides(event.channel)
        if spec.index in self.channels:
            raise CallError(f"call {self.call_id}: channel {spec.index} already exists")
        if len(self.channels) >= self.options.max_channels:
            raise CallError(
                f"call {self.call_id}: a channel beyond the limit of {self.options.max_channels}"
            )
        reached = [
            c.clock.frontier * 1000 // c.spec.sample_rate
            for c in self.channels.values()
            if not c.on_hold and c.failed is None
        ]
        # The slowest leg that is still moving (a leg on hold gets no media, so its clock
        # stands still); a new leg's audio placed before that would be dropped as late.
        now_ms = min(reached) if reached else self.frontier_ms
        self._open_channel(spec, now_ms * spec.sample_rate // 1000)
        self.metadata.update(_source_metadata(event.metadata))
        assert self.merger is not None
        self.merger.add_channel(channel_info(spec), now_ms)
        self._emit(CallUpdated("channel_added", spec.index))
        self._log.info("call.channel_added", channel=spec.index, role=spec.role, at_ms=now_ms)

    def _with_overrides(self, spec: ChannelSpec) -> ChannelSpec:
        opts = self.options
        role = spec.role
        if opts.roles is not None and spec.index < len(opts.roles):
            role = opts.roles[spec.index]
        elif not role:
            role = (
                opts.default_roles[spec.index]
                if spec.index < len(opts.default_roles)
                else f"channel{spec.index}"
            )
        participant = spec.participant
        if opts.participants is not None and spec.index < len(opts.participants):
            participant = opts.participants[spec.index] or participant
        return ChannelSpec(spec.index, role, participant, spec.codec, spec.sample_rate)

    def _channel(self, index: int) -> Channel:
        channel = self.channels.get(index)
        if channel is None:
            raise CallError(f"call {self.call_id}: unknown channel {index}")
        return channel

    async def audio(self, event: Audio) -> None:
        """``handle(event)`` for audio, without the dispatch: every frame of every call comes
        here. May wait for STT backpressure."""
        # _require and _channel inlined.
        if self.state is not CallState.ACTIVE:
            raise CallError(f"call {self.call_id} is {self.state.value}")
        channel = self.channels.get(event.channel)
        if channel is None:
            raise CallError(f"call {self.call_id}: unknown channel {event.channel}")
        start: int | None = None
        if event.timestamp is not None:
            rate = channel.spec.sample_rate
            base = self._origin_at.get(rate)
            if base is None:
                if self._origin is None:
                    # Call t=0 is the first media; gaps declared before it (a stream that starts
                    # paused) come first on the clock, so this frame lands after them.
                    declared = max(
                        (
                            Fraction(c.clock.frontier, c.spec.sample_rate)
                            for c in self.channels.values()
                        ),
                        default=Fraction(0),
                    )
                    self._origin = Fraction(event.timestamp, rate) - declared
                scaled = self._origin * rate
                if scaled.denominator == 1:  # the usual case: integer math per frame
                    base = self._origin_at[rate] = int(scaled)
            if base is not None:
                start = event.timestamp - base
            else:
                assert self._origin is not None
                start = int((Fraction(event.timestamp, rate) - self._origin) * rate)
        elif self._origin is None:
            self._origin = Fraction(0)
        await channel.push(start, event.payload)

    async def _gap(self, event: Gap) -> None:
        self._require(CallState.ACTIVE)
        channel = self._channel(event.channel)
        await channel.fill_to(channel.clock.frontier + event.duration_samples)

    def _metadata(self, event: MetadataChanged) -> None:
        self._require(CallState.ACTIVE)
        self.metadata.update(_source_metadata(event.metadata))
        infos: list[ChannelInfo] = []
        for spec in event.channels:
            channel = self.channels.get(spec.index)
            if channel is None:
                continue
            channel.spec = ChannelSpec(
                spec.index,
                spec.role or channel.spec.role,
                spec.participant or channel.spec.participant,
                channel.spec.codec,
                channel.spec.sample_rate,
            )
            infos.append(channel_info(channel.spec))
        assert self.merger is not None
        self.merger.set_channels(infos)
        self._emit(CallUpdated("metadata"))

    def _hold(self, event: Hold | Resume) -> None:
        """Mark channels on hold or back; the audio clock is untouched (a hold's silence or
        missing media is filled like any gap). Emits :class:`CallUpdated` on a change."""
        self._require(CallState.ACTIVE)
        on_hold = isinstance(event, Hold)
        if event.channel is not None:
            self._channel(event.channel)  # unknown channel -> CallError
        targets = [c for c in self.channels.values() if event.channel in (None, c.spec.index)]
        if all(c.on_hold == on_hold for c in targets):
            return
        for channel in targets:
            channel.on_hold = on_hold
        self._emit(CallUpdated("hold" if on_hold else "resume", event.channel))

    # -- STT side -------------------------------------------------------------------------------

    async def _read(self, channel: Channel) -> None:
        assert self.merger is not None
        merger = self.merger
        index = channel.spec.index
        try:
            async for event in channel.session.events():
                if isinstance(event, TurnUpdate):
                    outputs = merger.update(event)
                    latency: float | None = None
                    if event.final:
                        self.finals += 1
                        self._log_final(event)
                        rate = channel.spec.sample_rate
                        arrived = channel.arrivals.arrival_of(event.end_ms * rate // 1000)
                        if arrived is not None:
                            latency = max(0.0, time.monotonic() - arrived)
                    if self.turn_observer is not None:
                        self.turn_observer(self, event, latency)
                elif isinstance(event, Watermark):
                    outputs = merger.watermark(index, event.ms)
                elif isinstance(event, SttError):
                    self._log.warning(
                        "stt.error", channel=index, reason=event.reason, fatal=event.fatal
                    )
                    if not event.fatal:
                        continue
                    channel.failed = event.reason
                    self._emit(ChannelFailed(index, event.reason))
                    outputs = merger.watermark(index, float("inf"))
                else:  # pragma: no cover
                    continue
                for output in outputs:
                    self._emit(output)
        finally:
            # A channel whose stream ended never holds back the others.
            if self.state is not CallState.FAILED:
                for output in merger.watermark(index, float("inf")):
                    self._emit(output)

    def _log_final(self, u: TurnUpdate) -> None:
        # Transcript text is personal data: at info level only when explicitly enabled.
        fields = {
            "channel": u.channel,
            "turn": u.turn_order,
            "start_ms": u.start_ms,
            "end_ms": u.end_ms,
            "words": len(u.words),
        }
        if self.options.log_transcripts:
            self._log.info("turn.final", text=u.text, **fields)
        else:
            self._log.debug("turn.final", text=u.text, **fields)

    # -- ending ---------------------------------------------------------------------------------

    async def end(self, reason: str = "normal") -> None:
        """End the call: align channels, flush every session, release everything, ENDED.

        Idempotent. On failure or cancellation the call is aborted (FAILED) and re-raises.
        """
        if self.state in (CallState.ENDED, CallState.FAILED, CallState.ENDING):
            return
        if self.state is CallState.NEW:
            self.ended_at = time.time()  # retention counts from here
            self._set_state(CallState.FAILED, "ended before start")
            return
        self.end_reason = reason
        self._set_state(CallState.ENDING, reason)
        try:
            # All channels end at the same call time, so no channel is shorter than another
            # (in time: channels may differ in sample rate).
            end = max(
                (Fraction(c.clock.frontier, c.spec.sample_rate) for c in self.channels.values()),
                default=Fraction(0),
            )
            for channel in self.channels.values():
                await channel.fill_to(math.ceil(end * channel.spec.sample_rate))
            for channel in self.channels.values():
                await channel.session.finish()
            if self._readers:
                await asyncio.gather(*list(self._readers))
            assert self.merger is not None
            for output in self.merger.close():
                self._emit(output)
        except BaseException:
            await self.abort(f"failed while ending: {reason}")
            raise
        self.ended_at = time.time()
        self._set_state(CallState.ENDED, reason)
        self._log.info(
            "call.ended",
            reason=reason,
            duration_s=round(self.duration_ms / 1000, 3),
            finals=self.finals,
            utterances=self.merger.released_count,
            stt_reconnects=sum(getattr(c.session, "reconnects", 0) for c in self.channels.values()),
            late_audio_frames=sum(c.clock.late_frames for c in self.channels.values()),
            filled_ms=sum(c.filled_ms for c in self.channels.values()),
        )

    async def abort(self, reason: str) -> None:
        """Tear down at once (cancellation, fatal error): sessions closed, tasks awaited."""
        if self.state in (CallState.ENDED, CallState.FAILED):
            return
        for task in list(self._readers):
            task.cancel()
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.session.aclose()
        for task in list(self._readers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.ended_at = time.time()
        self.state = CallState.FAILED
        self._emit(CallStateChanged(CallState.FAILED, reason))
        self._log.warning("call.aborted", reason=reason)

    # -- results --------------------------------------------------------------------------------

    @property
    def frontier_ms(self) -> int:
        """Call time reached by the furthest channel's received audio (ms)."""
        return max(
            (c.clock.frontier * 1000 // c.spec.sample_rate for c in self.channels.values()),
            default=0,
        )

    def source_timestamp(self, call_ms: int, rate: int) -> int:
        """The media timestamp (in samples at ``rate``) that lands at ``call_ms`` on this call.

        A continuing stream whose own clock restarts at 0 is placed by adding this to its
        timestamps.
        """
        origin = self._origin if self._origin is not None else Fraction(0)
        return int(origin * rate) + call_ms * rate // 1000

    @property
    def duration_ms(self) -> int:
        return max((c.duration_ms for c in self.channels.values()), default=0)

    def transcript(self) -> Transcript:
        """The ordered transcript released so far (all of it once ENDED)."""
        utterances = self.merger.utterances if self.merger else ()
        return Transcript(
            call_id=self.call_id,
            channels=tuple(channel_info(c.spec) for c in self.channels.values()),
            utterances=utterances,
            duration_ms=self.duration_ms,
            metadata=dict(self.metadata),
        )


GATEWAY_METADATA = frozenset({"recording"})
"""Metadata keys the gateway itself sets (the recording's path); a source cannot set them."""


def _source_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in GATEWAY_METADATA}
