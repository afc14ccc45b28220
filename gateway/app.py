"""The aiohttp application behind ``gateway serve``.

Routes (paths of the ingress endpoints come from config)::

    GET  /twilio/stream, /telnyx/stream, /signalwire/stream   Media Streams WebSockets
    POST /twilio/voice                                         TwiML: start a both_tracks stream
    GET  /audiohook/ws                                         Genesys AudioHook Monitor
    GET  /stereo/ws                                            stereo PCM (FreeSWITCH, jambonz)
    GET  /healthz, /readyz                                     alive; ready for new calls
    GET  /metrics                                              Prometheus text format
    GET  /v1/calls, /v1/calls/{id}, /v1/calls/{id}/transcript  calls and transcripts

Startup/cleanup contexts (in order): the event-loop lag watcher, the STT engines (the default
one started before the first request), the store (with webhooks), the call registry (on cleanup:
cancel and await everything it owns). A
graceful stop is :func:`drain` (stop admitting, finish calls up to the drain timeout, end the
rest) followed by the runner's cleanup; ``gateway serve`` does both on SIGTERM/SIGINT.

Without ``api.tokens`` the REST routes answer loopback clients only, since transcripts and
phone numbers are personal data.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

from gateway.api import routes as api
from gateway.api.auth import ApiAuth, cors_middleware
from gateway.api.routes import add_routes
from gateway.calls.call import (
    Call,
    CallOutput,
    CallState,
    CallStateChanged,
    CallUpdated,
    Listener,
)
from gateway.calls.live import LiveCall
from gateway.calls.registry import CallRegistry
from gateway.config import MediaStreamSettings, Settings
from gateway.ingress.audiohook_handler import AudioHookHandler
from gateway.ingress.keepalive import StreamKeepalive
from gateway.ingress.stereo_ws_handler import StereoWsHandler
from gateway.ingress.twilio import Dialect
from gateway.ingress.twilio_handler import MediaStreamHandler
from gateway.ingress.twilio_signature import SignedRequest, TwilioSignatureValidator
from gateway.observability.logging import get_logger
from gateway.observability.loop_lag import watch_loop_lag
from gateway.observability.metrics import (
    CONTENT_TYPE,
    MediaTotals,
    Metrics,
    StateSnapshot,
)
from gateway.outputs.events import CallEvent
from gateway.outputs.live import LiveHub
from gateway.outputs.recorder import CallRecorder, RecordedFormat
from gateway.outputs.store import SqliteStore
from gateway.outputs.transcript_files import TranscriptFiles
from gateway.outputs.webhooks import WebhookSender, deliveries_for, event_body
from gateway.stt.engines import EngineSet
from gateway.transcript.model import TurnUpdate

log = get_logger("gateway.app")

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
# Audio totals of calls that have finished (the live ones are read from the calls at scrape time).
FINISHED_MEDIA = web.AppKey("finished_media", MediaTotals)
ENGINES = web.AppKey("engines", EngineSet)
REGISTRY = web.AppKey("registry", CallRegistry)
KEEPALIVE = web.AppKey("ws_keepalive", StreamKeepalive)
TRANSCRIPTS = web.AppKey("transcripts", TranscriptFiles)


def make_app(settings: Settings, *, engines: EngineSet | None = None) -> web.Application:
    """The gateway application; nothing starts until the runner sets it up."""
    app = web.Application(
        client_max_size=1 << 20, middlewares=[cors_middleware(settings.api.cors_origins)]
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[FINISHED_MEDIA] = MediaTotals()
    app[ENGINES] = engines or EngineSet(settings)
    app[REGISTRY] = CallRegistry(
        max_calls=settings.server.max_calls, recent=settings.server.recent_calls
    )
    app[api.REGISTRY] = app[REGISTRY]
    app[KEEPALIVE] = StreamKeepalive(settings.server.ws_heartbeat_s, app[METRICS])
    app[api.AUTH] = ApiAuth(settings.api)
    app[api.KEEPALIVE_S] = settings.live.keepalive_s
    app[api.HUB] = LiveHub(
        queue_limit=settings.live.queue_limit,
        firehose_buffer=settings.live.firehose_buffer,
        events_in_memory=settings.live.events_in_memory,
    )
    app[TRANSCRIPTS] = TranscriptFiles(Path(settings.server.data_dir) / "transcripts")
    app[api.STORE] = SqliteStore(
        Path(settings.store.path or Path(settings.server.data_dir) / "callgate.sqlite3"),
        on_write=app[METRICS].store_write.observe,
    )
    # Startup in this order, cleanup in reverse: calls end (and publish) before the webhook
    # sender and the store close.
    app.cleanup_ctx.append(_loop_lag_ctx)
    app.cleanup_ctx.append(_engines_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_registry_ctx)
    app.cleanup_ctx.append(_keepalive_ctx)
    if settings.siprec.enabled:
        # After the registry: on cleanup the SIP listeners and RTP sockets close first.
        from gateway.ingress.siprec.service import SIPREC, SiprecService

        app[SIPREC] = SiprecService(
            settings, registry=app[REGISTRY], engines=app[ENGINES], metrics=app[METRICS]
        )
        app.cleanup_ctx.append(app[SIPREC].context)
    app.on_shutdown.append(_close_live_feeds)
    app[api.ON_DELETE] = [_delete_files_of(app[TRANSCRIPTS], _recordings_dir(settings))]

    dialects: tuple[tuple[Dialect, MediaStreamSettings], ...] = (
        ("twilio", settings.twilio),
        ("telnyx", settings.telnyx),
        ("signalwire", settings.signalwire),
    )
    paths: set[str] = set()
    for dialect, conf in dialects:
        if not conf.enabled:
            continue
        if conf.path in paths:
            raise ValueError(f"{dialect}.path {conf.path!r} is used by another endpoint")
        paths.add(conf.path)
        handler = MediaStreamHandler(
            dialect,
            conf,
            settings=settings,
            registry=app[REGISTRY],
            engines=app[ENGINES],
            metrics=app[METRICS],
            keepalive=app[KEEPALIVE],
        )
        app.router.add_get(conf.path, handler.handle, name=f"{dialect}_stream")
    _add_more_ingress(app, settings, paths)
    if settings.twilio.enabled and settings.twilio.voice_path:
        app.router.add_post(settings.twilio.voice_path, _twilio_voice, name="twilio_voice")
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    add_routes(app)
    return app


def _add_more_ingress(app: web.Application, settings: Settings, paths: set[str]) -> None:
    """The AudioHook and stereo PCM WebSocket endpoints (when enabled)."""
    registry, engines, metrics = app[REGISTRY], app[ENGINES], app[METRICS]
    conf = settings.audiohook
    if conf.enabled:
        if conf.path in paths:
            raise ValueError(f"audiohook.path {conf.path!r} is used by another endpoint")
        paths.add(conf.path)
        audiohook = AudioHookHandler(
            conf, settings=settings, registry=registry, engines=engines, metrics=metrics
        )
        app.router.add_get(conf.path, audiohook.handle, name="audiohook_stream")
    stereo = settings.stereo_ws
    if stereo.enabled:
        if stereo.path in paths:
            raise ValueError(f"stereo_ws.path {stereo.path!r} is used by another endpoint")
        paths.add(stereo.path)
        handler = StereoWsHandler(
            stereo,
            settings=settings,
            registry=registry,
            engines=engines,
            metrics=metrics,
            keepalive=app[KEEPALIVE],
        )
        app.router.add_get(stereo.path, handler.handle, name="stereo_ws_stream")


async def drain(app: web.Application) -> None:
    """Graceful stop: no new calls, active calls finish (bounded), everything flushed."""
    await app[REGISTRY].drain(app[SETTINGS].server.drain_timeout_s)


# -- contexts ------------------------------------------------------------------------------------


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(watch_loop_lag(app[METRICS].loop_lag.observe), name="loop-lag")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _keepalive_ctx(app: web.Application) -> AsyncIterator[None]:
    keepalive = app[KEEPALIVE]
    keepalive.start()
    try:
        yield
    finally:
        await keepalive.close()


async def _engines_ctx(app: web.Application) -> AsyncIterator[None]:
    engines = app[ENGINES]
    delay = app[METRICS].stt_send_delay

    def chunk_sent(_first_s: float, last_s: float) -> None:
        delay.observe(last_s)

    engines.on_started(lambda engine: _hook_send_delay(engine, chunk_sent))
    await engines.get()  # load the default engine (the local model) before the first call
    try:
        yield
    finally:
        await engines.close()


def _recordings_dir(settings: Settings) -> Path:
    return Path(settings.recording.dir or Path(settings.server.data_dir) / "recordings")


def _delete_files_of(files: TranscriptFiles, recordings: Path) -> api.DeleteHook:
    async def delete(summary: dict[str, Any]) -> None:
        # Paths come from the call id only, never from its metadata: sources write metadata.
        call_id = summary["id"]
        recording = recordings / f"{call_id}.wav"
        paths = [files.path(call_id), recording, recording.with_name(recording.name + ".widen")]

        def unlink() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        await asyncio.to_thread(unlink)

    return delete


async def _close_live_feeds(app: web.Application) -> None:
    # Before aiohttp waits for open handlers: live feeds would otherwise hold the shutdown
    # until their next keep-alive write notices a gone client.
    app[api.HUB].close_subscriptions("shutdown")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    metrics = app[METRICS]
    hub = app[api.HUB]
    store = app[api.STORE]
    assert isinstance(store, SqliteStore)
    interrupted = await store.open()
    if interrupted:
        metrics.calls_interrupted.inc(interrupted)
        log.warning("store.calls_interrupted", calls=interrupted)
    metrics.outbox_depth.set_function(lambda: store.pending_deliveries)
    hooks = settings.webhooks
    sender: WebhookSender | None = None
    if hooks.urls:
        sender = WebhookSender(
            store,
            hooks,
            on_outcome=lambda outcome: metrics.webhook_deliveries.labels(outcome).inc(),
        )
        await sender.start()

    async def persist(event: CallEvent, document: dict[str, Any] | None) -> None:
        if sender is not None and event.type in hooks.events:
            if event.type == "call.ended":  # the whole transcript: encode it off the loop
                body = await asyncio.to_thread(event_body, event, document)
            else:
                body = event_body(event)
            deliveries = deliveries_for(event.type, event.call_id, body, hooks.urls, event.time)
            try:
                await store.add_event_and_enqueue(event, deliveries)
            except Exception:
                metrics.store_failures.inc()
                raise
            sender.notify()
            return
        try:
            await store.add_event(event)
        except Exception:
            metrics.store_failures.inc()
            raise

    hub.persist = persist
    retention = (
        app[REGISTRY].spawn(
            _purge_old_calls(app, store, settings.store.retention_days), "store-retention"
        )
        if settings.store.retention_days > 0
        else None
    )
    try:
        yield
    finally:
        if retention is not None:
            retention.cancel()
        if sender is not None:
            await sender.close()
        await store.close()


async def purge_old_calls(app: web.Application, store: SqliteStore, days: float) -> int:
    """Delete the finished calls older than ``days`` from the store, from memory, and their
    files (as ``DELETE /v1/calls/{id}`` does). Returns how many."""
    removed = await store.purge(time.time() - days * 86400)
    for summary in removed:
        await api.forget_call(app, summary)
    if removed:
        log.info("store.purged", calls=len(removed), retention_days=days)
    return len(removed)


async def _purge_old_calls(app: web.Application, store: SqliteStore, days: float) -> None:
    """:func:`purge_old_calls` hourly."""
    while True:
        try:
            await purge_old_calls(app, store, days)
        except Exception as exc:  # noqa: BLE001 - retention must never stop the gateway
            log.error("store.purge_failed", error=repr(exc))
        await asyncio.sleep(3600)


def _record_calls(registry: CallRegistry, directory: Path) -> None:
    """Record every call from ACTIVE on into DIRECTORY/CALL_ID.wav (see CallRecorder)."""
    recorders: dict[str, CallRecorder] = {}

    def on_output(call: Call, output: CallOutput) -> None:
        if isinstance(output, CallStateChanged) and output.state is CallState.ACTIVE:
            formats = [
                RecordedFormat(c.spec.codec, c.spec.sample_rate) for c in call.channels.values()
            ]
            recorder = CallRecorder(directory / f"{call.call_id}.wav", formats)
            recorders[call.call_id] = recorder
            call.metadata["recording"] = str(recorder.path)
            call.add_audio_tap(recorder.feed)
        elif isinstance(output, CallUpdated) and output.change == "channel_added":
            widened = recorders.get(call.call_id)
            added = call.channels.get(output.channel) if output.channel is not None else None
            if widened is not None and added is not None:
                fmt = RecordedFormat(added.spec.codec, added.spec.sample_rate)
                widened.add_channel(added.spec.index, fmt, added.start)

    async def finished(live: LiveCall) -> None:
        recorder = recorders.pop(live.call_id, None)
        if recorder is None:
            return
        try:
            path = await recorder.close()
        except OSError as exc:
            log.error("recording.write_failed", call_id=live.call_id, error=str(exc))
            return
        log.info("recording.stored", call_id=live.call_id, path=str(path))

    registry.add_listener(on_output)
    registry.on_finished(finished)


def _count_call_starts(metrics: Metrics) -> Listener:
    def listener(call: Call, output: CallOutput) -> None:
        if isinstance(output, CallStateChanged) and output.state is CallState.ACTIVE:
            metrics.calls_started.labels(call.source).inc()

    return listener


def _observe_turns(metrics: Metrics) -> Listener:
    """Attach a turn observer to each call as it starts: partials, finals, STT latency."""

    def observe(call: Call, update: TurnUpdate, latency_s: float | None) -> None:
        engine = call.engine.name
        if not update.final:
            metrics.partials.labels(engine).inc()
            return
        metrics.finals.labels(engine).inc()
        if latency_s is not None:
            metrics.final_latency.labels(engine).observe(latency_s)

    def listener(call: Call, output: CallOutput) -> None:
        if isinstance(output, CallStateChanged) and output.state is CallState.ACTIVE:
            call.turn_observer = observe

    return listener


def _media_of(live: LiveCall) -> MediaTotals:
    totals = MediaTotals()
    source = live.source
    for channel in live.call.channels.values():
        rate = channel.spec.sample_rate
        key = (source, channel.spec.role)
        totals.received_s[key] = totals.received_s.get(key, 0.0) + (channel.received_samples / rate)
        totals.filled_s[key] = totals.filled_s.get(key, 0.0) + (channel.clock.filled_samples / rate)
        clock = channel.clock
        for reason, n in (
            ("late", clock.late_frames - clock.duplicate_frames),
            ("duplicate", clock.duplicate_frames),
        ):
            totals.dropped[(source, reason)] = totals.dropped.get((source, reason), 0) + n
    return totals


def _snapshot(app: web.Application) -> StateSnapshot:
    """The live state /metrics shows, read at scrape time (on the loop: consistent)."""
    finished_media = app[FINISHED_MEDIA]
    registry = app[REGISTRY]
    engines = app[ENGINES]
    hub = app[api.HUB]
    settings = app[SETTINGS]
    media = MediaTotals()
    media.add(finished_media)
    calls_active: dict[str, int] = {}
    sessions_active = {engine.name: 0 for engine in engines.started_engines()}
    queued_ms = 0
    for live in registry.active():
        calls_active[live.source] = calls_active.get(live.source, 0) + 1
        call = live.call
        if call.state is CallState.NEW:
            continue
        if not live.accounted:
            media.add(_media_of(live))
        if call.state in (CallState.ACTIVE, CallState.ENDING):
            for channel in call.channels.values():
                if channel.failed is None:
                    name = call.engine.name
                    sessions_active[name] = sessions_active.get(name, 0) + 1
                    queued_ms = max(queued_ms, channel.session.queued_ms)
    starts: dict[str, int] = {}
    reconnects: dict[tuple[str, str], int] = {}
    failures: dict[tuple[str, str], int] = {}
    for engine in engines.started_engines():
        stats = engine.stats
        starts[engine.name] = starts.get(engine.name, 0) + stats.session_starts
        for reason, n in stats.reconnects.items():
            reconnects[(engine.name, reason)] = reconnects.get((engine.name, reason), 0) + n
        for reason, n in stats.failures.items():
            failures[(engine.name, reason)] = failures.get((engine.name, reason), 0) + n
    # Every enabled ingress shows in callgate_calls_active, 0 included (dashboards list them).
    ingresses = ("twilio", "telnyx", "signalwire", "audiohook", "stereo_ws", "siprec")
    sources = [name for name in ingresses if getattr(settings, name).enabled]
    return StateSnapshot(
        sources=sources,
        calls_active=calls_active,
        media=media,
        sessions_active=sessions_active,
        session_starts=starts,
        reconnects=reconnects,
        failures=failures,
        queued_audio_s=queued_ms / 1000,
        events_published=hub.published,
        subscriber_drops=hub.dropped_subscribers,
        partials_coalesced=hub.partials_coalesced,
        publish_backlog=hub.publish_backlog,
        ready=registry.accepting and engines.started(engines.default),
    )


def _hook_send_delay(engine: object, hook: Callable[[float, float], None]) -> None:
    # Engines that stream to a socket (the AssemblyAI client) report each chunk's delay.
    if hasattr(engine, "on_chunk_sent"):
        engine.on_chunk_sent = hook


async def _registry_ctx(app: web.Application) -> AsyncIterator[None]:
    registry = app[REGISTRY]
    metrics = app[METRICS]
    files = app[TRANSCRIPTS]
    hub = app[api.HUB]
    metrics.live_subscribers.set_function(lambda: hub.subscriber_count)
    finished_media = app[FINISHED_MEDIA]
    registry.add_listener(hub.listener)
    registry.add_listener(_count_call_starts(metrics))
    registry.add_listener(_observe_turns(metrics))

    async def finished(live: LiveCall) -> None:
        call = live.call
        if call.state is not CallState.NEW:
            finished_media.add(_media_of(live))  # before any await: scrapes see it once
        live.accounted = True
        await hub.finished(call.call_id)  # every event of the call published (and stored)
        if call.state is CallState.NEW:
            return  # never started (refused at start): nothing to store or count
        outcome = "ended" if call.state is CallState.ENDED else "failed"
        metrics.calls_ended.labels(live.source, outcome).inc()
        metrics.call_duration.labels(live.source).observe(call.duration_ms / 1000)
        try:
            path = await files.write(call)
        except OSError as exc:
            metrics.transcripts_written.labels("error").inc()
            log.error("transcript.write_failed", call_id=call.call_id, error=str(exc))
            return
        metrics.transcripts_written.labels("ok").inc()
        log.info("transcript.stored", call_id=call.call_id, path=str(path))

    registry.on_finished(finished)
    recording = app[SETTINGS].recording
    if recording.enabled:
        _record_calls(registry, _recordings_dir(app[SETTINGS]))
    try:
        yield
    finally:
        await registry.close()
        await hub.close()


# -- TwiML helper ----------------------------------------------------------------------------


def _public_base(request: web.Request, settings: Settings) -> tuple[str, str]:
    """(scheme, host) this gateway is reached at, for URLs handed to a platform."""
    if settings.server.public_url:
        parts = urlsplit(settings.server.public_url)
        return parts.scheme, parts.netloc
    if settings.server.trust_forwarded:
        proto = (request.headers.get("X-Forwarded-Proto") or "").split(",")[0].strip()
        host = (request.headers.get("X-Forwarded-Host") or "").split(",")[0].strip()
        if proto or host:
            return proto or request.scheme, host or request.host
    return request.scheme, request.host


async def _twilio_voice(request: web.Request) -> web.Response:
    """A number's voice webhook: TwiML that streams both tracks to this gateway."""
    settings = request.app[SETTINGS]
    conf = settings.twilio
    form = await request.post()
    params = {k: str(v) for k, v in form.items()}
    token = conf.auth_token.get_secret_value()
    signed = False
    if token:
        validator = TwilioSignatureValidator(
            token,
            public_url=settings.server.public_url,
            trust_forwarded=settings.server.trust_forwarded,
        )
        failure = validator.check(
            SignedRequest(
                scheme=request.scheme,
                host=request.host,
                path=request.path,
                query_string=request.query_string,
                headers=request.headers,
                params=params,
            )
        )
        if failure is not None:
            request.app[METRICS].streams_rejected.labels("twilio_voice", failure.value).inc()
            log.warning("twiml.refused", reason=failure.value, remote=request.remote)
            return web.Response(status=403, text=f"{failure.value}\n")
        signed = True
    scheme, host = _public_base(request, settings)
    ws_scheme = "ws" if scheme in ("http", "ws") else "wss"
    url = f"{ws_scheme}://{host}{conf.path}"
    parameters: list[tuple[str, str]] = []
    for name, key in (("from", "From"), ("to", "To"), ("direction", "Direction")):
        if params.get(key):
            parameters.append((name, params[key]))
    secret = conf.shared_secret.get_secret_value()
    if secret and signed:
        # Only a request Twilio signed may learn the secret.
        parameters.append((conf.secret_parameter, secret))
    inner = "".join(f"<Parameter name={quoteattr(n)} value={quoteattr(v)}/>" for n, v in parameters)
    if conf.voice_then:
        then = conf.voice_then
    elif conf.voice_dial:
        target = conf.voice_dial
        then = (
            f"<Dial><Sip>{escape(target)}</Sip></Dial>"
            if target.startswith(("sip:", "sips:"))
            else f"<Dial>{escape(target)}</Dial>"
        )
    else:
        then = f'<Pause length="{int(settings.calls.max_call_s)}"/>'
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<Response><Start><Stream url={quoteattr(url)} track="both_tracks">{inner}</Stream>'
        f"</Start>{then}</Response>"
    )
    return web.Response(text=body, content_type="text/xml")


# -- health, metrics -----------------------------------------------------------------------------


async def _healthz(request: web.Request) -> web.Response:
    """Alive: the process answers (also while draining)."""
    _maybe_require(request)
    registry = request.app[REGISTRY]
    return web.json_response(
        {
            "status": "ok",
            "draining": not registry.accepting,
            "active_calls": registry.active_count,
        }
    )


async def _readyz(request: web.Request) -> web.Response:
    """Ready for new calls: engines loaded, store writable, not draining; else 503 and why."""
    _maybe_require(request)
    app = request.app
    problems: list[str] = []
    if not app[REGISTRY].accepting:
        problems.append("draining")
    engines = app[ENGINES]
    if not engines.started(engines.default):
        problems.append(f"engine {engines.default} not loaded")
    store = app[api.STORE]
    try:
        async with asyncio.timeout(2.0):
            await store.writable()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        problems.append(f"store not writable: {type(exc).__name__}: {exc}")
    body = {"status": "ready" if not problems else "not_ready", "problems": problems}
    return web.json_response(body, status=503 if problems else 200)


def _maybe_require(request: web.Request) -> None:
    """Health and metrics are open unless ``api.open_metrics`` is false."""
    if not request.app[SETTINGS].api.open_metrics:
        request.app[api.AUTH].require(request)


async def _metrics(request: web.Request) -> web.Response:
    _maybe_require(request)
    # Rendering reads /proc and walks every collector: off the loop, with the live state
    # snapshotted on it first.
    body = await asyncio.to_thread(request.app[METRICS].exposition, _snapshot(request.app))
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE
    return resp
