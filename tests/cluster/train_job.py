"""Helpers for tests that run the project's Jobs on the local control plane with the kubelet stand-in:
the train Job at the tests' tiny size in a namespace of its own, its pods by index, their logs, faults.

Everything a test asserts about retries is read from the API (the Job's status, each pod's phase,
exit code and the Job controller's annotations); nothing here counts or decides anything.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import bed
import kube
import kubelet as kubelet_module
import yaml

from pneumonia.config import load_config
from pneumonia.k8s import manifests as mf

INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
FAILURE_COUNT = "batch.kubernetes.io/job-index-failure-count"
IGNORED_COUNT = "batch.kubernetes.io/job-index-ignored-failure-count"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# The test suite's tiny model and images (tests/test_train.py TINY), four epochs (a fault done in
# epoch 1 must land before the run ends: an epoch is a few steps), a stop agreed every
# 2 steps so a SIGTERM lands mid-epoch.
TINY = [
    "shard.image_height=32", "shard.image_width=32", "shard.channels=1", "shard.min_shards_per_split=2",
    "split.val_fraction=0.2", "model.name=small_cnn", "model.weights=none", "model.input_size=32",
    "model.dense_units=[16]", "train.epochs=4", "train.warmup_epochs=0", "train.per_replica_batch_size=8",
    "train.shuffle_buffer=64", "train.preemption_check_every_n_steps=2",
    "cluster.peer_wait_timeout_s=120", "cluster.upstream_wait_timeout_s=60",
]


def train_objects(namespace: str, root: str, run_id: str, image: str = bed.IMAGE, deadline_s: int = 1800,
                  sets: tuple[str, ...] = (), stages: tuple[str, ...] = ("train",),
                  train_args: list[str] | None = None) -> list[dict[str, Any]]:
    """The namespace (Pod Security restricted), the pods' ServiceAccount, the Roles and RoleBindings (the
    launcher's names a user this cluster lacks), the ConfigMap, the headless Service and the Jobs of
    `stages` from manifests/, patched as the launcher patches them for this
    config (`sets`: more config keys); `train_args` replaces the train container's args."""
    config = load_config(None, [f"data.root={root}", f"train.run_id={run_id}", *TINY, *sets])
    config = mf.with_launch_options(config, image=image, namespace=namespace, num_workers=2)
    objects = mf.build_manifests(mf.load_manifests(), config)
    kinds = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service"}
    chosen = [obj for obj in objects if obj["kind"] in kinds or mf.job_stage(obj) in stages]
    for obj in chosen:
        if obj["kind"] == "Job":
            # A bound for the test, far above its run: the Job's own deadline, never the test's clock.
            obj["spec"]["activeDeadlineSeconds"] = deadline_s
        if mf.job_stage(obj) == "train" and train_args is not None:
            mf.pod_spec(obj)["containers"][0]["args"] = train_args
    return chosen


def apply(kubeconfig: str, objects: list[dict[str, Any]]) -> None:
    kubectl(kubeconfig, "apply", "-f", "-", input=yaml.safe_dump_all(objects))


def kubectl(kubeconfig: str, *args: str, input: str | None = None, check: bool = True) -> str:
    from local import kubectl_binary

    result = subprocess.run([kubectl_binary(), "--kubeconfig", kubeconfig, *args], input=input, capture_output=True,
                            text=True, timeout=120, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def get(kubeconfig: str, *args: str) -> dict[str, Any]:
    return json.loads(kubectl(kubeconfig, "get", *args, "-o", "json"))


def job(kubeconfig: str, namespace: str, name: str) -> dict[str, Any]:
    return get(kubeconfig, "-n", namespace, "job", name)


def job_ending(status: dict[str, Any]) -> tuple[str, str] | None:
    """(Complete | Failed, reason) once the Job has ended, else None."""
    for condition in status.get("conditions", []):
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return condition["type"], condition.get("reason", "")
    return None


def pods_by_index(kubeconfig: str, namespace: str, job_name: str) -> dict[int, list[dict[str, Any]]]:
    """Every pod of the Job still in the API, by completion index, oldest first."""
    listing = get(kubeconfig, "-n", namespace, "pods", "-l", f"{JOB_NAME_LABEL}={job_name}")
    found: dict[int, list[dict[str, Any]]] = {}
    for pod in listing["items"]:
        found.setdefault(int(pod["metadata"]["annotations"][INDEX_ANNOTATION]), []).append(pod)
    for attempts in found.values():
        attempts.sort(key=lambda pod: pod["metadata"]["creationTimestamp"] + pod["metadata"]["name"])
    return found


class PodRecorder:
    """Every version of a Job's pods that the API server sends (a watch, from creation on): a pod that is
    deleted once it ended (evicted, lost with its node: the kubelet or the pod GC removes it) can still
    be read as it last was."""

    def __init__(self, kubeconfig: str, namespace: str, job_name: str) -> None:
        from kubernetes import client, config

        self.api = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
        self.namespace, self.selector = namespace, f"{JOB_NAME_LABEL}={job_name}"
        self.latest: dict[str, dict[str, Any]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._record, daemon=True)
        self.thread.start()

    def _record(self) -> None:
        from kubernetes import watch

        version = None
        while not self.stopping.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.api.list_namespaced_pod, self.namespace, label_selector=self.selector,
                                           timeout_seconds=20, resource_version=version):
                    pod = self.api.api_client.sanitize_for_serialization(event["object"])
                    self.latest[pod["metadata"]["uid"]] = pod
                    if self.stopping.is_set():
                        break
                version = stream.resource_version
            except Exception:  # noqa: BLE001 - a dropped or expired watch: start again, from the start if need be
                version = None
                time.sleep(1)

    def by_index(self) -> dict[int, list[dict[str, Any]]]:
        """Every pod seen, by completion index, oldest first."""
        found: dict[int, list[dict[str, Any]]] = {}
        for pod in list(self.latest.values()):
            found.setdefault(int(pod["metadata"]["annotations"][INDEX_ANNOTATION]), []).append(pod)
        for attempts in found.values():
            attempts.sort(key=lambda pod: (pod["metadata"]["creationTimestamp"], pod["metadata"]["name"]))
        return found

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def exit_code(pod: dict[str, Any]) -> int | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        terminated = status.get("state", {}).get("terminated")
        if terminated:
            return terminated["exitCode"]
    return None


def has_condition(pod: dict[str, Any], kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def counts(pod: dict[str, Any]) -> tuple[int, int]:
    """(failures counted, failures ignored) of the pod's index before it, as the Job controller wrote them."""
    annotations = pod["metadata"].get("annotations", {})
    return int(annotations.get(FAILURE_COUNT, 0)), int(annotations.get(IGNORED_COUNT, 0))


def pod_log_file(testbed: bed.PodNetworkBed, pod: dict[str, Any]) -> Path:
    meta = pod["metadata"]
    container = pod["spec"]["containers"][0]["name"]
    return testbed.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}" / f"{container}.log"


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events of a container log in CRI format (`<time> <stream> <P|F> <text>`; P: a partial line)."""
    from test_train import events

    if not path.exists():
        return []
    text = ""
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            text += parts[3] + ("" if parts[2] == "P" else "\n")
    return events(text)


def saw(testbed: bed.PodNetworkBed, pod: dict[str, Any], event: str, **fields: Any) -> bool:
    return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
               for e in log_events(pod_log_file(testbed, pod)))


def container_name(testbed: bed.PodNetworkBed, pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    return kubelet_module.container_name(testbed.network, meta["namespace"], meta["name"], meta["uid"])


def signal_container(testbed: bed.PodNetworkBed, pod: dict[str, Any], signal: str) -> None:
    subprocess.run(["podman", "kill", "--signal", signal, container_name(testbed, pod)], check=True, timeout=60,
                   capture_output=True)


def wait_for(condition, timeout_s: float, what: str):  # noqa: ANN001, ANN201
    """kube.wait_for at a pace that suits kubectl calls (each one is a process on a 2-core machine)."""
    return kube.wait_for(condition, timeout_s, what, poll_s=2.0)


def summary(kubeconfig: str, namespace: str, job_name: str, pods: dict[int, list[dict[str, Any]]] | None = None) -> str:
    """Each pod (index, phase, exit, counts, DisruptionTarget) and the Job's status, for failure messages."""
    lines = []
    for index, attempts in sorted((pods or pods_by_index(kubeconfig, namespace, job_name)).items()):
        for pod in attempts:
            lines.append(f"index {index} {pod['metadata']['name']}: {pod['status'].get('phase')} exit {exit_code(pod)} "
                         f"counts {counts(pod)} disruption {has_condition(pod, 'DisruptionTarget')}")
    status = job(kubeconfig, namespace, job_name).get("status", {})
    lines.append("job status: " + json.dumps({k: v for k, v in status.items() if k != "uncountedTerminatedPods"}))
    return "\n".join(lines)
