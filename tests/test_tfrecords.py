"""The record format: one set of feature keys for writer and parser; uneven counts over shards come back whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pneumonia.data import tfrecords


def record(number: int) -> tfrecords.Record:
    pixels = np.full((8, 8, 1), number, np.uint8)
    return tfrecords.Record(
        image=tf.io.encode_png(pixels).numpy(), image_format="png", height=8, width=8, channels=1,
        label=number % 3, class_name=("normal", "bacteria", "virus")[number % 3], patient=f"person{number}",
        source_path=f"interim/x/{number}.jpeg", original_height=100 + number, original_width=200 + number)


def test_encode_then_decode_gives_the_record_back_deterministically() -> None:
    original = record(5)
    serialized = tfrecords.encode_example(original)
    assert tfrecords.decode_example(serialized) == original
    assert tfrecords.encode_example(record(5)) == serialized  # same record, same bytes
    assert tfrecords.encode_example(record(6)) != serialized


def test_graph_parser_reads_every_key_the_writer_writes() -> None:
    original = record(7)
    serialized = tfrecords.encode_example(original)
    written_keys = set(tf.train.Example.FromString(serialized).features.feature)
    assert written_keys == set(tfrecords.FEATURES)
    parsed = next(iter(tf.data.Dataset.from_tensors(serialized).map(tfrecords.parse_example)))
    assert int(parsed[tfrecords.LABEL]) == original.label
    assert parsed[tfrecords.SOURCE_PATH].numpy().decode() == original.source_path
    assert int(parsed[tfrecords.ORIGINAL_WIDTH]) == original.original_width
    assert parsed[tfrecords.IMAGE].numpy() == original.image
    metadata = tfrecords.parse_metadata(tf.constant(serialized))
    assert tfrecords.IMAGE not in metadata and metadata[tfrecords.PATIENT].numpy() == b"person7"


def test_seventeen_records_in_three_shards_come_back_as_the_same_set(tmp_path: Path) -> None:
    records = [record(n) for n in range(17)]
    names = [tfrecords.shard_name("train", i, 3) for i in range(3)]
    assert names[2] == "train-00002-of-00003.tfrecord"
    for index, name in enumerate(names):
        with tf.io.TFRecordWriter(str(tmp_path / name)) as writer:
            for item in records[index::3]:
                writer.write(tfrecords.encode_example(item))
    files = tf.data.Dataset.list_files(str(tmp_path / "train-*.tfrecord"), shuffle=False)
    back = [tfrecords.decode_example(s) for s in tf.data.TFRecordDataset(files).as_numpy_iterator()]
    assert sorted(back, key=lambda r: r.source_path) == sorted(records, key=lambda r: r.source_path)
    assert tfrecords.sidecar_name(names[0]) == ".train-00000-of-00003.tfrecord.json"


def test_read_metadata_gives_every_record_in_order_across_batches(tmp_path: Path) -> None:
    records = [record(n) for n in range(7)]
    path = tmp_path / "val-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for item in records:
            writer.write(tfrecords.encode_example(item))
    back = list(tfrecords.read_metadata(str(path), batch_size=3))  # 3 + 3 + 1: a partial last batch
    assert [tfrecords.decode_example(serialized) for serialized, _ in back] == records
    assert [meta for _, meta in back] == [tfrecords.Record(**{**item.__dict__, "image": b""}) for item in records]


def test_read_metadata_rejects_a_record_without_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(tfrecords.encode_example(record(1)))
        writer.write(tf.train.Example().SerializeToString())  # someone else's record
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(tfrecords.read_metadata(str(path)))
