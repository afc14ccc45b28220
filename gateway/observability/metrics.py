"""Prometheus metrics, in a registry owned by the app (no global collectors).

Every metric name starts with ``callgate_``. Labels are bounded sets (source dialect, reason
tokens, outcome): never a call id, a phone number or free text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The gateway's collectors; one instance per application."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # The app binds it to its registry with set_function (no bookkeeping to drift).
        self.calls_active = Gauge("callgate_calls_active", "Calls in progress", registry=r)
        self.calls = Counter(
            "callgate_calls",
            "Calls finished, by outcome (ended, failed)",
            ["source", "outcome"],
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
            "Streams closed for bad input (malformed_json, bad_base64, unknown_event, "
            "media_before_start, message_too_large, unsupported_codec, rate_exceeded, ...)",
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
        self.stt_channel_failures = Counter(
            "callgate_stt_channel_failures",
            "Channels whose STT session failed for good",
            ["engine"],
            registry=r,
        )
        self.finals = Counter(
            "callgate_turn_finals", "Final turns produced", ["engine"], registry=r
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
        self.events_published = Gauge(
            "callgate_events_published",
            "Events published to live feeds since start (a counter kept by the hub)",
            registry=r,
        )
        self.subscriber_drops = Gauge(
            "callgate_live_subscriber_drops",
            "Subscribers disconnected for falling behind since start",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format for ``GET /metrics``."""
        return generate_latest(self.registry)
