"""The kubelet stand-in (tests/cluster/kubelet.py) reports what its containers did, and only that.

Pods created through the real API server under Pod Security `restricted`, scheduled by the real
scheduler onto KWOK nodes, run as podman containers from the project's image: their status (phase,
conditions, exit code, reason, times) comes from the container; `kubectl logs` reads the container's
output through KWOK's kubelet endpoint; deleting a pod sends SIGTERM and SIGKILL only after its grace
period, then the pod object goes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes.client import CoreV1Api

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bed  # noqa: E402
import kube as cluster_kube  # noqa: E402
import train_job as kube  # noqa: E402
from fixtures import pod_bed  # noqa: E402, F401

POD_NAMESPACE_PREFIX = "kubelet-"  # the namespaces whose pods this module's kubelet runs
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]
TIMEOUT_S = 180


@pytest.fixture
def namespace(kube_cluster) -> str:  # noqa: ANN001
    """A namespace under Pod Security `restricted`, as the project's."""
    api = cluster_kube.api_client(kube_cluster.kubeconfig)
    name = cluster_kube.create_namespace(CoreV1Api(api), cluster_kube.unique_name("kubelet"))
    yield name
    cluster_kube.delete_namespace(api, name)


def pod(name: str, code: str, grace_s: int = 30) -> dict:
    """A pod of the project's image that Pod Security `restricted` admits, running `python -c code`."""
    security = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "probe"}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace_s,
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "main", "image": bed.IMAGE, "args": ["-c", code],
                                     "env": [{"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                             {"name": "MY_APP", "valueFrom": {"fieldRef": {
                                                 "fieldPath": "metadata.labels['app']"}}}],
                                     "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                                   "limits": {"memory": "512Mi"}},
                                     "securityContext": security}]}}


def create(kubeconfig: str, namespace: str, obj: dict) -> None:
    kube.apply(kubeconfig, [{**obj, "metadata": {**obj["metadata"], "namespace": namespace}}])


def read(kubeconfig: str, namespace: str, name: str) -> dict:
    return kube.get(kubeconfig, "-n", namespace, "pod", name)


def test_a_pods_status_and_logs_are_its_containers(kube_cluster, pod_bed: bed.PodNetworkBed, namespace: str):  # noqa: ANN001, F811
    kubeconfig = str(kube_cluster.kubeconfig)
    create(kubeconfig, namespace, pod("exits-3", "import os, sys; print('hello from', os.environ['MY_POD'], "
                                                 "os.environ['MY_APP'], os.getuid()); sys.exit(3)"))
    done = kube.wait_for(lambda: (p := read(kubeconfig, namespace, "exits-3"))["status"].get("phase") == "Failed" and p,
                         TIMEOUT_S, "the pod to fail")
    (container,) = done["status"]["containerStatuses"]
    terminated = container["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert terminated["startedAt"] <= terminated["finishedAt"] and container["containerID"].startswith("podman://")
    conditions = {c["type"]: c["status"] for c in done["status"]["conditions"]}
    assert conditions["Ready"] == "False" and conditions["PodScheduled"] == "True"
    assert done["status"]["podIP"] and done["spec"]["nodeName"].startswith("gke-local-")
    logs = kube.kubectl(kubeconfig, "-n", namespace, "logs", "exits-3")
    assert logs.strip() == "hello from exits-3 probe 10001"


def test_a_deleted_pod_gets_sigterm_then_sigkill_after_its_grace_period(kube_cluster, pod_bed: bed.PodNetworkBed,  # noqa: ANN001, F811
                                                                        namespace: str):
    kubeconfig = str(kube_cluster.kubeconfig)
    polite = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))\n"
              "print('running', flush=True)\ntime.sleep(600)")
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, lambda *a: print('ignoring SIGTERM', flush=True))\n"
                "print('running', flush=True)\ntime.sleep(600)")
    create(kubeconfig, namespace, pod("polite", polite))
    create(kubeconfig, namespace, pod("stubborn", stubborn, grace_s=8))

    def running(name: str) -> dict | None:
        found = read(kubeconfig, namespace, name)
        ready = {c["type"]: c["status"] for c in found["status"].get("conditions", [])}.get("Ready")
        return found if found["status"].get("phase") == "Running" and ready == "True" else None

    for name in ("polite", "stubborn"):
        live = kube.wait_for(lambda name=name: running(name), TIMEOUT_S, f"{name} to run")
        assert live["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        kube.wait_for(lambda name=name: "running" in kube.kubectl(kubeconfig, "-n", namespace, "logs", name),
                      60, f"{name}'s first line")
    files = {name: kube.pod_log_file(pod_bed, read(kubeconfig, namespace, name)) for name in ("polite", "stubborn")}
    started = time.monotonic()
    kube.kubectl(kubeconfig, "-n", namespace, "delete", "pod", "polite", "stubborn", "--wait=true", "--timeout=120s")
    waited = time.monotonic() - started
    assert "got SIGTERM" in files["polite"].read_text()
    assert "ignoring SIGTERM" in files["stubborn"].read_text()
    assert 8 <= waited < 60, waited  # the stubborn one was killed after its 8 s grace, not before


def test_fixed_addresses_of_finished_namespaces_are_given_back() -> None:
    """Every test's namespace takes fixed addresses for its Jobs' hostnames; once all are taken, those of
    namespaces with no running pod of this kubelet are given back, never one a running pod's peers know."""
    import kubelet as kubelet_module

    stand_in = object.__new__(kubelet_module.Kubelet)
    stand_in.network, stand_in.hosts, stand_in.fixed = "net", ["10.0.0.61", "10.0.0.62", "10.0.0.63"], {}
    stand_in.tracked = {"uid-a": kubelet_module.Tracked("live", "w-0", "c", "c", Path("log"), reported="running"),
                        "uid-b": kubelet_module.Tracked("done", "w-0", "c", "c", Path("log"), reported="terminated")}
    for key in (("live", "svc", "w-0"), ("done", "svc", "w-0"), ("done", "svc", "w-1")):
        stand_in.fixed[key] = stand_in.free_fixed_address()
    assert sorted(stand_in.fixed.values()) == stand_in.hosts
    stand_in.fixed[("next", "svc", "w-0")] = stand_in.free_fixed_address()
    assert stand_in.fixed == {("live", "svc", "w-0"): "10.0.0.61", ("next", "svc", "w-0"): "10.0.0.62"}
    stand_in.fixed[("next", "svc", "w-1")] = stand_in.free_fixed_address()
    stand_in.tracked["uid-b"].reported = "running"
    stand_in.tracked["uid-c"] = kubelet_module.Tracked("next", "w-0", "c", "c", Path("log"), reported="running")
    with pytest.raises(RuntimeError, match="all 3 fixed addresses"):
        stand_in.free_fixed_address()


def _connects(network: str, host: str, port: int) -> bool:
    """Whether a container of the image on `network` opens a TCP connection to host:port within 3 s."""
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=3).close()"
    return subprocess.run(["podman", "run", "--rm", "--network", network, bed.IMAGE, "-c", code],
                          capture_output=True, timeout=120, check=False).returncode == 0


def test_pods_reach_the_gateway_and_nothing_beyond(pod_bed) -> None:  # noqa: ANN001
    """The pods' network reaches this machine (the bucket stand-in on the gateway), not another network:
    a listener on podman's default network is reachable once the fence is lifted, and not with it."""
    import kubelet as kubelet_module

    server = f"{pod_bed.network}-outside"
    subprocess.run(["podman", "run", "-d", "--rm", "--name", server, "--network", "podman", bed.IMAGE,
                    "-m", "http.server", "8000"], capture_output=True, timeout=120, check=True)
    try:
        address = subprocess.run(["podman", "inspect", server, "--format", "{{.NetworkSettings.IPAddress}}"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        assert _connects("podman", address, 8000)  # it listens
        proxy = pod_bed.emulator.proxy_url.rsplit(":", 1)
        assert _connects(pod_bed.network, proxy[0].removeprefix("http://"), int(proxy[1]))
        assert not _connects(pod_bed.network, address, 8000)
        rule = kubelet_module.fence_rule(pod_bed.network)
        subprocess.run(["iptables", "-D", *rule], capture_output=True, timeout=60, check=True)
        try:
            assert _connects(pod_bed.network, address, 8000)  # so the fence is what stopped it
        finally:
            kubelet_module.ensure_network(pod_bed.network, bed.IMAGE)
        assert not _connects(pod_bed.network, address, 8000)
    finally:
        subprocess.run(["podman", "rm", "--force", "--time", "0", server], capture_output=True, timeout=120,
                       check=False)
