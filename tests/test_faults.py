"""Worker faults as an Indexed Job lives through them: who pays, and training resumes where it stopped.

tests/indexed_job.py plays the Job controller on loopback with the train Job's own podFailurePolicy,
backoffLimitPerIndex and maxFailedIndexes, read from manifests/31-train-job.yaml: it restarts only
the index whose pod ended and counts that end against its index unless the policy ignores it.
Two real workers (TF_CONFIG on 127.0.0.1, MultiWorkerMirroredStrategy) train the tiny config.

These are the fast checks (no control plane, no image). The same faults run through the real Job
controller in tests/cluster/test_job_faults.py, which also checks that this scripted controller judges
every failed pod there as the real one did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras
import yaml
from indexed_job import IndexedJob, Pod, policy_action
from test_multiworker import backed_up_epoch, read_json
from test_train import PYTHON, REPO, copy_shards, job_args, subprocess_env, tiny_shards  # noqa: F401

from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_PEER_LOST, EXIT_PREEMPTED
from pneumonia.training.callbacks import PreemptionWatch, ResumableBackup

TRAIN_JOB = yaml.safe_load((REPO / "manifests" / "31-train-job.yaml").read_text())
RULES = TRAIN_JOB["spec"]["podFailurePolicy"]["rules"]
# One phase (no warmup switch: each phase traces its step anew, minutes on a busy 2-core machine);
# three steps an epoch; workers agree on a stop every 2 steps, so a SIGTERM lands mid-epoch.
# Two epochs: the fault lands mid-epoch 1, after epoch 0's backup, so a resume from epoch 0 would show.
ARGS = ["train.epochs=2", "train.warmup_epochs=0", "train.preemption_check_every_n_steps=2"]
START_TIMEOUT_S = 600  # until the fault: two TensorFlow starts and the first epochs
END_TIMEOUT_S = 900  # from the fault to the Job's end: restarts, the remaining epochs, the export
SIGKILL_EXIT = 128 + 9


# --- the policy, evaluated as the Job controller does ---------------------------------------------


@pytest.mark.parametrize(("exit_code", "conditions", "expected"), [
    (EXIT_PEER_LOST, {}, "Ignore"),  # a survivor whose peer is gone
    (EXIT_PREEMPTED, {}, "Ignore"),  # stopped after saving the backup
    (SIGKILL_EXIT, {"DisruptionTarget": "True"}, "Ignore"),  # preempted or its node lost, then killed
    (SIGKILL_EXIT, {}, "Count"),  # its own crash, an OOM kill
    (EXIT_FAILURE, {}, "Count"),
    (EXIT_BAD_INPUT, {}, "FailJob"),
    (EXIT_BAD_INPUT, {"DisruptionTarget": "True"}, "Ignore"),  # rules apply in order: the condition comes first
    (EXIT_FAILURE, {"DisruptionTarget": "False"}, "Count"),
])
def test_the_train_jobs_policy_decides_as_the_controller_would(exit_code: int, conditions: dict, expected: str):
    assert policy_action(RULES, {"train": exit_code}, conditions)[0] == expected


def test_policy_evaluation_follows_the_api_rules() -> None:
    rules = [
        {"action": "FailIndex", "onExitCodes": {"containerName": "sidecar", "operator": "In", "values": [3]}},
        {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1, 75]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    assert policy_action(rules, {"train": 3}, {}) == ("FailJob", 2)  # rule 1 names another container
    assert policy_action(rules, {"train": 0, "sidecar": 3}, {}) == ("FailIndex", 1)
    assert policy_action(rules, {"train": 1}, {"DisruptionTarget": "True"}) == ("Ignore", 3)
    assert policy_action(rules, {"train": 75}, {}) == ("Count", None)  # no rule: counted
    assert policy_action(rules, {"train": 0, "sidecar": 0}, {}) == ("Count", None)  # exit 0 never matches


# --- when the workers agree on a stop ----------------------------------------------------------------


def fit_with_stop_request(backup_dir: Path, request_at: tuple[int, int] | None) -> tuple[list, ResumableBackup]:
    """Fits 3 epochs of 8 steps, agreeing every 3 steps; SIGTERM's flag is set before step `request_at`.
    Returns the (epoch, step) pairs run and the backup callback."""
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[np.arange(64) % 3]
    watch = PreemptionWatch()
    steps: list[tuple[int, int]] = []

    class Steps(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # noqa: ANN001
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):  # noqa: ANN001
            if (self.epoch, batch) == request_at:
                watch.request()
            steps.append((self.epoch, batch))

    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.01), "categorical_crossentropy")
    backup = ResumableBackup(str(backup_dir), watch, check_every_n_steps=3)
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[Steps(), backup], verbose=0)
    return steps, backup


def test_a_stop_is_agreed_every_n_steps_and_at_the_epochs_end(tmp_path: Path) -> None:
    # Asked before step 0 of epoch 0: the next agreement is after step 2; the backup resumes at step 3.
    steps, backup = fit_with_stop_request(tmp_path / "mid", (0, 0))
    assert steps[-1] == (0, 2) and backup.preempted and backup.cut_short
    assert fit_with_stop_request(tmp_path / "mid", None)[0][0] == (0, 3)
    # Asked at step 6 of epoch 1: the next agreement is the epoch's last step (7), so the epoch ends
    # whole (validation, history, best weights) and the resume starts the next one.
    steps, backup = fit_with_stop_request(tmp_path / "end", (1, 6))
    assert steps[-1] == (1, 7) and backup.preempted and not backup.cut_short
    assert fit_with_stop_request(tmp_path / "end", None)[0][0] == (2, 0)


# --- faults on two real workers ---------------------------------------------------------------------


def start_job(tiny_shards: Path, tmp_path: Path, run_id: str) -> tuple[IndexedJob, str]:  # noqa: F811
    root = str(tmp_path / "data")
    copy_shards(tiny_shards, root)
    command = [PYTHON, str(REPO / "jobs" / "train.py"), *job_args(root, run_id, *ARGS)]
    job = IndexedJob(TRAIN_JOB, command, subprocess_env(), cwd=str(REPO), deadline_s=START_TIMEOUT_S + END_TIMEOUT_S)
    return job.start(), root


def event_is(name: str, **fields: object):  # noqa: ANN201
    return lambda event: event.get("event") == name and all(event.get(k) == v for k, v in fields.items())


def wait_for_epoch(job: IndexedJob, epoch: int) -> None:
    """Until both workers' first pods have begun `epoch` (so a fault lands mid-epoch, after a backup)."""
    job.run_until(lambda: all(job.attempts(i)[0].saw(event_is("epoch begin", epoch=epoch)) for i in (0, 1)),
                  START_TIMEOUT_S)


def first_epoch(pod: Pod) -> int:
    return next(e["epoch"] for e in pod.events() if e.get("event") == "epoch begin")


def assert_completed_in_sync(job: IndexedJob, root: str, run_id: str, resumed_epoch: int) -> None:
    """Complete; both last pods resumed at `resumed_epoch` (not 0) and ended with the same weights."""
    assert job.status == "Complete", job.summary()
    last = [job.current(index) for index in (0, 1)]
    assert all(len(job.attempts(index)) >= 2 for index in (0, 1)), job.summary()  # both were restarted
    assert [first_epoch(pod) for pod in last] == [resumed_epoch, resumed_epoch], job.summary()
    finished = [next(e for e in pod.events() if e.get("event") == "training finished") for pod in last]
    assert finished[0]["weights_sha256"] == finished[1]["weights_sha256"]
    marker = read_json(f"{root}/runs/{run_id}/_SUCCESS.json")
    assert marker["weights_sha256"] == finished[0]["weights_sha256"]
    history = read_json(f"{root}/runs/{run_id}/history.json")
    assert [r["epoch"] for r in history["epochs"]] == [0, 1] and history["complete"] is True


def fault_then_run_to_end(job: IndexedJob, backup_dir: str, fault, once_the_survivor_ended=None) -> int:  # noqa: ANN001
    """Mid-epoch 1, `fault` hits worker 1; once worker 0's first pod has ended, reads the epoch its
    backup holds (what the restart must resume after), runs `once_the_survivor_ended`, then the Job."""
    try:
        wait_for_epoch(job, 1)
        fault()
        job.run_until(lambda: job.attempts(0)[0].exit_code is not None, END_TIMEOUT_S)
        backed_up = backed_up_epoch(backup_dir)
        if once_the_survivor_ended:
            once_the_survivor_ended()
        job.run_to_end(END_TIMEOUT_S)
    finally:
        job.terminate()
        print(job.summary())  # what each pod did and what the policy made of it (pytest -rP shows it)
    return backed_up


def ends(job: IndexedJob, index: int) -> list[tuple[int | None, str | None]]:
    """(exit code, policy action) of each failed attempt of `index` the controller judged (not those
    it terminated itself once the Job had ended)."""
    return [(pod.exit_code, pod.action) for pod in job.attempts(index) if pod.action]


@pytest.mark.slow
def test_sigkill_of_worker_1_counts_only_against_index_1(tiny_shards: Path, tmp_path: Path):  # noqa: F811
    job, root = start_job(tiny_shards, tmp_path, "kill")
    backed_up = fault_then_run_to_end(job, f"{root}/runs/kill/backup", lambda: job.kill(1))
    assert ends(job, 1) == [(SIGKILL_EXIT, "Count")], job.summary()
    assert ends(job, 0) == [(EXIT_PEER_LOST, "Ignore")], job.summary()  # the survivor: peer lost, not counted
    assert job.counted == [0, 1]
    assert backed_up >= 0
    assert_completed_in_sync(job, root, "kill", backed_up + 1)


@pytest.mark.slow
def test_node_loss_of_worker_1_counts_against_nobody(tiny_shards: Path, tmp_path: Path):  # noqa: F811
    """SIGSTOP: the node stops answering; the survivor gives up on its heartbeats. Later the node is
    declared lost: its pod is deleted with DisruptionTarget (modelled as SIGKILL with that condition)."""
    job, root = start_job(tiny_shards, tmp_path, "node")
    backed_up = fault_then_run_to_end(job, f"{root}/runs/node/backup", lambda: job.stop_node(1),
                                      once_the_survivor_ended=lambda: job.lose_node(1))
    assert ends(job, 0) == [(EXIT_PEER_LOST, "Ignore")], job.summary()
    assert ends(job, 1) == [(SIGKILL_EXIT, "Ignore")] and job.attempts(1)[0].rule == 1, job.summary()
    assert job.counted == [0, 0]
    assert_completed_in_sync(job, root, "node", backed_up + 1)


@pytest.mark.slow
def test_sigterm_of_one_worker_stops_both_with_the_backup_and_resumes_both_there(
        tiny_shards: Path, tmp_path: Path):  # noqa: F811
    """The chief: the worker that also hosts the coordination service, the harder of the two to lose."""
    preempted = 0
    job, root = start_job(tiny_shards, tmp_path, "preempt")
    try:
        wait_for_epoch(job, 1)
        job.preempt(preempted)
        job.run_to_end(START_TIMEOUT_S + END_TIMEOUT_S)
    finally:
        job.terminate()
        print(job.summary())
    # Both stopped at the same step with the backup saved, and exited 143: nobody's retries are spent.
    assert ends(job, 0) == ends(job, 1) == [(EXIT_PREEMPTED, "Ignore")], job.summary()
    assert job.attempts(preempted)[0].rule == 1  # DisruptionTarget; the other pod by its exit code
    assert job.counted == [0, 0]
    stops = [next(e for e in job.attempts(i)[0].events() if e.get("event") == "stop requested (SIGTERM): backup saved")
             for i in (0, 1)]
    assert (stops[0]["epoch"], stops[0]["step"]) == (stops[1]["epoch"], stops[1]["step"])
    assert stops[0]["epoch"] >= 1
    assert_completed_in_sync(job, root, "preempt", stops[0]["epoch"])


@pytest.mark.slow
def test_a_worker_crashing_on_every_start_fails_the_job_and_only_its_index_pays(
        tiny_shards: Path, tmp_path: Path):  # noqa: F811
    job, _ = start_job(tiny_shards, tmp_path, "crashloop")
    job.crash_when(1, event_is("epoch begin"))  # killed at the first step of every attempt, like an OOM kill
    try:
        status = job.run_to_end(4 * START_TIMEOUT_S)
    finally:
        job.terminate()
        print(job.summary())
    limit = TRAIN_JOB["spec"]["backoffLimitPerIndex"]
    assert status == "Failed" and job.reason == "MaxFailedIndexesExceeded [1]", job.summary()
    assert ends(job, 1) == [(SIGKILL_EXIT, "Count")] * (limit + 1), job.summary()
    assert job.counted == [0, limit + 1]
    # The survivor stopped each time its peer died, with the code nobody counts (or was still starting).
    assert {code for code, _ in ends(job, 0)} <= {EXIT_PEER_LOST, EXIT_PREEMPTED}, job.summary()
    assert {action for _, action in ends(job, 0)} <= {"Ignore"}, job.summary()
