"""Training throughput (images/s) on this machine: the real input pipeline versus in-memory data.

    .venv/bin/python bench/bench_train.py            # ~2-3 minutes on a laptop CPU
    .venv/bin/python bench/bench_train.py --quick    # fewer steps (smoke run)

For each model (small_cnn at the demo size 64x64x1; efficientnetv2b0 at 224 px, weights none) it
times the training step the trainer runs (same loss, metrics and optimizer as pneumonia.training.fit)
fed by (a) the TFRecord pipeline (decode, augment, batch) and (b) one batch held in memory, the
compute ceiling. pipeline/in-memory near 1 means compute-bound; well below 1 means input-bound.
Prints a table and writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import tensorflow as tf
import tf_keras as keras

from pneumonia import cluster
from pneumonia.config import CLASS_NAMES, load_config
from pneumonia.data import pipeline, preprocess, shard
from pneumonia.data.demo import make_demo_archive
from pneumonia.layout import Layout
from pneumonia.logs import configure_logging
from pneumonia.model import zoo
from pneumonia.model.metrics import build_metrics
from pneumonia.training.fit import WeightedCategoricalCrossentropy, class_weight_vector

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"

CASES = {
    # name: (config overrides, batch size, timed steps, timed steps with --quick)
    "small_cnn@64": (["shard.image_height=64", "shard.image_width=64", "model.name=small_cnn",
                      "model.input_size=64", "model.dense_units=[64]", "model.trainable=full"], 16, 40, 10),
    "efficientnetv2b0@224": (["shard.image_height=224", "shard.image_width=224", "model.name=efficientnetv2b0",
                              "model.input_size=224", "model.trainable=full"], 8, 4, 2),
}


def build_data(root: Path, overrides: list[str], num_images: int) -> object:
    archive = root / "raw" / "demo.zip"
    if not archive.exists():
        make_demo_archive(str(archive), num_images=num_images, seed=0)
    config = load_config(None, [f"data.root={root}", f"data.archive={archive}", "shard.channels=1",
                                "model.weights=none", "train.shuffle_buffer=256", *overrides])
    preprocess.run(config)
    shard.run(config)
    return config


def timed_fit(model: keras.Model, data: tf.data.Dataset, steps: int, batch: int) -> float:
    """Images/s over `steps` training steps, after one untimed step (tracing, first reads)."""
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch / (time.perf_counter() - started)


def input_only(data: tf.data.Dataset, steps: int, batch: int) -> float:
    iterator = iter(data)
    next(iterator)
    started = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - started)


def bench_case(name: str, root: Path, quick: bool, num_images: int, batch_size: int = 0) -> dict:
    overrides, batch, steps, quick_steps = CASES[name]
    batch = batch_size or batch
    steps = quick_steps if quick else steps
    config = build_data(root, overrides, num_images)
    layout = Layout.of(config)
    processed = layout.processed(config.shard.size_dir)
    marker = pipeline.read_marker(processed)
    weights = class_weight_vector(json.loads(Path(layout.split_manifest).read_text()))
    use_xla = zoo.configure_precision(config.model, has_gpu=cluster.num_gpus() > 0)
    image = marker["image"]
    model = zoo.build_model(config.model, (int(image["height"]), int(image["width"]), int(image["channels"])))
    model.compile(keras.optimizers.Adam(1e-3), WeightedCategoricalCrossentropy(weights),
                  metrics=build_metrics(len(CLASS_NAMES)), jit_compile=use_xla)

    data = pipeline.make_dataset(processed, "train", batch, training=True, config=config)
    # The ceiling: the same batch over and over from memory, so the step never waits for input.
    in_memory = tf.data.Dataset.from_tensors(next(iter(data))).repeat()
    row = {
        "model": name, "batch_size": batch, "timed_steps": steps, "params": model.count_params(),
        "input_only_images_per_second": round(input_only(data, max(steps, 20), batch), 1),
        "pipeline_images_per_second": round(timed_fit(model, data, steps, batch), 2),
        "in_memory_images_per_second": round(timed_fit(model, in_memory, steps, batch), 2),
    }
    row["pipeline_over_in_memory"] = round(row["pipeline_images_per_second"] / row["in_memory_images_per_second"], 3)
    row["bound"] = "compute" if row["pipeline_over_in_memory"] >= 0.9 else "input"
    # The step time from the shards, and how much of it waits for input (0 when compute-bound).
    row["step_ms"] = round(1000 * batch / row["pipeline_images_per_second"], 1)
    row["input_share_of_step"] = round(max(0.0, 1 - row["pipeline_over_in_memory"]), 3)
    row["mixed_precision"] = keras.mixed_precision.global_policy().name == "mixed_float16"
    row["xla"] = bool(use_xla)
    if cluster.num_gpus():
        row["gpu_peak_memory_mib"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--images", type=int, default=120, help="synthetic archive size")
    parser.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch-size", type=int, default=0, help="per-step batch (default: each case's CPU size)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    configure_logging("bench", run_id="bench", level="WARNING")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        for name in args.models:
            rows.append(bench_case(name, Path(scratch) / name.replace("@", "-"), args.quick, args.images,
                                   args.batch_size))
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "tensorflow": tf.__version__, "gpus": cluster.num_gpus()},
        "note": "no GPU in this run: CPU figures only" if not cluster.num_gpus() else "",
        "results": rows,
    }
    header = (f"{'model':<22}{'batch':>6}{'input-only/s':>14}{'pipeline/s':>12}{'in-memory/s':>13}{'ratio':>7}"
              f"{'step ms':>9}  bound    gpu peak MiB")
    print(header)
    for row in rows:
        print(f"{row['model']:<22}{row['batch_size']:>6}{row['input_only_images_per_second']:>14}"
              f"{row['pipeline_images_per_second']:>12}{row['in_memory_images_per_second']:>13}"
              f"{row['pipeline_over_in_memory']:>7}{row['step_ms']:>9}  {row['bound']:<8} "
              f"{row.get('gpu_peak_memory_mib', '-')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
