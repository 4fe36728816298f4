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
    image = imaging.decode_stored(features[tfrecords.IMAGE], height, width, channels)
    label = tf.cast(features[tfrecords.LABEL], tf.int32)
    return {
        "image": imaging.to_float(image),
        "label": tf.one_hot(label, len(CLASS_NAMES), dtype=tf.float32),
        "class_name": features[tfrecords.CLASS_NAME],
        "patient": features[tfrecords.PATIENT],
        "source_path": features[tfrecords.SOURCE_PATH],
    }


def make_dataset(processed_dir: str, split: str, batch_size: int, *, training: bool, config: PipelineConfig,
                 with_metadata: bool = False, input_context: tf.distribute.InputContext | None = None,
                 drop_remainder: bool | None = None, repeat: bool | None = None) -> tf.data.Dataset:
    """Batched dataset over one split's shards.

    training=True: files and records shuffled (seeded by train.seed), augmentation if train.augment,
    repeated forever (pass steps_per_epoch to fit) and drop_remainder, so every replica gets
    full batches. training=False: one pass in a fixed order, last batch partial.
    with_metadata=True yields (image, label, {"source_path", "patient", "class_name"}).
    input_context (from distribute_datasets_from_function) shards the input across pipelines.
    """
    marker = read_marker(processed_dir)
    image = marker["image"]
    height, width, channels = int(image["height"]), int(image["width"]), int(image["channels"])
    files = shard_paths(processed_dir, split, marker)
    drop_remainder = training if drop_remainder is None else drop_remainder
    repeat = training if repeat is None else repeat
    seed = config.train.seed

    dataset = tf.data.Dataset.from_tensor_slices(files)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    policy = "none"
    if num_pipelines > 1:
        pipeline_id = input_context.input_pipeline_id
        if len(files) >= num_pipelines:
            # FILE: each worker reads only its own files; cheapest, and the shard stage makes at
            # least cluster.num_workers files per split so this is the usual case.
            policy = "FILE"
            dataset = dataset.shard(num_pipelines, pipeline_id)
        else:
            policy = "DATA"  # every worker reads every file and keeps its 1/n of the records
        log.info("input sharding", split=split, policy=policy, num_files=len(files),
                 num_input_pipelines=num_pipelines, input_pipeline_id=pipeline_id)
    # DATA sharding needs the same record order on every worker, so interleave deterministically.
    deterministic = not training or policy == "DATA"
    num_my_files = max(1, len(files) // num_pipelines) if policy == "FILE" else len(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        tf.data.TFRecordDataset, cycle_length=min(num_my_files, MAX_CYCLE_LENGTH),
        num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if policy == "DATA":
        dataset = dataset.shard(num_pipelines, input_context.input_pipeline_id)
    if training:
        # Shuffle serialized records, not decoded floats: a 2,048 buffer of ~40 KB PNGs is ~80 MB,
        # of 256x256 float images ~512 MB.
        dataset = dataset.shuffle(config.train.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.map(lambda serialized: decode_record(serialized, height, width, channels),
                          num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if training and config.train.augment:
        # One stateless seed pair per element: reproducible, and identical eagerly and in tf.data.
        seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
        dataset = tf.data.Dataset.zip((dataset, seeds)).map(
            lambda element, pair: {**element, "image": imaging.augment(element["image"], pair)},
            num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if with_metadata:
        dataset = dataset.map(lambda e: (e["image"], e["label"], {
            "source_path": e["source_path"], "patient": e["patient"], "class_name": e["class_name"]}))
    else:
        dataset = dataset.map(lambda e: (e["image"], e["label"]))
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                            deterministic=deterministic)
    return dataset.prefetch(AUTOTUNE)


def distributed_dataset(strategy: tf.distribute.Strategy, processed_dir: str, split: str, global_batch_size: int,
                        training: bool, config: PipelineConfig, with_metadata: bool = False) -> Any:
    """A DistributedDataset for `strategy`: each input pipeline builds its own per-replica batches.

    Works for any strategy (default, Mirrored, MultiWorkerMirrored) and with tf_keras model.fit,
    which needs the steps of a distributed dataset: steps_per_epoch=steps_per_epoch(marker, "train",
    global_batch_size) (training repeats forever) and validation_steps=steps_per_epoch(marker, "val",
    global_batch_size, drop_remainder=False) (one pass, last batch partial).
    """
    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = input_context.get_per_replica_batch_size(global_batch_size)
        return make_dataset(processed_dir, split, per_replica, training=training, config=config,
                            with_metadata=with_metadata, input_context=input_context)

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
