"""Calibration: the map fitted on val at the end of training that makes the model's confidence match
how often it is right; evaluate and the serving signature apply the same map.

Every method has one form. First, on the log-probabilities (the model's softmax, so log p = logits + c):

    q = softmax(log(p) / T + bias)

then, for the default method only, a map of the top class's probability c = max(q) (top-label
scaling; the other classes keep their proportions and share the rest):

    top = sigmoid(slope * logit(c) + intercept)

- `prior_temperature_top_label` (the default): `prior_temperature` below, then the top-label map
  fitted on val (logistic NLL of "the top class is right", slope >= 0). Why: T and a per-class bias
  keep the order of the films' confidences, and so cannot make a film the model finds hard as
  confident as a clear one when both are right as often (issue 18's label-noise archive: misfiled
  films are drawn regardless of how clearly they show their pattern; the model's confidence still
  varies with it). The slope can flatten the map (0: every film gets val's accuracy) or keep it
  steep where confidence does tell right from wrong; the intercept makes val's mean confidence
  equal val's accuracy (a logistic fit's score equation). The winning class never changes (the top
  probability is kept at least as large as the runner-up's after the share). Measured in
  bench/bench_quality.py.
- `prior_temperature`: bias = -log(w) / T, where w are the class weights the loss
  used. With a class-weighted loss the optimum is p_k proportional to w_k * P(k | x), a shift of the
  prior that no single temperature undoes (it made the ECE worse: 0.140 -> 0.213 in issue 18);
  subtracting log w_k undoes it exactly, and T is then fitted on val (NLL). Without class weights
  this is plain temperature scaling (Guo et al., 2017).
- `vector_scaling`: T and a free bias per class, fitted together (Guo et al.'s vector scaling with
  one shared scale); it can learn the prior shift from val, at the price of two more parameters.
- `temperature`: T alone, the old method (kept for comparison: bench/bench_quality.py).

A fit needs films: on fewer than MIN_FIT_IMAGES val images or with one class only, T stays 1 and the
bias is the prior correction alone (it needs no data: the class weights are known), and the record
says why; the top-label map also stays the identity when every val image is right (or every one
wrong): nothing tells it how confidence relates to being right. T and the top-label map never change
which class wins; the prior correction can (it is meant to: the weighted loss moved the boundary).
Written to runs/<id>/calibration.json by the chief, before the run marker:

    {"method": "prior_temperature_top_label", "temperature": T, "bias": [b_normal, b_bacteria, b_virus],
     "top_label": {"slope": a, "intercept": b, "fitted": true | false, "reason": "..."},
     "class_weights": [...] | null, "fitted": true | false, "reason": "...", "fitted_on": "val",
     "num_images": n, "nll": {"before": x, "after": y}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

from pneumonia import storage
from pneumonia.layout import Layout

PRIOR_TEMPERATURE_TOP_LABEL = "prior_temperature_top_label"
PRIOR_TEMPERATURE, VECTOR_SCALING, TEMPERATURE = "prior_temperature", "vector_scaling", "temperature"
METHODS = (PRIOR_TEMPERATURE_TOP_LABEL, PRIOR_TEMPERATURE, VECTOR_SCALING, TEMPERATURE)
DEFAULT_METHOD = PRIOR_TEMPERATURE_TOP_LABEL
# Below this many val images a fitted T is mostly noise. A fit matches val's own accuracy, which
# binomial noise moves by 1.96 sqrt(a (1 - a) / n): by simulation (docs/report-statistics.md, label
# noise 0.2) the calibrated mean confidence lands within 0.077 of the accuracy in 19 fits of 20 at
# 100 images (0.098 at 50), as far as the miscalibration a fit corrects (raw 0.06-0.12); ~700
# images bring it within 0.03.
MIN_FIT_IMAGES = 100
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
# The top-label map's search box: a slope above 10 would sharpen past anything val can show.
MAX_TOP_LABEL_SLOPE = 10.0
MAX_TOP_LABEL_INTERCEPT = 20.0
# How far the top stays above the runner-up where the map would put it lower: well above float32's
# rounding, so evaluate (float64) and the serving graph (float32) name the same class.
TOP_LABEL_MARGIN = 1e-4


@dataclass(frozen=True)
class Calibration:
    """softmax(log(p) / temperature + bias), then the top-label map sigmoid(top_slope * logit(c) +
    top_intercept) of the top class's probability c: what evaluate and the serving signature apply."""

    temperature: float = 1.0
    bias: tuple[float, ...] | None = None  # None: zeros
    top_slope: float = 1.0  # slope 1, intercept 0: the top-label map is the identity
    top_intercept: float = 0.0

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, float32 [N, K] like the model's output."""
        log_scaled = self.log_scaled(probabilities)
        if self.top_label_is_identity:
            return np.exp(log_scaled).astype(np.float32)
        return top_label_map(log_scaled, self.top_slope, self.top_intercept).astype(np.float32)

    def log_scaled(self, probabilities: np.ndarray) -> np.ndarray:
        """log softmax(log(p) / T + bias), float64: what the top-label map starts from (in log space,
        so that a top probability within float rounding of 1 still has its exact logit)."""
        self.check()
        return _log_softmax(_log(probabilities) / float(self.temperature)
                            + self.bias_vector(np.shape(probabilities)[-1]))

    def check(self) -> None:
        """A calibration.json edited by hand, say: NaNs would spread silently through every probability."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"the temperature must be positive and finite, got {self.temperature}")
        if not (math.isfinite(self.top_slope) and self.top_slope >= 0):  # negative: the surer, the less trusted
            raise ValueError(f"the top-label slope must be finite and at least 0, got {self.top_slope}")
        if not math.isfinite(self.top_intercept):
            raise ValueError(f"the top-label intercept must be finite, got {self.top_intercept}")

    def bias_vector(self, num_classes: int) -> np.ndarray:
        return np.zeros(num_classes) if self.bias is None else np.asarray(self.bias, np.float64)

    @property
    def top_label_is_identity(self) -> bool:
        return self.top_slope == 1.0 and self.top_intercept == 0.0

    @property
    def is_identity(self) -> bool:
        return (self.temperature == 1.0 and (self.bias is None or not np.any(self.bias))
                and self.top_label_is_identity)


def top_label_logit(log_probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(winner, logit of the winner's probability, the others' shares of the rest) from log-probabilities
    [N, K]: logit(c) = log c - logsumexp(log of the others), the shares a softmax over the others; exact
    where c is within float rounding of 1 or the others underflow."""
    log_probabilities = np.asarray(log_probabilities, np.float64)
    rows = np.arange(len(log_probabilities))
    winner = np.argmax(log_probabilities, axis=-1)
    others = log_probabilities.copy()
    others[rows, winner] = -np.inf
    largest = others.max(axis=-1, keepdims=True)
    log_rest = largest[:, 0] + np.log(np.exp(others - largest).sum(axis=-1))
    share = np.exp(others - log_rest[:, None])  # 0 at the winner
    return winner, log_probabilities[rows, winner] - log_rest, share


def top_label_map(log_probabilities: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """From log-probabilities [N, K]: the top class's probability c becomes sigmoid(slope * logit(c) +
    intercept); the other classes share the rest in their own proportions. The top stays above the
    runner-up after the share (by TOP_LABEL_MARGIN), so the winning class never changes; float64."""
    winner, logit, share = top_label_logit(log_probabilities)
    mapped = 1.0 / (1.0 + np.exp(-(slope * logit + intercept)))
    runner_up = share.max(axis=-1)  # its share of the rest; the top must be > runner_up * (1 - top)
    mapped = np.maximum(mapped, runner_up / (1.0 + runner_up) + TOP_LABEL_MARGIN)
    calibrated = share * (1.0 - mapped)[:, None]
    calibrated[np.arange(len(calibrated)), winner] = mapped
    return calibrated


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, np.float64), PROBABILITY_FLOOR))


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    return scores - np.log(np.exp(scores).sum(axis=-1, keepdims=True))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) row by row; float32 [N, K] like the model's output."""
    return Calibration(temperature).apply(probabilities)


def prior_bias(class_weights: Sequence[float] | None, temperature: float, num_classes: int) -> np.ndarray:
    """-log(w) / T: the class-weight prior shift, undone after dividing by T (zeros without weights)."""
    if class_weights is None:
        return np.zeros(num_classes)
    return -np.log(np.asarray(class_weights, np.float64)) / float(temperature)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                            bias: np.ndarray | None = None) -> float:
    """Mean -log p(true class) over the rows after softmax(log(p) / T + bias); labels are class indices."""
    if len(labels) == 0:
        return 0.0
    scores = _log(probabilities) / float(temperature)
    if bias is not None:
        scores = scores + bias
    log_softmax = _log_softmax(scores)
    return float(-np.mean(log_softmax[np.arange(len(labels)), np.asarray(labels, np.int64)]))


def _golden_section(objective: Any) -> float:
    """The minimum of a unimodal function of log T over [MIN_TEMPERATURE, MAX_TEMPERATURE], as T."""
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    inner_low, inner_high = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    value_low, value_high = objective(inner_low), objective(inner_high)
    for _ in range(_SEARCH_STEPS):
        if value_low <= value_high:
            high, inner_high, value_high = inner_high, inner_low, value_low
            inner_low = high - _GOLDEN * (high - low)
            value_low = objective(inner_low)
        else:
            low, inner_low, value_low = inner_low, inner_high, value_high
            inner_high = low + _GOLDEN * (high - low)
            value_high = objective(inner_high)
    return math.exp((low + high) / 2.0)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray,
                    class_weights: Sequence[float] | None = None) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the NLL of `labels` (class indices) after
    the prior correction for `class_weights` (none: plain temperature scaling).

    Golden-section search on log T: NLL(T) is unimodal there (convex in 1/T), so no bracket hunt
    is needed. 1.0 for an empty set, and when the search cannot beat T = 1.
    """
    if len(labels) == 0:
        return 1.0
    log_w = np.zeros(np.shape(probabilities)[-1]) if class_weights is None else np.log(class_weights)
    shifted = np.exp(_log(probabilities) - log_w)  # softmax(log p - log w) up to a row constant
    nll = lambda log_t: negative_log_likelihood(shifted, labels, math.exp(log_t))  # noqa: E731
    best = _golden_section(nll)
    # T = 1 (no change) when the search cannot beat it: calibration never makes val worse.
    return best if nll(math.log(best)) <= nll(0.0) else 1.0


def fit_vector_scaling(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """(T, bias) minimising the NLL of softmax(log(p) / T + bias), the bias's first entry held at 0
    (a constant added to every class changes nothing). Starts from T = 1, bias 0; L-BFGS-B within
    the T range."""
    num_classes = np.shape(probabilities)[-1]

    def nll(params: np.ndarray) -> float:
        return negative_log_likelihood(probabilities, labels, math.exp(params[0]), np.r_[0.0, params[1:]])

    bounds = [(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE))] + [(-20.0, 20.0)] * (num_classes - 1)
    found = minimize(nll, np.zeros(num_classes), method="L-BFGS-B", bounds=bounds)
    if not found.fun <= nll(np.zeros(num_classes)):
        return 1.0, np.zeros(num_classes)
    return math.exp(found.x[0]), np.r_[0.0, found.x[1:]]


def fit_top_label(log_probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float, str | None]:
    """(slope, intercept, why not fitted or None): the top-label map minimising the logistic NLL of
    "the top class is right" on val (log-probabilities after prior + T), slope in [0,
    MAX_TOP_LABEL_SLOPE]. L-BFGS-B from the identity (1, 0); the identity stays when it is not beaten
    or when val holds only right (or only wrong) top classes."""
    winner, logit, _ = top_label_logit(log_probabilities)
    right = (winner == np.asarray(labels)).astype(np.float64)
    if right.size == 0 or right.min() == right.max():
        return 1.0, 0.0, (f"every one of the {right.size} val images has its top class "
                          f"{'right' if right.size and right[0] else 'wrong'}: the top-label map stays the identity")

    def nll(params: np.ndarray) -> float:
        z = params[0] * logit + params[1]
        return float(np.mean(np.logaddexp(0.0, z) - right * z))  # -log sigmoid(z) if right, -log(1 - sigmoid(z)) if not

    found = minimize(nll, np.array([1.0, 0.0]), method="L-BFGS-B",
                     bounds=[(0.0, MAX_TOP_LABEL_SLOPE), (-MAX_TOP_LABEL_INTERCEPT, MAX_TOP_LABEL_INTERCEPT)])
    if not found.fun < nll(np.array([1.0, 0.0])):
        return 1.0, 0.0, None
    return float(found.x[0]), float(found.x[1]), None


def why_not_fit(labels: np.ndarray) -> str | None:
    """Why val cannot pin a calibration (None: it can)."""
    if len(labels) < MIN_FIT_IMAGES:
        return (f"val has {len(labels)} images, fewer than the {MIN_FIT_IMAGES} a fit needs "
                "(docs/report-statistics.md): T = 1")
    if len(np.unique(labels)) < 2:
        return "val holds one class only: nothing to calibrate against, T = 1"
    return None


def fit(probabilities: np.ndarray, labels: np.ndarray, class_weights: Sequence[float] | None,
        method: str = DEFAULT_METHOD) -> tuple[Calibration, str | None]:
    """(the calibration `method` fits on val, why it was not fitted or None)."""
    calibration, reason, _ = _fit(probabilities, labels, class_weights, method)
    return calibration, reason


def _fit(probabilities: np.ndarray, labels: np.ndarray, class_weights: Sequence[float] | None,
         method: str) -> tuple[Calibration, str | None, str | None]:
    """fit, and why the top-label map stayed the identity (None: it was fitted, or the method has none)."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    num_classes = np.shape(probabilities)[-1]
    reason = why_not_fit(labels)
    weights = class_weights if method in (PRIOR_TEMPERATURE, PRIOR_TEMPERATURE_TOP_LABEL) else None
    if reason is not None:
        # The prior correction needs no data (the class weights are known): it stays.
        return Calibration(1.0, _tuple(prior_bias(weights, 1.0, num_classes))), reason, None
    if method == VECTOR_SCALING:
        temperature, bias = fit_vector_scaling(probabilities, labels)
        return Calibration(temperature, _tuple(bias)), None, None
    temperature = fit_temperature(probabilities, labels, weights)
    scaled = Calibration(temperature, _tuple(prior_bias(weights, temperature, num_classes)))
    if method != PRIOR_TEMPERATURE_TOP_LABEL:
        return scaled, None, None
    slope, intercept, top_reason = fit_top_label(scaled.log_scaled(probabilities), labels)
    return Calibration(scaled.temperature, scaled.bias, slope, intercept), None, top_reason


def _tuple(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(value) for value in values)


def calibration_record(probabilities: np.ndarray, labels: np.ndarray, class_weights: Sequence[float] | None = None,
                       method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """calibration.json's content for val's probabilities and labels."""
    calibration, reason, top_reason = _fit(probabilities, labels, class_weights, method)
    bias = calibration.bias_vector(np.shape(probabilities)[-1])
    record = {"method": method, "temperature": calibration.temperature, "bias": bias.tolist(),
              "class_weights": None if class_weights is None else [float(w) for w in class_weights],
              "fitted": reason is None, "reason": reason or f"fitted on {len(labels)} val images",
              "fitted_on": "val", "num_images": int(len(labels)),
              "nll": {"before": negative_log_likelihood(probabilities, labels),
                      "after": _nll_of(calibration.apply(probabilities), labels)}}
    if method == PRIOR_TEMPERATURE_TOP_LABEL:
        record["top_label"] = {"slope": calibration.top_slope, "intercept": calibration.top_intercept,
                               "fitted": reason is None and top_reason is None,
                               "reason": reason or top_reason or f"fitted on {len(labels)} val images"}
    return record


def _nll_of(calibrated: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log of the calibrated probability of the true class."""
    if len(labels) == 0:
        return 0.0
    chosen = np.asarray(calibrated, np.float64)[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(-np.mean(np.log(np.maximum(chosen, PROBABILITY_FLOOR))))


def from_record(record: dict[str, Any]) -> Calibration:
    """calibration.json -> Calibration; a record from before the bias (or the top-label map) existed has
    none. A value that is not a number is refused naming its field."""
    def number(value: Any, field: str) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"calibration.json: {field} must be a number, got {value!r}") from None

    bias = record.get("bias")
    top = record.get("top_label") or {}
    fitted = Calibration(number(record.get("temperature"), "temperature"),
                         None if bias is None else tuple(number(b, "bias") for b in bias),
                         number(top.get("slope", 1.0), "top_label.slope"),
                         number(top.get("intercept", 0.0), "top_label.intercept"))
    fitted.check()
    return fitted


def load_record(layout: Layout, run_id: str) -> dict[str, Any] | None:
    """The run's calibration.json, or None for a run from before calibration existed."""
    path = layout.calibration(run_id)
    return storage.read_json(path) if storage.exists(path) else None


def load_calibration(layout: Layout, run_id: str) -> Calibration:
    """The run's fitted calibration; the identity for a run from before calibration existed."""
    record = load_record(layout, run_id)
    return Calibration() if record is None else from_record(record)


def load_temperature(layout: Layout, run_id: str) -> float:
    """The run's fitted T; 1.0 (no change) for a run from before calibration existed."""
    return load_calibration(layout, run_id).temperature
