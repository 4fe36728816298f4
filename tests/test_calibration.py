"""Temperature scaling: the fit recovers a known temperature, never worsens val's NLL, keeps the
winning class, and older runs without calibration.json read as T = 1."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia import storage
from pneumonia.evaluation import calibration, uncertainty
from pneumonia.layout import Layout


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def tempered_sample(true_temperature: float, num_images: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z / T_true), probabilities reported as softmax(z): a model whose
    confidence is off by exactly T_true, which temperature scaling should find."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(num_images, 3))
    truth = softmax(logits / true_temperature)
    labels = np.array([rng.choice(3, p=row) for row in truth])
    return softmax(logits).astype(np.float32), labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_the_fit_recovers_a_known_temperature(true_temperature):
    probabilities, labels = tempered_sample(true_temperature)
    fitted = calibration.fit_temperature(probabilities, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.1)


def test_nll_after_is_at_most_before_and_the_record_says_so():
    for seed, true_temperature in enumerate((0.4, 1.0, 3.0)):
        probabilities, labels = tempered_sample(true_temperature, num_images=300, seed=seed)
        record = calibration.calibration_record(probabilities, labels)
        assert record["fitted_on"] == "val" and record["num_images"] == 300
        assert record["nll"]["after"] <= record["nll"]["before"]
        assert record["nll"]["after"] == pytest.approx(
            calibration.negative_log_likelihood(probabilities, labels, record["temperature"]))
        # The minimum: a step either way does not lower the NLL.
        for factor in (0.95, 1.05):
            assert record["nll"]["after"] <= calibration.negative_log_likelihood(
                probabilities, labels, record["temperature"] * factor) + 1e-9


def test_temperature_keeps_the_winning_class_and_sums_to_one():
    probabilities, _ = tempered_sample(1.0, num_images=200)
    for temperature in (0.3, 1.0, 4.0):
        scaled = calibration.apply_temperature(probabilities, temperature)
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(scaled.argmax(axis=1), probabilities.argmax(axis=1))
    np.testing.assert_allclose(calibration.apply_temperature(probabilities, 1.0), probabilities, atol=1e-6)
    softer = calibration.apply_temperature(probabilities, 4.0)
    assert softer.max(axis=1).mean() < probabilities.max(axis=1).mean()
    # A probability of exactly 0 (float32 underflow) stays finite.
    assert np.isfinite(calibration.apply_temperature(np.array([[1.0, 0.0, 0.0]]), 2.0)).all()


def test_a_perfectly_separated_val_split_stays_inside_the_range():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probabilities = np.eye(3)[labels] * 0.9 + 0.1 / 3
    assert calibration.fit_temperature(probabilities, labels) == pytest.approx(calibration.MIN_TEMPERATURE, rel=1e-3)
    assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_load_temperature_reads_the_run_file_and_defaults_to_one(tmp_path):
    layout = Layout(str(tmp_path))
    assert calibration.load_temperature(layout, "old-run") == 1.0
    storage.write_json(layout.calibration("new-run"), {"temperature": 1.7, "fitted_on": "val", "num_images": 5,
                                                       "nll": {"before": 0.9, "after": 0.8}})
    assert calibration.load_temperature(layout, "new-run") == 1.7
    assert layout.calibration("new-run") == f"{tmp_path}/runs/new-run/calibration.json"
    assert layout.best_weights("new-run") == f"{tmp_path}/runs/new-run/checkpoints/best.weights.h5"


def test_a_run_dir_copied_anywhere_keeps_its_paths():
    layout, run_id = Layout.of_run_dir("gs://bucket/prefix/runs/r1/")
    assert (layout.root, run_id) == ("gs://bucket/prefix", "r1")
    assert layout.calibration(run_id) == "gs://bucket/prefix/runs/r1/calibration.json"
    layout, run_id = Layout.of_run_dir("/tmp/copy-of-r1")
    assert layout.model(run_id) == "/tmp/copy-of-r1/model"
    assert layout.best_weights(run_id) == "/tmp/copy-of-r1/checkpoints/best.weights.h5"


def class_weighted_sample(num_images: int, noise_rate: float = 0.2, sharpness: float = 1.6,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """(raw probabilities, labels, true P(label | film), class weights) of a model trained with a
    class-weighted loss on films filed under another class at `noise_rate`: its optimum is
    p_k proportional to w_k * P(k | x), sharpened here (as overfitting does) by `sharpness`."""
    rng = np.random.default_rng(seed)
    mix = np.array([0.27, 0.48, 0.25])
    pattern = rng.choice(3, num_images, p=mix)
    moved = rng.random(num_images) < noise_rate
    labels = np.where(moved, (pattern + rng.integers(1, 3, num_images)) % 3, pattern)
    truth = np.full((num_images, 3), noise_rate / 2)
    truth[np.arange(num_images), pattern] = 1 - noise_rate
    label_mix = mix * (1 - noise_rate) + (1 - mix) * noise_rate / 2
    weights = list(1.0 / (3 * label_mix))  # scikit-learn's "balanced"
    logits = sharpness * np.log(truth) + np.log(weights) + rng.normal(0.0, 0.2, truth.shape)
    return softmax(logits).astype(np.float32), labels, truth, weights


def test_undoing_the_class_weight_prior_calibrates_where_a_temperature_alone_cannot():
    # Fitted on 2,000 val films, scored on 20,000 test films: the gap between the mean top-class
    # confidence and the accuracy (the ideal: 0.8 on every film), and the ECE.
    val_p, val_labels, _, weights = class_weighted_sample(2000, seed=1)
    test_p, test_labels, truth, _ = class_weighted_sample(20000, seed=2)
    scores = {}
    for method in calibration.METHODS:
        fitted, reason = calibration.fit(val_p, val_labels, weights, method)
        calibrated = fitted.apply(test_p)
        accuracy = np.mean(calibrated.argmax(axis=1) == test_labels)
        scores[method] = (abs(calibrated.max(axis=1).mean() - accuracy),
                          uncertainty.reliability(test_labels, calibrated).ece, reason)
    raw_gap = abs(test_p.max(axis=1).mean() - np.mean(test_p.argmax(axis=1) == test_labels))
    prior_gap, prior_ece, reason = scores["prior_temperature"]
    assert reason is None and raw_gap > 0.08
    assert prior_gap < 0.03 and prior_ece < 0.035  # measured: 0.018 and 0.025
    assert prior_ece < scores["temperature"][1] - 0.008  # T alone leaves the prior shift in (0.037)
    assert scores["vector_scaling"][0] < 0.03  # it can learn the shift from 2,000 films


def test_too_few_val_films_or_one_class_keep_t_at_one_and_the_prior_correction():
    probabilities, labels, _, weights = class_weighted_sample(calibration.MIN_FIT_IMAGES - 1)
    fitted, reason = calibration.fit(probabilities, labels, weights)
    assert fitted.temperature == 1.0 and "fewer than" in reason
    assert fitted.bias == pytest.approx(-np.log(weights))
    probabilities, labels, _, weights = class_weighted_sample(400)
    fitted, reason = calibration.fit(probabilities, np.zeros_like(labels), weights)
    assert fitted.temperature == 1.0 and "one class" in reason
    record = calibration.calibration_record(probabilities, np.zeros_like(labels), None)
    assert record["fitted"] is False and record["bias"] == [0.0, 0.0, 0.0]
    assert calibration.from_record(record).is_identity


def test_a_record_from_before_the_bias_reads_as_temperature_alone():
    old = {"temperature": 2.0, "fitted_on": "val", "num_images": 300, "nll": {"before": 1.0, "after": 0.9}}
    probabilities, _, _, _ = class_weighted_sample(50)
    np.testing.assert_allclose(calibration.from_record(old).apply(probabilities),
                               calibration.apply_temperature(probabilities, 2.0))
