"""``gateway simulate audiohook`` and ``simulate stereo-ws``: the command bodies (stereo ingresses).

Arguments are registered in :mod:`gateway.simulate.cli`. User errors raise
:class:`gateway.cli.UsageError`; the exit status is 0 when every call completed, 1 otherwise.
Secrets default to the gateway's own environment variables, so a simulator run next to a
gateway needs no flags: ``GATEWAY_AUDIOHOOK__API_KEYS`` (first entry, ``KEY:SECRET``),
``GATEWAY_STEREO_WS__SHARED_SECRET`` / ``GATEWAY_STEREO_WS__PASSWORD``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from urllib.parse import urlsplit

from gateway.simulate.audiohook import AudioHookOptions, AudioHookResult, simulate_audiohook_calls
from gateway.simulate.cli import close_outcome, report
from gateway.simulate.stereo_ws import StereoWsOptions, StereoWsResult, simulate_stereo_ws_calls

MAX_CALLS = 5000


def _check_common(args: argparse.Namespace) -> None:
    from gateway.cli import UsageError
    from gateway.ingress.file import FileSourceError, probe_wav

    parts = urlsplit(args.url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise UsageError(f"--url: expected a ws:// or wss:// URL, got {args.url!r}")
    if not math.isfinite(args.speed) or args.speed < 0:
        raise UsageError(f"--speed: expected a number >= 0, got {args.speed}")
    if not 1 <= args.calls <= MAX_CALLS:
        raise UsageError(f"--calls: expected 1-{MAX_CALLS}, got {args.calls}")
    if not math.isfinite(args.stagger) or args.stagger < 0:
        raise UsageError(f"--stagger: expected seconds >= 0, got {args.stagger}")
    try:
        fmt = probe_wav(args.file)
    except FileSourceError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    if fmt.channels > 2:
        raise UsageError(f"{args.file}: WAV has {fmt.channels} channels; 1 or 2 are played")


def _spans(items: list[str], flag: str) -> tuple[tuple[float, float], ...]:
    from gateway.cli import UsageError

    out = []
    for item in items:
        a, dash, b = item.partition("-")
        try:
            start, end = float(a), float(b)
        except ValueError:
            start = end = math.nan
        if not dash or not (math.isfinite(start) and math.isfinite(end)) or not 0 <= start < end:
            raise UsageError(f"{flag}: expected START-END seconds with START < END, got {item!r}")
        out.append((start, end))
    return tuple(out)


def _audiohook_key(args: argparse.Namespace) -> tuple[str, str]:
    key, secret = args.api_key, args.client_secret
    raw = os.environ.get("GATEWAY_AUDIOHOOK__API_KEYS")
    if raw and (key is None or secret is None):
        try:
            entries = json.loads(raw)
        except json.JSONDecodeError:
            entries = []
        if entries and isinstance(entries[0], str):
            env_key, sep, env_secret = entries[0].rpartition(":")
            if not sep:
                env_key, env_secret = entries[0], ""
            key = env_key if key is None else key
            secret = env_secret if secret is None else secret
    return key or "", secret or ""


def describe_audiohook(r: AudioHookResult) -> str:
    """One summary line for a finished AudioHook session."""
    if r.disconnect is not None and r.rejected_status is None and r.error is None:
        outcome = f"disconnected ({r.disconnect}: {r.disconnect_info or ''})"
    else:
        outcome = close_outcome(r.rejected_status, r.error, str(r.close_code), r.completed)
    return (
        f"{r.session_id} {outcome} frames={r.frames_sent} audio={r.audio_ms / 1000:.2f}s "
        f"elapsed={r.elapsed_s:.2f}s transcripts={len(r.transcripts)}"
    )


def describe_stereo(r: StereoWsResult) -> str:
    """One summary line for a finished stereo stream."""
    how = f"{r.close_code} {r.close_reason}".strip()
    outcome = close_outcome(r.rejected_status, r.error, how, r.completed)
    return (
        f"{r.call_sid} {outcome} subprotocol={r.subprotocol} frames={r.frames_sent} "
        f"audio={r.audio_ms / 1000:.2f}s elapsed={r.elapsed_s:.2f}s"
    )


def run_audiohook(args: argparse.Namespace) -> int:
    from gateway.cli import UsageError

    _check_common(args)
    key, secret = _audiohook_key(args)
    try:
        options = AudioHookOptions(
            format=args.format,
            frame_ms=args.frame_ms,
            speed=args.speed,
            api_key=key,
            client_secret=secret,
            pauses=_spans(args.pause, "--pause"),
            discards=_spans(args.discard, "--discard"),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    play = simulate_audiohook_calls(
        args.calls, args.url, args.file, options, stagger_s=args.stagger
    )
    return report(play, args.file, describe_audiohook)


def run_stereo_ws(args: argparse.Namespace) -> int:
    from gateway.cli import UsageError

    _check_common(args)
    password = args.password
    if password is None:
        password = os.environ.get("GATEWAY_STEREO_WS__PASSWORD", "")
    secret = args.secret
    if secret is None:
        secret = os.environ.get("GATEWAY_STEREO_WS__SHARED_SECRET", "")
    try:
        options = StereoWsOptions(
            sample_rate=args.rate,
            frame_ms=args.frame_ms,
            mix_type=args.mix_type,
            speed=args.speed,
            subprotocol=args.subprotocol,
            username=args.username,
            password=password,
            secret=secret,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    play = simulate_stereo_ws_calls(
        args.calls, args.url, args.file, options, stagger_s=args.stagger
    )
    return report(play, args.file, describe_stereo)
