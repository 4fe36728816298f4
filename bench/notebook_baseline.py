"""The notebook's data path, reproduced as the benchmark's baseline (see /work/shared/design/pipeline.md).

`image_dataset_from_directory(..., batch_size=None)` decodes and resizes every image, the split is
taken with validation_split / take / skip, and each split goes into ONE TFRecord of serialized,
decoded float32 tensors (`tf.io.serialize_tensor`), read back by parse -> shuffle -> batch.
"""

from __future__ import annotations

import os
import time

import tensorflow as tf
import tf_keras as keras

SEED = 42


def shard_like_notebook(interim_dir: str, out_dir: str, height: int, width: int) -> dict:
    """Writes processed/{split}_{h}x{w}_3_ds.tfrecord like the notebook; returns images, bytes, seconds."""
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    # The notebook's call: RGB (the default), bilinear resize to (h, w) without keeping the aspect ratio.
    train, full_test = keras.utils.image_dataset_from_directory(
        interim_dir, label_mode="categorical", batch_size=None, image_size=(height, width), seed=SEED,
        validation_split=0.2, subset="both")
    num_val = int(full_test.cardinality().numpy() * 0.25)
    splits = {"train": train, "val": full_test.take(num_val), "test": full_test.skip(num_val)}
    num_images = 0
    paths = []
    for split, dataset in splits.items():
        path = os.path.join(out_dir, f"{split}_{height}x{width}_3_ds.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for image, label in dataset:
                feature = {
                    "image": _bytes(tf.io.serialize_tensor(image).numpy()),
                    "label": _bytes(tf.io.serialize_tensor(label).numpy()),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
                num_images += 1
        paths.append(path)
    seconds = time.perf_counter() - started
    return {"num_images": num_images, "seconds": seconds, "bytes": sum(os.path.getsize(p) for p in paths),
            "files": paths}


def load_like_notebook(path: str, batch_size: int) -> tf.data.Dataset:
    """The notebook's load_image_dataset_from_tfrecord: parse, shuffle, batch, prefetch."""
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.string)}

    def parse(serialized: tf.Tensor) -> tuple:
        features = tf.io.parse_single_example(serialized, spec)
        return (tf.io.parse_tensor(features["image"], tf.float32), tf.io.parse_tensor(features["label"], tf.float32))

    return (tf.data.TFRecordDataset(path).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
            .shuffle(1024, seed=SEED).batch(batch_size).prefetch(tf.data.AUTOTUNE))


def directory_loader(interim_dir: str, height: int, width: int, batch_size: int) -> tf.data.Dataset:
    """Loading straight from the image folders (decode + resize + batch every epoch), grayscale like ours."""
    dataset = keras.utils.image_dataset_from_directory(
        interim_dir, label_mode="categorical", batch_size=batch_size, image_size=(height, width),
        color_mode="grayscale", shuffle=False)
    return dataset.map(lambda images, labels: (images / 255.0, labels)).prefetch(tf.data.AUTOTUNE)


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
