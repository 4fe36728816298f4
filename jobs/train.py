"""Train stage entrypoint: shards -> runs/<run_id>/ (see pneumonia.training.fit; TF_CONFIG for several workers)."""

from pneumonia.cli import main
from pneumonia.training.fit import run

if __name__ == "__main__":
    main("train", run)
