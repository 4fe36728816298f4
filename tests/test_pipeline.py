"""The input pipeline: contract shapes, eval order, training shuffle/augment/repeat, sharding across workers."""

from __future__ import annotations

import numpy as np
import pytest
import structlog
import tensorflow as tf
import tf_keras as keras
from test_shard import SIZE_DIR, config_for, make_interim

from pneumonia.data import pipeline, shard
from pneumonia.errors import BadInputError

COUNTS = {"train": (7, 6, 4), "val": (2, 2, 1), "test": (2, 1, 2)}


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, list[dict]]:
    root = tmp_path_factory.mktemp("pipe")
    rows = make_interim(root, counts=COUNTS)
    marker = shard.run(config_for(root))
    return str(root / "processed" / SIZE_DIR), marker, rows


def paths_of(dataset: tf.data.Dataset) -> list[str]:
    return [p.decode() for _, _, meta in dataset.as_numpy_iterator() for p in meta["source_path"]]


def test_eval_dataset_follows_the_contract_in_a_fixed_order(processed: tuple[str, dict, list[dict]],
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    processed_dir, _, rows = processed
    config = config_for(tmp_path_factory.getbasetemp())
    dataset = pipeline.make_dataset(processed_dir, "train", 5, training=False, config=config, with_metadata=True)
    batches = list(dataset.as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [5, 5, 5, 2]  # 17 records, partial last batch kept
    images, labels, meta = batches[0]
    assert images.shape == (5, 32, 32, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
    assert labels.shape == (5, 3) and labels.dtype == np.float32
    np.testing.assert_array_equal(labels.sum(axis=1), np.ones(5))
    by_path = {row["path"]: row for row in rows}
    for batch_labels, batch_meta in ((b[1], b[2]) for b in batches):
        for label, path, patient in zip(batch_labels, batch_meta["source_path"], batch_meta["patient"], strict=True):
            row = by_path[path.decode()]
            assert int(label.argmax()) == row["label"] and patient.decode() == row["patient"]
    order = paths_of(dataset)
    assert sorted(order) == sorted(r["path"] for r in rows if r["split"] == "train")
    assert paths_of(dataset) == order  # same order every pass
    plain = pipeline.make_dataset(processed_dir, "val", 2, training=False, config=config)
    assert plain.element_spec[0].shape.as_list() == [None, 32, 32, 1] and len(plain.element_spec) == 2


def test_training_shuffles_augments_repeats_and_drops_the_remainder(processed: tuple[str, dict, list[dict]],
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    processed_dir = processed[0]
    base = tmp_path_factory.getbasetemp()
    plain = config_for(base, "train.augment=false", "train.shuffle_buffer=64")
    train = pipeline.make_dataset(processed_dir, "train", 4, training=True, config=plain, with_metadata=True)
    assert train.element_spec[0].shape.as_list() == [4, 32, 32, 1]  # static batch: drop_remainder
    seen = [p.decode() for _, _, meta in train.take(10).as_numpy_iterator() for p in meta["source_path"]]
    # 17 records in batches of 4: 4 steps, so 16 distinct records an epoch, in a new order each epoch.
    assert len(seen) == 40 and len(set(seen[:16])) == len(set(seen[16:32])) == 16 and seen[:16] != seen[16:32]
    eval_order = paths_of(pipeline.make_dataset(processed_dir, "train", 4, training=False, config=plain,
                                                with_metadata=True))
    assert set(seen) <= set(eval_order) and seen[:16] != eval_order[:16]

    eval_images = {}
    for images, _, meta in pipeline.make_dataset(processed_dir, "train", 17, training=False, config=plain,
                                                 with_metadata=True).as_numpy_iterator():
        eval_images.update(zip(meta["source_path"], images, strict=True))
    augmented = config_for(base, "train.augment=true", "train.shuffle_buffer=64")
    for config, changed in ((plain, False), (augmented, True)):
        images, _, meta = next(pipeline.make_dataset(processed_dir, "train", 8, training=True, config=config,
                                                     with_metadata=True).as_numpy_iterator())
        differs = [not np.array_equal(image, eval_images[path]) for image, path in zip(images, meta["source_path"], strict=True)]
        assert all(differs) if changed else not any(differs)
        assert images.min() >= 0.0 and images.max() <= 1.0


def batches(dataset: tf.data.Dataset, count: int) -> list[tuple[np.ndarray, list[str]]]:
    return [(images, [p.decode() for p in meta["source_path"]])
            for images, _, meta in dataset.take(count).as_numpy_iterator()]


def test_a_resumed_run_draws_each_epoch_as_an_uninterrupted_run_does(processed: tuple[str, dict, list[dict]],
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    processed_dir = processed[0]
    config = config_for(tmp_path_factory.getbasetemp(), "train.augment=true", "train.shuffle_buffer=64")
    steps = 4  # 17 records, batches of 4

    def stream(start_step: tf.Variable | int) -> tf.data.Dataset:
        return pipeline.make_dataset(processed_dir, "train", 4, training=True, config=config, with_metadata=True,
                                     start_step=start_step)

    uninterrupted = batches(stream(0), 3 * steps)
    assert [paths for _, paths in uninterrupted[:steps]] != [paths for _, paths in uninterrupted[steps:2 * steps]]
    # From an epoch boundary and from the middle of an epoch (a backup every N steps, or SIGTERM).
    for start in (steps, 2 * steps, steps + 2):
        resumed = batches(stream(start), 3 * steps - start)
        assert [paths for _, paths in resumed] == [paths for _, paths in uninterrupted[start:]]
        for (images, _), (expected, _) in zip(resumed, uninterrupted[start:], strict=True):
            np.testing.assert_array_equal(images, expected)  # the same augmentation draws too
    # A variable start is read when iteration starts (fit sets it after restoring its backup).
    start_step = tf.Variable(0, dtype=tf.int64)
    dataset = stream(start_step)
    start_step.assign(2 * steps)
    images, paths = batches(dataset, 1)[0]
    assert paths == uninterrupted[2 * steps][1]
    np.testing.assert_array_equal(images, uninterrupted[2 * steps][0])


def test_workers_and_epochs_draw_differently(processed: tuple[str, dict, list[dict]],
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    file_orders, draws = {}, {}
    for epoch in (0, 1):
        for worker in (0, 1):
            file_seed, key = pipeline.epoch_seeds(42, epoch, worker)
            file_orders[epoch, worker], draws[epoch, worker] = int(file_seed), tuple(key.numpy())
    # One file order per epoch on every worker (DATA sharding needs it); shuffle and augmentation
    # draws of their own for each worker and epoch.
    assert file_orders[0, 0] == file_orders[0, 1] != file_orders[1, 0] == file_orders[1, 1]
    assert len(set(draws.values())) == 4
    assert pipeline.epoch_seeds(7, 0, 0)[0] != pipeline.epoch_seeds(42, 0, 0)[0]

    processed_dir = processed[0]
    config = config_for(tmp_path_factory.getbasetemp(), "train.augment=true", "train.shuffle_buffer=64")
    per_worker = []
    for worker in (0, 1):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        per_worker.append(batches(pipeline.make_dataset(processed_dir, "train", 4, training=True, config=config,
                                                        with_metadata=True, input_context=context), 4))
    # 2 steps of 2 x 4 records an epoch; each worker draws its 8 from its own files (the one
    # whose files hold fewer draws some twice), in a new order the next epoch.
    first_epoch = [[path for _, paths in worker[:2] for path in paths] for worker in per_worker]
    assert [len(paths) for paths in first_epoch] == [8, 8] and not set(first_epoch[0]) & set(first_epoch[1])
    assert [paths for _, paths in per_worker[0][2:]] != [paths for _, paths in per_worker[0][:2]]


@pytest.mark.parametrize("min_shards, policy", [(4, "FILE"), (1, "DATA")])
def test_two_input_pipelines_split_the_records_without_overlap(tmp_path_factory: pytest.TempPathFactory,
                                                               min_shards: int, policy: str) -> None:
    root = tmp_path_factory.mktemp(f"policy{min_shards}")
    make_interim(root, counts={"val": (3, 2, 2)})
    config = config_for(root, f"shard.min_shards_per_split={min_shards}")
    shard.run(config)
    processed_dir = str(root / "processed" / SIZE_DIR)
    assert len(pipeline.shard_paths(processed_dir, "val")) == min_shards
    parts = []
    with structlog.testing.capture_logs() as logged:
        for index in range(2):
            context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index,
                                                 num_replicas_in_sync=2)
            parts.append(paths_of(pipeline.make_dataset(processed_dir, "val", 3, training=False, config=config,
                                                        with_metadata=True, input_context=context)))
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == 7 and all(parts)
    # The log says which sharding each pipeline used.
    assert [e["policy"] for e in logged if e["event"] == "input sharding"] == [policy, policy]


def test_steps_per_epoch_and_missing_splits(processed: tuple[str, dict, list[dict]]) -> None:
    processed_dir, marker, _ = processed
    assert pipeline.steps_per_epoch(marker, "train", 4) == 4  # 17 // 4
    assert pipeline.steps_per_epoch(processed_dir, "train", 4, drop_remainder=False) == 5
    with pytest.raises(BadInputError, match="fewer than one global batch"):
        pipeline.steps_per_epoch(marker, "val", 64)
    with pytest.raises(BadInputError, match="'unused' has no shards"):
        pipeline.shard_paths(processed_dir, "unused")
    with pytest.raises(BadInputError, match="run the shard stage first"):
        pipeline.read_marker(processed_dir + "-missing")


def test_distributed_dataset_feeds_tf_keras_fit(processed: tuple[str, dict, list[dict]],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    processed_dir, marker, _ = processed
    config = config_for(tmp_path_factory.getbasetemp())
    strategy = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    global_batch = 4
    train = pipeline.distributed_dataset(strategy, processed_dir, "train", global_batch, True, config)
    val = pipeline.distributed_dataset(strategy, processed_dir, "val", global_batch, False, config)
    with strategy.scope():
        model = keras.Sequential([keras.layers.Input((32, 32, 1)), keras.layers.Conv2D(4, 3, strides=2),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    steps = pipeline.steps_per_epoch(marker, "train", global_batch)
    val_steps = pipeline.steps_per_epoch(marker, "val", global_batch, drop_remainder=False)
    history = model.fit(train, validation_data=val, epochs=2, steps_per_epoch=steps, validation_steps=val_steps,
                        verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["val_loss"]).all()
