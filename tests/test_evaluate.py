"""The evaluate stage and its report: numbers equal scikit-learn on the model's own predictions,
the FP / FN text, valid plots, the marker, idempotence, and exit 2 for a missing run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
import yaml
from data_helpers import config_for, make_demo_archive
from PIL import Image
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score

from pneumonia import storage, weight_files
from pneumonia.config import CLASS_NAMES, PipelineConfig, load_config
from pneumonia.data import imaging, pipeline, preprocess, shard, tfrecords
from pneumonia.errors import BadInputError, UpstreamMissingError
from pneumonia.evaluation import calibration, evaluate, report, saliency, uncertainty
from pneumonia.evaluation.calibration import apply_temperature
from pneumonia.layout import Layout
from pneumonia.model import zoo
from pneumonia.training import export

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "test-run"
HISTORY = {  # as training writes it, with a gap: epoch 0 has no validation numbers
    "epochs": [{"epoch": 0, "loss": 1.1, "cohen_kappa": 0.1},
               {"epoch": 1, "loss": 0.9, "cohen_kappa": 0.3, "val_loss": 1.0, "val_cohen_kappa": 0.25},
               {"epoch": 2, "loss": 0.7, "cohen_kappa": 0.5, "val_loss": 0.95, "val_cohen_kappa": 0.4}],
    "training_seconds": 12.5,
    # The loss's class weights: the calibration undoes their prior shift, a non-trivial map even
    # where val is too small to fit a temperature.
    "class_weights": [1.3, 0.7, 1.2],
}


@dataclass(frozen=True)
class TrainedRun:
    config: PipelineConfig
    run_dir: str
    model: object  # the tf_keras model whose weights are the run's best.weights.h5


def make_run(root: Path, seed: int = 0, encoding: str = "png", label_noise: float = 0.0) -> TrainedRun:
    """Demo archive -> preprocess -> shard (the real stages, 32x32x1), then a run dir as training
    leaves it: config.yaml, checkpoints/best.weights.h5 (a small CNN, briefly trained), history.json,
    calibration.json and model/ (training's own export step), _SUCCESS.json."""
    archive = make_demo_archive(root, num_images=60, seed=seed, label_noise=label_noise)
    config = config_for(root / "data", archive, "shard.image_height=32", "shard.image_width=32",
                        "shard.min_shards_per_split=3", f"shard.encoding={encoding}", "model.name=small_cnn", "model.weights=none",
                        "model.trainable=full", "model.input_size=32", "model.dense_units=[16]",
                        "train.per_replica_batch_size=4", f"train.run_id={RUN_ID}")
    preprocess.run(config)
    shard.run(config)
    layout = Layout.of(config)
    keras.utils.set_random_seed(seed + 1)  # 0 would leave TF's global seed at 0 (see train.seed)
    model = zoo.build_model(config.model, (32, 32, 1))
    # A few quick epochs so the predictions spread over the classes (a random net picks one class
    # for everything, which would make the confusion-matrix checks trivial).
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="categorical_crossentropy")
    train = pipeline.make_dataset(layout.processed(config.shard.size_dir), "train", 8, training=False, config=config)
    model.fit(train, epochs=4, verbose=0)
    weight_files.save_weights(model, layout.best_weights(RUN_ID))
    storage.write_text(storage.join(layout.run(RUN_ID), "config.yaml"), config.to_yaml())
    storage.write_json(layout.history(RUN_ID), HISTORY)
    export.export_run(layout, RUN_ID)
    storage.write_json(layout.run_marker(RUN_ID), {"run_id": RUN_ID})
    return TrainedRun(config, layout.run(RUN_ID), model)


def read_test_records(config: PipelineConfig) -> list[tfrecords.Record]:
    """Every record of the test-* files, read straight from disk (not through the pipeline)."""
    folder = Path(Layout.of(config).processed(config.shard.size_dir))
    records = []
    for path in sorted(folder.glob("test-*.tfrecord")):
        records += [tfrecords.decode_example(raw.numpy()) for raw in tf.data.TFRecordDataset(str(path))]
    return records


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> TrainedRun:
    # Label noise: 3 of seed 0's 15 test films are filed under another class, so the report's
    # numbers and intervals have errors to show (the clean demo's test set is scored perfectly).
    return make_run(tmp_path_factory.mktemp("evaluate"), label_noise=0.2)


@pytest.fixture(scope="module")
def evaluated(trained_run) -> dict:
    return evaluate.run(trained_run.config)


def test_metrics_equal_scikit_learn_on_the_models_own_predictions(trained_run, evaluated):
    records = read_test_records(trained_run.config)
    assert evaluated["num_images"] == len(records) > 0
    images = np.stack([imaging.to_float(imaging.decode_stored(r.image, 32, 32, 1)).numpy() for r in records])
    labels = np.array([r.label for r in records])
    fitted = calibration.load_calibration(Layout.of(trained_run.config), RUN_ID)
    probabilities = fitted.apply(trained_run.model(images, training=False).numpy())
    predictions = probabilities.argmax(axis=1)

    # The pipeline's order is its own; compare order-free facts plus per-image rows by path.
    assert evaluated["confusion_matrix"] == confusion_matrix(labels, predictions, labels=[0, 1, 2]).tolist()
    assert evaluated["accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert evaluated["cohen_kappa"] == pytest.approx(cohen_kappa_score(labels, predictions))
    assert evaluated["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))
    for index, name in enumerate(CLASS_NAMES):
        assert evaluated["per_class"][name]["auc"] == pytest.approx(
            roc_auc_score(labels == index, probabilities[:, index]), abs=1e-6)
        assert evaluated["per_class"][name]["support"] == int((labels == index).sum())
    assert evaluated["class_names"] == list(CLASS_NAMES)
    on_disk = storage.read_json(str(Path(trained_run.run_dir) / "report" / "metrics.json"))
    assert on_disk["num_images"] == len(records) and on_disk["accuracy"] == evaluated["accuracy"]

    rows = [json.loads(line) for line in (Path(trained_run.run_dir) / "report" / "predictions.jsonl")
            .read_text().splitlines()]
    assert sorted(row["path"] for row in rows) == sorted(r.source_path for r in records)
    by_path = {r.source_path: p for r, p in zip(records, probabilities, strict=True)}
    for row in rows:
        assert list(row["probabilities"].values()) == pytest.approx(list(by_path[row["path"]]), abs=1e-5)


def model_outputs(trained_run: TrainedRun) -> tuple[list[tfrecords.Record], np.ndarray, np.ndarray]:
    """The test records as stored, their labels, and the run's raw (uncalibrated) probabilities."""
    records = read_test_records(trained_run.config)
    images = np.stack([imaging.to_float(imaging.decode_stored(r.image, 32, 32, 1)).numpy() for r in records])
    return records, np.array([r.label for r in records]), trained_run.model(images, training=False).numpy()


def tensorboard_scalars(folder: Path) -> dict[str, float]:
    """tag -> value of every scalar in the event files of one TensorBoard run folder."""
    found = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found[value.tag] = float(tf.make_ndarray(value.tensor))
    return found


def test_patient_bootstrap_binary_view_and_calibration_are_in_metrics_report_and_tensorboard(trained_run, evaluated):
    records, labels, raw = model_outputs(trained_run)
    # The run's calibration when it was evaluated: everything evaluate reports is calibrated with it,
    # the "before" figures excepted.
    summary = evaluated["calibration"]
    fitted = calibration.Calibration(summary["temperature"], tuple(summary["bias"]))
    probabilities = fitted.apply(raw)
    info = evaluated["bootstrap"]
    assert info["unit"] == "patient" and info["resamples"] >= 1000
    assert info["num_patients"] == len({r.patient for r in records}) < len(records)  # several films per patient
    ci95 = evaluated["ci95"]
    for key in ("accuracy", "cohen_kappa", "macro_f1", "auc_macro"):
        low, high = ci95[key]
        assert low <= evaluated[key] <= high
    assert ci95["accuracy"][0] < ci95["accuracy"][1]
    assert set(ci95["precision"]) == set(ci95["recall"]) == set(CLASS_NAMES)

    binary = evaluated["binary"]
    pneumonia, called = labels != 0, 1 - probabilities[:, 0] >= 0.5
    assert binary["sensitivity"] == pytest.approx(np.mean(called[pneumonia]))
    assert binary["specificity"] == pytest.approx(np.mean(~called[~pneumonia]))
    assert binary["auc"] == pytest.approx(roc_auc_score(pneumonia, 1 - probabilities[:, 0]), abs=1e-6)
    assert set(binary["ci95"]) == {"sensitivity", "specificity", "accuracy", "auc"}
    # The demo archive has a test/ folder (official mode) but is not the published test set.
    assert binary["reference"]["same_test_set"] is False and binary["reference"]["accuracy"] == 0.928

    # ECE on the raw and on the calibrated probabilities, computed by hand; the debiased ECE within its interval.
    assert fitted == calibration.load_calibration(Layout.of(trained_run.config), RUN_ID)
    assert summary["method"] == "prior_temperature_top_label" and summary["class_weights"] == HISTORY["class_weights"]
    assert summary["bias"] == pytest.approx(-np.log(HISTORY["class_weights"]))  # val too small to fit: T = 1
    assert summary["fitted"] is False and "fewer than" in summary["reason"]
    assert summary["ece"] == {
        "before": pytest.approx(uncertainty.reliability(labels, raw).ece, abs=1e-6),
        "after": pytest.approx(uncertainty.reliability(labels, probabilities).ece, abs=1e-6)}
    assert summary["mean_confidence"]["after"] == pytest.approx(probabilities.max(axis=1).mean(), abs=1e-6)
    for key in ("before", "after"):
        low, high = summary["ece_ci95"][key]
        assert 0.0 <= low <= summary["ece_debiased"][key] <= summary["ece"][key] <= high

    text = (Path(trained_run.run_dir) / "report" / "report.md").read_text()
    for heading in ("## Pneumonia versus normal", "## Calibration", "patient-level bootstrap", "Kermany et al. 2018",
                    "Not comparable", "![reliability diagram](reliability.png)"):
        assert heading in text
    low, high = binary["ci95"]["sensitivity"]
    assert f"| sensitivity | {binary['sensitivity']:.3f} [{low:.3f}, {high:.3f}] | 0.932 |" in text

    scalars = tensorboard_scalars(Path(trained_run.run_dir) / "tensorboard" / "test")
    assert scalars["accuracy"] == pytest.approx(evaluated["accuracy"])
    assert scalars["sensitivity"] == pytest.approx(binary["sensitivity"])


def test_the_runs_temperature_calibrates_what_evaluate_reports(trained_run, evaluated, tmp_path):
    shutil.copytree(Path(trained_run.config.data.root), tmp_path / "data")
    config = trained_run.config.replace(data=dataclasses.replace(trained_run.config.data, root=str(tmp_path / "data")))
    run_dir = tmp_path / "data" / "runs" / RUN_ID
    (run_dir / "calibration.json").write_text(json.dumps(
        {"temperature": 2.5, "fitted_on": "val", "num_images": 10, "nll": {"before": 1.0, "after": 0.9}}))
    calibrated = evaluate.run(config)  # the copied report's marker names T = 1: redone, not skipped

    records, labels, raw = model_outputs(trained_run)
    expected = apply_temperature(raw, 2.5)
    rows = {row["path"]: row for row in map(json.loads, (run_dir / "report" / "predictions.jsonl").read_text().splitlines())}
    for record, probabilities in zip(records, expected, strict=True):
        assert list(rows[record.source_path]["probabilities"].values()) == pytest.approx(list(probabilities), abs=1e-5)
    assert calibrated["calibration"]["temperature"] == 2.5
    assert calibrated["calibration"]["ece"]["before"] == pytest.approx(evaluated["calibration"]["ece"]["before"])
    assert calibrated["calibration"]["ece"]["after"] == pytest.approx(uncertainty.reliability(labels, expected).ece)
    assert calibrated["calibration"]["ece"]["after"] != pytest.approx(calibrated["calibration"]["ece"]["before"])
    # T alone does not move the argmax (the run's own calibration, with its prior bias, may).
    assert calibrated["confusion_matrix"] == confusion_matrix(labels, raw.argmax(axis=1), labels=[0, 1, 2]).tolist()
    assert calibrated["binary"]["auc"] == pytest.approx(roc_auc_score(labels != 0, 1 - expected[:, 0]), abs=1e-6)
    assert "a temperature T alone; T = 2.500, fitted on 10 validation images" in (
        run_dir / "report" / "report.md").read_text()


def test_report_files_plots_config_and_marker(trained_run, evaluated):
    folder = Path(trained_run.run_dir) / "report"
    for name in ("confusion_matrix.png", "training_curves.png", "roc.png", "reliability.png"):
        with Image.open(folder / name) as picture:
            picture.verify()  # raises for a truncated or invalid PNG
        with Image.open(folder / name) as picture:
            assert picture.format == "PNG"
            assert 300 <= picture.width <= 2000 and 300 <= picture.height <= 2000
    text = (folder / "report.md").read_text()
    for row in report.error_breakdown(evaluated["confusion_matrix"], CLASS_NAMES):
        assert report.error_sentence(row) in text
    low, high = evaluated["ci95"]["accuracy"]
    assert f"| accuracy | {evaluated['accuracy']:.3f} [{low:.3f}, {high:.3f}] |" in text
    assert "training_seconds: 12.5" in text and "best val_cohen_kappa: 0.4000" in text
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["model"]["name"] == "small_cnn" and saved["shard"]["image_height"] == 32
    marker = storage.read_json(str(folder / "_SUCCESS.json"))
    assert marker["run_id"] == RUN_ID and marker["num_images"] == evaluated["num_images"]
    # Marker last: no report file is newer than it.
    marker_time = (folder / "_SUCCESS.json").stat().st_mtime_ns
    assert all(path.stat().st_mtime_ns <= marker_time for path in folder.iterdir())
    assert not [path for path in folder.iterdir() if path.name.startswith(".tmp-")]


def test_the_report_carries_grad_cam_and_the_shortcut_check(trained_run, evaluated):
    found = evaluated["saliency"]
    assert list(found) == ["method", "border_share", "recall", "recall_border_hidden", "warnings"]
    assert found["method"] == "grad-cam"
    for key in ("border_share", "recall", "recall_border_hidden"):
        assert list(found[key]) == list(CLASS_NAMES)
        assert all(value is None or 0.0 <= value <= 1.0 for value in found[key].values())
    assert found["warnings"] == (saliency.shortcut_warnings(found["border_share"])
                                 + saliency.recall_drop_warnings(found["recall"], found["recall_border_hidden"]))
    folder = Path(trained_run.run_dir) / "report"
    assert "## Shortcut check" in (folder / "report.md").read_text()
    assert saliency.LIMIT in (folder / "report.md").read_text()
    with Image.open(folder / "gradcam.png") as picture:
        # report.saliency_images (12 by default) pairs, three to a row: 4 rows of 6 panels
        expected = min(trained_run.config.report.saliency_images, evaluated["num_images"])
        assert picture.format == "PNG" and picture.size == (6 * 200, -(-expected // 3) * 230)


def test_a_second_run_skips_and_a_new_checkpoint_redoes(trained_run, evaluated):
    folder = Path(trained_run.run_dir) / "report"
    before = (folder / "report.md").stat().st_mtime_ns
    assert evaluate.run(trained_run.config) == evaluated
    assert (folder / "report.md").stat().st_mtime_ns == before  # skipped: nothing rewritten

    other = zoo.build_model(trained_run.config.model, (32, 32, 1))  # fresh random weights
    weight_files.save_weights(other, evaluate.checkpoint_path(trained_run.run_dir))
    try:
        redone = evaluate.run(trained_run.config)
        assert (folder / "report.md").stat().st_mtime_ns != before
        assert storage.read_json(str(folder / "_SUCCESS.json"))["fingerprint"] != ""
        assert redone["checkpoint"] == evaluate.checkpoint_path(trained_run.run_dir)
    finally:  # later tests in this module expect the original checkpoint
        weight_files.save_weights(trained_run.model, evaluate.checkpoint_path(trained_run.run_dir))


def test_a_report_setting_changed_redoes_the_report(trained_run, evaluated):
    marker = Path(trained_run.run_dir) / "report" / "_SUCCESS.json"
    evaluate.run(trained_run.config)
    before = storage.read_json(str(marker))["fingerprint"]
    fewer = trained_run.config.replace(report=dataclasses.replace(trained_run.config.report, saliency_images=1))
    evaluate.run(fewer)
    assert storage.read_json(str(marker))["fingerprint"] != before  # redone, not skipped as "already done"


def test_a_missing_checkpoint_is_bad_input_naming_it(tmp_path, trained_run):
    run_dir = tmp_path / "runs" / "no-weights"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(trained_run.config.to_yaml())
    with pytest.raises(BadInputError, match=str(run_dir / "checkpoints" / "best.weights.h5")):
        evaluate.load_trained_model(str(run_dir))


def test_a_missing_run_waits_then_fails_naming_the_marker(trained_run):
    config = trained_run.config.replace(train=dataclasses.replace(trained_run.config.train, run_id="never-trained"))
    with pytest.raises(UpstreamMissingError, match="runs/never-trained/_SUCCESS.json"):
        evaluate.run(config)


def test_jobs_evaluate_exits_2_and_names_the_missing_run(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "LOG_FORMAT": "json"}
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--set", f"data.root={tmp_path}",
         "--set", "train.run_id=missing-run"], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{tmp_path}/runs/missing-run/_SUCCESS.json" in result.stderr


# A fixed matrix (rows true, columns predicted; normal, bacteria, virus) with known answers.
FIXED = [[50, 4, 1],
         [2, 80, 6],
         [3, 9, 20]]


def test_error_sentences_name_false_negatives_and_false_positives_per_class():
    rows = {row["class"]: row for row in report.error_breakdown(FIXED, CLASS_NAMES)}
    assert report.error_sentence(rows["virus"]) == \
        "virus: 12 false negatives (9 predicted bacteria, 3 normal); 7 false positives (from bacteria 6, normal 1)"
    assert report.error_sentence(rows["normal"]) == \
        "normal: 5 false negatives (4 predicted bacteria, 1 virus); 5 false positives (from virus 3, bacteria 2)"
    assert report.error_sentence(rows["bacteria"]) == \
        "bacteria: 8 false negatives (6 predicted virus, 2 normal); 13 false positives (from virus 9, normal 4)"
    single = report.error_breakdown([[5, 1, 0], [0, 5, 0], [0, 0, 5]], CLASS_NAMES)
    assert report.error_sentence(single[0]) == "normal: 1 false negative (1 predicted bacteria); 0 false positives"
    assert report.error_sentence(single[1]) == "bacteria: 0 false negatives; 1 false positive (from normal 1)"


def test_markdown_tables_follow_the_matrix():
    labels = np.repeat([0, 1, 2], [55, 88, 32])
    predicted = np.concatenate([np.repeat(range(3), FIXED[i]) for i in range(3)])
    probabilities = np.full((len(labels), 3), 0.1)
    probabilities[np.arange(len(labels)), predicted] = 0.8
    metrics = report.compute_metrics(labels, probabilities, CLASS_NAMES)
    assert metrics["confusion_matrix"] == FIXED
    assert metrics["per_class"]["virus"]["false_negatives"] == 12
    assert metrics["per_class"]["virus"]["fpr"] == pytest.approx(7 / (55 + 88))
    text = report.render_markdown(metrics, run_id="r", source="s", checkpoint="c")
    assert "| **virus** | 3 | 9 | 20 |" in text
    assert "| virus | 12 | bacteria 9, normal 3 | 7 | bacteria 6, normal 1 | false negatives |" in text
    assert "| bacteria | 8 | virus 6, normal 2 | 13 | virus 9, normal 4 | false positives |" in text


def test_undefined_auc_and_kappa_are_null_not_nan():
    labels = np.zeros(4, int)  # only one class in the test set
    metrics = report.compute_metrics(labels, np.tile([0.7, 0.2, 0.1], (4, 1)), CLASS_NAMES)
    assert metrics["per_class"]["normal"]["auc"] is None and metrics["auc_macro"] is None
    assert metrics["cohen_kappa"] is None  # scikit-learn gives NaN here
    assert metrics["accuracy"] == 1.0


@pytest.mark.parametrize("history", [{}, {"epochs": []}, {"loss": [1.0, 0.5], "val_cohen_kappa": [0.2]},
                                     {"epochs": [{"loss": 1.0}, {"epoch": 1}]}, ["not", "a", "mapping"]])
def test_training_curves_tolerate_missing_keys(history):
    png = report.plot_training_curves(history)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_shards_from_another_split_are_refused(trained_run, tmp_path):
    # Another split would put training images into this test set: evaluate must not score it.
    shutil.copytree(Path(trained_run.config.data.root), tmp_path / "data")
    config = trained_run.config.replace(data=dataclasses.replace(trained_run.config.data, root=str(tmp_path / "data")))
    marker_path = tmp_path / "data" / "runs" / RUN_ID / "_SUCCESS.json"
    marker = json.loads(marker_path.read_text())
    marker["inputs"] = {"split_manifest_sha256": "0" * 64}
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(BadInputError, match=f"another split than run {RUN_ID} trained on"):
        evaluate.run(config)


def test_test_shards_only_need_the_runs_split_and_encoding():
    run_config = load_config(None, ["train.run_id=r"])
    run_marker = {"inputs": {"split_manifest_sha256": "a" * 64, "shards_fingerprint": "old"}}
    # Resharded for more workers: another fingerprint, the same split and pixels. Accepted.
    same = {"split_manifest_sha256": "a" * 64, "fingerprint": "new", "image": {"encoding": run_config.shard.encoding}}
    evaluate.check_test_shards_fit_run("r", run_marker, run_config, same, "processed/256x256x1")
    with pytest.raises(BadInputError, match="stored as png"):
        evaluate.check_test_shards_fit_run("r", run_marker, run_config, {**same, "image": {"encoding": "png"}}, "p")
    with pytest.raises(BadInputError, match="another split"):
        evaluate.check_test_shards_fit_run("r", run_marker, run_config, {**same, "split_manifest_sha256": "b" * 64},
                                           "p")


def test_report_shows_intervals_and_says_a_zero_width_one_is_not_certainty():
    labels = np.repeat([0, 1, 2], 10)
    perfect = np.eye(3)[labels] * 0.7 + 0.1
    patients = [f"p{i // 2}" for i in range(30)]
    metrics = {**report.compute_metrics(labels, perfect, CLASS_NAMES),
               **uncertainty.bootstrap(labels, perfect, patients, CLASS_NAMES)}
    text = report.render_markdown(metrics, run_id="r", source="s", checkpoint="c")
    assert "| accuracy | 1.000 [1.000, 1.000] |" in text
    assert "1000 resamples of the 15 test patients" in text
    assert "with 15 patients, a true error rate up to about 20 %" in text

    noisy = perfect.copy()
    noisy[:6] = [0.1, 0.8, 0.1]  # three normal patients' films called bacteria
    metrics = {**report.compute_metrics(labels, noisy, CLASS_NAMES),
               **uncertainty.bootstrap(labels, noisy, patients, CLASS_NAMES)}
    text = report.render_markdown(metrics, run_id="r", source="s", checkpoint="c")
    low, high = metrics["ci95"]["recall"]["normal"]
    assert low < 0.4 < high and f"| normal | {metrics['per_class']['normal']['precision']:.3f} [" in text
    assert f"| 0.400 [{low:.3f}, {high:.3f}] |" in text and "rule of three" not in text
