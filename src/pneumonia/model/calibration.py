"""Temperature scaling: the one number, fitted on val once training ends, that calibrates a run's probabilities.

Everything that lets probabilities leave the suite (evaluate, the serving signature, predict)
applies the run's temperature; runs trained before calibration existed have none and keep T = 1.
"""

from __future__ import annotations

import numpy as np

from pneumonia import storage
from pneumonia.layout import Layout

CALIBRATION_NAME = "calibration.json"
# log(0) is -inf; a probability this small is already "never" at any temperature worth fitting.
_MIN_PROBABILITY = 1e-12


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) row by row: T > 1 softens, T < 1 sharpens, T = 1 returns p; argmax is unchanged."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _MIN_PROBABILITY, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)  # exp of large logits overflows; the shift cancels out
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def load_temperature(layout: Layout, run_id: str) -> float:
    """The run's fitted temperature from runs/<run_id>/calibration.json; 1.0 when the run has none."""
    path = storage.join(layout.run(run_id), CALIBRATION_NAME)
    if not storage.exists(path):
        return 1.0
    return float(storage.read_json(path)["temperature"])
