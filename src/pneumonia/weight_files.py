"""Weights files, local or gs://: h5py reads and writes only local files, so a gs:// file goes through
a local temp copy. `model/` builds networks from local files only; runs and configs meet storage here."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator

import tf_keras as keras

from pneumonia import storage
from pneumonia.config import ModelConfig
from pneumonia.errors import BadInputError, ConfigError
from pneumonia.model import zoo


def load_weights(model: keras.Model, path: str) -> None:
    """Loads a `*.weights.h5` file (local or gs://) into `model`; BadInputError if it is missing."""
    if not storage.exists(path):
        raise BadInputError(f"weights file {path} does not exist; train the run first (jobs/train.py)")
    with local_copy(path) as local:
        model.load_weights(local)


def save_weights(model: keras.Model, path: str) -> None:
    """Saves `model`'s weights as HDF5 to `path` (local or gs://), atomically.

    h5py can only write a local file, so the weights go to a local temp file first and are then
    copied under a temporary name beside `path`, renamed and checked, as every other output.
    """
    scratch = tempfile.mkdtemp(prefix="pneumonia-weights-")
    try:
        local = os.path.join(scratch, "model.weights.h5")  # the .h5 suffix selects the HDF5 format
        model.save_weights(local)
        storage.copy_from_local(local, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def local_model_config(model_config: ModelConfig) -> Iterator[ModelConfig]:
    """`model_config` with a gs:// `model.weights` file copied to a local temp for the duration, for
    zoo.build_model; errors still name the gs:// path the config gave."""
    weights = model_config.weights.strip()
    if not storage.is_gcs(weights):
        yield model_config
        return
    if not storage.exists(weights):
        raise ConfigError(f"config key model.weights = {weights!r} is invalid: no such file; "
                          + zoo.FETCH_WEIGHTS_HINT + " (or use imagenet when online, none for random)")
    with local_copy(weights) as local:
        try:
            yield dataclasses.replace(model_config, weights=local)
        except ConfigError as error:
            raise ConfigError(str(error).replace(local, weights)) from None


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """h5py reads only local files: gs:// paths are copied to a temp file for the duration."""
    if not storage.is_gcs(path):
        yield path
        return
    scratch = tempfile.mkdtemp(prefix="pneumonia-weights-")
    try:
        local = os.path.join(scratch, path.rpartition("/")[2])
        storage.copy_to_local(path, local)
        yield local
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
