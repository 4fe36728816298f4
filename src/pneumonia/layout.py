"""Where each stage reads and writes under `data.root` (a local folder or gs://bucket/prefix).

    raw/<archive>.zip
    interim/{normal,bacteria,virus}/<origin split>__<original name>
    interim/_SUCCESS.json
    splits/split.json
    processed/<H>x<W>x<C>/{train,val,test}-NNNNN-of-NNNNN.tfrecord
    processed/<H>x<W>x<C>/_SUCCESS.json
    runs/<run_id>/{config.yaml, checkpoints/best.weights.h5, backup/, tensorboard/, history.json,
                   calibration.json, model/1/, report/}
    runs/<run_id>/_SUCCESS.json, or _ENDED.json while it is stopped or failed for good
"""

from __future__ import annotations

from dataclasses import dataclass

from pneumonia import storage
from pneumonia.config import PipelineConfig

MARKER_NAME = "_SUCCESS.json"
# A run that ended without its marker: stopped on purpose or failed for good (pneumonia.run_ended).
ENDED_NAME = "_ENDED.json"
CONFIG_NAME = "config.yaml"
BEST_WEIGHTS_NAME = "best.weights.h5"
# TF Serving (and KServe's TensorFlow runtime) load <base path>/<integer version>/: a run exports once.
EXPORT_VERSION = "1"


@dataclass(frozen=True)
class Layout:
    root: str
    # Where run dirs live when not under root/runs: a run dir copied elsewhere (of_run_dir).
    runs_root: str | None = None

    @classmethod
    def of(cls, config: PipelineConfig) -> Layout:
        return cls(config.data.root.rstrip("/"))

    @classmethod
    def of_run_dir(cls, run_dir: str) -> tuple[Layout, str]:
        """(layout, run_id) for a run dir given by path (runs/<run_id>, or a copy of one anywhere)."""
        runs_root, _, run_id = run_dir.rstrip("/").rpartition("/")
        parent = runs_root.rpartition("/")[0] if runs_root.endswith("/runs") else runs_root
        return cls(parent, runs_root or "."), run_id

    @property
    def raw(self) -> str:
        return storage.join(self.root, "raw")

    @property
    def interim(self) -> str:
        return storage.join(self.root, "interim")

    @property
    def interim_marker(self) -> str:
        return storage.join(self.interim, MARKER_NAME)

    @property
    def split_manifest(self) -> str:
        return storage.join(self.root, "splits", "split.json")

    def processed(self, size_dir: str) -> str:
        return storage.join(self.root, "processed", size_dir)

    def processed_marker(self, size_dir: str) -> str:
        return storage.join(self.processed(size_dir), MARKER_NAME)

    def run(self, run_id: str) -> str:
        return storage.join(self.runs_root or storage.join(self.root, "runs"), run_id)

    def run_config(self, run_id: str) -> str:
        """The run's resolved config, written when training starts (a resume must match it)."""
        return storage.join(self.run(run_id), CONFIG_NAME)

    def checkpoints(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "checkpoints")

    def best_weights(self, run_id: str) -> str:
        """The best-val_cohen_kappa weights: what evaluate scores and the export holds."""
        return storage.join(self.checkpoints(run_id), BEST_WEIGHTS_NAME)

    def calibration(self, run_id: str) -> str:
        """The calibration fitted on val at the end of training (pneumonia.evaluation.calibration)."""
        return storage.join(self.run(run_id), "calibration.json")

    def backup(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "backup")

    def tensorboard(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "tensorboard")

    def history(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "history.json")

    def model(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "model")

    def saved_model(self, run_id: str) -> str:
        """The export itself (a SavedModel), version EXPORT_VERSION under the base path model()."""
        return storage.join(self.model(run_id), EXPORT_VERSION)

    def run_marker(self, run_id: str) -> str:
        return storage.join(self.run(run_id), MARKER_NAME)

    def run_ended(self, run_id: str) -> str:
        return storage.join(self.run(run_id), ENDED_NAME)

    def report(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "report")

    def report_marker(self, run_id: str) -> str:
        return storage.join(self.report(run_id), MARKER_NAME)
