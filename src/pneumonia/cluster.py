"""The one module that knows the cluster: TF_CONFIG, JOB_COMPLETION_INDEX, who is chief, the strategy.

Nothing else in the project reads these environment variables; stages ask this module.
"""

from __future__ import annotations

import json
import os


def completion_index() -> int | None:
    """This pod's index in a Kubernetes Indexed Job, or None outside one."""
    value = os.environ.get("JOB_COMPLETION_INDEX")
    return int(value) if value not in (None, "") else None


def worker_index() -> int:
    """This process's rank: TF_CONFIG's task index, else the Indexed Job's index, else 0."""
    tf_config = os.environ.get("TF_CONFIG")
    if tf_config:
        task = json.loads(tf_config).get("task", {})
        return int(task.get("index", 0))
    index = completion_index()
    return index if index is not None else 0
