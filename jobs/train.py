"""Train stage entrypoint: shards -> runs/<run_id>/ (see pneumonia.training.fit; TF_CONFIG for several workers).

A run that stops on purpose or fails for good leaves runs/<run_id>/_ENDED.json (pneumonia.run_ended).
"""

from pneumonia import cluster
from pneumonia.cli import exit_on_sigterm_while_loading, main

exit_on_sigterm_while_loading()  # before TensorFlow loads: a SIGTERM meanwhile exits 143, not 137
from pneumonia.training.run_end import train  # noqa: E402

if __name__ == "__main__":
    # Workers of one cluster must share a run id; a lone local process may get a fresh one.
    main("train", train, run_id_required=cluster.in_cluster())
