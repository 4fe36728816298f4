"""Two training workers on loopback (TF_CONFIG, MultiWorkerMirroredStrategy, RING on CPU).

Both finish with identical weights; only the chief writes; a SIGKILLed worker takes its peer down
and the restart resumes every worker from the last backup, on a local root and on gs://.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import tensorflow as tf
from test_train import (  # noqa: F401 - tiny_shards is a fixture
    PYTHON,
    REPO,
    LogTail,
    copy_shards,
    events,
    job_args,
    start_train,
    subprocess_env,
    tiny_shards,
)

from pneumonia.training import local_workers
from pneumonia.training.local_workers import loopback_tf_configs

PEER_EXIT_TIMEOUT_S = 90
RUN_TIMEOUT_S = 300


def launcher(args: list[str], env: dict[str, str], timeout_s: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pneumonia.training.local_workers", "--workers", "2",
                           "--timeout-s", str(timeout_s - 30), "--", *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize(("visible", "expected"), [
    ("", None),  # no GPU: the workers' environment is left alone
    ("-1", None),
    ("0", ["-1", "-1"]),  # one GPU for two workers: both on the CPU, never sharing it
    ("3,GPU-5f2c", ["3", "GPU-5f2c"]),  # one each, by the ids the machine gave
    ("0,1,2", ["0", "1"]),
])
def test_each_local_worker_gets_its_own_gpu_or_none(visible: str, expected: list[str] | None,
                                                     tmp_path: Path) -> None:
    entrypoint = tmp_path / "show_env.py"
    entrypoint.write_text("import json, os, sys\n"
                          "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
                          "open(sys.argv[1] + str(index), 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n")
    out = tmp_path / "gpu-of-worker-"
    processes = local_workers.launch(2, [str(out)], env={**os.environ, "CUDA_VISIBLE_DEVICES": visible},
                                     entrypoint=entrypoint)
    assert local_workers.supervise(processes, timeout_s=60) == 0
    seen = [(tmp_path / f"gpu-of-worker-{i}").read_text() for i in range(2)]
    assert seen == (expected or [visible, visible])


def by_worker(all_events: list[dict], event: str) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    for item in all_events:
        if item.get("event") == event:
            found.setdefault(item.get("worker"), []).append(item)
    return found


def read_json(path: str) -> dict:
    with tf.io.gfile.GFile(path) as handle:
        return json.load(handle)


@pytest.mark.slow
def test_two_workers_finish_in_sync_and_only_the_chief_writes(tiny_shards: Path, tmp_path: Path):
    root = str(tmp_path / "data")
    copy_shards(tiny_shards, root)
    result = launcher(job_args(root, "mw"), subprocess_env())
    assert result.returncode == 0, result.stderr[-4000:]
    logged = events(result.stderr)

    finished = by_worker(logged, "training finished")
    assert set(finished) == {0, 1}
    checksums = {worker: items[-1]["weights_sha256"] for worker, items in finished.items()}
    assert checksums[0] == checksums[1]

    run_dir = Path(root) / "runs" / "mw"
    marker = json.loads((run_dir / "_SUCCESS.json").read_text())
    assert marker["weights_sha256"] == checksums[0]
    assert marker["num_workers"] == 2 and marker["num_replicas"] == 2 and marker["global_batch_size"] == 16
    history = json.loads((run_dir / "history.json").read_text())
    assert history["strategy"] == "MultiWorkerMirroredStrategy" and history["num_workers"] == 2
    assert [r["epoch"] for r in history["epochs"]] == [0, 1, 2]
    # Only the chief wrote: its log alone says so, and no worker's scratch folder is left in the run.
    assert set(by_worker(logged, "model exported")) == {0}
    assert set(by_worker(logged, "best weights")) == {0}
    assert (run_dir / "checkpoints" / "best.weights.h5").is_file() and (run_dir / "model" / "1" / "saved_model.pb").is_file()
    assert not [p for p in run_dir.rglob("*") if "workertemp" in p.name or p.name.startswith(".tmp-")]


def kill_one_worker_after_a_backup(root: str, run_id: str, env: dict[str, str], extra: list[str]) -> int:
    """Starts two workers, SIGKILLs worker 1 after epoch >= 1 is backed up; returns the last backed-up epoch."""
    args = job_args(root, run_id, *extra)
    processes, tails = [], []
    for tf_config in loopback_tf_configs(2):
        processes.append(start_train(args, {**env, "TF_CONFIG": json.dumps(tf_config)}))
        tails.append(LogTail(processes[-1]))
    chief, other = processes
    try:
        tails[0].wait_for(lambda e: e.get("event") == "backup saved" and e.get("epoch", -1) >= 1, timeout_s=240)
        other.send_signal(signal.SIGKILL)
        other.wait(timeout=30)
        # The chief's next collective fails once its peer is gone; bound the wait, as the launcher does.
        deadline = time.monotonic() + PEER_EXIT_TIMEOUT_S
        while chief.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        chief_code = chief.poll()
        assert chief_code != 0  # it must not finish alone: it failed, or hangs (killed below)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    logged = max(e["epoch"] for e in events(tails[0].text()) if e.get("event") == "backup saved")
    # The kill can land after the chief wrote a newer backup but before it logged it: what resumes
    # is what is on disk, so read the epoch the backup itself holds.
    on_disk = backed_up_epoch(f"{root}/runs/{run_id}/backup")
    assert on_disk >= logged
    return on_disk


def backed_up_epoch(backup_root: str) -> int:
    """The last epoch saved in any phase's BackupAndRestore checkpoint (the chief's copy)."""
    saved = []
    for phase_dir in tf.io.gfile.listdir(backup_root):
        reader = tf.train.load_checkpoint(f"{backup_root}/{phase_dir.rstrip('/')}/chief")
        saved += [int(reader.get_tensor(key)) for key in reader.get_variable_to_shape_map()
                  if key.startswith("ckpt_saved_epoch/")]
    return max(saved)


def assert_resumes_after(root: str, run_id: str, env: dict[str, str], extra: list[str], last_backup: int) -> None:
    result = launcher(job_args(root, run_id, *extra), env)
    assert result.returncode == 0, result.stderr[-4000:]
    logged = events(result.stderr)
    first_epochs = {worker: items[0]["epoch"] for worker, items in by_worker(logged, "epoch begin").items()}
    # Every worker restarts at the epoch after the last backup, not at 0.
    assert first_epochs == {0: last_backup + 1, 1: last_backup + 1}
    finished = by_worker(logged, "training finished")
    assert finished[0][-1]["weights_sha256"] == finished[1][-1]["weights_sha256"]
    history = read_json(f"{root}/runs/{run_id}/history.json")
    assert [r["epoch"] for r in history["epochs"]] == [0, 1, 2, 3]  # earlier attempts' epochs kept
    assert history["complete"] is True
    assert tf.io.gfile.exists(f"{root}/runs/{run_id}/_SUCCESS.json")


# 4 epochs, warmup 1: the kill lands in the fine-tune phase, so the resume crosses the phase switch.
# (On a local folder, tests/test_faults.py kills, stops and preempts workers as the Indexed Job would.)
FAULT_ARGS = ["train.epochs=4", "train.warmup_epochs=1"]


@pytest.mark.slow
@pytest.mark.gcs
def test_sigkill_and_resume_with_the_run_on_gcs(tiny_shards: Path, gcs_emulator, gcs_root: str):  # noqa: ANN001
    copy_shards(tiny_shards, gcs_root)
    env = subprocess_env(gcs_emulator.env)
    last_backup = kill_one_worker_after_a_backup(gcs_root, "gcsfault", env, FAULT_ARGS)
    assert last_backup >= 1
    assert_resumes_after(gcs_root, "gcsfault", env, FAULT_ARGS, last_backup)
    # The best weights reached gs:// although h5py writes only local files.
    assert tf.io.gfile.exists(f"{gcs_root}/runs/gcsfault/checkpoints/best.weights.h5")


@pytest.mark.slow
def test_global_batch_not_divisible_by_the_replicas_exits_2(tiny_shards: Path, tmp_path: Path):
    root = str(tmp_path / "data")
    copy_shards(tiny_shards, root)
    # cluster.num_workers stays 1, so only the trainer (which counts the real replicas) can catch it.
    result = launcher(job_args(root, "oddbatch", "train.global_batch_size=9"), subprocess_env(), timeout_s=120)
    assert result.returncode == 2
    assert "train.global_batch_size" in result.stderr
    assert not os.path.exists(os.path.join(root, "runs", "oddbatch", "_SUCCESS.json"))
