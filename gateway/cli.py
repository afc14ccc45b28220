"""Command line: ``gateway transcribe`` and ``gateway check-config``.

Every user error (bad file, bad config, bad option) prints one line on stderr and exits with
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Callgate: live call audio to speaker-ordered call transcripts.",
    )
    parser.add_argument("--version", action="version", version=f"callgate {__version__}")
    parser.add_argument(
        "--config", metavar="PATH", help="TOML config file (default: $GATEWAY_CONFIG, or none)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "transcribe",
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
    t.add_argument("-v", "--verbose", action="store_true", help="log pipeline events to stderr")

    sub.add_parser("check-config", help="validate the configuration and print it as JSON")
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
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
    from gateway.stt.local import LocalEngine
    from gateway.transcript.render import render

    engine = LocalEngine(settings.stt.local)
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
    return render(call.transcript(), fmt)
