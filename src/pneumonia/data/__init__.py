"""Data: reading the raw archive safely, the patient-grouped split, the preprocess stage, the demo archive."""
