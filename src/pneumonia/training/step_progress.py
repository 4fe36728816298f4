"""Steps within an epoch and images/s while training, through pneumonia.progress.

fit runs with verbose=0 (Keras' own bar does not suit a pod's log), so without this a person sees
nothing between two epochs, which on the real archive are minutes apart.
"""

from __future__ import annotations

from typing import Any

import tf_keras as keras

from pneumonia.progress import Progress
from pneumonia.training.input_position import InputPosition


class StepProgress(keras.callbacks.Callback):
    """One `Progress` per epoch, counting training steps, its rate in images/s (global batch per step).

    `position`: the fit call's InputPosition (placed before this callback); an epoch resumed
    mid-way then counts from the step it resumed at, not from 0.
    """

    def __init__(self, steps_per_epoch: int, global_batch_size: int, epochs: int,
                 position: InputPosition | None = None) -> None:
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = global_batch_size
        self.epochs = epochs
        self.position = position
        self._progress: Progress | None = None
        # Batch logs stay tensors: this callback never reads them, and converting them to numbers
        # would wait for every step to finish on the device.
        self._supports_tf_logs = True

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        resumed_at = self.position.step if self.position is not None and epoch == self.position.epoch else 0
        self._progress = Progress(f"train epoch {epoch + 1}/{self.epochs}", self.steps_per_epoch, unit="steps",
                                  rate_unit="images", rate_scale=self.global_batch_size, start=resumed_at,
                                  epoch=epoch)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        # `batch` is the step's index within the epoch, also after a resume: steps done = batch + 1.
        if self._progress is not None and batch + 1 > self._progress.done:
            self._progress.update(batch + 1 - self._progress.done)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # An epoch cut short (preemption) closes here; a full one already closed on its last step.
        if self._progress is not None:
            self._progress.close()
            self._progress = None
