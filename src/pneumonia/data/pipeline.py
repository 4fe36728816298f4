"""The input pipeline over TFRecord shards (local or gs://), for training, evaluation and tools.

Yields (image float32 [H, W, C] in [0, 1], one-hot label float32 [3]); see docs/contracts.md.
The shard list and counts come from the shard stage's marker, never from a glob, so stale files
from an older configuration can never leak into a run.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from pneumonia import storage
from pneumonia.config import CLASS_NAMES, PipelineConfig
from pneumonia.data import imaging, tfrecords
from pneumonia.errors import BadInputError, StorageError
from pneumonia.layout import MARKER_NAME
from pneumonia.logs import get_logger

log = get_logger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = ("train", "val", "test")
# Files read at once per pipeline; fixed (not AUTOTUNE) so evaluation order does not depend on
# the machine's core count.
MAX_CYCLE_LENGTH = 8


def read_marker(processed_dir: str) -> dict[str, Any]:
    """The shard stage's _SUCCESS.json for `processed_dir` (processed/<H>x<W>x<C>)."""
    path = storage.join(processed_dir, MARKER_NAME)
    if not storage.exists(path):
        raise BadInputError(f"no finished shards at {processed_dir}: {path} is missing; run the shard stage first")
    return storage.read_json(path)


def _marker(marker_or_dir: dict[str, Any] | str) -> dict[str, Any]:
    return marker_or_dir if isinstance(marker_or_dir, dict) else read_marker(marker_or_dir)


def num_records(marker: dict[str, Any] | str, split: str) -> int:
    marker = _marker(marker)
    if split not in marker["splits"]:
        raise BadInputError(f"split {split!r} has no shards (splits with records: {', '.join(marker['splits'])}); "
                            "check the split manifest's fractions")
    return int(marker["splits"][split]["num_records"])


def shard_paths(processed_dir: str, split: str, marker: dict[str, Any] | None = None) -> list[str]:
    """The split's shard files, in order, as listed in the marker."""
    marker = marker or read_marker(processed_dir)
    num_records(marker, split)  # raises for a split without shards
    return [storage.join(processed_dir, shard["name"]) for shard in marker["shards"] if shard["split"] == split]


def steps_per_epoch(marker: dict[str, Any] | str, split: str, global_batch_size: int,
                    drop_remainder: bool = True) -> int:
    """Batches in one pass over `split`: floor (training drops the remainder) or ceil (evaluation)."""
    count = num_records(marker, split)
    steps = count // global_batch_size if drop_remainder else math.ceil(count / global_batch_size)
    if steps < 1:
        raise BadInputError(f"split {split!r} has {count} records, fewer than one global batch of "
                            f"{global_batch_size}; lower train.per_replica_batch_size or add data")
    return steps


def decode_record(serialized: tf.Tensor, height: int, width: int, channels: int) -> dict[str, tf.Tensor]:
    """One serialized example -> image float32 [H, W, C] in [0, 1], one-hot label and metadata."""
    features = tfrecords.parse_example(serialized)
    image, label = _image_and_label(features, height, width, channels)
    return {
        "image": image,
        "label": label,
        "class_name": features[tfrecords.CLASS_NAME],
        "patient": features[tfrecords.PATIENT],
        "source_path": features[tfrecords.SOURCE_PATH],
    }


def make_dataset(processed_dir: str, split: str, batch_size: int, *, training: bool, config: PipelineConfig,
                 with_metadata: bool = False, input_context: tf.distribute.InputContext | None = None,
                 drop_remainder: bool | None = None, repeat: bool | None = None,
                 start_step: tf.Variable | int = 0) -> tf.data.Dataset:
    """Batched dataset over one split's shards.

    training=True: the run's epochs for this input pipeline, one after another forever (pass
    steps_per_epoch to fit), full batches only. Epoch e holds exactly one epoch's steps of records,
    shuffled and augmented (if train.augment) with seeds from train.seed, e and the input pipeline:
    workers draw differently, and epoch e draws the same whatever ran before it. `start_step` is the
    run's step at which the stream begins (an int, or a tf.Variable read when iteration starts, which
    InputPosition sets to where fit resumes). training=False: one pass in a fixed order, last batch
    partial (`drop_remainder`, `repeat` change that).
    with_metadata=True yields (image, label, {"source_path", "patient", "class_name"}).
    input_context (from distribute_datasets_from_function) shards the input across pipelines.
    """
    marker = read_marker(processed_dir)
    image = marker["image"]
    height, width, channels = int(image["height"]), int(image["width"]), int(image["channels"])
    shards = _Shards(shard_paths(processed_dir, split, marker), input_context)
    shards.log(split)
    if training:
        num_replicas = input_context.num_replicas_in_sync if input_context else 1
        steps = steps_per_epoch(marker, split, batch_size * num_replicas)
        records_per_step = batch_size * max(1, num_replicas // shards.num_pipelines)
        dataset = _training_records(shards, config, steps, records_per_step, start_step)
        augment = config.train.augment
        if with_metadata:
            dataset = dataset.map(lambda serialized, seed: _decode_for_training(
                serialized, seed, (height, width, channels), augment), num_parallel_calls=AUTOTUNE)
        else:
            dataset = dataset.map(lambda serialized, seed: _decode_training_step_input(
                serialized, seed, (height, width, channels), augment), num_parallel_calls=AUTOTUNE)
        drop_remainder = True
    else:
        dataset = shards.records()
        if repeat:
            dataset = dataset.repeat()
        dataset = dataset.map(lambda serialized: decode_record(serialized, height, width, channels),
                              num_parallel_calls=AUTOTUNE)
    if with_metadata:
        dataset = dataset.map(lambda e: (e["image"], e["label"], {
            "source_path": e["source_path"], "patient": e["patient"], "class_name": e["class_name"]}))
    elif not training:
        dataset = dataset.map(lambda e: (e["image"], e["label"]))
    dataset = dataset.batch(batch_size, drop_remainder=bool(drop_remainder), num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)


class _Shards:
    """One input pipeline's share of a split's files: its own files (FILE) or 1/n of every file's records (DATA)."""

    def __init__(self, files: list[str], input_context: tf.distribute.InputContext | None) -> None:
        self.files = files
        self.num_pipelines = input_context.num_input_pipelines if input_context else 1
        self.pipeline_id = input_context.input_pipeline_id if input_context else 0
        self.policy = "none"
        if self.num_pipelines > 1:
            # FILE: each worker reads only its own files; cheapest, and the shard stage makes at
            # least cluster.num_workers files per split so this is the usual case. DATA: every
            # worker reads every file (in one order) and keeps every n-th record.
            self.policy = "FILE" if len(files) >= self.num_pipelines else "DATA"

    def log(self, split: str) -> None:
        if self.num_pipelines > 1:
            log.info("input sharding", split=split, policy=self.policy, num_files=len(self.files),
                     num_input_pipelines=self.num_pipelines, input_pipeline_id=self.pipeline_id)

    def records(self, file_seed: tf.Tensor | None = None) -> tf.data.Dataset:
        """The pipeline's serialized records; files in a seeded order if `file_seed`, else as listed.

        Interleaved deterministically: DATA sharding needs one record order on every worker, and a
        resumed epoch must read in the order the interrupted one did.
        """
        files = tf.data.Dataset.from_tensor_slices(self.files)
        num_my_files = len(self.files)
        if self.policy == "FILE":
            files = files.shard(self.num_pipelines, self.pipeline_id)
            num_my_files = max(1, len(self.files) // self.num_pipelines)
        if file_seed is not None:
            files = files.shuffle(len(self.files), seed=file_seed)
        records = files.interleave(tf.data.TFRecordDataset, cycle_length=min(num_my_files, MAX_CYCLE_LENGTH),
                                   num_parallel_calls=AUTOTUNE, deterministic=True)
        if self.policy == "DATA":
            records = records.shard(self.num_pipelines, self.pipeline_id)
        return records


def epoch_seeds(seed: int, epoch: tf.Tensor | int, pipeline_id: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(file order seed, this pipeline's draw key) of one epoch.

    The file order depends on the epoch only, the same on every worker (DATA sharding needs one
    order); the draw key (record shuffle, augmentation) also folds in the input pipeline, so
    workers do not draw in lockstep. Nothing depends on earlier epochs: a resume redraws them exactly.
    """
    order = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    draws = tf.random.experimental.stateless_fold_in(order, pipeline_id)
    return _scalar_seed(order), draws


def _scalar_seed(key: tf.Tensor) -> tf.Tensor:
    # Dataset.shuffle takes one int64; both halves of the key must change it.
    return tf.random.stateless_uniform([], seed=key, minval=None, maxval=None, dtype=tf.int64)


def _training_records(shards: _Shards, config: PipelineConfig, steps: int, records_per_step: int,
                      start_step: tf.Variable | int) -> tf.data.Dataset:
    """(serialized record, augmentation seed) pairs, epoch after epoch, from the run's step `start_step` on."""
    train = config.train
    records_per_epoch = steps * records_per_step

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        file_seed, draws = epoch_seeds(train.seed, epoch, shards.pipeline_id)
        # Shuffle serialized records, not decoded floats: a 2,048 buffer of ~40 KB PNGs is ~80 MB,
        # of 256x256 float images ~512 MB. Repeated within the epoch because a worker's files can
        # hold fewer records than its share of the epoch's steps.
        records = (shards.records(file_seed).shuffle(train.shuffle_buffer, seed=_scalar_seed(draws)).repeat()
                   .take(records_per_epoch))
        return records.enumerate().map(
            lambda index, record: (record, tf.random.experimental.stateless_fold_in(draws, index)))

    def from_step(step: tf.Tensor) -> tf.data.Dataset:
        epochs = tf.data.Dataset.range(step // steps, tf.int64.max)
        return epochs.flat_map(one_epoch).skip((step % steps) * records_per_step)

    # Read the start when iteration starts, not now: fit sets it after restoring its backup.
    start = tf.data.Dataset.from_tensors(0).map(lambda _: tf.cast(tf.convert_to_tensor(start_step), tf.int64))
    return start.flat_map(from_step)


def _image_and_label(features: dict[str, tf.Tensor], height: int, width: int,
                     channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Parsed features -> (image float32 [H, W, C] in [0, 1], one-hot label float32 [3])."""
    image = imaging.decode_stored(features[tfrecords.IMAGE], height, width, channels)
    label = tf.cast(features[tfrecords.LABEL], tf.int32)
    return imaging.to_float(image), tf.one_hot(label, len(CLASS_NAMES), dtype=tf.float32)


def _decode_training_step_input(serialized: tf.Tensor, seed: tf.Tensor, shape: tuple[int, int, int],
                                augment: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """_decode_for_training's (image, label) in one map, parsing only those two features.

    What fit consumes: the same pixels and label, without the metadata a training step drops, and
    without a second per-record map to drop it. Per record the input pipeline runs beside the train
    step on the same cores; this took its CPU from ~0.37 to ~0.27 ms per 64x64 record (bench/README.md).
    """
    image, label = _image_and_label(tfrecords.parse_image_and_label(serialized), *shape)
    if augment:
        image = imaging.augment(image, seed)  # as _decode_for_training
    return image, label


def _decode_for_training(serialized: tf.Tensor, seed: tf.Tensor, shape: tuple[int, int, int],
                         augment: bool) -> dict[str, tf.Tensor]:
    element = decode_record(serialized, *shape)
    if augment:
        # Stateless, seeded per element: reproducible, and identical eagerly and in tf.data.
        element["image"] = imaging.augment(element["image"], seed)
    return element


def distributed_dataset(strategy: tf.distribute.Strategy, processed_dir: str, split: str, global_batch_size: int,
                        training: bool, config: PipelineConfig, with_metadata: bool = False,
                        start_step: tf.Variable | int = 0) -> Any:
    """A DistributedDataset for `strategy`: each input pipeline builds its own per-replica batches.

    Works for any strategy (default, Mirrored, MultiWorkerMirrored) and with tf_keras model.fit,
    which needs the steps of a distributed dataset: steps_per_epoch=steps_per_epoch(marker, "train",
    global_batch_size) (training repeats forever) and validation_steps=steps_per_epoch(marker, "val",
    global_batch_size, drop_remainder=False) (one pass, last batch partial).
    """
    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = input_context.get_per_replica_batch_size(global_batch_size)
        return make_dataset(processed_dir, split, per_replica, training=training, config=config,
                            with_metadata=with_metadata, input_context=input_context, start_step=start_step)

    return strategy.distribute_datasets_from_function(dataset_fn)


def verify_shards(processed_dir: str, splits: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Checks every listed shard's size and sha256 against the marker; StorageError (retryable) names a bad one."""
    marker = read_marker(processed_dir)
    for shard in marker["shards"]:
        if splits and shard["split"] not in splits:
            continue
        path = storage.join(processed_dir, shard["name"])
        problem = None
        if not storage.exists(path):
            problem = "is missing"
        elif storage.size(path) != shard["bytes"]:
            problem = f"has {storage.size(path)} bytes, the marker says {shard['bytes']} (truncated or replaced)"
        elif storage.sha256_file(path) != shard["sha256"]:
            problem = "does not match its sha256 in the marker (corrupted)"
        if problem:
            raise StorageError(
                f"shard {path} {problem}; the shard stage wrote it: delete {storage.join(processed_dir, MARKER_NAME)} and rerun the "
                "shard stage to rewrite it")
    return marker
