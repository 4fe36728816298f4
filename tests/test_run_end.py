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
