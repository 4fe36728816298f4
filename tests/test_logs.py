"""configure_logging: JSON lines carrying stage, run_id and worker wherever stderr is not a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from pneumonia.logs import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back for the tests after this one."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_log_format_json_gives_one_json_object_per_event(capfd: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "json")
    configure_logging("shard", run_id="20250101-000000-abcd", worker=3)
    log = get_logger("pneumonia.test")
    log.info("shard written", path="gs://b/processed/x.tfrecord", records=12)
    log.debug("not shown at INFO")
    try:
        raise ValueError("bad pixel")
    except ValueError:
        log.exception("failed")
    lines = _json_lines(capfd.readouterr().err)
    assert [line["event"] for line in lines] == ["shard written", "failed"]
    first = lines[0]
    assert (first["stage"], first["run_id"], first["worker"]) == ("shard", "20250101-000000-abcd", 3)
    assert (first["level"], first["records"]) == ("info", 12)
    assert first["timestamp"].endswith("Z")  # UTC, ISO: what log collectors parse
    assert lines[1]["level"] == "error"
    assert "Traceback" in lines[1]["exception"] and "ValueError: bad pixel" in lines[1]["exception"]


def test_json_is_the_default_when_stderr_is_not_a_terminal() -> None:
    """A container's stderr is a pipe: no LOG_FORMAT needed. Run in a child to own its stderr."""
    code = ("from pneumonia.logs import configure_logging, get_logger\n"
            "configure_logging('train', run_id='r1', worker='1')\n"
            "get_logger().warning('epoch done', epoch=2)\n")
    env = {key: value for key, value in os.environ.items() if key != "LOG_FORMAT"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                            check=True)
    (line,) = _json_lines(result.stderr)
    assert line["event"] == "epoch done" and line["epoch"] == 2 and line["level"] == "warning"
    assert (line["stage"], line["run_id"], line["worker"]) == ("train", "r1", "1")


def test_console_format_when_asked_is_not_json(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("evaluate", run_id="r2", json_logs=False)
    get_logger().info("report written")
    err = capfd.readouterr().err
    assert "report written" in err and "run_id" in err and "r2" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.strip().splitlines()[-1])
