"""Steps within an epoch and images/s while training, through pneumonia.progress.

fit runs with verbose=0 (Keras' own bar does not suit a pod's log), so without this a person sees
nothing between two epochs, which on the real archive are minutes apart.
"""

from __future__ import annotations

from typing import Any

import tf_keras as keras

from pneumonia.progress import Progress


class StepProgress(keras.callbacks.Callback):
    """One `Progress` per epoch, counting training steps, its rate in images/s (global batch per step)."""

    def __init__(self, steps_per_epoch: int, global_batch_size: int, epochs: int) -> None:
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = global_batch_size
        self.epochs = epochs
        self._progress: Progress | None = None
        # Batch logs stay tensors: this callback never reads them, and converting them to numbers
        # would wait for every step to finish on the device.
        self._supports_tf_logs = True

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._progress = Progress(f"train epoch {epoch + 1}/{self.epochs}", self.steps_per_epoch, unit="steps",
                                  rate_unit="images", rate_scale=self.global_batch_size, epoch=epoch)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._progress is not None:
            self._progress.update()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # An epoch cut short (preemption) closes here; a full one already closed on its last step.
        if self._progress is not None:
            self._progress.close()
            self._progress = None
