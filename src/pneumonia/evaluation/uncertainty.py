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

The interval is the bias-corrected and accelerated (BCa) bootstrap interval (Efron 1987): the
percentiles of the resampled values, moved by how far the resamples sit from the test-set value
(bias) and by how the value's spread changes with it (acceleration, from the leave-one-patient-out
jackknife). Simulated test sets with patient-correlated films (tests/test_coverage.py,
docs/report-statistics.md) hold the population value in 95 % of sets within binomial noise; the
plain percentile interval fell to 93.8 % for sensitivity and specificity there, resampling films instead of
patients to 88-92 %.

The ECE has its own estimate (`calibration_error`): the plain binned ECE is biased upward on a few
hundred films (a calibrated model shows several points), so the report gives a debiased value and
an interval beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtr, ndtri

NUM_RESAMPLES = 1000
BOOTSTRAP_SEED = 20180222  # fixed: the same predictions always get the same intervals
CI_PERCENTILES = (2.5, 97.5)
INTERVAL_METHOD = "bca"  # recorded in metrics.json's `bootstrap`
ECE_BINS = 15
BINARY_THRESHOLD = 0.5  # pneumonia when p(pneumonia) = 1 - p(normal) is at least this
NORMAL = "normal"


def patient_draws(patients: Sequence[str], num_resamples: int = NUM_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """([num_resamples, num_patients] how often each patient was drawn, [num_images] each image's patient).

    Each row draws len(unique patients) patients with replacement: uniform indices counted per row
    (a multinomial over patients, ~10x faster than numpy's multinomial sampler).
    """
    _, patient_of_image = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    num_patients = int(patient_of_image.max()) + 1 if len(patient_of_image) else 0
    if num_patients == 0:
        return np.zeros((num_resamples, 0)), patient_of_image
    picks = np.random.default_rng(seed).integers(0, num_patients, (num_resamples, num_patients), dtype=np.int32)
    rows = np.arange(num_resamples)[:, None] * num_patients
    draws = np.bincount((picks + rows).ravel(), minlength=num_resamples * num_patients)
    return draws.reshape(num_resamples, num_patients).astype(np.float64), patient_of_image


def patient_weights(patients: Sequence[str], num_resamples: int = NUM_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[num_resamples, num_images] weights: how often each image's patient was drawn."""
    draws, patient_of_image = patient_draws(patients, num_resamples, seed)
    return draws[:, patient_of_image]


@dataclass(frozen=True)
class PatientWeights:
    """The weights the interval needs, one row each, as a [1 + resamples + patients, images] matrix kept
    factored: row 0 weighs every image once (the test-set value); then the bootstrap resamples
    (`draws`: how often each patient was drawn); then the jackknife, one row per patient leaving that
    patient's images out (BCa's acceleration).

    `self @ x` sums x [images, ...] per patient first and weighs the patients after, so a weighted
    count over 1,000 resamples costs [resamples, patients] work, not [resamples, images]; metric
    functions take it wherever they take a plain matrix, and `np.asarray` builds the full matrix
    (the AUC needs it).
    """

    draws: np.ndarray  # [resamples, patients]
    patient_of_image: np.ndarray  # [images]

    def __matmul__(self, per_image: np.ndarray) -> np.ndarray:
        per_image = np.asarray(per_image, dtype=np.float64)
        per_patient = np.zeros((self.draws.shape[1], *per_image.shape[1:]))
        np.add.at(per_patient, self.patient_of_image, per_image)
        total = per_patient.sum(axis=0, keepdims=True)
        return np.concatenate([total, np.tensordot(self.draws, per_patient, axes=1), total - per_patient])

    def __len__(self) -> int:
        return 1 + self.draws.shape[0] + self.draws.shape[1]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        num_patients = self.draws.shape[1]
        by_patient = np.vstack([np.ones((1, num_patients)), self.draws, 1.0 - np.eye(num_patients)])
        return by_patient[:, self.patient_of_image].astype(dtype or np.float64)


def resampling_weights(patients: Sequence[str], num_resamples: int = NUM_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> PatientWeights:
    """The test-set row, the bootstrap resamples and the jackknife rows for these images' patients."""
    return PatientWeights(*patient_draws(patients, num_resamples, seed))


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
    weights = np.asarray(weights)  # a PatientWeights becomes its full matrix here
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
    """accuracy, cohen_kappa, macro_f1, auc_macro ([rows] each) and precision / recall per class.

    With one row of ones these are the plain test-set values (scikit-learn's definitions; macro F1
    counts an unpredicted class's precision as 0, as the report does).
    """
    values = confusion_metrics(labels, probabilities.argmax(axis=1), weights, class_names)
    present = np.flatnonzero(np.bincount(labels, minlength=len(class_names)) > 0)
    aucs = np.stack([weighted_auc(labels == index, probabilities[:, index], weights) for index in present], axis=1)
    values["auc_macro"] = aucs.mean(axis=1) if len(present) > 1 else np.full(len(weights), np.nan)
    return {key: values[key] for key in ("accuracy", "cohen_kappa", "macro_f1", "auc_macro", "precision", "recall")}


def confusion_metrics(labels: np.ndarray, predictions: np.ndarray, weights: np.ndarray,
                      class_names: Sequence[str]) -> dict[str, Any]:
    """The values a weighted confusion matrix gives: accuracy, cohen_kappa, macro_f1 ([rows] each),
    precision and recall per class."""
    num_classes = len(class_names)
    counts = weighted_confusion(labels, predictions, weights, num_classes)
    total = counts.sum(axis=(1, 2))
    correct = np.trace(counts, axis1=1, axis2=2)
    actual, predicted = counts.sum(axis=2), counts.sum(axis=1)  # [rows, K] each
    chance = np.sum(actual * predicted, axis=1) / total**2
    kappa = _ratio(correct / total - chance, 1.0 - chance)
    kappa[np.isclose(chance, 1.0)] = np.nan  # one class only, in labels and predictions: kappa undefined
    true_positives = np.diagonal(counts, axis1=1, axis2=2)
    f1 = np.nan_to_num(_ratio(2 * true_positives, actual + predicted))  # 0 when the class is nowhere
    # Macro values need every class the test set has; a resample missing one measures something else.
    present = np.flatnonzero(np.bincount(labels, minlength=num_classes) > 0)
    has_all = np.all(actual[:, present] > 0, axis=1)
    return {
        "accuracy": correct / total,
        "cohen_kappa": kappa,
        "macro_f1": np.where(has_all, f1.mean(axis=1), np.nan),
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
    return {**binary_rates(is_pneumonia, score >= BINARY_THRESHOLD, weights),
            "auc": weighted_auc(is_pneumonia, score, weights)}


def binary_rates(is_pneumonia: np.ndarray, called: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """sensitivity, specificity and accuracy ([rows] each) of calling pneumonia."""
    true_positives = weights @ (is_pneumonia & called)
    true_negatives = weights @ (~is_pneumonia & ~called)
    positives, negatives = weights @ is_pneumonia, weights @ ~is_pneumonia
    return {
        "sensitivity": _ratio(true_positives, positives),
        "specificity": _ratio(true_negatives, negatives),
        "accuracy": _ratio(true_positives + true_negatives, positives + negatives),
    }


@dataclass(frozen=True)
class Interval:
    """An interval over the resamples where the value is defined."""

    bounds: list[float] | None
    num_undefined: int


def percentile_interval(values: np.ndarray) -> Interval:
    defined = values[np.isfinite(values)]
    undefined = len(values) - len(defined)
    if len(defined) * 2 < len(values) or not len(defined):
        return Interval(None, undefined)
    low, high = np.percentile(defined, CI_PERCENTILES)
    return Interval([float(low), float(high)], undefined)


def bca_interval(point: float, resampled: np.ndarray, jackknife: np.ndarray) -> Interval:
    """The BCa interval at CI_PERCENTILES: the percentile interval where bias and acceleration are unknown.

    Bias z0: how far the test-set value sits from the resamples' median, in normal quantiles.
    Acceleration a: the skewness of the leave-one-patient-out values (Efron & Tibshirani 1993, 14.15).
    """
    plain = percentile_interval(resampled)
    defined = resampled[np.isfinite(resampled)]
    if plain.bounds is None or not np.isfinite(point) or np.ptp(defined) == 0:
        return plain
    below = (np.sum(defined < point) + 0.5 * np.sum(defined == point)) / len(defined)
    bias = ndtri(np.clip(below, 0.5 / len(defined), 1.0 - 0.5 / len(defined)))
    left_out = jackknife[np.isfinite(jackknife)]
    spread = left_out.mean() - left_out if len(left_out) > 1 else np.zeros(1)
    squares = float(np.sum(spread**2))
    acceleration = float(np.sum(spread**3)) / (6.0 * squares**1.5) if squares > 0 else 0.0
    z = ndtri(np.asarray(CI_PERCENTILES) / 100.0)
    levels = ndtr(bias + (bias + z) / (1.0 - acceleration * (bias + z)))
    low, high = np.percentile(defined, 100.0 * levels)
    return Interval([float(low), float(high)], plain.num_undefined)


def _intervals(values: dict[str, Any], undefined: dict[str, int], num_resamples: int,
               prefix: str = "") -> dict[str, Any]:
    """The same tree as `values` (rows as `resampling_weights` stacks them) with each array replaced by
    its BCa [low, high]; counts left-out resamples."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            tree[key] = _intervals(value, undefined, num_resamples, f"{prefix}{key}.")
            continue
        interval = bca_interval(value[0], value[1:1 + num_resamples], value[1 + num_resamples:])
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
    weights = resampling_weights(patients, num_resamples, seed)
    undefined: dict[str, int] = {}
    ci95 = _intervals(multiclass_metrics(labels, probabilities, weights, class_names), undefined, num_resamples)
    binary_values = binary_metrics(labels, probabilities, weights, class_names)
    binary_ci95 = _intervals(binary_values, undefined, num_resamples, "binary.")
    binary = {**_point(binary_values),
              "positive_class": "pneumonia (" + " + ".join(n for n in class_names if n != NORMAL) + ")",
              "score": f"1 - p({NORMAL})", "threshold": BINARY_THRESHOLD, "ci95": binary_ci95}
    info = {"unit": "patient", "method": INTERVAL_METHOD, "num_patients": len(set(patients)),
            "num_images": len(labels), "resamples": num_resamples, "seed": seed, "percentiles": list(CI_PERCENTILES),
            "undefined": undefined}
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


# E|g| / sigma for g ~ N(mu, sigma^2), as a function of mu / sigma (the folded normal's mean): what a
# bin's plain |accuracy - confidence| averages to when its true gap is mu and sampling adds sigma.
_GAP_OVER_SIGMA = np.linspace(0.0, 8.0, 801)
_FOLDED_MEAN = (np.sqrt(2.0 / np.pi) * np.exp(-_GAP_OVER_SIGMA**2 / 2.0)
                + _GAP_OVER_SIGMA * (1.0 - 2.0 * ndtr(-_GAP_OVER_SIGMA)))


def calibration_error(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray,
                      num_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Plain and debiased ECE ([rows] each) under each row of weights, over `reliability`'s bins.

    Plain: sum over bins of (share of images) * |accuracy - mean confidence|. Even a perfectly
    calibrated model shows a gap in every bin, the binomial noise of its few images (sigma =
    sqrt(c (1 - c) / n) at mean confidence c), and |.| turns noise into error. Debiased: each bin's
    gap is the true gap whose expected |gap + noise| equals the one observed (the folded normal's
    mean, inverted; 0 where the gap is within what noise alone gives on average).
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    in_bin = np.eye(num_bins)[bins]  # [N, bins]
    counts = weights @ in_bin
    gap = np.abs(weights @ (in_bin * correct[:, None]) - weights @ (in_bin * confidence[:, None]))  # summed
    total = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_confidence = np.where(counts > 0, (weights @ (in_bin * confidence[:, None])) / counts, 0.0)
        sigma = np.sqrt(mean_confidence * (1.0 - mean_confidence) / np.where(counts > 0, counts, 1.0))
        ratio = np.where(sigma > 0, gap / np.where(counts > 0, counts, 1.0) / np.where(sigma > 0, sigma, 1.0), 0.0)
    true_ratio = np.where(ratio > _FOLDED_MEAN[-1], ratio, np.interp(ratio, _FOLDED_MEAN, _GAP_OVER_SIGMA))
    debiased_gap = np.where(sigma > 0, true_ratio * sigma * counts, gap)  # summed over the bin's images, like gap
    return {"plain": _ratio(gap.sum(axis=1), total), "debiased": _ratio(debiased_gap.sum(axis=1), total)}


def ece_estimate(labels: np.ndarray, probabilities: np.ndarray, patients: Sequence[str],
                 num_resamples: int = NUM_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """metrics.json's ECE of one set of probabilities: plain, debiased and a 95 % interval.

    The interval's upper end is the patient bootstrap's 97.5th percentile of the plain ECE (biased
    upward, so on the safe side); its lower end is the basic bootstrap bound of the debiased ECE
    (2 x value - 97.5th percentile, floored at 0), which reaches 0 when the gaps are within noise.
    Percentile intervals of either estimate alone never reach 0 (every resample adds noise), so
    they cannot cover a calibrated model; docs/report-statistics.md gives the measured coverage.
    """
    if not len(labels):
        return {"plain": None, "debiased": None, "ci95": None, "num_bins": ECE_BINS}
    weights = np.vstack([np.ones((1, len(labels))), patient_weights(patients, num_resamples, seed)])
    values = calibration_error(labels, probabilities, weights)
    plain, debiased = values["plain"], values["debiased"]
    upper = float(np.percentile(plain[1:], CI_PERCENTILES[1]))
    lower = max(0.0, 2.0 * float(debiased[0]) - float(np.percentile(debiased[1:], CI_PERCENTILES[1])))
    return {"plain": float(plain[0]), "debiased": float(debiased[0]), "ci95": [lower, max(upper, lower)],
            "num_bins": ECE_BINS, "interval": "patient bootstrap: [2 debiased - q97.5(debiased), q97.5(plain)]"}
