"""The train Job through a Kueue eviction and readmission, with real pods.

tests/cluster/test_kueue.py plays the kubelet where Kueue suspends a Job; here nothing is played. The
real Kueue controller (v0.19.2) admits the train Job as the launcher makes it (cluster.queue_name set:
the queue label, created suspended) into a ClusterQueue from manifests/kueue/ with quota for 2 L4 GPUs
on 2 simulated L4 nodes; its 2 workers run as podman containers through the kubelet stand-in
(tests/cluster/kubelet.py) at the tests' tiny size. Once both train in epoch 1 the Workload is
deactivated (`spec.active: false`, what `kubectl patch` or a Kueue admin does to take a Job's GPUs
back): Kueue evicts it, suspends the Job, the Job controller deletes the pods, and the kubelet
stand-in stops each container with SIGTERM and the pod's grace period. Reactivated, the Workload is
admitted again and the Job controller makes new pods, which resume from the backup.

What happened is read from the API (the Workload's and the Job's conditions, the Job's counts, each
pod's exit code and the Job controller's per-index annotations) and from the containers' own logs
(the backup saved on SIGTERM, the resume position). The test computes none of it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bed  # noqa: E402
import train_job as jobs  # noqa: E402
from fixtures import pod_bed  # noqa: E402, F401
from test_train import tiny_shards  # noqa: E402, F401

from cluster.kueue import KueueController  # noqa: E402
from cluster.test_job_faults import TRAIN, TrainRun  # noqa: E402
from cluster.test_kueue import KUEUE, Queues  # noqa: E402
from cluster.testbed import BIN  # noqa: E402
from pneumonia.errors import EXIT_PREEMPTED  # noqa: E402
from pneumonia.k8s import manifests as mf  # noqa: E402

POD_NAMESPACE_PREFIX = "kueue-pods-"  # the namespaces whose pods this module's kubelet runs
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.kueue, pytest.mark.timeout(1800)]
ON_DEMAND = "pneumonia-l4-on-demand"
KUEUE_S = 120  # for Kueue and the Job controller to act on a change (seconds on a busy 2-core machine)
STOP_S = 300  # for both workers to stop after SIGTERM and their pods to go (the grace period is 120 s)
EPOCHS = 8
STOPPED_ON_SIGTERM = "stop requested (SIGTERM): backup saved"  # training/callbacks.py ResumableBackup


@pytest.fixture(scope="module")
def kueue(kube_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KueueController]:
    # waitForPodsReady off: the real containers take their time to start on a busy machine, and the
    # eviction under test is the deactivation, not a pods-ready timeout.
    controller = KueueController(kube_cluster.kubeconfig, BIN / "kubectl", tmp_path_factory.mktemp("kueue-pods"))
    try:
        yield controller.start()
    finally:
        controller.stop()


class Workload:
    """The train Job's Workload, as Kueue writes it."""

    def __init__(self, queues: Queues) -> None:
        self.queues = queues

    def read(self) -> dict[str, Any]:
        return self.queues.workload(TRAIN) or {}

    def condition(self, kind: str) -> dict[str, Any]:
        return next((c for c in self.read().get("status", {}).get("conditions", []) if c["type"] == kind), {})

    def wait(self, kind: str, status: str, what: str) -> dict[str, Any]:
        return jobs.wait_for(lambda: (c := self.condition(kind)).get("status") == status and c, KUEUE_S, what)

    def set_active(self, active: bool) -> None:
        name = self.read()["metadata"]["name"]
        self.queues.custom.patch_namespaced_custom_object(*KUEUE, self.queues.namespace, "workloads", name,
                                                          {"spec": {"active": active}})

    def conditions(self) -> list[tuple[str, str, str]]:
        return [(c["type"], c["status"], c.get("reason", "")) for c in self.read().get("status", {}).get("conditions", [])]


def job_condition(run: TrainRun, kind: str) -> dict[str, Any]:
    return next((c for c in run.status().get("conditions", []) if c["type"] == kind), {})


def first_event(testbed: bed.PodNetworkBed, pod: dict[str, Any], event: str) -> dict[str, Any]:
    return next((e for e in jobs.log_events(jobs.pod_log_file(testbed, pod)) if e.get("event") == event), {})


@pytest.fixture
def queued_run(kube_cluster: Any, kueue: KueueController, pod_bed: bed.PodNetworkBed,  # noqa: F811
               tiny_shards: Path) -> Iterator[tuple[Queues, TrainRun]]:  # noqa: F811
    queues = Queues(kube_cluster, {ON_DEMAND: 2, "pneumonia-l4-spot": 0, "pneumonia-l4-flex-start": 0},
                    {ON_DEMAND: 2}, namespace_prefix=POD_NAMESPACE_PREFIX.rstrip("-"))
    run = None
    try:
        # 8 epochs rather than TINY's 4: the eviction, started once both workers begin epoch 1, must
        # reach them before the last epoch ends (an epoch is a few seconds; a busy machine is slow to see it).
        run = TrainRun(kube_cluster, pod_bed, tiny_shards, "kueue", namespace=queues.namespace,
                       sets=(f"cluster.queue_name={queues.local_queue}", f"train.epochs={EPOCHS}"))
        yield queues, run
    finally:
        if run is not None:
            print(run.summary())
            run.close()
        queues.close()


def test_a_deactivated_workload_is_readmitted_and_resumes_from_the_backup_without_spending_retries(
        queued_run: tuple[Queues, TrainRun]) -> None:
    queues, run = queued_run
    workload = Workload(queues)
    # The Job as the launcher made it: Kueue's label, created suspended, admitted by Kueue alone.
    job = jobs.job(run.kubeconfig, run.namespace, TRAIN)
    assert job["metadata"]["labels"][mf.QUEUE_LABEL] == queues.local_queue
    sent = json.loads(job["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
    assert sent["spec"]["suspend"] is True, sent["spec"]
    admitted_first = workload.wait("Admitted", "True", "Kueue to admit the Job")
    first = run.first_pods_in_epoch(1)
    pool = queues.pool_names[ON_DEMAND]
    assert {pod["spec"]["nodeSelector"]["cloud.google.com/gke-nodepool"] for pod in first.values()} == {pool}

    workload.set_active(False)
    deactivated = time.monotonic()
    evicted = workload.wait("Evicted", "True", "Kueue to evict the deactivated Workload")
    suspended = jobs.wait_for(lambda: (c := job_condition(run, "Suspended")).get("status") == "True" and c,
                              KUEUE_S, "the Job suspended")
    jobs.wait_for(lambda: not jobs.pods_by_index(run.kubeconfig, run.namespace, TRAIN), STOP_S,
                  "the first pods to stop and go")
    released = workload.wait("QuotaReserved", "False", "Kueue to release the quota")
    while_evicted = workload.conditions()
    stopped_s = time.monotonic() - deactivated

    workload.set_active(True)
    reactivated = time.monotonic()
    admitted_again = workload.wait("Admitted", "True", "Kueue to admit the Workload again")
    readmitted_s = time.monotonic() - reactivated
    requeued = workload.condition("Requeued")
    assert run.wait_end() == ("Complete", "CompletionsReached"), run.summary()
    ended_s = time.monotonic() - reactivated

    pods, status = run.pods(), run.status()
    final = workload.read()
    resumed = job_condition(run, "Suspended")
    stops = {index: first_event(run.testbed, attempts[0], STOPPED_ON_SIGTERM) for index, attempts in pods.items()}
    positions = {index: first_event(run.testbed, attempts[-1], "input position") for index, attempts in pods.items()}
    report = {
        "workload": {"first admission": admitted_first.get("reason"), "evicted": (evicted["reason"], evicted["message"]),
                     "while evicted": while_evicted, "requeued": (requeued.get("reason"), requeued.get("status")),
                     "admitted again": admitted_again.get("reason"), "final": workload.conditions(),
                     "evictions": final["status"].get("schedulingStats", {}).get("evictions")},
        "job": {"suspended": (suspended["reason"], suspended.get("message")), "resumed": (resumed.get("status"),
                resumed.get("reason")), "failed": status.get("failed", 0), "failedIndexes": status.get("failedIndexes")},
        "pods": {index: [(pod["metadata"]["name"], jobs.exit_code(pod), jobs.counts(pod)) for pod in attempts]
                 for index, attempts in pods.items()},
        "stopped at": {index: (e.get("epoch"), e.get("step")) for index, e in stops.items()},
        "resumed at": {index: (e.get("epoch"), e.get("step")) for index, e in positions.items()},
        "seconds": {"deactivated to pods gone": round(stopped_s), "reactivated to admitted": round(readmitted_s),
                    "reactivated to Complete": round(ended_s)},
    }
    # (the fixture prints run.summary() too: each pod's phase, exit code and counts, the Job's status)
    print("\nKueue deactivation with real pods:\n" + json.dumps(report, default=str))

    # Kueue's part, from the Workload: evicted because deactivated, its quota released, requeued once
    # reactivated, admitted again into the same ClusterQueue; one eviction recorded.
    assert evicted["reason"] == "Deactivated" and released["status"] == "False", report
    assert requeued.get("status") == "True" and requeued.get("reason") == "Reactivated", report
    assert [e["reason"] for e in final["status"]["schedulingStats"]["evictions"]] == ["Deactivated"], report
    assert final["status"]["admission"]["clusterQueue"] == queues.cluster_queue, report
    # The Job's part: suspended by Kueue, then resumed, and Complete.
    assert suspended["reason"] == "JobSuspended", report
    assert resumed.get("status") == "False" and resumed.get("reason") == "JobResumed", report
    # The workers' part: each first pod stopped on SIGTERM with its backup saved, exit 143, and the
    # replacement resumed where they stopped (the same position on both workers), not at epoch 0.
    assert sorted(pods) == [0, 1] and all(len(attempts) == 2 for attempts in pods.values()), report
    assert [jobs.exit_code(attempts[0]) for attempts in pods.values()] == [EXIT_PREEMPTED] * 2, report
    # As the issue says of a Kueue eviction: the deleted pods carry no DisruptionTarget condition.
    assert not any(jobs.has_condition(attempts[0], "DisruptionTarget") for attempts in pods.values()), report
    assert all(jobs.exit_code(attempts[-1]) == 0 for attempts in pods.values()), report
    assert all(stops.values()) and all(positions.values()), report
    (epoch, step), = {(e["epoch"], e["step"]) for e in stops.values()}
    # callbacks.py: a stop mid-epoch names the last step done (resume at the next); a stop at an epoch's
    # last step finishes that epoch and names the next epoch, step 0 (the checks mid-epoch fall on odd
    # steps with train.preemption_check_every_n_steps=2, so step 0 is only ever that case).
    expected = (epoch, 0) if step == 0 else (epoch, step + 1)
    assert {(e["epoch"], e["step"]) for e in positions.values()} == {expected} and epoch >= 1, report
    assert all(first_event(run.testbed, attempts[-1], "training plan").get("resuming") is True
               for attempts in pods.values()), report
    # No retry spent: nothing counted against the Job or any index.
    assert status.get("failed", 0) == 0 and not status.get("failedIndexes"), report
    # The Job controller removed its tracking finalizer before deleting the suspended Job's pods: their
    # ends were not even counted as ignored failures.
    assert [jobs.counts(attempts[-1]) for attempts in pods.values()] == [(0, 0), (0, 0)], report
