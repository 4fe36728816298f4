"""pneumonia.storage on both backends: a local folder and gs:// (fake-gcs-server behind the proxy).

Tests taking `any_root` run twice. Each gs:// request costs tens of ms through the proxy, so each
test does a few meaningful operations rather than many small ones.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from pathlib import Path

import google_crc32c
import pytest
import tensorflow as tf

from pneumonia import storage
from pneumonia.errors import BadInputError, UpstreamMissingError


def test_paths_join_and_split() -> None:
    assert storage.join("gs://b/p/", "/a/", "c.json") == "gs://b/p/a/c.json"
    assert storage.join("/tmp/x", "y") == "/tmp/x/y"
    assert storage.split_gcs("gs://bucket/a/b") == ("bucket", "a/b")
    assert storage.is_gcs("gs://b") and not storage.is_gcs("/gs://b")


def test_write_and_read_bytes_text_json(any_root: str) -> None:
    path = storage.join(any_root, "interim", "_SUCCESS.json")
    assert not storage.exists(path)
    payload = {"counts": {"normal": 3, "virus": 1}, "dropped": [], "note": "é"}
    storage.write_json(path, payload)
    assert storage.exists(path)
    assert storage.read_json(path) == payload
    blob = bytes(range(256)) * 10
    storage.write_bytes(storage.join(any_root, "raw.bin"), blob)
    assert storage.read_bytes(storage.join(any_root, "raw.bin")) == blob
    assert storage.size(storage.join(any_root, "raw.bin")) == len(blob)
    storage.write_text(storage.join(any_root, "a.txt"), "first")
    storage.write_text(storage.join(any_root, "a.txt"), "second")  # overwrite
    assert storage.read_text(storage.join(any_root, "a.txt")) == "second"


def test_listdir_glob_and_makedirs(any_root: str) -> None:
    storage.makedirs(storage.join(any_root, "splits"))  # a no-op on GCS, a folder locally
    for name in ("train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord", "val-00000-of-00001.tfrecord"):
        storage.write_bytes(storage.join(any_root, "processed", "8x8x1", name), b"x")
    storage.write_bytes(storage.join(any_root, "processed", "top.json"), b"{}")
    # Sub-folders come back without their trailing "/" (GCS lists them as "8x8x1/").
    assert storage.listdir(storage.join(any_root, "processed")) == ["8x8x1", "top.json"]
    assert storage.glob(storage.join(any_root, "processed", "8x8x1", "train-*.tfrecord")) == [
        storage.join(any_root, "processed", "8x8x1", f"train-0000{i}-of-00002.tfrecord") for i in (0, 1)]
    assert storage.listdir(storage.join(any_root, "missing")) == []
    if not storage.is_gcs(any_root):
        assert os.path.isdir(storage.join(any_root, "splits"))


def test_atomic_path_failure_leaves_neither_target_nor_temp(any_root: str) -> None:
    target = storage.join(any_root, "runs", "r1", "history.json")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_path(target) as temp:
            with tf.io.gfile.GFile(temp, "wb") as handle:
                handle.write(b"half")
            assert storage.exists(temp)  # the temp really existed, so its removal is what we test
            raise RuntimeError("boom")
    assert not storage.exists(target)
    assert storage.listdir(storage.join(any_root, "runs", "r1")) == []
    with storage.atomic_path(target) as temp:
        with tf.io.gfile.GFile(temp, "wb") as handle:
            handle.write(b"whole")
        assert not storage.exists(target)  # invisible until the block succeeds
    assert storage.read_bytes(target) == b"whole"
    assert storage.listdir(storage.join(any_root, "runs", "r1")) == ["history.json"]


def test_remove_and_remove_tree(any_root: str) -> None:
    tree = storage.join(any_root, "processed")
    files = [storage.join(tree, "a", "1.bin"), storage.join(tree, "a", "b", "2.bin"), storage.join(tree, "3.bin")]
    for path in files:
        storage.write_bytes(path, b"data")
    keep = storage.join(any_root, "keep.bin")
    storage.write_bytes(keep, b"keep")
    storage.remove(files[2])
    assert not storage.exists(files[2])
    storage.remove(files[2])  # removing what is gone is not an error
    storage.remove_tree(tree)
    # Files only: TF caches a GCS *folder's* existence for 5 s (GCS_STAT_CACHE_MAX_AGE), so
    # exists(tree) may stay True briefly after rmtree; the objects themselves are gone.
    assert not any(storage.exists(path) for path in files)
    assert storage.glob(storage.join(tree, "*")) == []
    assert storage.listdir(any_root) == ["keep.bin"]
    storage.remove_tree(storage.join(any_root, "never-existed"))  # no error


def test_sha256_file(any_root: str) -> None:
    data = os.urandom(300_000)
    path = storage.join(any_root, "blob.bin")
    storage.write_bytes(path, data)
    assert storage.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_create_if_absent_has_exactly_one_winner(any_root: str) -> None:
    path = storage.join(any_root, "processed", "_SUCCESS.json")
    assert storage.create_if_absent(path, b"first") is True
    assert storage.create_if_absent(path, b"second") is False
    assert storage.read_bytes(path) == b"first"

    # Two racers released together: one wins, the other sees the winner's bytes, never a mix.
    raced = storage.join(any_root, "raced", "_SUCCESS.json")
    barrier = threading.Barrier(2, timeout=30)
    results: dict[str, bool] = {}
    errors: list[BaseException] = []

    def racer(name: str) -> None:
        try:
            barrier.wait()
            results[name] = storage.create_if_absent(raced, name.encode() * 1000)
        except BaseException as error:  # noqa: BLE001 - re-raised below in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=racer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(results.values()) == [False, True], results
    winner = next(name for name, won in results.items() if won)
    assert storage.read_bytes(raced) == winner.encode() * 1000
    if not storage.is_gcs(any_root):
        assert os.listdir(os.path.dirname(raced)) == ["_SUCCESS.json"]  # no temp files left


def test_wait_for_returns_when_the_marker_appears(any_root: str) -> None:
    marker = storage.join(any_root, "interim", "_SUCCESS.json")
    writer = threading.Timer(0.3, storage.write_json, args=(marker, {"ok": True}))
    writer.start()
    try:
        started = time.monotonic()
        storage.wait_for(marker, timeout_s=30, what="the preprocess marker", poll_s=0.05)
        assert time.monotonic() - started < 20
        assert storage.read_json(marker) == {"ok": True}
    finally:
        writer.cancel()
        writer.join(timeout=10)


def test_wait_for_raises_naming_the_path(any_root: str) -> None:
    marker = storage.join(any_root, "splits", "_SUCCESS.json")
    started = time.monotonic()
    with pytest.raises(UpstreamMissingError) as caught:
        storage.wait_for(marker, timeout_s=0.3, what="the split manifest", poll_s=0.05)
    assert time.monotonic() - started < 10
    assert marker in str(caught.value) and "the split manifest" in str(caught.value)
    assert isinstance(caught.value, BadInputError)  # so the stage exits 2 and the Job does not retry
    with pytest.raises(UpstreamMissingError):
        storage.wait_for(marker, timeout_s=0, what="the split manifest")  # 0: fail at once


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


def test_upload_file_progress_skip_and_reupload(any_root: str, tmp_path: Path) -> None:
    local = tmp_path / "chest_xray.zip"
    data = os.urandom(3 * 1024 * 1024 + 12345)  # not a multiple of any chunk size
    local.write_bytes(data)
    url = storage.join(any_root, "raw", "chest_xray.zip")
    calls: list[tuple[int, int]] = []

    assert storage.upload_file(str(local), url, progress=lambda done, total: calls.append((done, total))) is True
    assert calls and calls[-1] == (len(data), len(data))
    assert all(total == len(data) for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert storage.read_bytes(url) == data
    if storage.is_gcs(url):
        bucket, name = storage.split_gcs(url)
        assert storage.gcs_client().bucket(bucket).get_blob(name).crc32c == _crc32c(data)

    calls.clear()
    assert storage.upload_file(str(local), url, progress=lambda done, total: calls.append((done, total))) is False
    assert calls == []  # skipped: nothing read, nothing sent

    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    local.write_bytes(bytes(changed))
    assert storage.upload_file(str(local), url) is True
    assert storage.read_bytes(url) == bytes(changed)


@pytest.mark.gcs
def test_tensorflow_reads_and_writes_gcs_through_the_proxy(gcs_root: str) -> None:
    """TF's own compiled-in client (not google-cloud-storage): gfile, TFRecords and tf.data."""
    shard = f"{gcs_root}/processed/8x8x1/train-00000-of-00001.tfrecord"
    records = [f"record-{i}".encode() * (i + 1) for i in range(20)]
    with tf.io.TFRecordWriter(shard) as writer:
        for record in records:
            writer.write(record)
    assert tf.io.gfile.exists(shard)
    assert tf.io.gfile.glob(f"{gcs_root}/processed/8x8x1/*.tfrecord") == [shard]
    assert [r.numpy() for r in tf.data.TFRecordDataset([shard])] == records
    # An empty object: TF's upload of no bytes is what the proxy must repair (its Transfer-Encoding).
    # Unrepaired, it stalls 10 s on curl's timeout and then succeeds by a retry: hence the clock.
    started = time.monotonic()
    with tf.io.gfile.GFile(f"{gcs_root}/empty", "wb") as handle:
        handle.write(b"")
    assert tf.io.gfile.stat(f"{gcs_root}/empty").length == 0
    assert time.monotonic() - started < 5
    # And google-cloud-storage sees what TF wrote: both clients share one emulator.
    bucket, name = storage.split_gcs(shard)
    assert storage.gcs_client().bucket(bucket).get_blob(name).size == tf.io.gfile.stat(shard).length


def test_identity_changes_with_the_bytes_and_is_none_when_missing(any_root: str) -> None:
    path = storage.join(any_root, "raw", "archive.zip")
    assert storage.identity(path) is None
    storage.write_bytes(path, b"first archive")
    first = storage.identity(path)
    assert first is not None and first == storage.identity(path)
    storage.write_bytes(path, b"second archive, longer")
    assert storage.identity(path) not in (None, first)


def test_find_mismatched_names_missing_short_and_changed_files(any_root: str) -> None:
    files = {"interim/a/one.png": b"first image", "interim/b/two.png": b"second", "splits/split.json": b"{}"}
    for path, data in files.items():
        storage.write_bytes(storage.join(any_root, path), data)
    expected = {path: (len(data), storage.crc32c(data)) for path, data in files.items()}
    assert storage.find_mismatched(any_root, expected) == {}
    storage.write_bytes(storage.join(any_root, "interim/a/one.png"), b"")  # what a lost upload left
    storage.remove(storage.join(any_root, "interim/b/two.png"))
    wrong = storage.find_mismatched(any_root, {**expected, "interim/c/three.png": (3, storage.crc32c(b"abc"))})
    assert wrong == {"interim/a/one.png": "0 bytes stored, 11 written", "interim/b/two.png": "missing",
                     "interim/c/three.png": "missing"}
    if storage.is_gcs(any_root):  # same size, other bytes: only the CRC32C tells (GCS keeps one per object)
        storage.write_bytes(storage.join(any_root, "splits/split.json"), b"[]")
        assert storage.find_mismatched(any_root, {"splits/split.json": expected["splits/split.json"]}) == {
            "splits/split.json": f"CRC32C {storage.crc32c(b'[]')} stored, {storage.crc32c(b'{}')} written"}


def test_copy_from_local_lands_the_same_bytes(any_root: str, tmp_path: Path) -> None:
    local = tmp_path / "model.weights.h5"
    local.write_bytes(os.urandom(50_000))
    target = storage.join(any_root, "runs/r/checkpoints/best.weights.h5")
    storage.copy_from_local(str(local), target)
    assert storage.read_bytes(target) == local.read_bytes()
    assert [name for name in storage.listdir(storage.join(any_root, "runs/r/checkpoints"))] == ["best.weights.h5"]
