"""The shard stage: planning, exact record sets, byte-identical reruns, parallel writers, resume, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pneumonia import storage
from pneumonia.config import CLASS_NAMES, PipelineConfig, load_config
from pneumonia.data import imaging, pipeline, shard, tfrecords
from pneumonia.data.demo import encode_jpeg
from pneumonia.errors import BadInputError, StorageError, UpstreamMissingError

REPO = Path(__file__).resolve().parents[1]
SIZE_DIR = "32x32x1"


# ------------------------------------------------------------------------------------ test inputs

def source_image(class_name: str, seed: int, rgb: bool = False) -> bytes:
    """A small JPEG of varied size and aspect ratio with a per-class pattern (bright, so padding shows)."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    y, x = np.mgrid[0:height, 0:width]
    base = 90 + 60 * x / width
    if class_name == "bacteria":
        base = base + 90 * (((x - width * 0.3) ** 2 + (y - height * 0.5) ** 2) < (min(height, width) * 0.2) ** 2)
    elif class_name == "virus":
        base = base + 60 * ((x // 4) % 2)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return encode_jpeg(pixels, rgb, quality=92)


DEFAULT_COUNTS = {"train": (7, 6, 4), "val": (2, 2, 1), "test": (2, 1, 2), "unused": (1, 1, 1)}


def make_interim(root: Path, counts: dict[str, tuple[int, int, int]] | None = None, seed: int = 0,
                 *marker_overrides: str) -> list[dict]:
    """interim/<class>/<split>__<name>.jpeg + splits/split.json + interim/_SUCCESS.json per docs/contracts.md.

    Default: 17 train images (uneven over shards), a few val/test ones and 3 `unused` ones. The marker
    records the split and data config as preprocess does (defaults plus `marker_overrides`).
    """
    counts = counts or DEFAULT_COUNTS
    rows = []
    number = 0
    for split, per_class in counts.items():
        for label, (class_name, count) in enumerate(zip(CLASS_NAMES, per_class, strict=True)):
            for _ in range(count):
                number += 1
                patient = f"person{number // 2 + 100 * label}"
                rel = f"interim/{class_name}/train__{patient}_{class_name}_{number}.jpeg"
                data = source_image(class_name, seed * 1000 + number, rgb=number % 7 == 0)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
                rows.append({"path": rel, "class": class_name, "label": label, "patient": patient, "split": split,
                             "origin_split": "train", "sha256": hashlib.sha256(data).hexdigest()})
    rows.sort(key=lambda row: row["path"])
    write_manifest(root, rows)
    write_interim_marker(root, len(rows), *marker_overrides)
    return rows


def write_interim_marker(root: Path, num_images: int, *marker_overrides: str) -> None:
    made_with = config_for(root, *marker_overrides)
    (root / "interim" / "_SUCCESS.json").write_text(json.dumps({"num_images": num_images, "config": {
        "data": dataclasses.asdict(made_with.data), "split": dataclasses.asdict(made_with.split)}}))


def write_manifest(root: Path, rows: list[dict]) -> None:
    table = {split: dict.fromkeys(CLASS_NAMES, 0) for split in ("train", "val", "test", "unused")}
    for row in rows:
        table[row["split"]][row["class"]] += 1
    manifest = {"version": 1, "mode": "official", "seed": 42,
                "fractions": {"val": 0.1, "test": 0.15, "small_train": 1.0, "small_val": 1.0},
                "class_names": list(CLASS_NAMES), "counts": table,
                "class_weights": dict.fromkeys(CLASS_NAMES, 1.0), "imbalance_ratio": 1.0, "rows": rows}
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "split.json").write_text(json.dumps(manifest, indent=1))


def overrides(root: Path | str, *extra: str) -> list[str]:
    # png: lossless, so these tests compare exact pixels; jpeg (the default) is tested where named.
    return [f"data.root={root}", "shard.image_height=32", "shard.image_width=32", "shard.min_shards_per_split=3",
            "shard.encoding=png", "shard.marker_wait_timeout_s=60", *extra]


def config_for(root: Path | str, *extra: str) -> PipelineConfig:
    return load_config(None, overrides(root, *extra))


def shard_digests(out_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out_dir.glob("*.tfrecord"))}


def read_all(out_dir: Path, split: str) -> list[tfrecords.Record]:
    marker = pipeline.read_marker(str(out_dir))
    return [tfrecords.decode_example(s) for path in pipeline.shard_paths(str(out_dir), split, marker)
            for s in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def run_job(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOG_FORMAT": "json"}
    env.pop("JOB_COMPLETION_INDEX", None)
    return subprocess.run([sys.executable, str(REPO / "jobs" / "shard.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict]:
    """One finished stage run (read-only for the tests that use it)."""
    root = tmp_path_factory.mktemp("sharded")
    rows = make_interim(root)
    marker = shard.run(config_for(root))
    return root, rows, marker


# ------------------------------------------------------------------------------------ planning

def test_num_shards_follows_size_minimum_workers_and_record_count() -> None:
    base = ["data.root=/x", "shard.image_height=100", "shard.image_width=100"]
    config = load_config(None, [*base, "shard.target_shard_bytes=100000", "shard.min_shards_per_split=2"])
    assert shard.num_shards_for(100, config) == 11  # 100 x (10,000 px + overhead) / 100 kB, rounded up
    assert shard.num_shards_for(3, config) == 2  # the minimum
    assert shard.num_shards_for(1, config) == 1  # never more files than records
    config = load_config(None, [*base, "cluster.num_workers=5", "shard.min_shards_per_split=2"])
    assert shard.num_shards_for(100, config) == 5  # a file for every training worker
    assert shard.num_shards_for(4, config) == 4
    # 11 by size with 3 workers: 12, so every worker reads as many files as the others.
    config = load_config(None, [*base, "shard.target_shard_bytes=100000", "cluster.num_workers=3"])
    assert shard.num_shards_for(100, config) == 12


def test_plan_deals_every_row_once_evenly_with_the_class_mix(tmp_path: Path) -> None:
    rows = [{"path": f"interim/{c}/{c}{i}.jpeg", "class": c, "label": CLASS_NAMES.index(c), "patient": f"p{i}",
             "split": "train"} for c, n in zip(CLASS_NAMES, (8, 6, 3), strict=True) for i in range(n)]
    rows.append({**rows[0], "path": "interim/normal/unused.jpeg", "split": "unused"})
    plans = shard.plan_shards(rows, config_for(tmp_path))
    assert [(p.split, p.shard_index, p.num_shards) for p in plans] == [("train", i, 3) for i in range(3)]
    assert [p.name for p in plans] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    dealt = [row["path"] for p in plans for row in p.rows]
    assert sorted(dealt) == sorted(r["path"] for r in rows if r["split"] == "train")  # unused never sharded
    assert sorted(len(p.rows) for p in plans) == [5, 6, 6]
    for p in plans:
        classes = [row["class"] for row in p.rows]
        assert set(classes) == set(CLASS_NAMES), classes
        assert classes != sorted(classes, key=CLASS_NAMES.index)  # shuffled inside the shard too
    other_seed = shard.plan_shards(rows, config_for(tmp_path, "split.seed=7"))
    assert [r["path"] for r in other_seed[0].rows] != [r["path"] for r in plans[0].rows]
    assert shard.plan_shards(list(reversed(rows)), config_for(tmp_path)) == plans  # input order does not matter


# ------------------------------------------------------------------------------------ the stage

def test_shards_hold_exactly_the_manifest_rows(sharded: tuple[Path, list[dict], dict]) -> None:
    root, rows, marker = sharded
    out_dir = root / "processed" / SIZE_DIR
    by_path = {row["path"]: row for row in rows}
    ratios = set()
    for split in ("train", "val", "test"):
        records = read_all(out_dir, split)
        expected = sorted(row["path"] for row in rows if row["split"] == split)
        assert sorted(r.source_path for r in records) == expected
        for record in records:
            row = by_path[record.source_path]
            assert (record.label, record.class_name, record.patient) == (row["label"], row["class"], row["patient"])
            assert (record.height, record.width, record.channels, record.image_format) == (32, 32, 1, "png")
            with Image.open(root / record.source_path) as source:
                assert (record.original_width, record.original_height) == source.size
                ratios.add(int(imaging.jpeg_scale_ratio(source.height, source.width, 32, 32)))
        assert marker["splits"][split]["num_records"] == len(expected)
    # Sources were decoded both in full and at 1/2 scale (and the sizes above are still the true ones);
    # the byte-identical rerun and parallel-writer tests below use these same shards.
    assert ratios == {1, 2}
    assert "unused" not in marker["splits"]
    train = [s for s in marker["shards"] if s["split"] == "train"]
    assert [s["name"] for s in train] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert sorted(s["num_records"] for s in train) == [5, 6, 6]  # 17 records
    for entry in marker["shards"]:
        path = out_dir / entry["name"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert marker["split_manifest"]["sha256"] == hashlib.sha256((root / "splits/split.json").read_bytes()).hexdigest()
    assert marker["image"] == {"height": 32, "width": 32, "channels": 1, "encoding": "png"}
    assert (out_dir / "roundtrip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(out_dir / "config.yaml").shard.image_height == 32  # the resolved config, next to outputs
    assert not list(out_dir.glob(".tmp-*"))


def test_rerun_is_already_done_and_a_fresh_run_is_byte_identical(sharded: tuple[Path, list[dict], dict],
                                                                 tmp_path: Path) -> None:
    root, _, marker = sharded
    out_dir = root / "processed" / SIZE_DIR
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert shard.run(config_for(root)) == marker
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before  # nothing rewritten

    copy = tmp_path / "copy"
    shutil.copytree(root / "interim", copy / "interim")
    shutil.copytree(root / "splits", copy / "splits")
    shard.run(config_for(copy))
    assert shard_digests(copy / "processed" / SIZE_DIR) == shard_digests(out_dir)


def test_restarted_worker_rewrites_only_the_missing_shard(tmp_path: Path) -> None:
    make_interim(tmp_path)
    config = config_for(tmp_path)
    shard.run(config)
    out_dir = tmp_path / "processed" / SIZE_DIR
    digests = shard_digests(out_dir)
    # A worker that died after writing train-00001 but before its sidecar, and before the marker.
    (out_dir / "_SUCCESS.json").unlink()
    (out_dir / ".train-00001-of-00003.tfrecord.json").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.tfrecord")}
    shard.run(config)
    assert shard_digests(out_dir) == digests
    changed = {p.name for p in out_dir.glob("*.tfrecord") if p.stat().st_mtime_ns != mtimes[p.name]}
    assert changed == {"train-00001-of-00003.tfrecord"}
    assert (out_dir / "_SUCCESS.json").exists()


def test_changed_config_redoes_cleanly(tmp_path: Path) -> None:
    make_interim(tmp_path)
    shard.run(config_for(tmp_path))
    out_dir = tmp_path / "processed" / SIZE_DIR
    marker = shard.run(config_for(tmp_path, "shard.min_shards_per_split=2", "shard.encoding=jpeg"))
    assert marker["image"]["encoding"] == "jpeg"
    names = sorted(p.name for p in out_dir.glob("*.tfrecord"))
    assert names == sorted(s["name"] for s in marker["shards"])  # the 3-shard files of the old plan are gone
    assert "train-00000-of-00002.tfrecord" in names
    assert sorted(p.name for p in out_dir.glob(".*.json")) == sorted(f".{n}.json" for n in names)
    assert {r.image_format for r in read_all(out_dir, "train")} == {"jpeg"}
    assert marker["roundtrip"]["min_psnr_db"] >= 35.0
    # A changed manifest (one row moved to `unused`) is also a redo.
    manifest = json.loads((tmp_path / "splits/split.json").read_text())
    moved = next(row for row in manifest["rows"] if row["split"] == "val")
    moved["split"] = "unused"
    write_manifest(tmp_path, manifest["rows"])
    marker = shard.run(config_for(tmp_path, "shard.min_shards_per_split=2", "shard.encoding=jpeg"))
    assert moved["path"] not in {r.source_path for r in read_all(out_dir, "val")}
    assert marker["splits"]["val"]["num_records"] == 4


def test_bad_inputs_name_the_file_row_or_field(tmp_path: Path) -> None:
    with pytest.raises(UpstreamMissingError, match="interim/_SUCCESS.json"):
        shard.run(config_for(tmp_path))
    rows = make_interim(tmp_path, counts={"train": (2, 2, 2)})
    broken = rows[3]["path"]
    (tmp_path / broken).write_bytes(b"")  # what an upload that met a 503 left on GCS ("Input is empty")
    # Not what preprocess wrote (the manifest's sha256 says so): damaged in storage, retryable.
    with pytest.raises(StorageError, match=f"interim image .*{broken} differs from the split manifest's sha256.*"
                                           "rerun the preprocess stage"):
        shard.run(config_for(tmp_path))
    assert not (tmp_path / "processed" / SIZE_DIR / "_SUCCESS.json").exists()
    (tmp_path / broken).write_bytes(b"this is not an image")
    rows[3]["sha256"] = hashlib.sha256(b"this is not an image").hexdigest()
    write_manifest(tmp_path, rows)
    # What preprocess vouched for, and it does not decode: bad input.
    with pytest.raises(BadInputError, match=f"cannot read image .*{broken}"):
        shard.run(config_for(tmp_path))
    (tmp_path / broken).unlink()
    with pytest.raises(StorageError, match=f"{broken} is missing"):
        shard.run(config_for(tmp_path))
    rows[1]["label"] = 2  # class says otherwise
    write_manifest(tmp_path, rows)
    with pytest.raises(BadInputError, match=r"row 1 .*label 2"):
        shard.run(config_for(tmp_path))
    del rows[1]["patient"]
    write_manifest(tmp_path, rows)
    with pytest.raises(BadInputError, match=r"row 1: field 'patient'"):
        shard.run(config_for(tmp_path))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_shard_is_detected_by_checksum(sharded: tuple[Path, list[dict], dict], tmp_path: Path,
                                                 damage: str) -> None:
    root = tmp_path / "root"
    shutil.copytree(sharded[0], root)
    victim = root / "processed" / SIZE_DIR / "val-00001-of-00003.tfrecord"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-100:]
    victim.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=f"shard .*{victim.name} .*(sha256|truncated).*rerun the shard stage"):
        shard.run(config_for(root))
    with pytest.raises(StorageError, match=victim.name):
        pipeline.verify_shards(str(root / "processed" / SIZE_DIR))


# ------------------------------------------------------------------------------------ as processes

def test_job_exit_codes_and_parallel_workers_match_one(sharded: tuple[Path, list[dict], dict], tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    missing = run_job(*[f"--set={o}" for o in overrides(root)])
    assert missing.returncode == 2, missing.stderr
    assert "_SUCCESS.json" in missing.stderr

    shutil.copytree(sharded[0] / "interim", root / "interim")
    shutil.copytree(sharded[0] / "splits", root / "splits")
    env = {**os.environ, "LOG_FORMAT": "json"}
    env.pop("JOB_COMPLETION_INDEX", None)
    workers = [subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "shard.py"),
         *[f"--set={o}" for o in overrides(root, f"shard.index={i}", "shard.num_workers=2")]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for i in (0, 1)]
    results = [worker.communicate(timeout=240) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], results
    out_dir = root / "processed" / SIZE_DIR
    assert shard_digests(out_dir) == shard_digests(sharded[0] / "processed" / SIZE_DIR)
    marker = json.loads((out_dir / "_SUCCESS.json").read_text())
    assert marker["written_by_worker"] in (0, 1)
    logs = results[0][1] + results[1][1]
    assert logs.count('"event": "marker written"') == 1  # exactly one worker wrote it

    again = run_job(*[f"--set={o}" for o in overrides(root)])
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stderr
    victim = out_dir / "train-00002-of-00003.tfrecord"
    victim.write_bytes(victim.read_bytes()[:-10])
    corrupted = run_job(*[f"--set={o}" for o in overrides(root)])
    assert corrupted.returncode == 1  # damaged in storage: retryable, never bad input
    assert victim.name in corrupted.stderr and "rerun the shard stage" in corrupted.stderr


# ------------------------------------------------------------------------------------ gs://

@pytest.mark.gcs
def test_shard_and_read_on_gcs(gcs_root: str, tmp_path: Path) -> None:
    """The same stage and pipeline code on gs:// (fake-gcs-server on loopback); few files, as each costs."""
    from pneumonia import storage

    local = tmp_path / "local"
    rows = make_interim(local, counts={"train": (2, 2, 1), "val": (1, 1, 1)})
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with tf.io.gfile.GFile(storage.join(gcs_root, str(path.relative_to(local))), "wb") as handle:
            handle.write(path.read_bytes())
    config = config_for(gcs_root, "shard.min_shards_per_split=1")
    marker = shard.run(config)
    processed_dir = storage.join(gcs_root, "processed", SIZE_DIR)
    assert storage.listdir(processed_dir) == sorted([
        ".train-00000-of-00001.tfrecord.json", ".val-00000-of-00001.tfrecord.json", "_SUCCESS.json",
        "config.yaml", "roundtrip.png", "train-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord"])
    dataset = pipeline.make_dataset(processed_dir, "train", 8, training=False, config=config, with_metadata=True)
    images, labels, meta = next(dataset.as_numpy_iterator())
    assert images.shape == (5, 32, 32, 1) and labels.sum() == 5
    assert sorted(p.decode() for p in meta["source_path"]) == sorted(r["path"] for r in rows if r["split"] == "train")
    # Byte-identical to the same stage on a local folder, and a rerun on gs:// is "already done".
    local_marker = shard.run(config_for(local, "shard.min_shards_per_split=1"))
    assert [s["sha256"] for s in marker["shards"]] == [s["sha256"] for s in local_marker["shards"]]
    assert shard.run(config) == marker


# ------------------------------------------------------------------------------------ review fixes

def test_marker_records_the_manifest_sha256_and_a_recomputable_fingerprint(
        sharded: tuple[Path, list[dict], dict]) -> None:
    root, _, marker = sharded
    on_disk = json.loads((root / "processed" / SIZE_DIR / "_SUCCESS.json").read_text())
    manifest_sha256 = hashlib.sha256((root / "splits/split.json").read_bytes()).hexdigest()
    assert on_disk["split_manifest_sha256"] == manifest_sha256 == marker["split_manifest_sha256"]
    assert on_disk["fingerprint"] == shard.compute_fingerprint(manifest_sha256, config_for(root))
    assert shard.compute_fingerprint(manifest_sha256, config_for(root, "shard.encoding=jpeg")) != on_disk["fingerprint"]
    assert shard.compute_fingerprint("0" * 64, config_for(root)) != on_disk["fingerprint"]


def test_old_sidecars_with_the_same_names_do_not_count_as_other_workers_shards(tmp_path: Path) -> None:
    rows = make_interim(tmp_path)
    shard.run(config_for(tmp_path))  # png, one worker
    out_dir = tmp_path / "processed" / SIZE_DIR
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("*.tfrecord")}
    jpeg = ("shard.encoding=jpeg", "shard.num_workers=2")
    plans = shard.plan_shards(rows, config_for(tmp_path, *jpeg))
    assert sorted(plan.name for plan in plans) == sorted(before)  # same names: only the encoding changed
    mine = {plan.name for position, plan in enumerate(plans) if position % 2 == 0}

    with pytest.raises(TimeoutError, match="still missing"):
        shard.run(config_for(tmp_path, *jpeg, "shard.index=0", "shard.marker_wait_timeout_s=0"))
    assert not (out_dir / "_SUCCESS.json").exists()
    changed = {name for name, stamp in before.items() if (out_dir / name).stat().st_mtime_ns != stamp}
    assert changed == mine  # worker 1's shards are left to worker 1

    marker = shard.run(config_for(tmp_path, *jpeg, "shard.index=1"))
    assert marker["written_by_worker"] == 1 and marker["image"]["encoding"] == "jpeg"
    assert {r.image_format for split in ("train", "val", "test") for r in read_all(out_dir, split)} == {"jpeg"}


def test_shard_refuses_an_interim_marker_made_with_another_split_config(tmp_path: Path) -> None:
    make_interim(tmp_path, {"train": (2, 2, 2)}, 0, "split.seed=1")
    with pytest.raises(BadInputError, match=r"interim/ was made with split\.seed=1 but this config has split\.seed=2"
                                            r".*rerun preprocess"):
        shard.run(config_for(tmp_path, "split.seed=2", "cluster.upstream_wait_timeout_s=0"))
    assert not (tmp_path / "processed").exists()
    marker = shard.run(config_for(tmp_path, "split.seed=1", "cluster.upstream_wait_timeout_s=0"))
    assert marker["splits"]["train"]["num_records"] == 6

    (tmp_path / "interim" / "_SUCCESS.json").write_text(json.dumps({"num_images": 6}))  # records no config
    with pytest.raises(BadInputError, match=r"split\.seed=<not recorded>"):
        shard.run(config_for(tmp_path, "split.seed=1"))


def test_shard_waits_while_the_interim_marker_is_from_the_old_config(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """kubectl apply after a config change: the old marker is there until preprocess replaces it."""
    make_interim(tmp_path, {"train": (2, 2, 2)}, 0, "split.mode=pooled")
    monkeypatch.setattr(shard, "_UPSTREAM_POLL_S", 0.05)
    replaced = threading.Timer(1.0, write_interim_marker, (tmp_path, 6))  # default split: this config's
    replaced.start()
    try:
        started = time.monotonic()
        marker = shard.run(config_for(tmp_path, "cluster.upstream_wait_timeout_s=60"))
    finally:
        replaced.join()
    assert time.monotonic() - started >= 1.0
    assert marker["splits"]["train"]["num_records"] == 6


def test_shard_refuses_interim_made_from_an_archive_replaced_since(tmp_path: Path) -> None:
    """kubectl apply after uploading another archive: the old marker stays while preprocess hashes the new one."""
    make_interim(tmp_path, {"train": (2, 2, 2)})
    archive = tmp_path / "raw" / "chest_xray.zip"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"PK the archive preprocess read")
    marker_path = tmp_path / "interim" / "_SUCCESS.json"
    made = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**made, "archive": str(archive),
                                       "archive_identity": storage.identity(str(archive))}))
    archive.write_bytes(b"PK another archive, uploaded over it")
    with pytest.raises(BadInputError, match=rf"interim/ was made with the archive={archive} \(mtime_ns=.*rerun "
                                            "preprocess"):
        shard.run(config_for(tmp_path, f"data.archive={archive}", "cluster.upstream_wait_timeout_s=0"))
    assert not (tmp_path / "processed").exists()


def test_the_writer_takes_records_in_batches_yet_an_unreadable_one_fails_at_its_own_place(tmp_path: Path) -> None:
    # The writer reads the decode pipeline a batch at a time; a bad source fails its whole batch, and
    # the records before it in that batch must still come out, in order, before the error.
    paths = []
    for index in range(5):
        path = tmp_path / f"{index}.jpeg"
        path.write_bytes(encode_jpeg(np.full((40, 30), 40 * index, np.uint8), rgb=False))
        paths.append(str(path))
    (tmp_path / "3.jpeg").write_bytes(b"this is not an image")

    def load(path: tf.Tensor) -> tuple:
        resized, original_height, original_width = imaging.load_resized(tf.io.read_file(path), 32, 32, 1, fit="pad")
        return imaging.encode(resized, "png"), original_height, original_width

    records = shard._encoded_records(paths, load)  # noqa: SLF001 - the writer's own reader
    for index in range(3):
        image, height, width = next(records)
        assert (height, width) == (40, 30)
        assert imaging.decode_stored(image, 32, 32, 1).numpy()[16, 16, 0] == 40 * index
    with pytest.raises(tf.errors.InvalidArgumentError):
        next(records)
    good = shard._encoded_records(paths[:3] + paths[4:], load)  # noqa: SLF001
    assert [height for _, height, _ in good] == [40, 40, 40, 40]
