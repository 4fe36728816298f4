"""Train stage entrypoint: shards -> runs/<run_id>/ (see pneumonia.training.fit; TF_CONFIG for several workers)."""

from pneumonia import cluster
from pneumonia.cli import main
from pneumonia.training.fit import run

if __name__ == "__main__":
    # Workers of one cluster must share a run id; a lone local process may get a fresh one.
    main("train", run, run_id_required=cluster.in_cluster())
