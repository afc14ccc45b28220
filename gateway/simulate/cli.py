"""``gateway simulate twilio|audiohook|stereo-ws CALL.wav --url ws://HOST/PATH``: play a call.

:func:`register` adds the command to the ``gateway`` parser, :func:`run` executes it. User errors
raise :class:`gateway.cli.UsageError` (one line, exit 2); the exit status is 0 when every call
completed and 1 when any was refused, failed to connect or was closed early by the server.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from gateway.ingress.twilio import DIALECTS, Dialect, Track
from gateway.media.codec import Codec
from gateway.simulate.twilio import (
    MAX_WAV_CHANNELS,
    TRACKS,
    SimulationOptions,
    SimulationResult,
    simulate_calls,
)

MAX_CALLS = 5000


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> None:
    """Add ``simulate`` (with its platform sub-command ``twilio``) to the subparsers ``sub``."""
    s = sub.add_parser(
        "simulate",
        parents=parents,
        help="play a recorded call into a gateway as a telephony platform would",
        description="Play a recorded call into a running gateway over its ingress protocol.",
    )
    platforms = s.add_subparsers(dest="platform", required=True, metavar="PLATFORM")
    t = platforms.add_parser(
        "twilio",
        parents=parents,
        help="Twilio Media Streams (or the Telnyx / SignalWire dialect) over a WebSocket",
        description="Send CALL.wav (channel 0 = inbound/customer, channel 1 = outbound/agent) "
        "as Twilio Media Streams: connected, start, 20 ms media frames per track, stop.",
    )
    t.add_argument("file", type=Path, metavar="CALL.wav")
    t.add_argument("--url", required=True, help="the stream endpoint, ws://HOST/PATH or wss://…")
    t.add_argument(
        "--auth-token",
        help="sign the upgrade with X-Twilio-Signature (default: $GATEWAY_<DIALECT>__AUTH_TOKEN, "
        "e.g. GATEWAY_TWILIO__AUTH_TOKEN, when set)",
    )
    t.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="1 = real time (default), 2 = twice as fast, 0 = as fast as possible",
    )
    t.add_argument(
        "--calls", type=int, default=1, metavar="N", help=f"concurrent calls, 1-{MAX_CALLS}"
    )
    t.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds between call starts (default 0)",
    )
    t.add_argument("--dialect", choices=DIALECTS, default="twilio", help="default: twilio")
    t.add_argument(
        "--codec", choices=[c.value for c in Codec], default="pcmu", help="default: pcmu"
    )
    t.add_argument(
        "--rate", type=int, default=8000, metavar="HZ", help="8000 (default); l16 may use others"
    )
    t.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a start.customParameters entry (repeatable)",
    )
    t.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="TRACK:START-END",
        help="do not send TRACK's frames between these seconds, e.g. inbound:3-4.5 (repeatable)",
    )
    t.add_argument(
        "--linger",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="after stop, wait this long for the server to close first, so its close reason is "
        "seen (default 1; 0 closes at once, as Twilio does)",
    )
    t.add_argument(
        "--redirect-at",
        type=float,
        metavar="SECONDS",
        help="end the stream there and continue the call on a new WebSocket (a TwiML redirect)",
    )

    a = platforms.add_parser(
        "audiohook",
        parents=parents,
        help="Genesys AudioHook Monitor (signed upgrade, open/opened, stereo PCMU frames)",
        description="Send CALL.wav (channel 0 = external/customer, channel 1 = internal/agent) "
        "as a Genesys AudioHook client: signed upgrade, open, binary frames, ping, close.",
    )
    a.add_argument("file", type=Path, metavar="CALL.wav")
    a.add_argument("--url", required=True, help="the AudioHook endpoint, ws://HOST/PATH or wss://…")
    a.add_argument(
        "--api-key",
        help="X-API-KEY (default: the key of $GATEWAY_AUDIOHOOK__API_KEYS' first entry)",
    )
    a.add_argument(
        "--client-secret",
        help="base64 client secret: sign the upgrade (default: from $GATEWAY_AUDIOHOOK__API_KEYS)",
    )
    a.add_argument("--format", choices=["PCMU", "L16"], default="PCMU", help="default: PCMU")
    a.add_argument("--frame-ms", type=int, default=100, help="audio per frame (default 100)")
    _common(a)
    a.add_argument(
        "--pause",
        action="append",
        default=[],
        metavar="START-END",
        help="pause (paused ... resumed) between these seconds (repeatable)",
    )
    a.add_argument(
        "--discard",
        action="append",
        default=[],
        metavar="START-END",
        help="send no audio between these seconds, then declare it discarded (repeatable)",
    )
    w = platforms.add_parser(
        "stereo-ws",
        parents=parents,
        help="stereo PCM WebSocket: FreeSWITCH mod_audio_fork / mod_audio_stream, jambonz listen",
        description="Send CALL.wav as jambonz listen does: subprotocol, a JSON metadata text "
        "frame, then interleaved 16-bit PCM (left = channel 0 = caller).",
    )
    w.add_argument("file", type=Path, metavar="CALL.wav")
    w.add_argument("--url", required=True, help="the stream endpoint, ws://HOST/PATH or wss://…")
    w.add_argument("--rate", type=int, default=8000, metavar="HZ", help="8000 (default) or 16000")
    w.add_argument("--frame-ms", type=int, default=20, help="audio per frame (default 20)")
    w.add_argument("--mix-type", choices=["stereo", "mono"], default="stereo")
    w.add_argument("--subprotocol", default="audio.jambonz.org", help="default: %(default)s")
    w.add_argument("--username", default="", help="basic auth user (jambonz wsAuth)")
    w.add_argument("--password", help="basic auth password (default: $GATEWAY_STEREO_WS__PASSWORD)")
    w.add_argument(
        "--secret", help="shared-secret header value (default: $GATEWAY_STEREO_WS__SHARED_SECRET)"
    )
    _common(w)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="1 = real time (default), 2 = twice as fast, 0 = as fast as possible",
    )
    p.add_argument(
        "--calls", type=int, default=1, metavar="N", help=f"concurrent calls, 1-{MAX_CALLS}"
    )
    p.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds between call starts (default 0)",
    )


def _params(items: list[str]) -> dict[str, str]:
    from gateway.cli import UsageError

    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param: expected KEY=VALUE, got {item!r}")
        params[key.strip()] = value
    return params


def _drops(items: list[str], tracks: int) -> tuple[tuple[Track, float, float], ...]:
    from gateway.cli import UsageError

    spans: list[tuple[Track, float, float]] = []
    for item in items:
        track, _, times = item.partition(":")
        start, dash, end = times.partition("-")
        try:
            a, b = float(start), float(end)
        except ValueError:
            a = b = math.nan
        if track not in TRACKS or not dash or not (math.isfinite(a) and math.isfinite(b)):
            raise UsageError(f"--drop: expected TRACK:START-END in seconds, got {item!r}")
        if not 0 <= a < b:
            raise UsageError(f"--drop {item}: need 0 <= START < END")
        if track == "outbound" and tracks < 2:
            raise UsageError(f"--drop {item}: the WAV is mono, it has no outbound track")
        spans.append((track, a * 1000, b * 1000))
    return tuple(spans)


def _options(
    args: argparse.Namespace, channels: int, duration_s: float | None
) -> SimulationOptions:
    from gateway.cli import UsageError

    if not math.isfinite(args.speed) or args.speed < 0:
        raise UsageError(f"--speed: expected a number >= 0, got {args.speed}")
    if not 1 <= args.calls <= MAX_CALLS:
        raise UsageError(f"--calls: expected 1-{MAX_CALLS}, got {args.calls}")
    if not math.isfinite(args.stagger) or args.stagger < 0:
        raise UsageError(f"--stagger: expected seconds >= 0, got {args.stagger}")
    if not math.isfinite(args.linger) or args.linger < 0:
        raise UsageError(f"--linger: expected seconds >= 0, got {args.linger}")
    redirect = args.redirect_at
    if redirect is not None and (
        not math.isfinite(redirect)
        or redirect <= 0
        or (duration_s is not None and redirect >= duration_s)
    ):
        length = f" of {duration_s:.2f} s" if duration_s is not None else ""
        raise UsageError(f"--redirect-at {redirect:g}: must fall inside the call{length}")
    try:
        return SimulationOptions(
            dialect=cast(Dialect, args.dialect),
            codec=Codec(args.codec),
            sample_rate=args.rate,
            custom_parameters=_params(args.param),
            speed=args.speed,
            drop=_drops(args.drop, channels),
            redirect_at_s=redirect,
            linger_s=args.linger,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def close_outcome(rejected_status: int | None, error: str | None, how: str, completed: bool) -> str:
    """How a simulated call ended, for its summary line (``how``: the close code and reason)."""
    if rejected_status is not None:
        return f"rejected (HTTP {rejected_status})"
    if error is not None:
        return f"failed ({error})"
    return f"{'completed' if completed else 'closed early'} ({how})"


class _Finished(Protocol):
    @property
    def completed(self) -> bool: ...


R = TypeVar("R", bound=_Finished)


def report(play: Coroutine[Any, Any, Sequence[R]], file: Path, describe: Callable[[R], str]) -> int:
    """Run the simulated calls and print one line each; 0 when every call completed, else 1.

    An audio file the simulator cannot read, or options that do not fit it, raise
    :class:`gateway.cli.UsageError`.
    """
    from gateway.cli import UsageError
    from gateway.ingress.file import FileSourceError

    try:
        results = asyncio.run(play)
    except FileSourceError as exc:
        raise UsageError(f"{file}: {exc}") from None
    except ValueError as exc:  # options that do not fit the audio (a redirect past its end)
        raise UsageError(str(exc)) from None
    for result in results:
        print(describe(result))
    sys.stdout.flush()
    return 0 if all(r.completed for r in results) else 1


def describe(result: SimulationResult) -> str:
    """One summary line for a finished call."""
    how = f"{result.close_code} {result.close_reason}".strip()
    outcome = close_outcome(result.rejected_status, result.error, how, result.completed)
    return (
        f"{result.call_sid} {outcome} streams={len(result.stream_sids)} "
        f"frames={result.frames_sent} audio={result.audio_ms / 1000:.2f}s "
        f"elapsed={result.elapsed_s:.2f}s"
    )


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, play the call(s), print one line per call on stdout.

    Returns 0 when every call completed, 1 otherwise. Raises :class:`gateway.cli.UsageError`
    for a bad argument or an unusable WAV file.
    """
    if args.platform == "audiohook":
        from gateway.simulate.stereo_commands import run_audiohook

        return run_audiohook(args)
    if args.platform == "stereo-ws":
        from gateway.simulate.stereo_commands import run_stereo_ws

        return run_stereo_ws(args)
    return _run_twilio(args)


def _run_twilio(args: argparse.Namespace) -> int:
    from gateway.cli import UsageError
    from gateway.ingress.file import FileSourceError, probe_wav

    url: str = args.url
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise UsageError(f"--url: expected a ws:// or wss:// URL, got {url!r}")
    try:
        fmt = probe_wav(args.file)
    except FileSourceError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    if fmt.channels > MAX_WAV_CHANNELS:
        raise UsageError(
            f"{args.file}: WAV has {fmt.channels} channels; a simulated call plays 1 (inbound) "
            "or 2 (inbound, outbound)"
        )
    duration = fmt.frames / fmt.sample_rate if fmt.frames is not None else None
    options = _options(args, fmt.channels, duration)
    token = args.auth_token
    if token is None:
        token = os.environ.get(f"GATEWAY_{options.dialect.upper()}__AUTH_TOKEN") or None
    play = simulate_calls(
        args.calls, url, args.file, options, auth_token=token, stagger_s=args.stagger
    )
    return report(play, args.file, describe)
