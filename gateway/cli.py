"""Command line: ``gateway transcribe`` and ``gateway check-config``.

Every user error (bad file, bad config, bad option) prints one line on stderr and exits with
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import SecretStr

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


class TranscriptionFailed(Exception):
    """The speech engine failed a channel: printed as one line, exit status 1."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Callgate: live call audio to speaker-ordered call transcripts.",
    )
    parser.add_argument("--version", action="version", version=f"callgate {__version__}")
    parser.add_argument(
        "--config", metavar="PATH", help="TOML config file (default: $GATEWAY_CONFIG, or none)"
    )
    # --config is accepted after the command too; SUPPRESS keeps a top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "transcribe",
        parents=[common],
        help="transcribe a recorded call (WAV, 1-8 channels, one party per channel)",
        description="Transcribe a recorded call through the same pipeline as live calls.",
    )
    t.add_argument("file", type=Path, metavar="CALL.wav")
    t.add_argument(
        "--roles",
        help="comma-separated role per channel, in channel order (default from config: "
        "customer,agent)",
    )
    t.add_argument("--speakers", help="comma-separated participant name per channel (optional)")
    t.add_argument("--format", default="text", help="text, json, vtt or srt (default: text)")
    t.add_argument("--out", type=Path, metavar="FILE", help="write here instead of stdout")
    t.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr (auto: on a terminal, for files over 30 s)",
    )
    t.add_argument(
        "--engine", choices=("local", "assemblyai"), help="speech engine (default: stt.engine)"
    )
    t.add_argument(
        "--stt-url",
        metavar="URL",
        help="AssemblyAI v3 WebSocket URL for --engine assemblyai (e.g. a `gateway stt-server`)",
    )
    t.add_argument("-v", "--verbose", action="store_true", help="log pipeline events to stderr")

    v = sub.add_parser(
        "stt-server",
        parents=[common],
        help="serve a speech engine over the AssemblyAI v3 streaming protocol",
        description="An AssemblyAI-v3-compatible WebSocket server (ws://HOST:PORT/v3/ws).",
    )
    v.add_argument("--host", help="bind address (default: stt_server.host)")
    v.add_argument("--port", type=int, help="port, 0 for any free one (default: stt_server.port)")
    v.add_argument("--engine", choices=("local", "scripted"), help="default: stt_server.engine")
    v.add_argument("--script", type=Path, help="JSON word script for --engine scripted")

    srv = sub.add_parser(
        "serve",
        parents=[common],
        help="run the live gateway (Twilio/Telnyx/SignalWire streams, API, metrics)",
        description="Run the gateway until SIGTERM/SIGINT, then drain: active calls finish "
        "(up to server.drain_timeout_s), transcripts are flushed, exit 0.",
    )
    srv.add_argument("--host", help="bind address (default: server.host)")
    srv.add_argument("--port", type=int, help="port, 0 for any free one (default: server.port)")
    srv.add_argument(
        "--demo",
        type=Path,
        metavar="CALL.wav",
        help="also stream this stereo WAV through the gateway's own Twilio endpoint and print "
        "the live transcript (the `make run` demo); the server keeps running afterwards",
    )
    srv.add_argument(
        "--demo-speed", type=float, default=1.0, help="playback speed of --demo (default 1.0)"
    )
    srv.add_argument(
        "--demo-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a <Parameter> of the demo stream, e.g. inbound_participant=Diane (repeatable)",
    )
    srv.add_argument("-v", "--verbose", action="store_true", help="log at debug level")

    from gateway.simulate import cli as simulate_cli

    simulate_cli.register(sub, [common])

    sub.add_parser(
        "check-config", parents=[common], help="validate the configuration and print it as JSON"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.command == "check-config":
            print(settings.model_dump_json(indent=2))
            return 0
        if args.command == "transcribe":
            return _transcribe(args, settings)
        if args.command == "stt-server":
            return _stt_server(args, settings)
        if args.command == "serve":
            return _serve(args, settings)
        if args.command == "simulate":
            from gateway.simulate import cli as simulate_cli

            return simulate_cli.run(args)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TranscriptionFailed as exc:
        print(f"gateway: transcription failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse exits


def _split_list(value: str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise UsageError(f"--{what}: empty entry in {value!r}")
    return items


def _transcribe(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.ingress.file import FileSourceError, probe_wav
    from gateway.observability.logging import configure_logging
    from gateway.transcript.render import FORMATS

    if args.format not in FORMATS:
        raise UsageError(f"--format: unknown format {args.format!r} (use {', '.join(FORMATS)})")
    settings = _with_engine(settings, args.engine, args.stt_url)
    aai = settings.stt.assemblyai
    if (
        settings.stt.engine == "assemblyai"
        and not aai.url
        and not (aai.api_key.get_secret_value() or aai.token.get_secret_value())
    ):
        raise UsageError(
            "the assemblyai engine needs an API key: set GATEWAY_STT__ASSEMBLYAI__API_KEY "
            "(or a credential file stt.assemblyai.api_key), or --stt-url for a v3 server"
        )
    roles = _split_list(args.roles, "roles") or list(settings.calls.default_roles)
    speakers = _split_list(args.speakers, "speakers")
    configure_logging("debug" if args.verbose else "warning", settings.logging.format)
    try:
        fmt = probe_wav(args.file, max_channels=settings.calls.max_channels)
    except FileSourceError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    if args.out is not None and args.out.parent and not args.out.parent.is_dir():
        raise UsageError(f"--out: directory {str(args.out.parent)!r} does not exist")
    duration = fmt.frames / fmt.sample_rate if fmt.frames is not None else None
    size = args.file.stat().st_size
    show = args.progress == "always" or (
        args.progress == "auto" and sys.stderr.isatty() and (duration or 0) > 30
    )
    try:
        text = asyncio.run(
            _run_transcription(
                args.file, settings, roles, speakers, args.format, size if show else 0
            )
        )
    except FileSourceError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        if text and not text.endswith("\n"):
            sys.stdout.write("\n")
    return 0


async def _run_transcription(
    path: Path,
    settings: Settings,
    roles: list[str],
    speakers: list[str] | None,
    fmt: str,
    progress_total: int,
) -> str:
    """Run the file through a Call on the configured engine; ``progress_total`` > 0 shows a bar."""
    from gateway.calls.call import Call, CallOptions
    from gateway.ingress.file import play_file
    from gateway.stt.engines import make_engine
    from gateway.transcript.render import render

    engine = make_engine(settings)
    await engine.start()
    bar = None
    if progress_total:
        from tqdm import tqdm

        bar = tqdm(
            total=progress_total,
            unit="B",
            unit_scale=True,
            desc=path.name,
            file=sys.stderr,
            leave=False,
        )
    call = Call(
        engine,
        CallOptions(
            roles=roles,
            participants=speakers,
            default_roles=settings.calls.default_roles,
            join_same_speaker=settings.transcript.join_same_speaker,
            max_join_gap_ms=settings.transcript.max_join_gap_ms,
            partials=False,  # nobody watches partials of an offline file
            max_channels=settings.calls.max_channels,
            max_timestamp_jump_s=settings.calls.max_timestamp_jump_s,
            log_transcripts=settings.logging.log_transcripts,
            # A file is all there at once: pace it strictly at real time (no catch-up lead).
            stt_options={"max_catchup_ms": 0},
        ),
        call_id=path.stem,
    )

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)

    try:
        await play_file(
            call, path, roles=roles, max_channels=settings.calls.max_channels, progress=progress
        )
    except BaseException:
        await call.abort("transcription failed")
        raise
    finally:
        if bar is not None:
            bar.close()
        await engine.close()
    failed = [f"channel {i}: {c.failed}" for i, c in call.channels.items() if c.failed]
    if failed:
        raise TranscriptionFailed("; ".join(failed))
    return render(call.transcript(), fmt)


def _with_engine(settings: Settings, engine: str | None, url: str | None) -> Settings:
    """Apply --engine/--stt-url on top of the loaded settings."""
    stt = settings.stt
    if url is not None:
        if not url.startswith(("ws://", "wss://")):
            raise UsageError(f"--stt-url: expected a ws:// or wss:// URL, got {url!r}")
        stt = stt.model_copy(update={"assemblyai": stt.assemblyai.model_copy(update={"url": url})})
        engine = engine or "assemblyai"
    if engine is not None:
        stt = stt.model_copy(update={"engine": engine})
    return settings.model_copy(update={"stt": stt})


def _stt_server(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.observability.logging import configure_logging

    conf = settings.stt_server
    engine_name = args.engine or conf.engine
    script_path = args.script or (Path(conf.script) if conf.script else None)
    if engine_name == "scripted" and script_path is None:
        raise UsageError("stt-server --engine scripted needs --script FILE")
    configure_logging(settings.logging.level, settings.logging.format)
    host = args.host or conf.host
    port = conf.port if args.port is None else args.port
    asyncio.run(_serve_stt(settings, engine_name, script_path, host, port))
    return 0


async def _serve_stt(
    settings: Settings, engine_name: str, script_path: Path | None, host: str, port: int
) -> None:
    import signal

    from aiohttp import web

    from gateway.stt.local import LocalEngine
    from gateway.stt.scripted import ScriptedEngine, load_script
    from gateway.stt.session import SttEngine
    from gateway.stt.v3_server import V3Server, V3ServerOptions, make_app

    conf = settings.stt_server
    engine: SttEngine
    if engine_name == "scripted":
        assert script_path is not None
        try:
            script = await asyncio.to_thread(load_script, script_path)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--script {script_path}: {exc}") from None
        engine = ScriptedEngine(script)
    else:
        engine = LocalEngine(settings.stt.local)
    server = V3Server(
        engine,
        V3ServerOptions(
            api_keys=frozenset(k.get_secret_value() for k in conf.api_keys),
            max_session_s=conf.max_session_s,
            realtime_allowance_s=conf.realtime_allowance_s,
            max_sessions=conf.max_sessions,
        ),
    )
    runner = web.AppRunner(make_app(server), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"stt-server: cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"stt-server listening on ws://{host}:{bound}/v3/ws", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.observability.logging import configure_logging

    conf = settings.server
    host = args.host or conf.host
    port = conf.port if args.port is None else args.port
    demo: Path | None = args.demo
    if demo is not None:
        from gateway.ingress.file import FileSourceError, probe_wav

        try:
            fmt = probe_wav(demo, max_channels=2)
        except FileSourceError as exc:
            raise UsageError(f"--demo {demo}: {exc}") from None
        if fmt.channels != 2:
            raise UsageError(f"--demo {demo}: expected a stereo WAV (customer, agent)")
        if not settings.twilio.enabled:
            raise UsageError("--demo needs the Twilio endpoint (twilio.enabled = true)")
        if not 0 < args.demo_speed <= settings.calls.max_speed:
            raise UsageError(
                f"--demo-speed must be in (0, {settings.calls.max_speed}] (calls.max_speed)"
            )
    level = "debug" if args.verbose else settings.logging.level
    if demo is not None and not args.verbose:
        level = "warning"  # the transcript is the demo's output; keep stderr for problems
    params: dict[str, str] = {}
    for item in args.demo_param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--demo-param: expected KEY=VALUE, got {item!r}")
        params[key.strip()] = value
    configure_logging(level, settings.logging.format)
    with asyncio.Runner(loop_factory=_loop_factory(conf.event_loop)) as runner:
        return runner.run(_run_server(settings, host, port, demo, args.demo_speed, params))


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between young-generation collections while serving (CPython's default: 700)."""


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop constructor for ``server.event_loop`` (None: asyncio's default)."""
    if name == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


async def _run_server(
    settings: Settings,
    host: str,
    port: int,
    demo: Path | None,
    demo_speed: float,
    demo_params: dict[str, str],
) -> int:
    import contextlib
    import gc
    import secrets
    import signal

    from aiohttp import web

    from gateway.app import REGISTRY, drain, make_app

    demo_token = settings.twilio.auth_token.get_secret_value()
    if demo is not None and not demo_token:
        # The demo signs its stream like Twilio would, with a token made up for this run.
        demo_token = secrets.token_hex(16)
        twilio = settings.twilio.model_copy(update={"auth_token": SecretStr(demo_token)})
        settings = settings.model_copy(update={"twilio": twilio})
    secret = settings.twilio.shared_secret.get_secret_value()
    if demo is not None and secret:
        demo_params = {settings.twilio.secret_parameter: secret, **demo_params}
    app = make_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    _say("callgate: loading the speech engine ...", "serve.loading")
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"serve: cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown}:{bound}"
    lines = [f"callgate {__version__} serving on {host}:{bound}"]
    for name in ("twilio", "telnyx", "signalwire"):
        conf = getattr(settings, name)
        if conf.enabled:
            lines.append(f"  {name + ' stream:':19} ws://{shown}:{bound}{conf.path}")
    for name in ("audiohook", "stereo_ws"):
        conf = getattr(settings, name)
        if conf.enabled:
            label = f"{name.replace('_', ' ')}:"
            lines.append(f"  {label:19} ws://{shown}:{bound}{conf.path}")
    if settings.siprec.enabled:
        from gateway.ingress.siprec.service import SIPREC

        ports = app[SIPREC].sip_ports  # as bound (port 0 in config = any free port)
        listening = ", ".join(f"{t} {p}" for t, p in sorted(ports.items()))
        lines.append(f"  {'siprec (SIP):':19} {settings.siprec.host} {listening}")
    if settings.twilio.enabled and settings.twilio.voice_path:
        lines.append(f"  {'twilio voice hook:':19} {base}{settings.twilio.voice_path}")
    lines += [
        f"  {'calls API:':19} {base}/v1/calls",
        f"  {'metrics:':19} {base}/metrics",
        f"  {'health:':19} {base}/healthz",
    ]
    print("\n".join(lines), flush=True)
    from gateway.observability.systemd import SystemdNotifier

    # Everything loaded so far (model, libraries) lives as long as the process: keep it out of
    # the garbage collector's scans, which otherwise pause the loop for milliseconds.
    gc.freeze()
    # Live calls allocate tens of thousands of short-lived objects a second, nearly all freed by
    # reference counting. At the default 700 a young collection ran dozens of times a second and
    # each cost about a millisecond however little it found: 7-12 % of the loop at 300 streams.
    # At 20,000 it runs every few seconds for a few milliseconds (bench/stereo_streams.py).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    notifier = SystemdNotifier()
    notifier.ready(f"serving on {host}:{bound}")
    notifier.start_watchdog()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:  # a second Ctrl-C: do not wait for calls to finish
            for live in app[REGISTRY].active():
                live.end_soon("shutdown", code=1001)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    demo_task: asyncio.Task[None] | None = None
    if demo is not None:
        from gateway.calls.live import LiveCall
        from gateway.outputs.console import ConsoleTranscript
        from gateway.simulate.twilio import new_call_sid

        registry = app[REGISTRY]
        registry.add_listener(ConsoleTranscript(sys.stdout))
        demo_sid = new_call_sid()

        async def demo_finished(live: LiveCall) -> None:
            if live.call.source_ids.get("callSid") == demo_sid:
                print(
                    f"callgate: demo call done: GET {base}/v1/calls/{demo_sid}/transcript; "
                    "the gateway keeps running for real calls (Ctrl-C stops)",
                    file=sys.stderr,
                    flush=True,
                )

        registry.on_finished(demo_finished)
        url = f"ws://127.0.0.1:{bound}{settings.twilio.path}"
        demo_task = asyncio.create_task(
            _play_demo(url, demo, demo_token or None, demo_speed, demo_params, demo_sid),
            name="demo",
        )
    try:
        await stop.wait()
        _say(
            "callgate: stopping: finishing active calls ...",
            "serve.draining",
            active_calls=app[REGISTRY].active_count,
        )
        notifier.stopping(f"draining {app[REGISTRY].active_count} calls")
        await drain(app)
    finally:
        if demo_task is not None:
            demo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await demo_task
        await runner.cleanup()
        await notifier.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def _say(text: str, event: str, **fields: object) -> None:
    """A progress line: plain text for a person at a terminal, a log record otherwise (stderr
    then carries JSON lines only, which journald and log shippers parse)."""
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)
    else:
        import structlog

        structlog.get_logger("gateway.serve").info(event, **fields)


async def _play_demo(
    url: str, wav: Path, token: str | None, speed: float, params: dict[str, str], call_sid: str
) -> None:
    from gateway.simulate.twilio import SimulationOptions, simulate_call

    result = await simulate_call(
        url,
        wav,
        SimulationOptions(speed=speed, custom_parameters=params, call_sid=call_sid),
        auth_token=token,
    )
    if not result.completed:
        print(
            f"callgate: demo stream did not complete: {result.close_code} {result.close_reason}",
            file=sys.stderr,
            flush=True,
        )
