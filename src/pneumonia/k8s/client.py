"""The Kubernetes API calls the launcher makes, for one namespace: access checks, applying objects,
Jobs, pods, events and logs. Nothing here decides anything; `status`, `logs` and `launcher` do.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from pneumonia.errors import EXIT_BAD_INPUT


@dataclasses.dataclass(frozen=True)
class Access:
    """One (verb, resource) the launcher needs in the namespace; manifests/02-role.yaml grants exactly these."""

    verb: str
    group: str
    resource: str
    subresource: str = ""

    def __str__(self) -> str:
        resource = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {resource}" + (f".{self.group}" if self.group else "")


REQUIRED_ACCESS: tuple[Access, ...] = (
    Access("create", "batch", "jobs"), Access("get", "batch", "jobs"), Access("list", "batch", "jobs"),
    Access("delete", "batch", "jobs"),
    Access("get", "", "pods"), Access("list", "", "pods"), Access("get", "", "pods", "log"),
    Access("list", "", "events"),
    Access("get", "", "configmaps"), Access("create", "", "configmaps"), Access("patch", "", "configmaps"),
    Access("get", "", "services"), Access("create", "", "services"), Access("patch", "", "services"),
    Access("get", "", "serviceaccounts"),
)

# With cluster.queue_name: why a Job waits is written on its Kueue Workload, and the LocalQueue names
# the ClusterQueue whose quota it waits for (read-only; nothing cluster-wide).
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
KUEUE_ACCESS: tuple[Access, ...] = (
    Access("list", KUEUE_GROUP, "workloads"), Access("get", KUEUE_GROUP, "localqueues"),
)

# `--setup` also creates the namespace-wide objects (an admin's job, hence not in the Role).
SETUP_ACCESS: tuple[Access, ...] = (
    Access("create", "", "serviceaccounts"), Access("patch", "", "serviceaccounts"),
    Access("create", "rbac.authorization.k8s.io", "roles"), Access("patch", "rbac.authorization.k8s.io", "roles"),
    Access("create", "rbac.authorization.k8s.io", "rolebindings"),
    Access("patch", "rbac.authorization.k8s.io", "rolebindings"),
)


class LaunchError(Exception):
    """The launch cannot go on; the message says why and what to do. `exit_code` is the CLI's status."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class KubeClient:
    """The Kubernetes API calls the launcher makes, for one namespace (kubeconfig + context, kubeflow style)."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, namespace: str = "pneumonia",
                 api_client: kubernetes.client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                api_client = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
            except (kubernetes.config.ConfigException, OSError) as error:
                raise LaunchError(f"cannot load kubeconfig {kubeconfig or '(default)'}"
                                  f"{f' context {context}' if context else ''}: {error}") from None
        self.namespace = namespace
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)
        self.authz = kubernetes.client.AuthorizationV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)

    def denied(self, accesses: Iterable[Access]) -> list[Access]:
        """Which of `accesses` the current user lacks (SelfSubjectAccessReview: RBAC and GKE IAM alike)."""
        missing = []
        for access in accesses:
            attributes = {"namespace": self.namespace, "verb": access.verb, "group": access.group,
                          "resource": access.resource}
            if access.subresource:
                attributes["subresource"] = access.subresource
            review = self.authz.create_self_subject_access_review({
                "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                "spec": {"resourceAttributes": attributes}})
            if not review.status.allowed:
                missing.append(access)
        return missing

    def namespace_exists(self) -> bool | None:
        """True or False; None when this user may not read namespaces (a namespaced Role cannot grant it)."""
        try:
            self.core.read_namespace(self.namespace)
            return True
        except ApiException as error:
            if error.status == 404:
                return False
            if error.status == 403:
                return None
            raise

    def read_config_map(self, name: str) -> Any | None:
        return _absent_as_none(lambda: self.core.read_namespaced_config_map(name, self.namespace))

    def service_account_exists(self, name: str) -> bool:
        return _absent_as_none(lambda: self.core.read_namespaced_service_account(name, self.namespace)) is not None

    def apply(self, obj: dict[str, Any]) -> str:
        """Creates the object, or patches it if it exists; returns "created" or "updated"."""
        create, patch = self._writers(obj["kind"])
        name = obj["metadata"]["name"]
        try:
            create(obj)
            return "created"
        except ApiException as error:
            if error.status != 409:
                raise
        patch(name, obj)
        return "updated"

    def _writers(self, kind: str) -> tuple[Callable[[dict], Any], Callable[[str, dict], Any]]:
        ns = self.namespace
        table: dict[str, tuple[Callable[[dict], Any], Callable[[str, dict], Any]]] = {
            "Namespace": (lambda body: self.core.create_namespace(body),
                          lambda name, body: self.core.patch_namespace(name, body)),
            "ServiceAccount": (lambda body: self.core.create_namespaced_service_account(ns, body),
                               lambda name, body: self.core.patch_namespaced_service_account(name, ns, body)),
            "Role": (lambda body: self.rbac.create_namespaced_role(ns, body),
                     lambda name, body: self.rbac.patch_namespaced_role(name, ns, body)),
            "RoleBinding": (lambda body: self.rbac.create_namespaced_role_binding(ns, body),
                            lambda name, body: self.rbac.patch_namespaced_role_binding(name, ns, body)),
            "ConfigMap": (lambda body: self.core.create_namespaced_config_map(ns, body),
                          lambda name, body: self.core.patch_namespaced_config_map(name, ns, body)),
            "Service": (lambda body: self.core.create_namespaced_service(ns, body),
                        lambda name, body: self.core.patch_namespaced_service(name, ns, body)),
        }
        if kind not in table:
            raise LaunchError(f"the launcher does not apply {kind} objects; remove it from manifests/")
        return table[kind]

    def create_job(self, obj: dict[str, Any]) -> Any:
        return self.batch.create_namespaced_job(self.namespace, obj)

    def read_job(self, name: str) -> Any | None:
        return _absent_as_none(lambda: self.batch.read_namespaced_job(name, self.namespace))

    def list_jobs(self, label_selector: str) -> list[Any]:
        return list(self.batch.list_namespaced_job(self.namespace, label_selector=label_selector).items)

    def delete_job(self, name: str) -> bool:
        """Deletes a Job and (foreground propagation) its pods first; False if it was already gone."""
        try:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Foreground")
            return True
        except ApiException as error:
            if error.status == 404:
                return False
            raise

    def list_pods(self, label_selector: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(self.namespace, label_selector=label_selector).items)

    def pod_events(self, pod_name: str) -> list[Any]:
        selector = f"involvedObject.kind=Pod,involvedObject.name={pod_name}"
        return list(self.core.list_namespaced_event(self.namespace, field_selector=selector).items)

    def job_workloads(self, job_uid: str) -> list[dict[str, Any]]:
        """The Kueue Workloads of a Job (Kueue labels each with its Job's uid), as plain dicts."""
        found = self.custom.list_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, self.namespace, "workloads",
                                                          label_selector=f"kueue.x-k8s.io/job-uid={job_uid}")
        return list(found.get("items", []))

    def read_local_queue(self, name: str) -> dict[str, Any] | None:
        return _absent_as_none(lambda: self.custom.get_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, self.namespace, "localqueues", name))

    def read_log(self, pod_name: str, container: str | None = None, tail_lines: int | None = None,
                 timestamps: bool = False) -> str:
        return self.core.read_namespaced_pod_log(pod_name, self.namespace, container=container,
                                                 tail_lines=tail_lines, timestamps=timestamps)


def api_error(error: ApiException) -> str:
    """The API server's own message (a Status body) rather than the client's dump of the response."""
    message = ""
    try:
        message = json.loads(error.body or "{}").get("message", "")
    except (TypeError, ValueError):
        message = str(error.body or "")
    return f"the Kubernetes API answered {error.status} {error.reason}: {message or 'no message'}"


def _absent_as_none(call: Callable[[], Any]) -> Any | None:
    try:
        return call()
    except ApiException as error:
        if error.status == 404:
            return None
        raise
