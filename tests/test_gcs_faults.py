"""Storage faults on gs://: seeded 503/429 answers and connection resets, for both GCS clients.

What must hold: every fault is retried or repaired, no stage certifies an output that is not
there, and a storage fault never ends as "bad input" (exit 2). Each stage runs as its job
subprocess with TensorFlow's production retry count (GCS_RETRY_CONFIG_MAX_RETRIES=10, TF's
default; the other tests use 2 so that a failing request gives up in seconds).
"""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_faults import FaultPlan
from structlog.testing import capture_logs
from test_train import PYTHON, REPO, TINY, subprocess_env

from pneumonia import storage
from pneumonia.config import load_config
from pneumonia.data import preprocess, shard
from pneumonia.data.demo import make_demo_archive
from pneumonia.layout import EXPORT_VERSION
from pneumonia.training import export

pytestmark = pytest.mark.gcs

PRODUCTION_RETRIES = {"GCS_RETRY_CONFIG_MAX_RETRIES": "10"}
SIZE_DIR = "32x32x1"
NUM_IMAGES = 96  # each gs:// request costs ~70 ms through the proxy: keep the data tiny
PIPELINE_ARGS = [*TINY, "train.epochs=1", "train.warmup_epochs=0"]
# With this seed and rate 0.3 the shard stage's first upload PUT (its first shard) meets a 503 and
# the status query after it does not: the emulator then stores that shard empty. The draws are
# keyed by request (gcs_faults.FaultPlan), and shard uploads come from one thread, in order.
SHARD_FAULT_SEED = 0
# With this seed and rate 0.5, only upload PUTs failing, the first three uploads meet a 503 and the
# status query after each does not: each ends as a complete EMPTY object that TF reports as written.
# The fourth upload goes through.
EMPTY_THRICE_SEED = 235


def run_stage(name: str, args: list[str], env: dict[str, str], timeout_s: int) -> subprocess.CompletedProcess:
    argv = [PYTHON, str(REPO / "jobs" / f"{name}.py")]
    for item in args:
        argv += ["--set", item]
    return subprocess.run(argv, env=subprocess_env({**env, **PRODUCTION_RETRIES}), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


def shard_checksums(processed_dir: str) -> dict[str, str]:
    marker = storage.read_json(storage.join(processed_dir, "_SUCCESS.json"))
    return {entry["name"]: entry["sha256"] for entry in marker["shards"]}


def test_fault_plan_is_seeded_and_fails_about_its_rate(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps({"seed": 3, "rate": 0.2, "kinds": {"503": 1, "429": 1, "reset": 1}}))
    requests = [("GET", f"/storage/v1/b/bucket/o/image-{i % 50}") for i in range(2000)]
    plan, again = FaultPlan(tmp_path, "tensorflow"), FaultPlan(tmp_path, "tensorflow")
    decisions = [plan.decide(*request) for request in requests]
    assert decisions == [again.decide(*request) for request in requests]  # same seed, same faults
    counts = collections.Counter(decisions)
    assert 300 < sum(counts[kind] for kind in ("503", "429", "reset")) < 500, counts  # about 20 % of 2000
    assert min(counts["503"], counts["429"], counts["reset"]) > 80, counts
    (tmp_path / "plan.json").write_text(json.dumps({"seed": 4, "rate": 0.2, "kinds": {"503": 1}}))
    assert [plan.decide(*request) for request in requests] != decisions  # another seed, other requests
    (tmp_path / "plan.json").unlink()
    assert {plan.decide(*request) for request in requests} == {None}  # off without a plan


def test_both_clients_meet_the_faults_and_they_are_counted(gcs_emulator, gcs_root: str) -> None:  # noqa: ANN001
    from google.api_core import exceptions as gcs_errors

    bucket_name, name = storage.split_gcs(f"{gcs_root}/object")
    blob = storage.gcs_client().bucket(bucket_name).blob(name)
    with gcs_emulator.faults(seed=1, rate=1.0, kinds={"429": 1}) as counts:
        with pytest.raises(gcs_errors.TooManyRequests):
            blob.upload_from_string(b"x", retry=None)
        with pytest.raises(Exception, match="429"):  # TF retries (twice in tests), then gives up
            storage.read_bytes(f"{gcs_root}/object")
    # TF tries three times (GCS_RETRY_CONFIG_MAX_RETRIES=2); the upload's own retries run before retry=None.
    assert counts["429 google-cloud-storage"] >= 1 and counts["429 tensorflow"] >= 3, counts
    with gcs_emulator.faults(seed=1, rate=1.0, kinds={"reset": 1}) as counts:
        with pytest.raises(Exception, match="(?i)connection"):
            blob.upload_from_string(b"x", retry=None)
    assert set(counts) == {"reset google-cloud-storage"}, counts
    # Off again (the default): both clients work, and nothing more is counted.
    before = gcs_emulator.injected()
    blob.upload_from_string(b"x")
    assert storage.read_bytes(f"{gcs_root}/object") == b"x"
    assert gcs_emulator.injected() == before


def test_a_file_stored_empty_three_times_is_written_again_after_a_pause_until_stored(  # noqa: ANN001
        gcs_emulator, gcs_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sequence that failed the evaluate stage (issue 19): report.md stored empty by three writes in a
    row, each checked at once by a reread through TF's client, then StorageError ("4508 bytes written,
    0 stored"). Now each check is one metadata request (size, CRC32C), and rewrites wait 1, 2, 4 x the
    backoff, so storage that fails a burst of uploads is given time."""
    monkeypatch.setattr(storage, "REWRITE_BACKOFF_S", 0.01, raising=False)
    data = b"# report\n" + b"x" * 4498 + b"\n"
    path = f"{gcs_root}/report/report.md"
    with capture_logs() as logged, gcs_emulator.faults(seed=EMPTY_THRICE_SEED, rate=0.5, kinds={"503": 1},
                                                       only="PUT /upload/") as counts:
        storage.write_bytes(path, data)
    assert counts == {"503 tensorflow": 3}, counts
    differs = [e for e in logged if e["event"].startswith("stored file differs")]
    assert [(e["attempt"], e["bytes_written"], e["bytes_stored"]) for e in differs] == \
        [(1, 4508, 0), (2, 4508, 0), (3, 4508, 0)]
    assert [e["next_write_in_s"] for e in differs] == [0.01, 0.02, 0.04]
    bucket, name = storage.split_gcs(path)
    assert storage.gcs_client().bucket(bucket).blob(name).download_as_bytes() == data  # nothing lost
    assert storage.read_bytes(path) == data


@pytest.mark.slow
def test_preprocess_rewrites_images_whose_upload_a_503_left_empty(gcs_emulator, gcs_root: str,  # noqa: ANN001
                                                                  tmp_path: Path) -> None:
    archive = make_demo_archive(str(tmp_path / "demo.zip"), num_images=48, seed=0)
    args = [f"data.root={gcs_root}", f"data.archive={archive}", *TINY]
    # Only upload PUTs fail: after one, the emulator (fake-gcs-server) stores the object complete and
    # EMPTY, and TensorFlow's writer reports success (what the issue measured).
    # 15 %: about 8 of the ~54 uploads fail (some leave an empty object), while an image failing its
    # first write and all 3 rewrites is a 0.15^4 chance (~0.3 % for the whole run).
    with gcs_emulator.faults(seed=5, rate=0.15, kinds={"503": 1}, only="PUT /upload/") as counts:
        result = run_stage("preprocess", args, gcs_emulator.env, timeout_s=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert counts["503 tensorflow"] > 0, counts
    assert "interim images differ from what was written; rewriting them" in result.stderr
    manifest = storage.read_json(f"{gcs_root}/splits/split.json")
    for row in manifest["rows"]:
        stored = storage.read_bytes(f"{gcs_root}/{row['path']}")
        assert hashlib.sha256(stored).hexdigest() == row["sha256"], row["path"]
    print(f"\npreprocess survived {sum(counts.values())} injected faults: {dict(counts)}")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # four TF subprocesses at ~70 ms per gs:// request, plus the retries' backoff
def test_whole_pipeline_on_gcs_with_faults_matches_a_fault_free_run(gcs_emulator, gcs_root: str,  # noqa: ANN001
                                                                      tmp_path: Path) -> None:
    """preprocess -> shard -> train (1 epoch) -> evaluate on gs://, 3 % of TF's requests failing (25 % of
    google-cloud-storage's)."""
    archive = make_demo_archive(str(tmp_path / "demo.zip"), num_images=NUM_IMAGES, seed=0)
    reference = load_config(None, [f"data.root={tmp_path / 'reference'}", f"data.archive={archive}", *PIPELINE_ARGS])
    preprocess.run(reference)  # fault-free (local: the same bytes as gs://, see test_shard_and_read_on_gcs)
    shard.run(reference)

    args = [f"data.root={gcs_root}", f"data.archive={gcs_root}/raw/demo.zip", "train.run_id=faults",
            *PIPELINE_ARGS]
    seconds = {}
    # google-cloud-storage sends few requests here (the archive upload, listings, identities, the
    # shard marker): a higher rate of its own makes it meet faults too.
    with gcs_emulator.faults(seed=7, rate=0.03, rates={"google-cloud-storage": 0.25}) as counts:
        storage.upload_file(archive, f"{gcs_root}/raw/demo.zip")  # as the launcher does, faults included
        for name, timeout_s in (("preprocess", 240), ("shard", 240), ("train", 300), ("evaluate", 240)):
            started = time.monotonic()
            result = run_stage(name, args, gcs_emulator.env, timeout_s)
            seconds[name] = round(time.monotonic() - started)
            assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr[-4000:]}"

    assert storage.read_bytes(f"{gcs_root}/splits/split.json") == \
        (tmp_path / "reference" / "splits" / "split.json").read_bytes()
    processed = f"processed/{SIZE_DIR}"
    assert shard_checksums(f"{gcs_root}/{processed}") == shard_checksums(str(tmp_path / "reference" / processed))
    report = storage.read_json(f"{gcs_root}/runs/faults/report/metrics.json")
    manifest = storage.read_json(f"{gcs_root}/splits/split.json")
    assert report["num_images"] == sum(manifest["counts"]["test"].values())
    # The export was uploaded under the same faults, and the run marker vouches for it: it must load
    # from the bucket and serve what evaluate scored.
    rows = [json.loads(line) for line in
            storage.read_text(f"{gcs_root}/runs/faults/report/predictions.jsonl").splitlines()[:4]]
    served = export.ServedModel(f"{gcs_root}/runs/faults/model/{EXPORT_VERSION}")
    probabilities, _ = served([storage.read_bytes(storage.join(gcs_root, row["path"])) for row in rows])
    assert np.allclose(probabilities, [list(row["probabilities"].values()) for row in rows], atol=1e-5)
    kinds = {kind: sum(n for key, n in counts.items() if key.startswith(kind)) for kind in ("503", "429", "reset")}
    clients = {client: sum(n for key, n in counts.items() if key.endswith(client))
               for client in ("tensorflow", "google-cloud-storage")}
    print(f"\nthe pipeline survived {sum(counts.values())} injected faults: {dict(sorted(counts.items()))}; "
          f"seconds per stage: {seconds}")
    assert min(kinds.values()) > 0 and min(clients.values()) > 0, counts


@pytest.mark.slow
def test_shard_writes_again_a_shard_an_upload_fault_left_short(gcs_emulator, gcs_root: str,  # noqa: ANN001
                                                               tmp_path: Path) -> None:
    archive = make_demo_archive(str(tmp_path / "demo.zip"), num_images=48, seed=0)
    reference = load_config(None, [f"data.root={tmp_path / 'reference'}", f"data.archive={archive}", *TINY])
    preprocess.run(reference)
    shard.run(reference)
    args = [f"data.root={gcs_root}", f"data.archive={archive}", *TINY]
    assert run_stage("preprocess", args, gcs_emulator.env, timeout_s=240).returncode == 0
    with gcs_emulator.faults(seed=SHARD_FAULT_SEED, rate=0.3, kinds={"503": 1}, only="PUT /upload/") as counts:
        result = run_stage("shard", args, gcs_emulator.env, timeout_s=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "shards stored with another size than written; writing them again" in result.stderr, counts
    processed = f"processed/{SIZE_DIR}"
    assert shard_checksums(f"{gcs_root}/{processed}") == shard_checksums(str(tmp_path / "reference" / processed))
    print(f"\nshard survived {sum(counts.values())} injected faults: {dict(counts)}")
