"""Temperature scaling: one scalar T, fitted on val at the end of training, that softens (T > 1) or
sharpens (T < 1) the model's softmax so its confidence matches how often it is right.

The probabilities are the model's softmax, so softmax(log(p) / T) = softmax(logits / T): the
classic temperature scaling (Guo et al., 2017) without needing the logits. T never changes which
class wins. Written to runs/<id>/calibration.json by the chief, before the run marker:

    {"temperature": T, "fitted_on": "val", "num_images": n, "nll": {"before": x, "after": y}}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pneumonia import storage
from pneumonia.layout import Layout

# The search range for T. NLL is convex in 1/T, so the minimum in this range is the one minimum;
# on a val split the model separates perfectly it lies at the lower end (as sharp as allowed),
# which a small split cannot justify further than 1/5.
MIN_TEMPERATURE = 0.2
MAX_TEMPERATURE = 10.0
# Golden-section steps on log T: the bracket shrinks by 0.618 each, ~1e-9 of log(50) after 45.
_SEARCH_STEPS = 45
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
# log(0) guard: float32's smallest normal number, the same floor the serving graph uses.
PROBABILITY_FLOOR = float(np.finfo(np.float32).tiny)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) row by row; float32 [N, K] like the model's output."""
    if not temperature > 0:  # a calibration.json edited by hand, say: NaNs would spread silently
        raise ValueError(f"the temperature must be positive, got {temperature}")
    scaled = np.log(np.maximum(np.asarray(probabilities, np.float64), PROBABILITY_FLOOR)) / float(temperature)
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p_T(true class) over the rows; labels are class indices."""
    if len(labels) == 0:
        return 0.0
    log_p = np.log(np.maximum(np.asarray(probabilities, np.float64), PROBABILITY_FLOOR)) / float(temperature)
    log_p -= log_p.max(axis=-1, keepdims=True)
    log_softmax = log_p - np.log(np.exp(log_p).sum(axis=-1, keepdims=True))
    return float(-np.mean(log_softmax[np.arange(len(labels)), np.asarray(labels, np.int64)]))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the NLL of `labels` (class indices).

    Golden-section search on log T: NLL(T) is unimodal there (convex in 1/T), so no bracket hunt
    is needed. 1.0 for an empty set.
    """
    if len(labels) == 0:
        return 1.0
    nll = lambda log_t: negative_log_likelihood(probabilities, labels, math.exp(log_t))  # noqa: E731
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    inner_low, inner_high = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    nll_low, nll_high = nll(inner_low), nll(inner_high)
    for _ in range(_SEARCH_STEPS):
        if nll_low <= nll_high:
            high, inner_high, nll_high = inner_high, inner_low, nll_low
            inner_low = high - _GOLDEN * (high - low)
            nll_low = nll(inner_low)
        else:
            low, inner_low, nll_low = inner_low, inner_high, nll_high
            inner_high = low + _GOLDEN * (high - low)
            nll_high = nll(inner_high)
    best = math.exp((low + high) / 2.0)
    # T = 1 (no change) when the search cannot beat it: calibration never makes val worse.
    return best if nll(math.log(best)) <= nll(0.0) else 1.0


def calibration_record(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """calibration.json's content for val's probabilities and labels."""
    temperature = fit_temperature(probabilities, labels)
    return {"temperature": temperature, "fitted_on": "val", "num_images": int(len(labels)),
            "nll": {"before": negative_log_likelihood(probabilities, labels),
                    "after": negative_log_likelihood(probabilities, labels, temperature)}}


def load_temperature(layout: Layout, run_id: str) -> float:
    """The run's fitted T; 1.0 (no change) for a run from before calibration existed."""
    path = layout.calibration(run_id)
    if not storage.exists(path):
        return 1.0
    return float(storage.read_json(path)["temperature"])
