""""Why is it Pending", from what the real kube-scheduler says (its FailedScheduling events and the pods'
PodScheduled condition) about the train Job's pods on the simulated GKE pools: no node with the GPU
type, too few GPUs per node, a taint the pod does not tolerate, too little memory. The Job is the
launcher's own (pneumonia.k8s.manifests), created as the launcher creates it, followed by
Launcher.follow, which prints the explanation.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cluster.kube import api_client, create_namespace, delete_namespace, unique_name, wait_for
from cluster.testbed import ACCELERATOR_LABEL, Cluster
from pneumonia.config import load_config
from pneumonia.k8s import client as kc
from pneumonia.k8s import launcher as ln
from pneumonia.k8s import manifests as mf
from pneumonia.k8s import status as st

pytestmark = pytest.mark.cluster


@pytest.fixture
def admin(kube_cluster: Cluster) -> Iterator[kc.KubeClient]:
    """The launcher's client, as admin, on a fresh restricted namespace holding the pods' ServiceAccount."""
    api = api_client(kube_cluster.kubeconfig)
    client = kc.KubeClient(namespace=unique_name("pending"), api_client=api)
    create_namespace(client.core, client.namespace)
    yield client
    delete_namespace(api, client.namespace)


def cpu_worker_on_gpu_nodes(job: dict[str, Any]) -> None:
    """A CPU-only worker (no GPU request, so no automatic GPU toleration) pinned to the L4 pool."""
    mf.pod_spec(job)["nodeSelector"] = {ACCELERATOR_LABEL: "nvidia-l4"}


def more_memory_than_a_node_has(job: dict[str, Any]) -> None:
    resources = mf.pod_spec(job)["containers"][0]["resources"]
    resources["requests"]["memory"] = resources["limits"]["memory"] = "40Gi"


# (launch options, a change to the Job, what the explanation must say, what it must not say)
CASES: dict[str, tuple[dict[str, Any], Callable[[dict], None] | None, str, str | None]] = {
    "no-gpu-node": ({"gpu_type": "nvidia-tesla-t4"}, None,
                    f"no node has the pod's node labels: is there a node pool with the GPU type ({mf.GPU_NODE_LABEL})",
                    None),
    "too-few-gpus": ({"gpus_per_worker": 2}, None, "not enough free nvidia.com/gpu", "no node has the pod's node labels"),
    "untolerated-taint": ({"gpus_per_worker": 0}, cpu_worker_on_gpu_nodes,
                          "carry a taint the pod does not tolerate", "no node has the pod's node labels"),
    "too-little-memory": ({}, more_memory_than_a_node_has, "enough free memory", "nvidia.com/gpu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pending_train_pods_are_explained_from_the_schedulers_words(admin: kc.KubeClient, case: str) -> None:
    options, change, expected, unexpected = CASES[case]
    config = mf.with_launch_options(load_config(mf.CLUSTER_CONFIG), namespace=admin.namespace,
                                    image="registry.local/pneumonia:0.1.0", bucket="gs://bucket/pneumonia",
                                    run_id=f"pending-{case}", num_workers=1, **options)
    job = mf.stage_jobs(mf.build_manifests(mf.load_manifests(), config))["train"]
    if change is not None:
        change(job)
    admin.create_job(job)

    def refused_pod() -> tuple[Any, list[Any]] | None:
        for pod in admin.list_pods(f"{mf.LABEL_JOB_NAME}={job['metadata']['name']}"):
            events = [e for e in admin.pod_events(pod.metadata.name) if e.reason == "FailedScheduling"]
            if events:
                return pod, events
        return None

    pod, events = wait_for(refused_pod, 60, "the scheduler's FailedScheduling event")
    said = events[0].message
    explanation = st.explain_pending(pod, admin.pod_events(pod.metadata.name))
    assert explanation is not None and explanation.startswith(f"{pod.metadata.name} cannot be scheduled: ")
    assert expected in explanation, (said, explanation)
    if unexpected:
        assert unexpected not in explanation.split(". Scheduler: ")[0], (said, explanation)
    assert said in explanation  # the scheduler's own words follow the hint

    # The launcher prints the same while it follows the Job (one poll: the timeout is 0).
    out = io.StringIO()
    launcher = ln.Launcher(admin, [job], config, st.FollowOptions(poll_s=0, timeout_s=0), out)
    with pytest.raises(kc.LaunchError, match="still not finished"):
        launcher.follow("train", job)
    assert f"[train] {pod.metadata.name} cannot be scheduled: " in out.getvalue()
    assert expected in out.getvalue()
