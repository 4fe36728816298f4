"""The train stage as jobs/train.py runs it: fit.run, leaving runs/<run_id>/_ENDED.json
(pneumonia.run_ended) when the run stops on purpose or fails for good: bad input, or a counted failure
on its index's last attempt (the Job controller's counts reach the pod through the downward API:
pneumonia.cluster.IndexAttempt)."""

from __future__ import annotations

from typing import Any

from pneumonia import cluster, storage
from pneumonia.config import PipelineConfig
from pneumonia.errors import BadInputError, PeerLostError, PeersUnreachableError, Terminated
from pneumonia.layout import Layout
from pneumonia.run_ended import FAILED, STOPPED, read_end, record_end
from pneumonia.training import fit


def train(config: PipelineConfig) -> dict[str, Any] | None:
    """fit.run, leaving the run's _ENDED.json when it stops on purpose or fails for good (jobs/train.py):
    bad input (exit 2), or a counted failure on its index's last attempt (the Job then fails with
    MaxFailedIndexesExceeded). A lost peer is forgiven (exit 75) only as often as cluster.max_forgiven_restarts says."""
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
    except Exception as error:  # noqa: BLE001 - any other failure counts against the index: say so on its last attempt
        end_if_last_attempt(layout, run_id, attempt, index, f"{type(error).__name__}: {error}")
        raise
    if done is None and index == 0:
        record_end(layout, run_id, STOPPED, f"train.max_epochs_this_process={config.train.max_epochs_this_process} "
                                            "reached before the last epoch; run the train stage again to resume")
    return done


def end_if_last_attempt(layout: Layout, run_id: str, attempt: cluster.IndexAttempt, index: int, reason: str) -> None:
    """A counted failure on the index's last attempt fails the train Job: leave the reason for evaluate,
    which under `kubectl apply` waits for the run. (A SIGKILL or OOM kill on the last attempt leaves
    nothing, the process cannot write: evaluate then reads the failed Job itself, cluster.JobWatch.)"""
    if not (run_id and attempt.is_last) or storage.exists(layout.run_marker(run_id)):
        return
    record_end(layout, run_id, FAILED, f"train worker {index} failed on the last of its index's "
                                       f"{attempt.retry_limit + 1} attempts, so the train Job fails (MaxFailedIndexesExceeded): "
                                       f"{reason}", attempt.job_uid)


def clear_end_for_resume(layout: Layout, run_id: str, attempt: cluster.IndexAttempt) -> None:
    """The chief of a resumed run removes its _ENDED.json (the run has not ended yet), except the one a
    worker of this very Job left on failing for good: this pod was started just before the Job failed
    and is being stopped, and evaluate must still read why."""
    ended = read_end(layout, run_id)
    if ended and ended.get("status") == FAILED and attempt.job_uid and ended.get("job_uid") == attempt.job_uid:
        return
    storage.remove(layout.run_ended(run_id))
