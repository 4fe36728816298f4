"""Training throughput (images/s) on this machine: the real input pipeline versus in-memory data.

    .venv/bin/python bench/bench_train.py            # ~2-3 minutes on a laptop CPU
    .venv/bin/python bench/bench_train.py --quick    # fewer steps (smoke run)

For each model (small_cnn at the demo size 64x64x1; efficientnetv2b0 at 224 px, weights none) it
times the training step the trainer runs (same loss, metrics and optimizer as pneumonia.training.fit)
fed by (a) the TFRecord pipeline (decode, augment, batch) and (b) one batch held in memory, the
compute ceiling, in interleaved rounds (--repeats). pipeline/in-memory near 1 means compute-bound; well
below 1 means input-bound. Goal: at least 0.9 for small_cnn (GOALS).
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

import numpy as np
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
# Today's goal (issue 19 §5): training small_cnn from the shards at least 0.9 of its speed on the same
# batch held in memory (the input pipeline's share of a CPU step at most a tenth).
GOALS = {"small_cnn@64": 0.9}

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


def timed_fit(model: keras.Model, data: tf.data.Dataset, steps: int, batch: int) -> tuple[float, float]:
    """(images/s, process CPU ms per image) over `steps` training steps, after one untimed step."""
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
    started, cpu_started = time.perf_counter(), time.process_time()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return steps * batch / seconds, 1000 * cpu_s / (steps * batch)


def input_only(data: tf.data.Dataset, steps: int, batch: int) -> float:
    iterator = iter(data)
    next(iterator)
    started = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - started)


def bench_case(name: str, root: Path, quick: bool, num_images: int, batch_size: int = 0, repeats: int = 3) -> dict:
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
    # Interleaved rounds (shards, memory, shards, memory, ...): load from other jobs on a shared machine
    # hits both alike; each round's ratio compares two neighbouring fits.
    rounds = []
    for _ in range(repeats):
        pipeline_rate, pipeline_cpu = timed_fit(model, data, steps, batch)
        memory_rate, memory_cpu = timed_fit(model, in_memory, steps, batch)
        rounds.append({"pipeline": pipeline_rate, "in_memory": memory_rate, "ratio": pipeline_rate / memory_rate,
                       "pipeline_cpu_ms": pipeline_cpu, "in_memory_cpu_ms": memory_cpu})
    ratios = [r["ratio"] for r in rounds]
    row = {
        "model": name, "batch_size": batch, "timed_steps": steps, "params": model.count_params(), "rounds": repeats,
        "input_only_images_per_second": round(input_only(data, max(steps, 20), batch), 1),
        "pipeline_images_per_second": round(max(r["pipeline"] for r in rounds), 2),
        "in_memory_images_per_second": round(max(r["in_memory"] for r in rounds), 2),
        "ratio_rounds": [round(ratio, 3) for ratio in ratios],
        "ratio_median": round(float(np.median(ratios)), 3),
        # CPU per image: the in-memory step's over the step's from the shards (what the input costs on
        # top), steadier than wall time on a loaded machine.
        "cpu_ratio_median": round(float(np.median([r["in_memory_cpu_ms"] / r["pipeline_cpu_ms"] for r in rounds])), 3),
        "goal": GOALS.get(name),
    }
    row["pipeline_over_in_memory"] = round(row["pipeline_images_per_second"] / row["in_memory_images_per_second"], 3)
    row["bound"] = "compute" if row["ratio_median"] >= 0.9 else "input"
    # The step time from the shards, and how much of it waits for input (0 when compute-bound).
    row["step_ms"] = round(1000 * batch / row["pipeline_images_per_second"], 1)
    row["input_share_of_step"] = round(max(0.0, 1 - row["ratio_median"]), 3)
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
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of the shards fit and the in-memory fit (default 3)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    configure_logging("bench", run_id="bench", level="WARNING")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        for name in args.models:
            rows.append(bench_case(name, Path(scratch) / name.replace("@", "-"), args.quick, args.images,
                                   args.batch_size, args.repeats))
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "tensorflow": tf.__version__, "gpus": cluster.num_gpus()},
        "note": "no GPU in this run: CPU figures only" if not cluster.num_gpus() else "",
        "results": rows,
    }
    header = (f"{'model':<22}{'batch':>6}{'input-only/s':>14}{'pipeline/s':>12}{'in-memory/s':>13}{'ratio':>7}"
              f"{'median':>8}{'CPU':>6}{'step ms':>9}  bound    gpu peak MiB   (best of {args.repeats} interleaved rounds)")
    print(header)
    for row in rows:
        print(f"{row['model']:<22}{row['batch_size']:>6}{row['input_only_images_per_second']:>14}"
              f"{row['pipeline_images_per_second']:>12}{row['in_memory_images_per_second']:>13}"
              f"{row['pipeline_over_in_memory']:>7}{row['ratio_median']:>8}{row['cpu_ratio_median']:>6}"
              f"{row['step_ms']:>9}  {row['bound']:<8} {row.get('gpu_peak_memory_mib', '-')}")
    print("ratio: best pipeline / best in-memory images/s; median: of the rounds' ratios; CPU: in-memory CPU per "
          "image / pipeline CPU per image (median)")
    for row in rows:
        if row["goal"] is not None:
            met = "met" if row["ratio_median"] >= row["goal"] else "NOT MET"
            print(f"goal: {row['model']} from the shards / in memory >= {row['goal']}: {met} (median "
                  f"{row['ratio_median']}, best {max(row['ratio_rounds'])}, CPU {row['cpu_ratio_median']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
