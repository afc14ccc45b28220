"""Prometheus metrics, in a registry owned by the app (no global collectors).

Every metric name starts with ``callgate_``. Labels are bounded sets (source dialect, reason
tokens, outcome): never a call id, a phone number or free text.

Two kinds of metric live here. Events that happen a few times per call (a call starts, a final
turn arrives) update prometheus-client collectors directly. Quantities that change with every
20 ms frame (audio seconds, dropped frames) or that are state (active calls, queued audio,
readiness) are not counted on the audio path at all: :class:`GatewayCollector` reads them from
the live calls at scrape time, plus the totals of calls that have finished.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The gateway's collectors; one instance per application."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._state = GatewayCollector()
        r.register(self._state)
        self._lock = threading.Lock()
        self._standard = False  # the process/GC/platform collectors, added by exposition()
        self.calls_started = Counter(
            "callgate_calls_started", "Calls that started (media flowing)", ["source"], registry=r
        )
        self.calls_ended = Counter(
            "callgate_calls_ended",
            "Calls finished, by outcome (ended, failed)",
            ["source", "outcome"],
            registry=r,
        )
        self.call_duration = Histogram(
            "callgate_call_duration_seconds",
            "Call duration (call clock: from the first media to the end)",
            ["source"],
            buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
            registry=r,
        )
        self.streams = Counter(
            "callgate_streams", "Media streams accepted (upgrades)", ["source"], registry=r
        )
        self.streams_rejected = Counter(
            "callgate_streams_rejected",
            "Streams refused before or at start (missing_signature, bad_signature, "
            "bad_secret, unsigned_refused, at_capacity, draining, not_websocket, ...)",
            ["source", "reason"],
            registry=r,
        )
        self.stream_errors = Counter(
            "callgate_stream_errors",
            "Streams closed for bad input, i.e. frames rejected (malformed_json, bad_base64, "
            "unknown_event, media_before_start, message_too_large, unsupported_codec, "
            "rate_exceeded, ...)",
            ["source", "reason"],
            registry=r,
        )
        self.stream_continuations = Counter(
            "callgate_stream_continuations",
            "Streams that continued an existing call (same call id: a redirect)",
            ["source"],
            registry=r,
        )
        self.media_frames = Counter(
            "callgate_media_frames", "Media frames received", ["source"], registry=r
        )
        self.media_bytes = Counter(
            "callgate_media_bytes", "Media payload bytes received", ["source"], registry=r
        )
        self.partials = Counter(
            "callgate_turn_partials", "Partial turn updates from STT", ["engine"], registry=r
        )
        self.finals = Counter(
            "callgate_turn_finals", "Final turns from STT", ["engine"], registry=r
        )
        self.final_latency = Histogram(
            "callgate_stt_final_latency_seconds",
            "From the arrival of the audio at a turn's end (end of speech) to its final turn",
            ["engine"],
            buckets=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.transcripts_written = Counter(
            "callgate_transcripts_written",
            "Finished-call transcripts written to the data directory, by result (ok, error)",
            ["result"],
            registry=r,
        )
        self.stt_send_delay = Histogram(
            "callgate_stt_send_delay_seconds",
            "From the arrival of a chunk's last audio frame to the chunk on the STT socket",
            buckets=(
                0.0005,
                0.001,
                0.002,
                0.003,
                0.005,
                0.0075,
                0.01,
                0.015,
                0.02,
                0.03,
                0.05,
                0.075,
                0.1,
                0.15,
                0.2,
                0.3,
                0.5,
                1.0,
                2.0,
            ),
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "callgate_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, retry, dead)",
            ["outcome"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "callgate_webhook_outbox_depth", "Webhook deliveries waiting in the outbox", registry=r
        )
        self.siprec_packet_delay = Histogram(
            "callgate_siprec_packet_delay_seconds",
            "From the arrival of the RTP packet completing a block to that block on the call clock "
            "(sampled)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.siprec_rtp_dropped = Counter(
            "callgate_siprec_rtp_dropped",
            "RTP packets of recorded streams dropped before the call clock, by reason: "
            "malformed, unknown_payload (a type the SDP did not offer), srtp_rejected (failed "
            "SRTP authentication), duplicate, late (after the jitter buffer moved on), "
            "foreign_ssrc (another sender's SSRC interleaved with the locked one), backlog "
            "(the call's audio waiting for STT exceeded siprec.max_backlog_s)",
            ["reason"],
            registry=r,
        )
        self.store_write = Histogram(
            "callgate_store_write_seconds",
            "Time from a store write being queued to its commit (finals wait this before publish)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.store_failures = Counter(
            "callgate_store_write_failures",
            "Events that could not be written to the store (published anyway)",
            registry=r,
        )
        self.calls_interrupted = Counter(
            "callgate_calls_interrupted",
            "Calls found unfinished in the store at startup (the gateway had stopped mid-call)",
            registry=r,
        )
        self.live_subscribers = Gauge(
            "callgate_live_subscribers", "Live feed subscribers connected", registry=r
        )
        self.loop_lag = Histogram(
            "callgate_event_loop_lag_seconds",
            "How late the event loop ran a timer (time it could not run anything else)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )

    def exposition(self, snapshot: StateSnapshot | None = None) -> bytes:
        """The text format for ``GET /metrics``, with ``snapshot`` as the live state.

        Reads /proc (the process collector): call it in a worker thread, with a snapshot taken
        on the event loop (the loop's objects are not read from here).
        """
        with self._lock:
            if not self._standard:
                # The standard process (CPU, RSS, fds), GC and platform collectors. Registering
                # reads /proc, hence here, off the loop, rather than in __init__.
                ProcessCollector(registry=self.registry)
                GCCollector(registry=self.registry)
                PlatformCollector(registry=self.registry)
                self._standard = True
            self._state.snapshot = snapshot
            try:
                return generate_latest(self.registry)
            finally:
                self._state.snapshot = None


# -- scrape-time state ---------------------------------------------------------------------------


@dataclass(slots=True)
class MediaTotals:
    """Audio accounting per (source, role): seconds received, seconds gap-filled, dropped
    frames by reason (``late``, ``duplicate``)."""

    received_s: dict[tuple[str, str], float] = field(default_factory=dict)
    filled_s: dict[tuple[str, str], float] = field(default_factory=dict)
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, other: MediaTotals) -> None:
        for mine, theirs in (
            (self.received_s, other.received_s),
            (self.filled_s, other.filled_s),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0.0) + value
        for key, n in other.dropped.items():
            self.dropped[key] = self.dropped.get(key, 0) + n


@dataclass(slots=True)
class StateSnapshot:
    """What :class:`GatewayCollector` exposes, gathered by the app at scrape time."""

    sources: Iterable[str]
    calls_active: Mapping[str, int]
    media: MediaTotals
    sessions_active: Mapping[str, int]
    session_starts: Mapping[str, int]
    reconnects: Mapping[tuple[str, str], int]
    failures: Mapping[tuple[str, str], int]
    queued_audio_s: float
    events_published: int
    subscriber_drops: int
    partials_coalesced: int
    publish_backlog: int
    ready: bool


class GatewayCollector:
    """Exposes the :class:`StateSnapshot` that :meth:`Metrics.exposition` was given."""

    def __init__(self) -> None:
        self.snapshot: StateSnapshot | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unknown until a scrape; prometheus-client then calls collect()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if s is None:
            return
        active = GaugeMetricFamily("callgate_calls_active", "Calls in progress", labels=["source"])
        for source in sorted({*s.sources, *s.calls_active}):
            active.add_metric([source], s.calls_active.get(source, 0))
        yield active
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        yield _family(
            counter,
            "callgate_audio_received_seconds",
            "Audio received from sources, per channel role (gap fill excluded)",
            ("source", "role"),
            s.media.received_s.items(),
        )
        yield _family(
            counter,
            "callgate_audio_gap_filled_seconds",
            "Silence inserted on the call clock where a source sent no audio (gaps)",
            ("source", "role"),
            s.media.filled_s.items(),
        )
        yield _family(
            counter,
            "callgate_media_frames_dropped",
            "Frames dropped on the call clock: late (their place was already sent on) or "
            "duplicate (a copy of audio still pending)",
            ("source", "reason"),
            s.media.dropped.items(),
        )
        yield _family(
            gauge,
            "callgate_stt_sessions_active",
            "STT sessions open",
            ("engine",),
            [((k,), v) for k, v in s.sessions_active.items()],
        )
        yield _family(
            counter,
            "callgate_stt_session_starts",
            "STT sessions opened",
            ("engine",),
            [((k,), v) for k, v in s.session_starts.items()],
        )
        yield _family(
            counter,
            "callgate_stt_reconnects",
            "STT reconnects by reason (close code, connect_failed, rollover, ...)",
            ("engine", "reason"),
            s.reconnects.items(),
        )
        yield _family(
            counter,
            "callgate_stt_failures",
            "STT sessions that failed for good, by reason",
            ("engine", "reason"),
            s.failures.items(),
        )
        yield GaugeMetricFamily(
            "callgate_stt_queued_audio_seconds",
            "Audio waiting to be taken by the STT engine, on the worst channel",
            value=s.queued_audio_s,
        )
        yield CounterMetricFamily(
            "callgate_events_published",
            "Events published to live feeds",
            value=s.events_published,
        )
        yield CounterMetricFamily(
            "callgate_live_subscriber_drops",
            "Live subscribers disconnected for falling behind",
            value=s.subscriber_drops,
        )
        yield CounterMetricFamily(
            "callgate_live_partials_coalesced",
            "Partials replaced by a newer partial or their final while waiting to be published",
            value=s.partials_coalesced,
        )
        yield GaugeMetricFamily(
            "callgate_live_publish_backlog",
            "Events waiting to be stored and published, on the call with the most (a slow store)",
            value=s.publish_backlog,
        )
        yield GaugeMetricFamily(
            "callgate_ready",
            "1 when new calls are accepted (engine loaded, not draining), else 0",
            value=1.0 if s.ready else 0.0,
        )


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    labels: tuple[str, ...],
    samples: Iterable[tuple[Sequence[str], float]],
) -> Metric:
    """One labelled family with a sample per ``(label values, value)``, sorted."""
    family = kind(name, doc, labels=list(labels))
    for key, value in sorted(samples):
        family.add_metric(list(key), value)
    return family
