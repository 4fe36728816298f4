"""Preprocess stage entrypoint: archive -> interim/ images + splits/split.json (see pneumonia.data.preprocess)."""

from pneumonia.cli import exit_on_sigterm_while_loading, main

exit_on_sigterm_while_loading()  # before TensorFlow loads: a SIGTERM meanwhile exits 143, not 137
from pneumonia.data.preprocess import run  # noqa: E402

if __name__ == "__main__":
    main("preprocess", run)
