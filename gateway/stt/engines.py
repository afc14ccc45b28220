"""Engine choice: build the configured :class:`~gateway.stt.session.SttEngine`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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


class EngineSet:
    """The engines a server uses: the configured default, started up front, and any other
    engine a call asks for, started on first use. :meth:`close` closes every started one."""

    NAMES = ("local", "assemblyai")

    def __init__(self, settings: Settings, *, preset: dict[str, SttEngine] | None = None) -> None:
        """``preset`` supplies ready-made engines by name (tests, benchmarks): started on first
        use like the others, but closed by whoever made them, not by :meth:`close`."""
        self._settings = settings
        self._engines: dict[str, SttEngine] = {}
        self._preset = dict(preset or {})
        self._started_hooks: list[Callable[[SttEngine], None]] = []
        self._lock = asyncio.Lock()
        self.default = settings.stt.engine

    def on_started(self, hook: Callable[[SttEngine], None]) -> None:
        """``hook(engine)`` runs once for each engine as it starts (instrumentation)."""
        self._started_hooks.append(hook)

    def started(self, name: str) -> bool:
        """Whether engine ``name`` is loaded and running."""
        return name in self._engines

    def started_engines(self) -> list[SttEngine]:
        """The engines loaded so far (for metrics)."""
        return list(self._engines.values())

    def available(self, name: str) -> bool:
        """Whether ``name`` can run here: local always; assemblyai with a key or a URL."""
        if name == "local":
            return True
        if name == "assemblyai":
            aai = self._settings.stt.assemblyai
            return bool(aai.url or aai.api_key.get_secret_value() or aai.token.get_secret_value())
        return False

    async def get(self, name: str | None = None) -> SttEngine:
        """The started engine ``name`` (default: the configured one). Raises ValueError."""
        choice = name or self.default
        engine = self._engines.get(choice)
        if engine is not None:
            return engine
        if choice not in self._preset and not self.available(choice):
            raise ValueError(f"STT engine {choice!r} is not available on this gateway")
        async with self._lock:
            engine = self._engines.get(choice)
            if engine is None:
                engine = self._preset.get(choice) or make_engine(self._settings, choice)
                await engine.start()
                for hook in self._started_hooks:
                    hook(engine)
                self._engines[choice] = engine
        return engine

    async def close(self) -> None:
        engines = [e for n, e in self._engines.items() if self._preset.get(n) is not e]
        self._engines.clear()
        for engine in engines:
            await engine.close()
