"""What a training worker does before it joins the cluster: bad settings and missing inputs never
reach a peer. Real worker processes with TF_CONFIG on 127.0.0.1, as in test_multiworker.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import test_train as helpers
from test_train import tiny_shards  # noqa: F401 - a fixture

from pneumonia.training.local_workers import loopback_tf_configs

JOINING = ("forming the cluster", "strategy")  # cluster.make_strategy's events: it contacts the peers


def start_workers(args: list[str], tf_configs: list[dict]) -> tuple[list[subprocess.Popen], list[helpers.LogTail]]:
    processes = [helpers.start_train(args, {**helpers.subprocess_env(), "TF_CONFIG": json.dumps(tf_config)})
                 for tf_config in tf_configs]
    return processes, [helpers.LogTail(process) for process in processes]


def stop_all(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def logged_so_far(tail: helpers.LogTail) -> list[dict]:
    return helpers.events("".join(tail.lines))


@pytest.mark.slow
def test_xla_forced_on_two_cpu_workers_exits_2_before_either_joins_the_cluster(tmp_path: Path):
    # No inputs at all and a long upstream wait: the check must come before the wait, not only
    # before the first step.
    args = helpers.job_args(str(tmp_path / "data"), "xla", "model.xla=true", "cluster.upstream_wait_timeout_s=600")
    started = time.monotonic()
    processes, tails = start_workers(args, loopback_tf_configs(2))
    try:
        codes = [process.wait(timeout=180) for process in processes]
    finally:
        stop_all(processes)
    assert codes == [2, 2]
    assert time.monotonic() - started < 180
    for tail in tails:
        logged = helpers.events(tail.text())
        refused = [e for e in logged if e.get("exit_code") == 2]
        assert refused and "model.xla" in refused[-1]["error"] and "RING" in refused[-1]["error"]
        assert not [e for e in logged if e.get("event") in JOINING or "waiting" in str(e.get("event"))]


@pytest.mark.slow
def test_a_worker_waits_for_its_inputs_before_it_contacts_any_peer(tiny_shards: Path, tmp_path: Path):
    root = str(tmp_path / "data")
    # Worker 1 of two, alone: its peer never starts, so trying to form the cluster would block.
    args = helpers.job_args(root, "early", "cluster.upstream_wait_timeout_s=600")
    processes, (tail,) = start_workers(args, loopback_tf_configs(2)[1:])
    try:
        tail.wait_for(lambda e: "waiting" in str(e.get("event")), timeout_s=120)
        assert not [e for e in logged_so_far(tail) if e.get("event") in JOINING]
        helpers.copy_shards(tiny_shards, root)  # the upstream stages finish
        tail.wait_for(lambda e: e.get("event") == "forming the cluster", timeout_s=120)
        assert processes[0].poll() is None  # now it waits for its peer, as it should
        names = [e.get("event") for e in logged_so_far(tail)]
        assert max(i for i, name in enumerate(names) if "waiting" in str(name)) < names.index("forming the cluster")
    finally:
        stop_all(processes)
