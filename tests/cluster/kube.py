"""Helpers for the tests that talk to the local control plane (tests/cluster/testbed.py): API clients,
throwaway namespaces under Pod Security `restricted`, ServiceAccount kubeconfigs from the TokenRequest
API, and bounded waits. Nothing here plays a controller or the kubelet: the cluster does its own work.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}


def api_client(kubeconfig: Path | str) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_namespace(core: kubernetes.client.CoreV1Api, name: str, accounts: tuple[str, ...] = ("pneumonia",)) -> str:
    """A namespace enforcing Pod Security `restricted`, as manifests/00-namespace.yaml does, holding the
    ServiceAccount(s) the pods run as (the ServiceAccount admission plugin refuses pods without theirs)."""
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    for account in accounts:
        core.create_namespaced_service_account(name, {"metadata": {"name": account},
                                                      "automountServiceAccountToken": False})
    return name


def delete_namespace(api: kubernetes.client.ApiClient, namespace: str, timeout_s: float = 30) -> None:
    """Deletes a test namespace without waiting for a kubelet: no kubelet ever confirms that a pod bound
    to a simulated node stopped, so its pods are removed at once (grace period 0) before the namespace."""
    core, batch = kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)
    for job in batch.list_namespaced_job(namespace).items:
        _ignore_absent(lambda job=job: batch.delete_namespaced_job(job.metadata.name, namespace,
                                                                   propagation_policy="Background"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(namespace).items
        if not pods:
            break
        for pod in pods:
            _ignore_absent(lambda pod=pod: core.delete_namespaced_pod(pod.metadata.name, namespace,
                                                                      grace_period_seconds=0))
        time.sleep(0.5)
    _ignore_absent(lambda: core.delete_namespace(namespace))


def service_account_kubeconfig(api: kubernetes.client.ApiClient, admin_kubeconfig: Path, namespace: str,
                               account: str, path: Path, expiration_s: int = 3600) -> Path:
    """A kubeconfig that authenticates as ServiceAccount `account` with a token from the TokenRequest API
    (no Secret), against the same server and CA as the admin kubeconfig."""
    request = kubernetes.client.CoreV1Api(api).create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": expiration_s}})
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    current = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = dict(next(c for c in admin["clusters"] if c["name"] == current["cluster"])["cluster"])
    if "certificate-authority" in cluster:  # inline the CA: the file may not be where the reader runs
        ca = Path(cluster.pop("certificate-authority")).read_bytes()
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    user = f"system:serviceaccount:{namespace}:{account}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": account,
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": request.status.token}}],
        "contexts": [{"name": account, "context": {"cluster": "local", "user": user, "namespace": namespace}}],
    }))
    return path


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    """Polls `condition` until it returns something truthy (returned) or `timeout_s` passes (AssertionError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _ignore_absent(call: Callable[[], Any]) -> None:
    try:
        call()
    except ApiException as error:
        if error.status != 404:
            raise


def audited(audit_log: Path, namespace: str, account: str, start: int = 0) -> list[tuple[str, str, int]]:
    """(verb, resource[/subresource], response code) of each request ServiceAccount `account` made, from the
    API server's audit log (tests/cluster/audit-policy.yaml records every ServiceAccount's requests),
    from byte `start` on (the log's size before a run: only that run's requests)."""
    user = f"system:serviceaccount:{namespace}:{account}"
    requests = []
    with Path(audit_log).open("rb") as log:
        log.seek(start)
        lines = log.read().decode().splitlines()
    for line in lines:
        event = json.loads(line)
        if event["user"]["username"] != user or event.get("stage") != "ResponseComplete":
            continue
        ref = event.get("objectRef", {})
        resource = ref.get("resource", event["requestURI"]) + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        requests.append((event["verb"], resource, event["responseStatus"]["code"]))
    return requests
