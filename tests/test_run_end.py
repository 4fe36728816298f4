"""A run that stops on purpose or fails for good leaves runs/<id>/_ENDED.json; evaluate, waiting for the
run under `kubectl apply`, then exits at once (exit 2) naming the run and why; a resume removes it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pneumonia import run_ended
from pneumonia.cli import run_stage
from pneumonia.config import load_config
from pneumonia.errors import EXIT_BAD_INPUT, BadInputError, UpstreamMissingError
from pneumonia.evaluation import evaluate
from pneumonia.layout import Layout
from pneumonia.training import run_end

sys.path.insert(0, str(Path(__file__).parent))
from test_train import PYTHON, REPO, data_root, job_args, subprocess_env, tiny_config, tiny_shards  # noqa: E402,F401


def ended(root: str, run_id: str) -> dict | None:
    path = Path(root) / "runs" / run_id / "_ENDED.json"
    return json.loads(path.read_text()) if path.exists() else None


def evaluate_while_training(root: str, run_id: str, *train_args: str) -> tuple[int, int, float]:
    """(evaluate's exit status, train's, seconds from train's exit to evaluate's): evaluate waits up to
    10 minutes for the run while jobs/train.py runs, as `kubectl apply` starts them."""
    trained: dict[str, float | int] = {}

    def train() -> None:
        time.sleep(0.5)
        result = subprocess.run([PYTHON, str(REPO / "jobs" / "train.py"), *job_args(root, run_id, *train_args)],
                                env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
        trained.update(status=result.returncode, at=time.monotonic())

    training = threading.Thread(target=train)
    training.start()
    try:  # in the main thread: the stage installs a SIGTERM handler
        status = run_stage("evaluate", evaluate.run, ["--set", f"data.root={root}", "--set", f"train.run_id={run_id}",
                                                      "--set", "cluster.upstream_wait_timeout_s=600"])
    finally:
        training.join()
    return status, int(trained["status"]), time.monotonic() - float(trained["at"])


def test_a_run_that_fails_for_good_makes_evaluate_exit_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    status, train_status, after_s = evaluate_while_training(str(tmp_path), "noshards")  # no shards: exit 2
    assert train_status == EXIT_BAD_INPUT and status == EXIT_BAD_INPUT and after_s < 30
    marker = ended(str(tmp_path), "noshards")
    assert marker["status"] == "failed" and "_SUCCESS.json" in marker["reason"]
    logged = capsys.readouterr()
    assert "run noshards failed without finishing" in logged.out + logged.err


def test_a_run_stopped_on_purpose_is_marked_until_it_is_resumed(data_root: str):
    two_epochs = "train.epochs=2"  # one before the stop, one after the resume
    status, train_status, after_s = evaluate_while_training(data_root, "stop", two_epochs,
                                                            "train.max_epochs_this_process=1")
    assert train_status == 0 and status == EXIT_BAD_INPUT and after_s < 30
    marker = ended(data_root, "stop")
    assert marker["status"] == "stopped" and "train.max_epochs_this_process=1" in marker["reason"]

    done = run_end.train(tiny_config(data_root, "stop", two_epochs))  # the resume removes the marker, finishes
    assert done is not None and ended(data_root, "stop") is None
    run_ended.wait_for_finished_run(Layout(data_root), tiny_config(data_root, "stop", two_epochs))  # at once


def test_an_end_marker_older_than_the_wait_gets_a_grace_period_for_a_resume(tmp_path: Path):
    """Jobs deleted and applied again to resume: evaluate may start before the train chief removes the old
    marker (its pod may wait minutes for a GPU node); evaluate started after the run ended waits that long."""
    root = str(tmp_path)
    layout = Layout(root)
    config = load_config(None, [f"data.root={root}", "train.run_id=r", "cluster.upstream_wait_timeout_s=60"])
    run_ended.record_end(layout, "r", run_ended.STOPPED, "train.max_epochs_this_process=1 reached")

    started = time.monotonic()
    with pytest.raises(BadInputError, match=r"run r stopped without finishing: train\.max_epochs_this_process=1"):
        run_ended.wait_for_finished_run(layout, config, stale_grace_s=0.5, poll_s=0.05)
    assert 0.5 <= time.monotonic() - started < 10

    def resume() -> None:  # the chief removes the marker; later the run finishes
        time.sleep(0.3)
        (tmp_path / "runs" / "r" / "_ENDED.json").unlink()
        time.sleep(0.3)
        (tmp_path / "runs" / "r" / "_SUCCESS.json").write_text("{}")

    resumed = threading.Thread(target=resume)
    resumed.start()
    try:
        run_ended.wait_for_finished_run(layout, config, stale_grace_s=30, poll_s=0.05)
    finally:
        resumed.join()


def test_without_a_wait_an_end_marker_is_reported_and_none_means_missing(tmp_path: Path):
    root = str(tmp_path)
    layout = Layout(root)
    config = load_config(None, [f"data.root={root}", "train.run_id=r"])  # upstream_wait_timeout_s=0
    with pytest.raises(UpstreamMissingError, match="the train stage's marker for run r"):
        run_ended.wait_for_finished_run(layout, config)
    run_ended.record_end(layout, "r", run_ended.FAILED, "the split manifest is missing")
    with pytest.raises(BadInputError, match="run r failed without finishing: the split manifest is missing"):
        run_ended.wait_for_finished_run(layout, config)


# --- the Job controller's counts (downward API) decide what a failure on an index's last attempt leaves ---


def attempt_env(monkeypatch: pytest.MonkeyPatch, *, failed: str, forgiven: str = "", limit: str = "3",
                index: str = "1", job_uid: str = "uid-1") -> None:
    """The env the train Job's pods get: the index and the Job controller's annotations (empty when absent)."""
    for name, value in {"JOB_COMPLETION_INDEX": index, "JOB_INDEX_FAILURE_COUNT": failed,
                        "JOB_INDEX_IGNORED_FAILURE_COUNT": forgiven, "JOB_BACKOFF_LIMIT_PER_INDEX": limit,
                        "JOB_UID": job_uid}.items():
        monkeypatch.setenv(name, value)


def train_failing_with(monkeypatch: pytest.MonkeyPatch, root: Path, error: Exception, *sets: str) -> int:
    def fail(config):  # noqa: ANN001, ANN202
        raise error

    monkeypatch.setattr(run_end.fit, "run", fail)
    return run_stage("train", run_end.train, ["--set", f"data.root={root}", "--set", "train.run_id=r", *sets])


@pytest.mark.parametrize(("failed", "expect_marker"), [("3", True), ("2", False), ("", False)])
def test_a_counted_failure_on_the_last_attempt_leaves_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 failed: str, expect_marker: bool) -> None:
    attempt_env(monkeypatch, failed=failed)
    status = train_failing_with(monkeypatch, tmp_path, RuntimeError("disk on fire"))
    assert status == 1
    marker = ended(str(tmp_path), "r")
    if not expect_marker:
        assert marker is None
        return
    assert marker["status"] == "failed" and marker["job_uid"] == "uid-1"
    assert "last of its index's 4 attempts" in marker["reason"] and "disk on fire" in marker["reason"]


@pytest.mark.parametrize(("forgiven", "failed", "status", "expect_marker"), [
    ("1", "0", 75, False),  # forgiven: the Job ignores 75
    ("2", "0", 1, False),  # forgiven twice already: this loss counts
    ("5", "3", 1, True),  # ... and on the index's last attempt the run is marked failed
])
def test_a_peer_loss_is_forgiven_only_so_often(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, forgiven: str,
                                               failed: str, status: int, expect_marker: bool) -> None:
    from pneumonia.errors import PeerLostError

    attempt_env(monkeypatch, failed=failed, forgiven=forgiven)
    assert train_failing_with(monkeypatch, tmp_path, PeerLostError("peer gone"),
                              "--set", "cluster.max_forgiven_restarts=2") == status
    marker = ended(str(tmp_path), "r")
    assert (marker is not None) == expect_marker
    if marker:
        assert "max_forgiven_restarts=2" in marker["reason"]


def test_outside_a_job_with_per_index_retries_a_peer_loss_stays_forgiven(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    from pneumonia.errors import PeerLostError

    attempt_env(monkeypatch, failed="", forgiven="50", limit="")
    assert train_failing_with(monkeypatch, tmp_path, PeerLostError("peer gone")) == 75


def test_a_new_chief_keeps_the_failure_its_own_job_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    layout = Layout.of(load_config(None, [f"data.root={tmp_path}", "train.run_id=r"]))
    run_ended.record_end(layout, "r", run_ended.FAILED, "index 1 out of retries", job_uid="uid-1")
    from pneumonia.cluster import IndexAttempt

    run_end.clear_end_for_resume(layout, "r", IndexAttempt(retry_limit=3, job_uid="uid-1"))
    assert ended(str(tmp_path), "r")["reason"] == "index 1 out of retries"
    run_end.clear_end_for_resume(layout, "r", IndexAttempt(retry_limit=3, job_uid="uid-2"))  # a new Job: a resume
    assert ended(str(tmp_path), "r") is None
    with pytest.raises(BadInputError, match="JOB_INDEX_FAILURE_COUNT"):
        IndexAttempt.from_env({"JOB_INDEX_FAILURE_COUNT": "x"})
