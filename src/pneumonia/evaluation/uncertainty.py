"""How far to trust the test-set numbers: patient-level bootstrap CIs, the pneumonia-vs-normal view, ECE.

A patient's films are not independent (same chest, same machine, often the same day), so the
bootstrap resamples patients, not images: each resample draws as many patients as the test set
has, with replacement, and weights every image by how often its patient was drawn. Every metric
is then a weighted count, computed for all resamples at once with numpy (a [resamples, images]
weight matrix times per-image indicators), so 1,000 resamples of 624 images take milliseconds.

A resample can leave a value undefined: a class with no images (its recall, the macro F1 and the
macro AUC, which need every class the test set has), a class never predicted (its precision), one
class only (kappa). Such a resample is left out of that value's interval rather than counted as 0
(which would drag the interval down for an artefact of resampling); `bootstrap.undefined` in
metrics.json says how many were left out, and a value undefined in over half the resamples gets
no interval (null).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NUM_RESAMPLES = 1000
BOOTSTRAP_SEED = 20180222  # fixed: the same predictions always get the same intervals
CI_PERCENTILES = (2.5, 97.5)
ECE_BINS = 15
BINARY_THRESHOLD = 0.5  # pneumonia when p(pneumonia) = 1 - p(normal) is at least this
NORMAL = "normal"


def patient_weights(patients: Sequence[str], num_resamples: int = NUM_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[num_resamples, num_images] integer weights: how often each image's patient was drawn.

    Each row draws len(unique patients) patients with replacement (a multinomial over patients).
    """
    _, patient_of_image = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    num_patients = int(patient_of_image.max()) + 1 if len(patient_of_image) else 0
    if num_patients == 0:
        return np.zeros((num_resamples, 0))
    draws = np.random.default_rng(seed).multinomial(num_patients, np.full(num_patients, 1.0 / num_patients),
                                                    size=num_resamples)
    return draws[:, patient_of_image].astype(np.float64)


def weighted_confusion(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """[resamples, K, K] confusion matrices (rows true, columns predicted) under each row of weights."""
    cell = np.eye(num_classes * num_classes)[labels * num_classes + predictions]  # [N, K*K] one-hot cell
    return (weights @ cell).reshape(-1, num_classes, num_classes)


def weighted_auc(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row of weights ([resamples]); NaN where a row has no positives or no negatives.

    The Mann-Whitney form: the weighted share of (positive, negative) pairs ranked right, ties
    counting half, which equals the trapezoidal ROC area scikit-learn computes.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    tie_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    positive = is_positive[order]
    sorted_weights = weights[:, order]
    positives_per_tie = np.add.reduceat(sorted_weights * positive, tie_starts, axis=1)
    negatives_per_tie = np.add.reduceat(sorted_weights * ~positive, tie_starts, axis=1)
    negatives_below = np.cumsum(negatives_per_tie, axis=1) - negatives_per_tie
    ranked_right = np.sum(positives_per_tie * (negatives_below + 0.5 * negatives_per_tie), axis=1)
    pairs = positives_per_tie.sum(axis=1) * negatives_per_tie.sum(axis=1)
    return _ratio(ranked_right, pairs)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray,
                       class_names: Sequence[str]) -> dict[str, Any]:
    """accuracy, cohen_kappa, macro_f1, auc_macro ([resamples] each) and precision / recall per class.

    With one row of ones these are the plain test-set values (scikit-learn's definitions; macro F1
    counts an unpredicted class's precision as 0, as the report does).
    """
    num_classes = len(class_names)
    counts = weighted_confusion(labels, probabilities.argmax(axis=1), weights, num_classes)
    total = counts.sum(axis=(1, 2))
    correct = np.trace(counts, axis1=1, axis2=2)
    actual, predicted = counts.sum(axis=2), counts.sum(axis=1)  # [resamples, K] each
    chance = np.sum(actual * predicted, axis=1) / total**2
    kappa = _ratio(correct / total - chance, 1.0 - chance)
    kappa[np.isclose(chance, 1.0)] = np.nan  # one class only, in labels and predictions: kappa undefined
    true_positives = np.diagonal(counts, axis1=1, axis2=2)
    f1 = np.nan_to_num(_ratio(2 * true_positives, actual + predicted))  # 0 when the class is nowhere
    # Macro values need every class the test set has; a resample missing one measures something else.
    present = np.flatnonzero(np.bincount(labels, minlength=num_classes) > 0)
    has_all = np.all(actual[:, present] > 0, axis=1)
    aucs = np.stack([weighted_auc(labels == index, probabilities[:, index], weights) for index in present], axis=1)
    return {
        "accuracy": correct / total,
        "cohen_kappa": kappa,
        "macro_f1": np.where(has_all, f1.mean(axis=1), np.nan),
        "auc_macro": aucs.mean(axis=1) if len(present) > 1 else np.full(len(weights), np.nan),
        "precision": {name: _ratio(true_positives[:, i], predicted[:, i]) for i, name in enumerate(class_names)},
        "recall": {name: _ratio(true_positives[:, i], actual[:, i]) for i, name in enumerate(class_names)},
    }


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray,
                   class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Pneumonia (every class but normal) against normal: sensitivity, specificity, accuracy, AUC.

    The score is p(pneumonia) = 1 - p(normal); an image is called pneumonia when it is at least
    BINARY_THRESHOLD, the decision a binary classifier with these probabilities would make.
    """
    normal = list(class_names).index(NORMAL)
    is_pneumonia = labels != normal
    score = 1.0 - probabilities[:, normal]
    called = score >= BINARY_THRESHOLD
    true_positives = weights @ (is_pneumonia & called)
    true_negatives = weights @ (~is_pneumonia & ~called)
    positives, negatives = weights @ is_pneumonia, weights @ ~is_pneumonia
    return {
        "sensitivity": _ratio(true_positives, positives),
        "specificity": _ratio(true_negatives, negatives),
        "accuracy": _ratio(true_positives + true_negatives, positives + negatives),
        "auc": weighted_auc(is_pneumonia, score, weights),
    }


@dataclass(frozen=True)
class Interval:
    """A percentile interval over the resamples where the value is defined."""

    bounds: list[float] | None
    num_undefined: int


def percentile_interval(values: np.ndarray) -> Interval:
    defined = values[np.isfinite(values)]
    undefined = len(values) - len(defined)
    if len(defined) * 2 < len(values) or not len(defined):
        return Interval(None, undefined)
    low, high = np.percentile(defined, CI_PERCENTILES)
    return Interval([float(low), float(high)], undefined)


def _intervals(values: dict[str, Any], undefined: dict[str, int], prefix: str = "") -> dict[str, Any]:
    """The same tree as `values` with each array replaced by its [low, high]; counts left-out resamples."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            tree[key] = _intervals(value, undefined, f"{prefix}{key}.")
            continue
        interval = percentile_interval(value)
        tree[key] = interval.bounds
        if interval.num_undefined:
            undefined[prefix + key] = interval.num_undefined
    return tree


def _point(values: dict[str, Any]) -> dict[str, Any]:
    return {key: _point(value) if isinstance(value, dict) else _finite_or_none(value[0])
            for key, value in values.items()}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def bootstrap(labels: np.ndarray, probabilities: np.ndarray, patients: Sequence[str], class_names: Sequence[str],
              num_resamples: int = NUM_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """metrics.json's `ci95`, `binary` (values with their own ci95) and `bootstrap` (how, and what was left out)."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(patients) != len(labels):
        raise ValueError(f"{len(patients)} patient ids for {len(labels)} images")
    weights = patient_weights(patients, num_resamples, seed)
    undefined: dict[str, int] = {}
    ci95 = _intervals(multiclass_metrics(labels, probabilities, weights, class_names), undefined)
    binary_ci95 = _intervals(binary_metrics(labels, probabilities, weights, class_names), undefined, "binary.")
    everything_once = np.ones((1, len(labels)))
    binary = {**_point(binary_metrics(labels, probabilities, everything_once, class_names)),
              "positive_class": "pneumonia (" + " + ".join(n for n in class_names if n != NORMAL) + ")",
              "score": f"1 - p({NORMAL})", "threshold": BINARY_THRESHOLD, "ci95": binary_ci95}
    info = {"unit": "patient", "num_patients": len(set(patients)), "num_images": len(labels),
            "resamples": num_resamples, "seed": seed, "percentiles": list(CI_PERCENTILES), "undefined": undefined}
    return {"ci95": ci95, "binary": binary, "bootstrap": info}


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin: images, mean top-class confidence, accuracy; and the ECE they add up to."""

    edges: np.ndarray  # [num_bins + 1]
    counts: np.ndarray  # [num_bins]
    confidence: np.ndarray  # [num_bins], NaN for empty bins
    accuracy: np.ndarray  # [num_bins], NaN for empty bins
    ece: float | None


def reliability(labels: np.ndarray, probabilities: np.ndarray, num_bins: int = ECE_BINS) -> Reliability:
    """Expected calibration error over equal-width bins of the top-class confidence.

    Bins are right-closed ((0, 1/15], (1/15, 2/15], ...); ECE = sum over bins of
    (images in bin / images) * |accuracy in bin - mean confidence in bin|.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    correct = (probabilities.argmax(axis=1) == labels) if len(labels) else np.zeros(0, bool)
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins).astype(np.float64)
    mean_confidence = _ratio(np.bincount(bins, confidence, minlength=num_bins), counts)
    accuracy = _ratio(np.bincount(bins, correct.astype(np.float64), minlength=num_bins), counts)
    gaps = np.nan_to_num(np.abs(accuracy - mean_confidence)) * counts
    ece = float(gaps.sum() / len(labels)) if len(labels) else None
    return Reliability(np.linspace(0.0, 1.0, num_bins + 1), counts.astype(np.int64), mean_confidence, accuracy, ece)
