"""structlog setup: human-readable on a terminal, JSON lines otherwise.

Context such as ``call_id`` and ``channel`` is bound with :func:`structlog.contextvars` so every
line of a call carries it. Transcript text and phone numbers are personal data: callers log them
only at debug level, or when ``logging.log_transcripts`` is set.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    level: str = "info", fmt: str = "auto", *, stream: TextIO | None = None
) -> None:
    """Configure structlog (and stdlib logging, so library warnings come out the same way)."""
    out = stream or sys.stderr
    renderer: structlog.typing.Processor
    if fmt == "console" or (fmt == "auto" and out.isatty()):
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    numeric = _LEVELS[level]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=out, force=True)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to ``name``; it follows :func:`configure_logging` whenever that runs.

    Until something configures structlog (the CLI does; a program embedding the gateway may),
    lines below info are dropped: structlog's own default prints every level, and debug lines
    carry transcript text.
    """
    if not structlog.is_configured():
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    return structlog.get_logger(name)  # type: ignore[no-any-return]
