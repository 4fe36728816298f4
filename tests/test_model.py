"""The model zoo: shapes, softmax, mixed precision, backbone freezing, weights files, and that the
small CNN actually learns the demo archive's classes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from sklearn.metrics import cohen_kappa_score

from pneumonia import weight_files
from pneumonia.config import CLASS_NAMES, ModelConfig
from pneumonia.data import demo, imaging
from pneumonia.errors import ConfigError
from pneumonia.model import zoo

# EfficientNetV2B0 at 64 px keeps each build to a few seconds on a CPU; weights none: no internet here.
EFFNET = ModelConfig(name="efficientnetv2b0", weights="none", trainable="warmup", input_size=64,
                     dense_units=(32, 16), dropout=0.1)
SMALL = ModelConfig(name="small_cnn", weights="none", trainable="full", input_size=64, dense_units=(32,), dropout=0.0)


@pytest.fixture(autouse=True)
def float32_policy():
    """The dtype policy is global Keras state: every test starts and ends with float32."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _images(batch: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, *shape), dtype=np.float32)


def _num_trainable(model: keras.Model) -> int:
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


def test_efficientnet_from_grayscale_gives_class_probabilities_and_freezes_its_backbone():
    model = zoo.build_model(EFFNET, (80, 72, 1))
    probabilities = model(_images(4, (80, 72, 1)), training=False).numpy()
    assert probabilities.shape == (4, len(CLASS_NAMES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities >= 0).all()
    # Gray is repeated into RGB and rescaled to the backbone's [0, 255] before a resize to input_size.
    assert model.get_layer("to_rgb").output_shape[-1] == 3
    assert model.get_layer("to_backbone_range").scale == 255.0
    assert model.get_layer("resize").output_shape[1:3] == (64, 64)

    head_only = _num_trainable(model)  # trainable: warmup starts frozen
    backbone_params = model.get_layer(zoo.BACKBONE_LAYER).count_params()
    assert head_only == sum(layer.count_params() for layer in model.layers if layer.name != zoo.BACKBONE_LAYER)
    zoo.set_backbone_trainable(model, True)
    unfrozen = _num_trainable(model)
    assert unfrozen > head_only + backbone_params // 2  # the backbone's kernels now train
    zoo.set_backbone_trainable(model, False)
    assert _num_trainable(model) == head_only


def test_trainable_full_starts_unfrozen_and_frozen_stays_frozen():
    full = zoo.build_model(SMALL, (64, 64, 1))
    frozen = zoo.build_model(dataclasses.replace(SMALL, trainable="frozen"), (64, 64, 1))
    assert full.get_layer(zoo.BACKBONE_LAYER).trainable
    assert not frozen.get_layer(zoo.BACKBONE_LAYER).trainable
    assert _num_trainable(full) > _num_trainable(frozen) > 0
    # No resize layer when the shard size is already the model's input size.
    assert "resize" not in [layer.name for layer in full.layers]


def test_mixed_precision_keeps_the_softmax_in_float32():
    xla = zoo.configure_precision(dataclasses.replace(EFFNET, mixed_precision=True), has_gpu=False)
    assert xla is False  # xla None: on only with a GPU
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    model = zoo.build_model(EFFNET, (64, 64, 3))
    assert model.get_layer("dense0").compute_dtype == "float16"
    output = model(_images(2, (64, 64, 3)), training=False)
    assert output.dtype == tf.float32
    np.testing.assert_allclose(output.numpy().sum(axis=1), 1.0, rtol=1e-3)


@pytest.mark.parametrize(("mixed", "xla", "has_gpu", "num_replicas", "policy", "want_xla"), [
    (None, None, True, 1, "mixed_float16", True),
    (None, None, True, 2, "mixed_float16", False),  # XLA by default only where known to work: one replica
    (None, None, False, 1, "float32", False),
    (False, True, True, 2, "float32", True),
    (True, False, False, 1, "mixed_float16", False),
])
def test_configure_precision_defaults_to_on_with_a_gpu_and_config_forces(mixed, xla, has_gpu, num_replicas, policy,
                                                                         want_xla):
    assert zoo.configure_precision(ModelConfig(mixed_precision=mixed, xla=xla), has_gpu=has_gpu,
                                   num_replicas=num_replicas) is want_xla
    assert keras.mixed_precision.global_policy().name == policy


def test_a_weights_file_path_loads_into_the_backbone(tmp_path):
    source = keras.applications.EfficientNetV2B0(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / zoo.IMAGENET_NOTOP_FILE
    source.save_weights(str(path))
    expected = source.get_layer("stem_conv").kernel.numpy()

    loaded = zoo.build_model(dataclasses.replace(EFFNET, weights=str(path)), (64, 64, 1))
    kernel = loaded.get_layer(zoo.BACKBONE_LAYER).get_layer("stem_conv").kernel.numpy()
    np.testing.assert_array_equal(kernel, expected)
    # A second random initialisation would differ: the equality above is the file's doing.
    assert not np.array_equal(keras.applications.EfficientNetV2B0(
        include_top=False, weights=None, input_shape=(64, 64, 3)).get_layer("stem_conv").kernel.numpy(), expected)


def test_a_missing_weights_file_is_a_config_error_that_says_how_to_fetch_it(tmp_path):
    missing = tmp_path / "nowhere" / zoo.IMAGENET_NOTOP_FILE
    with pytest.raises(ConfigError, match="model.weights") as error:
        zoo.build_model(dataclasses.replace(EFFNET, weights=str(missing)), (64, 64, 1))
    assert str(missing) in str(error.value)
    assert "include_top=False, weights='imagenet'" in str(error.value)


def test_a_weights_file_that_does_not_fit_is_a_config_error(tmp_path):
    path = tmp_path / "other.h5"
    zoo.build_model(SMALL, (64, 64, 1)).save_weights(str(path))
    with pytest.raises(ConfigError, match="model.weights"):
        zoo.build_model(dataclasses.replace(EFFNET, weights=str(path)), (64, 64, 1))


def test_small_cnn_refuses_a_weights_file():
    with pytest.raises(ConfigError, match="model.weights"):
        zoo.build_model(dataclasses.replace(SMALL, weights="/some/file.h5"), (64, 64, 1))


def test_save_and_load_weights_round_trip(tmp_path):
    model = zoo.build_model(SMALL, (64, 64, 1))
    path = str(tmp_path / "run" / "checkpoints" / "best.weights.h5")
    weight_files.save_weights(model, path)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["best.weights.h5"]  # no temp left
    other = zoo.build_model(SMALL, (64, 64, 1))
    images = _images(3, (64, 64, 1))
    assert not np.allclose(other(images).numpy(), model(images).numpy())
    weight_files.load_weights(other, path)
    np.testing.assert_allclose(other(images).numpy(), model(images).numpy(), rtol=1e-6)


def _demo_images(num_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Demo-archive radiographs, resized for the shards exactly as the shard stage does (64x64x1)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(CLASS_NAMES):
        for _ in range(num_per_class):
            pixels = demo.render_image(name, rng)[..., np.newaxis]
            images.append(imaging.to_float(imaging.resize_with_pad(tf.constant(pixels), 64, 64)).numpy())
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_small_cnn_learns_the_demo_classes_in_a_few_epochs():
    train_x, train_y = _demo_images(80, seed=1)
    test_x, test_y = _demo_images(20, seed=2)
    keras.utils.set_random_seed(1)  # seeds python, numpy and TF alike (0 is refused as train.seed)
    model = zoo.build_model(SMALL, (64, 64, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    model.fit(train_x, np.eye(3, dtype=np.float32)[train_y], batch_size=16, epochs=3, shuffle=True, verbose=0)
    predicted = model.predict(test_x, batch_size=64, verbose=0).argmax(axis=1)
    assert cohen_kappa_score(test_y, predicted) >= 0.8
