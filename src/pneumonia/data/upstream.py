"""Waiting until an upstream stage's output was made with this config (the shard and train stages).

Under `kubectl apply` every stage starts at once, and after a config change (or a replaced archive)
the old outputs and their markers stay in place until the upstream stage redoes them: a marker that
exists is not enough, it must record this config's settings (config.py declares which ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import tensorflow as tf

from pneumonia import storage
from pneumonia.config import INTERIM, PipelineConfig, settings_deciding
from pneumonia.data import preprocess
from pneumonia.layout import Layout
from pneumonia.logs import get_logger

log = get_logger(__name__)

Result = TypeVar("Result")
Problem = TypeVar("Problem")
# (key, what the upstream marker records, what this config has)
Mismatch = tuple[str, Any, Any]

ARCHIVE = "the archive"
NOT_RECORDED = "<not recorded>"
LOG_EVERY_S = 60.0


def wait_until_current(check: Callable[[], tuple[Result, Sequence[Problem]]], *, deadline: float,
                       give_up: Callable[[Result, Sequence[Problem]], Exception], waiting_for: str,
                       poll_s: float = 10.0) -> Result:
    """Calls `check` until it finds no problem and returns its result; past `deadline` (time.monotonic)
    raises `give_up(result, problems)`. Logs what it waits for once a minute."""
    next_log = 0.0
    while True:
        result, problems = check()
        if not problems:
            return result
        now = time.monotonic()
        if now >= deadline:
            raise give_up(result, problems)
        if now >= next_log:
            log.info(f"waiting for {waiting_for}", problems=[str(problem) for problem in problems],
                     seconds_left=round(deadline - now))
            next_log = now + LOG_EVERY_S
        time.sleep(min(poll_s, max(0.0, deadline - now)))


def interim_settings(config: PipelineConfig) -> dict[str, Any]:
    """What the interim marker must record for this config: the keys that decide INTERIM, as preprocess
    stores them under "config" (not data.root nor data.archive: moving the data changes no output)."""
    return settings_deciding(config, INTERIM)


def read_interim_marker(layout: Layout) -> dict[str, Any] | None:
    """interim/_SUCCESS.json, or None while it cannot be read (a preprocess run replacing it right now)."""
    try:
        marker = storage.read_json(layout.interim_marker)
    except (ValueError, tf.errors.NotFoundError):
        return None
    return marker if isinstance(marker, dict) else None


def interim_mismatches(marker: dict[str, Any], config: PipelineConfig) -> list[Mismatch]:
    """Every INTERIM setting the marker records otherwise than `config`, then the archive when it was
    replaced since preprocess read it."""
    recorded = marker.get("config")
    recorded = recorded if isinstance(recorded, dict) else {}
    found = []
    # The split's keys first: they are the ones people change, and an error message shows the first few.
    for section, values in sorted(interim_settings(config).items(), key=lambda item: item[0] != "split"):
        theirs = recorded.get(section) if isinstance(recorded.get(section), dict) else {}
        for key, value in values.items():
            if theirs.get(key, NOT_RECORDED) != value:
                found.append((f"{section}.{key}", theirs.get(key, NOT_RECORDED), value))
    changed = preprocess.archive_changed(marker, config)
    if changed is not None:
        found.append((ARCHIVE, f"{marker.get('archive')} ({marker.get('archive_identity')})",
                      f"{changed[0]} ({changed[1]})"))
    return found


def describe_mismatch(mismatch: Mismatch) -> str:
    key, theirs, ours = mismatch
    if key == ARCHIVE:
        return f"interim/ was made from {theirs}, which has been replaced since (now {ours}; rerun preprocess)"
    made = "split" if key.startswith("split.") else "made"
    return f"interim/ was {made} with {key}={theirs}, this config has {ours} (rerun preprocess)"
