"""Evaluation: the evaluate stage, its report, uncertainty, calibration and saliency."""
