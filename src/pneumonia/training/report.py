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
    """report.md: headline numbers, a per-class table, the confusion matrix and the FP / FN answer."""
    names = metrics["class_names"]
    lines = [
        f"# Evaluation of run `{run_id}`",
        "",
        f"Test set: {metrics['num_images']} images from `{source}`. Model: `{checkpoint}`.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for label, key in (("accuracy", "accuracy"), ("Cohen's kappa", "cohen_kappa"), ("macro F1", "macro_f1"),
                       ("weighted F1", "weighted_f1"), ("macro AUC (one-vs-rest)", "auc_macro"),
                       ("macro false-positive rate", "fpr_macro")):
        lines.append(f"| {label} | {_fmt(metrics.get(key))} |")
    lines += ["", "## Per class", "",
              "| class | precision | recall | F1 | AUC (one-vs-rest) | false-positive rate | images |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        row = metrics["per_class"][name]
        lines.append(f"| {name} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {_fmt(row['f1'])} | "
                     f"{_fmt(row['auc'])} | {_fmt(row['fpr'])} | {row['support']} |")
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
    if history_summary:
        lines += ["", "## Training", ""] + [f"- {key}: {_fmt(value)}" for key, value in history_summary.items()]
    lines += ["", "## Plots", "", "![confusion matrix](confusion_matrix.png)", "",
              "![training curves](training_curves.png)", "", "![ROC curves](roc.png)", ""]
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
