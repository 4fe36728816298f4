"""The networks: the notebook's EfficientNetV2B0 transfer model and a small CNN for demos and tests.

Model code knows nothing about distribution: the trainer builds the model inside its strategy scope.
Both models take the shard-sized image in [0, 1] (`pneumonia.data.pipeline`) and end in a float32
softmax over the classes, and both keep their feature extractor in one layer named `backbone`, so
`set_backbone_trainable` drives the warmup-then-unfreeze phases for either.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import tensorflow as tf
import tf_keras as keras

from pneumonia.config import CLASS_NAMES, ModelConfig
from pneumonia.errors import ConfigError
from pneumonia.logs import get_logger

log = get_logger(__name__)

BACKBONE_LAYER = "backbone"
# The file Keras caches in ~/.keras/models/ when it downloads the ImageNet backbone (include_top=False).
IMAGENET_NOTOP_FILE = "efficientnetv2-b0_notop.h5"
FETCH_WEIGHTS_HINT = (
    "on a machine with internet run `python -c \"import tf_keras; tf_keras.applications.EfficientNetV2B0("
    "include_top=False, weights='imagenet')\"`, copy ~/.keras/models/" + IMAGENET_NOTOP_FILE
    + " to the bucket (e.g. gs://BUCKET/weights/" + IMAGENET_NOTOP_FILE + ") and set model.weights to that path"
)


def configure_precision(model_config: ModelConfig, has_gpu: bool, num_replicas: int = 1) -> bool:
    """Sets the global Keras dtype policy and returns whether to compile with XLA (`jit_compile`).

    Call it before `build_model`. `model.mixed_precision` = None means "on iff a GPU is present":
    float16 matmuls pay off on GPUs and only slow a CPU down. `model.xla` = None means "on for one
    replica on a GPU", the one setting known to work: tf_keras compiles the whole train step, and
    with several replicas that includes the gradient all-reduce, which XLA cannot compile on CPU
    (RING) and which no test here has run over NCCL. Forcing it on is checked before the cluster
    forms (cluster.check_xla).
    """
    mixed = has_gpu if model_config.mixed_precision is None else model_config.mixed_precision
    xla = (has_gpu and num_replicas == 1) if model_config.xla is None else model_config.xla
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    if mixed and not has_gpu:
        log.warning("mixed precision forced on without a GPU; expect it to be slower", key="model.mixed_precision")
    log.info("precision", policy=keras.mixed_precision.global_policy().name, xla=xla, has_gpu=has_gpu,
             num_replicas=num_replicas)
    return xla


def build_model(model_config: ModelConfig, input_shape: tuple[int, int, int],
                num_classes: int = len(CLASS_NAMES)) -> keras.Model:
    """The uncompiled model for `model_config.name`, taking images of `input_shape` (H, W, C) in [0, 1].

    Builds in whatever strategy scope and dtype policy the caller has set. The backbone starts
    trainable for `model.trainable: full` and frozen for `frozen` and `warmup` (the trainer calls
    `set_backbone_trainable(model, True)` after `train.warmup_epochs`, then recompiles).
    Raises ConfigError for a weights file that is missing or does not fit.
    """
    height, width, channels = (int(v) for v in input_shape)
    if channels not in (1, 3):
        raise ConfigError(f"input_shape {input_shape} must have 1 or 3 channels (shard.channels)")
    if model_config.name == "efficientnetv2b0":
        model = _efficientnetv2b0(model_config, (height, width, channels), num_classes)
    elif model_config.name == "small_cnn":
        model = _small_cnn(model_config, (height, width, channels), num_classes)
    else:
        raise ConfigError(f"config key model.name = {model_config.name!r} is invalid: "
                          "expected one of: efficientnetv2b0, small_cnn")
    set_backbone_trainable(model, model_config.trainable == "full")
    log.info("model built", name=model_config.name, input_shape=[height, width, channels],
             params=model.count_params(), backbone_trainable=model_config.trainable == "full")
    return model


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    """Freezes or unfreezes the feature extractor; the head stays trainable.

    Keras only picks up the change at the next `compile()`, so the caller recompiles (with the
    fine-tune learning rate) after unfreezing.
    """
    model.get_layer(BACKBONE_LAYER).trainable = trainable


def _efficientnetv2b0(model_config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    size = model_config.input_size
    weights = model_config.weights.strip()
    pretrained = weights.lower() != "none"
    inputs = keras.Input(shape=input_shape, name="image")
    x = _to_rgb(inputs)
    # tf_keras' EfficientNetV2B0 keeps its own preprocessing (include_preprocessing=True: /255, then
    # ImageNet mean/std), which expects pixels in [0, 255]; the pipeline hands over [0, 1].
    x = keras.layers.Rescaling(255.0, name="to_backbone_range")(x)
    x = _resize(x, input_shape, size)
    with _backbone_weights(weights) as weights_arg:
        try:
            backbone = keras.applications.EfficientNetV2B0(include_top=False, weights=weights_arg,
                                                           input_shape=(size, size, 3))
        except (ValueError, OSError) as error:
            if weights_arg in (None, "imagenet"):
                raise
            raise ConfigError(f"config key model.weights = {weights!r} is invalid: cannot load it into "
                              f"EfficientNetV2B0 without its top ({error}); expected Keras' {IMAGENET_NOTOP_FILE}; "
                              + FETCH_WEIGHTS_HINT) from None
    backbone._name = BACKBONE_LAYER  # noqa: SLF001 - Keras names nested models only at construction
    # A pretrained backbone keeps its BatchNorm statistics even once unfrozen (training=False): a
    # small, imbalanced dataset would otherwise wreck them in the first fine-tuning steps.
    x = backbone(x, training=False) if pretrained else backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, _head(x, model_config, num_classes), name="efficientnetv2b0")


def _small_cnn(model_config: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    weights = model_config.weights.strip().lower()
    if weights == "imagenet":
        log.warning("small_cnn has no pretrained weights; model.weights=imagenet is ignored", key="model.weights")
    elif weights != "none":
        raise ConfigError(f"config key model.weights = {model_config.weights!r} is invalid for small_cnn: "
                          "it has no pretrained backbone to load a file into; use none")
    size = model_config.input_size
    inputs = keras.Input(shape=input_shape, name="image")
    x = _resize(inputs, input_shape, size)
    trunk = keras.Sequential(name=BACKBONE_LAYER)
    trunk.add(keras.Input(shape=(size, size, input_shape[2])))
    # Four Conv-BN-ReLU-Pool blocks take 64x64 down to 4x4: enough to tell the demo classes apart,
    # small enough to train in seconds on a CPU.
    for block, filters in enumerate((16, 32, 64, 128)):
        trunk.add(keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}"))
        # momentum 0.5, not Keras' 0.99: a demo run is only ~40 steps while the kernels' scale still
        # moves fast, so slower moving statistics lag the weights and inference sees the wrong
        # scale (measured: kappa ~0.3 at 0.9 against ~0.97 at 0.5 after 3 demo epochs).
        trunk.add(keras.layers.BatchNormalization(momentum=0.5, name=f"bn{block}"))
        trunk.add(keras.layers.ReLU(name=f"relu{block}"))
        trunk.add(keras.layers.MaxPooling2D(2, name=f"pool{block}"))
    x = trunk(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, _head(x, model_config, num_classes), name="small_cnn")


def _to_rgb(x: tf.Tensor) -> tf.Tensor:
    # Grayscale X-rays are repeated into 3 channels because ImageNet backbones expect RGB.
    if x.shape[-1] == 1:
        return keras.layers.Concatenate(axis=-1, name="to_rgb")([x, x, x])
    return x


def _resize(x: tf.Tensor, input_shape: tuple[int, int, int], size: int) -> tf.Tensor:
    if input_shape[:2] == (size, size):
        return x
    return keras.layers.Resizing(size, size, interpolation="bilinear", name="resize")(x)


def _head(x: tf.Tensor, model_config: ModelConfig, num_classes: int) -> tf.Tensor:
    for index, units in enumerate(model_config.dense_units):
        x = keras.layers.Dense(units, activation="relu", name=f"dense{index}")(x)
    if model_config.dropout > 0:
        x = keras.layers.Dropout(model_config.dropout, name="dropout")(x)
    # float32 so the softmax (and the loss on it) stays exact under the mixed_float16 policy.
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)


@contextlib.contextmanager
def _backbone_weights(weights: str) -> Iterator[str | None]:
    """Maps model.weights to what keras.applications takes: a local file (pneumonia.weight_files fetches a gs:// one)."""
    if weights.lower() == "none":
        yield None
    elif weights.lower() == "imagenet":
        yield "imagenet"
    else:
        if not os.path.exists(weights):
            raise ConfigError(f"config key model.weights = {weights!r} is invalid: no such file; "
                              + FETCH_WEIGHTS_HINT + " (or use imagenet when online, none for random)")
        yield weights
