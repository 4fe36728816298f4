"""The round-trip check catches label flips, inverted images and lost records, and fails the stage (exit 2)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import tensorflow as tf
from test_shard import SIZE_DIR, config_for, make_interim

from pneumonia.config import CLASS_NAMES
from pneumonia.data import roundtrip, shard, tfrecords
from pneumonia.errors import BadInputError, StorageError

# Every image of the tiny data set is sampled, so any tampered record is among those compared.
ALL = "shard.roundtrip_samples_per_class=50"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rt")
    make_interim(root, counts={"train": (4, 3, 3), "val": (1, 1, 1), "test": (1, 1, 1)})
    return root, shard.run(config_for(root, ALL))


@pytest.fixture()
def copy(sharded: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    shutil.copytree(sharded[0], tmp_path / "root")
    return tmp_path / "root", sharded[1]


def rows_of(root: Path) -> list[dict]:
    return [r for r in json.loads((root / "splits/split.json").read_text())["rows"] if r["split"] != "unused"]


def rewrite_shard(out_dir: Path, name: str, change: Callable[[tfrecords.Record], tfrecords.Record | None]) -> str:
    """Applies `change` to the shard's first record (None drops it) and re-seals the sidecar, as if the
    writer itself had produced the bad record; returns that record's source path."""
    path = out_dir / name
    records = [tfrecords.decode_example(s) for s in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()]
    victim = records[0].source_path
    changed = change(records[0])
    records = ([changed] if changed else []) + records[1:]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(tfrecords.encode_example(record))
    sidecar = out_dir / tfrecords.sidecar_name(name)
    meta = json.loads(sidecar.read_text())
    meta.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                num_records=len(records))
    sidecar.write_text(json.dumps(meta))
    return victim


def flip_label(record: tfrecords.Record) -> tfrecords.Record:
    label = (record.label + 1) % len(CLASS_NAMES)
    return tfrecords.Record(**{**record.__dict__, "label": label, "class_name": CLASS_NAMES[label]})


def invert(record: tfrecords.Record) -> tfrecords.Record:
    pixels = tf.io.decode_png(record.image, channels=record.channels)
    return tfrecords.Record(**{**record.__dict__, "image": tf.io.encode_png(255 - pixels).numpy()})


def test_check_passes_and_draws_the_pairs(copy: tuple[Path, dict]) -> None:
    root, marker = copy
    out_dir = root / "processed" / SIZE_DIR
    (out_dir / roundtrip.PLOT_NAME).unlink()
    summary = roundtrip.check(str(out_dir), marker["shards"], rows_of(root), config_for(root, ALL), str(root))
    assert summary["num_records_checked"] == 16
    assert summary["num_images_compared"] == 16
    plot = tf.io.decode_png((out_dir / roundtrip.PLOT_NAME).read_bytes()).numpy()
    assert plot.shape[0] > 400 and plot.shape[1] > 800 and plot.std() > 10  # a drawn grid, not a blank page
    assert red_pixels(out_dir / roundtrip.PLOT_NAME) == 0  # every caption black: all labels agree


def red_pixels(path: Path) -> int:
    """How many pixels of the plot are caption red (a pair whose stored label disagrees)."""
    plot = tf.io.decode_png(path.read_bytes(), channels=3).numpy().astype(int)
    return int(((plot[..., 0] > 180) & (plot[..., 1] < 90) & (plot[..., 2] < 90)).sum())


def test_sampling_is_per_split_and_class_and_stable(copy: tuple[Path, dict]) -> None:
    rows = rows_of(copy[0])
    picked = roundtrip.sample_rows(rows, 2, seed=42)
    groups = [(r["split"], r["class"]) for r in picked]
    assert sorted(set(groups)) == sorted({(r["split"], r["class"]) for r in rows})
    assert groups.count(("train", "normal")) == 2 and groups.count(("val", "virus")) == 1
    assert roundtrip.sample_rows(list(reversed(rows)), 2, seed=42) == picked
    assert roundtrip.sample_rows(rows, 2, seed=1) != picked


@pytest.mark.parametrize("tamper, message", [(flip_label, "but the manifest says"), (invert, "pixels differ")])
def test_check_catches_a_label_flip_and_an_inverted_image(copy: tuple[Path, dict], tamper: Callable,
                                                          message: str) -> None:
    root, marker = copy
    out_dir = root / "processed" / SIZE_DIR
    name = next(s["name"] for s in marker["shards"] if s["split"] == "train")
    victim = rewrite_shard(out_dir, name, tamper)
    with pytest.raises(BadInputError, match=message) as caught:
        roundtrip.check(str(out_dir), marker["shards"], rows_of(root), config_for(root, ALL), str(root))
    assert name in str(caught.value) and victim in str(caught.value)
    flagged = red_pixels(out_dir / roundtrip.PLOT_NAME)
    assert flagged > 0 if tamper is flip_label else flagged == 0  # the flipped pair is captioned in red


def test_check_catches_a_lost_record(copy: tuple[Path, dict]) -> None:
    root, marker = copy
    out_dir = root / "processed" / SIZE_DIR
    victim = rewrite_shard(out_dir, "val-00000-of-00003.tfrecord", lambda record: None)
    with pytest.raises(BadInputError, match=f"1 manifest rows are in no shard, e.g. {victim}"):
        roundtrip.check(str(out_dir), marker["shards"], rows_of(root), config_for(root, ALL), str(root))


def test_jpeg_is_held_to_the_psnr_floor(tmp_path: Path) -> None:
    make_interim(tmp_path, counts={"train": (2, 2, 2)})
    marker = shard.run(config_for(tmp_path, ALL, "shard.encoding=jpeg"))
    assert 35.0 <= marker["roundtrip"]["min_psnr_db"] < 80.0  # lossy, but close
    out_dir = tmp_path / "processed" / SIZE_DIR
    strict = config_for(tmp_path, ALL, "shard.encoding=jpeg", "shard.roundtrip_min_psnr_db=99")
    with pytest.raises(BadInputError, match="below shard.roundtrip_min_psnr_db"):
        roundtrip.check(str(out_dir), marker["shards"], rows_of(tmp_path), strict, str(tmp_path))


def test_a_failed_check_fails_the_stage_and_leaves_no_marker(copy: tuple[Path, dict]) -> None:
    root, marker = copy
    out_dir = root / "processed" / SIZE_DIR
    (out_dir / "_SUCCESS.json").unlink()
    victim = rewrite_shard(out_dir, "test-00001-of-00003.tfrecord", flip_label)
    with pytest.raises(BadInputError, match=victim) as caught:
        shard.run(config_for(root, ALL))
    assert caught.value.exit_code == 2
    assert not (out_dir / "_SUCCESS.json").exists()
    assert (out_dir / roundtrip.PLOT_NAME).exists()  # drawn for people even on failure


def test_jpeg_shards_catch_an_inverted_image_by_psnr(tmp_path: Path) -> None:
    make_interim(tmp_path, counts={"train": (2, 2, 2)})
    marker = shard.run(config_for(tmp_path, ALL, "shard.encoding=jpeg"))
    out_dir = tmp_path / "processed" / SIZE_DIR
    name = next(s["name"] for s in marker["shards"] if s["split"] == "train")

    def invert_jpeg(record: tfrecords.Record) -> tfrecords.Record:
        pixels = tf.io.decode_jpeg(record.image, channels=record.channels)
        return tfrecords.Record(**{**record.__dict__, "image": tf.io.encode_jpeg(255 - pixels, quality=95).numpy()})

    victim = rewrite_shard(out_dir, name, invert_jpeg)
    with pytest.raises(BadInputError, match="below shard.roundtrip_min_psnr_db") as caught:
        roundtrip.check(str(out_dir), marker["shards"], rows_of(tmp_path),
                        config_for(tmp_path, ALL, "shard.encoding=jpeg"), str(tmp_path))
    assert name in str(caught.value) and victim in str(caught.value)


def test_check_names_a_shard_holding_a_foreign_record(copy: tuple[Path, dict]) -> None:
    root, marker = copy
    out_dir = root / "processed" / SIZE_DIR
    path = out_dir / next(s["name"] for s in marker["shards"] if s["split"] == "val")
    kept = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    with tf.io.TFRecordWriter(str(path)) as writer:
        for serialized in [*kept, tf.train.Example().SerializeToString()]:  # a record without our keys
            writer.write(serialized)
    with pytest.raises(BadInputError, match=f"shard {path} cannot be read") as caught:
        roundtrip.check(str(out_dir), marker["shards"], rows_of(root), config_for(root, ALL), str(root))
    assert caught.value.exit_code == 2


def test_a_shard_cut_short_in_storage_is_a_retryable_storage_error(copy: tuple[Path, dict]) -> None:
    root, marker = copy
    out_dir = root / "processed" / SIZE_DIR
    path = out_dir / next(s["name"] for s in marker["shards"] if s["split"] == "val")
    path.write_bytes(path.read_bytes()[:-7])  # what a short upload leaves: the last record's tail is missing
    with pytest.raises(StorageError, match=f"shard {path} cannot be read back") as caught:
        roundtrip.check(str(out_dir), marker["shards"], rows_of(root), config_for(root, ALL), str(root))
    assert caught.value.exit_code == 1


def test_the_plot_boxes_what_the_crop_keeps_of_each_film(copy: tuple[Path, dict]) -> None:
    # A 100 x 150 film in a 64 x 64 shard: letterboxed to 43 x 64 (rows 10-52); the crop keeps its
    # middle two thirds (a 43-row square), padding keeps it all.
    assert roundtrip.kept_box(100, 150, 64, 64, "crop") == pytest.approx((10, 64 / 6, 43, 64 * 2 / 3))
    assert roundtrip.kept_box(100, 150, 64, 64, "pad") == (10, 0, 43, 64)
    assert roundtrip.kept_caption(100, 150, 64, 64, "crop") == "film: keeps 67 % of its width"
    assert roundtrip.kept_caption(150, 100, 64, 64, "crop") == "film: keeps 67 % of its height"
    assert roundtrip.kept_caption(100, 150, 64, 64, "pad") == "film: all kept, bars added"
    root, marker = copy
    out_dir = root / "processed" / SIZE_DIR
    roundtrip.check(str(out_dir), marker["shards"], rows_of(root), config_for(root, ALL), str(root))
    plot = tf.io.decode_png((out_dir / roundtrip.PLOT_NAME).read_bytes(), channels=3).numpy().astype(int)
    orange = (plot[..., 0] > 220) & (plot[..., 1] > 130) & (plot[..., 1] < 200) & (plot[..., 2] < 60)
    assert orange.sum() > 16 * 100  # a box around the kept part of every film drawn
