"""manifests/ on a real API server (tests/cluster/testbed.py): server-side validation and defaulting, Pod
Security `restricted`, the GKE admission plugins, and the real scheduler placing each stage's pods on
the node pools the README sizes them for. Checks the schemas (kubernetes-validate, tests/test_manifests.py)
cannot make: the last two tests show the server refusing what the schemas accept, so the check bites.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml

from cluster.kube import (
    api_client,
    create_namespace,
    delete_namespace,
    service_account_kubeconfig,
    unique_name,
    wait_for,
)
from cluster.testbed import ACCELERATOR_LABEL, NODEPOOL_LABEL, Cluster

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
pytestmark = pytest.mark.cluster


def user_manifests(namespace: str) -> list[dict[str, Any]]:
    """manifests/*.yaml exactly as `kubectl apply -f manifests/` reads them, moved to `namespace` (tests
    share the cluster); the Namespace keeps its own Pod Security labels."""
    objects = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj is None:
                continue
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = namespace
            else:
                obj["metadata"]["namespace"] = namespace
            objects.append(obj)
    return objects


def train_job(namespace: str) -> dict[str, Any]:
    return copy.deepcopy(next(obj for obj in user_manifests(namespace)
                              if obj["kind"] == "Job" and obj["metadata"]["name"] == "pneumonia-train"))


@pytest.fixture
def namespace(kube_cluster: Cluster) -> Iterator[str]:
    """A fresh namespace name; the test creates it (from 00-namespace.yaml or create_namespace)."""
    name = unique_name("manifests")
    yield name
    delete_namespace(api_client(kube_cluster.kubeconfig), name)


def test_every_manifest_is_accepted_and_each_stage_lands_on_its_pool(kube_cluster: Cluster, namespace: str) -> None:
    objects = user_manifests(namespace)
    text = yaml.safe_dump_all(objects)
    # A server-side dry run of namespaced objects needs their namespace: 00-namespace.yaml goes first.
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(objects[0]))
    dry = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text, check=False)
    assert dry.returncode == 0, dry.stderr
    applied = kube_cluster.kubectl("apply", "-f", "-", "-o", "name", input=text, check=False)
    assert applied.returncode == 0, applied.stderr
    assert len(applied.stdout.split()) == len(objects)
    assert "Warning" not in applied.stderr, applied.stderr  # e.g. a Pod Security warning on the Jobs' templates

    api = api_client(kube_cluster.kubeconfig)
    core = kubernetes.client.CoreV1Api(api)
    labels = core.read_namespace(namespace).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

    # The real Job controller makes every pod (Pod Security admits each one: a refused pod would leave
    # its Job short, with a FailedCreate event) and the real scheduler binds it, resources and taints
    # counted against the simulated GKE nodes.
    jobs = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Job"}
    expected = sum(job["spec"].get("parallelism", 1) for job in jobs.values())
    nodes = {node.metadata.name: node.metadata.labels for node in core.list_node().items}

    def scheduled() -> list[Any]:
        pods = core.list_namespaced_pod(namespace).items
        bound = [pod for pod in pods if pod.spec.node_name]
        return bound if len(pods) == expected and len(bound) == expected else []

    try:
        pods = wait_for(scheduled, 90, f"{expected} pods of {len(jobs)} Jobs to be created and scheduled")
    except AssertionError:
        events = core.list_namespaced_event(namespace).items
        pytest.fail("not every pod was created and scheduled:\n" + "\n".join(
            f"{e.involved_object.name}: {e.reason}: {e.message}" for e in events if e.type == "Warning"))
    for pod in pods:
        job = pod.metadata.labels["batch.kubernetes.io/job-name"]
        node_labels = nodes[pod.spec.node_name]
        if job == "pneumonia-train":
            assert node_labels.get(ACCELERATOR_LABEL) == "nvidia-l4", (pod.metadata.name, pod.spec.node_name)
        else:  # the GPU taint keeps CPU stages off GPU nodes
            assert ACCELERATOR_LABEL not in node_labels, (pod.metadata.name, pod.spec.node_name)
    train_nodes = {pod.spec.node_name for pod in pods if pod.metadata.name.startswith("pneumonia-train-")}
    assert len(train_nodes) == 2, "one g2-standard-8 (one L4) per train worker"
    assert {nodes[node][NODEPOOL_LABEL] for node in train_nodes} <= {"gpu-l4", "gpu-l4-spot"}


def test_server_refuses_a_fail_index_rule_without_backoff_limit_per_index(kube_cluster: Cluster,
                                                                           namespace: str) -> None:
    create_namespace(kubernetes.client.CoreV1Api(api_client(kube_cluster.kubeconfig)), namespace)
    job = train_job(namespace)
    del job["spec"]["backoffLimitPerIndex"], job["spec"]["maxFailedIndexes"]
    job["spec"]["podFailurePolicy"]["rules"].append(
        {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [3]}})
    # The official schema has no rule across fields: it accepts the Job ...
    kubernetes_validate.validate(job, "1.36.0", strict=True)
    # ... the API server's validation does not.
    refused = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(job), check=False)
    assert refused.returncode != 0
    assert "requires the backoffLimitPerIndex to be set" in refused.stderr, refused.stderr


def test_pod_security_restricted_refuses_a_privileged_pod(kube_cluster: Cluster, namespace: str) -> None:
    create_namespace(kubernetes.client.CoreV1Api(api_client(kube_cluster.kubeconfig)), namespace)
    template = train_job(namespace)["spec"]["template"]
    compliant = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "compliant", "namespace": namespace},
                 "spec": {**template["spec"], "restartPolicy": "Never"}}
    accepted = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(compliant), check=False)
    assert accepted.returncode == 0, accepted.stderr
    privileged = copy.deepcopy(compliant)
    privileged["metadata"]["name"] = "privileged"
    (container,) = privileged["spec"]["containers"]
    container["securityContext"] = {"privileged": True, "runAsNonRoot": True}
    kubernetes_validate.validate(privileged, "1.36.0", strict=True)  # a valid Pod, as far as the schema knows
    refused = kube_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(privileged), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr
    assert "privileged" in refused.stderr and "allowPrivilegeEscalation" in refused.stderr


def test_gke_admission_adds_the_gpu_toleration_to_pods_that_request_gpus(kube_cluster: Cluster,
                                                                         namespace: str) -> None:
    """ExtendedResourceToleration (on in GKE, off in a default kube-apiserver) is on: a GPU pod without
    tolerations gets nvidia.com/gpu:Exists, and DefaultTolerationSeconds its not-ready/unreachable ones."""
    create_namespace(kubernetes.client.CoreV1Api(api_client(kube_cluster.kubeconfig)), namespace)
    spec = copy.deepcopy(train_job(namespace)["spec"]["template"]["spec"])
    spec.pop("tolerations")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu", "namespace": namespace},
           "spec": {**spec, "restartPolicy": "Never"}}
    done = kube_cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
    tolerations = json.loads(done.stdout)["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert {t["key"] for t in tolerations} >= {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}


def test_a_gpu_quota_stops_the_job_controller_at_the_second_worker(kube_cluster: Cluster, namespace: str) -> None:
    """ResourceQuota admission (on, as on GKE): under a namespace quota of one GPU, the Job controller
    creates the first train pod and the server refuses the second, the Job's events saying why."""
    api = api_client(kube_cluster.kubeconfig)
    core = kubernetes.client.CoreV1Api(api)
    create_namespace(core, namespace)
    core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "gpus"},
                                                      "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}})
    # Admission counts against the quota's status, which the quota controller fills in first.
    wait_for(lambda: (core.read_namespaced_resource_quota("gpus", namespace).status.hard or {}), 30,
             "the quota controller to count the quota")
    kube_cluster.kubectl("apply", "-f", "-", input=json.dumps(train_job(namespace)))

    def refused() -> list[Any]:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.kind=Job").items
        return [e for e in events if e.reason == "FailedCreate" and "exceeded quota: gpus" in e.message]

    (event, *_) = wait_for(refused, 60, "the Job controller's FailedCreate event")
    assert "requested: requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=1" in event.message, event.message
    assert len(core.list_namespaced_pod(namespace).items) == 1


def test_the_pods_account_may_get_the_train_job_and_nothing_else(kube_cluster: Cluster, namespace: str,
                                                                 tmp_path: Path) -> None:
    """05/06 of manifests/ as applied: the pods' ServiceAccount reads the train Job (what evaluate does)
    and the real authorizer refuses the rest: another Job, listing Jobs, pods, the ConfigMap."""
    objects = [obj for obj in user_manifests(namespace)
               if obj["kind"] in ("Namespace", "ServiceAccount") or obj["metadata"]["name"] == "pneumonia-evaluate"]
    for obj in objects:
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace  # as the launcher patches it (kubectl users edit it with the namespace)
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))
    admin = api_client(kube_cluster.kubeconfig)
    batch = kubernetes.client.BatchV1Api(admin)
    for name in ("pneumonia-train", "other-job"):
        job = train_job(namespace)
        job["metadata"]["name"] = name
        job["spec"]["suspend"] = True  # no pods: only the objects are read
        batch.create_namespaced_job(namespace, job)
    pods_kubeconfig = service_account_kubeconfig(admin, kube_cluster.kubeconfig, namespace, "pneumonia",
                                                 tmp_path / "pods.yaml", expiration_s=600)
    as_pods = kubernetes.config.new_client_from_config(config_file=str(pods_kubeconfig))
    pods_batch, pods_core = kubernetes.client.BatchV1Api(as_pods), kubernetes.client.CoreV1Api(as_pods)
    assert pods_batch.read_namespaced_job("pneumonia-train", namespace).metadata.name == "pneumonia-train"
    for refused in (lambda: pods_batch.read_namespaced_job("other-job", namespace),
                    lambda: pods_batch.list_namespaced_job(namespace),
                    lambda: pods_batch.delete_namespaced_job("pneumonia-train", namespace),
                    lambda: pods_core.list_namespaced_pod(namespace),
                    lambda: pods_core.read_namespaced_config_map("pneumonia-config", namespace)):
        with pytest.raises(kubernetes.client.exceptions.ApiException) as error:
            refused()
        assert error.value.status == 403
