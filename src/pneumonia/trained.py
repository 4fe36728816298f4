"""A finished run's model for inference: rebuilt from the run's config and best weights, and run over
a dataset. Used by the evaluate stage, the export at the end of training, and predict --gradcam."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tf_keras as keras

from pneumonia import storage, weight_files
from pneumonia.config import CLASS_NAMES, PipelineConfig, from_dict, parse_config_yaml
from pneumonia.errors import BadInputError, ConfigError
from pneumonia.layout import CONFIG_NAME, Layout
from pneumonia.model import zoo


def checkpoint_path(run_dir: str) -> str:
    """Where training (chief only) keeps the best-val_cohen_kappa weights of a run."""
    layout, run_id = Layout.of_run_dir(run_dir)
    return layout.best_weights(run_id)


def load_run_config(run_dir: str) -> PipelineConfig:
    """The resolved config saved in a run dir (local or gs://); BadInputError naming the file."""
    path = storage.join(run_dir, CONFIG_NAME)
    if not storage.exists(path):
        raise BadInputError(f"{path} is missing: {run_dir} is not a training run dir (runs/<run_id>)")
    tree = parse_config_yaml(storage.read_text(path), path)
    try:
        return from_dict(tree).validate()
    except ConfigError as error:
        raise ConfigError(f"run config {path}: {error}") from None


def load_trained_model(run_dir: str) -> tuple[keras.Model, PipelineConfig]:
    """Rebuilds a run's model from its config and loads its best checkpoint; float32, for inference.

    The backbone is built with weights none (the checkpoint holds every weight), so this works
    offline even for a run that started from ImageNet.
    """
    run_config = load_run_config(run_dir)
    weights_path = checkpoint_path(run_dir)
    if not storage.exists(weights_path):
        raise BadInputError(f"{weights_path} is missing: the run has no best checkpoint (did training finish?)")
    # Inference in float32: exact, and the test set is small enough that speed does not matter.
    keras.mixed_precision.set_global_policy("float32")
    shard = run_config.shard
    model = zoo.build_model(dataclasses.replace(run_config.model, weights="none"),
                            (shard.image_height, shard.image_width, shard.channels), len(CLASS_NAMES))
    try:
        weight_files.load_weights(model, weights_path)
    except (ValueError, OSError) as error:
        raise BadInputError(f"{weights_path} does not fit the model in {storage.join(run_dir, CONFIG_NAME)} "
                            f"({run_config.model.name}): {error}") from None
    return model, run_config


def predict_dataset(model: keras.Model, dataset: tf.data.Dataset
                    ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(true class indices [N], probabilities [N, K], source paths, patient ids) over a
    (image, label, metadata) dataset."""
    infer = tf.function(lambda images: model(images, training=False))
    labels, probabilities, paths, patients = [], [], [], []
    for images, one_hot, metadata in dataset:
        probabilities.append(infer(images).numpy())
        labels.append(np.argmax(one_hot.numpy(), axis=1))
        paths += [path.decode("utf-8") for path in metadata["source_path"].numpy()]
        patients += [patient.decode("utf-8") for patient in metadata["patient"].numpy()]
    if not labels:
        return np.zeros(0, np.int64), np.zeros((0, len(CLASS_NAMES)), np.float32), [], []
    return np.concatenate(labels), np.concatenate(probabilities), paths, patients
