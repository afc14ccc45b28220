"""Benchmark: N concurrent stereo streams through one live gateway process, at real time.

The same harness as bench/twilio_calls.py (whose helpers it imports), for the stereo ingresses:

* the gateway: ``gateway serve`` -- the process measured -- with the AssemblyAI engine pointed at
* a peer: ``gateway stt-server --engine scripted`` (a two-word turn every 3 s, so finals flow);
* the callers: this file's ``_simulate`` role playing a real two-party call
  (``samples/diane_sheila.wav``, looped to length) at real time over ``--ingress``:
  ``stereo-ws`` (jambonz ``listen`` shape: metadata text frame, then 20 ms interleaved L16
  frames) or ``audiohook`` (signed Genesys AudioHook: open/opened, 100 ms interleaved PCMU
  frames, pings, close/closed). Starts are spread over ``--ramp`` s (default max(5, N/25)).

The gateway is pinned to one core (``--gateway-core``, default 0), everything else to the
others. After one warm-up call the baseline is taken; then the N calls start, and the window
(``--seconds``) opens ``--settle`` s after the last start. Over the window: the gateway's CPU
(utime + stime / wall, from /proc), memory (VmRSS median - baseline, per call), the frames it
handled per call-second (``callgate_media_frames_total``), the delay from a chunk's last frame
to the STT socket (``callgate_stt_send_delay_seconds``), stream errors and rejections.

    .venv/bin/python bench/stereo_streams.py [--ingress stereo-ws|audiohook]
        [--calls 50,100,300] [--seconds 30] [--json FILE]

Target (issue 8): 300 concurrent stereo streams on one core at real time; report CPU and
memory per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import twilio_calls as tc  # noqa: E402 - the shared harness (bench/ is not a package)

AUDIOHOOK_KEY = "bench-audiohook-key"
AUDIOHOOK_SECRET = "YmVuY2gtYXVkaW9ob29rLWNsaWVudC1zZWNyZXQ="
STEREO_SECRET = "bench-stereo-secret"
FRAMES_PER_CALL_S = {"stereo-ws": 50, "audiohook": 10}  # one frame carries both channels
PATHS = {"stereo-ws": "/stereo/ws", "audiohook": "/audiohook/ws"}


# -- the callers (a child process) ---------------------------------------------------------------


async def _simulate(args: argparse.Namespace) -> None:
    """Warm up with one short call, wait for "go" on stdin, play the N calls."""
    from gateway.simulate.audiohook import (
        AudioHookOptions,
        prepare_audiohook_audio,
        simulate_audiohook_calls,
    )
    from gateway.simulate.stereo_ws import (
        StereoWsOptions,
        prepare_stereo_audio,
        simulate_stereo_ws_calls,
    )
    from gateway.simulate.twilio import load_call_audio

    audio = await load_call_audio(Path(args.audio))
    results: list[Any]
    if args.ingress == "audiohook":
        ah = AudioHookOptions(speed=1.0, api_key=AUDIOHOOK_KEY, client_secret=AUDIOHOOK_SECRET)
        wire_ah = await prepare_audiohook_audio(tc._looped(audio, args.audio_seconds), ah)
        warm_ah = await prepare_audiohook_audio(tc._looped(audio, 3.0), ah)
        (res,) = await simulate_audiohook_calls(1, args.url, warm_ah, ah)
    else:
        sw = StereoWsOptions(speed=1.0, secret=STEREO_SECRET)
        wire_sw = await prepare_stereo_audio(tc._looped(audio, args.audio_seconds), sw)
        warm_sw = await prepare_stereo_audio(tc._looped(audio, 3.0), sw)
        (res,) = await simulate_stereo_ws_calls(1, args.url, warm_sw, sw)
    print(json.dumps({"warm": res.completed, "close_code": res.close_code}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)

    loop = asyncio.get_running_loop()
    lags: list[float] = []
    running = True

    async def monitor() -> None:
        while running:
            due = loop.time() + 0.05
            await asyncio.sleep(0.05)
            lags.append(loop.time() - due)

    watcher = asyncio.create_task(monitor())
    t0 = time.monotonic()
    stagger = args.ramp / args.calls
    if args.ingress == "audiohook":
        results = await simulate_audiohook_calls(
            args.calls, args.url, wire_ah, ah, stagger_s=stagger
        )
    else:
        results = await simulate_stereo_ws_calls(
            args.calls, args.url, wire_sw, sw, stagger_s=stagger
        )
    running = False
    await watcher
    behind = [r.elapsed_s - r.audio_ms / 1000 for r in results]
    lags.sort()
    print(
        json.dumps(
            {
                "calls": len(results),
                "completed": sum(r.completed for r in results),
                "close_codes": dict(Counter(str(r.close_code) for r in results)),
                "errors": dict(Counter(r.error for r in results if r.error)),
                "rejected": dict(
                    Counter(str(r.rejected_status) for r in results if r.rejected_status)
                ),
                "audio_s": round(max(r.audio_ms for r in results) / 1000, 2),
                "overrun_s_median": round(statistics.median(behind), 3),
                "overrun_s_max": round(max(behind), 3),
                "loop_lag_ms_p99": round(1000 * lags[int(0.99 * (len(lags) - 1))], 1)
                if lags
                else None,
                "wall_s": round(time.monotonic() - t0, 1),
            }
        ),
        flush=True,
    )


# -- one run -------------------------------------------------------------------------------------


def run_one(
    n: int, args: argparse.Namespace, gw_cores: set[int], load_cores: set[int]
) -> dict[str, Any]:
    ramp_s = args.ramp if args.ramp is not None else max(5.0, n / 25)
    audio_s = ramp_s + args.settle + args.seconds + args.tail
    script_turns = tc.stt_script(audio_s)
    children: list[tc.Child] = []
    with tempfile.TemporaryDirectory(prefix="callgate-bench-") as tmp:
        script_path = Path(tmp) / "script.json"
        script_path.write_text(json.dumps(script_turns))
        try:
            with (
                open(Path(tmp) / "gw.log", "wb") as gw_log,
                open(Path(tmp) / "peer.log", "wb") as peer_log,
            ):
                quiet = {"GATEWAY_LOGGING__LEVEL": "warning", "GATEWAY_LOGGING__FORMAT": "json"}
                peer = tc.Child(
                    "stt-server",
                    [sys.executable, "-m", "gateway", "stt-server", "--engine", "scripted"]
                    + ["--script", str(script_path), "--host", "127.0.0.1", "--port", "0"],
                    cores=load_cores,
                    env=tc.clean_env(quiet),
                    stderr=peer_log,
                )
                children.append(peer)
                stt_url = peer.readline(60, "listening line").strip().rsplit(" ", 1)[-1]
                gw_env = tc.clean_env(
                    {
                        **quiet,
                        "GATEWAY_STT__ENGINE": "assemblyai",
                        "GATEWAY_STT__ASSEMBLYAI__URL": stt_url,
                        "GATEWAY_SERVER__MAX_CALLS": str(n + 10),
                        "GATEWAY_SERVER__DATA_DIR": str(Path(tmp) / "data"),
                        "GATEWAY_AUDIOHOOK__API_KEYS": json.dumps(
                            [f"{AUDIOHOOK_KEY}:{AUDIOHOOK_SECRET}"]
                        ),
                        "GATEWAY_AUDIOHOOK__RECONNECT_GRACE_S": "0",
                        "GATEWAY_STEREO_WS__SHARED_SECRET": STEREO_SECRET,
                    }
                )
                profile = args.profile / f"gateway-{n}.prof" if args.profile else None
                cmd = [*tc.gateway_command(False, profile), "serve", "--host", "127.0.0.1"]
                gw = tc.Child(
                    "gateway", [*cmd, "--port", "0"], cores=gw_cores, env=gw_env, stderr=gw_log
                )
                children.append(gw)
                while "serving on" not in (line := gw.readline(120, "serving banner")):
                    pass
                port = int(line.rsplit(":", 1)[1])
                base = f"http://127.0.0.1:{port}"
                tc.pin(gw.proc.pid, gw_cores)
                sim = tc.Child(
                    "simulator",
                    [sys.executable, __file__, "_simulate", "--ingress", args.ingress]
                    + ["--url", f"ws://127.0.0.1:{port}{PATHS[args.ingress]}"]
                    + ["--calls", str(n), "--audio", str(args.audio)]
                    + ["--audio-seconds", str(audio_s), "--ramp", str(ramp_s)],
                    cores=load_cores,
                    env=tc.clean_env({}),
                    stderr=None,
                    stdin=True,
                )
                children.append(sim)
                measured = tc.measure_window(
                    gw,
                    peer,
                    sim,
                    base,
                    gw_cores,
                    ramp_s=ramp_s,
                    settle=args.settle,
                    seconds=args.seconds,
                    audio_s=audio_s,
                )
        finally:
            for child in reversed(children):
                child.stop(timeout=10)

    baseline, final, base_proc = measured.baseline, measured.final, measured.base_proc
    hwm, sim_result = measured.hwm_kib, measured.sim_result
    f = tc.window_figures(measured, gw_cores)
    wall, gw_cpu, load_cpu, steady_rss = f.wall, f.gw_cpu, f.load_cpu, f.steady_rss
    core_other, m0, m1 = f.core_other, f.m0, f.m1
    delay = tc.histogram_delta(m0, m1, "callgate_stt_send_delay_seconds") if m0 and m1 else []
    frames = (
        m1.value("callgate_media_frames_total") - m0.value("callgate_media_frames_total")
        if m0 and m1
        else 0.0
    )
    source = "audiohook" if args.ingress == "audiohook" else "stereo_ws"

    def labelled(name: str, key: str) -> dict[str, int]:
        return tc.labelled_delta(baseline, final, name, key)

    per_session_turns = sum(1 for t in script_turns if t[-1][2] <= sim_result["audio_s"] * 1000)
    return {
        "ingress": args.ingress,
        "calls": n,
        "window_s": round(wall, 1),
        "metrics_answered_in_window": m0 is not None,
        "active_at_window_start": int(m0.value("callgate_calls_active")) if m0 else None,
        "active_at_window_end": int(m1.value("callgate_calls_active")) if m1 else None,
        "gateway_cpu_percent_of_core": round(100 * gw_cpu, 1),
        "cpu_percent_of_core_per_call": round(100 * gw_cpu / n, 3),
        "cpu_ms_per_call_second": round(1000 * gw_cpu / n, 3),
        "load_cores_cpu_percent": round(100 * load_cpu, 1),
        "other_cpu_on_gateway_core_percent": round(100 * core_other, 1),
        "rss_baseline_mib": round(base_proc.rss_kib / 1024, 1),
        "rss_steady_mib": round(steady_rss / 1024, 1),
        "rss_peak_mib": round(hwm / 1024, 1),
        "memory_per_call_kib": round((steady_rss - base_proc.rss_kib) / n, 1),
        "frames_per_call_s": round(frames / (m1.at - m0.at) / n, 2) if m0 and m1 else 0.0,
        "frames_per_call_s_expected": FRAMES_PER_CALL_S[args.ingress],
        "send_delay_ms_p50": tc.ms(tc.quantile(delay, 0.5)),
        "send_delay_ms_p99": tc.ms(tc.quantile(delay, 0.99)),
        "metrics_response_ms_max": round(
            1000 * max((sc.took for sc in measured.scrapes), default=0), 1
        ),
        "simulator": sim_result,
        "calls_finished": labelled("callgate_calls_ended_total", "outcome"),
        "finals": int(
            final.value("callgate_turn_finals_total") - baseline.value("callgate_turn_finals_total")
        ),
        "finals_expected": n * 2 * per_session_turns,
        "stream_errors": labelled("callgate_stream_errors_total", "reason"),
        "streams_rejected": labelled("callgate_streams_rejected_total", "reason"),
        "source": source,
        "loadavg_at_end": tc.loadavg(),
    }


def verdict(r: dict[str, Any]) -> list[str]:
    """Why this run fell behind real time or lost something (empty: it kept up)."""
    problems = []
    if r["frames_per_call_s"] < 0.97 * r["frames_per_call_s_expected"]:
        problems.append(f"gateway got {r['frames_per_call_s']} frames/call/s (not real time)")
    if not r["metrics_answered_in_window"]:
        problems.append(
            f"no /metrics answer within the window (up to {r['metrics_response_ms_max']} ms late)"
        )
    elif min(r["active_at_window_start"], r["active_at_window_end"]) < r["calls"]:
        problems.append("not all calls active in the window")
    if r["gateway_cpu_percent_of_core"] > 90:
        problems.append("gateway core saturated")
    sim = r["simulator"]
    if sim["completed"] < r["calls"]:
        problems.append(f"{r['calls'] - sim['completed']} calls did not complete")
    if sim["overrun_s_max"] > 2.0:
        problems.append(f"callers ran {sim['overrun_s_max']} s over the audio's duration")
    for key in ("stream_errors", "streams_rejected"):
        if r[key]:
            problems.append(f"{key}: {r[key]}")
    if r["other_cpu_on_gateway_core_percent"] > 5:
        problems.append(
            f"DISTURBED: other work took {r['other_cpu_on_gateway_core_percent']}% of the core"
        )
    return problems


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'ingress':>9} {'calls':>5} {'gw CPU':>7} {'CPU/call':>9} {'ms/call-s':>9} "
        f"{'KiB/call':>8} {'peak MiB':>8} {'p99 ms':>7} {'fr/c/s':>6} {'done':>9} {'finals':>13}"
        "  verdict"
    )
    lines = [head]
    for r in results:
        sim = r["simulator"]
        p99 = r["send_delay_ms_p99"]
        lines.append(
            f"{r['ingress']:>9} {r['calls']:>5} {r['gateway_cpu_percent_of_core']:>6.1f}% "
            f"{r['cpu_percent_of_core_per_call']:>8.3f}% {r['cpu_ms_per_call_second']:>9.2f} "
            f"{r['memory_per_call_kib']:>8.0f} {r['rss_peak_mib']:>8.0f} "
            f"{'-' if p99 is None else f'{p99:.1f}':>7} {r['frames_per_call_s']:>6.1f} "
            f"{sim['completed']:>4}/{r['calls']:<4} {r['finals']:>6}/{r['finals_expected']:<6}  "
            + ("real time" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"]))
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_simulate":
        p = argparse.ArgumentParser()
        p.add_argument("_role")
        p.add_argument("--ingress", required=True)
        p.add_argument("--url", required=True)
        p.add_argument("--calls", type=int, required=True)
        p.add_argument("--audio", required=True)
        p.add_argument("--audio-seconds", type=float, required=True)
        p.add_argument("--ramp", type=float, required=True)
        from gateway.observability.logging import configure_logging

        configure_logging("warning")
        asyncio.run(_simulate(p.parse_args()))
        return 0

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ingress", choices=sorted(PATHS), default="stereo-ws")
    parser.add_argument("--calls", default="50,100,300", help="comma-separated N")
    parser.add_argument("--seconds", type=float, default=30, help="steady-state window (s)")
    parser.add_argument("--ramp", type=float, help="starts spread over this (default max(5, N/25))")
    parser.add_argument("--settle", type=float, default=3)
    parser.add_argument("--tail", type=float, default=8)
    parser.add_argument("--audio", type=Path, default=ROOT / "samples" / "diane_sheila.wav")
    parser.add_argument("--gateway-core", type=int, default=0)
    tc.add_profile_option(parser)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    counts = [int(c) for c in args.calls.split(",") if c.strip()]
    available = os.sched_getaffinity(0)
    gw_cores = {args.gateway_core}
    load_cores = (available - gw_cores) or available
    tc.raise_nofile()
    os.sched_setaffinity(0, load_cores)
    results = []
    for n in counts:
        print(
            f"{args.ingress} N={n}: loadavg before {tc.loadavg()} ...", file=sys.stderr, flush=True
        )
        try:
            r = run_one(n, args, gw_cores, load_cores)
        except (RuntimeError, OSError) as exc:
            print(f"  N={n} failed: {exc}", file=sys.stderr, flush=True)
            results.append({"ingress": args.ingress, "calls": n, "failed": str(exc)})
            continue
        r["problems"] = verdict(r)
        results.append(r)
        print(
            f"  gateway {r['gateway_cpu_percent_of_core']}% of a core, "
            f"{r['memory_per_call_kib']} KiB/call, {r['frames_per_call_s']} frames/call/s"
            + (f"; PROBLEMS: {'; '.join(r['problems'])}" if r["problems"] else ""),
            file=sys.stderr,
            flush=True,
        )
    report = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    else:
        print(json.dumps(report, indent=2))
    print(table([r for r in results if "failed" not in r]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
