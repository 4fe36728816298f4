"""The evaluation report's numbers, text and plots, as pure functions of labels and probabilities.

Numbers come from scikit-learn (not the Keras training metrics) so the report is an independent
check of what training logged. Plots use matplotlib's object API with the Agg canvas: no pyplot
global state, no display needed, PNG bytes out (the caller writes them through `storage`).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import classification_report, cohen_kappa_score, confusion_matrix, roc_auc_score, roc_curve

from pneumonia.evaluation import uncertainty

PLOT_DPI = 100


def compute_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Every number of metrics.json from true class indices [N] and predicted probabilities [N, K].

    Undefined values (AUC of a class absent from the test set, kappa with one class only) are None,
    which JSON writes as null, rather than NaN, which strict JSON readers reject.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape != (labels.shape[0], num_classes):
        raise ValueError(f"probabilities of shape {probabilities.shape} do not match {labels.shape[0]} labels "
                         f"and {num_classes} classes")
    predictions = probabilities.argmax(axis=1)
    indices = list(range(num_classes))
    confusion = confusion_matrix(labels, predictions, labels=indices)
    report = classification_report(labels, predictions, labels=indices, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    total = int(confusion.sum())
    true_positives = np.diag(confusion)
    false_positives = confusion.sum(axis=0) - true_positives
    false_negatives = confusion.sum(axis=1) - true_positives
    actual_negatives = total - confusion.sum(axis=1)

    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    fprs: list[float] = []
    for index, name in enumerate(class_names):
        is_class = labels == index
        auc = None
        if 0 < is_class.sum() < len(labels):  # one-vs-rest AUC needs both positives and negatives
            auc = float(roc_auc_score(is_class, probabilities[:, index]))
            aucs.append(auc)
        fpr = float(false_positives[index] / actual_negatives[index]) if actual_negatives[index] else None
        if fpr is not None:
            fprs.append(fpr)
        row = report[name]
        per_class[name] = {
            "precision": float(row["precision"]), "recall": float(row["recall"]), "f1": float(row["f1-score"]),
            "support": int(row["support"]), "auc": auc, "fpr": fpr,
            "true_positives": int(true_positives[index]), "false_positives": int(false_positives[index]),
            "false_negatives": int(false_negatives[index]),
        }
    macro, weighted = report["macro avg"], report["weighted avg"]
    return {
        "class_names": list(class_names),
        "num_images": total,
        "accuracy": float(np.mean(predictions == labels)) if total else None,
        "cohen_kappa": _kappa(labels, predictions, indices) if total else None,
        "macro_f1": float(macro["f1-score"]),
        "weighted_f1": float(weighted["f1-score"]),
        "macro_precision": float(macro["precision"]),
        "macro_recall": float(macro["recall"]),
        "weighted_precision": float(weighted["precision"]),
        "weighted_recall": float(weighted["recall"]),
        "auc_macro": float(np.mean(aucs)) if aucs else None,
        "fpr_macro": float(np.mean(fprs)) if fprs else None,
        "per_class": per_class,
        "confusion_matrix": confusion.astype(int).tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class, in class_names order",
    }


def _kappa(labels: np.ndarray, predictions: np.ndarray, indices: list[int]) -> float | None:
    # One class only (in labels and predictions alike) leaves kappa undefined: None, said once here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return _finite(cohen_kappa_score(labels, predictions, labels=indices))


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def error_breakdown(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """For each class: its false negatives by predicted class and false positives by true class.

    A false negative of class c is an image of class c predicted as another class (row c, off the
    diagonal); a false positive of c is an image of another class predicted as c (column c).
    """
    matrix = np.asarray(confusion, dtype=np.int64)
    rows = []
    for index, name in enumerate(class_names):
        others = [other for other in range(len(class_names)) if other != index]
        rows.append({
            "class": name,
            "false_negatives": int(sum(matrix[index, other] for other in others)),
            "false_negatives_as": _sorted_counts({class_names[o]: int(matrix[index, o]) for o in others}),
            "false_positives": int(sum(matrix[other, index] for other in others)),
            "false_positives_from": _sorted_counts({class_names[o]: int(matrix[o, index]) for o in others}),
        })
    return rows


def _sorted_counts(counts: Mapping[str, int]) -> dict[str, int]:
    # Largest first; ties keep class order (dicts keep insertion order, sorted() is stable). Zeros dropped.
    return dict(sorted(((k, v) for k, v in counts.items() if v), key=lambda item: -item[1]))


def error_sentence(row: Mapping[str, Any]) -> str:
    """'virus: 12 false negatives (9 predicted bacteria, 3 normal); 7 false positives (from bacteria 6, normal 1)'."""
    fn_text = _count(row["false_negatives"], "false negative")
    if row["false_negatives_as"]:
        items = [f"{count} {'predicted ' if position == 0 else ''}{name}"
                 for position, (name, count) in enumerate(row["false_negatives_as"].items())]
        fn_text += " (" + ", ".join(items) + ")"
    fp_text = _count(row["false_positives"], "false positive")
    if row["false_positives_from"]:
        fp_text += " (from " + ", ".join(f"{name} {count}" for name, count in row["false_positives_from"].items()) + ")"
    return f"{row['class']}: {fn_text}; {fp_text}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def render_markdown(metrics: Mapping[str, Any], *, run_id: str, source: str, checkpoint: str,
                    history_summary: Mapping[str, Any] | None = None) -> str:
    """report.md: headline numbers with their CIs, a per-class table, the confusion matrix, the FP / FN
    answer, the pneumonia-vs-normal view and calibration."""
    names = metrics["class_names"]
    ci95 = metrics.get("ci95", {})
    lines = [
        f"# Evaluation of run `{run_id}`",
        "",
        f"Test set: {metrics['num_images']} images from `{source}`. Model: `{checkpoint}`.",
        "",
        "| metric | value [95 % CI] |",
        "| --- | --- |",
    ]
    for label, key in (("accuracy", "accuracy"), ("Cohen's kappa", "cohen_kappa"), ("macro F1", "macro_f1"),
                       ("weighted F1", "weighted_f1"), ("macro AUC (one-vs-rest)", "auc_macro"),
                       ("macro false-positive rate", "fpr_macro")):
        lines.append(f"| {label} | {with_ci(metrics.get(key), ci95.get(key))} |")
    lines += bootstrap_note(metrics)
    lines += ["", "## Per class", "",
              "| class | precision [95 % CI] | recall [95 % CI] | F1 | AUC (one-vs-rest) | false-positive rate | images |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        row = metrics["per_class"][name]
        precision = with_ci(row["precision"], ci95.get("precision", {}).get(name))
        recall = with_ci(row["recall"], ci95.get("recall", {}).get(name))
        lines.append(f"| {name} | {precision} | {recall} | {with_ci(row['f1'])} | "
                     f"{with_ci(row['auc'])} | {with_ci(row['fpr'])} | {row['support']} |")
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted class)", "",
              "| true \\ predicted | " + " | ".join(names) + " |",
              "| --- |" + " --- |" * len(names)]
    for name, counts in zip(names, metrics["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(count) for count in counts) + " |")
    lines += [
        "", "## False negatives and false positives per class", "",
        "A false negative of a class is an image of that class the model put in another class (its row);",
        "a false positive is an image of another class the model put in it (its column).", "",
        "| class | false negatives | predicted as | false positives | true class | more of |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    breakdown = error_breakdown(metrics["confusion_matrix"], names)
    for row in breakdown:
        more = ("false negatives" if row["false_negatives"] > row["false_positives"]
                else "false positives" if row["false_positives"] > row["false_negatives"] else "equal")
        lines.append(f"| {row['class']} | {row['false_negatives']} | {_pairs(row['false_negatives_as'])} | "
                     f"{row['false_positives']} | {_pairs(row['false_positives_from'])} | {more} |")
    lines += [""] + [f"- {error_sentence(row)}" for row in breakdown]
    lines += binary_section(metrics.get("binary"))
    lines += calibration_section(metrics.get("calibration"))
    if history_summary:
        lines += ["", "## Training", ""] + [f"- {key}: {_fmt(value)}" for key, value in history_summary.items()]
    lines += ["", "## Plots", "", "![confusion matrix](confusion_matrix.png)", "",
              "![training curves](training_curves.png)", "", "![ROC curves](roc.png)", ""]
    if metrics.get("calibration"):
        lines += ["![reliability diagram](reliability.png)", ""]
    return "\n".join(lines)


def _pairs(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """Counts, with each row's share (recall for the diagonal) underneath; rows true, columns predicted."""
    matrix = np.asarray(confusion, dtype=np.int64)
    row_sums = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_sums, out=np.zeros(matrix.shape, dtype=np.float64), where=row_sums > 0)
    figure = Figure(figsize=(5.5, 4.8), dpi=PLOT_DPI, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names))
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix (test set)")
    for row in ticks:
        for column in ticks:
            color = "white" if shares[row, column] > 0.5 else "black"
            axes.text(column, row, f"{matrix[row, column]}\n{shares[row, column]:.0%}", ha="center", va="center",
                      color=color)
    return _png(figure)


def plot_training_curves(history: Any) -> bytes:
    """Loss and Cohen's kappa per epoch, train and val; tolerant of a missing or partial history."""
    epochs = history_epochs(history)
    figure = Figure(figsize=(10, 4), dpi=PLOT_DPI, layout="constrained")
    for position, (metric, title) in enumerate((("loss", "loss"), ("cohen_kappa", "Cohen's kappa")), start=1):
        axes = figure.add_subplot(1, 2, position)
        drawn = False
        for prefix, label in (("", "train"), ("val_", "val")):
            points = [(row.get("epoch", index), row[prefix + metric]) for index, row in enumerate(epochs)
                      if _is_number(row.get(prefix + metric))]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o", label=label)
                drawn = True
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            axes.legend()
        else:
            axes.text(0.5, 0.5, "not in history.json", ha="center", va="center", transform=axes.transAxes)
    return _png(figure)


def history_epochs(history: Any) -> list[dict[str, Any]]:
    """Per-epoch rows from history.json: {"epochs": [{...}]} or Keras' {"loss": [...], ...}; [] otherwise."""
    if isinstance(history, Mapping):
        rows = history.get("epochs")
        if isinstance(rows, list):
            return [row for row in rows if isinstance(row, Mapping)]
        columns = {key: value for key, value in history.items() if isinstance(value, list)}
        if columns:
            length = max(len(value) for value in columns.values())
            return [{"epoch": index, **{key: value[index] for key, value in columns.items() if index < len(value)}}
                    for index in range(length)]
    return []


def history_summary(history: Any) -> dict[str, Any]:
    """Scalar facts from history.json besides the epochs (e.g. training time), and the best val kappa."""
    summary: dict[str, Any] = {}
    if isinstance(history, Mapping):
        summary.update({key: value for key, value in history.items() if _is_number(value) or isinstance(value, str)})
    epochs = history_epochs(history)
    scored = [row for row in epochs if _is_number(row.get("val_cohen_kappa"))]
    if scored:
        best = max(scored, key=lambda row: row["val_cohen_kappa"])
        summary["epochs run"] = len(epochs)
        summary["best val_cohen_kappa"] = float(best["val_cohen_kappa"])
        summary["best epoch"] = best.get("epoch", epochs.index(best))
    return summary


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_roc(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> bytes:
    """One-vs-rest ROC curve per class, AUC in the legend; a class without positives or negatives is skipped."""
    labels = np.asarray(labels)
    figure = Figure(figsize=(5.5, 5), dpi=PLOT_DPI, layout="constrained")
    axes = figure.add_subplot()
    for index, name in enumerate(class_names):
        is_class = labels == index
        if not 0 < is_class.sum() < len(labels):
            continue
        fpr, tpr, _ = roc_curve(is_class, probabilities[:, index])
        auc = roc_auc_score(is_class, probabilities[:, index])
        axes.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel("true-positive rate (recall)")
    axes.set_title("ROC, one class vs the rest (test set)")
    axes.legend(loc="lower right")
    return _png(figure)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ---- Uncertainty, pneumonia versus normal, calibration (issue 11 sections 1-3) ----

# Kermany et al., "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning",
# Cell 2018: their binary pneumonia-vs-normal model on the archive's 624-image test/ folder.
PUBLISHED_REFERENCE = {"source": "Kermany et al., Cell 2018", "accuracy": 0.928, "sensitivity": 0.932,
                       "specificity": 0.901, "auc": 0.968}
PUBLISHED_TEST_SET = {"normal": 234, "pneumonia": 390}


def with_ci(value: Any, interval: Sequence[float] | None = None) -> str:
    """'0.912 [0.889, 0.934]'; the value alone without an interval; 'n/a' when undefined."""
    if value is None:
        return "n/a"
    if not isinstance(value, float):
        return str(value)
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def bootstrap_note(metrics: Mapping[str, Any]) -> list[str]:
    """How the intervals were made, and which resamples were left out of which value."""
    info = metrics.get("bootstrap")
    if not info:
        return []
    lines = ["", f"95 % confidence intervals: patient-level bootstrap ({info['resamples']} resamples of the "
                 f"{info['num_patients']} test patients, whole patients drawn with replacement since a patient's "
                 f"films are not independent; seed {info['seed']}; "
                 + ("BCa interval: percentiles 2.5 and 97.5 corrected for bias and skew, "
                    "docs/report-statistics.md)." if info.get("method") == "bca" else "percentiles 2.5 and 97.5).")]
    if any(interval and interval[0] == interval[1] for interval in _top_intervals(metrics.get("ci95", {}))):
        bound = 3 / info["num_patients"]
        lines.append(f"An interval of zero width means every resample gave the same value (a perfect score, say); "
                     f"it is not certainty: with {info['num_patients']} patients, a true error rate up to about "
                     f"{bound * 100:.0f} % (the rule of three: 3 / patients) can still give a test set without "
                     "errors.")
    if info["undefined"]:
        left_out = ", ".join(f"{key} {count}" for key, count in info["undefined"].items())
        lines.append(f"Resamples where a value is undefined (a class without images or never predicted) are left "
                     f"out of its interval: {left_out}.")
    return lines


def _top_intervals(ci95: Mapping[str, Any]) -> list[Sequence[float] | None]:
    return [value for value in ci95.values() if not isinstance(value, Mapping)]


def published_reference(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """The published pneumonia-vs-normal figures on the archive's test/, and whether this test set is that set.

    Only the class counts can tell: the same 234 normal and 390 pneumonia images, or another archive
    (the synthetic demo one has a test/ folder too) or a test set that lost images in preprocess.
    """
    normal = int(np.sum(np.asarray(labels) == list(class_names).index(uncertainty.NORMAL)))
    counts = {"normal": normal, "pneumonia": int(len(labels)) - normal}
    same = counts == PUBLISHED_TEST_SET
    if same:
        note = ("The same 624 test images, not the same model: the publication's is a binary classifier with "
                "its own preprocessing; here a 3-class model's 1 - p(normal) at 0.5, with this suite's resize and "
                "training split. A difference within the interval is no evidence either way.")
    else:
        note = (f"Not comparable: this test set ({counts['normal']} normal, {counts['pneumonia']} pneumonia) is "
                f"not the published one ({PUBLISHED_TEST_SET['normal']} normal, "
                f"{PUBLISHED_TEST_SET['pneumonia']} pneumonia): another archive (such as the synthetic demo "
                "archive) or images dropped in preprocess. Shown for orientation only.")
    return {**PUBLISHED_REFERENCE, "same_test_set": same, "test_set": counts, "note": note}


def binary_section(binary: Mapping[str, Any] | None) -> list[str]:
    """The pneumonia-vs-normal table, beside the published reference when there is one."""
    if not binary:
        return []
    reference = binary.get("reference")
    header = "| metric | this run [95 % CI] |" + (" Kermany et al. 2018 |" if reference else "")
    lines = ["", "## Pneumonia versus normal", "",
             f"Positive class: {binary['positive_class']}; score p(pneumonia) = {binary['score']}, called pneumonia "
             f"at {binary['threshold']:g} or more (calibrated probabilities).", "",
             header, "| --- | --- |" + (" --- |" if reference else "")]
    for key in ("sensitivity", "specificity", "accuracy", "auc"):
        row = f"| {'AUC' if key == 'auc' else key} | {with_ci(binary.get(key), binary['ci95'].get(key))} |"
        lines.append(row + (f" {reference[key]:.3f} |" if reference else ""))
    if reference:
        lines += ["", reference["note"]]
    return lines


def calibration_summary(labels: np.ndarray, raw_probabilities: np.ndarray, probabilities: np.ndarray,
                        patients: Sequence[str], record: Mapping[str, Any] | None) -> dict[str, Any]:
    """metrics.json's `calibration`: what was applied (calibration.json's record) and, before (raw) and
    after it, the mean top-class confidence and the ECE: plain, debiased and its 95 % interval."""
    labels = np.asarray(labels)
    record = dict(record or {"method": "none", "temperature": 1.0, "bias": None, "fitted": False,
                             "reason": "no calibration.json (a run from before calibration existed): T = 1",
                             "num_images": 0})
    estimates = {"before": uncertainty.ece_estimate(labels, raw_probabilities, patients),
                 "after": uncertainty.ece_estimate(labels, probabilities, patients)}
    confidence = {"before": _mean_top(raw_probabilities), "after": _mean_top(probabilities)}
    return {"method": record.get("method", "temperature"), "temperature": float(record["temperature"]),
            "bias": record.get("bias"), "top_label": record.get("top_label"),
            "class_weights": record.get("class_weights"),
            "fitted": record.get("fitted", True), "reason": record.get("reason"),
            "num_val_images": record.get("num_images"),
            "accuracy": float(np.mean(np.argmax(probabilities, axis=1) == labels)) if len(labels) else None,
            "mean_confidence": confidence,
            "ece": {key: value["plain"] for key, value in estimates.items()},
            "ece_debiased": {key: value["debiased"] for key, value in estimates.items()},
            "ece_ci95": {key: value["ci95"] for key, value in estimates.items()},
            "num_bins": uncertainty.ECE_BINS}


def _mean_top(probabilities: np.ndarray) -> float | None:
    return float(np.mean(np.max(probabilities, axis=1))) if len(probabilities) else None


CONFIDENCE_TOLERANCE = 0.03  # how close a calibrated mean confidence should come to the accuracy
# Below this slope the top-label map spreads the usual range of confidences (logit 0 to 4.6, c 0.5 to
# 0.99) over less than about 0.1 of probability, so films no longer differ much: the report says what
# that means.
FLAT_TOP_LABEL_SLOPE = 0.1

_METHOD_TEXT = {
    "prior_temperature_top_label": "the class-weight prior undone (log w subtracted from the log-probabilities: a "
                                   "class-weighted loss learns p proportional to w x P(class | film)), a "
                                   "temperature T, then a map of the top class's probability c, "
                                   "sigmoid(a logit(c) + b), fitted to how often the top class was right on "
                                   "validation (a slope a under 1 evens out confidence that does not tell right "
                                   "from wrong)",
    "prior_temperature": "the class-weight prior undone (log w subtracted from the log-probabilities: a "
                         "class-weighted loss learns p proportional to w x P(class | film)), then a "
                         "temperature T",
    "vector_scaling": "a temperature T and a bias per class, fitted together (vector scaling)",
    "temperature": "a temperature T alone",
    "none": "nothing",
}


def calibration_section(summary: Mapping[str, Any] | None) -> list[str]:
    if not summary:
        return []
    method = summary.get("method", "temperature")
    temperature = summary["temperature"]
    fitted = summary.get("fitted", True)
    applied = f"Calibration: {_METHOD_TEXT.get(method, method)}; T = {temperature:.3f}"
    if summary.get("bias") is not None and method != "none":
        applied += ", bias " + ", ".join(f"{b:+.3f}" for b in summary["bias"])
    top_label = summary.get("top_label")
    if top_label:
        applied += (f", top-label map a = {top_label['slope']:.3f}, b = {top_label['intercept']:+.3f}"
                    + ("" if top_label.get("fitted") or not fitted else f" (left as the identity: {top_label['reason']})"))
    applied += (f", fitted on {summary.get('num_val_images')} validation images when training ended. "
                if fitted else f". Not fitted: {summary.get('reason')}. ")
    lines = ["", "## Calibration", "", applied + "The same map is applied to every reported probability "
             "and by the served model.", "",
             f"Expected calibration error ({summary['num_bins']} equal-width bins of the top-class confidence). "
             "The plain ECE is biased upward on a few hundred images (binomial noise in each bin counts as "
             "error); the debiased value removes the noise's expected share per bin, and the interval is the "
             "patient bootstrap's, nominally 95 %: in simulation it held the true ECE in 89.5 % of sets for a "
             "perfectly calibrated model and in 98-99.5 % for ECEs of 0.03-0.10 (docs/report-statistics.md).", "",
             "| probabilities | mean top-class confidence | ECE | ECE debiased [nominal 95 % interval] |",
             "| --- | --- | --- | --- |"]
    debiased, interval = summary.get("ece_debiased", {}), summary.get("ece_ci95", {})
    confidence = summary.get("mean_confidence", {})
    for key, label in (("before", "raw (the model's own)"), ("after", "calibrated")):
        lines.append(f"| {label} | {with_ci(confidence.get(key))} | {with_ci(summary['ece'][key])} | "
                     f"{with_ci(debiased.get(key), interval.get(key))} |")
    if summary.get("accuracy") is not None:
        lines += ["", f"Test accuracy {summary['accuracy']:.3f}: a well-calibrated model's mean top-class "
                      f"confidence matches it (here {summary['mean_confidence']['after']:.3f} after calibration)."]
    accuracy, num_val = summary.get("accuracy"), summary.get("num_val_images")
    if fitted and accuracy is not None and num_val:
        # A fit matches val's own accuracy, which binomial noise moves by this much (docs/report-statistics.md).
        spread = 1.96 * math.sqrt(accuracy * (1 - accuracy) / num_val)
        needed = math.ceil(1.96**2 * accuracy * (1 - accuracy) / CONFIDENCE_TOLERANCE**2)
        lines += ["", f"How well {num_val} validation images pin it: their own accuracy, which the fit matches, "
                      f"is within +/- {spread:.3f} of the population's 19 times in 20 if its films were independent "
                      f"(one patient's films move together, so the true spread is wider); {needed} images would "
                      f"bring that to +/- {CONFIDENCE_TOLERANCE}."]
    if top_label and top_label.get("fitted") and top_label["slope"] < FLAT_TOP_LABEL_SLOPE:
        lines += ["", f"The top-label map is nearly flat (a = {top_label['slope']:.3f}): on validation, how sure the "
                      "model was did not tell its right calls from its wrong ones, so every film's top class gets "
                      "about the same probability. Read a film's probability as the model's hit rate on films like "
                      "the test set's, not as how sure it is of that film. The ROC curves and AUCs use these "
                      "probabilities too, as served: films the map ties are no longer ranked."]
    return lines + ["", "The reliability diagram (`reliability.png`) shows accuracy against confidence per bin."]


def plot_reliability(labels: np.ndarray, raw_probabilities: np.ndarray, probabilities: np.ndarray,
                     temperature: float) -> bytes:
    """Accuracy per confidence bin against the diagonal, before and after temperature scaling, counts below."""
    figure = Figure(figsize=(10, 6), dpi=PLOT_DPI, layout="constrained")
    grid = figure.add_gridspec(2, 2, height_ratios=(3, 1))
    panels = (("before (raw)", raw_probabilities), (f"after (calibrated, T = {temperature:.2f})", probabilities))
    for column, (title, values) in enumerate(panels):
        bins = uncertainty.reliability(labels, values)
        centres = (bins.edges[:-1] + bins.edges[1:]) / 2
        width = bins.edges[1] - bins.edges[0]
        top = figure.add_subplot(grid[0, column])
        top.bar(centres, np.nan_to_num(bins.accuracy), width=width, edgecolor="black", label="accuracy")
        # Hatched, not filled: a gap below the accuracy (under-confidence) must not tint the bar it overlaps.
        top.bar(centres, np.nan_to_num(bins.confidence - bins.accuracy), bottom=np.nan_to_num(bins.accuracy),
                width=width, fill=False, hatch="//", edgecolor="red", label="gap to mean confidence")
        top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        ece = "n/a" if bins.ece is None else f"{bins.ece:.3f}"
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}: ECE {ece}")
        top.legend(loc="upper left")
        bottom = figure.add_subplot(grid[1, column], sharex=top)
        bottom.bar(centres, bins.counts, width=width, color="grey", edgecolor="black")
        bottom.set(xlabel="top-class confidence", ylabel="images")
    return _png(figure)
