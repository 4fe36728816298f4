"""Where the training input starts: the step at which fit resumes, so a resumed run draws its data as
an uninterrupted one does (pipeline.make_dataset's `start_step`)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras as keras

from pneumonia.logs import get_logger

log = get_logger(__name__)


def start_step_variable() -> tf.Variable:
    """The variable the training dataset reads its start step from, on the host: tf.data runs there."""
    with tf.device("/cpu:0"):
        return tf.Variable(0, dtype=tf.int64, trainable=False, name="input_start_step")


class InputPosition(keras.callbacks.Callback):
    """Sets the start step to the (epoch, step) where this fit call resumes, before it reads any data.

    fit decides where it resumes only after its callbacks' on_train_begin restored the backup, then
    creates its data iterator: put this callback after the backup callback. It asks Keras the very
    question fit asks next, so data and training cannot disagree on the resume point.
    """

    def __init__(self, start_step: tf.Variable, initial_epoch: int) -> None:
        super().__init__()
        self.start_step = start_step
        self.initial_epoch = initial_epoch
        # Where this fit call resumes, once on_train_begin has run (StepProgress counts from there).
        self.epoch, self.step = initial_epoch, 0

    def on_train_begin(self, logs: Any = None) -> None:
        steps = int(self.params["steps"])
        epoch, step = self.model._maybe_load_initial_counters_from_ckpt(steps, self.initial_epoch)  # noqa: SLF001
        self.epoch, self.step = int(epoch), int(step)
        self.start_step.assign(self.epoch * steps + self.step)
        log.info("input position", epoch=self.epoch, step=self.step)
