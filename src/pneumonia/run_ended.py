"""A run that ends without its marker says so, in runs/<run_id>/_ENDED.json, so that evaluate, which
under `kubectl apply` waits for the run from the start, exits at once instead of holding its pod
until its deadline (30 hours). A train Job that failed without a word (a worker killed on its last
attempt, the Job's deadline) is read from the Kubernetes API instead (cluster.JobWatch).

    {"status": "stopped" | "failed", "reason": "...", "ended_at": <unix time>}

"stopped": train.max_epochs_this_process was reached (exit 0, the Job completes); "failed": bad
input or config (exit 2, the podFailurePolicy fails the Job), or a counted failure on an index's last
attempt (backoffLimitPerIndex spent: the Job fails with MaxFailedIndexesExceeded; "job_uid" names that Job).
Resuming the run removes it.
"""

from __future__ import annotations

import time
from typing import Any

import tensorflow as tf

from pneumonia import cluster, storage
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


def record_end(layout: Layout, run_id: str, status: str, reason: str, job_uid: str = "") -> None:
    """`job_uid`: the train Job whose pod recorded a failure for good (a late chief of that Job keeps it)."""
    path = layout.run_ended(run_id)
    record = {"status": status, "reason": reason, "ended_at": time.time()}
    if job_uid:
        record["job_uid"] = job_uid
    storage.write_json(path, record)
    log.info("run ended without finishing", status=status, marker=path, reason=reason)


def read_end(layout: Layout, run_id: str) -> dict[str, Any] | None:
    """The run's _ENDED.json, or None (none, or being rewritten right now)."""
    path = layout.run_ended(run_id)
    try:
        ended = storage.read_json(path) if storage.exists(path) else None
    except (ValueError, tf.errors.NotFoundError):
        return None
    return ended if isinstance(ended, dict) else None


def wait_for_finished_run(layout: Layout, config: PipelineConfig, stale_grace_s: float = STALE_END_GRACE_S,
                          poll_s: float = 10.0, train_job: cluster.JobWatch | None = None) -> None:
    """Waits (bounded by cluster.upstream_wait_timeout_s) for the run's marker; exits at once (bad input,
    exit 2, naming the run and why) when the run ended without one, or when the train Job
    (cluster.train_job_name, read through the Kubernetes API where this pod may) failed: a worker killed
    on its index's last attempt, or the Job's deadline, leaves no _ENDED.json."""
    run_id = config.train.run_id
    marker = layout.run_marker(run_id)
    train_job = train_job or cluster.JobWatch(config.cluster.train_job_name)
    began = time.time()

    def believed(at: float) -> bool:
        # An ending from before this wait may be an earlier attempt's, about to be replaced by a resume.
        return at >= began or time.time() - began >= stale_grace_s

    def check() -> tuple[dict[str, Any] | None, list[str]]:
        if storage.exists(marker):
            return None, []
        ended = read_end(layout, run_id)
        if ended is not None and believed(float(ended.get("ended_at", 0))):
            raise ended_error(run_id, ended, layout.run_ended(run_id))
        failed = train_job.failure()
        if failed is not None and believed(failed.failed_at + 1.0):  # the API's times have whole seconds
            raise job_failed_error(run_id, failed)
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


def job_failed_error(run_id: str, failed: cluster.JobFailure) -> BadInputError:
    return BadInputError(f"the train Job {failed.namespace}/{failed.name} (uid {failed.uid}) of run {run_id} failed: "
                         f"{failed.reason}: {failed.message or 'no message'}. Nothing to evaluate: see why with "
                         f"`kubectl -n {failed.namespace} describe job {failed.name}` and its pods' logs, fix it, then "
                         "delete the train and evaluate Jobs and apply them again (same train.run_id resumes the run)")


def ended_error(run_id: str, ended: dict[str, Any], path: str) -> BadInputError:
    return BadInputError(f"run {run_id} {ended.get('status', 'ended')} without finishing: "
                         f"{ended.get('reason') or 'no reason recorded'} ({path}). Nothing to evaluate: resume the "
                         "run (same train.run_id) and evaluate it once it finishes, or evaluate a finished run")
