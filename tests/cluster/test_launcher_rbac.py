"""The launcher (`python -m pneumonia.k8s`) against a real API server, as the identity manifests/ sets up
for it: a ServiceAccount bound to the Role of manifests/02-role.yaml, with a token from the TokenRequest
API. The real authorizer decides; the API server's audit log shows every request it made was allowed.
No kubelet runs the pods, so a run stops at its follow timeout with the preprocess pod Pending.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from cluster.kube import api_client, audited, delete_namespace, service_account_kubeconfig, unique_name
from cluster.testbed import Cluster
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from pneumonia.k8s.__main__ import main

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
LAUNCHER = "launcher"  # the ServiceAccount that runs the launcher (a CI identity, say)
RUN_ID = "20261206-103000-rbac"
pytestmark = pytest.mark.cluster


def setup_objects(namespace: str, account: str, role_rules: list[dict[str, Any]] | None = None) -> list[dict]:
    """What an admin applies once (00-03 of manifests/) in `namespace`, the RoleBinding's subject being
    ServiceAccount `account` (the manifest names a Google service account, which this cluster lacks)."""
    objects = []
    for name in ("00-namespace.yaml", "01-serviceaccount.yaml", "02-role.yaml", "03-rolebinding.yaml"):
        obj = yaml.safe_load((MANIFESTS / name).read_text())
        if obj["kind"] == "Namespace":
            obj["metadata"]["name"] = namespace
        else:
            obj["metadata"]["namespace"] = namespace
        if obj["kind"] == "RoleBinding":
            obj["subjects"] = [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
        if obj["kind"] == "Role" and role_rules is not None:
            obj["rules"] = role_rules
        objects.append(obj)
    objects.append({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": account, "namespace": namespace}})
    return objects


def role_rules() -> list[dict[str, Any]]:
    return copy.deepcopy(yaml.safe_load((MANIFESTS / "02-role.yaml").read_text())["rules"])


@pytest.fixture
def identity(kube_cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """(namespace, kubeconfig of the launcher's ServiceAccount); the Role's rules may be narrowed with
    @pytest.mark.parametrize('rules', ...) indirectly."""
    namespace = unique_name("launcher")
    rules = getattr(request, "param", None)
    kube_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(setup_objects(namespace, LAUNCHER, rules)))
    admin = api_client(kube_cluster.kubeconfig)
    try:
        yield namespace, service_account_kubeconfig(admin, kube_cluster.kubeconfig, namespace, LAUNCHER,
                                                    tmp_path / "launcher.kubeconfig")
    finally:
        delete_namespace(admin, namespace)


def launcher(kubeconfig: Path, namespace: str, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main([args[0], "--kubeconfig", str(kubeconfig), "--namespace", namespace, *args[1:]], out)
    return code, out.getvalue()


def test_launcher_runs_under_its_role_and_every_request_is_allowed(kube_cluster: Cluster,
                                                                   identity: tuple[str, Path]) -> None:
    namespace, kubeconfig = identity
    code, text = launcher(kubeconfig, namespace, "run", "--image", "registry.local/pneumonia:0.1.0",
                          "--bucket", "gs://bucket/pneumonia", "--workers", "2", "--run-id", RUN_ID,
                          "--poll-s", "1", "--timeout-s", "5")
    # Everything was created; following stops at --timeout-s since no kubelet runs the preprocess pod.
    assert code == EXIT_FAILURE, text
    for line in ("created ConfigMap pneumonia-config", "created Service pneumonia-train-workers",
                 "[preprocess] created Job pneumonia-preprocess", "[preprocess] still not finished after"):
        assert line in text, text

    code, text = launcher(kubeconfig, namespace, "status", "--run-id", RUN_ID)
    assert code == EXIT_OK and "[preprocess] running: 0/1 done; pods: 1 pending" in text, text
    code, text = launcher(kubeconfig, namespace, "logs", "--run-id", RUN_ID, "--stage", "preprocess")
    assert code == EXIT_FAILURE and "no started pod of pneumonia-preprocess yet" in text, text
    code, text = launcher(kubeconfig, namespace, "delete", "--run-id", RUN_ID, "--yes")
    assert code == EXIT_OK and "deleted Job pneumonia-preprocess" in text, text

    requests = audited(kube_cluster.audit_log, namespace, LAUNCHER)
    refused = {(verb, resource) for verb, resource, status in requests if status >= 400 and status != 404}
    # The one refusal is by design: the Role cannot grant reading the namespace (cluster-scoped), and
    # the launcher reads a 403 there as "may not tell" (client.namespace_exists).
    assert refused == {("get", "namespaces")}, requests
    made = {(verb, resource) for verb, resource, _ in requests}
    assert made >= {("create", "selfsubjectaccessreviews"), ("get", "serviceaccounts"), ("get", "jobs"),
                    ("create", "configmaps"), ("create", "services"), ("create", "jobs"), ("list", "pods"),
                    ("list", "events"), ("list", "jobs"), ("delete", "jobs")}, made


def test_a_call_outside_the_role_is_refused_by_the_authorizer(kube_cluster: Cluster,
                                                              identity: tuple[str, Path]) -> None:
    namespace, kubeconfig = identity
    api = api_client(kubeconfig)
    core, batch = kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)
    assert core.read_namespaced_service_account("pneumonia", namespace).metadata.name == "pneumonia"  # granted
    pod = {"metadata": {"name": "direct"}, "spec": {"containers": [{"name": "c", "image": "registry.local/x:1"}]}}
    outside = {
        'cannot list resource "secrets"': lambda: core.list_namespaced_secret(namespace),
        'cannot create resource "pods"': lambda: core.create_namespaced_pod(namespace, pod),
        'cannot patch resource "jobs"': lambda: batch.patch_namespaced_job("any", namespace, {"metadata": {}}),
        'cannot list resource "nodes"': lambda: core.list_node(),
    }
    for message, call in outside.items():
        with pytest.raises(ApiException) as refused:
            call()
        assert refused.value.status == 403, (message, refused.value.body)
        body = json.loads(refused.value.body)
        assert body["reason"] == "Forbidden" and message in body["message"], body
        assert f"system:serviceaccount:{namespace}:{LAUNCHER}" in body["message"]


def narrowed_role() -> list[dict[str, Any]]:
    """The Role of manifests/ without `create` on jobs and without pods/log."""
    rules = [rule for rule in role_rules() if rule["resources"] != ["pods/log"]]
    for rule in rules:
        if rule["resources"] == ["jobs"]:
            rule["verbs"].remove("create")
    return rules


@pytest.mark.parametrize("identity", [narrowed_role()], indirect=True, ids=["role-without-create-jobs-and-logs"])
def test_missing_access_stops_before_anything_is_created(kube_cluster: Cluster, identity: tuple[str, Path]) -> None:
    """The launcher's preflight (SelfSubjectAccessReview) agrees with the real RBAC: a Role short of two
    grants stops the run before anything is created, naming both (exit 2, a setup to fix)."""
    namespace, kubeconfig = identity
    code, text = launcher(kubeconfig, namespace, "run", "--image", "registry.local/pneumonia:0.1.0",
                          "--bucket", "gs://bucket/pneumonia", "--run-id", RUN_ID, "--timeout-s", "5")
    assert code == EXIT_BAD_INPUT, text
    assert f"your Kubernetes user may not create jobs.batch, get pods/log in namespace {namespace}" in text, text
    writes = {(verb, resource) for verb, resource, _ in audited(kube_cluster.audit_log, namespace, LAUNCHER)
              if verb not in ("get", "list", "watch")}
    assert writes == {("create", "selfsubjectaccessreviews")}, writes


def test_setup_creates_then_updates_the_namespace_objects_as_an_admin(kube_cluster: Cluster) -> None:
    """`run --setup` (an admin's once-only step) on the real server, twice: the first run creates the
    Namespace, ServiceAccount, Role and RoleBinding, the second patches the same objects (409, then
    the launcher's patch, which the server must accept for every kind) and attaches to the running Job."""
    namespace = unique_name("setup")
    admin = api_client(kube_cluster.kubeconfig)
    args = ["run", "--image", "registry.local/pneumonia:0.1.0", "--bucket", "gs://bucket/pneumonia",
            "--run-id", RUN_ID, "--setup", "--gsa", "pneumonia-pipeline@my-project.iam.gserviceaccount.com",
            "--poll-s", "1", "--timeout-s", "2"]
    try:
        code, first = launcher(kube_cluster.kubeconfig, namespace, *args)
        assert code == EXIT_FAILURE and "[preprocess] still not finished after" in first, first
        for kind, name in (("Namespace", namespace), ("ServiceAccount", "pneumonia"), ("Role", "pneumonia-launcher"),
                           ("RoleBinding", "pneumonia-launcher")):
            assert f"created {kind} {name}" in first, first
        code, second = launcher(kube_cluster.kubeconfig, namespace, *args)
        errors = [line for line in second.splitlines() if line.startswith("error:")]
        assert code == EXIT_FAILURE and len(errors) == 1 and "still not finished" in errors[0], second
        for kind, name in (("Namespace", namespace), ("ServiceAccount", "pneumonia"), ("Role", "pneumonia-launcher"),
                           ("RoleBinding", "pneumonia-launcher"), ("ConfigMap", "pneumonia-config")):
            assert f"updated {kind} {name}" in second, second
        assert "[preprocess] following the existing Job pneumonia-preprocess" in second, second
        core = kubernetes.client.CoreV1Api(admin)
        assert core.read_namespace(namespace).metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
        account = core.read_namespaced_service_account("pneumonia", namespace)
        assert account.metadata.annotations["iam.gke.io/gcp-service-account"] == \
            "pneumonia-pipeline@my-project.iam.gserviceaccount.com"
    finally:
        delete_namespace(admin, namespace)
