"""Chest X-ray pneumonia classifier (normal / bacteria / virus): preprocess, shard, train, evaluate."""

__version__ = "0.1.0"
