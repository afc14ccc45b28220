"""Engine choice: build the configured :class:`~gateway.stt.session.SttEngine`."""

from __future__ import annotations

from gateway.config import Settings
from gateway.stt.session import SttEngine


def make_engine(settings: Settings, name: str | None = None) -> SttEngine:
    """The engine named ``name`` (default: ``stt.engine``), configured from ``settings``."""
    choice = name or settings.stt.engine
    if choice == "local":
        from gateway.stt.local import LocalEngine

        return LocalEngine(settings.stt.local)
    if choice == "assemblyai":
        from gateway.stt.assemblyai import AssemblyAIEngine

        return AssemblyAIEngine(settings.stt.assemblyai)
    raise ValueError(f"unknown STT engine {choice!r} (use local or assemblyai)")
