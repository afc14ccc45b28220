"""Benchmark: how much a transcript depends on where one channel's audio starts.

SIPREC streams carry unrelated RTP timestamps, so the gateway places each stream by the arrival
of its first packet (reference notes 5.5): the second stream of a call lands a few samples to a
few packets later from one run to the next. The embedded engine's VAD frames and Whisper's input
shift with it, and tiny.en's words on a hard turn can change. This replays each corpus call
through the Call pipeline with one channel delayed by each of ``--offsets-ms`` (silence before
it, as the arrival anchor would put there) and reports WER and the reference turns not found,
per offset, then per call how many offsets lost each turn.

Turns lost at some offsets and not others are the ones a live SIPREC test can lose by chance;
tests/test_transcribe_corpus.py lists them in ``ALIGNMENT_SENSITIVE`` with this figure.

    .venv/bin/python bench/alignment.py [--channel 1] [--offsets-ms 0 3 7 ...] [CALL ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import wave
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.calls.call import Call, CallOptions  # noqa: E402
from gateway.config import LocalEngineSettings  # noqa: E402
from gateway.ingress.file import play_file  # noqa: E402
from gateway.media.codec import Codec, decode, encode  # noqa: E402
from gateway.observability.logging import configure_logging  # noqa: E402
from gateway.stt.local import LocalEngine  # noqa: E402
from gateway.transcript.scoring import load_reference, score  # noqa: E402

CALLS = ROOT / "tests" / "data" / "calls"
DEFAULT = ["mfa_two_michaels", "phone_diane_sheila", "composed_library"]
OFFSETS = [0, 1, 3, 5, 7, 9, 11, 13, 16, 18, 20, 22, 25, 27, 31, 35, 40, 44, 50, 55, 58, 64]


def shifted_call(src: Path, dst: Path, channel: int, offset_ms: int) -> None:
    """``src`` (stereo 8 kHz L16) through PCMU, as SIPREC carries it, with ``channel`` delayed
    by ``offset_ms`` of silence and the other channel padded at the end to the same length."""
    with wave.open(str(src)) as w:
        pcm = decode(Codec.PCMU, encode(Codec.PCMU, w.readframes(w.getnframes())))
        rate = w.getframerate()
    frames = np.frombuffer(pcm, "<i2").reshape(-1, 2)
    pad = np.zeros((rate * offset_ms // 1000,), "<i2")
    cols = [frames[:, 0], frames[:, 1]]
    cols[channel] = np.concatenate([pad, cols[channel]])
    cols[1 - channel] = np.concatenate([cols[1 - channel], pad])
    with wave.open(str(dst), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.stack(cols, 1).astype("<i2").tobytes())


async def run(args: argparse.Namespace) -> None:
    engine = LocalEngine(LocalEngineSettings())
    await engine.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.calls:
                src = CALLS / f"{name}.wav"
                reference = load_reference(CALLS / f"{name}.truth.json") or []
                lost: Counter[int] = Counter()
                wers: list[float] = []
                for offset in args.offsets_ms:
                    path = Path(tmp) / f"{name}_{offset}.wav"
                    await asyncio.to_thread(shifted_call, src, path, args.channel, offset)
                    call = Call(engine, CallOptions(partials=False), call_id=f"{name}-{offset}")
                    await play_file(call, path)
                    moved = [
                        replace(t, start_ms=t.start_ms + offset, end_ms=t.end_ms + offset)
                        if t.channel == args.channel
                        else t
                        for t in reference
                    ]
                    report = score(moved, call.transcript())
                    # Name lost turns by their reference start, unshifted.
                    missing = sorted(
                        t.start_ms - (offset if t.channel == args.channel else 0)
                        for t in report.missing
                    )
                    lost.update(missing)
                    wers.append(report.wer)
                    row = {"call": name, "offset_ms": offset, "wer": round(report.wer, 4)}
                    print(json.dumps({**row, "missing_turns_ms": missing}), flush=True)
                summary = {
                    "call": name,
                    "channel": args.channel,
                    "offsets": len(args.offsets_ms),
                    "wer_min": round(min(wers), 4),
                    "wer_max": round(max(wers), 4),
                    "turns_lost": {str(ms): n for ms, n in sorted(lost.items())},
                }
                print(json.dumps(summary), flush=True)
    finally:
        await engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", nargs="*", default=DEFAULT)
    parser.add_argument("--channel", type=int, choices=(0, 1), default=1)
    parser.add_argument("--offsets-ms", type=int, nargs="+", default=OFFSETS)
    args = parser.parse_args()
    configure_logging("warning")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
