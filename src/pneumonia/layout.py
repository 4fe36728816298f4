"""Where each stage reads and writes under `data.root` (a local folder or gs://bucket/prefix).

    raw/<archive>.zip
    interim/{normal,bacteria,virus}/<origin split>__<original name>
    interim/_SUCCESS.json
    splits/split.json
    processed/<H>x<W>x<C>/{train,val,test}-NNNNN-of-NNNNN.tfrecord
    processed/<H>x<W>x<C>/_SUCCESS.json
    runs/<run_id>/{config.yaml, checkpoints/, backup/, tensorboard/, history.json, model/, report/}
    runs/<run_id>/_SUCCESS.json, or _ENDED.json while it is stopped or failed for good
"""

from __future__ import annotations

from dataclasses import dataclass

from pneumonia import storage
from pneumonia.config import PipelineConfig

MARKER_NAME = "_SUCCESS.json"
# A run that ended without its marker: stopped on purpose or failed for good (pneumonia.training.run_end).
ENDED_NAME = "_ENDED.json"
CONFIG_NAME = "config.yaml"


@dataclass(frozen=True)
class Layout:
    root: str

    @classmethod
    def of(cls, config: PipelineConfig) -> Layout:
        return cls(config.data.root.rstrip("/"))

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
        return storage.join(self.root, "runs", run_id)

    def run_config(self, run_id: str) -> str:
        """The run's resolved config, written when training starts (a resume must match it)."""
        return storage.join(self.run(run_id), CONFIG_NAME)

    def checkpoints(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "checkpoints")

    def backup(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "backup")

    def tensorboard(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "tensorboard")

    def history(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "history.json")

    def model(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "model")

    def run_marker(self, run_id: str) -> str:
        return storage.join(self.run(run_id), MARKER_NAME)

    def run_ended(self, run_id: str) -> str:
        return storage.join(self.run(run_id), ENDED_NAME)

    def report(self, run_id: str) -> str:
        return storage.join(self.run(run_id), "report")

    def report_marker(self, run_id: str) -> str:
        return storage.join(self.report(run_id), MARKER_NAME)
