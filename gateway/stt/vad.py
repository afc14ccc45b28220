"""Streaming voice-activity detection: Silero (neural) and WebRTC (telephony GMM), combined.

:class:`SileroModel` holds the ONNX network that faster-whisper ships (one per process; its
``run`` is thread-safe). :class:`VoiceActivityStream` holds one channel's state and turns 16 kHz
mono float32 audio, fed in any chunk size, into one speech probability per 32 ms window (512
samples): the larger of Silero's probability and the share of the window's 10 ms frames that the
WebRTC detector calls speech.

Why both: Silero is robust to noise but scores some narrowband telephone voices (a cold, a quiet
headset, 8 kHz audio upsampled) far below its threshold, so whole turns would be lost. The WebRTC
detector was built for 8 kHz telephony and catches those; noise it lets through costs only a
recognizer call that returns no words. ``webrtc_mode`` (0-3, higher = stricter) or ``None`` to use
Silero alone. CPU work: call :meth:`VoiceActivityStream.feed` from a worker thread.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import numpy.typing as npt
import webrtcvad

WINDOW = 512
"""Samples per VAD window at 16 kHz (32 ms)."""
SAMPLE_RATE = 16000
_CONTEXT = 64
_FRAME = 160  # 10 ms WebRTC frame at 16 kHz


def bundled_model_path() -> Path:
    """The Silero VAD ONNX file inside the installed faster-whisper package."""
    from faster_whisper.utils import get_assets_path

    return Path(get_assets_path()) / "silero_vad_v6.onnx"


class SileroModel:
    """The loaded Silero network; one per process, shared by all streams."""

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
        """Rows are consecutive windows ([64 context | 512 samples]); h/c carry the LSTM state."""
        probs, h2, c2 = self._session.run(None, {"input": rows, "h": h, "c": c})
        return np.asarray(probs, np.float32).reshape(-1), h2, c2


class _SileroStream:
    def __init__(self, model: SileroModel) -> None:
        self._model = model
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(_CONTEXT, np.float32)
        self._rest = np.zeros(0, np.float32)

    def feed(self, audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
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


class _WebRtcStream:
    def __init__(self, mode: int) -> None:
        self._vad = webrtcvad.Vad(mode)
        self._rest = b""
        self.flags: list[bool] = []

    def feed(self, audio: npt.NDArray[np.float32]) -> None:
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        buf = self._rest + pcm
        step = _FRAME * 2
        n = len(buf) // step
        for i in range(n):
            self.flags.append(self._vad.is_speech(buf[i * step : (i + 1) * step], SAMPLE_RATE))
        self._rest = buf[n * step :]


class VoiceActivityStream:
    """One channel's detector state (see module docstring)."""

    def __init__(self, model: SileroModel, *, webrtc_mode: int | None = 2) -> None:
        self._silero = _SileroStream(model)
        self._webrtc = _WebRtcStream(webrtc_mode) if webrtc_mode is not None else None
        self._pending: deque[float] = deque()
        self._window = 0  # index of the next window to emit
        self._flag_base = 0  # frame index of self._webrtc.flags[0]

    def feed(self, audio: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities for every window now decided (the remainder is kept)."""
        self._pending.extend(self._silero.feed(audio).tolist())
        webrtc = self._webrtc
        if webrtc is None:
            out = list(self._pending)
            self._pending.clear()
            self._window += len(out)
            return np.asarray(out, np.float32)
        webrtc.feed(audio)
        out = []
        available = self._flag_base + len(webrtc.flags)
        while self._pending:
            i = self._window
            k0 = -(-WINDOW * i // _FRAME)
            k1 = -(-WINDOW * (i + 1) // _FRAME)
            if k1 > available:
                break  # the WebRTC frames of this window are not all in yet (<= 10 ms)
            frames = webrtc.flags[k0 - self._flag_base : k1 - self._flag_base]
            share = sum(frames) / len(frames) if frames else 0.0
            out.append(max(self._pending.popleft(), share))
            self._window += 1
        drop = -(-WINDOW * self._window // _FRAME) - self._flag_base
        if drop > 0:
            del webrtc.flags[:drop]
            self._flag_base += drop
        return np.asarray(out, np.float32)
