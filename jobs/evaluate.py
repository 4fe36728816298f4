"""Evaluate stage: a finished run's best checkpoint on the test shards -> runs/<run_id>/report/.

    .venv/bin/python jobs/evaluate.py --config jobs/configs/demo.yaml --set train.run_id=RUN_ID
"""

from pneumonia.cli import exit_on_sigterm_while_loading, main

exit_on_sigterm_while_loading()  # before TensorFlow loads: a SIGTERM meanwhile exits 143, not 137
from pneumonia.evaluation.evaluate import run  # noqa: E402

if __name__ == "__main__":
    main("evaluate", run, run_id_required=True)
