"""GPUs a user can get, decided by the real Kueue controller (v0.19.2) on the local control plane.

Kueue runs as a process beside the cluster (tests/cluster/kueue.py), with its CRDs and webhooks from
its own module. Every test builds its queues from manifests/kueue/ (renamed, with its own quotas and
its own simulated node pools) and the train Job exactly as the launcher makes it
(pneumonia.k8s.manifests with cluster.queue_name). What happened is read from the Workload's and the
Job's status, and from the pods the real Job controller made.

No kubelet runs here: where a pod must be running, or must end after SIGTERM, the test reports that
through the pod's status as the kubelet would (`kubelet_runs`, `kubelet_stops`), with the exit code
the train worker gives on SIGTERM (143, tests/test_faults.py runs that for real) or a SIGKILL (137).
Everything else (admission, eviction, suspension, deletion, pod GC, counting) is the controllers' own.
"""

from __future__ import annotations

import copy
import datetime
import io
import json
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from cluster.kube import api_client, create_namespace, delete_namespace, unique_name, wait_for
from cluster.kueue import KueueController
from cluster.testbed import BIN, NodePool, node_objects
from pneumonia.config import load_config
from pneumonia.k8s import client as kc
from pneumonia.k8s import launcher as ln
from pneumonia.k8s import manifests as mf
from pneumonia.k8s import status as st

pytestmark = [pytest.mark.cluster, pytest.mark.kueue]

KUEUE = ("kueue.x-k8s.io", "v1beta2")
PODS_READY_TIMEOUT_S = 30
FAILURE_COUNT = "batch.kubernetes.io/job-index-failure-count"
IGNORED_COUNT = "batch.kubernetes.io/job-index-ignored-failure-count"


@pytest.fixture(scope="module")
def kueue(kube_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KueueController]:
    controller = KueueController(kube_cluster.kubeconfig, BIN / "kubectl", tmp_path_factory.mktemp("kueue"),
                                 pods_ready_timeout_s=PODS_READY_TIMEOUT_S)
    try:
        yield controller.start()
    finally:
        controller.stop()


class Queues:
    """One test's namespace, node pools, flavors, ClusterQueue and LocalQueue, from manifests/kueue/."""

    def __init__(self, kube_cluster: Any, gpu_quota: dict[str, int], pools: dict[str, int],
                 namespace_prefix: str = "kueue") -> None:
        self.kube_cluster = kube_cluster
        self.api = api_client(kube_cluster.kubeconfig)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.suffix = unique_name("kq").split("-", 1)[1]
        # with the pods' ServiceAccount; the prefix tells a kubelet stand-in whose pods to run
        self.namespace = create_namespace(self.core, f"{namespace_prefix}-{self.suffix}")
        self.client = kc.KubeClient(namespace=self.namespace, api_client=self.api)
        self.created: list[tuple[str, str]] = []  # (plural, name) of cluster-scoped objects
        self.nodes: list[str] = []
        # GPU node pools of this test only (flavor -> number of 1-GPU L4 nodes), so tests never share nodes.
        self.pool_names = {flavor: f"{flavor.removeprefix('pneumonia-')}-{self.suffix}" for flavor in pools}
        self.add_nodes({flavor: count for flavor, count in pools.items() if count})
        self.objects = self._queues(gpu_quota)
        for obj in self.objects:
            self.create(obj)

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def _queues(self, gpu_quota: dict[str, int]) -> list[dict[str, Any]]:
        objects = copy.deepcopy(mf.load_manifests(mf.MANIFEST_DIR / "kueue"))
        for obj in objects:
            spec = obj["spec"]
            obj["metadata"]["name"] = self.name(obj["metadata"]["name"])
            if obj["kind"] == "ResourceFlavor":
                base = obj["metadata"]["name"].removesuffix(f"-{self.suffix}")
                if base in self.pool_names:
                    spec["nodeLabels"]["cloud.google.com/gke-nodepool"] = self.pool_names[base]
            elif obj["kind"] == "AdmissionCheck":
                spec["parameters"]["name"] = self.name(spec["parameters"]["name"])
            elif obj["kind"] == "ClusterQueue":
                spec["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}}
                for rule in spec["admissionChecksStrategy"]["admissionChecks"]:
                    rule["name"] = self.name(rule["name"])
                    rule["onFlavors"] = [self.name(flavor) for flavor in rule["onFlavors"]]
                for flavor in spec["resourceGroups"][0]["flavors"]:
                    base = flavor["name"]
                    flavor["name"] = self.name(base)
                    for quota in flavor["resources"]:
                        if quota["name"] == mf.GPU_RESOURCE and base in gpu_quota:
                            quota["nominalQuota"] = str(gpu_quota[base])
            elif obj["kind"] == "LocalQueue":
                obj["metadata"]["namespace"] = self.namespace
                spec["clusterQueue"] = self.name(spec["clusterQueue"])
        return objects

    @property
    def cluster_queue(self) -> str:
        return self.name("pneumonia")

    @property
    def local_queue(self) -> str:
        return self.name("pneumonia")

    def create(self, obj: dict[str, Any]) -> None:
        group, version = obj["apiVersion"].split("/")
        plural = obj["kind"].lower() + ("es" if obj["kind"].endswith("s") else "s")
        if obj["metadata"].get("namespace"):
            self.custom.create_namespaced_custom_object(group, version, obj["metadata"]["namespace"], plural, obj)
        else:
            self.custom.create_cluster_custom_object(group, version, plural, obj)
            self.created.append((plural, obj["metadata"]["name"]))

    def add_nodes(self, pools: dict[str, int], labels: dict[str, str] | None = None,
                  taints: list[dict[str, str]] = ()) -> list[str]:
        names = []
        for flavor, count in pools.items():
            pool = NodePool(self.pool_names[flavor], "g2-standard-8", nodes=count, spot="spot" in flavor,
                            accelerator="nvidia-l4", gpus=1)
            for node in node_objects((pool,)):
                node["metadata"]["labels"].update(labels or {})
                node["spec"].setdefault("taints", []).extend(taints)
                # as the testbed makes its nodes: with their status, which the typed client refuses
                self.kube_cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(node))
                names.append(node["metadata"]["name"])
        self.nodes.extend(names)
        return names

    def train_job(self, workers: int, priority_class: str = "") -> dict[str, Any]:
        config = mf.with_launch_options(load_config(mf.CLUSTER_CONFIG), bucket="gs://b-kueue/p",
                                        image="europe-docker.pkg.dev/p/r/pneumonia:0.1.0", namespace=self.namespace,
                                        num_workers=workers, run_id=unique_name("run"), queue_name=self.local_queue)
        objects = mf.without_upstream_waits(mf.build_manifests(mf.load_manifests(), config))
        job = mf.stage_jobs(objects)["train"]
        job["metadata"]["name"] = unique_name("train")
        if priority_class:
            job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] = priority_class
        self.client.create_job(job)
        return job

    # --- reading what the controllers did ----------------------------------------------------------

    def job(self, name: str) -> Any:
        return self.batch.read_namespaced_job(name, self.namespace)

    def pods(self, job_name: str) -> list[Any]:
        return self.core.list_namespaced_pod(self.namespace, label_selector=f"{mf.LABEL_JOB_NAME}={job_name}").items

    def workload(self, job_name: str) -> dict[str, Any] | None:
        uid = self.job(job_name).metadata.uid
        found = self.client.job_workloads(uid)
        return found[0] if found else None

    def workload_condition(self, job_name: str, kind: str) -> dict[str, Any] | None:
        workload = self.workload(job_name) or {}
        return next((c for c in (workload.get("status") or {}).get("conditions", []) if c["type"] == kind), None)

    def close(self) -> None:
        delete_namespace(self.api, self.namespace)
        for plural, name in reversed(self.created):
            try:
                self.custom.delete_cluster_custom_object(KUEUE[0], KUEUE[1], plural, name)
            except ApiException:
                pass
        for node in self.nodes:
            try:
                self.core.delete_node(node)
            except ApiException:
                pass


@pytest.fixture
def make_queues(kube_cluster: Any, kueue: KueueController) -> Iterator[Any]:
    made: list[Queues] = []

    def make(gpu_quota: dict[str, int], pools: dict[str, int]) -> Queues:
        made.append(Queues(kube_cluster, gpu_quota, pools))
        return made[-1]

    yield make
    for queues in made:
        queues.close()


# --- the kubelet's part, played only where no kubelet exists ---------------------------------------------

def kubelet_runs(queues: Queues, job_name: str) -> list[str]:
    """Every bound pod of the Job reported Running and Ready, as a kubelet reports a started container."""
    now = datetime.datetime.now(datetime.UTC).isoformat()
    started = []
    for pod in queues.pods(job_name):
        if not pod.spec.node_name or pod.metadata.deletion_timestamp or pod.status.phase == "Running":
            continue
        queues.core.patch_namespaced_pod_status(pod.metadata.name, queues.namespace, {"status": {
            "phase": "Running", "startTime": now,
            "conditions": [{"type": kind, "status": "True", "lastTransitionTime": now}
                           for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": "train", "image": pod.spec.containers[0].image, "imageID": "",
                                   "ready": True, "restartCount": 0, "started": True,
                                   "state": {"running": {"startedAt": now}}}]}})
        started.append(pod.metadata.name)
    return started


def kubelet_stops(queues: Queues, job_name: str, exit_code: int) -> list[str]:
    """Every pod being deleted ends as its container ended (phase Failed, the exit code), and goes."""
    now = datetime.datetime.now(datetime.UTC).isoformat()
    stopped = []
    for pod in queues.pods(job_name):
        if pod.metadata.deletion_timestamp is None:
            continue
        if pod.status.phase not in ("Failed", "Succeeded"):
            queues.core.patch_namespaced_pod_status(pod.metadata.name, queues.namespace, {"status": {
                "phase": "Failed",
                "containerStatuses": [{"name": "train", "image": pod.spec.containers[0].image, "imageID": "",
                                       "ready": False, "restartCount": 0, "started": False,
                                       "state": {"terminated": {"exitCode": exit_code, "startedAt": now,
                                                                "finishedAt": now,
                                                                "reason": "Error"}}}]}})
        try:
            queues.core.delete_namespaced_pod(pod.metadata.name, queues.namespace, grace_period_seconds=0)
        except ApiException as error:
            if error.status != 404:
                raise
        stopped.append(pod.metadata.name)
    return stopped


def index_counts(pods: list[Any]) -> dict[str, tuple[str, str]]:
    """{index: (failures counted, failures ignored)} as the Job controller annotates the pods it creates."""
    return {st.pod_index(pod): ((pod.metadata.annotations or {}).get(FAILURE_COUNT, "0"),
                                (pod.metadata.annotations or {}).get(IGNORED_COUNT, "0")) for pod in pods}


def summary(queues: Queues, job_name: str) -> dict[str, Any]:
    """What the Job and its Workload say, for the assertion messages and the report."""
    job = queues.job(job_name)
    workload = queues.workload(job_name) or {}
    return {"evictions": (workload.get("status") or {}).get("schedulingStats", {}).get("evictions"),
            "job": {"suspend": job.spec.suspend, "active": job.status.active, "failed": job.status.failed,
                    "failedIndexes": job.status.failed_indexes,
                    "conditions": [(c.type, c.status, c.reason) for c in job.status.conditions or []]},
            "workload": [(c["type"], c["status"], c.get("reason")) for c in
                         (workload.get("status") or {}).get("conditions", [])]}


# --- 1. all workers or none ---------------------------------------------------------------------------

def test_four_workers_with_quota_for_three_gpus_start_nothing_and_the_launcher_says_why(make_queues: Any) -> None:
    queues = make_queues({"pneumonia-l4-on-demand": 3, "pneumonia-l4-spot": 0, "pneumonia-l4-flex-start": 0},
                         {"pneumonia-l4-on-demand": 4})
    job = queues.train_job(workers=4)
    name = job["metadata"]["name"]
    quota = wait_for(lambda: queues.workload_condition(name, "QuotaReserved"), 60, "Kueue to consider the Workload")
    assert quota["status"] == "False", summary(queues, name)
    assert "current podset request (4) > maximum capacity (3)" in quota["message"]
    # Nothing started: the Job stays suspended, the Job controller made no pod, no GPU is held.
    live = queues.job(name)
    assert live.spec.suspend is True and not live.status.active and queues.pods(name) == []
    assert ("Suspended", "True") in {(c.type, c.status) for c in live.status.conditions or []}
    line = st.queue_reason(queues.client, live, {})
    print(f"\nquota 3 GPUs, 4 workers: {summary(queues, name)}\n  QuotaReserved message: {quota['message']}"
          f"\n  launcher: {line}")
    assert line.startswith(f"waiting for quota: 4 nvidia.com/gpu requested, 3 available in ClusterQueue "
                           f"{queues.cluster_queue} (flavor {queues.name('pneumonia-l4-on-demand')})"), line
    # The launcher, following the Job, says it in one line (and keeps waiting: here, 2 s).
    out = io.StringIO()
    options = st.FollowOptions(poll_s=0.5, timeout_s=2)
    launcher = ln.Launcher(queues.client, [job], load_config(mf.CLUSTER_CONFIG), options, out)
    with pytest.raises(kc.LaunchError, match="still not finished"):
        launcher.follow("train", job)
    assert f"[train] {line}" in out.getvalue().splitlines(), out.getvalue()
    assert "[train] suspended: 0/4 done; pods: no pods yet (JobSuspended)" in out.getvalue(), out.getvalue()
    # A fourth GPU of quota: the whole Job is admitted at once, its 4 pods go to the on-demand pool.
    patch = {"spec": {"resourceGroups": [dict(group) for group in
                                         queues.custom.get_cluster_custom_object(*KUEUE, "clusterqueues",
                                                                                 queues.cluster_queue)["spec"]
                                         ["resourceGroups"]]}}
    for flavor in patch["spec"]["resourceGroups"][0]["flavors"]:
        if flavor["name"] == queues.name("pneumonia-l4-on-demand"):
            next(q for q in flavor["resources"] if q["name"] == mf.GPU_RESOURCE)["nominalQuota"] = "4"
    queues.custom.patch_cluster_custom_object(*KUEUE, "clusterqueues", queues.cluster_queue, patch)
    wait_for(lambda: len(queues.pods(name)) == 4, 60, "the 4 workers' pods")
    assert queues.job(name).spec.suspend is False
    assert st.queue_reason(queues.client, queues.job(name), {}) is None
    pool = queues.pool_names["pneumonia-l4-on-demand"]
    assert {pod.spec.node_selector["cloud.google.com/gke-nodepool"] for pod in queues.pods(name)} == {pool}


def test_workers_not_ready_in_time_are_evicted_and_requeued_without_spending_retries(make_queues: Any) -> None:
    """Quota is not capacity (a stockout): the pool has no node, the pods stay Pending, and after
    waitForPodsReady's timeout Kueue evicts the Workload, the Job is suspended and its pods removed."""
    queues = make_queues({"pneumonia-l4-on-demand": 2, "pneumonia-l4-spot": 0, "pneumonia-l4-flex-start": 0},
                         {"pneumonia-l4-on-demand": 0})
    name = queues.train_job(workers=2)["metadata"]["name"]
    wait_for(lambda: len(queues.pods(name)) == 2, 60, "the admitted Job's pods")
    evicted = wait_for(lambda: (c := queues.workload_condition(name, "Evicted")) and c["status"] == "True" and c,
                       PODS_READY_TIMEOUT_S + 60, "Kueue to evict the Workload")
    assert evicted["reason"] == "PodsReadyTimeout", summary(queues, name)
    wait_for(lambda: queues.job(name).spec.suspend is True, 30, "the Job to be suspended")
    # The pods never ran: the real pod GC ends them (unscheduled and terminating), and no GPU stays held.
    wait_for(lambda: queues.pods(name) == [], 90, "the pods to go")
    job = queues.job(name)
    assert not job.status.failed and not job.status.failed_indexes, summary(queues, name)
    # Requeued after the backoff and admitted again: the Job controller's per-index counts on the new
    # pods say what the eviction cost.
    again = wait_for(lambda: len(p := [p for p in queues.pods(name) if not p.metadata.deletion_timestamp]) == 2
                     and p, 90, "the Job admitted again")
    print(f"\nwaitForPodsReady eviction: per-index (counted, ignored) {index_counts(again)}; {summary(queues, name)}")
    assert index_counts(again) == {"0": ("0", "0"), "1": ("0", "0")} or \
        all(counted == "0" for counted, _ in index_counts(again).values()), summary(queues, name)


# --- 2. preemption by Kueue -----------------------------------------------------------------------------

@pytest.mark.parametrize("exit_code", [143, 137])
def test_preemption_by_kueue_costs_no_retry_whatever_the_exit_code(make_queues: Any, exit_code: int) -> None:
    """Kueue suspends the preempted Job; the Job controller removes its tracking finalizer from each pod
    before deleting it (pkg/controller/job, deleteJobPods), so the pods' ends are never counted: not
    with 143 (backup saved), not even with 137 (SIGKILL after the grace period, work since the last
    backup lost). What the exit code decides is only whether the backup was saved."""
    queues = make_queues({"pneumonia-l4-on-demand": 2, "pneumonia-l4-spot": 0, "pneumonia-l4-flex-start": 0},
                         {"pneumonia-l4-on-demand": 2})
    low, high = queues.name("low"), queues.name("high")
    for name, value in ((low, 10), (high, 1000)):
        queues.create({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass",
                       "metadata": {"name": name}, "value": value})
    victim = queues.train_job(workers=2, priority_class=low)["metadata"]["name"]
    wait_for(lambda: len([p for p in queues.pods(victim) if p.spec.node_name]) == 2, 60, "the workers bound")
    kubelet_runs(queues, victim)
    wait_for(lambda: (c := queues.workload_condition(victim, "PodsReady")) and c["status"] == "True", 60,
             "Kueue to see all workers Ready")
    preemptor = queues.train_job(workers=2, priority_class=high)["metadata"]["name"]
    evicted = wait_for(lambda: (c := queues.workload_condition(victim, "Evicted")) and c["status"] == "True" and c,
                       60, "Kueue to preempt the low-priority Job")
    assert evicted["reason"] == "Preempted", summary(queues, victim)
    wait_for(lambda: queues.job(victim).spec.suspend is True, 30, "the victim suspended")
    # What the issue says and the controllers confirm: the pods carry no DisruptionTarget condition,
    # so only their exit code decides whether podFailurePolicy forgives them.
    terminating = wait_for(lambda: len(t := [p for p in queues.pods(victim) if p.metadata.deletion_timestamp]) == 2
                           and t, 30, "both workers terminating")
    assert not [c for p in terminating for c in p.status.conditions or [] if c.type == "DisruptionTarget"]
    # Deleted gracefully: the kubelet gives each worker the pod's terminationGracePeriodSeconds (120 s in
    # manifests/31-train-job.yaml) after SIGTERM to save its backup and exit 143.
    assert {p.metadata.deletion_grace_period_seconds for p in terminating} == {120}
    kubelet_stops(queues, victim, exit_code)
    # The preemptor gets the GPUs; when it is gone, the victim is admitted again and recreated.
    wait_for(lambda: queues.job(preemptor).spec.suspend is False, 60, "the preemptor admitted")
    queues.client.delete_job(preemptor)
    wait_for(lambda: [p for p in queues.pods(preemptor) if p.metadata.deletion_timestamp] or not
             queues.pods(preemptor), 30, "the preemptor's pods deleted")
    kubelet_stops(queues, preemptor, 143)
    wait_for(lambda: queues.job(victim).spec.suspend is False, 120, "the victim readmitted")
    replacements = wait_for(lambda: len(p := queues.pods(victim)) == 2 and p, 60, "the replacement workers")
    counts = index_counts(replacements)
    job = queues.job(victim)
    print(f"\nexit {exit_code}: per-index (counted, ignored) {counts}; {summary(queues, victim)}")
    assert {index: counted for index, (counted, _) in counts.items()} == {"0": "0", "1": "0"}, summary(queues, victim)
    assert not job.status.failed and not job.status.failed_indexes, summary(queues, victim)
    assert [e["reason"] for e in (queues.workload(victim)["status"]["schedulingStats"]["evictions"])] == ["Preempted"]


# --- 3. a spot node taken away mid-epoch -------------------------------------------------------------------

def test_a_spot_node_taken_away_costs_no_retry(make_queues: Any) -> None:
    queues = make_queues({"pneumonia-l4-on-demand": 0, "pneumonia-l4-spot": 2, "pneumonia-l4-flex-start": 0},
                         {"pneumonia-l4-spot": 2})
    name = queues.train_job(workers=2)["metadata"]["name"]
    wait_for(lambda: len([p for p in queues.pods(name) if p.spec.node_name]) == 2, 60, "the workers bound")
    assert {p.spec.node_selector.get("cloud.google.com/gke-spot") for p in queues.pods(name)} == {"true"}
    kubelet_runs(queues, name)
    lost = next(p for p in queues.pods(name) if st.pod_index(p) == "1")
    queues.core.delete_node(lost.spec.node_name)  # GKE reclaims the spot VM: the Node object goes
    # The real pod GC fails the orphaned pod with DisruptionTarget (DeletionByPodGC); the Job controller
    # replaces it under podFailurePolicy rule #1, counting nothing.
    def replaced() -> Any:
        pods = [p for p in queues.pods(name) if st.pod_index(p) == "1" and p.metadata.name != lost.metadata.name]
        return pods[0] if pods else None
    replacement = wait_for(replaced, 120, "a replacement for worker 1")
    print(f"\nspot node lost: replacement index 1 (counted, ignored) {index_counts([replacement])}; "
          f"{summary(queues, name)}")
    assert index_counts([replacement])["1"][0] == "0", summary(queues, name)
    job = queues.job(name)
    assert not job.status.failed and not job.status.failed_indexes, summary(queues, name)


# --- 4. flex-start --------------------------------------------------------------------------------------------

def test_flex_start_waits_for_provisioned_capacity_then_starts(make_queues: Any) -> None:
    queues = make_queues({"pneumonia-l4-on-demand": 0, "pneumonia-l4-spot": 0, "pneumonia-l4-flex-start": 4},
                         {"pneumonia-l4-flex-start": 0})
    name = queues.train_job(workers=2)["metadata"]["name"]
    requests = wait_for(lambda: queues.custom.list_namespaced_custom_object(
        "autoscaling.x-k8s.io", "v1", queues.namespace, "provisioningrequests")["items"], 60,
        "Kueue's ProvisioningRequest")
    (request,) = requests
    assert request["spec"]["provisioningClassName"] == "queued-provisioning.gke.io"
    line = wait_for(lambda: st.queue_reason(queues.client, queues.job(name), {}), 30, "an explanation")
    assert line.startswith("waiting for capacity (flex-start)"), line
    print(f"\nflex-start, capacity queued: {summary(queues, name)}\n  launcher: {line}")
    assert queues.job(name).spec.suspend is True and queues.pods(name) == []
    # GKE's part: the nodes appear, labelled for this request, then the request is Provisioned.
    resize = f"resize-{queues.suffix}"
    new_nodes = queues.add_nodes({"pneumonia-l4-flex-start": 2},
                                 labels={"autoscaling.gke.io/provisioning-request": resize},
                                 taints=[{"key": "cloud.google.com/gke-queued", "value": "true",
                                          "effect": "NoSchedule"}])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    queues.custom.patch_namespaced_custom_object_status(
        "autoscaling.x-k8s.io", "v1", queues.namespace, "provisioningrequests", request["metadata"]["name"],
        {"status": {"conditions": [
            {"type": kind, "status": "True", "reason": kind, "message": f"{kind} by the test's autoscaler",
             "lastTransitionTime": now} for kind in ("Accepted", "Provisioned")],
            "provisioningClassDetails": {"ResizeRequestName": resize}}})
    wait_for(lambda: queues.job(name).spec.suspend is False, 60, "the Job admitted")
    bound = wait_for(lambda: len(p := [p for p in queues.pods(name) if p.spec.node_name]) == 2 and p, 60,
                     "the workers scheduled onto the provisioned nodes")
    assert {pod.spec.node_name for pod in bound} == set(new_nodes)
    assert st.queue_reason(queues.client, queues.job(name), {}) is None
    assert (queues.workload_condition(name, "Admitted") or {}).get("status") == "True"
    print(f"flex-start, provisioned: {summary(queues, name)}")


def test_the_launcher_refuses_a_queue_that_does_not_exist(make_queues: Any) -> None:
    queues = make_queues({}, {})
    config = mf.with_launch_options(load_config(mf.CLUSTER_CONFIG), bucket="gs://b-kueue/p",
                                    image="europe-docker.pkg.dev/p/r/pneumonia:0.1.0", namespace=queues.namespace,
                                    run_id="no-queue", queue_name="no-such-queue")
    objects = mf.build_manifests(mf.load_manifests(), config)
    launcher = ln.Launcher(queues.client, objects, config, st.FollowOptions(poll_s=0.1), io.StringIO())
    with pytest.raises(kc.LaunchError, match="LocalQueue no-such-queue .* does not exist in namespace"):
        launcher.preflight(mf.stage_jobs(objects), setup=False)
    # The example queue's LocalQueue passes the same check.
    launcher.config = mf.with_launch_options(config, queue_name=queues.local_queue)
    launcher.preflight(mf.stage_jobs(objects), setup=False)
