"""A run that ends without its marker says so, in runs/<run_id>/_ENDED.json, so that evaluate, which
under `kubectl apply` waits for the run from the start, exits at once instead of holding its pod
until its deadline (30 hours).

    {"status": "stopped" | "failed", "reason": "...", "ended_at": <unix time>}

"stopped": train.max_epochs_this_process was reached (exit 0, the Job completes); "failed": bad
input or config (exit 2, the podFailurePolicy fails the Job). Resuming the run removes it.
"""

from __future__ import annotations

import time
from typing import Any

import tensorflow as tf

from pneumonia import storage
from pneumonia.config import PipelineConfig
from pneumonia.data import upstream
from pneumonia.errors import BadInputError
from pneumonia.layout import Layout
from pneumonia.logs import get_logger

log = get_logger(__name__)

STOPPED, FAILED = "stopped", "failed"
# A marker older than evaluate's wait was left by an earlier process of the run; a resume (whose chief
# removes it when it starts, once its pod is scheduled) gets this long before evaluate believes it.
STALE_END_GRACE_S = 900.0


def record_end(layout: Layout, run_id: str, status: str, reason: str) -> None:
    path = layout.run_ended(run_id)
    storage.write_json(path, {"status": status, "reason": reason, "ended_at": time.time()})
    log.info("run ended without finishing", status=status, marker=path)


def read_end(layout: Layout, run_id: str) -> dict[str, Any] | None:
    """The run's _ENDED.json, or None (none, or being rewritten right now)."""
    path = layout.run_ended(run_id)
    try:
        ended = storage.read_json(path) if storage.exists(path) else None
    except (ValueError, tf.errors.NotFoundError):
        return None
    return ended if isinstance(ended, dict) else None


def wait_for_finished_run(layout: Layout, config: PipelineConfig, stale_grace_s: float = STALE_END_GRACE_S,
                          poll_s: float = 10.0) -> None:
    """Waits (bounded by cluster.upstream_wait_timeout_s) for the run's marker; exits at once (bad input,
    exit 2, naming the run and why) when the run ended without one."""
    run_id = config.train.run_id
    marker = layout.run_marker(run_id)
    began = time.time()

    def check() -> tuple[dict[str, Any] | None, list[str]]:
        if storage.exists(marker):
            return None, []
        ended = read_end(layout, run_id)
        if ended is not None and (float(ended.get("ended_at", 0)) >= began or time.time() - began >= stale_grace_s):
            raise ended_error(run_id, ended, layout.run_ended(run_id))
        return ended, [f"no {marker} yet" + (f" (an earlier process of the run {ended.get('status')}; waiting "
                                             "for a resume to clear it)" if ended else "")]

    def give_up(ended: dict[str, Any] | None, _: list[str]) -> Exception:
        if ended is not None:
            return ended_error(run_id, ended, layout.run_ended(run_id))
        storage.wait_for(marker, 0, what=f"the train stage's marker for run {run_id} (set train.run_id to a "
                                         "finished run)")
        return RuntimeError(f"{marker} appeared just as the wait ended; a retry finds it")

    upstream.wait_until_current(check, deadline=time.monotonic() + config.cluster.upstream_wait_timeout_s,
                                give_up=give_up, poll_s=poll_s, waiting_for=f"run {run_id} to finish")


def ended_error(run_id: str, ended: dict[str, Any], path: str) -> BadInputError:
    return BadInputError(f"run {run_id} {ended.get('status', 'ended')} without finishing: "
                         f"{ended.get('reason') or 'no reason recorded'} ({path}). Nothing to evaluate: resume the "
                         "run (same train.run_id) and evaluate it once it finishes, or evaluate a finished run")
