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

import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bed  # noqa: E402
import train_job as jobs  # noqa: E402
from fixtures import pod_bed  # noqa: E402, F401
from indexed_job import policy_action  # noqa: E402
from test_train import copy_shards, tiny_shards  # noqa: E402, F401

from pneumonia.errors import EXIT_PEER_LOST, EXIT_PREEMPTED  # noqa: E402

POD_NAMESPACE_PREFIX = "faults-"  # the namespaces whose pods this module's kubelet runs
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(3000)]
TRAIN = "pneumonia-train"
SIGKILL_EXIT = 128 + 9
START_TIMEOUT_S = 600  # until both workers are in epoch 1: image start, TensorFlow, the first epoch
END_TIMEOUT_S = 900  # from the fault to the Job's end: replacements, the remaining epoch, the export


class TrainRun:
    """One train Job in a namespace of its own, reading everything back from the API."""

    def __init__(self, cluster, testbed: bed.PodNetworkBed, shards: Path, name: str,  # noqa: ANN001
                 namespace: str = "", **objects) -> None:  # noqa: ANN003
        """`namespace`: one that exists already (a Kueue test's, with its LocalQueue); else a new one."""
        self.kubeconfig = str(cluster.kubeconfig)
        self.testbed = testbed
        self.namespace = namespace or f"faults-{name}-{uuid.uuid4().hex[:6]}"
        self.root = f"gs://{testbed.bucket}/{self.namespace}"
        self.run_id = name
        copy_shards(shards, self.root)
        jobs.apply(self.kubeconfig, jobs.train_objects(self.namespace, self.root, run_id=name, **objects))
        self.recorder = jobs.PodRecorder(self.kubeconfig, self.namespace, TRAIN)

    def pods(self) -> dict[int, list[dict]]:
        """Every train pod so far, by index, oldest first, as last seen (deleted ones too)."""
        return self.recorder.by_index()

    def status(self) -> dict:
        return jobs.job(self.kubeconfig, self.namespace, TRAIN).get("status", {})

    def summary(self) -> str:
        return jobs.summary(self.kubeconfig, self.namespace, TRAIN, self.pods())

    def first_pods_in_epoch(self, epoch: int) -> dict[int, dict]:
        def ready() -> dict[int, dict] | None:
            pods = self.pods()
            first = {index: attempts[0] for index, attempts in pods.items()}
            if len(first) == 2 and all(jobs.saw(self.testbed, pod, "epoch begin", epoch=epoch) for pod in first.values()):
                return first
            return None

        return jobs.wait_for(ready, START_TIMEOUT_S, f"both workers to begin epoch {epoch}")

    def wait_end(self, timeout_s: float = END_TIMEOUT_S, while_waiting=None, job: str = TRAIN) -> tuple[str, str]:  # noqa: ANN001
        def ended() -> tuple[str, str] | None:
            if while_waiting:
                while_waiting()
            return jobs.job_ending(jobs.job(self.kubeconfig, self.namespace, job).get("status", {}))

        return jobs.wait_for(ended, timeout_s, f"Job {job} to end")

    def assert_the_scripted_controller_agrees(self) -> None:
        """tests/indexed_job.py, which plays the Job controller in the fast tests, judges every failed pod
        of this run as the real controller did: Count where the real one raised the next pod's
        failure count, Ignore where it raised the ignored count."""
        rules = jobs.job(self.kubeconfig, self.namespace, TRAIN)["spec"]["podFailurePolicy"]["rules"]
        verdicts = []
        for index, attempts in self.pods().items():
            for before, after in zip(attempts, attempts[1:], strict=False):
                failed, ignored = (a - b for a, b in zip(jobs.counts(after), jobs.counts(before), strict=True))
                real = {(1, 0): "Count", (0, 1): "Ignore"}.get((failed, ignored), f"counts {failed},{ignored}")
                conditions = {c["type"]: c["status"] for c in before["status"].get("conditions", [])}
                scripted, _ = policy_action(rules, {"train": jobs.exit_code(before)}, conditions)
                verdicts.append((index, jobs.exit_code(before), real, scripted))
        assert verdicts and all(real == scripted for *_, real, scripted in verdicts), verdicts

    def close(self) -> None:
        self.recorder.stop()
        jobs.kubectl(self.kubeconfig, "delete", "namespace", self.namespace, "--wait=false", check=False)


@pytest.fixture
def train_run(request: pytest.FixtureRequest, kube_cluster, pod_bed: bed.PodNetworkBed, tiny_shards: Path):  # noqa: ANN001, F811
    runs: list[TrainRun] = []

    def start(name: str, **objects) -> TrainRun:  # noqa: ANN003
        runs.append(TrainRun(kube_cluster, pod_bed, tiny_shards, name, **objects))
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
    run.assert_the_scripted_controller_agrees()


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
        # The node comes back as the test bed made it (KWOK initializes it again): the next test has it.
        restore = {key: saved_node[key] for key in ("apiVersion", "kind", "spec")}
        restore["metadata"] = {k: saved_node["metadata"][k] for k in ("name", "labels", "annotations")}
        restore["status"] = {k: saved_node["status"][k] for k in ("allocatable", "capacity")}
        restore["spec"].pop("providerID", None)
        jobs.apply(run.kubeconfig, [restore])
    pods, status = run.pods(), run.status()
    lost = pods[1][0]
    assert jobs.has_condition(lost, "DisruptionTarget") and lost["status"]["phase"] == "Failed", run.summary()
    assert jobs.exit_code(pods[0][0]) == EXIT_PEER_LOST, run.summary()
    assert jobs.counts(pods[1][-1]) == (0, 1) and jobs.counts(pods[0][-1]) == (0, 1), run.summary()
    assert status.get("failed", 0) == 0 and pods[1][-1]["spec"]["nodeName"] != node, run.summary()
    run.assert_the_scripted_controller_agrees()


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
    run.assert_the_scripted_controller_agrees()


def test_a_worker_killed_at_every_start_fails_the_job_on_its_index_alone(train_run) -> None:  # noqa: ANN001
    """The last attempt is SIGKILLed too, so no train pod can leave _ENDED.json: evaluate, waiting for the
    run as under `kubectl apply`, learns from the train Job itself (its token, 05-evaluate-role.yaml)."""
    run = train_run("crashloop", stages=("train", "evaluate"))
    killed: set[str] = set()

    def kill_index_1_once_it_trains() -> None:
        for pod in run.pods().get(1, []):
            name = pod["metadata"]["name"]
            if name not in killed and pod["status"].get("phase") == "Running" and jobs.saw(run.testbed, pod, "epoch begin"):
                jobs.signal_container(run.testbed, pod, "KILL")  # like an OOM kill at the first step
                killed.add(name)

    ended = run.wait_end(4 * START_TIMEOUT_S, kill_index_1_once_it_trains)
    # maxFailedIndexes is 0: kube-controller-manager 1.36 names the reason MaxFailedIndexesExceeded.
    assert ended == ("Failed", "MaxFailedIndexesExceeded"), run.summary()
    pods, status = run.pods(), run.status()
    limit = jobs.job(run.kubeconfig, run.namespace, TRAIN)["spec"]["backoffLimitPerIndex"]
    # Counted: index 1's limit + 1 failures (the survivor's peer-lost exits are ignored).
    assert status.get("failedIndexes") == "1" and status.get("failed", 0) >= limit + 1, run.summary()
    assert [jobs.counts(pod)[0] for pod in pods[1]] == list(range(limit + 1)), run.summary()
    assert [jobs.exit_code(pod) for pod in pods[1]] == [SIGKILL_EXIT] * (limit + 1), run.summary()
    assert all(jobs.counts(pod)[0] == 0 for pod in pods[0]), run.summary()  # the survivor never paid
    run.assert_the_scripted_controller_agrees()
    errors, after_s = evaluate_ending(run)
    assert any("the train Job" in error and "MaxFailedIndexesExceeded" in error for error in errors), errors
    print(f"evaluate exited 2 {after_s:.0f} s after the train Job failed: {errors}")
    assert after_s < 120


def evaluate_ending(run: TrainRun) -> tuple[list[str], float]:
    """Evaluate ends on its own, promptly, exit 2 (its podFailurePolicy fails it): the errors it logged,
    and the seconds from the train Job's Failed condition to its exit, both as the API has them."""
    assert run.wait_end(180, job="pneumonia-evaluate") == ("Failed", "PodFailurePolicy"), run.summary()
    (evaluate_pod,) = jobs.get(run.kubeconfig, "-n", run.namespace, "pods", "-l",
                               f"{jobs.JOB_NAME_LABEL}=pneumonia-evaluate")["items"]
    assert jobs.exit_code(evaluate_pod) == 2
    (failed,) = [c for c in run.status()["conditions"] if c["type"] == "Failed"]
    (state,) = [s["state"]["terminated"] for s in evaluate_pod["status"]["containerStatuses"]]
    after_s = (datetime.fromisoformat(state["finishedAt"].replace("Z", "+00:00"))
               - datetime.fromisoformat(failed["lastTransitionTime"].replace("Z", "+00:00"))).total_seconds()
    return [e.get("error", "") for e in jobs.log_events(jobs.pod_log_file(run.testbed, evaluate_pod))], after_s


# The train container's body when its peers never answer: the real jobs/train.py and run_end (the rule
# under test), with fit.run raising what it raises when the cluster cannot form (peer lost, exit 75).
PEERS_NEVER_ANSWER = ["-c", "\n".join([
    "import runpy, sys",
    "from pneumonia.errors import PeerLostError",
    "from pneumonia.training import fit",
    "def unreachable(config):",
    "    raise PeerLostError('test bed: the peers never answer (a partition that does not heal)')",
    "fit.run = unreachable",
    "sys.argv = ['/opt/pneumonia/jobs/train.py', '--config', '/etc/pneumonia/config.yaml']",
    "runpy.run_path(sys.argv[0], run_name='__main__')",
])]


def test_a_partition_that_never_heals_fails_the_job_and_evaluate_says_why(train_run) -> None:  # noqa: ANN001
    """Both workers exit 75 at every start. The Job ignores 75, so without a bound it would loop until
    activeDeadlineSeconds; with cluster.max_forgiven_restarts=1 the second start of an index counts
    (exit 1), the index spends its retries and the Job fails (MaxFailedIndexesExceeded). The last attempt leaves
    _ENDED.json, and evaluate, waiting for the run as under `kubectl apply`, exits 2 with the reason."""
    run = train_run("partition", sets=("cluster.max_forgiven_restarts=1",), stages=("train", "evaluate"),
                    train_args=PEERS_NEVER_ANSWER)
    assert run.wait_end(4 * START_TIMEOUT_S) == ("Failed", "MaxFailedIndexesExceeded"), run.summary()
    status = run.status()
    failed_index = int(status["failedIndexes"].split(",")[0])
    attempts = run.pods()[failed_index]
    limit = jobs.job(run.kubeconfig, run.namespace, TRAIN)["spec"]["backoffLimitPerIndex"]
    assert [jobs.exit_code(pod) for pod in attempts] == [EXIT_PEER_LOST] + [1] * (limit + 1), run.summary()
    assert [jobs.counts(pod) for pod in attempts] == [(0, 0)] + [(n, 1) for n in range(limit + 1)], run.summary()
    # The last attempt's own reason (_ENDED.json) beats the Job's.
    reasons, _ = evaluate_ending(run)
    assert any("max_forgiven_restarts=1" in reason and "FailedIndexes" in reason for reason in reasons), reasons


def _configuration(kubeconfig: str):  # noqa: ANN202
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration
