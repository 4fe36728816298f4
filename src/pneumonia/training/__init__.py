"""Training (fit, cluster strategy), evaluation and its report."""
