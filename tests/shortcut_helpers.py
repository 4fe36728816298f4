"""A demo archive's films through the shard stage's own resize, and a small CNN trained on them in
process: what the shortcut tests need of the pipeline, in seconds rather than a run of four stages."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from pneumonia.config import CLASS_NAMES, ModelConfig
from pneumonia.data import imaging
from pneumonia.model import zoo


@dataclass
class Films:
    images: np.ndarray  # float32 [N, H, W, 1] in [0, 1]: what the model sees
    labels: np.ndarray  # int [N]: the filed class's index
    paths: list[str]
    sizes: list[tuple[int, int]]  # each source's (height, width)


def read_films(archive: bytes, size: int, fit: str) -> dict[str, Films]:
    """The archive's films by origin folder (train, val, test), each resized as the shard stage does
    with `fit` (imaging.load_resized), at size x size grayscale."""
    opened = zipfile.ZipFile(io.BytesIO(archive))
    rows: dict[str, list[tuple]] = {}
    for name in sorted(opened.namelist()):
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "chest_xray" or not parts[3].endswith(".jpeg"):
            continue  # directories, clutter and the nested duplicate
        label = 0 if parts[2] == "NORMAL" else CLASS_NAMES.index(parts[3].split("_")[1])
        rows.setdefault(parts[1], []).append((name, label, opened.read(name)))
    found = {}
    for split, entries in rows.items():
        sources = tf.data.Dataset.from_tensor_slices([data for _, _, data in entries])
        resized = sources.map(lambda data: imaging.load_resized(data, size, size, 1, fit=fit)).batch(256)
        images, heights, widths = (np.concatenate(parts) for parts in zip(*resized.as_numpy_iterator(), strict=True))
        found[split] = Films(images.astype(np.float32) / 255.0, np.array([label for _, label, _ in entries]),
                             [name for name, _, _ in entries], list(zip(heights.tolist(), widths.tolist(), strict=True)))
    return found


def train_small_cnn(films: dict[str, Films], epochs: int, seed: int = 0) -> keras.Model:
    """The zoo's small_cnn fitted on train + val with balanced class weights, as the trainer weighs."""
    keras.utils.set_random_seed(seed)
    images = np.concatenate([films[split].images for split in ("train", "val") if split in films])
    labels = np.concatenate([films[split].labels for split in ("train", "val") if split in films])
    size = images.shape[1]
    model = zoo.build_model(ModelConfig(name="small_cnn", weights="none", trainable="full", input_size=size,
                                        dense_units=(32,), dropout=0.1), images.shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="categorical_crossentropy")
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    weights = {k: len(labels) / (len(CLASS_NAMES) * count) for k, count in enumerate(counts) if count}
    model.fit(images, keras.utils.to_categorical(labels, len(CLASS_NAMES)), batch_size=16, epochs=epochs,
              class_weight=weights, shuffle=True, verbose=0)
    return model


def predict(model: keras.Model, films: Films) -> np.ndarray:
    """Class probabilities [N, 3] for the films."""
    return model.predict(films.images, batch_size=64, verbose=0)
