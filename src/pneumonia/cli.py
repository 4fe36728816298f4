"""What every stage entrypoint shares: arguments, config, logging, exit codes.

`jobs/<stage>.py` stays a few lines: it hands its stage function to `run_stage`.
"""

from __future__ import annotations

import argparse
import datetime
import secrets
import sys
from collections.abc import Callable, Sequence

from pneumonia import cluster
from pneumonia.config import PipelineConfig, load_config
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, BadInputError
from pneumonia.logs import configure_logging, get_logger


def parse_args(stage: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=f"Run the {stage} stage.")
    parser.add_argument("--config", help="YAML file overriding the defaults (jobs/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key; repeatable")
    return parser.parse_args(argv)


def new_run_id() -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


def run_stage(stage: str, body: Callable[[PipelineConfig], object], argv: Sequence[str] | None = None) -> int:
    """Parses, configures logging, runs `body(config)`, and maps failures to exit codes."""
    args = parse_args(stage, argv)
    try:
        config = load_config(args.config, args.overrides)
    except BadInputError as error:
        configure_logging(stage, run_id="-", worker=cluster.worker_index())
        get_logger().error("bad config", error=str(error))
        return EXIT_BAD_INPUT
    if not config.train.run_id:
        config = config.replace(train=_with_run_id(config))
    configure_logging(stage, run_id=config.train.run_id, worker=cluster.worker_index())
    log = get_logger()
    try:
        body(config)
    except BadInputError as error:
        log.error("bad input", error=str(error), exit_code=EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILURE
    except Exception:  # noqa: BLE001 - anything unexpected is worth a retry; log it whole
        log.exception("stage failed", exit_code=EXIT_FAILURE)
        return EXIT_FAILURE
    return EXIT_OK


def _with_run_id(config: PipelineConfig):  # noqa: ANN202
    import dataclasses

    return dataclasses.replace(config.train, run_id=new_run_id())


def main(stage: str, body: Callable[[PipelineConfig], object]) -> None:
    sys.exit(run_stage(stage, body))
