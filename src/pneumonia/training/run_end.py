"""The train stage as jobs/train.py runs it: fit.run, leaving runs/<run_id>/_ENDED.json
(pneumonia.run_ended) when the run stops on purpose or fails for good."""

from __future__ import annotations

from typing import Any

from pneumonia import cluster, storage
from pneumonia.config import PipelineConfig
from pneumonia.errors import BadInputError
from pneumonia.layout import Layout
from pneumonia.run_ended import FAILED, STOPPED, record_end
from pneumonia.training import fit


def train(config: PipelineConfig) -> dict[str, Any] | None:
    """fit.run, leaving the run's _ENDED.json when it stops on purpose or fails for good (jobs/train.py)."""
    layout = Layout.of(config)
    run_id = config.train.run_id
    is_chief = cluster.worker_index() == 0
    if is_chief and run_id:
        storage.remove(layout.run_ended(run_id))  # resuming: the run has not ended (yet)
    try:
        done = fit.run(config)
    except BadInputError as error:
        # Any worker: exit 2 on one index fails the whole Job. A finished run stays finished.
        if run_id and not storage.exists(layout.run_marker(run_id)):
            record_end(layout, run_id, FAILED, str(error))
        raise
    if done is None and is_chief:
        record_end(layout, run_id, STOPPED, f"train.max_epochs_this_process={config.train.max_epochs_this_process} "
                                            "reached before the last epoch; run the train stage again to resume")
    return done
