"""Streaming Silero voice-activity detection (the ONNX model that faster-whisper ships).

:class:`SileroModel` holds the shared ONNX session (thread-safe ``run``); :class:`SileroStream`
holds one channel's recurrent state. Feed 16 kHz mono float32 audio in any chunk size and get one
speech probability per 32 ms window (512 samples). CPU work: call it from a worker thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

WINDOW = 512
"""Samples per VAD window at 16 kHz (32 ms)."""
SAMPLE_RATE = 16000
_CONTEXT = 64


def bundled_model_path() -> Path:
    """The Silero VAD ONNX file inside the installed faster-whisper package."""
    from faster_whisper.utils import get_assets_path

    return Path(get_assets_path()) / "silero_vad_v6.onnx"


class SileroModel:
    """The loaded VAD network; one per process, shared by all streams."""

    def __init__(self, path: Path | None = None) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        # One thread per call: many channels run in parallel, each call is tiny.
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(path or bundled_model_path()),
            providers=["CPUExecutionProvider"],
            sess_options=opts,
        )

    def run(
        self,
        rows: npt.NDArray[np.float32],
        h: npt.NDArray[np.float32],
        c: npt.NDArray[np.float32],
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        probs, h2, c2 = self._session.run(None, {"input": rows, "h": h, "c": c})
        return np.asarray(probs, np.float32).reshape(-1), h2, c2


class SileroStream:
    """One channel's VAD state: leftover samples, the 64-sample context and the LSTM state."""

    def __init__(self, model: SileroModel) -> None:
        self._model = model
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(_CONTEXT, np.float32)
        self._rest = np.zeros(0, np.float32)

    def feed(self, audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities for every complete window now available (the remainder is kept)."""
        buf = np.concatenate([self._rest, audio]) if self._rest.size else audio
        n = buf.size // WINDOW
        self._rest = buf[n * WINDOW :].copy()
        if n == 0:
            return np.zeros(0, np.float32)
        windows = buf[: n * WINDOW].reshape(n, WINDOW)
        contexts = np.empty((n, _CONTEXT), np.float32)
        contexts[0] = self._context
        if n > 1:
            contexts[1:] = windows[:-1, -_CONTEXT:]
        self._context = windows[-1, -_CONTEXT:].copy()
        rows = np.ascontiguousarray(np.concatenate([contexts, windows], axis=1), np.float32)
        probs, self._h, self._c = self._model.run(rows, self._h, self._c)
        return probs
