"""structlog set-up: JSON lines for journald and files, readable columns on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


class _Lines(structlog.PrintLogger):
    """Writes each line to stderr; one that cannot be written (a full disk under a log file, a
    closed pipe) is counted and dropped, never raised into the daemon."""

    dropped = 0

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):
            _Lines.dropped += 1

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (OSError, ValueError):  # closed: lines written there are dropped (``_Lines``)
        return False


def configure(level: str = "info", fmt: str = "auto") -> None:
    terminal = _terminal()
    if fmt == "auto":
        fmt = "console" if terminal else "json"
    # colours for a terminal only: console columns asked for in a file or the journal stay plain text
    renderer = structlog.dev.ConsoleRenderer(colors=terminal) if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _Lines(sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
