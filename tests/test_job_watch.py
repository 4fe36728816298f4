"""Evaluate, waiting for the run under `kubectl apply`, also reads the train Job through the Kubernetes API
(pneumonia.cluster.JobWatch): a Job that failed where no train pod could say so (a SIGKILL on an index's
last attempt, the Job's deadline) ends the wait with exit 2 and the Job's reason. Without credentials,
or when the API says no, the wait goes by the files alone, as before, and says so once.

The API is stubbed at the client's boundary (the function that GETs the Job); the real client is used for
the cases without credentials and without a reachable server. tests/cluster/test_job_faults.py runs it
on the real control plane."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from pneumonia import cluster, run_ended
from pneumonia.config import load_config
from pneumonia.errors import EXIT_BAD_INPUT, BadInputError, UpstreamMissingError
from pneumonia.layout import Layout

CANNOT_READ = "cannot read the Job through the Kubernetes API"


def stamp(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def train_job(uid: str = "uid-1", failed_at: float | None = None, reason: str = "MaxFailedIndexesExceeded",
              deleting: bool = False) -> dict[str, Any]:
    """The train Job as the API server returns it: running, or with the controller's Failed condition."""
    conditions = [] if failed_at is None else [
        {"type": "FailureTarget", "status": "True", "reason": reason, "lastTransitionTime": stamp(failed_at)},
        {"type": "Failed", "status": "True", "reason": reason, "message": "Job has exceeded maxFailedIndexes",
         "lastTransitionTime": stamp(failed_at)}]
    metadata = {"name": "pneumonia-train", "namespace": "ns-1", "uid": uid}
    if deleting:
        metadata["deletionTimestamp"] = stamp(time.time())
    return {"metadata": metadata, "status": {"active": 2, "conditions": conditions}}


class FakeApi:
    """GET of one Job: answers `job` (or raises it), and records what was asked."""

    def __init__(self, job: dict[str, Any] | Exception) -> None:
        self.job, self.asked = job, []

    def read_job(self, namespace: str, name: str) -> dict[str, Any]:
        self.asked.append((namespace, name))
        if isinstance(self.job, Exception):
            raise self.job
        return self.job


@pytest.fixture
def account_dir(tmp_path: Path) -> Path:
    """The pod's projected token volume: the namespace file (the client reads the token itself)."""
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "namespace").write_text("ns-1")
    return folder


def config_for(root: Path, wait_s: int = 60):  # noqa: ANN201
    return load_config(None, [f"data.root={root}", "train.run_id=r", f"cluster.upstream_wait_timeout_s={wait_s}",
                              "cluster.train_job_name=my-train"])


def wait(root: Path, watch: cluster.JobWatch, wait_s: int = 60, stale_grace_s: float = 900) -> None:
    run_ended.wait_for_finished_run(Layout(str(root)), config_for(root, wait_s), stale_grace_s=stale_grace_s,
                                    poll_s=0.05, train_job=watch)


def finish_later(root: Path, after_s: float, then: Any = None) -> threading.Thread:
    def finish() -> None:
        time.sleep(after_s)
        if then:
            then()
        time.sleep(after_s)
        (root / "runs" / "r").mkdir(parents=True, exist_ok=True)
        (root / "runs" / "r" / "_SUCCESS.json").write_text("{}")

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


def test_a_failed_train_job_ends_the_wait_with_exit_2_and_its_reason(tmp_path: Path, account_dir: Path):
    api = FakeApi(train_job())
    watch = cluster.JobWatch("my-train", str(account_dir), read_job=api.read_job)
    fail = threading.Timer(0.3, lambda: setattr(api, "job", train_job(failed_at=time.time())))
    fail.start()
    started = time.monotonic()
    with pytest.raises(BadInputError, match="train Job") as error:
        wait(tmp_path, watch)
    assert time.monotonic() - started < 10 and error.value.exit_code == EXIT_BAD_INPUT
    message = str(error.value)
    assert "the train Job ns-1/pneumonia-train (uid uid-1) of run r failed: MaxFailedIndexesExceeded: " \
           "Job has exceeded maxFailedIndexes" in message
    assert "`kubectl -n ns-1 describe job pneumonia-train`" in message
    assert "delete the train and evaluate Jobs and apply them again" in message
    assert set(api.asked) == {("ns-1", "my-train")}  # cluster.train_job_name, in the pod's own namespace


def test_a_running_train_job_keeps_the_wait_going_until_the_run_finishes(tmp_path: Path, account_dir: Path):
    api = FakeApi(train_job())
    finishing = finish_later(tmp_path, 0.3)
    try:
        wait(tmp_path, cluster.JobWatch("my-train", str(account_dir), read_job=api.read_job))
    finally:
        finishing.join()
    assert len(api.asked) >= 3


@pytest.mark.parametrize("answer", [ApiException(status=403, reason="Forbidden"),
                                    ApiException(status=404, reason="Not Found")], ids=["403", "404"])
def test_an_api_that_says_no_leaves_the_files_to_decide_said_once(tmp_path: Path, account_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str], answer):  # noqa: ANN001
    api = FakeApi(answer)
    with pytest.raises(UpstreamMissingError, match="the train stage's marker for run r"):
        wait(tmp_path, cluster.JobWatch("my-train", str(account_dir), read_job=api.read_job), wait_s=1)
    logged = capsys.readouterr()
    assert len(api.asked) >= 5
    assert (logged.out + logged.err).count(CANNOT_READ) == 1
    assert f"HTTP {answer.status}" in logged.out + logged.err


def test_without_credentials_or_server_the_real_client_leaves_the_files_to_decide(
        tmp_path: Path, account_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    # Not in a pod: no token volume at all (make train-local).
    assert cluster.JobWatch("my-train", str(tmp_path / "nothing")).failure() is None
    # A token volume, but no API server environment, then a server that does not answer.
    (account_dir / "token").write_text("not-a-real-token")
    (account_dir / "ca.crt").write_text("not a certificate")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cluster.JobWatch("my-train", str(account_dir)).failure() is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "9")  # discard: nothing listens
    capsys.readouterr()
    with pytest.raises(UpstreamMissingError):
        wait(tmp_path, cluster.JobWatch("my-train", str(account_dir)), wait_s=1)
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count(CANNOT_READ) == 1


def test_a_train_job_that_failed_before_a_rerun_is_not_believed_while_it_may_be_replaced(
        tmp_path: Path, account_dir: Path):
    """Resuming: the old failed Job is deleted and applied again (a new uid). Evaluate, started before
    that, gives the old failure the same grace as an old _ENDED.json; one being deleted never counts."""
    api = FakeApi(train_job("uid-old", failed_at=time.time() - 3600))
    finishing = finish_later(tmp_path, 0.3, then=lambda: setattr(api, "job", train_job("uid-new")))
    try:
        wait(tmp_path, cluster.JobWatch("my-train", str(account_dir), read_job=api.read_job))
    finally:
        finishing.join()

    (tmp_path / "runs" / "r" / "_SUCCESS.json").unlink()
    api.job = train_job("uid-old", failed_at=time.time() - 3600, deleting=True)
    with pytest.raises(UpstreamMissingError):
        wait(tmp_path, cluster.JobWatch("my-train", str(account_dir), read_job=api.read_job), wait_s=1,
             stale_grace_s=0.2)
    # Nobody replaced it: after the grace the old failure is the answer.
    api.job = train_job("uid-old", failed_at=time.time() - 3600, reason="DeadlineExceeded")
    started = time.monotonic()
    with pytest.raises(BadInputError, match="uid-old.*failed: DeadlineExceeded"):
        wait(tmp_path, cluster.JobWatch("my-train", str(account_dir), read_job=api.read_job), stale_grace_s=0.5)
    assert 0.5 <= time.monotonic() - started < 10
