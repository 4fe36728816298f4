"""What every stage entrypoint shares: arguments, config, logging, exit codes.

`jobs/<stage>.py` stays a few lines: it hands its stage function to `run_stage`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence

from pneumonia import cluster, tf_startup
from pneumonia.config import PipelineConfig, load_config, new_run_id
from pneumonia.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_PREEMPTED,
    BadInputError,
    ConfigError,
    PeerLostError,
    Terminated,
)
from pneumonia.logs import configure_logging, get_logger


def parse_args(stage: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=f"Run the {stage} stage.")
    parser.add_argument("--config", help="YAML file overriding the defaults (jobs/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key; repeatable")
    return parser.parse_args(argv)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def exit_on_sigterm_while_loading() -> None:
    """Called by each entrypoint before it imports the stage (TensorFlow loads for seconds, 20 on a busy
    node). In a container python is PID 1, which ignores SIGTERM until a handler exists, so a pod stopped
    then (Kueue suspending a just-admitted Job, a drain, a deletion) ran on into the stage and held its
    GPU until the SIGKILL after the grace period: exit 137, which also spends a retry wherever the Job
    controller still counts the pod (one deleted without a DisruptionTarget condition). With this, it
    exits 143 at once: nothing has started, so nothing is lost. run_stage then installs the handler
    for the work itself.

    Then it loads TensorFlow, which every stage imports, with its start-up chatter filtered
    (pneumonia.tf_startup): the stage module imported next finds it loaded."""
    signal.signal(signal.SIGTERM, _exit_preempted)
    tf_startup.import_tensorflow()


def _exit_preempted(signum: int, frame: object) -> None:
    sys.exit(EXIT_PREEMPTED)


def run_stage(stage: str, body: Callable[[PipelineConfig], object], argv: Sequence[str] | None = None, *,
              run_id_required: bool = False) -> int:
    """Parses, configures logging, runs `body(config)`, and maps failures to exit codes.

    `run_id_required`: an empty train.run_id is an error instead of a fresh id (evaluate must name
    the run it scores; cluster workers must all name the same one).
    """
    args = parse_args(stage, argv)
    try:
        worker = cluster.worker_index()  # a malformed TF_CONFIG is bad input too, not a retry
        config = load_config(args.config, args.overrides)
        if not config.train.run_id and run_id_required:
            raise ConfigError(f"config key train.run_id is empty: the {stage} stage must name its run "
                              "(--set train.run_id=...; every worker and evaluate use the same one)")
    except BadInputError as error:
        configure_logging(stage, run_id="-", worker="-")
        get_logger().error("bad config", error=str(error), exit_code=EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    if not config.train.run_id:
        config = config.replace(train=_with_run_id(config))
    configure_logging(stage, run_id=config.train.run_id, worker=worker)
    log = get_logger()
    # In a container python is PID 1, which ignores SIGTERM without a handler and is SIGKILLed
    # (exit 137, a spent retry) after the grace period. Stages are idempotent, so stopping at
    # once with 143 is safe; the trainer installs its own handler that saves a backup first.
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        body(config)
    except BadInputError as error:
        log.error("bad input", error=str(error), exit_code=EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except Terminated:
        log.warning("terminated (SIGTERM): stopping; a rerun resumes", exit_code=EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except PeerLostError as error:
        log.warning("peer lost: stopping for a restart", error=str(error), exit_code=EXIT_PEER_LOST)
        return EXIT_PEER_LOST
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILURE
    except Exception:  # noqa: BLE001 - anything unexpected is worth a retry; log it whole
        log.exception("stage failed", exit_code=EXIT_FAILURE)
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return EXIT_OK


def _with_run_id(config: PipelineConfig):  # noqa: ANN202
    import dataclasses

    return dataclasses.replace(config.train, run_id=new_run_id())


def main(stage: str, body: Callable[[PipelineConfig], object], *, run_id_required: bool = False) -> None:
    sys.exit(run_stage(stage, body, run_id_required=run_id_required))
