"""The training stage in one process: phases, batch and class-weight rules, resume, SIGTERM, bad config.

Data: the real preprocess and shard stages on a 96-image synthetic archive at 32x32x1 (built once
per session, copied per test), and the small CNN.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from structlog.testing import capture_logs

from pneumonia import progress
from pneumonia.config import load_config
from pneumonia.errors import EXIT_PREEMPTED, BadInputError, ConfigError, StorageError
from pneumonia.layout import Layout
from pneumonia.training import fit
from pneumonia.training.callbacks import BestWeights, HistoryRecorder, read_best_weights_record, weights_sha256
from pneumonia.training.input_position import InputPosition, start_step_variable
from pneumonia.training.step_progress import StepProgress

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# The tiny config every training test uses; each test adds data.root and a run id.
TINY = [
    "shard.image_height=32", "shard.image_width=32", "shard.channels=1", "shard.min_shards_per_split=2",
    "split.val_fraction=0.2",
    "model.name=small_cnn", "model.weights=none", "model.input_size=32", "model.dense_units=[16]",
    "train.epochs=3", "train.warmup_epochs=1", "train.per_replica_batch_size=8", "train.shuffle_buffer=64",
]


def tiny_config(root: str, run_id: str, *extra: str):
    return load_config(None, [f"data.root={root}", f"train.run_id={run_id}", *TINY, *extra])


def build_shards(root: Path, num_images: int = 96) -> None:
    """Synthetic archive -> preprocess -> shard, in this process (a few seconds)."""
    from pneumonia.data import preprocess, shard
    from pneumonia.data.demo import make_demo_archive

    archive = root / "raw" / "demo.zip"
    make_demo_archive(str(archive), num_images=num_images, seed=0)
    config = load_config(None, [f"data.root={root}", f"data.archive={archive}", *TINY])
    preprocess.run(config)
    shard.run(config)


def copy_shards(source: Path, root: str) -> None:
    """The built splits/, processed/ and the preprocess marker into `root` (a folder or gs://), so each
    test owns its runs/ (the trainer checks the marker's split config against its own)."""
    for folder in ("splits", "processed", "interim/_SUCCESS.json"):
        for path in sorted((source / folder).rglob("*")) if (source / folder).is_dir() else [source / folder]:
            if path.is_file():
                target = f"{root}/{path.relative_to(source).as_posix()}"
                tf.io.gfile.makedirs(target.rpartition("/")[0]) if not root.startswith("gs://") else None
                tf.io.gfile.copy(str(path), target, overwrite=True)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-shards")
    build_shards(root)
    return root


@pytest.fixture
def data_root(tiny_shards: Path, tmp_path: Path) -> str:
    root = tmp_path / "data"
    copy_shards(tiny_shards, str(root))
    return str(root)


def job_args(root: str, run_id: str, *extra: str) -> list[str]:
    args = []
    for item in [f"data.root={root}", f"train.run_id={run_id}", *TINY, *extra]:
        args += ["--set", item]
    return args


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "LOG_FORMAT": "json", "TF_CPP_MIN_LOG_LEVEL": "2", **(extra or {})}
    env.pop("TF_CONFIG", None)
    env.pop("JOB_COMPLETION_INDEX", None)
    return env


def events(text: str) -> list[dict]:
    """The JSON log events in a process's stderr (TensorFlow's own lines are skipped)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


class LogTail:
    """Reads a process's stderr on a thread, so a test can wait (bounded) for a log event."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self._thread.start()

    def _pump(self, process: subprocess.Popen) -> None:
        for line in iter(process.stderr.readline, ""):
            self.lines.append(line)

    def wait_for(self, predicate, timeout_s: float) -> dict:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in events("".join(self.lines)):
                if predicate(event):
                    return event
            time.sleep(0.1)
        raise AssertionError(f"no matching log event within {timeout_s} s; last lines:\n{''.join(self.lines[-20:])}")

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


def start_train(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(REPO / "jobs" / "train.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# --- rules, without training -------------------------------------------------------------------------


def test_phases_follow_model_trainable_and_scale_the_learning_rate():
    config = load_config(None, ["model.trainable=warmup", "train.epochs=5", "train.warmup_epochs=2",
                                "train.learning_rate=0.01", "train.fine_tune_learning_rate=0.001"])
    # 4 replicas x the default per-replica batch of 32: a global batch 4x the reference batch.
    warmup, fine_tune = fit.plan_phases(config, global_batch=128)
    assert (warmup.name, warmup.start_epoch, warmup.end_epoch, warmup.backbone_trainable) == ("warmup", 0, 2, False)
    assert (fine_tune.start_epoch, fine_tune.end_epoch, fine_tune.backbone_trainable) == (2, 5, True)
    assert warmup.learning_rate == pytest.approx(0.04) and fine_tune.learning_rate == pytest.approx(0.004)

    unscaled = config.replace(train=dataclasses.replace(config.train, scale_learning_rate=False))
    assert fit.plan_phases(unscaled, global_batch=128)[0].learning_rate == pytest.approx(0.01)
    # No warmup epochs: a single fine-tune phase from epoch 0; all warmup: no fine-tune phase.
    assert [p.name for p in fit.plan_phases(load_config(None, ["train.warmup_epochs=0"]))] == ["fine_tune"]
    assert [p.name for p in fit.plan_phases(load_config(None, ["train.epochs=2", "train.warmup_epochs=2"]))] == [
        "warmup"]
    frozen = fit.plan_phases(load_config(None, ["model.trainable=frozen", "train.epochs=4"]))
    assert [(p.name, p.start_epoch, p.end_epoch, p.backbone_trainable) for p in frozen] == [("frozen", 0, 4, False)]
    full = fit.plan_phases(load_config(None, ["model.trainable=full", "train.epochs=4"]))
    assert [(p.name, p.backbone_trainable) for p in full] == [("full", True)]


def test_a_fixed_global_batch_trains_at_the_same_rate_on_any_number_of_replicas():
    config = load_config(None, ["train.learning_rate=0.01", "train.per_replica_batch_size=16",
                                "train.global_batch_size=64"])
    rates = [fit.plan_phases(config, fit.resolve_global_batch(config.train, num_replicas)[0])[0].learning_rate
             for num_replicas in (1, 2, 4)]
    assert rates == [pytest.approx(0.04)] * 3  # 64 / the reference batch (per-replica 16), whatever the replicas
    # Without a fixed global batch the batch, and so the rate, grows with the replicas.
    derived = load_config(None, ["train.learning_rate=0.01", "train.per_replica_batch_size=16"])
    assert [fit.plan_phases(derived, fit.resolve_global_batch(derived.train, n)[0])[0].learning_rate
            for n in (1, 2)] == [pytest.approx(0.01), pytest.approx(0.02)]
    # A rate tuned for a global batch of 64 is used as is at 64, halved at 32.
    tuned = load_config(None, ["train.learning_rate=0.01", "train.reference_batch_size=64"])
    assert fit.plan_phases(tuned, 64)[0].learning_rate == pytest.approx(0.01)
    assert fit.plan_phases(tuned, 32)[0].learning_rate == pytest.approx(0.005)
    with pytest.raises(ConfigError, match="train.reference_batch_size"):
        load_config(None, ["train.reference_batch_size=-1"])


def test_global_batch_is_per_replica_times_replicas_or_an_even_split():
    train = load_config(None, ["train.per_replica_batch_size=16"]).train
    assert fit.resolve_global_batch(train, 3) == (48, 16)
    explicit = load_config(None, ["train.global_batch_size=64"]).train
    assert fit.resolve_global_batch(explicit, 4) == (64, 16)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        fit.resolve_global_batch(explicit, 3)


def test_class_weights_come_in_label_order_and_weight_the_loss():
    manifest = {"class_weights": {"virus": 3.0, "normal": 1.0, "bacteria": 0.5}}
    assert fit.class_weight_vector(manifest) == [1.0, 0.5, 3.0]
    with pytest.raises(BadInputError, match="virus"):
        fit.class_weight_vector({"class_weights": {"normal": 1.0, "bacteria": 1.0}})

    y_true = tf.constant([[1.0, 0, 0], [0, 0, 1.0]])
    y_pred = tf.constant([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    loss = fit.WeightedCategoricalCrossentropy([1.0, 0.5, 3.0])
    expected = np.mean([-np.log(0.7) * 1.0, -np.log(0.5) * 3.0])
    assert float(loss(y_true, y_pred)) == pytest.approx(expected, rel=1e-5)


def test_resume_config_check_ignores_only_process_keys():
    base = load_config(None, ["train.run_id=r"]).to_dict()
    moved = load_config(None, ["train.run_id=r", "train.max_epochs_this_process=1",
                               "cluster.image=registry.example/pneumonia:v2", "cluster.gpu_type=nvidia-a100-80gb",
                               "shard.num_workers=4", "report.saliency_images=3"]).to_dict()  # a resume after a fix, on other GPUs
    assert fit.comparable_config(base) == fit.comparable_config(moved)
    for setting in ("train.learning_rate=0.5", "cluster.num_workers=2", "shard.image_height=128"):
        changed = load_config(None, ["train.run_id=r", setting]).to_dict()
        assert fit.comparable_config(base) != fit.comparable_config(changed), setting


def test_history_keeps_earlier_epochs_and_drops_the_ones_a_resume_redoes(tmp_path: Path):
    earlier = [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.8}]
    recorder = HistoryRecorder(str(tmp_path / "history.json"), {"num_workers": 1}, earlier, images_per_step=8)
    recorder.on_epoch_begin(2)  # the backup ended at epoch 1: epoch 2's record is redone
    assert [r["epoch"] for r in recorder.epochs] == [0, 1]
    assert recorder.first_epoch_run == 2


def test_weights_checksum_changes_with_any_weight():
    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
    before = weights_sha256(model)
    assert weights_sha256(model) == before
    kernel = model.get_weights()
    kernel[1] = kernel[1] + 1e-6
    model.set_weights(kernel)
    assert weights_sha256(model) != before


def test_training_refuses_inputs_made_from_an_archive_replaced_since(data_root: str):
    archive = Path(data_root) / "raw" / "chest_xray.zip"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"PK the archive the shards came from")
    marker_path = Path(data_root) / "interim" / "_SUCCESS.json"
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()),
                                       "archive_identity": fit.storage.identity(str(archive))}))
    config = tiny_config(data_root, "replaced")  # no data.archive: the single zip under raw/
    fit.wait_for_current_inputs(Layout.of(config), config)  # the same archive: no wait
    archive.write_bytes(b"PK a new archive, not preprocessed yet")
    with pytest.raises(BadInputError, match="which has been replaced since"):
        fit.wait_for_current_inputs(Layout.of(config), config)


def test_best_weights_file_carries_its_epoch_and_score_across_a_resume(tmp_path: Path):
    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
    destination = str(tmp_path / "checkpoints" / "best.weights.h5")
    first = BestWeights(destination, is_chief=True, monitor="val_cohen_kappa")
    first.set_model(model)
    assert first.saved is None
    first.on_epoch_end(0, {"val_cohen_kappa": 0.5})
    first.on_epoch_end(1, {"val_cohen_kappa": 0.9})  # then a crash before epoch 1's backup: epoch 1 is redone
    first.close()
    saved_bytes = Path(destination).read_bytes()

    resumed = BestWeights(destination, is_chief=True, monitor="val_cohen_kappa")
    resumed.set_model(model)
    assert resumed.saved == {"epoch": 1, "value": pytest.approx(0.9)}  # from the file, not from a history
    resumed.on_epoch_end(1, {"val_cohen_kappa": 0.7})  # the redo scores lower: the file stays as it is
    assert Path(destination).read_bytes() == saved_bytes and resumed.saved["epoch"] == 1
    resumed.on_epoch_end(2, {"val_cohen_kappa": 0.95})
    assert resumed.saved == {"epoch": 2, "value": pytest.approx(0.95)}
    assert read_best_weights_record(destination, str(tmp_path)) == resumed.saved
    model.load_weights(destination)  # the attributes do not get in the way of loading
    resumed.close()


# --- training in this process ------------------------------------------------------------------------


def test_stop_after_one_epoch_then_resume_across_the_warmup_switch(data_root: str):
    """Stops at the warmup -> fine-tune boundary, resumes in phase two, and skips a finished run."""
    stopped = fit.run(tiny_config(data_root, "resume", "train.max_epochs_this_process=1"))
    run_dir = Path(data_root) / "runs" / "resume"
    assert stopped is None
    assert not (run_dir / "_SUCCESS.json").exists()
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [0] and history["complete"] is False
    assert (run_dir / "backup" / "warmup" / "chief" / "checkpoint").exists()

    done = fit.run(tiny_config(data_root, "resume"))
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [0, 1, 2]
    assert history["complete"] is True and history["num_replicas"] == 1 and history["global_batch_size"] == 8
    # Epoch 0 ran at the warmup rate, epochs 1-2 at the fine-tune rate: the resumed process started in phase two.
    assert [r["learning_rate"] for r in history["epochs"]] == pytest.approx([1e-3, 1e-4, 1e-4])
    assert all(r["images_per_second"] > 0 and "val_cohen_kappa" in r for r in history["epochs"])
    marker = json.loads((run_dir / "_SUCCESS.json").read_text())
    assert marker == done and marker["weights_sha256"]
    best = run_dir / "checkpoints" / "best.weights.h5"
    assert marker["best_weights_sha256"] == fit.storage.sha256_file(str(best))
    best_epoch = max(history["epochs"], key=lambda r: r["val_cohen_kappa"])["epoch"]  # the first of any ties
    assert marker["best"]["epoch"] == best_epoch
    assert marker["best"]["value"] == pytest.approx(history["epochs"][best_epoch]["val_cohen_kappa"])
    assert not (run_dir / "backup").exists()  # removed once the marker exists
    tags = {value.tag for path in (run_dir / "tensorboard").glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value}
    assert "_hparams_/session_start_info" in tags  # the chief's HParams session, for TensorBoard's HParams tab

    exported = keras.models.load_model(str(run_dir / "model" / "1"), compile=False)
    probabilities = exported(np.zeros((2, 32, 32, 1), np.float32)).numpy()
    assert probabilities.shape == (2, 3) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The export holds the best checkpoint, calibrated on val (tests/test_export.py checks the weights).
    assert marker["export"]["best_epoch"] == best_epoch and marker["export"]["dtype"] == "float32"
    assert marker["export"]["temperature"] == json.loads((run_dir / "calibration.json").read_text())["temperature"]

    again = fit.run(tiny_config(data_root, "resume"))
    assert again == marker  # already done: nothing retrained
    with pytest.raises(BadInputError, match=r"already finished with a different config \(changed: "
                                            r"train\.learning_rate;"):
        fit.run(tiny_config(data_root, "resume", "train.learning_rate=0.01"))


def test_a_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(data_root: str):
    """The resumed epoch draws the data and augmentation the uninterrupted run's did (not epoch 0's again)."""
    one_phase = ("model.trainable=full", "train.warmup_epochs=0", "train.epochs=2", "model.dropout=0")
    whole = fit.run(tiny_config(data_root, "whole", *one_phase))
    assert fit.run(tiny_config(data_root, "split", "train.max_epochs_this_process=1", *one_phase)) is None
    resumed = fit.run(tiny_config(data_root, "split", *one_phase))
    assert resumed["weights_sha256"] == whole["weights_sha256"]


def test_backup_every_n_steps_resumes_inside_the_epoch(tmp_path: Path):
    """A crash mid-epoch with backup_every_n_steps: the next fit starts at the step after the last backup."""
    from pneumonia.training.callbacks import PreemptionWatch, ResumableBackup

    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[np.arange(64) % 3]

    class Crash(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):  # noqa: ANN001
            if self.model._crash_at == (self.epoch, batch):
                raise RuntimeError("simulated crash")

        def on_epoch_begin(self, epoch, logs=None):  # noqa: ANN001
            self.epoch = epoch

    class Seen(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[tuple[int, int]] = []

        def on_epoch_begin(self, epoch, logs=None):  # noqa: ANN001
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):  # noqa: ANN001
            self.steps.append((self.epoch, batch))

    def attempt(crash_at):  # noqa: ANN001, ANN202
        model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(keras.optimizers.Adam(0.01), "categorical_crossentropy")
        model._crash_at = crash_at
        seen = Seen()
        backup = ResumableBackup(str(tmp_path / "backup"), PreemptionWatch(), every_n_steps=3)
        position = InputPosition(start_step_variable(), initial_epoch=0)
        callbacks = [seen, backup, position, StepProgress(8, global_batch_size=8, epochs=3, position=position), Crash()]
        try:
            model.fit(x, y, batch_size=8, epochs=3, callbacks=callbacks, verbose=0)
        except RuntimeError:
            pass
        return seen.steps

    saved = progress.settings()
    progress.configure(live=False, every_s=0.0, min_gap_s=0.0)  # a progress line after every step
    try:
        first = attempt(crash_at=(1, 5))  # 8 steps per epoch; backups after steps 2 and 5 would be at 3 and 6
        assert first[-1] == (1, 5)
        with capture_logs() as events:
            second = attempt(crash_at=None)
    finally:
        progress._settings = saved  # noqa: SLF001 - process-wide state, put back for the next test
    # The last backup before the crash was after step 2 of epoch 1 (steps 0-2 done): resume at step 3.
    assert second[0] == (1, 3)
    assert second[-1] == (2, 7)
    # The step progress of the resumed epoch counts on from there (4 of 8 after its first step), not from 0.
    steps = [(e["task"], e["done"], e["percent"]) for e in events if e.get("task", "").startswith("train epoch")]
    assert steps[0] == ("train epoch 2/3", 4, 50.0), steps
    assert [done for task, done, _ in steps if task == "train epoch 2/3"] == [4, 5, 6, 7, 8]
    assert [done for task, done, _ in steps if task == "train epoch 3/3"] == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_saves_the_backup_exits_143_and_the_rerun_resumes(data_root: str):
    args = job_args(data_root, "sigterm", "model.trainable=full", "train.epochs=40", "train.warmup_epochs=0")
    env = subprocess_env()
    process = start_train(args, env)
    tail = LogTail(process)
    try:
        tail.wait_for(lambda e: e.get("event") == "epoch begin" and e.get("epoch") == 2, timeout_s=120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == EXIT_PREEMPTED
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    first = events(tail.text())
    stop = next(e for e in first if e.get("event") == "stop requested (SIGTERM): backup saved")
    assert stop["epoch"] >= 2

    short = job_args(data_root, "sigterm", "model.trainable=full", "train.epochs=40", "train.warmup_epochs=0",
                     "train.max_epochs_this_process=1")
    rerun = subprocess.run([PYTHON, str(REPO / "jobs" / "train.py"), *short], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [e["epoch"] for e in events(rerun.stderr) if e.get("event") == "epoch begin"]
    # The stop came mid-epoch (or at the first step of the next): the rerun redoes that epoch, not epoch 0.
    assert resumed == [stop["epoch"]]


@pytest.mark.parametrize("override, key", [
    ("model.name=resnet9000", "model.name"),
    ("train.per_replica_batch_size=0", "train.per_replica_batch_size"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, override: str, key: str):
    result = subprocess.run([PYTHON, str(REPO / "jobs" / "train.py"), "--set", f"data.root={tmp_path}",
                             "--set", override], env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert key in result.stderr


def test_missing_shards_exit_2_at_once(tmp_path: Path):
    result = subprocess.run([PYTHON, str(REPO / "jobs" / "train.py"), *job_args(str(tmp_path), "noshards")],
                            env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "shard" in result.stderr and "_SUCCESS.json" in result.stderr
    assert not (tmp_path / "runs" / "noshards" / "_SUCCESS.json").exists()


def test_a_shard_damaged_in_storage_is_named_before_training_starts(data_root: str):
    processed = Path(data_root) / "processed"
    victim = next(path for path in sorted(processed.rglob("train-*.tfrecord")))
    victim.write_bytes(victim.read_bytes()[:-5])  # cut short after the shard stage checked it
    with pytest.raises(StorageError, match=f"shard {victim} has .* bytes.*rerun the shard stage") as caught:
        fit.run(tiny_config(data_root, "damaged"))
    assert caught.value.exit_code == 1  # storage, retried: never bad input
    assert not (Path(data_root) / "runs" / "damaged" / "_SUCCESS.json").exists()


def test_inputs_from_another_split_are_refused(data_root: str):
    # interim/ and the shards of an earlier config stay in place until the upstream stages redo
    # them; training must not take them for this config's split.
    with pytest.raises(BadInputError, match="interim/ was split with"):
        fit.run(tiny_config(data_root, "other-seed", "split.seed=7"))
    manifest = Path(data_root) / "splits" / "split.json"
    manifest.write_text(manifest.read_text() + "\n")  # same rows, other bytes: not what was sharded
    with pytest.raises(BadInputError, match="written from another split manifest"):
        fit.run(tiny_config(data_root, "other-manifest"))
    assert not (Path(data_root) / "runs" / "other-seed").exists()
