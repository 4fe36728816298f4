"""Preprocess stage entrypoint: archive -> interim/ images + splits/split.json (see pneumonia.data.preprocess)."""

from pneumonia.cli import main
from pneumonia.data.preprocess import run

if __name__ == "__main__":
    main("preprocess", run)
