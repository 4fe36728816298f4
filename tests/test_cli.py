"""run_stage: parses args and config, configures logging, and maps outcomes to exit codes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import structlog

from pneumonia.cli import run_stage
from pneumonia.config import PipelineConfig, new_run_id
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, BadInputError, UpstreamMissingError

RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")


@pytest.fixture(autouse=True)
def _json_logs_and_no_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _events(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_success_exits_0_and_generates_a_run_id(capfd: pytest.CaptureFixture[str]) -> None:
    seen: list[PipelineConfig] = []

    def body(config: PipelineConfig) -> None:
        seen.append(config)
        structlog.get_logger().info("working")

    assert run_stage("preprocess", body, ["--set", "split.seed=7"]) == EXIT_OK
    (config,) = seen
    assert config.split.seed == 7
    assert RUN_ID.match(config.train.run_id), config.train.run_id
    (event,) = _events(capfd.readouterr().err)
    assert (event["stage"], event["run_id"], event["worker"]) == ("preprocess", config.train.run_id, 0)


def test_a_given_run_id_is_kept_and_the_worker_comes_from_the_job_index(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    seen: list[str] = []

    def body(config: PipelineConfig) -> None:
        seen.append(config.train.run_id)
        structlog.get_logger().info("resuming")

    assert run_stage("train", body, ["--set", "train.run_id=resume-1"]) == EXIT_OK
    assert seen == ["resume-1"]
    (event,) = _events(capfd.readouterr().err)
    assert (event["run_id"], event["worker"]) == ("resume-1", 2)


def test_new_run_ids_differ() -> None:
    ids = {new_run_id() for _ in range(20)}
    assert all(RUN_ID.match(run_id) for run_id in ids)
    assert len(ids) > 1  # a random suffix: two Jobs started in the same second do not collide


@pytest.mark.parametrize("error", [BadInputError("archive has no images"),
                                   UpstreamMissingError("interim/_SUCCESS.json missing")])
def test_bad_input_exits_2(error: BadInputError, capfd: pytest.CaptureFixture[str]) -> None:
    def body(config: PipelineConfig) -> None:
        raise error

    assert run_stage("shard", body, []) == EXIT_BAD_INPUT
    (event,) = _events(capfd.readouterr().err)
    assert event["event"] == "bad input" and event["error"] == str(error) and event["exit_code"] == 2
    assert "exception" not in event  # an expected failure: the message says it all


def test_any_other_exception_exits_1_with_its_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    def body(config: PipelineConfig) -> None:
        raise ZeroDivisionError("learning rate underflow")

    assert run_stage("train", body, []) == EXIT_FAILURE
    (event,) = _events(capfd.readouterr().err)
    assert event["event"] == "stage failed" and event["level"] == "error" and event["exit_code"] == 1
    assert "Traceback" in event["exception"] and "ZeroDivisionError: learning rate underflow" in event["exception"]
    assert "in body" in event["exception"]  # the frame that raised, so the log alone locates it


@pytest.mark.parametrize(("override", "named"), [("train.epochz=3", "train.epochz"),
                                                 ("train.epochs=many", "train.epochs"),
                                                 ("train.epochs=0", "train.epochs"),
                                                 ("nosection", "nosection")])
def test_a_bad_override_exits_2_naming_the_key(override: str, named: str, capfd: pytest.CaptureFixture[str]) -> None:
    ran: list[bool] = []
    assert run_stage("evaluate", lambda config: ran.append(True), ["--set", override]) == EXIT_BAD_INPUT
    assert ran == []  # nothing runs on a bad config
    (event,) = _events(capfd.readouterr().err)
    assert event["event"] == "bad config" and named in event["error"]


def test_a_missing_config_file_exits_2(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    missing = tmp_path / "nope.yaml"
    assert run_stage("train", lambda config: None, ["--config", str(missing)]) == EXIT_BAD_INPUT
    (event,) = _events(capfd.readouterr().err)
    assert str(missing) in event["error"]


def test_sigterm_stops_the_stage_with_143_and_restores_the_handler(capfd: pytest.CaptureFixture[str]) -> None:
    import os
    import signal
    import time

    from pneumonia.errors import EXIT_PREEMPTED

    reached_the_end = []

    def body(config: PipelineConfig) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # as the kubelet does on preemption or pod deletion
        time.sleep(5)  # the handler interrupts this at once
        reached_the_end.append(True)

    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    assert run_stage("shard", body, []) == EXIT_PREEMPTED
    assert time.monotonic() - started < 4 and not reached_the_end
    assert signal.getsignal(signal.SIGTERM) is before
    assert any(e["event"].startswith("terminated (SIGTERM)") and e["exit_code"] == EXIT_PREEMPTED
               for e in _events(capfd.readouterr().err))


def test_a_stage_that_must_name_its_run_refuses_an_empty_run_id(capfd: pytest.CaptureFixture[str]) -> None:
    ran = []
    assert run_stage("evaluate", ran.append, [], run_id_required=True) == EXIT_BAD_INPUT
    assert not ran and "train.run_id is empty" in capfd.readouterr().err
    assert run_stage("evaluate", ran.append, ["--set", "train.run_id=r1"], run_id_required=True) == EXIT_OK
    assert ran[0].train.run_id == "r1"


@pytest.mark.parametrize("variable, value", [("TF_CONFIG", "{not json"), ("JOB_COMPLETION_INDEX", "two")])
def test_a_malformed_cluster_environment_is_bad_input(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
                                                     variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    ran = []
    assert run_stage("train", ran.append, ["--set", "train.run_id=r1"]) == EXIT_BAD_INPUT
    assert not ran and variable in capfd.readouterr().err
