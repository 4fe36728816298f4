"""Step time with the SIGTERM agreement at every step versus every N steps, on 2 workers over loopback.

    .venv/bin/python bench/bench_preemption.py             # ~3 minutes on 2 CPU cores
    .venv/bin/python bench/bench_preemption.py --quick     # fewer steps and rounds (smoke run)

Two worker processes (TF_CONFIG on 127.0.0.1, MultiWorkerMirroredStrategy: RING on CPU, NCCL with
one GPU each) train small_cnn at 64x64x1 on one batch held in memory (the step alone, no input
pipeline) with the trainer's loss, metrics and optimizer, and the trainer's ResumableBackup under
three schedules for agreeing whether a worker got SIGTERM: every step (what the trainer did
before), every N steps (train.preemption_check_every_n_steps), and at the epoch's end only (the
floor: no agreement inside the epoch). Each timed fit is one epoch of --steps steps; rounds
interleave the schedules so that a busy machine weighs on all of them alike. Prints a table (median
and best round) and writes bench/results/preemption.json (the chief's timings; the other worker's
are in its log).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "preemption.json"
IMAGE_SIZE = 64
PER_REPLICA_BATCH = 16


def schedules(steps: int, every_n: int) -> dict[str, int]:
    """Name -> check_every_n_steps: every step, every N, and the epoch's last step only."""
    return {"every step": 1, f"every {every_n} steps": every_n, "epoch end only": steps}


def worker(steps: int, rounds: int, every_n: int, out: str) -> int:
    import tensorflow as tf
    import tf_keras as keras

    from pneumonia import cluster
    from pneumonia.config import CLASS_NAMES, ClusterConfig, ModelConfig
    from pneumonia.logs import configure_logging
    from pneumonia.model import zoo
    from pneumonia.model.metrics import build_metrics
    from pneumonia.training.callbacks import PreemptionWatch, ResumableBackup
    from pneumonia.training.fit import WeightedCategoricalCrossentropy

    configure_logging("bench", run_id="bench", level="WARNING")
    strategy, spec = cluster.make_strategy(ClusterConfig())
    global_batch = PER_REPLICA_BATCH * strategy.num_replicas_in_sync
    images = tf.random.stateless_uniform((global_batch, IMAGE_SIZE, IMAGE_SIZE, 1), seed=(1, 2))
    labels = tf.one_hot(tf.range(global_batch) % len(CLASS_NAMES), len(CLASS_NAMES))
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data = data.with_options(options)
    model_config = ModelConfig(name="small_cnn", weights="none", input_size=IMAGE_SIZE, dense_units=(64,),
                               trainable="full")
    with strategy.scope():
        model = zoo.build_model(model_config, (IMAGE_SIZE, IMAGE_SIZE, 1), num_classes=len(CLASS_NAMES))
        model.compile(keras.optimizers.Adam(1e-3), WeightedCategoricalCrossentropy([1.0, 1.0, 1.0]),
                      metrics=build_metrics(len(CLASS_NAMES)))
    watch = PreemptionWatch(strategy, multi_worker=spec.is_multi_worker)
    plan = schedules(steps, every_n)
    seconds: dict[str, list[float]] = {name: [] for name in plan}
    with tempfile.TemporaryDirectory(prefix="bench-preemption-") as scratch:
        def timed_fit(name: str, every: int, tag: str) -> float:
            backup = ResumableBackup(os.path.join(scratch, f"{tag}-{every}"), watch, check_every_n_steps=every)
            started = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=steps, callbacks=[backup], verbose=0)
            return time.perf_counter() - started

        for name, every in plan.items():  # traces the step and the agreement once, untimed
            timed_fit(name, every, "warm")
        for round_index in range(rounds):
            for name, every in plan.items():
                seconds[name].append(timed_fit(name, every, f"round{round_index}"))
    rows = []
    floor = statistics.median(seconds["epoch end only"]) / steps
    for name, every in plan.items():
        step_ms = 1000 * statistics.median(seconds[name]) / steps
        # The best round too: on a shared machine the median carries other processes' load.
        best_step_ms = 1000 * min(seconds[name]) / steps
        rows.append({"schedule": name, "check_every_n_steps": every, "agreements_per_epoch": -(-steps // every),
                     "step_ms": round(step_ms, 2), "overhead_vs_epoch_end_only": round(step_ms / 1000 / floor - 1, 3),
                     "best_step_ms": round(best_step_ms, 2), "fit_seconds": [round(s, 3) for s in seconds[name]]})
    print(json.dumps({"worker": spec.task_index, "rows": rows}), flush=True)
    if spec.is_chief:
        result = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "tensorflow": tf.__version__, "gpus_per_worker": cluster.num_gpus()},
            "setup": {"workers": spec.num_workers, "model": f"small_cnn@{IMAGE_SIZE}", "global_batch": global_batch,
                      "steps_per_fit": steps, "rounds": rounds, "statistic": "median fit time / steps"},
            "results": rows,
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed fit (default 60, quick 20)")
    parser.add_argument("--rounds", type=int, default=0, help="timed fits per schedule (default 5, quick 2)")
    parser.add_argument("--every-n", type=int, default=0,
                        help="the N of 'every N steps' (default: train.preemption_check_every_n_steps)")
    parser.add_argument("--timeout-s", type=float, default=1200)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of the two processes
    args = parser.parse_args(argv)
    from pneumonia.config import TrainConfig

    steps = args.steps or (20 if args.quick else 60)
    rounds = args.rounds or (2 if args.quick else 5)
    every_n = args.every_n or TrainConfig().preemption_check_every_n_steps
    if args.worker:
        return worker(steps, rounds, every_n, args.out)

    from pneumonia.training import local_workers

    worker_args = ["--worker", "--steps", str(steps), "--rounds", str(rounds), "--every-n", str(every_n),
                   "--out", args.out]
    processes = local_workers.launch(2, worker_args, entrypoint=Path(__file__).resolve())
    code = local_workers.supervise(processes, timeout_s=args.timeout_s)
    if code:
        print(f"a worker failed (exit {code})", file=sys.stderr)
        return code
    result = json.loads(Path(args.out).read_text())
    print(f"2 workers, small_cnn@{IMAGE_SIZE}, global batch {result['setup']['global_batch']}, "
          f"{steps} steps a fit, median of {rounds}")
    print(f"{'schedule':<20}{'agreements/epoch':>18}{'step ms':>10}{'overhead':>10}{'best step ms':>14}")
    for row in result["results"]:
        print(f"{row['schedule']:<20}{row['agreements_per_epoch']:>18}{row['step_ms']:>10}"
              f"{row['overhead_vs_epoch_end_only']:>10.1%}{row['best_step_ms']:>14}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
