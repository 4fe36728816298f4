"""Calibration: the temperature fit recovers a known temperature and never worsens val's NLL; the
class-weight prior is undone; the top-label map evens out confidence that does not tell right from
wrong (issue 18's label-noise case) and keeps it where it does; nothing changes the winning class;
older runs without calibration.json (or without the bias, or the map) read as before."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia import storage
from pneumonia.evaluation import calibration, report, uncertainty
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
        record = calibration.calibration_record(probabilities, labels, method=calibration.TEMPERATURE)
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


def clear_and_faint_sample(num_images: int, noise_rate: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw probabilities, labels, faint) of issue 18's label-noise archive as the model sees it: every
    film shows its pattern and the model names it, sure of the clear films (p ~0.97) and less of the
    faint ones (p ~0.6); a share `noise_rate` of the films, drawn regardless of how clear they are, is
    filed under another class. The best answer is known: every film is right 1 - noise_rate of the
    time, faint or clear, so a calibrated model says 0.8 on every film."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 3, num_images)
    faint = rng.random(num_images) < 0.4
    logits = rng.normal(0.0, 0.3, (num_images, 3))
    logits[np.arange(num_images), pattern] += np.where(faint, 1.2, 4.0)
    moved = rng.random(num_images) < noise_rate
    labels = np.where(moved, (pattern + rng.integers(1, 3, num_images)) % 3, pattern)
    return softmax(logits).astype(np.float32), labels, faint


def test_the_top_label_map_evens_out_confidence_that_does_not_tell_right_from_wrong():
    # Fitted on 480 val films (the bench's val size), scored on 20,000: faint and clear films are right
    # equally often (0.8), so each group's calibrated confidence should be 0.8. T (and a per-class
    # bias) keep the order of the confidences and cannot give both groups the same one.
    val_p, val_labels, _ = clear_and_faint_sample(480, seed=1)
    test_p, test_labels, faint = clear_and_faint_sample(20000, seed=2)
    gaps = {}
    for method in calibration.METHODS:
        fitted, reason = calibration.fit(val_p, val_labels, None, method)
        calibrated = fitted.apply(test_p)
        right = calibrated.argmax(axis=1) == test_labels
        assert reason is None and right.mean() == pytest.approx(0.8, abs=0.01)
        gaps[method] = [abs(calibrated.max(axis=1)[group].mean() - right[group].mean()) for group in (faint, ~faint)]
        gaps[method].append(uncertainty.reliability(test_labels, calibrated).ece)
    faint_gap, clear_gap, ece = gaps[calibration.PRIOR_TEMPERATURE_TOP_LABEL]
    assert faint_gap < 0.04 and clear_gap < 0.04 and ece < 0.03  # measured: 0.008, 0.014, 0.012
    for method in (calibration.PRIOR_TEMPERATURE, calibration.VECTOR_SCALING, calibration.TEMPERATURE):
        assert max(gaps[method][:2]) > 0.1 and gaps[method][2] > 0.05, (method, gaps[method])  # the test bites (faint films: 0.29-0.30 under)


def test_the_top_label_map_keeps_confidence_that_does_tell_right_from_wrong():
    # Labels drawn from the model's own tempered probabilities: a confident film is more often right.
    # The fitted map keeps the slope (the surest tenth more confident than the least sure tenth, each
    # matching its own accuracy), where a flat map would give every film the mean.
    val_p, val_labels = tempered_sample(1.8, num_images=2000, seed=5)
    test_p, test_labels = tempered_sample(1.8, num_images=20000, seed=6)
    fitted, _ = calibration.fit(val_p, val_labels, None)
    assert fitted.top_slope > 0.5
    calibrated = fitted.apply(test_p)
    confidence, right = calibrated.max(axis=1), calibrated.argmax(axis=1) == test_labels
    order = np.argsort(confidence)
    for tenth in (order[:2000], order[-2000:]):
        assert confidence[tenth].mean() == pytest.approx(right[tenth].mean(), abs=0.05)  # measured: 0.037, 0.020
    assert confidence[order[-2000:]].mean() - confidence[order[:2000]].mean() > 0.3


def test_the_top_label_map_never_changes_the_winner_and_sums_to_one():
    probabilities = np.random.default_rng(7).dirichlet([0.5, 0.5, 0.5], 2000)
    probabilities[0] = [1.0, 0.0, 0.0]  # the others have nothing (both at the floor): they share the rest evenly
    probabilities[1] = [0.4, 0.35, 0.25]  # a map that would put the top under the runner-up's share
    probabilities[2] = [1.0, 1e-20, 1e-21]  # the others underflow a float sum, not a log-sum
    log_probabilities = np.log(np.maximum(probabilities, calibration.PROBABILITY_FLOOR))
    for slope, intercept in ((0.0, -3.0), (0.1, 1.3), (2.5, -0.7), (1.0, 0.0)):
        mapped = calibration.top_label_map(log_probabilities, slope, intercept)
        np.testing.assert_allclose(mapped.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(mapped.argmax(axis=1), probabilities.argmax(axis=1))
        assert (mapped >= 0).all()
    np.testing.assert_allclose(mapped, probabilities, atol=1e-12)  # slope 1, intercept 0: the identity
    # sigmoid(-3) = 0.05 would put the top under the others' even share: it stays just above it.
    top = 1 / 3 + calibration.TOP_LABEL_MARGIN
    assert calibration.top_label_map(log_probabilities[:1], 0.0, -3.0)[0] == pytest.approx([top, (1 - top) / 2,
                                                                                            (1 - top) / 2])
    # The others keep their proportions, also where they underflow a float sum (1e-20 : 1e-21).
    flat = calibration.top_label_map(log_probabilities[1:3], 0.0, 0.0)
    assert flat[0, 1] / flat[0, 2] == pytest.approx(0.35 / 0.25)
    assert flat[1] == pytest.approx([0.5, 0.5 * 10 / 11, 0.5 / 11])


def test_a_fit_that_cannot_beat_the_identity_keeps_it():
    # Labels drawn from the model's own probabilities: the top-label map is already right, and a fit on
    # 20,000 films finds nothing better than (1, 0) worth more than noise.
    probabilities, labels = tempered_sample(1.0, num_images=20000, seed=8)
    slope, intercept, reason = calibration.fit_top_label(np.log(probabilities), labels)
    assert reason is None and slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.0, abs=0.05)
    # Where the identity is the exact optimum of the fitting set, the fit keeps it exactly.
    exact = np.log(np.array([[0.75, 0.2, 0.05]] * 4))
    assert calibration.fit_top_label(exact, np.array([0, 0, 0, 1])) == (1.0, 0.0, None)


def test_a_hand_edited_record_is_refused_naming_its_field():
    good = {"temperature": 1.2, "bias": [0.0, 0.1, -0.1], "top_label": {"slope": 0.3, "intercept": 1.0}}
    assert calibration.from_record(good).top_slope == 0.3
    for field, value, message in (("slope", None, "top_label.slope must be a number"),
                                  ("slope", float("inf"), "slope must be finite"),
                                  ("intercept", float("nan"), "intercept must be finite"),
                                  ("slope", -0.2, "at least 0")):
        with pytest.raises(ValueError, match=message):
            calibration.from_record({**good, "top_label": {**good["top_label"], field: value}})


def test_a_val_split_with_every_top_class_right_leaves_the_map_as_the_identity_and_says_why():
    labels = np.array([0, 1, 2] * 60)
    probabilities = np.eye(3)[labels] * 0.7 + 0.1
    record = calibration.calibration_record(probabilities, labels, None)
    assert record["fitted"] is True and record["top_label"]["fitted"] is False
    assert "every one of the 180 val images has its top class right" in record["top_label"]["reason"]
    assert calibration.from_record(record).top_label_is_identity
    summary = report.calibration_summary(labels, probabilities, probabilities, [f"p{i}" for i in range(180)], record)
    assert f"(left as the identity: {record['top_label']['reason']})" in "\n".join(report.calibration_section(summary))


def test_the_record_carries_the_top_label_map_and_its_nll_is_what_evaluate_applies():
    probabilities, labels, _ = clear_and_faint_sample(600, seed=3)
    record = calibration.calibration_record(probabilities, labels, None)
    assert record["method"] == calibration.PRIOR_TEMPERATURE_TOP_LABEL and record["top_label"]["fitted"]
    restored = calibration.from_record(record)
    assert (restored.top_slope, restored.top_intercept) == (record["top_label"]["slope"], record["top_label"]["intercept"])
    applied = restored.apply(probabilities)
    assert record["nll"]["after"] == pytest.approx(-np.mean(np.log(applied[np.arange(600), labels])), rel=1e-5)
    assert record["nll"]["after"] < record["nll"]["before"]
    with pytest.raises(ValueError, match="slope must be finite and at least 0"):
        calibration.Calibration(1.0, None, -0.5, 0.0).apply(probabilities)


def test_the_report_states_the_top_label_map_and_what_a_flat_one_means():
    # The label-noise case: every film equally often right, so the fitted map is (nearly) flat, and
    # the report tells its reader that the probabilities no longer rank films.
    val_p, val_labels, _ = clear_and_faint_sample(480, seed=1)
    test_p, test_labels, _ = clear_and_faint_sample(600, seed=2)
    record = calibration.calibration_record(val_p, val_labels, None)
    calibrated = calibration.from_record(record).apply(test_p)
    summary = report.calibration_summary(test_labels, test_p, calibrated, [f"p{i}" for i in range(600)], record)
    text = "\n".join(report.calibration_section(summary))
    assert f"top-label map a = {record['top_label']['slope']:.3f}" in text and "nearly flat" in text
    # Confidence that does tell right from wrong keeps a slope, and the report no such warning.
    val_p, val_labels = tempered_sample(1.8, num_images=600, seed=5)
    record = calibration.calibration_record(val_p, val_labels, None)
    summary = report.calibration_summary(val_labels, val_p, calibration.from_record(record).apply(val_p),
                                         [f"p{i}" for i in range(600)], record)
    assert "nearly flat" not in "\n".join(report.calibration_section(summary))
