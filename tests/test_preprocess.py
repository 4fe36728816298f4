"""The preprocess stage on the demo archive: outputs, manifest contract, marker, idempotence, modes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import config_for, make_demo_archive, minimal_entries, write_zip

from pneumonia import storage
from pneumonia.config import CLASS_NAMES, load_config
from pneumonia.data.preprocess import archive_changed, run
from pneumonia.errors import BadInputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_archive(tmp_path_factory) -> Path:
    return make_demo_archive(tmp_path_factory.mktemp("archive"), num_images=60, seed=0)


def _manifest(root: Path) -> dict:
    return json.loads((root / "splits" / "split.json").read_text())


def test_run_writes_interim_manifest_and_marker(tmp_path, demo_archive, capsys):
    root = tmp_path / "data"
    config = config_for(root, demo_archive)
    marker = run(config)

    manifest = _manifest(root)
    assert manifest["version"] == 1 and manifest["mode"] == "official" and manifest["seed"] == 42
    assert manifest["class_names"] == list(CLASS_NAMES)
    assert set(manifest["fractions"]) == {"val", "test", "small_train", "small_val"}
    rows = manifest["rows"]
    assert len(rows) == 60  # the nested duplicates and the clutter are gone
    assert [row["path"] for row in rows] == sorted(row["path"] for row in rows)
    assert {row["split"] for row in rows} <= {"train", "val", "test"}
    for row in rows:
        data = (root / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert row["label"] == CLASS_NAMES.index(row["class"])
        assert row["path"] == f"interim/{row['class']}/{row['origin_split']}__{row['path'].split('__', 1)[1]}"
        assert (row["split"] == "test") == (row["origin_split"] == "test")
    assert len({row["sha256"] for row in rows}) == len(rows)
    splits_of = {}
    for row in rows:
        splits_of.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of.values())
    on_disk = {str(p.relative_to(root)) for p in (root / "interim").rglob("*.jpeg")}
    assert on_disk == {row["path"] for row in rows}
    counts = manifest["counts"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) + sum(counts["test"].values()) == 60
    assert all(counts["train"][c] > 0 for c in CLASS_NAMES)
    assert set(manifest["class_weights"]) == set(CLASS_NAMES)

    on_disk_marker = json.loads((root / "interim" / "_SUCCESS.json").read_text())
    assert on_disk_marker == marker
    assert marker["archive_sha256"] == hashlib.sha256(demo_archive.read_bytes()).hexdigest()
    assert marker["num_duplicates"] > 0 and marker["num_clutter"] > 0 and marker["dropped"] == []
    assert marker["counts"] == counts
    assert load_config(root / "interim" / "config.yaml") == config
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # staging folder gone

    printed = capsys.readouterr().out
    assert "normal" in printed and "bacteria" in printed and "virus" in printed
    assert str(sum(counts["train"].values())) in printed


def test_rerun_with_same_input_does_nothing_and_changed_config_redoes(tmp_path, demo_archive):
    root = tmp_path / "data"
    run(config_for(root, demo_archive))
    marker_path = root / "interim" / "_SUCCESS.json"
    stamp = marker_path.stat().st_mtime_ns
    planted = root / "interim" / "normal" / "planted.txt"
    planted.write_text("left alone when already done")

    run(config_for(root, demo_archive, "train.epochs=2"))  # a key preprocess ignores
    assert marker_path.stat().st_mtime_ns == stamp
    assert planted.exists()

    marker = run(config_for(root, demo_archive, "split.seed=7"))
    assert not planted.exists()  # redone from a clean interim/, never mixed
    assert marker["config"]["split"]["seed"] == 7
    assert _manifest(root)["seed"] == 7


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("interim", "splits") for p in sorted((root / folder).rglob("*")) if p.is_file()}


def test_failed_rerun_keeps_the_previous_good_output(tmp_path, demo_archive):
    root = tmp_path / "data"
    marker = run(config_for(root, demo_archive))
    before = _snapshot(root)
    assert "interim/_SUCCESS.json" in before and "splits/split.json" in before
    entries = {name: data for name, data in minimal_entries().items() if "virus" not in name}
    bad = write_zip(tmp_path / "no-virus.zip", entries)
    with pytest.raises(BadInputError, match="no usable image of class virus"):
        run(config_for(root, bad))
    assert _snapshot(root) == before  # interim/, the manifest and the marker, byte for byte
    assert json.loads((root / "interim" / "_SUCCESS.json").read_text()) == marker
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # staging folder gone


def test_incomplete_previous_run_is_cleaned(tmp_path, demo_archive):
    root = tmp_path / "data"
    (root / "interim" / "virus").mkdir(parents=True)
    (root / "interim" / "virus" / "half-written.jpeg").write_bytes(b"\xff\xd8")
    (root / ".preprocess-tmp-deadbeef" / "interim").mkdir(parents=True)
    run(config_for(root, demo_archive))
    assert not (root / "interim" / "virus" / "half-written.jpeg").exists()
    assert not (root / ".preprocess-tmp-deadbeef").exists()
    assert (root / "interim" / "_SUCCESS.json").exists()


def test_pooled_mode_with_small_subsets(tmp_path):
    archive = make_demo_archive(tmp_path, num_images=150, seed=1)
    root = tmp_path / "data"
    run(config_for(root, archive, "split.mode=pooled", "split.val_fraction=0.15", "split.test_fraction=0.2",
                   "split.small_train_fraction=0.5"))
    manifest = _manifest(root)
    counts = manifest["counts"]
    assert manifest["mode"] == "pooled"
    assert sum(counts["unused"].values()) > 0
    test_origins = {row["origin_split"] for row in manifest["rows"] if row["split"] == "test"}
    assert "train" in test_origins  # pooled: test comes from everywhere
    num_test = sum(counts["test"].values())
    assert num_test / 150 == pytest.approx(0.2, abs=0.06)
    patients = {}
    for row in manifest["rows"]:
        patients.setdefault(row["patient"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in patients.values())


def test_archive_found_under_raw_when_not_set(tmp_path):
    make_demo_archive(tmp_path, num_images=30, seed=2)  # writes tmp_path/raw/demo-chest-xray.zip
    marker = run(config_for(tmp_path, ""))
    assert marker["archive"].endswith("raw/demo-chest-xray.zip")


def test_entrypoint_runs_the_demo_config(tmp_path, demo_archive):
    root = tmp_path / "data"
    command = [sys.executable, str(REPO / "jobs" / "preprocess.py"), "--config", str(REPO / "jobs/configs/demo.yaml"),
               "--set", f"data.root={root}", "--set", f"data.archive={demo_archive}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "LOG_FORMAT": "json"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preprocess done" in done.stderr
    assert "split" in done.stdout and "total" in done.stdout
    assert _manifest(root)["fractions"]["val"] == 0.15


@pytest.mark.gcs
def test_run_on_gcs_root(tmp_path, gcs_root):
    """data.root on gs://: the archive is read through GFile, outputs and the marker land in the bucket."""
    from pneumonia import storage

    archive = make_demo_archive(tmp_path, num_images=30, seed=4)
    assert storage.upload_file(str(archive), f"{gcs_root}/raw/demo-chest-xray.zip")
    config = config_for(gcs_root, "")  # found under raw/, as the cluster config does
    marker = run(config)

    assert storage.read_json(f"{gcs_root}/interim/_SUCCESS.json") == marker
    assert marker["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    manifest = storage.read_json(f"{gcs_root}/splits/split.json")
    assert len(manifest["rows"]) == 30
    row = manifest["rows"][0]
    assert hashlib.sha256(storage.read_bytes(f"{gcs_root}/{row['path']}")).hexdigest() == row["sha256"]
    assert sorted(storage.listdir(f"{gcs_root}/interim")) == ["_SUCCESS.json", "bacteria", "config.yaml",
                                                               "normal", "virus"]
    assert run(config) == marker  # already done: nothing rewritten


def test_a_known_archive_is_not_read_again_and_a_touched_one_only_updates_the_marker(tmp_path, demo_archive,
                                                                                    monkeypatch):
    root = tmp_path / "data"
    archive = tmp_path / "mine.zip"
    archive.write_bytes(demo_archive.read_bytes())
    first = run(config_for(root, archive))
    assert first["archive_identity"] == storage.identity(str(archive))
    before = _snapshot(root)

    def no_hashing(path: str) -> str:
        raise AssertionError(f"read {path} again although the marker names it with the same identity")

    with monkeypatch.context() as patched:
        patched.setattr(storage, "sha256_file", no_hashing)
        assert run(config_for(root, archive))["archive_sha256"] == first["archive_sha256"]

    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))  # same bytes, touched
    again = run(config_for(root, archive))
    assert again["archive_identity"] == storage.identity(str(archive)) != first["archive_identity"]
    assert again["archive_sha256"] == first["archive_sha256"]
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if not k.endswith("_SUCCESS.json")} == \
        {k: v for k, v in before.items() if not k.endswith("_SUCCESS.json")}  # nothing rebuilt


def test_a_replaced_archive_is_noticed_before_it_is_read(tmp_path, demo_archive):
    root = tmp_path / "data"
    archive = tmp_path / "mine.zip"
    archive.write_bytes(demo_archive.read_bytes())
    marker = run(config_for(root, archive))
    config = config_for(root, archive)
    assert archive_changed(marker, config) is None
    make_demo_archive(tmp_path / "other", num_images=30, seed=5).replace(archive)  # same path, new bytes
    assert archive_changed(marker, config) == (str(archive), storage.identity(str(archive)))
    archive.unlink()  # deleted once preprocessed: nothing to compare, the marker is trusted
    assert archive_changed(marker, config) is None
