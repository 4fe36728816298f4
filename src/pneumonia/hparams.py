"""TensorBoard HParams summaries, so that TensorBoard pointed at runs/ compares runs in its HParams tab.

Each run's tensorboard/ folder is one HParams session: the chief writes the run's settings there at
training start (hparams), Keras writes the per-epoch scalars under train/ and validation/, and
evaluate writes the test-set headline under test/ (replaced on every evaluation, so a rerun does
not stack duplicates).

    tensorboard --logdir data/demo/runs
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from pneumonia import storage

TEST_GROUP = "test"
# What the HParams table shows beside the settings: the last epoch's validation numbers (written by
# Keras's TensorBoard callback as epoch_<metric> under validation/) and the test-set report's headline.
VALIDATION_METRICS = ("epoch_cohen_kappa", "epoch_accuracy", "epoch_loss")
TEST_METRICS = ("accuracy", "cohen_kappa", "macro_f1", "auc_macro", "sensitivity", "specificity", "ece")
# Settings that say where the data lives, or name the run, not what is trained.
_NOT_HPARAMS = ("data.", "train.run_id")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 6}} -> {"train.epochs": 6}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def hparam_values(config_tree: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The settings as HParams accepts them (bool, number or string): lists and null as JSON text."""
    values = {}
    for key, value in flatten(config_tree).items():
        if key.startswith(_NOT_HPARAMS):
            continue
        values[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return values


def write_run_hparams(logdir: str, run_id: str, config_tree: Mapping[str, Any]) -> None:
    """The run's settings and the metrics to compare, as an HParams session in `logdir` (chief only)."""
    values = hparam_values(config_tree)
    metrics = ([hp.Metric(tag, group="validation", display_name=f"val {tag.removeprefix('epoch_')}")
                for tag in VALIDATION_METRICS]
               + [hp.Metric(tag, group=TEST_GROUP, display_name=f"test {tag}") for tag in TEST_METRICS])
    storage.makedirs(logdir)
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        hp.hparams_config(hparams=[hp.HParam(key) for key in values], metrics=metrics)
        hp.hparams(values, trial_id=run_id)
    writer.close()


def headline_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The test-set numbers TEST_METRICS names, from metrics.json's content (those that are defined)."""
    binary = metrics.get("binary") or {}
    ece = (metrics.get("calibration") or {}).get("ece", {}).get("after")
    found = {key: metrics.get(key) for key in ("accuracy", "cohen_kappa", "macro_f1", "auc_macro")}
    found.update(sensitivity=binary.get("sensitivity"), specificity=binary.get("specificity"), ece=ece)
    return {key: float(value) for key, value in found.items() if value is not None}


def write_test_metrics(logdir: str, metrics: Mapping[str, Any]) -> None:
    """The report's headline as scalars under `logdir`/test/, replacing an earlier evaluation's."""
    folder = storage.join(logdir, TEST_GROUP)
    storage.remove_tree(folder)
    storage.makedirs(folder)
    writer = tf.summary.create_file_writer(folder)
    with writer.as_default():
        for tag, value in headline_scalars(metrics).items():
            tf.summary.scalar(tag, value, step=0)
    writer.close()
