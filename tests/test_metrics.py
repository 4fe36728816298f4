"""The Keras metrics against scikit-learn, in one process and summed across replicas of a strategy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from pneumonia.config import CLASS_NAMES
from pneumonia.model.metrics import CohenKappa, FalsePositiveRate, build_metrics

AUC_TOLERANCE = 0.01  # Keras buckets the AUC into thresholds; scikit-learn's is exact


def _random_predictions(seed: int, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with the archive's imbalance and probabilities that are right more often than chance."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=num_images, p=[0.27, 0.48, 0.25])
    probabilities = rng.dirichlet([1.0, 1.0, 1.0], size=num_images)
    probabilities[np.arange(num_images), labels] += rng.random(num_images) * rng.uniform(0.2, 1.5)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return labels, probabilities.astype(np.float32)


def expected_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """What every metric of build_metrics() should report, computed by scikit-learn."""
    predictions = probabilities.argmax(axis=1)
    confusion = confusion_matrix(labels, predictions, labels=[0, 1, 2])
    true_positives = np.diag(confusion)
    false_positives = confusion.sum(axis=0) - true_positives
    actual_negatives = confusion.sum() - confusion.sum(axis=1)
    one_hot = np.eye(3)[labels]
    expected = {
        "accuracy": float(np.mean(predictions == labels)),
        "cohen_kappa": cohen_kappa_score(labels, predictions),
        "fpr_macro": float(np.mean(false_positives / actual_negatives)),
        "auc_macro": roc_auc_score(one_hot, probabilities, average="macro"),
    }
    for index, name in enumerate(CLASS_NAMES):
        expected[f"precision_{name}"] = true_positives[index] / confusion[:, index].sum()
        expected[f"recall_{name}"] = true_positives[index] / confusion[index].sum()
        expected[f"fpr_{name}"] = false_positives[index] / actual_negatives[index]
        expected[f"auc_{name}"] = roc_auc_score(one_hot[:, index], probabilities[:, index])
    return {key: float(value) for key, value in expected.items()}


def assert_matches(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) >= set(expected), f"missing metrics: {set(expected) - set(actual)}"
    for name, value in expected.items():
        tolerance = AUC_TOLERANCE if name.startswith("auc") else 1e-5
        assert actual[name] == pytest.approx(value, abs=tolerance), name


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_scikit_learn_over_uneven_batches(seed):
    labels, probabilities = _random_predictions(seed, num_images=257)
    one_hot = np.eye(3, dtype=np.float32)[labels]
    metrics = build_metrics()
    assert len({metric.name for metric in metrics}) == len(metrics)
    for metric in metrics:
        for start in range(0, len(labels), 50):  # the last batch is short, as in evaluation
            metric.update_state(one_hot[start:start + 50], probabilities[start:start + 50])
    assert_matches({metric.name: float(metric.result()) for metric in metrics},
                   expected_metrics(labels, probabilities))


def test_reset_state_forgets_earlier_batches():
    first_labels, first = _random_predictions(10, 120)
    labels, probabilities = _random_predictions(11, 90)
    kappa, fpr = CohenKappa(), FalsePositiveRate(None)
    for metric in (kappa, fpr):
        metric.update_state(np.eye(3)[first_labels], first)
        metric.reset_state()
        assert float(metric.result()) == 0.0
        metric.update_state(np.eye(3)[labels], probabilities)
    expected = expected_metrics(labels, probabilities)
    assert float(kappa.result()) == pytest.approx(expected["cohen_kappa"], abs=1e-6)
    assert float(fpr.result()) == pytest.approx(expected["fpr_macro"], abs=1e-6)


def test_kappa_takes_class_indices_and_sample_weights():
    labels, probabilities = _random_predictions(5, 100)
    weights = np.random.default_rng(5).uniform(0.5, 2.0, size=100)
    kappa = CohenKappa()
    kappa.update_state(labels, probabilities, sample_weight=weights)
    assert float(kappa.result()) == pytest.approx(
        cohen_kappa_score(labels, probabilities.argmax(axis=1), sample_weight=weights), abs=1e-5)


def test_kappa_is_one_for_perfect_and_zero_for_one_class_only():
    labels = np.array([0, 1, 2, 2, 1, 0])
    perfect = CohenKappa()
    perfect.update_state(labels, np.eye(3)[labels])
    assert float(perfect.result()) == pytest.approx(1.0)
    degenerate = CohenKappa()  # every label and prediction the same class: undefined, reported as 0
    degenerate.update_state(np.zeros(4, int), np.tile([1.0, 0.0, 0.0], (4, 1)))
    assert float(degenerate.result()) == 0.0


# Runs in a fresh interpreter: logical devices must be set before TensorFlow initialises, which
# other tests in this pytest process have already done.
_STRATEGY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_keras as keras
    from pneumonia.model.metrics import build_metrics

    data = np.load(sys.argv[1])
    labels, probabilities = data["labels"], data["probabilities"]
    one_hot = np.eye(3, dtype=np.float32)[labels]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": strategy.num_replicas_in_sync}
    with strategy.scope():
        # The model passes its input through: evaluate() then scores exactly these probabilities.
        model = keras.Sequential([keras.Input((3,)), keras.layers.Activation("linear")])
        model.compile(loss="categorical_crossentropy", metrics=build_metrics())
    out["evaluate"] = model.evaluate(probabilities, one_hot, batch_size=32, verbose=0, return_dict=True)

    # The same metrics driven by hand: each replica updates its half, the read sums the replicas.
    with strategy.scope():
        metrics = build_metrics()
    dataset = tf.data.Dataset.from_tensor_slices((one_hot, probabilities)).batch(40)
    @tf.function
    def step(batch):
        def update(y_true, y_pred):
            for metric in metrics:
                metric.update_state(y_true, y_pred)
        strategy.run(update, args=batch)
    for batch in strategy.experimental_distribute_dataset(dataset):
        step(batch)
    out["strategy_run"] = {metric.name: float(metric.result()) for metric in metrics}
    kappa = next(metric for metric in metrics if metric.name == "cohen_kappa")
    out["confusion"] = kappa.confusion.numpy().tolist()  # a cross-replica read: the replicas' sum
    print("RESULT " + json.dumps(out))
""")


def test_metrics_sum_counts_across_replicas_of_a_mirrored_strategy(tmp_path):
    labels, probabilities = _random_predictions(7, num_images=203)
    data = tmp_path / "predictions.npz"
    np.savez(data, labels=labels, probabilities=probabilities)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _STRATEGY_SCRIPT, str(data)], capture_output=True, text=True,
                            timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["replicas"] == 2
    expected = expected_metrics(labels, probabilities)
    assert_matches(out["evaluate"], expected)
    assert_matches(out["strategy_run"], expected)
    # Ratios survive averaging the replicas' counts; the counts themselves must be the full sums.
    np.testing.assert_array_equal(out["confusion"], confusion_matrix(labels, probabilities.argmax(axis=1)))
