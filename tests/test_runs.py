"""Runs side by side (python -m pneumonia.runs) on both storage backends, and the TensorBoard HParams
session each run writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import plugin_data_pb2

from pneumonia import hparams, runs, storage
from pneumonia.config import CLASS_NAMES, load_config
from pneumonia.evaluation import report, uncertainty
from pneumonia.layout import Layout

REPO = Path(__file__).resolve().parents[1]


def write_run(layout: Layout, run_id: str, *overrides: str, epochs_done: int, status: str,
              seed: int = 0) -> dict | None:
    """A run dir as the stages leave it: config.yaml, history.json, then the marker or _ENDED.json, and
    for a finished run report/metrics.json computed by the report's own functions."""
    config = load_config(None, [f"train.run_id={run_id}", "model.name=small_cnn", "train.epochs=6", *overrides])
    storage.write_text(storage.join(layout.run(run_id), "config.yaml"), config.to_yaml())
    storage.write_json(layout.history(run_id), {"epochs": [{"epoch": i, "val_cohen_kappa": 0.5} for i in
                                                           range(epochs_done)], "complete": status == "finished"})
    if status in ("stopped", "failed"):
        storage.write_json(storage.join(layout.run(run_id), "_ENDED.json"),
                           {"status": status, "reason": f"why {run_id} {status}", "ended_at": 0})
    if status != "finished":
        return None
    storage.write_json(layout.run_marker(run_id), {"run_id": run_id})
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 90)
    probabilities = rng.dirichlet([1, 1, 1], 90)
    probabilities[np.arange(90), labels] += 0.4  # right about 80 % of the time: intervals of some width
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics = {**report.compute_metrics(labels, probabilities, CLASS_NAMES),
               **uncertainty.bootstrap(labels, probabilities, [f"p{i // 3}" for i in range(90)], CLASS_NAMES),
               "calibration": report.calibration_summary(labels, probabilities, probabilities, 1.0)}
    storage.write_json(storage.join(layout.report(run_id), "metrics.json"), metrics)
    return metrics


def test_one_line_per_run_with_status_metrics_and_the_keys_that_differ(any_root: str):
    layout = Layout(any_root)
    metrics = write_run(layout, "20260101-a", epochs_done=6, status="finished")
    write_run(layout, "20260102-b", "train.learning_rate=0.003", "model.dense_units=[32, 16]", epochs_done=6,
              status="finished", seed=1)
    write_run(layout, "20260103-c", epochs_done=2, status="stopped")
    write_run(layout, "20260104-d", epochs_done=1, status="running")
    write_run(layout, "20260105-e", "model.name=efficientnetv2b0", epochs_done=0, status="failed")

    found = {run.run_id: run for run in runs.list_runs(any_root)}
    assert {run_id: run.status for run_id, run in found.items()} == {
        "20260101-a": "finished", "20260102-b": "finished", "20260103-c": "stopped", "20260104-d": "running",
        "20260105-e": "failed"}
    assert found["20260103-c"].epochs == "2/6" and found["20260105-e"].model == "efficientnetv2b0"
    assert found["20260104-d"].metrics == {}  # not evaluated (not even finished)

    text = runs.render(list(found.values()))
    lines = text.splitlines()
    low, high = metrics["ci95"]["accuracy"]
    line_a = next(line for line in lines if line.startswith("20260101-a"))
    assert "finished" in line_a and "small_cnn" in line_a and "6/6" in line_a
    assert f"{metrics['accuracy']:.3f} [{low:.3f}, {high:.3f}]" in line_a
    sensitivity = metrics["binary"]
    assert f"{sensitivity['sensitivity']:.3f} [{sensitivity['ci95']['sensitivity'][0]:.3f}, " in line_a
    assert "20260103-c: stopped: why 20260103-c stopped" in text

    differing = runs.differing_keys(list(found.values()))
    assert set(differing) == {"train.learning_rate", "model.dense_units", "model.name"}
    assert differing["train.learning_rate"]["20260102-b"] == 0.003
    assert differing["train.learning_rate"]["20260101-a"] == 0.001
    key_line = next(line for line in lines if line.strip().startswith("model.dense_units"))
    assert "20260101-a=[1024, 512]" in key_line and "20260102-b=[32, 16]" in key_line


def test_the_command_prints_the_table_and_a_wrong_root_exits_2(tmp_path: Path):
    layout = Layout(str(tmp_path / "data"))
    write_run(layout, "only-run", epochs_done=6, status="finished")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "pneumonia.runs", "--root", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    header, row = done.stdout.splitlines()[:2]
    assert header.split()[:4] == ["run", "status", "model", "epochs"]
    assert row.startswith("only-run") and "finished" in row
    assert "config keys that differ" not in done.stdout  # one run: nothing to compare

    assert runs.main(["--root", str(tmp_path / "nothing-here")]) == 2
    assert runs.main(["--root", str(tmp_path / "data"), "--run", "other"]) == 2


def session_hparams(logdir: Path) -> dict:
    """The hparams of the HParams session written in `logdir` (what TensorBoard's HParams tab reads)."""
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    start = data.session_start_info
                    return {"_group": start.group_name,
                            **{key: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                               for key, v in start.hparams.items()}}
    raise AssertionError(f"no HParams session in {logdir}")


def test_hparams_session_holds_the_settings_and_test_metrics_land_beside_it(tmp_path: Path):
    config = load_config(None, ["train.run_id=r1", "train.learning_rate=0.003", "model.dense_units=[64]"])
    hparams.write_run_hparams(str(tmp_path / "tb"), "r1", config.to_dict())
    found = session_hparams(tmp_path / "tb")
    assert found["train.learning_rate"] == pytest.approx(0.003)
    assert found["model.dense_units"] == "[64]" and found["model.name"] == "efficientnetv2b0"
    assert found["model.mixed_precision"] == "null" and found["train.augment"] is True
    assert "data.root" not in found and "train.run_id" not in found

    metrics = {"accuracy": 0.9, "cohen_kappa": 0.8, "macro_f1": 0.85, "auc_macro": None,
               "binary": {"sensitivity": 0.95, "specificity": 0.7}, "calibration": {"ece": {"after": 0.05}}}
    hparams.write_test_metrics(str(tmp_path / "tb"), metrics)
    hparams.write_test_metrics(str(tmp_path / "tb"), {**metrics, "accuracy": 0.91})  # a re-evaluation replaces
    events = list((tmp_path / "tb" / "test").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = {value.tag: float(tf.make_ndarray(value.tensor))
               for event in tf.compat.v1.train.summary_iterator(str(events[0])) for value in event.summary.value}
    assert scalars == pytest.approx({"accuracy": 0.91, "cohen_kappa": 0.8, "macro_f1": 0.85, "sensitivity": 0.95,
                                     "specificity": 0.7, "ece": 0.05})
