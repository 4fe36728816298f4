"""A run that ends without its marker says so, in runs/<run_id>/_ENDED.json, so that evaluate, which
under `kubectl apply` waits for the run from the start, exits at once instead of holding its pod
until its deadline (30 hours).

    {"status": "stopped" | "failed", "reason": "...", "ended_at": <unix time>}

"stopped": train.max_epochs_this_process was reached (exit 0, the Job completes); "failed": bad
input or config (exit 2, the podFailurePolicy fails the Job), or a counted failure on an index's last
attempt (backoffLimitPerIndex spent: the Job fails with FailedIndexes; "job_uid" names that Job).
Resuming the run removes it.
"""

from __future__ import annotations

import time
from typing import Any

import tensorflow as tf

from pneumonia import cluster, storage
from pneumonia.config import PipelineConfig
from pneumonia.data import upstream
from pneumonia.errors import BadInputError, PeerLostError, PeersUnreachableError, Terminated
from pneumonia.layout import Layout
from pneumonia.logs import get_logger
from pneumonia.training import fit

log = get_logger(__name__)

STOPPED, FAILED = "stopped", "failed"
# A marker older than evaluate's wait was left by an earlier process of the run; a resume (whose chief
# removes it when it starts, once its pod is scheduled) gets this long before evaluate believes it.
STALE_END_GRACE_S = 900.0


def train(config: PipelineConfig) -> dict[str, Any] | None:
    """fit.run, leaving the run's _ENDED.json when it stops on purpose or fails for good (jobs/train.py):
    bad input (exit 2), or a counted failure on its index's last attempt (the Job then fails with
    FailedIndexes). A lost peer is forgiven (exit 75) only as often as cluster.max_forgiven_restarts says."""
    layout = Layout.of(config)
    run_id = config.train.run_id
    index = cluster.worker_index()
    attempt = cluster.IndexAttempt.from_env()
    if index == 0 and run_id:
        clear_end_for_resume(layout, run_id, attempt)
    try:
        done = fit.run(config)
    except BadInputError as error:
        # Any worker: exit 2 on one index fails the whole Job. A finished run stays finished.
        if run_id and not storage.exists(layout.run_marker(run_id)):
            record_end(layout, run_id, FAILED, str(error), attempt.job_uid)
        raise
    except PeerLostError as error:
        if attempt.forgives_peer_loss(config.cluster.max_forgiven_restarts):
            raise
        reason = (f"worker {index} lost its peers again after its index was restarted {attempt.forgiven_before} "
                  f"times without being counted (cluster.max_forgiven_restarts="
                  f"{config.cluster.max_forgiven_restarts}): a network partition that does not heal? ({error})")
        end_if_last_attempt(layout, run_id, attempt, index, reason)
        raise PeersUnreachableError(f"{reason}; this exit is counted") from error
    except Terminated:
        raise  # preempted or deleted: not the index's failure
    except Exception as error:  # noqa: BLE001 - any other failure is counted against the index: say so if it was the last
        end_if_last_attempt(layout, run_id, attempt, index, f"{type(error).__name__}: {error}")
        raise
    if done is None and index == 0:
        record_end(layout, run_id, STOPPED, f"train.max_epochs_this_process={config.train.max_epochs_this_process} "
                                            "reached before the last epoch; run the train stage again to resume")
    return done


def end_if_last_attempt(layout: Layout, run_id: str, attempt: cluster.IndexAttempt, index: int, reason: str) -> None:
    """A counted failure on the index's last attempt fails the train Job: leave the reason for evaluate,
    which under `kubectl apply` would otherwise wait until its own deadline. (A SIGKILL or OOM kill on
    the last attempt leaves nothing: the process cannot write.)"""
    if not (run_id and attempt.is_last) or storage.exists(layout.run_marker(run_id)):
        return
    record_end(layout, run_id, FAILED, f"train worker {index} failed on the last of its index's "
                                       f"{attempt.retry_limit + 1} attempts, so the train Job fails (FailedIndexes): "
                                       f"{reason}", attempt.job_uid)


def clear_end_for_resume(layout: Layout, run_id: str, attempt: cluster.IndexAttempt) -> None:
    """The chief of a resumed run removes its _ENDED.json (the run has not ended yet), except the one a
    worker of this very Job left on failing for good: this pod was started just before the Job failed
    and is being stopped, and evaluate must still read why."""
    ended = read_end(layout, run_id)
    if ended and ended.get("status") == FAILED and attempt.job_uid and ended.get("job_uid") == attempt.job_uid:
        return
    storage.remove(layout.run_ended(run_id))


def record_end(layout: Layout, run_id: str, status: str, reason: str, job_uid: str = "") -> None:
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
