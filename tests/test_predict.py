"""python -m pneumonia.predict: one JSON line per image, scored through the run's export (preprocessing
identical to the shards, calibrated), exit 2 for a missing run or export, or a bad image."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_evaluate import RUN_ID, make_run, read_test_records

from pneumonia import predict
from pneumonia.config import CLASS_NAMES
from pneumonia.data import demo, imaging
from pneumonia.evaluation import calibration
from pneumonia.layout import Layout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("predict"), seed=1)


def _save(path: Path, pixels: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    _save(folder / "b.jpeg", demo.render_image("virus", rng), "JPEG")
    _save(folder / "a.png", demo.render_image("normal", rng), "PNG")
    _save(folder / "nested" / "c.jpg", np.stack([demo.render_image("bacteria", rng)] * 3, axis=-1), "JPEG")  # RGB
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS fork")  # clutter that must be skipped
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_cli_prints_one_json_line_per_image(trained_run, image_folder):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "LOG_FORMAT": "json"}
    result = subprocess.run([sys.executable, "-m", "pneumonia.predict", trained_run.run_dir, str(image_folder),
                             "--batch-size", "2"], capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected_paths = [str(image_folder / "a.png"), str(image_folder / "b.jpeg"), str(image_folder / "nested" / "c.jpg")]
    assert [row["path"] for row in rows] == expected_paths

    shard = trained_run.config.shard
    images = np.stack([imaging.model_input(tf.constant(Path(p).read_bytes()), shard.image_height, shard.image_width,
                                           shard.channels, shard.encoding, fit=shard.fit).numpy()
                       for p in expected_paths])
    # The run's whole calibration (the class-weight prior correction and T), as the report applies it.
    fitted = calibration.load_calibration(Layout.of(trained_run.config), RUN_ID)
    want = fitted.apply(trained_run.model(images, training=False).numpy())
    for row, expected in zip(rows, want, strict=True):
        assert list(row["probabilities"]) == list(CLASS_NAMES)
        values = np.array(list(row["probabilities"].values()))
        assert values.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(values, expected, atol=1e-5)
        assert row["class"] == CLASS_NAMES[int(np.argmax(values))]


def test_images_are_prepared_exactly_as_the_shard_stage_prepares_them(trained_run):
    config = trained_run.config
    records = read_test_records(config)[:4]
    for record in records:
        source = str(Path(Layout.of(config).root) / record.source_path)
        prepared = imaging.model_input(tf.constant(Path(source).read_bytes()), 32, 32, 1, "png",
                                       fit=config.shard.fit).numpy()
        stored = imaging.to_float(imaging.decode_stored(tf.constant(record.image), 32, 32, 1)).numpy()
        np.testing.assert_array_equal(prepared, stored)  # PNG shards are lossless


def test_a_missing_run_or_export_exits_2_naming_the_path(tmp_path, image_folder, capsys):
    missing = tmp_path / "runs" / "nope"
    assert predict.main([str(missing), str(image_folder)]) == 2
    captured = capsys.readouterr()
    assert f"{missing}/model/1/saved_model.pb is missing" in captured.err
    assert captured.out == ""


def test_a_bad_image_or_path_exits_2_naming_it(trained_run, tmp_path, capsys):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    assert predict.main([trained_run.run_dir, str(broken)]) == 2
    assert str(broken) in capsys.readouterr().err
    assert predict.main([trained_run.run_dir, str(tmp_path / "absent")]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert predict.main([trained_run.run_dir, str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    mixed = tmp_path / "mixed"  # one bad file in a batch of good ones: the bad one is named
    mixed.mkdir()
    _save(mixed / "a.png", demo.render_image("normal", np.random.default_rng(0)), "PNG")
    (mixed / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert predict.main([trained_run.run_dir, str(mixed)]) == 2
    assert f"{mixed / 'b.png'} is not a decodable image" in capsys.readouterr().err


def test_a_run_dir_copied_elsewhere_still_predicts(trained_run, image_folder, tmp_path):
    copy = tmp_path / "my-run"
    shutil.copytree(trained_run.run_dir, copy)
    paths = predict.find_images(str(image_folder))
    assert list(predict.predict(str(copy), paths)) == list(predict.predict(trained_run.run_dir, paths))



def test_gradcam_writes_each_scored_images_heatmap(trained_run, image_folder, tmp_path, capsys):
    out_dir = tmp_path / "heatmaps"
    assert predict.main([trained_run.run_dir, str(image_folder), "--gradcam", str(out_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    written = sorted(path.name for path in out_dir.iterdir())
    assert written == ["a.png.gradcam.png", "b.jpeg.gradcam.png", "nested__c.jpg.gradcam.png"]
    for name in written:
        picture = Image.open(out_dir / name)
        assert picture.format == "PNG" and picture.width > picture.height  # the image beside its overlay
    single = tmp_path / "one"
    assert predict.main([trained_run.run_dir, str(image_folder / "b.jpeg"), "--gradcam", str(single)]) == 0
    assert [path.name for path in single.iterdir()] == ["b.jpeg.gradcam.png"]
