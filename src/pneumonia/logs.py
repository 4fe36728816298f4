"""structlog set-up: JSON lines in containers, colours on a terminal; every event carries context.

Configured once, by the entrypoint (`configure_logging`); library modules only call `get_logger`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def configure_logging(stage: str, run_id: str, worker: int | str = 0, *, json_logs: bool | None = None,
                      level: str = "INFO") -> None:
    """Every event after this carries stage, run_id and worker."""
    if json_logs is None:
        json_logs = os.environ.get("LOG_FORMAT", "").lower() == "json" or not sys.stderr.isatty()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_logs:
        renderer: Any = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # One write per event (message and newline together): print() writes them separately, and
        # with PYTHONUNBUFFERED set, processes sharing a stream (local workers) would split lines.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(stage=stage, run_id=run_id, worker=worker)
    # TensorFlow's C++ and absl logs stay on their own channel; keep them to warnings and above.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pneumonia import progress  # imports this module: bound here, not at import

    # A live bar where people read colours; progress log lines where JSON goes to a log store.
    progress.configure(live=not json_logs)


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
