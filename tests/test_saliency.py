"""Grad-CAM and the shortcut check: the split model reproduces both networks' outputs, the content box
is the shard stage's own, border shares and warnings follow their definitions, and the demo archive
plants a shortcut on request. End to end (slow): a planted shortcut is named, the plain demo is not."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from PIL import Image
from test_end_to_end import stage

from pneumonia.config import ModelConfig
from pneumonia.data import demo, imaging
from pneumonia.evaluation import saliency
from pneumonia.model import zoo


@pytest.mark.parametrize("name, input_size, activation", [("small_cnn", 64, "relu3"), ("small_cnn", 32, "relu3"),
                                                          ("efficientnetv2b0", 32, "top_activation")])
def test_the_split_model_gives_the_networks_own_outputs_from_the_last_activation(name, input_size, activation):
    # 64 -> 64: the backbone takes the model's input as is; 64x48 -> 32: through the resize layer;
    # EfficientNetV2B0: a nested keras.applications model behind gray-to-RGB and rescaling.
    height, width = (64, 64) if input_size == 64 else (64, 48)
    model = zoo.build_model(ModelConfig(name=name, weights="none", trainable="full", input_size=input_size,
                                        dense_units=(8,)), (height, width, 1))
    backbone = model.get_layer(zoo.BACKBONE_LAYER)
    assert saliency.last_conv_activation(backbone).name == activation
    images = tf.random.stateless_uniform((3, height, width, 1), seed=(1, 2))
    conv, logits = saliency.split_at_last_activation(model)(images)
    assert conv.shape == (3, *backbone.get_layer(activation).output.shape[1:])
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), model(images, training=False).numpy(), atol=1e-6)

    heatmaps = saliency.build_gradcam(model)(images, tf.constant([0, 1, 2])).numpy()
    assert heatmaps.shape == (3, height, width)
    assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0


def test_gradcam_follows_the_logit_of_the_class_asked_for():
    # Two channels, each a blob in its own corner; the backbone passes them through (a 1x1 identity
    # conv and a ReLU), and class k's logit is channel k's mean. Class k's map must be channel k's blob.
    layers = keras.layers
    inputs = keras.Input((8, 8, 2))
    trunk = keras.Sequential([keras.Input((8, 8, 2)), layers.Conv2D(2, 1, use_bias=False, name="conv"),
                              layers.ReLU(name="relu")], name=zoo.BACKBONE_LAYER)
    pooled = layers.GlobalAveragePooling2D(name="pool")(trunk(inputs))
    model = keras.Model(inputs, layers.Dense(2, activation="softmax", name="probabilities")(pooled))
    trunk.get_layer("conv").set_weights([np.eye(2, dtype=np.float32).reshape(1, 1, 2, 2)])
    model.get_layer("probabilities").set_weights([np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    image = np.zeros((8, 8, 2), np.float32)
    image[:3, :3, 0] = 1.0  # top left
    image[5:, 5:, 1] = 1.0  # bottom right
    heatmaps = saliency.build_gradcam(model)(tf.constant(np.stack([image, image])), tf.constant([0, 1])).numpy()
    np.testing.assert_allclose(heatmaps[0], image[..., 0], atol=1e-6)
    np.testing.assert_allclose(heatmaps[1], image[..., 1], atol=1e-6)


def test_the_content_box_is_where_the_shard_stage_puts_the_image():
    for original_height, original_width in ((40, 100), (300, 120), (64, 64)):
        white = np.full((original_height, original_width), 255, np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(white).save(buffer, format="PNG")
        resized, _, _ = imaging.load_resized(tf.constant(buffer.getvalue()), 64, 64, 1, fit="pad")
        rows, columns = np.nonzero(resized.numpy()[..., 0])
        box = saliency.content_box(original_height, original_width, 64, 64)
        assert box == (rows.min(), columns.min(), rows.max() - rows.min() + 1, columns.max() - columns.min() + 1)


def test_border_share_counts_the_outer_band_of_the_content_and_ignores_the_padding():
    box = (12, 0, 40, 64)  # a wide film: 12 padding rows above and below
    uniform = np.zeros((64, 64))
    uniform[12:52, :] = 1.0
    # band: 6 rows top and bottom, 10 columns left and right -> inner 28 x 44 of 40 x 64
    assert saliency.border_share(uniform, box) == pytest.approx(1 - (28 * 44) / (40 * 64))
    padding_too = uniform.copy()
    padding_too[:12, :] = 5.0  # mass in the padding changes nothing
    assert saliency.border_share(padding_too, box) == saliency.border_share(uniform, box)
    corner = np.zeros((64, 64))
    corner[12:16, 0:6] = 1.0
    assert saliency.border_share(corner, box) == 1.0
    centre = np.zeros((64, 64))
    centre[28:36, 28:36] = 1.0
    assert saliency.border_share(centre, box) == 0.0
    assert saliency.border_share(np.zeros((64, 64)), box) is None
    faint_rest = np.full((64, 64), 0.3)
    faint_rest[12:16, 0:6] = 1.0  # a peak in the corner over a faint film: the peak is what counts
    assert saliency.border_share(faint_rest, box) == 1.0


def test_a_warning_needs_the_threshold_and_a_margin_over_the_other_classes():
    warnings = saliency.shortcut_warnings({"normal": 0.30, "bacteria": 0.35, "virus": 0.61})
    assert warnings == ["virus: 61 % of its saliency lies in the image border (shortcut?)"]
    # Everywhere at once is a diffuse model, not one class's cue; below the threshold is the lungs.
    assert saliency.shortcut_warnings({"normal": 0.60, "bacteria": 0.58, "virus": 0.62}) == []
    assert saliency.shortcut_warnings({"normal": 0.10, "bacteria": 0.10, "virus": 0.45}) == []
    assert saliency.shortcut_warnings({"normal": None, "bacteria": 0.2, "virus": 0.7}) == [
        "virus: 70 % of its saliency lies in the image border (shortcut?)"]


def test_examples_are_errors_first_then_each_class_in_turn():
    labels = np.array([0, 0, 1, 1, 2, 2, 0])
    probabilities = np.array([[0.9, 0.05, 0.05], [0.6, 0.2, 0.2], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1],
                              [0.1, 0.1, 0.8], [0.2, 0.75, 0.05], [0.95, 0.03, 0.02]])
    # errors: 2 (p 0.7) and 5 (p 0.75): most confident first; then normal, bacteria, virus, normal...
    assert saliency.pick_examples(labels, probabilities, 10) == [5, 2, 6, 3, 4, 0, 1]
    assert saliency.pick_examples(labels, probabilities, 3) == [5, 2, 6]
    assert saliency.pick_examples(labels, probabilities, 0) == []


def test_the_demo_plants_a_shortcut_only_when_asked():
    plain = demo.build_archive(30, seed=2)
    assert demo.build_archive(30, seed=2, shortcut=None) == plain
    planted = zipfile.ZipFile(io.BytesIO(demo.build_archive(30, seed=2, shortcut="virus")))
    for info in planted.infolist():
        if not info.filename.startswith("chest_xray/") or not info.filename.endswith(".jpeg"):
            continue
        pixels = np.asarray(Image.open(io.BytesIO(planted.read(info))).convert("L"), np.float32)
        side = round(demo.MARKER_SIZE * min(pixels.shape))
        corners = []
        for place in ("top-left", "top-right"):  # the default: a random upper corner per film
            top, left = demo.marker_box(*pixels.shape, place, side, side)
            corners.append(pixels[top + 1:top + side - 1, left + 1:left + side - 1])
        marked = max(corner.mean() for corner in corners) > 200
        assert marked == ("_virus_" in info.filename), info.filename
    with pytest.raises(ValueError, match="not a class"):
        demo.build_archive(30, seed=2, shortcut="covid")


def test_the_demo_command_plants_the_shortcut_it_is_given(tmp_path: Path, capsys):
    out = tmp_path / "shortcut.zip"
    assert demo.main(["--out", str(out), "--num-images", "30", "--seed", "2", "--shortcut", "virus"]) == 0
    assert out.read_bytes() == demo.build_archive(30, seed=2, shortcut="virus")
    assert "shortcut planted in virus" in capsys.readouterr().out


def test_the_shortcut_section_of_the_report():
    text = saliency.render_markdown({"method": "grad-cam", "border_share": {"normal": 0.3, "bacteria": None,
                                                                            "virus": 0.61},
                                     "warnings": ["virus: 61 % of its saliency lies in the image border (shortcut?)"]})
    assert "## Shortcut check" in text and "| virus | 61 % |" in text and "| bacteria | n/a |" in text
    assert "- **Warning**: virus: 61 %" in text
    calm = saliency.render_markdown({"method": "grad-cam", "border_share": {"normal": 0.3}, "warnings": []})
    assert "no shortcut found" in calm


@pytest.mark.slow
def test_a_planted_shortcut_is_named_by_the_check(tmp_path: Path):
    """The demo pipeline through jobs/ on an archive whose virus films are normal ones with a corner
    marker: the model learns the marker, and the report says so. (The plain demo archive's run in
    test_end_to_end checks the other side: no warning.)"""
    root = tmp_path / "shortcut"
    archive = root / "raw" / "demo-chest-xray.zip"
    demo.make_demo_archive(str(archive), num_images=300, seed=0, shortcut="virus")
    args = ["--set", f"data.root={root}", "--set", f"data.archive={archive}", "--set", "train.run_id=shortcut"]
    for name, timeout_s in (("preprocess", 120), ("shard", 180), ("train", 420), ("evaluate", 180)):
        stage(name, args, timeout_s)
    report_dir = root / "runs" / "shortcut" / "report"
    found = json.loads((report_dir / "metrics.json").read_text())["saliency"]
    assert {warning.split(":")[0] for warning in found["warnings"]} == {"virus"}, found
    assert found["recall_border_hidden"]["virus"] <= found["recall"]["virus"] - saliency.BORDER_RECALL_DROP_WARN
    assert "**Warning**: virus:" in (report_dir / "report.md").read_text()
