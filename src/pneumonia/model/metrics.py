"""Keras metrics for compile(): Cohen's kappa (monitored as val_cohen_kappa), per-class precision,
recall and false-positive rate, accuracy and one-vs-rest AUC.

The notebook's idea, kept: stateful metrics whose counters are `add_weight` variables. Here every
count-based metric accumulates a whole confusion matrix (rows = true class, columns = predicted
class = argmax of the probabilities) in a SUM-aggregated, on-read-synchronized variable, so under a
tf.distribute strategy each replica counts its own batch and reading the result sums the replicas'
matrices before the ratio is taken (averaging per-replica ratios would be wrong). The numbers match
scikit-learn on the same predictions (tests/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf
import tf_keras as keras

from pneumonia.config import CLASS_NAMES

# The one-vs-rest AUC buckets probabilities into this many thresholds; 500 keeps it within ~0.005
# of scikit-learn's exact value at a negligible cost per step.
AUC_THRESHOLDS = 500


def class_names_for(num_classes: int) -> tuple[str, ...]:
    """The project's class names when there are 3 classes, else class0, class1, ..."""
    if num_classes == len(CLASS_NAMES):
        return CLASS_NAMES
    return tuple(f"class{i}" for i in range(num_classes))


def build_metrics(num_classes: int = len(CLASS_NAMES)) -> list[keras.metrics.Metric]:
    """Fresh metric objects for `model.compile(metrics=...)`; create them inside the strategy scope.

    Names (Keras logs them as is, and with a `val_` prefix on validation data): accuracy,
    cohen_kappa, precision_<class>, recall_<class>, fpr_macro, fpr_<class>, auc_macro, auc_<class>.
    """
    names = class_names_for(num_classes)
    metrics: list[keras.metrics.Metric] = [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        CohenKappa(num_classes=num_classes, name="cohen_kappa"),
    ]
    metrics += [ClassPrecision(i, num_classes=num_classes, name=f"precision_{name}") for i, name in enumerate(names)]
    metrics += [ClassRecall(i, num_classes=num_classes, name=f"recall_{name}") for i, name in enumerate(names)]
    metrics.append(FalsePositiveRate(None, num_classes=num_classes, name="fpr_macro"))
    metrics += [FalsePositiveRate(i, num_classes=num_classes, name=f"fpr_{name}") for i, name in enumerate(names)]
    metrics.append(keras.metrics.AUC(num_thresholds=AUC_THRESHOLDS, multi_label=True, num_labels=num_classes,
                                     name="auc_macro"))
    metrics += [OneVsRestAUC(i, name=f"auc_{name}") for i, name in enumerate(names)]
    return metrics


class ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates the confusion matrix (true x predicted, argmax); subclasses turn it into a number.

    `y_true` may be one-hot `[batch, num_classes]` (what the pipeline yields) or class indices.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES), name: str = "confusion_matrix",
                 dtype: Any = None, **kwargs: Any) -> None:
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.num_classes = int(num_classes)
        self.confusion = self.add_weight(
            name="confusion", shape=(self.num_classes, self.num_classes), initializer="zeros", dtype=tf.float32,
            # SUM + ON_READ: replicas add their own counts; a read in cross-replica context sums them.
            aggregation=tf.VariableAggregation.SUM, synchronization=tf.VariableSynchronization.ON_READ,
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> tf.Operation:
        y_true = tf.convert_to_tensor(y_true)
        y_pred = tf.convert_to_tensor(y_pred)
        if y_true.shape.rank is not None and y_true.shape.rank >= 2 and y_true.shape[-1] == self.num_classes:
            labels = tf.argmax(y_true, axis=-1)
        else:
            labels = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
        predictions = tf.argmax(y_pred, axis=-1)
        # One-hot outer product instead of tf.math.confusion_matrix: no Assert ops, which XLA
        # (jit_compile on GPU) would otherwise drop with a warning per metric per step.
        true_one_hot = tf.one_hot(tf.reshape(labels, [-1]), self.num_classes, dtype=tf.float32)
        predicted_one_hot = tf.one_hot(tf.reshape(predictions, [-1]), self.num_classes, dtype=tf.float32)
        if sample_weight is not None:
            true_one_hot *= tf.reshape(tf.cast(sample_weight, tf.float32), [-1, 1])
        return self.confusion.assign_add(tf.matmul(true_one_hot, predicted_one_hot, transpose_a=True))

    def reset_state(self) -> None:
        self.confusion.assign(tf.zeros_like(self.confusion))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}

    def _counts(self) -> tf.Tensor:
        # float64 for the ratios: float32 sums of products lose digits past ~4k images.
        return tf.cast(self.confusion, tf.float64)


class CohenKappa(ConfusionMatrixMetric):
    """Unweighted Cohen's kappa of argmax predictions (scikit-learn's cohen_kappa_score); 0 when undefined."""

    def __init__(self, num_classes: int = len(CLASS_NAMES), name: str = "cohen_kappa", **kwargs: Any) -> None:
        super().__init__(num_classes=num_classes, name=name, **kwargs)

    def result(self) -> tf.Tensor:
        counts = self._counts()
        total = tf.reduce_sum(counts)
        expected = tf.tensordot(tf.reduce_sum(counts, axis=1), tf.reduce_sum(counts, axis=0), axes=0)
        expected = tf.math.divide_no_nan(expected, total)
        disagree = 1.0 - tf.eye(self.num_classes, dtype=tf.float64)
        observed = tf.reduce_sum(disagree * counts)
        chance = tf.reduce_sum(disagree * expected)
        # chance == 0 (one class only) leaves kappa undefined; report 0 rather than NaN so
        # ModelCheckpoint's max-tracking keeps working.
        kappa = tf.where(chance > 0, 1.0 - tf.math.divide_no_nan(observed, chance), tf.constant(0.0, tf.float64))
        return tf.cast(kappa, self.dtype)


class _PerClassMetric(ConfusionMatrixMetric):
    """A per-class ratio of confusion-matrix counts; subclasses define `_per_class(counts)`."""

    _per_class: Callable[[tf.Tensor], tf.Tensor]

    def __init__(self, class_id: int | None, num_classes: int = len(CLASS_NAMES), name: str | None = None,
                 **kwargs: Any) -> None:
        if class_id is not None and not 0 <= class_id < num_classes:
            raise ValueError(f"class_id {class_id} is outside 0..{num_classes - 1}")
        self.class_id = class_id
        super().__init__(num_classes=num_classes, name=name or self._default_name(class_id), **kwargs)

    def _default_name(self, class_id: int | None) -> str:
        return f"{type(self).__name__.lower()}_{'macro' if class_id is None else class_id}"

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_id": self.class_id}

    def result(self) -> tf.Tensor:
        values = self._per_class(self._counts())
        value = tf.reduce_mean(values) if self.class_id is None else values[self.class_id]
        return tf.cast(value, self.dtype)


class ClassPrecision(_PerClassMetric):
    """Precision of one class (class_id) or the macro mean (None): true positives / predicted positives."""

    def _per_class(self, counts: tf.Tensor) -> tf.Tensor:
        return tf.math.divide_no_nan(tf.linalg.diag_part(counts), tf.reduce_sum(counts, axis=0))


class ClassRecall(_PerClassMetric):
    """Recall of one class (class_id) or the macro mean (None): true positives / actual positives."""

    def _per_class(self, counts: tf.Tensor) -> tf.Tensor:
        return tf.math.divide_no_nan(tf.linalg.diag_part(counts), tf.reduce_sum(counts, axis=1))


class FalsePositiveRate(_PerClassMetric):
    """False positives / actual negatives, for one class (class_id) or the macro mean (None).

    For class c: images predicted c whose true class is another, over all images whose true class
    is not c (the notebook's false_positives / actual_negatives pair of add_weight counters).
    """

    def _per_class(self, counts: tf.Tensor) -> tf.Tensor:
        total = tf.reduce_sum(counts)
        true_positives = tf.linalg.diag_part(counts)
        false_positives = tf.reduce_sum(counts, axis=0) - true_positives
        actual_negatives = total - tf.reduce_sum(counts, axis=1)
        return tf.math.divide_no_nan(false_positives, actual_negatives)


class OneVsRestAUC(keras.metrics.AUC):
    """ROC AUC of one class against the rest, from that class's probability column."""

    def __init__(self, class_id: int, num_thresholds: int = AUC_THRESHOLDS, name: str | None = None,
                 **kwargs: Any) -> None:
        self.class_id = int(class_id)
        super().__init__(num_thresholds=num_thresholds, name=name or f"auc_{class_id}", **kwargs)

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> tf.Operation:
        y_true = tf.convert_to_tensor(y_true)
        y_pred = tf.convert_to_tensor(y_pred)
        return super().update_state(y_true[..., self.class_id], y_pred[..., self.class_id], sample_weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "class_id": self.class_id}
