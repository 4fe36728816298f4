"""Quality against a known ceiling: the demo recipe on archives whose best possible answer is known.

    .venv/bin/python bench/bench_quality.py                       # 4 runs of 4,000 images, 6-10 min on 2 cores
    .venv/bin/python bench/bench_quality.py --rates 0.2           # the issue's acceptance case alone
    .venv/bin/python bench/bench_quality.py --num-images 300 --rates 0,0.2 --epochs 2   # smoke run

For each label-noise rate (default 0, 0.1, 0.2, 0.3) it builds the demo archive with
`--label-noise RATE` (every film shows its true class's pattern; a share RATE of each class is filed
under another class; the truth sidecar says which), runs the four stages with the demo config
(jobs/configs/demo.yaml, only the data paths and the run id set), and compares the report with what
is known: the best accuracy any model can reach on the test split (its films that were not moved)
and the ideal confidence (1 - RATE on every film). It also refits four calibration methods on the
run's own val predictions and scores each on its test predictions: the class-weight prior undone,
then T, then a top-label map (the pipeline's default); the prior undone then T; vector scaling; T
alone.

Issue 18's demands, checked at every rate above 0 (its acceptance case is 0.2): the calibrated mean
top-class confidence within 0.03 of the known best accuracy, the calibrated ECE at most 0.05 and
never above the raw one. The exit status is 1 when one of these fails. Writes
bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from pneumonia.config import load_config
from pneumonia.data import demo, pipeline
from pneumonia.evaluation import calibration, uncertainty
from pneumonia.layout import Layout
from pneumonia.trained import load_trained_model, predict_dataset

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "quality.json"
CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
RUN_ID = "quality"
STAGES = ("preprocess", "shard", "train", "evaluate")
CONFIDENCE_TOLERANCE = 0.03
MAX_ECE = 0.05


def run_stages(root: Path, archive: Path, extra: list[str]) -> float:
    """The four stage entrypoints, one process each as `make train-local` runs them; seconds taken."""
    args = ["--config", str(CONFIG), "--set", f"data.root={root}", "--set", f"data.archive={archive}",
            "--set", f"train.run_id={RUN_ID}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    began = time.perf_counter()
    for stage in STAGES:
        done = subprocess.run([sys.executable, str(REPO / "jobs" / f"{stage}.py"), *args], env=env, cwd=REPO,
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{stage} failed (exit {done.returncode}) under {root}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def known_answers(archive: Path) -> dict[str, Any]:
    """From the truth sidecar: test films, the best accuracy on them (those not moved), films moved."""
    truth = json.loads(Path(demo.truth_path(str(archive))).read_text())
    test = [film for film in truth["films"] if film["path"].startswith("chest_xray/test/")]
    return {"num_test_films": len(test), "best_accuracy": float(np.mean([not film["moved"] for film in test])),
            "ideal_confidence": 1.0 - float(truth["label_noise"]), "num_moved": truth["num_moved"]}


def val_best_accuracy(archive: Path, layout: Layout) -> float:
    """The share of the run's val films not moved: what a perfect calibration fitted on val says.
    val is drawn from the archive's train and val folders; a film is matched by (folder, file name):
    preprocess names it <folder>__<file name>."""
    truth = json.loads(Path(demo.truth_path(str(archive))).read_text())
    moved = {(film["path"].split("/")[1], film["path"].rsplit("/", 1)[-1]): film["moved"] for film in truth["films"]}
    rows = json.loads(Path(layout.split_manifest).read_text())["rows"]
    val = [moved[tuple(row["path"].rsplit("/", 1)[-1].split("__", 1))] for row in rows if row["split"] == "val"]
    return float(1.0 - np.mean(val))


def raw_predictions(root: Path, extra: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """{split: (labels, raw probabilities, patients)} for val and test, from the run's best weights."""
    config = load_config(str(CONFIG), [f"data.root={root}", f"train.run_id={RUN_ID}",
                                       *[value for flag, value in zip(extra[::2], extra[1::2], strict=True)
                                         if flag == "--set"]])
    layout = Layout.of(config)
    model, run_config = load_trained_model(layout.run(RUN_ID))
    processed = layout.processed(run_config.shard.size_dir)
    found = {}
    for split in ("val", "test"):
        dataset = pipeline.make_dataset(processed, split, 64, training=False, config=run_config, with_metadata=True)
        labels, probabilities, _, patients = predict_dataset(model, dataset)
        found[split] = (labels, probabilities, patients)
    return found


def score(labels: np.ndarray, probabilities: np.ndarray, patients: list[str]) -> dict[str, Any]:
    ece = uncertainty.ece_estimate(labels, probabilities, patients)
    # The macro one-vs-rest AUC: a calibration that tied films the model told apart would lower it.
    auc = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro", labels=[0, 1, 2])
    return {"accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
            "mean_confidence": float(probabilities.max(axis=1).mean()), "ece": ece["plain"],
            "ece_debiased": ece["debiased"], "ece_ci95": ece["ci95"], "auc_macro": float(auc)}


def compare_methods(predictions: dict[str, Any], class_weights: list[float] | None) -> dict[str, Any]:
    """Each calibration method fitted on val, scored on test (and the raw probabilities)."""
    val_labels, val_p, _ = predictions["val"]
    labels, raw, patients = predictions["test"]
    rows = {"raw": score(labels, raw, patients)}
    for method in calibration.METHODS:
        fitted, reason = calibration.fit(val_p, val_labels, class_weights, method)
        rows[method] = {**score(labels, fitted.apply(raw), patients), "temperature": fitted.temperature,
                        "bias": list(fitted.bias or ()), "not_fitted": reason}
    return rows


def one_rate(rate: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    root = workdir / f"noise-{rate:g}"
    archive = root / "raw" / "demo-chest-xray.zip"
    demo.make_demo_archive(str(archive), args.num_images, args.seed, label_noise=rate)
    extra = [flag for epochs in ([args.epochs] if args.epochs else []) for flag in ("--set", f"train.epochs={epochs}")]
    seconds = run_stages(root, archive, extra)
    layout = Layout(str(root))
    metrics = json.loads(Path(layout.report(RUN_ID), "metrics.json").read_text())
    record = json.loads(Path(layout.calibration(RUN_ID)).read_text())
    known = known_answers(archive)
    known["val_best_accuracy"] = val_best_accuracy(archive, layout)
    summary = metrics["calibration"]
    methods = compare_methods(raw_predictions(root, extra), record.get("class_weights"))
    calibrated = summary["mean_confidence"]["after"]
    row = {
        "label_noise": rate, "seconds": round(seconds, 1), **known,
        "num_test_images": metrics["num_images"], "num_val_images": record["num_images"],
        "accuracy": metrics["accuracy"], "accuracy_gap": metrics["accuracy"] - known["best_accuracy"],
        "accuracy_ci95": metrics["ci95"]["accuracy"], "cohen_kappa": metrics["cohen_kappa"],
        "calibration": {key: summary[key] for key in ("method", "temperature", "bias", "top_label", "fitted", "reason")},
        "raw_confidence": summary["mean_confidence"]["before"], "calibrated_confidence": calibrated,
        "confidence_gap": calibrated - known["best_accuracy"],
        "ece_raw": summary["ece"]["before"], "ece": summary["ece"]["after"],
        "ece_debiased": summary["ece_debiased"]["after"], "ece_ci95": summary["ece_ci95"]["after"],
        "methods": methods,
    }
    row["checks"] = checks_of(row)
    return row


def checks_of(row: dict[str, Any]) -> dict[str, bool]:
    """Issue 18's demands at rates 0.1-0.3 (at 0 the figures are shown, not checked)."""
    if row["label_noise"] <= 0:
        return {}
    return {"calibrated ECE <= raw ECE": row["ece"] <= row["ece_raw"] + 1e-12,
            f"|confidence - best accuracy| <= {CONFIDENCE_TOLERANCE}":
                abs(row["confidence_gap"]) <= CONFIDENCE_TOLERANCE,
            f"calibrated ECE <= {MAX_ECE}": row["ece"] <= MAX_ECE}


def print_tables(rows: list[dict[str, Any]]) -> None:
    print("\n| label noise | best accuracy (test) | test accuracy [95 % CI] | gap | kappa | ideal confidence | "
          "raw confidence | calibrated confidence | confidence - best | best accuracy (val) | ECE raw | "
          "ECE calibrated | "
          "ECE debiased [nominal 95 %] | T | val / test films |")
    print("| ---: |" + " ---: |" * 14)
    for row in rows:
        low, high = row["accuracy_ci95"]
        ece_low, ece_high = row["ece_ci95"]
        print(f"| {row['label_noise']:g} | {row['best_accuracy']:.3f} | {row['accuracy']:.3f} [{low:.3f}, {high:.3f}] "
              f"| {row['accuracy_gap']:+.3f} | {row['cohen_kappa']:.3f} | {row['ideal_confidence']:.3f} | "
              f"{row['raw_confidence']:.3f} | {row['calibrated_confidence']:.3f} | {row['confidence_gap']:+.3f} | "
              f"{row['val_best_accuracy']:.3f} | "
              f"{row['ece_raw']:.3f} | {row['ece']:.3f} | {row['ece_debiased']:.3f} [{ece_low:.3f}, {ece_high:.3f}] "
              f"| {row['calibration']['temperature']:.2f} | {row['num_val_images']} / {row['num_test_images']} |")
    print("\nCalibration methods, each fitted on the run's val and scored on its test split "
          "(mean top-class confidence - test accuracy; ECE; macro AUC):\n")
    names = ("raw", *calibration.METHODS)
    print("| label noise | " + " | ".join(names) + " |")
    print("| ---: |" + " --- |" * len(names))
    for row in rows:
        cells = [f"{m['mean_confidence'] - m['accuracy']:+.3f}; {m['ece']:.3f}; {m['auc_macro']:.3f}"
                 for m in (row["methods"][name] for name in names)]
        print(f"| {row['label_noise']:g} | " + " | ".join(cells) + " |")
    print()
    for row in rows:
        for check, held in row["checks"].items():
            print(f"rate {row['label_noise']:g}: {check}: {'ok' if held else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0,0.1,0.2,0.3", help="label-noise rates, comma-separated")
    parser.add_argument("--num-images", type=int, default=4000,
                        help="films per archive (default 4,000: ~480 val and ~815 test films)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=0, help="override train.epochs (0: the demo config's)")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    rates = [float(rate) for rate in args.rates.split(",")]
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as scratch:
        workdir = Path(args.workdir or scratch)
        rows = []
        for rate in rates:
            rows.append(one_rate(rate, args, workdir))
            print(f"label noise {rate:g}: {rows[-1]['seconds']:.0f} s", flush=True)
    print_tables(rows)
    results = {"setup": {"config": str(CONFIG.relative_to(REPO)), "num_images": args.num_images, "seed": args.seed,
                         "epochs_override": args.epochs or None, "cpus": os.cpu_count(),
                         "machine": platform.processor() or platform.machine(),
                         "seconds": round(time.perf_counter() - began, 1)},
               "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out} ({results['setup']['seconds']:.0f} s)")
    return 0 if all(all(row["checks"].values()) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
