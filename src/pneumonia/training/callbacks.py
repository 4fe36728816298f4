"""Training callbacks: backup and resume (also on SIGTERM), best-weights checkpoint, history, epoch limit.

They keep a run resumable: whatever kills a process (SIGKILL, preemption, a peer's death), the next
attempt restores the backup and continues at the same epoch, with the history and the best score
of the epochs before it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import h5py
import numpy as np
import tensorflow as tf
import tf_keras as keras

from pneumonia import storage
from pneumonia.logs import get_logger

log = get_logger(__name__)

# The parent class only uses an integer save_freq to switch its restore to (epoch, batch)
# bookkeeping; this callback decides itself when to save, so the integer's value is unused.
_BATCH_AWARE = 2**62


def weights_sha256(model: keras.Model) -> str:
    """A checksum of the model's weights (values, shapes and order): equal on workers in sync."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        array = np.ascontiguousarray(array)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class PreemptionWatch:
    """Turns SIGTERM into a request to stop after saving, agreed by every worker.

    Kubernetes sends SIGTERM on preemption, eviction or a node drain, and kills the pod after the
    grace period. The handler only sets a flag; the backup callback asks the workers every few
    steps (see ResumableBackup) and they save together at the step where they agree.

    Why not TensorFlow's own PreemptionCheckpointHandler (BackupAndRestore(save_before_preemption=True))?
    tf_keras 2.21 turns it on only when the GCE metadata server answers (off on loopback and in
    tests), and on GCP it then watches the VM's maintenance event instead of SIGTERM, so a pod
    eviction or drain would go unseen. It also keeps its step keys in the coordination service for
    the life of the cluster, which a second fit() (the fine-tune phase) cannot reuse.
    """

    def __init__(self, strategy: tf.distribute.Strategy | None = None, multi_worker: bool = False) -> None:
        self._event = threading.Event()
        self._strategy = strategy
        self._multi_worker = multi_worker
        self._previous: Any = None
        self._agree_fn: Any = None
        self.signal_time: float | None = None

    def install(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signal_time = time.monotonic()
        self._event.set()

    def request(self) -> None:
        """Marks a stop as requested (what the handler does; tests call it directly)."""
        self._event.set()

    @property
    def requested_here(self) -> bool:
        return self._event.is_set()

    def agreed(self) -> bool:
        """Whether any worker was asked to stop; every worker must call this at the same step.

        With several workers a one-scalar all-reduce tells everybody (and waits for the step's
        work to finish: call it every few steps, not every step); a worker alone reads its flag.
        """
        if not self._multi_worker or self._strategy is None:
            return self.requested_here
        if self._agree_fn is None:
            strategy = self._strategy

            @tf.function
            def agree(flag: tf.Tensor) -> tf.Tensor:
                per_replica = strategy.run(lambda: tf.identity(flag))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            self._agree_fn = agree
        total = self._agree_fn(tf.constant(1.0 if self.requested_here else 0.0))
        return float(total) > 0.0


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that saves at every epoch end, every N steps if asked, and on SIGTERM.

    The restore is always (epoch, batch) aware, so a mid-epoch save (N steps, or preemption)
    resumes at the next step rather than skipping the rest of the epoch. The backup is never deleted
    here: a run with two phases (warmup, fine-tune) must find phase one's backup after phase one
    ends; the trainer deletes the backups once the run's marker is written.

    Whether a worker was asked to stop is agreed every `check_every_n_steps` steps and at each
    epoch's last step, the same steps on every worker. Agreeing costs an all-reduce and a wait for
    the step to finish (a stall of the asynchronous dispatch on a GPU); every few steps that cost
    is shared out, while a stop still comes within N steps, well inside the pod's grace period.
    """

    def __init__(self, backup_dir: str, watch: PreemptionWatch, every_n_steps: int = 0,
                 check_every_n_steps: int = 1) -> None:
        super().__init__(backup_dir, save_freq=_BATCH_AWARE, delete_checkpoint=False)
        self.watch = watch
        self.every_n_steps = every_n_steps
        self.check_every_n_steps = max(1, check_every_n_steps)
        self.preempted = False  # a stop was requested: the process exits 143 after fit returns
        self.cut_short = False  # ...and it came mid-epoch: this epoch's metrics are not an epoch's
        self._stop_at_epoch_end = False

    def _implements_train_batch_hooks(self) -> bool:
        return True

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        steps = self.params.get("steps") or 0
        last_step = bool(steps) and batch == steps - 1
        check = last_step or (batch + 1) % self.check_every_n_steps == 0
        if check and not self._stop_at_epoch_end and self.watch.agreed():
            if last_step:
                # A backup at the last step reads as "epoch done" on restore; finish the epoch
                # (validation, history, best weights) so that record is not lost.
                self._stop_at_epoch_end = True
                return
            self._backup(epoch=self._current_epoch, batch=batch)
            self.preempted = self.cut_short = True
            self.model.stop_training = True
            log.warning("stop requested (SIGTERM): backup saved", epoch=self._current_epoch, step=batch,
                        backup_dir=self.backup_dir)
            return
        if self.every_n_steps and (batch + 1) % self.every_n_steps == 0 and not last_step:
            # The last step's state is saved at the epoch end, after validation and the
            # history, so a crash in between redoes the epoch instead of losing its record.
            self._backup(epoch=self._current_epoch, batch=batch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.cut_short:
            return
        self._backup(epoch=epoch)
        log.info("backup saved", epoch=epoch, backup_dir=self.backup_dir)
        if self._stop_at_epoch_end:
            self.preempted = True
            self.model.stop_training = True
            log.warning("stop requested (SIGTERM): backup saved", epoch=epoch + 1, step=0,
                        backup_dir=self.backup_dir)


class EpochLimit(keras.callbacks.Callback):
    """Stops the process cleanly after `max_epochs` whole epochs (0: never); counts across phases."""

    def __init__(self, max_epochs: int) -> None:
        super().__init__()
        self.max_epochs = max_epochs
        self.epochs_run = 0

    @property
    def reached(self) -> bool:
        return bool(self.max_epochs) and self.epochs_run >= self.max_epochs

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.epochs_run += 1
        if self.reached:
            self.model.stop_training = True


class BestWeights(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint (best val_cohen_kappa, weights only, HDF5) whose file reaches gs:// too.

    h5py writes only local files, so Keras saves to a local scratch file on every worker (Keras
    itself moves non-chief saves into a throwaway folder), and the chief copies an improved file
    to `destination` atomically. The file carries its own epoch and score as HDF5 attributes, so
    what it holds is known whatever happened around it: a resume starts from that score (a worse
    first epoch after a restart does not replace a better checkpoint), and the run marker reports
    it. The history is no substitute: a crash after this file but before the epoch's backup redoes
    the epoch, and the history then keeps the redo while this file keeps the first attempt.
    """

    def __init__(self, destination: str, is_chief: bool, monitor: str = "val_cohen_kappa",
                 skip: Any = None) -> None:
        self._scratch = tempfile.mkdtemp(prefix="pneumonia-best-")
        self.destination = destination
        self.saved = read_best_weights_record(destination, self._scratch)  # {"epoch", "value"} or None
        super().__init__(os.path.join(self._scratch, "best.weights.h5"), monitor=monitor, mode="max",
                         save_best_only=True, save_weights_only=True,
                         initial_value_threshold=self.saved["value"] if self.saved else None)
        self.is_chief = is_chief
        self._skip = skip or (lambda: False)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self._skip():
            return  # an epoch cut short by a stop request is not a complete epoch to compare
        before = self.best
        super().on_epoch_end(epoch, logs)
        if self.best == before:
            return
        self.saved = {"epoch": int(epoch), "value": float(self.best)}
        if self.is_chief:
            with h5py.File(self.filepath, "a") as weights:
                weights.attrs[_BEST_EPOCH_ATTR] = self.saved["epoch"]
                weights.attrs[_BEST_VALUE_ATTR] = self.saved["value"]
            storage.copy_from_local(self.filepath, self.destination)
            log.info("best weights", epoch=epoch, monitor=self.monitor, value=self.saved["value"],
                     path=self.destination)

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)


_BEST_EPOCH_ATTR = "pneumonia_best_epoch"
_BEST_VALUE_ATTR = "pneumonia_best_value"


def read_best_weights_record(path: str, scratch_dir: str) -> dict[str, Any] | None:
    """{"epoch", "value"} stored in a best-weights file by BestWeights; None when there is no such file."""
    if not storage.exists(path):
        return None
    local = os.path.join(scratch_dir, "previous-best.weights.h5")
    tf.io.gfile.copy(path, local, overwrite=True)  # h5py reads local files only
    try:
        with h5py.File(local, "r") as weights:
            if _BEST_EPOCH_ATTR not in weights.attrs:
                return None  # written before the file carried its score: the next epoch replaces it
            return {"epoch": int(weights.attrs[_BEST_EPOCH_ATTR]), "value": float(weights.attrs[_BEST_VALUE_ATTR])}
    except OSError:
        return None  # not an HDF5 file (truncated by hand, say): the next epoch replaces it
    finally:
        os.remove(local)


class HistoryRecorder(keras.callbacks.Callback):
    """Per-epoch metrics, wall time and images/s in history.json, rewritten (atomically) every epoch.

    The file holds the epochs of earlier attempts too: on a resume the first epoch run tells which
    recorded epochs the backup does not cover, and only those are dropped (they will be redone).
    Put it before the backup callback, so an epoch is recorded before its backup exists.
    """

    def __init__(self, path: str | None, meta: dict[str, Any], epochs: list[dict[str, Any]] | None,
                 images_per_step: int, skip: Any = None) -> None:
        super().__init__()
        self.path = path  # None on non-chief workers: they keep the record only in memory
        self.meta = dict(meta)
        self.epochs = list(epochs or [])
        self.images_per_step = images_per_step
        self._skip = skip or (lambda: False)
        self._first_epoch_seen = False
        self._epoch_start = 0.0
        self._train_end = 0.0
        self.first_epoch_run: int | None = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if not self._first_epoch_seen:
            self._first_epoch_seen = True
            self.first_epoch_run = epoch
            self.epochs = [record for record in self.epochs if record["epoch"] < epoch]
        log.info("epoch begin", epoch=epoch)
        self._epoch_start = time.monotonic()
        self._train_end = 0.0

    def on_test_begin(self, logs: Any = None) -> None:
        if self._epoch_start and not self._train_end:
            self._train_end = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self._skip():
            return
        now = time.monotonic()
        train_seconds = (self._train_end or now) - self._epoch_start
        steps = self.params.get("steps") or 0
        record = {"epoch": int(epoch)}
        record.update({key: _plain(value) for key, value in (logs or {}).items()})
        record["seconds"] = round(now - self._epoch_start, 3)
        record["train_seconds"] = round(train_seconds, 3)
        record["images_per_second"] = round(steps * self.images_per_step / train_seconds, 2) if train_seconds else None
        record["learning_rate"] = _plain(keras.backend.get_value(self.model.optimizer.learning_rate))
        self.epochs = [r for r in self.epochs if r["epoch"] < epoch] + [record]
        log.info("epoch end", epoch=epoch, loss=record.get("loss"), val_loss=record.get("val_loss"),
                 val_cohen_kappa=record.get("val_cohen_kappa"), seconds=record["seconds"],
                 images_per_second=record["images_per_second"])
        self.write(complete=False)

    def document(self, complete: bool) -> dict[str, Any]:
        return {"epochs": self.epochs, **self.meta, "complete": complete}

    def write(self, complete: bool) -> None:
        if self.path:
            storage.write_json(self.path, self.document(complete))


def _plain(value: Any) -> Any:
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value
