"""The fault matrix of tests/test_faults.py through the real Job controller.

The train Job from manifests/ (its podFailurePolicy, backoffLimitPerIndex, podReplacementPolicy as
written) runs at the tests' tiny size on the local control plane; its pods run as podman containers
(tests/cluster/kubelet.py). A fault is done to a container or through the API as it happens on a
cluster: SIGKILL of worker 1, SIGSTOP then the loss of its node, eviction of the chief, a worker
killed at the start of every attempt. Who was restarted, what was counted and how the Job ended are
read from the API: the Job's `failed`, `failedIndexes` and conditions, each pod's exit code and
DisruptionTarget condition, and the Job controller's per-index annotations on the replacement pods
(`job-index-failure-count`, `job-index-ignored-failure-count`). The test computes none of it.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))
import bed  # noqa: E402
import train_job as jobs  # noqa: E402
from test_train import copy_shards, tiny_shards  # noqa: E402, F401

from pneumonia.errors import EXIT_PEER_LOST, EXIT_PREEMPTED  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TRAIN = "pneumonia-train"
SIGKILL_EXIT = 128 + 9
START_TIMEOUT_S = 600  # until both workers are in epoch 1: image start, TensorFlow, the first epoch
END_TIMEOUT_S = 900  # from the fault to the Job's end: replacements, the remaining epoch, the export


@pytest.fixture(scope="module")
def pod_bed(kube_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[bed.PodNetworkBed]:  # noqa: ANN001
    """The kubelet stand-in and the GCS stand-in on the pods' network, for this module's tests."""
    if os.system(f"podman image exists {bed.IMAGE}") != 0:  # noqa: S605 - a fixed command
        bed.build_image()
    testbed = bed.PodNetworkBed(str(kube_cluster.kubeconfig), tmp_path_factory.mktemp("pod-bed"),
                                network=f"pneumonia-faults-{os.getpid()}", bucket="pneumonia-faults")
    with testbed:
        saved = {key: os.environ.get(key) for key in testbed.emulator.env}
        os.environ.update(testbed.emulator.env)  # copy_shards writes through TensorFlow's gs:// client
        try:
            yield testbed
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class TrainRun:
    """One train Job in a namespace of its own, reading everything back from the API."""

    def __init__(self, cluster, testbed: bed.PodNetworkBed, shards: Path, name: str) -> None:  # noqa: ANN001
        self.kubeconfig = str(cluster.kubeconfig)
        self.testbed = testbed
        self.namespace = f"faults-{name}-{uuid.uuid4().hex[:6]}"
        self.root = f"gs://{testbed.bucket}/{self.namespace}"
        copy_shards(shards, self.root)
        jobs.apply(self.kubeconfig, jobs.train_objects(self.namespace, self.root, run_id=name))

    def pods(self) -> dict[int, list[dict]]:
        return jobs.pods_by_index(self.kubeconfig, self.namespace, TRAIN)

    def status(self) -> dict:
        return jobs.job(self.kubeconfig, self.namespace, TRAIN).get("status", {})

    def summary(self) -> str:
        return jobs.summary(self.kubeconfig, self.namespace, TRAIN)

    def first_pods_in_epoch(self, epoch: int) -> dict[int, dict]:
        def ready() -> dict[int, dict] | None:
            pods = self.pods()
            first = {index: attempts[0] for index, attempts in pods.items()}
            if len(first) == 2 and all(jobs.saw(self.testbed, pod, "epoch begin", epoch=epoch) for pod in first.values()):
                return first
            return None

        return jobs.wait_for(ready, START_TIMEOUT_S, f"both workers to begin epoch {epoch}")

    def wait_end(self, timeout_s: float = END_TIMEOUT_S, while_waiting=None) -> tuple[str, str]:  # noqa: ANN001
        def ended() -> tuple[str, str] | None:
            if while_waiting:
                while_waiting()
            return jobs.job_ending(self.status())

        return jobs.wait_for(ended, timeout_s, "the train Job to end")

    def close(self) -> None:
        jobs.kubectl(self.kubeconfig, "delete", "namespace", self.namespace, "--wait=false", check=False)


@pytest.fixture
def train_run(request: pytest.FixtureRequest, kube_cluster, pod_bed: bed.PodNetworkBed, tiny_shards: Path):  # noqa: ANN001, F811
    runs: list[TrainRun] = []

    def start(name: str) -> TrainRun:
        runs.append(TrainRun(kube_cluster, pod_bed, tiny_shards, name))
        return runs[-1]

    yield start
    for run in runs:
        print(run.summary())  # what each pod did and what the controller made of it (pytest -rP)
        run.close()


def test_sigkill_of_worker_1_is_counted_against_index_1_only(train_run) -> None:  # noqa: ANN001
    run = train_run("kill")
    first = run.first_pods_in_epoch(1)
    jobs.signal_container(run.testbed, first[1], "KILL")
    assert run.wait_end() == ("Complete", "CompletionsReached"), run.summary()
    pods, status = run.pods(), run.status()
    assert jobs.exit_code(pods[1][0]) == SIGKILL_EXIT and jobs.exit_code(pods[0][0]) == EXIT_PEER_LOST, run.summary()
    # The Job controller's own counts: index 1 paid one retry; index 0's peer-lost exit was ignored.
    assert jobs.counts(pods[1][-1]) == (1, 0) and jobs.counts(pods[0][-1]) == (0, 1), run.summary()
    assert status.get("failed", 0) == 1 and not status.get("failedIndexes"), run.summary()
    assert all(len(attempts) == 2 for attempts in pods.values()), run.summary()  # both restarted, once


def test_sigstop_then_node_loss_is_counted_against_nobody(train_run) -> None:  # noqa: ANN001
    """SIGSTOP: the node stops answering; the survivor gives up on its peer (exit 75). Then the node is
    deleted: the pod GC of the real controller-manager marks the frozen pod (DisruptionTarget, Failed)."""
    run = train_run("node")
    first = run.first_pods_in_epoch(1)
    node = first[1]["spec"]["nodeName"]
    saved_node = jobs.get(run.kubeconfig, "node", node)
    jobs.signal_container(run.testbed, first[1], "STOP")
    try:
        jobs.wait_for(lambda: jobs.exit_code(run.pods()[0][0]) is not None, END_TIMEOUT_S, "the survivor to stop")
        jobs.kubectl(run.kubeconfig, "delete", "node", node)
        assert run.wait_end() == ("Complete", "CompletionsReached"), run.summary()
    finally:
        restore = {key: saved_node[key] for key in ("apiVersion", "kind", "spec")}
        restore["metadata"] = {k: saved_node["metadata"][k] for k in ("name", "labels", "annotations")}
        jobs.apply(run.kubeconfig, [restore])
    pods, status = run.pods(), run.status()
    lost = pods[1][0]
    assert jobs.has_condition(lost, "DisruptionTarget") and lost["status"]["phase"] == "Failed", run.summary()
    assert jobs.exit_code(pods[0][0]) == EXIT_PEER_LOST, run.summary()
    assert jobs.counts(pods[1][-1]) == (0, 1) and jobs.counts(pods[0][-1]) == (0, 1), run.summary()
    assert status.get("failed", 0) == 0 and pods[1][-1]["spec"]["nodeName"] != node, run.summary()


def test_eviction_of_the_chief_stops_both_with_the_backup_and_counts_nothing(train_run) -> None:  # noqa: ANN001
    from kubernetes import client

    run = train_run("evict")
    first = run.first_pods_in_epoch(1)
    api = client.CoreV1Api(client.ApiClient(_configuration(run.kubeconfig)))
    chief = first[0]["metadata"]["name"]
    api.create_namespaced_pod_eviction(chief, run.namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=chief, namespace=run.namespace)))
    assert run.wait_end() == ("Complete", "CompletionsReached"), run.summary()
    pods, status = run.pods(), run.status()
    evicted = next(pod for pod in pods[0] if pod["metadata"]["name"] == chief)
    assert jobs.has_condition(evicted, "DisruptionTarget") and jobs.exit_code(evicted) == EXIT_PREEMPTED, run.summary()
    assert jobs.exit_code(pods[1][0]) in (EXIT_PREEMPTED, EXIT_PEER_LOST), run.summary()
    assert jobs.saw(run.testbed, evicted, "stop requested (SIGTERM): backup saved"), run.summary()
    assert jobs.counts(pods[0][-1]) == (0, 1) and jobs.counts(pods[1][-1]) == (0, 1), run.summary()
    assert status.get("failed", 0) == 0, run.summary()


def test_a_worker_killed_at_every_start_fails_the_job_on_its_index_alone(train_run) -> None:  # noqa: ANN001
    run = train_run("crashloop")
    killed: set[str] = set()

    def kill_index_1_once_it_trains() -> None:
        for pod in run.pods().get(1, []):
            name = pod["metadata"]["name"]
            if name not in killed and pod["status"].get("phase") == "Running" and jobs.saw(run.testbed, pod, "epoch begin"):
                jobs.signal_container(run.testbed, pod, "KILL")  # like an OOM kill at the first step
                killed.add(name)

    assert run.wait_end(4 * START_TIMEOUT_S, kill_index_1_once_it_trains) == ("Failed", "FailedIndexes"), run.summary()
    pods, status = run.pods(), run.status()
    limit = jobs.job(run.kubeconfig, run.namespace, TRAIN)["spec"]["backoffLimitPerIndex"]
    # Counted: index 1's limit + 1 failures (the survivor's peer-lost exits are ignored).
    assert status.get("failedIndexes") == "1" and status.get("failed", 0) >= limit + 1, run.summary()
    assert [jobs.counts(pod)[0] for pod in pods[1]] == list(range(limit + 1)), run.summary()
    assert [jobs.exit_code(pod) for pod in pods[1]] == [SIGKILL_EXIT] * (limit + 1), run.summary()
    assert all(jobs.counts(pod)[0] == 0 for pod in pods[0]), run.summary()  # the survivor never paid


def _configuration(kubeconfig: str):  # noqa: ANN202
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration
