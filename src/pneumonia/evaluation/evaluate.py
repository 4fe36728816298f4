"""The evaluate stage: a finished training run's best checkpoint on the test shards -> report/.

Reads `runs/<run_id>/config.yaml` (the run's resolved config: model and shard size) and
`runs/<run_id>/checkpoints/best.weights.h5` (tf_keras HDF5 weights of `zoo.build_model`), so it
needs neither a Keras-serialized model nor custom-object registration, and works the same for a
local folder and gs://. Writes report/{metrics.json, predictions.jsonl, report.md,
confusion_matrix.png, training_curves.png, roc.png, reliability.png, gradcam.png, config.yaml}, then
report/_SUCCESS.json.

The run's calibration (runs/<run_id>/calibration.json, fitted on val when training ended: the
class-weight prior undone, a temperature, then the top-label map) is applied to the model's probabilities before
anything is measured or written, exactly as the serving signature applies it: predictions.jsonl and
every metric use calibrated probabilities; only the "before" figures use the raw ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import tf_keras as keras

from pneumonia import hparams, progress, run_ended, storage
from pneumonia.config import CLASS_NAMES, PipelineConfig, ReportConfig
from pneumonia.data import pipeline
from pneumonia.errors import BadInputError
from pneumonia.evaluation import calibration, report, saliency, uncertainty
from pneumonia.layout import CONFIG_NAME, Layout
from pneumonia.logs import get_logger

# Also reachable as evaluate.load_trained_model & co, the names the tests and older callers use.
from pneumonia.trained import checkpoint_path, load_run_config, load_trained_model, predict_dataset  # noqa: F401

log = get_logger(__name__)

# Bump when the report's content changes, so a finished report from older code is redone.
REPORT_VERSION = 4


def check_test_shards_fit_run(run_id: str, run_marker: dict[str, Any], run_config: PipelineConfig,
                              shards_marker: dict[str, Any], processed_dir: str) -> None:
    """Refuses test shards from another split (they may hold training images) or stored otherwise.

    Only the split and the stored pixels matter: shards rewritten for another worker count or
    shard size (the rest of the shards' fingerprint) hold the same test images.
    """
    trained_split = run_marker.get("inputs", {}).get("split_manifest_sha256")
    if trained_split and trained_split != shards_marker.get("split_manifest_sha256"):
        raise BadInputError(f"the shards in {processed_dir} come from another split than run {run_id} trained on: "
                            "its test set may overlap what it trained on. Evaluate a run trained on this split, or "
                            "rerun preprocess and shard with the run's config")
    stored_as = shards_marker.get("image", {}).get("encoding")
    if stored_as != run_config.shard.encoding:
        raise BadInputError(f"the test shards in {processed_dir} are stored as {stored_as}, run {run_id} trained on "
                            f"{run_config.shard.encoding}; reshard with the run's config (shard.encoding="
                            f"{run_config.shard.encoding})")


def run(config: PipelineConfig) -> dict[str, Any]:
    """The stage body (jobs/evaluate.py); returns metrics.json's content.

    `train.run_id` names the run to evaluate (the cluster manifests set the same id for the train
    and evaluate Jobs). Same checkpoint, test shards and report version as an existing report:
    skipped; otherwise redone.
    """
    layout = Layout.of(config)
    run_id = config.train.run_id
    run_dir = layout.run(run_id)
    run_ended.wait_for_finished_run(layout, config)  # exits at once when the run stopped or failed for good
    model, run_config = load_trained_model(run_dir)
    size_dir = run_config.shard.size_dir
    processed_dir = layout.processed(size_dir)
    marker = pipeline.verify_shards(processed_dir, ("test",))
    check_test_shards_fit_run(run_id, storage.read_json(layout.run_marker(run_id)), run_config, marker,
                              processed_dir)
    test_shards = pipeline.shard_paths(processed_dir, "test", marker)
    weights_path = checkpoint_path(run_dir)
    calibration_record = calibration.load_record(layout, run_id)
    fitted = calibration.Calibration() if calibration_record is None else calibration.from_record(calibration_record)
    fingerprint = _fingerprint(weights_path, marker, fitted, config.report)
    report_dir = layout.report(run_id)
    report_marker = layout.report_marker(run_id)
    if storage.exists(report_marker):
        done = storage.read_json(report_marker)
        if done.get("fingerprint") == fingerprint:
            log.info("already done", marker=report_marker)
            return storage.read_json(storage.join(report_dir, "metrics.json"))
        log.warning("report is from another checkpoint or test set; redoing", marker=report_marker)
    storage.remove(report_marker)  # never leave a marker beside files being rewritten

    dataset = pipeline.make_dataset(processed_dir, "test", run_config.train.per_replica_batch_size, training=False,
                                    config=run_config, with_metadata=True)
    expected = pipeline.num_records(marker, "test")
    labels, raw_probabilities, paths, patients = predict_dataset(
        model, progress.track(dataset, "evaluate: predict", expected, count=_batch_size))
    if len(labels) != expected:
        raise BadInputError(f"read {len(labels)} test images from {processed_dir}, its marker lists {expected}")
    probabilities = fitted.apply(raw_probabilities)
    metrics = {"run_id": run_id, **report.compute_metrics(labels, probabilities, CLASS_NAMES),
               **_uncertainty(labels, probabilities, patients, run_config),
               "calibration": report.calibration_summary(labels, raw_probabilities, probabilities, patients,
                                                         calibration_record),
               "checkpoint": weights_path, "test_shards": test_shards}
    metrics["saliency"], gradcam_png = shortcut_check(model, run_config, processed_dir, test_shards, labels,
                                                      probabilities, paths, config.report.saliency_images)

    history = _read_history(layout.history(run_id))
    source = f"{processed_dir}/test-* ({len(test_shards)} shards)"
    storage.write_json(storage.join(report_dir, "metrics.json"), metrics)
    storage.write_text(storage.join(report_dir, "predictions.jsonl"), _predictions_jsonl(labels, probabilities, paths))
    markdown = report.render_markdown(metrics, run_id=run_id, source=source, checkpoint=weights_path,
                                      history_summary=report.history_summary(history))
    markdown += saliency.render_markdown(metrics["saliency"])
    storage.write_text(storage.join(report_dir, "report.md"), markdown)
    if gradcam_png is not None:
        storage.write_bytes(storage.join(report_dir, "gradcam.png"), gradcam_png)
    storage.write_bytes(storage.join(report_dir, "confusion_matrix.png"),
                        report.plot_confusion_matrix(metrics["confusion_matrix"], CLASS_NAMES))
    storage.write_bytes(storage.join(report_dir, "training_curves.png"), report.plot_training_curves(history))
    storage.write_bytes(storage.join(report_dir, "roc.png"), report.plot_roc(labels, probabilities, CLASS_NAMES))
    storage.write_bytes(storage.join(report_dir, "reliability.png"),
                        report.plot_reliability(labels, raw_probabilities, probabilities, fitted.temperature))
    # The config that produced this report: this stage's, with the model and shard size it evaluated.
    resolved = config.replace(model=run_config.model, shard=run_config.shard)
    storage.write_text(storage.join(report_dir, CONFIG_NAME), resolved.to_yaml())
    headline = {key: metrics[key] for key in ("num_images", "accuracy", "cohen_kappa", "macro_f1", "auc_macro")}
    hparams.write_test_metrics(layout.tensorboard(run_id), metrics)
    storage.write_json(report_marker, {"version": REPORT_VERSION, "run_id": run_id, "fingerprint": fingerprint,
                                       **headline})
    log.info("report written", report=storage.join(report_dir, "report.md"), **headline)
    print(f"report: {storage.join(report_dir, 'report.md')}  " + "  ".join(
        f"{key}={_short(value)}" for key, value in headline.items()), flush=True)
    return metrics


def _uncertainty(labels: np.ndarray, probabilities: np.ndarray, patients: list[str],
                 run_config: PipelineConfig) -> dict[str, Any]:
    """`ci95`, `binary` (beside the published reference when the test set is the archive's test/), `bootstrap`."""
    if not len(labels):
        return {}
    found = uncertainty.bootstrap(labels, probabilities, patients, CLASS_NAMES)
    if run_config.split.mode == "official":
        found["binary"]["reference"] = report.published_reference(labels, CLASS_NAMES)
    return found


def shortcut_check(model: keras.Model, run_config: PipelineConfig, processed_dir: str, test_shards: list[str],
                   labels: np.ndarray, probabilities: np.ndarray, paths: list[str],
                   num_images: int) -> tuple[dict[str, Any], bytes | None]:
    """Grad-CAM over the test set, a second pass in the same order: (metrics' `saliency`, gradcam.png or None)."""
    dataset = pipeline.make_dataset(processed_dir, "test", run_config.train.per_replica_batch_size, training=False,
                                    config=run_config, with_metadata=True)
    batches = progress.track(dataset, "evaluate: grad-cam", len(labels), count=_batch_size)
    return saliency.check_test_set(model, batches, labels, probabilities, paths, saliency.read_geometry(test_shards),
                                   CLASS_NAMES, num_images, run_config.shard.fit)


def _batch_size(batch: tuple) -> int:
    return int(batch[0].shape[0])


def _fingerprint(weights_path: str, marker: dict[str, Any], fitted: calibration.Calibration,
                 report_config: ReportConfig) -> str:
    """What a finished report depends on: a change in any of it redoes the report."""
    test_shards = sorted((shard["name"], shard["sha256"]) for shard in marker["shards"] if shard["split"] == "test")
    payload = {"version": REPORT_VERSION, "weights_sha256": storage.sha256_file(weights_path),
               "test_shards": test_shards, "temperature": fitted.temperature,
               "bias": list(fitted.bias or ()), "report": dataclasses.asdict(report_config)}
    if not fitted.top_label_is_identity:  # only then: a report from before the map keeps its fingerprint
        payload["top_label"] = [fitted.top_slope, fitted.top_intercept]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_history(path: str) -> Any:
    # The curves are a nice-to-have: a missing or unreadable history.json costs a plot, not the report.
    if not storage.exists(path):
        log.warning("no history.json; the training-curves plot will be empty", path=path)
        return {}
    try:
        return storage.read_json(path)
    except (ValueError, UnicodeDecodeError) as error:
        log.warning("history.json is unreadable; the training-curves plot will be empty", path=path, error=str(error))
        return {}


def _predictions_jsonl(labels: np.ndarray, probabilities: np.ndarray, paths: list[str]) -> str:
    """One line per test image: where it came from, its true and predicted class, the probabilities."""
    lines = []
    for path, label, row in zip(paths, labels, probabilities, strict=True):
        lines.append(json.dumps({
            "path": path, "true": CLASS_NAMES[int(label)], "predicted": CLASS_NAMES[int(np.argmax(row))],
            "probabilities": {name: float(value) for name, value in zip(CLASS_NAMES, row, strict=True)},
        }))
    return "\n".join(lines) + ("\n" if lines else "")


def _short(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
