"""What Kueue's eviction does to the workers themselves: it suspends the train Job, and the Job
controller deletes every pod at once, without a DisruptionTarget condition (tests/cluster/test_kueue.py
shows both on the real controllers). Each worker gets SIGTERM at the same moment, mid-epoch.

Two real workers (TF_CONFIG on 127.0.0.1) of the tiny config, through tests/indexed_job.py as in
test_faults.py: both must save the backup at the same step and exit 143, and the workers started
again (Kueue readmitting the Job) must resume at that step.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from test_faults import ends, start_job, wait_for_epoch
from test_train import tiny_shards  # noqa: F401

from pneumonia.errors import EXIT_PREEMPTED

START_TIMEOUT_S = 600
END_TIMEOUT_S = 900


@pytest.mark.slow
def test_every_worker_sigtermed_at_once_saves_at_the_same_step_and_resumes_there(
        tiny_shards: Path, tmp_path: Path):  # noqa: F811
    job, root = start_job(tiny_shards, tmp_path, "suspend")
    try:
        wait_for_epoch(job, 1)
        for index in (0, 1):  # the Job controller deleting a suspended Job's pods: SIGTERM to all, no condition
            pod = job.current(index)
            pod.preempted_at = time.monotonic()  # SIGKILL after the grace period if it does not stop
            pod.process.send_signal(signal.SIGTERM)
        job.run_to_end(START_TIMEOUT_S + END_TIMEOUT_S)
    finally:
        job.terminate()
        print(job.summary())
    assert ends(job, 0) == ends(job, 1) == [(EXIT_PREEMPTED, "Ignore")], job.summary()
    assert all(job.attempts(i)[0].rule == 2 for i in (0, 1))  # by exit code 143: no DisruptionTarget here
    stops = [next(e for e in job.attempts(i)[0].events() if e.get("event") == "stop requested (SIGTERM): backup saved")
             for i in (0, 1)]
    assert (stops[0]["epoch"], stops[0]["step"]) == (stops[1]["epoch"], stops[1]["step"]), job.summary()
    assert stops[0]["epoch"] >= 1
    # Started again, both resume from that backup: inside epoch 1 when the stop came mid-epoch.
    resumed = [next(e for e in job.current(i).events() if e.get("event") == "epoch begin") for i in (0, 1)]
    assert [e["epoch"] for e in resumed] == [stops[0]["epoch"]] * 2, job.summary()
    assert job.status == "Complete", job.summary()
