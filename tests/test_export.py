"""The run's export: its serving signature on the test set's source files gives evaluate's
predictions (identically, with PNG and with JPEG shards), its weights are best.weights.h5 in
float32, and a TF Serving REST body with b64 images decodes and predicts."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from PIL import Image
from test_evaluate import RUN_ID, TrainedRun, make_run
from test_train import build_shards, copy_shards, tiny_config

from pneumonia import storage, weight_files
from pneumonia.config import CLASS_NAMES, ModelConfig, ShardConfig
from pneumonia.data import demo, imaging
from pneumonia.evaluation import calibration, evaluate
from pneumonia.layout import Layout
from pneumonia.model import zoo
from pneumonia.training import export, fit


def served_against_evaluated(run: TrainedRun) -> tuple[dict, dict]:
    """Evaluate's predictions.jsonl rows, and the export's answers on each row's source file, by path."""
    evaluate.run(run.config)
    rows = [json.loads(line) for line in (Path(run.run_dir) / "report" / "predictions.jsonl").read_text().splitlines()]
    root = Layout.of(run.config).root
    served = export.ServedModel(Layout.of(run.config).saved_model(RUN_ID))
    probabilities, classes = served([storage.read_bytes(storage.join(root, row["path"])) for row in rows])
    evaluated = {row["path"]: (np.array(list(row["probabilities"].values())), row["predicted"]) for row in rows}
    answers = {row["path"]: (p, c) for row, p, c in zip(rows, probabilities, classes, strict=True)}
    return evaluated, answers


@pytest.fixture(scope="module")
def png_run(tmp_path_factory) -> TrainedRun:
    return make_run(tmp_path_factory.mktemp("export-png"), seed=2)


@pytest.fixture(scope="module")
def jpeg_run(tmp_path_factory) -> TrainedRun:
    return make_run(tmp_path_factory.mktemp("export-jpeg"), seed=2, encoding="jpeg")


@pytest.mark.parametrize("run", ["png_run", "jpeg_run"])
def test_serving_on_source_files_is_evaluate_exactly(run, request):
    """JPEG shards too: the export stores and reads back each resized image as the shards do (q95),
    so the model sees the pixels it trained on, not the source's (which measured up to 0.12 apart
    in probability on this 32 px fixture)."""
    trained = request.getfixturevalue(run)
    evaluated, served = served_against_evaluated(trained)
    assert len(served) > 0
    for path, (probabilities, predicted) in evaluated.items():
        assert served[path][1] == predicted, path
        np.testing.assert_allclose(served[path][0], probabilities, atol=1e-5, err_msg=path)
    # Calibrated on both sides, and not a no-op here: the class-weight prior is undone.
    assert not calibration.load_calibration(Layout.of(trained.config), RUN_ID).is_identity


def test_the_graph_applies_the_calibration_exactly_as_the_report_does():
    probabilities = np.random.default_rng(4).dirichlet([0.5, 0.5, 0.5], 64).astype(np.float32)
    probabilities[0] = [1.0, 0.0, 0.0]  # float32 underflow: the floor keeps it finite on both sides
    probabilities[1] = [0.2, 0.2, 0.6]  # a tie among the others: they share the rest evenly
    probabilities[2] = [0.4, 0.35, 0.25]  # a flat map would put the top under the runner-up: kept above
    probabilities[3] = [1.0, 1e-20, 1e-21]  # the others underflow float32 after T < 1: a log-sum keeps them
    probabilities[4] = [1 - 1e-5, 6e-6, 4e-6]  # the top within float32 rounding of 1: its logit from logs
    probabilities[5] = [1 - 1e-6, 6e-7, 4e-7]
    for fitted in (calibration.Calibration(), calibration.Calibration(1.7, (0.0, -0.4, 0.3)),
                   calibration.Calibration(0.6, tuple(-np.log([1.3, 0.7, 1.2]) / 0.6)),
                   calibration.Calibration(1.2, (0.0, 0.2, -0.1), 0.15, 1.3),  # near flat: every film ~0.8
                   calibration.Calibration(0.8, None, 2.5, -0.7), calibration.Calibration(0.5, None, 0.15, 1.3),
                   calibration.Calibration(1.0, None, 0.0, 2.0)):
        graph = export.apply_calibration(tf.constant(probabilities), fitted).numpy()
        np.testing.assert_allclose(graph, fitted.apply(probabilities), atol=2e-6)
        np.testing.assert_allclose(graph.sum(axis=1), 1.0, atol=2e-6)
        np.testing.assert_array_equal(graph.argmax(axis=1), fitted.apply(probabilities).argmax(axis=1))


def test_the_signature_takes_image_bytes_and_returns_probabilities_and_class(png_run):
    signature = export.ServedModel(Layout.of(png_run.config).saved_model(RUN_ID)).signature
    (inputs,) = signature.structured_input_signature[1].values()
    assert list(signature.structured_input_signature[1]) == ["image_bytes"]
    assert inputs.dtype == tf.string and inputs.shape.as_list() == [None]
    outputs = signature.structured_outputs
    assert outputs["probabilities"].dtype == tf.float32 and outputs["probabilities"].shape.as_list() == [None, 3]
    assert outputs["class"].dtype == tf.string


def test_exported_weights_are_the_best_checkpoint_in_float32(png_run):
    exported = keras.models.load_model(Layout.of(png_run.config).saved_model(RUN_ID), compile=False)
    best = zoo.build_model(png_run.config.model, (32, 32, 1))
    weight_files.load_weights(best, Layout.of(png_run.config).best_weights(RUN_ID))
    assert len(exported.weights) == len(best.weights)
    for ours, theirs in zip(exported.weights, best.weights, strict=True):
        assert ours.dtype == tf.float32
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def tf_serving_predict(served: export.ServedModel, body: str) -> str:
    """What TF Serving's REST API does with a row-format request: each {"b64": ...} becomes the bytes it
    encodes, the instances form the [None] batch, and each output row goes back as JSON."""
    instances = json.loads(body)["instances"]
    files = [base64.b64decode(instance["image_bytes"]["b64"]) for instance in instances]
    probabilities, classes = served(files)
    return json.dumps({"predictions": [{"probabilities": row.tolist(), "class": name}
                                       for row, name in zip(probabilities, classes, strict=True)]})


def test_a_tf_serving_rest_body_with_b64_images_decodes_and_predicts(png_run):
    rng = np.random.default_rng(5)
    gray = demo.render_image("virus", rng)
    files = [_encode(gray, "PNG"),                                              # grayscale PNG
             _encode(np.stack([demo.render_image("bacteria", rng)] * 3, axis=-1), "JPEG"),  # RGB JPEG
             _encode(np.asarray(Image.fromarray(gray).resize((97, 41))), "JPEG")]  # odd size, wide
    body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(f).decode("ascii")}} for f in files]})
    served = export.ServedModel(Layout.of(png_run.config).saved_model(RUN_ID))
    predictions = json.loads(tf_serving_predict(served, body))["predictions"]

    model = png_run.model
    fitted = calibration.load_calibration(Layout.of(png_run.config), RUN_ID)
    images = np.stack([imaging.model_input(tf.constant(f), 32, 32, 1, "png", fit=png_run.config.shard.fit).numpy()
                       for f in files])
    want = fitted.apply(model(images, training=False).numpy())
    assert len(predictions) == len(files)
    for prediction, expected in zip(predictions, want, strict=True):
        np.testing.assert_allclose(prediction["probabilities"], expected, atol=1e-5)
        assert prediction["class"] == CLASS_NAMES[int(np.argmax(expected))]


def test_training_exports_the_best_weights_of_a_mixed_precision_run_in_float32(tmp_path):
    """The trainer's own export: best.weights.h5 (not the last epoch's), float32 although trained
    under mixed_float16, calibration.json before the marker, and the marker names what it holds."""
    build_shards(tmp_path / "shards", num_images=60)
    copy_shards(tmp_path / "shards", str(tmp_path / "data"))
    try:
        done = fit.run(tiny_config(str(tmp_path / "data"), "mixed", "model.mixed_precision=true", "train.epochs=2",
                                   "train.warmup_epochs=0", "model.trainable=full"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    run_dir = tmp_path / "data" / "runs" / "mixed"
    assert done["export"]["best_epoch"] == done["best"]["epoch"] and done["export"]["dtype"] == "float32"
    assert done["export"]["best_value"] == done["best"]["value"]
    record = json.loads((run_dir / "calibration.json").read_text())
    assert record["temperature"] == done["export"]["temperature"] and record["fitted_on"] == "val"
    assert record["num_images"] > 0 and record["method"] == "prior_temperature_top_label"
    # 60 demo images leave val too small for a fit: T = 1 and the prior correction alone, said so.
    assert record["fitted"] is False and record["temperature"] == 1.0 and "fewer than" in record["reason"]
    assert record["bias"] == pytest.approx(-np.log(record["class_weights"])) == done["export"]["bias"]
    assert (run_dir / "calibration.json").stat().st_mtime_ns <= (run_dir / "_SUCCESS.json").stat().st_mtime_ns

    exported = keras.models.load_model(str(run_dir / "model" / "1"), compile=False)
    assert exported.dtype_policy.name == "float32"
    assert all(layer.dtype_policy.name == "float32" for layer in exported.layers)
    best = zoo.build_model(tiny_config(str(tmp_path), "x").model, (32, 32, 1))
    weight_files.load_weights(best, str(run_dir / "checkpoints" / "best.weights.h5"))
    for ours, theirs in zip(exported.weights, best.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    assert done["export"]["weights_sha256"] == fit.weights_sha256(best)


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_the_serving_signature_resizes_with_the_run_s_fit(fit):
    """The signature applies the shard setting the run trained with: a wide film served is the very
    input model_input gives with that fit, and the other fit would give the model other pixels."""
    shard = ShardConfig(image_height=32, image_width=32, channels=1, encoding="png", fit=fit)
    model = zoo.build_model(ModelConfig(name="small_cnn", weights="none", trainable="full", input_size=32,
                                        dense_units=(8,)), (32, 32, 1))
    wide = _encode(demo.render_image("virus", np.random.default_rng(3), size=(60, 110)), "PNG")
    served = export.serving_function(model, calibration.Calibration(), shard)(tf.constant([wide]))
    other = "pad" if fit == "crop" else "crop"
    mine, theirs = (imaging.model_input(tf.constant(wide), 32, 32, 1, "png", fit=f)[tf.newaxis] for f in (fit, other))
    np.testing.assert_allclose(served["probabilities"].numpy(), model(mine, training=False).numpy(), atol=1e-6)
    assert not np.allclose(mine.numpy(), theirs.numpy())
