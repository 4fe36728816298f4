"""The training stage: shards -> runs/<run_id>/ (config, best weights, history, export, marker).

Resumable at every level: a finished run is skipped, an interrupted one continues from its backup
at the epoch (or step) where it stopped, across the warmup -> fine-tune switch too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras
import yaml

from pneumonia import cluster, hparams, storage, weight_files
from pneumonia.config import CLASS_NAMES, FREE, RECORDED, PipelineConfig, TrainConfig, declared_keys
from pneumonia.data import pipeline, upstream
from pneumonia.errors import EXIT_PREEMPTED, BadInputError, ConfigError, PeerLostError, UpstreamMissingError
from pneumonia.layout import Layout
from pneumonia.logs import get_logger
from pneumonia.model import zoo
from pneumonia.model.metrics import build_metrics
from pneumonia.training import export, peers
from pneumonia.training.callbacks import (
    BestWeights,
    EpochLimit,
    HistoryRecorder,
    PreemptionWatch,
    ResumableBackup,
    weights_sha256,
)
from pneumonia.training.input_position import InputPosition, start_step_variable
from pneumonia.training.step_progress import StepProgress

log = get_logger(__name__)

MONITOR = "val_cohen_kappa"
# Keys that steer only this process or where and from what image it runs, not what is trained, are
# declared in config.py (resume=FREE or RECORDED): a resume may change them.
_RESUME_MAY_CHANGE = (FREE, RECORDED)


@dataclass(frozen=True)
class Phase:
    """A span of epochs [start_epoch, end_epoch) trained with one backbone setting and learning rate."""

    name: str
    start_epoch: int
    end_epoch: int
    backbone_trainable: bool
    learning_rate: float


def learning_rate_scale(train: TrainConfig, global_batch: int) -> float:
    """The linear scaling rule: global batch / the batch the rates were set for.

    The rates are set for a global batch of train.reference_batch_size (0: the per-replica batch,
    the batch of one replica). The global batch, not the replica count, is what changes the
    gradient noise: a fixed train.global_batch_size trains at the same rate on 1 or 4 workers.
    """
    if not train.scale_learning_rate:
        return 1.0
    return global_batch / (train.reference_batch_size or train.per_replica_batch_size)


def plan_phases(config: PipelineConfig, global_batch: int | None = None) -> list[Phase]:
    """warmup: head only for train.warmup_epochs, then everything at the fine-tune rate; else one phase.

    The rates are scaled for `global_batch` (learning_rate_scale); None: unscaled.
    """
    train = config.train
    scale = learning_rate_scale(train, global_batch) if global_batch else 1.0
    lr, fine_lr = train.learning_rate * scale, train.fine_tune_learning_rate * scale
    if config.model.trainable == "frozen":
        return [Phase("frozen", 0, train.epochs, False, lr)]
    if config.model.trainable == "full":
        return [Phase("full", 0, train.epochs, True, lr)]
    phases = [Phase("warmup", 0, train.warmup_epochs, False, lr),
              Phase("fine_tune", train.warmup_epochs, train.epochs, True, fine_lr)]
    return [phase for phase in phases if phase.end_epoch > phase.start_epoch]


def resolve_global_batch(train: TrainConfig, num_replicas: int) -> tuple[int, int]:
    """(global batch, per-replica batch); an explicit global batch must split evenly over the replicas."""
    if train.global_batch_size:
        if train.global_batch_size % num_replicas:
            raise ConfigError(f"config key train.global_batch_size = {train.global_batch_size} is invalid: "
                              f"expected a multiple of the number of replicas ({num_replicas})")
        return train.global_batch_size, train.global_batch_size // num_replicas
    return train.per_replica_batch_size * num_replicas, train.per_replica_batch_size


def class_weight_vector(manifest: dict[str, Any]) -> list[float]:
    """The split manifest's class weights in label order (CLASS_NAMES)."""
    weights = manifest.get("class_weights") or {}
    missing = [name for name in CLASS_NAMES if name not in weights]
    if missing:
        raise BadInputError(f"the split manifest's class_weights lack {', '.join(missing)}; rerun preprocess "
                            "(or set train.class_weights=false)")
    return [float(weights[name]) for name in CLASS_NAMES]


class WeightedCategoricalCrossentropy(keras.losses.Loss):
    """Cross-entropy scaled per example by its class weight: fit's class_weight, done in the loss.

    tf_keras applies `class_weight` by mapping the input dataset, which a distributed dataset does
    not allow; weighting in the loss works under every strategy and leaves the metrics unweighted.
    """

    def __init__(self, class_weights: list[float], name: str = "weighted_categorical_crossentropy",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(w) for w in class_weights]

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_pred = tf.cast(y_pred, tf.float32)
        y_true = tf.cast(y_true, tf.float32)
        per_example = keras.losses.categorical_crossentropy(y_true, y_pred)
        return per_example * tf.reduce_sum(y_true * tf.constant(self.class_weights), axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_weights": self.class_weights}


def validation_dataset(processed_dir: str, global_batch: int, config: PipelineConfig) -> tf.data.Dataset:
    """One pass over val in global batches, which Keras splits over the replicas itself.

    A distributed dataset would need validation_steps, and with files split unevenly between
    workers no single count is right; Keras's own distribution of a plain dataset runs until
    every worker is out of data (partial batches included). DATA sharding: each worker keeps every
    n-th example, so each is evaluated exactly once however the files fall.
    """
    dataset = pipeline.make_dataset(processed_dir, "val", global_batch, training=False, config=config)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def wait_for_current_inputs(layout: Layout, config: PipelineConfig, poll_s: float = 10.0) -> tuple[dict, bytes]:
    """The shards' marker and the split manifest, once both come from this config's split.

    An existing marker is not enough: after a config change (kubectl apply with a new split.seed,
    say) the old interim/ and shards stay in place until the upstream stages redo them, and
    training on them would mix two splits. Waits (bounded) while they lag; exit 2 past the wait.
    """
    timeout_s = config.cluster.upstream_wait_timeout_s
    deadline = time.monotonic() + timeout_s
    processed_dir = layout.processed(config.shard.size_dir)
    for path, what in ((layout.interim_marker, "the preprocess marker"), (layout.split_manifest, "the split manifest"),
                       (layout.processed_marker(config.shard.size_dir), "the shards")):
        storage.wait_for(path, max(0.0, deadline - time.monotonic()), what=what)

    def check() -> tuple[tuple[dict, bytes], list[str]]:
        interim_marker = upstream.read_interim_marker(layout)
        manifest_bytes = storage.read_bytes(layout.split_manifest)
        marker = pipeline.read_marker(processed_dir)
        problems = (["interim/_SUCCESS.json cannot be read (being replaced?)"] if interim_marker is None else
                    [upstream.describe_mismatch(found) for found in upstream.interim_mismatches(interim_marker, config)])
        if marker.get("split_manifest", {}).get("sha256") != hashlib.sha256(manifest_bytes).hexdigest():
            problems.append(f"the shards in {processed_dir} were written from another split manifest (rerun shard)")
        return (marker, manifest_bytes), problems

    return upstream.wait_until_current(
        check, deadline=deadline, poll_s=poll_s, waiting_for="upstream stages to catch up with this config",
        give_up=lambda _, problems: BadInputError("the training inputs do not match this config: "
                                                  + "; ".join(problems)))


def comparable_config(tree: dict[str, Any], config: PipelineConfig | None = None) -> dict[str, Any]:
    """The config without the keys a resume may change (they steer one process, not the run), as
    `config`'s fields declare them (default: PipelineConfig's)."""
    tree = {section: dict(values) for section, values in tree.items()}
    for name in declared_keys(config, resume=_RESUME_MAY_CHANGE):
        section, key = name.split(".")
        tree.get(section, {}).pop(key, None)
    return tree


def changed_keys(previous: dict[str, Any], config: PipelineConfig) -> list[str]:
    """The section.key names whose values differ between a run's saved config and `config`,
    leaving out the keys a resume may change (comparable_config)."""
    before, now = comparable_config(previous, config), comparable_config(config.to_dict(), config)
    return sorted(f"{section}.{key}" for section in sorted(set(before) | set(now))
                  for key in set(before.get(section, {})) | set(now.get(section, {}))
                  if before.get(section, {}).get(key) != now.get(section, {}).get(key))


def run(config: PipelineConfig) -> dict[str, Any] | None:
    """Trains `config.train.run_id`; returns the run marker, or None when stopped early on purpose.

    Exits 143 (errors.EXIT_PREEMPTED) after saving the backup when SIGTERM arrives.
    """
    layout = Layout.of(config)
    run_id = config.train.run_id
    if not run_id:
        raise ConfigError("config key train.run_id is empty; the entrypoint sets one (pass --set train.run_id=...)")
    # Before the strategy: a worker replaced after the run finished must not wait for peers that
    # are gone (file reads run no TensorFlow op, so the collectives can still be configured).
    finished = _already_finished(layout, config)
    if finished is not None:
        return finished
    # Config checks and the (possibly hours-long) wait for the upstream stages also come before the
    # cluster forms: a slow scale-up or a preempted peer during that wait must not spend retries.
    _check_resume_config(layout, config)
    cluster.check_xla(config.model.xla, cluster.planned_spec(config.cluster), cluster.num_gpus())
    marker, manifest_bytes = wait_for_current_inputs(layout, config)
    # Damaged in storage since the shard stage checked them: say so and which stage rewrites them,
    # rather than a DataLossError hours into an epoch (StorageError: exit 1, retried).
    pipeline.verify_shards(layout.processed(config.shard.size_dir), ("train", "val"))
    # The strategy comes before any TensorFlow op: collectives must be configured at start-up.
    strategy, spec = cluster.make_strategy(config.cluster)

    size_dir = config.shard.size_dir
    processed_dir = layout.processed(size_dir)
    manifest = json.loads(manifest_bytes)

    num_replicas = strategy.num_replicas_in_sync
    global_batch, per_replica_batch = resolve_global_batch(config.train, num_replicas)
    steps = pipeline.steps_per_epoch(marker, "train", global_batch)
    pipeline.num_records(marker, "val")  # fails early (exit 2) when there is nothing to validate on
    phases = plan_phases(config, global_batch)
    image = marker["image"]
    input_shape = (int(image["height"]), int(image["width"]), int(image["channels"]))
    weights = class_weight_vector(manifest) if config.train.class_weights else None
    strategy_name = ("MultiWorkerMirroredStrategy" if spec.is_multi_worker
                     else "MirroredStrategy" if num_replicas > 1 else "default")

    if spec.is_chief:
        storage.write_text(layout.run_config(run_id), config.to_yaml())
        hparams.write_run_hparams(layout.tensorboard(run_id), run_id, comparable_config(config.to_dict()))
    history_path = layout.history(run_id)
    previous = storage.read_json(history_path) if storage.exists(history_path) else {}
    meta = {
        "run_id": run_id, "strategy": strategy_name, "num_replicas": num_replicas,
        "num_workers": spec.num_workers, "global_batch_size": global_batch,
        "per_replica_batch_size": per_replica_batch, "steps_per_epoch": steps, "epochs_planned": config.train.epochs,
        "phases": [dataclasses.asdict(phase) for phase in phases], "class_weights": weights,
        "monitor": MONITOR, "input_shape": list(input_shape),
        # What the run trained on: evaluate refuses test shards from another split.
        "inputs": {"split_manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                   "shards_fingerprint": marker.get("fingerprint")},
    }
    log.info("training plan", **{k: v for k, v in meta.items() if k != "phases"},
             phases=[f"{p.name}:{p.start_epoch}-{p.end_epoch}@{p.learning_rate:g}" for p in phases],
             resuming=bool(previous.get("epochs")))

    # Same seed, same initial weights on every worker and in every rerun of a config.
    keras.utils.set_random_seed(config.train.seed)
    use_xla = zoo.configure_precision(config.model, has_gpu=cluster.num_gpus() > 0, num_replicas=num_replicas)
    start_step = start_step_variable()
    train_data = pipeline.distributed_dataset(strategy, processed_dir, "train", global_batch, True, config,
                                              start_step=start_step)
    val_data = validation_dataset(processed_dir, global_batch, config)
    with weight_files.local_model_config(config.model) as model_config, strategy.scope():
        model = zoo.build_model(model_config, input_shape, num_classes=len(CLASS_NAMES))

    watch = PreemptionWatch(strategy, multi_worker=spec.is_multi_worker).install()
    backups: list[ResumableBackup] = []
    stopped = lambda: any(backup.cut_short for backup in backups)  # noqa: E731 - an epoch cut short by SIGTERM
    history = HistoryRecorder(history_path if spec.is_chief else None, meta, previous.get("epochs"),
                              images_per_step=global_batch, skip=stopped)
    best = BestWeights(layout.best_weights(run_id), spec.is_chief,
                       monitor=MONITOR, skip=stopped)
    limit = EpochLimit(config.train.max_epochs_this_process)
    try:
        for phase in phases:
            backup = ResumableBackup(storage.join(layout.backup(run_id), phase.name), watch,
                                     config.train.backup_every_n_steps, config.train.preemption_check_every_n_steps)
            backups.append(backup)
            # Best weights, then the history, then the backup: a crash between two of them redoes
            # the epoch, and the history never records a best score whose weights were not saved.
            # The input's start follows the backup's restore: a resumed epoch draws what it drew before.
            position = InputPosition(start_step, phase.start_epoch)
            callbacks: list[keras.callbacks.Callback] = [best, history, backup, position, limit]
            if spec.is_chief:
                callbacks.append(keras.callbacks.TensorBoard(layout.tensorboard(run_id), write_graph=False,
                                                             profile_batch=0))
            callbacks.append(StepProgress(steps, global_batch, config.train.epochs, position))
            with strategy.scope():
                zoo.set_backbone_trainable(model, phase.backbone_trainable)
                loss = WeightedCategoricalCrossentropy(weights) if weights else keras.losses.CategoricalCrossentropy()
                model.compile(optimizer=keras.optimizers.Adam(phase.learning_rate), loss=loss,
                              metrics=build_metrics(len(CLASS_NAMES)), jit_compile=use_xla)
            log.info("phase", phase=phase.name, epochs=f"{phase.start_epoch}-{phase.end_epoch}",
                     backbone_trainable=phase.backbone_trainable, learning_rate=phase.learning_rate)
            # A phase already done restores its backup here and runs no epoch: the next phase then
            # starts from exactly the weights an uninterrupted run would have had.
            model.fit(train_data, epochs=phase.end_epoch, initial_epoch=phase.start_epoch, steps_per_epoch=steps,
                      validation_data=val_data, callbacks=callbacks, verbose=0)
            if backup.preempted:
                log.warning("preempted: backup saved, exiting for a restart", exit_code=EXIT_PREEMPTED)
                raise SystemExit(EXIT_PREEMPTED)
            done = any(r["epoch"] == config.train.epochs - 1 for r in history.epochs)
            if limit.reached and not done:
                log.info("stopping: train.max_epochs_this_process reached; run again to resume",
                         epochs_run=limit.epochs_run)
                return None
        return _finish(model, config, layout, spec, history, best)
    except tf.errors.OpError as error:
        if spec.is_multi_worker and peers.is_peer_lost(error, spec.task_type, spec.task_index):
            # Not this worker's fault: exit with the code the train Job does not count, so only
            # the pod that failed spends a retry; the restart resumes from the backup.
            raise PeerLostError(f"a peer worker is gone ({type(error).__name__}: {_first_line(error)}); "
                                "this worker stops so the Job can restart the cluster") from error
        raise
    finally:
        watch.uninstall()
        best.close()


def _first_line(error: tf.errors.OpError) -> str:
    lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
    return " ".join(lines[:3])[:300]


def _finish(model: keras.Model, config: PipelineConfig, layout: Layout, spec: cluster.ClusterSpec,
            history: HistoryRecorder, best: BestWeights) -> dict[str, Any]:
    run_id = config.train.run_id
    checksum = weights_sha256(model)
    log.info("training finished", weights_sha256=checksum, is_chief=spec.is_chief, epochs=len(history.epochs))
    if not spec.is_chief:
        # Leave only once the chief has written the run: a chief that fails before that is
        # retried, and its retry must find this worker's pod still there to form the cluster.
        try:
            storage.wait_for(layout.run_marker(run_id), config.cluster.peer_wait_timeout_s,
                             what="the chief's run marker", poll_s=1.0)
        except UpstreamMissingError as missing:
            # The chief's own failure (its retry is counted), not this worker's: exit 75, not counted.
            raise PeerLostError(f"the chief did not finish the run: {missing}") from None
        return {"weights_sha256": checksum}
    history.write(complete=True)
    best_path = best.destination
    saved = best.saved or {}  # what the best-weights file holds, read from the file's own record
    best_record = {"monitor": MONITOR, "value": saved.get("value"), "epoch": saved.get("epoch")}
    # The export holds the best weights (what evaluate scores), not the last epoch's, in float32
    # rather than the training policy, with the calibration fitted on val (chief only: the
    # model is rebuilt outside the strategy, and no other worker has anything to add).
    exported = export.export_run(layout, run_id)
    done = {
        "run_id": run_id,
        "config": config.to_dict(),
        "final_metrics": history.epochs[-1] if history.epochs else {},
        "best": best_record,
        "weights_sha256": checksum,
        "best_weights": best_path,
        "best_weights_sha256": storage.sha256_file(best_path) if storage.exists(best_path) else None,
        "model": layout.model(run_id),  # the base path servers take (TF Serving, KServe's storageUri)
        "model_format": exported["format"],
        "export": {**exported, **{f"best_{key}": value for key, value in best_record.items()}},
        "calibration": layout.calibration(run_id),
        "num_workers": spec.num_workers,
        "num_replicas": history.meta["num_replicas"],
        "global_batch_size": history.meta["global_batch_size"],
        "inputs": history.meta["inputs"],
    }
    storage.write_json(layout.run_marker(run_id), done)
    # After the marker: a crash before it must still find the backup and not retrain from zero.
    storage.remove_tree(layout.backup(run_id))
    log.info("run written", run_dir=layout.run(run_id), best=done["best"], temperature=exported["temperature"])
    return done


def _already_finished(layout: Layout, config: PipelineConfig) -> dict[str, Any] | None:
    marker_path = layout.run_marker(config.train.run_id)
    if not storage.exists(marker_path):
        return None
    done = storage.read_json(marker_path)
    changed = changed_keys(done.get("config", {}), config)
    if changed:
        raise BadInputError(f"run {config.train.run_id} already finished with a different config (changed: "
                            f"{', '.join(changed)}; {marker_path}); choose a new train.run_id")
    log.info("already done: run marker exists with the same config", marker=marker_path)
    return done


def _check_resume_config(layout: Layout, config: PipelineConfig) -> None:
    """A backup is only valid for the config that wrote it: refuse to mix two configs in one run."""
    path = layout.run_config(config.train.run_id)
    if not storage.exists(path):
        return
    changed = changed_keys(yaml.safe_load(storage.read_text(path)) or {}, config)
    if changed:
        raise BadInputError(f"run {config.train.run_id} was started with a different config (changed: "
                            f"{', '.join(changed)}); resume with the same config or choose a new train.run_id")
