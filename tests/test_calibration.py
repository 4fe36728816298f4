"""Temperature scaling: the fit recovers a known temperature, never worsens val's NLL, keeps the
winning class, and older runs without calibration.json read as T = 1."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia import storage
from pneumonia.evaluation import calibration
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
