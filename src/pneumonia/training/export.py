"""The run's export, runs/<id>/model/1/: the weights evaluate scores, in float32, calibrated, serving image files.

A tf_keras SavedModel, in the version folder TF Serving expects under the base path runs/<id>/model/. `tf_keras.models.load_model(path, compile=False)` gives the Keras model on
shard-sized images in [0, 1]; its `serving_default` signature is what model servers call (TF
Serving, Vertex AI, KServe's TensorFlow runtime):

    inputs:  image_bytes    tf.string [None]     encoded JPEG or PNG files, any size, gray or RGB
    outputs: probabilities  tf.float32 [None, 3] calibrated, in CLASS_NAMES order
             class          tf.string [None]     the most probable class name

It decodes, resizes and crops or pads (shard.fit) in the graph with the shard stage's own function, then stores and
reads back the pixels as the run's shards do (imaging.model_input), so a served file becomes the
very input the model trained on and evaluate scored. Servers base64-decode inputs named `*_bytes`
sent as {"b64": ...}.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from pneumonia import storage
from pneumonia.config import CLASS_NAMES, ShardConfig
from pneumonia.data import imaging, pipeline
from pneumonia.evaluation import calibration
from pneumonia.layout import Layout
from pneumonia.logs import get_logger
from pneumonia.trained import load_trained_model, predict_dataset
from pneumonia.training.callbacks import weights_sha256

log = get_logger(__name__)

SIGNATURE = "serving_default"
INPUT_KEY = "image_bytes"
MODEL_FORMAT = ("tf_keras SavedModel, float32 (load with tf_keras.models.load_model(path, compile=False)); "
                "signature serving_default: image_bytes (string [None]) -> probabilities (float32 [None, 3], "
                "calibrated), class (string [None])")


def serving_function(model: keras.Model, fitted: calibration.Calibration, shard: ShardConfig) -> Any:
    """The `serving_default` tf.function: encoded image files -> calibrated probabilities and class names."""
    class_names = tf.constant(CLASS_NAMES)
    height, width, channels = shard.image_height, shard.image_width, shard.channels

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)])
    def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(lambda one: imaging.model_input(one, height, width, channels, shard.encoding,
                                                           fit=shard.fit),
                           image_bytes, fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32))
        probabilities = apply_calibration(model(images, training=False), fitted)
        return {"probabilities": probabilities, "class": tf.gather(class_names, tf.argmax(probabilities, axis=1))}

    return serve


def apply_calibration(probabilities: tf.Tensor, fitted: calibration.Calibration) -> tf.Tensor:
    """calibration.Calibration.apply as graph ops: softmax(log(p) / T + bias), then the top-label map."""
    log_p = tf.math.log(tf.maximum(tf.cast(probabilities, tf.float32), calibration.PROBABILITY_FLOOR))
    bias = tf.constant(fitted.bias_vector(len(CLASS_NAMES)), tf.float32)
    log_scaled = tf.nn.log_softmax(log_p / tf.constant(fitted.temperature, tf.float32) + bias, axis=-1)
    if fitted.top_label_is_identity:
        return tf.exp(log_scaled)
    return top_label_map(log_scaled, fitted.top_slope, fitted.top_intercept)


def top_label_map(log_probabilities: tf.Tensor, slope: float, intercept: float) -> tf.Tensor:
    """calibration.top_label_map as graph ops (float32), in log space as there: logit(c) = log c -
    logsumexp(log of the others), the others' shares a softmax over them, the top kept above the
    runner-up's share."""
    is_top = tf.one_hot(tf.argmax(log_probabilities, axis=-1), len(CLASS_NAMES), dtype=tf.float32)
    others = tf.where(is_top > 0, tf.constant(-np.inf, tf.float32), log_probabilities)
    log_rest = tf.reduce_logsumexp(others, axis=-1)
    share = tf.exp(others - log_rest[:, None])  # 0 at the winner
    logit = tf.reduce_sum(log_probabilities * is_top, axis=-1) - log_rest
    mapped = tf.sigmoid(tf.constant(slope, tf.float32) * logit + tf.constant(intercept, tf.float32))
    runner_up = tf.reduce_max(share, axis=-1)
    mapped = tf.maximum(mapped, runner_up / (1.0 + runner_up) + calibration.TOP_LABEL_MARGIN)
    return share * (1.0 - mapped)[:, None] + is_top * mapped[:, None]


class _UnbuiltMetricsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Compiled the loaded model, but the compiled metrics have yet")


@contextlib.contextmanager
def _without_unbuilt_metrics_warning() -> Iterator[None]:
    """Drops tf_keras' "compiled metrics have yet to be built" warning (twice per save): the export
    saves an uncompiled inference model on purpose, it has no metrics to build. Other warnings stay."""
    drop = _UnbuiltMetricsWarning()
    logger = logging.getLogger("tensorflow")  # where tf_keras logs
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def save(model: keras.Model, fitted: calibration.Calibration, shard: ShardConfig, destination: str) -> None:
    """Writes the SavedModel to `destination` (local or gs://): to a local temp folder first, then moved or copied."""
    serve = serving_function(model, fitted, shard)
    # No per-layer traces: every layer is a built-in that Keras rebuilds from its config, servers need
    # only the signature, and tracing each layer made saving 5x slower (18 s against 3.4 s for the
    # small CNN on 2 busy cores) and loading 3x slower.
    options = {"save_format": "tf", "include_optimizer": False, "save_traces": False,
               "signatures": {SIGNATURE: serve}}
    scratch = tempfile.mkdtemp(prefix="pneumonia-export-")
    try:
        local = os.path.join(scratch, "model")
        with _without_unbuilt_metrics_warning():
            model.save(local, **options)
        storage.remove_tree(destination)
        if storage.is_gcs(destination):
            # GCS has no folder rename, and a 503 mid-upload can leave an object short or empty: each
            # file is copied and checked (size, CRC32C) before the run marker vouches for the export.
            for folder, _, names in os.walk(local):
                for name in names:
                    relative = os.path.relpath(os.path.join(folder, name), local)
                    storage.copy_from_local(os.path.join(folder, name), storage.join(destination, *relative.split(os.sep)))
        else:
            storage.makedirs(os.path.dirname(destination))
            shutil.move(local, destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def export_run(layout: Layout, run_id: str) -> dict[str, Any]:
    """The chief's last step before the run marker: best weights -> float32 model -> calibration fitted
    on val (the class-weight prior undone, T, the top-label map) -> calibration.json -> model/. Returns what the run
    marker records about the export."""
    model, run_config = load_trained_model(layout.run(run_id))  # float32, best.weights.h5
    processed_dir = layout.processed(run_config.shard.size_dir)
    val = pipeline.make_dataset(processed_dir, "val", run_config.train.per_replica_batch_size, training=False,
                                config=run_config, with_metadata=True)
    labels, probabilities = predict_dataset(model, val)[:2]
    # The weights the loss used (history.json records them; null when train.class_weights is off).
    history = storage.read_json(layout.history(run_id)) if storage.exists(layout.history(run_id)) else {}
    class_weights = history.get("class_weights")
    record = calibration.calibration_record(probabilities, labels, class_weights)
    storage.write_json(layout.calibration(run_id), record)
    log.info("calibration fitted", **record)
    fitted = calibration.from_record(record)
    destination = layout.saved_model(run_id)
    save(model, fitted, run_config.shard, destination)
    log.info("model exported", path=destination, temperature=fitted.temperature, bias=record["bias"],
             top_label=record.get("top_label"))
    return {"path": destination, "format": MODEL_FORMAT, "dtype": "float32", "weights": layout.best_weights(run_id),
            "weights_sha256": weights_sha256(model), "temperature": fitted.temperature, "bias": record["bias"],
            "top_label": record.get("top_label"), "calibration_method": record["method"]}


class ServedModel:
    """An export loaded as a model server loads it (local or gs://), called on encoded image files."""

    def __init__(self, model_dir: str) -> None:
        self._loaded = tf.saved_model.load(model_dir)  # owns the variables the signature reads
        self.signature = self._loaded.signatures[SIGNATURE]

    def __call__(self, files: list[bytes]) -> tuple[np.ndarray, list[str]]:
        """(calibrated probabilities [N, 3], class names) for the files' bytes, in order."""
        outputs = self.signature(**{INPUT_KEY: tf.constant(files, tf.string)})
        return outputs["probabilities"].numpy(), [name.decode("utf-8") for name in outputs["class"].numpy()]
