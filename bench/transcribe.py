"""Benchmark: offline transcription speed and accuracy with the embedded engine.

Reports, per corpus call, how many times faster than real time the whole call is transcribed
(two channels through the Call pipeline, model already loaded) on this machine, plus accuracy
(WER, missing turns, order problems, worst start-time error). Target: >= 8x on composed_library
on a 2-core machine.

    .venv/bin/python bench/transcribe.py [--repeat 3] [--beam-size 1] [--workers 1] [CALL ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.calls.call import Call, CallOptions  # noqa: E402
from gateway.config import LocalEngineSettings  # noqa: E402
from gateway.ingress.file import play_file, probe_wav  # noqa: E402
from gateway.observability.logging import configure_logging  # noqa: E402
from gateway.stt.local import LocalEngine  # noqa: E402
from gateway.transcript.scoring import load_reference, score  # noqa: E402

CALLS = ROOT / "tests" / "data" / "calls"
DEFAULT = ["composed_library", "phone_diane_sheila", "mfa_two_michaels"]


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    settings = LocalEngineSettings(
        beam_size=args.beam_size,
        workers=args.workers,
        vad_threshold=args.vad_threshold,
        min_speech_ms=args.min_speech_ms,
    )
    engine = LocalEngine(settings)
    t0 = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - t0
    results: list[dict[str, object]] = []
    try:
        for name in args.calls:
            path = Path(name) if name.endswith(".wav") else CALLS / f"{name}.wav"
            fmt = probe_wav(path)
            audio_s = (fmt.frames or 0) / fmt.sample_rate
            times: list[float] = []
            cpu: list[float] = []
            transcript = None
            for _ in range(args.repeat):
                call = Call(engine, CallOptions(partials=False), call_id=path.stem)
                c0 = time.process_time()
                w0 = time.perf_counter()
                await play_file(call, path)
                times.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
                transcript = call.transcript()
            assert transcript is not None
            best = min(times)
            row: dict[str, object] = {
                "call": path.stem,
                "audio_s": round(audio_s, 2),
                "channels": fmt.channels,
                "wall_s_median": round(statistics.median(times), 3),
                "wall_s_best": round(best, 3),
                "x_realtime_median": round(audio_s / statistics.median(times), 1),
                "x_realtime_best": round(audio_s / best, 1),
                "cpu_s_median": round(statistics.median(cpu), 3),
                "utterances": len(transcript.utterances),
            }
            ref_path = path.with_suffix("").with_suffix(".truth.json")
            reference = load_reference(ref_path) if ref_path.is_file() else None
            if reference:
                report = score(reference, transcript)
                row.update(
                    wer=round(report.wer, 4),
                    missing_turns=len(report.missing),
                    order_problems=len(report.order_problems),
                    worst_start_error_ms=report.worst_timing_error_ms,
                )
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        await engine.close()
    print(
        json.dumps(
            {
                "model_load_s": round(load_s, 2),
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "beam_size": args.beam_size,
                "workers": settings.worker_count,
                "vad_threshold": args.vad_threshold,
                "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", nargs="*", default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=3)
    defaults = LocalEngineSettings()
    parser.add_argument("--beam-size", type=int, default=defaults.beam_size)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="0 = one per core")
    parser.add_argument("--vad-threshold", type=float, default=defaults.vad_threshold)
    parser.add_argument("--min-speech-ms", type=int, default=defaults.min_speech_ms)
    args = parser.parse_args()
    configure_logging("warning")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
