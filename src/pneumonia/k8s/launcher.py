"""The launcher's Kubernetes side: check access, apply the run's objects, create the stage Jobs one by one,
follow them with a readable status line, explain Pending pods and failures, stream the chief's log.

Objects come ready-made from `pneumonia.k8s.manifests` (pure); this module only talks to the API.
Every wait is bounded; the poll interval, sleep and clock are injectable so tests run instantly.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

from pneumonia.config import RECORDED, PipelineConfig, declared_keys
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED
from pneumonia.k8s import manifests as mf
from pneumonia.logs import get_logger

log = get_logger(__name__)

EXIT_INTERRUPTED = 130


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


@dataclasses.dataclass
class FollowOptions:
    """How the launcher waits. `timeout_s` None: each Job's activeDeadlineSeconds plus `grace_s`."""

    poll_s: float = 10.0
    timeout_s: float | None = None
    grace_s: float = 600.0
    heartbeat_s: float = 300.0  # repeat an unchanged status line this often, so a quiet run looks alive
    delete_timeout_s: float = 300.0
    log_tail_lines: int = 1000  # log lines read per poll (a cap on memory, not on what is shown)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


# --- pure readers of Job and pod status -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JobState:
    phase: str  # running, suspended, complete, failed
    reason: str = ""
    message: str = ""

    @property
    def done(self) -> bool:
        return self.phase in ("complete", "failed")


def job_state(job: Any) -> JobState:
    """Complete / Failed (or their 1.31+ forerunners SuccessCriteriaMet / FailureTarget) / Suspended."""
    true = {c.type: c for c in (job.status.conditions or []) if c.status == "True"} if job.status else {}
    for kind, phase in (("Failed", "failed"), ("FailureTarget", "failed"), ("Complete", "complete"),
                        ("SuccessCriteriaMet", "complete"), ("Suspended", "suspended")):
        if kind in true:
            return JobState(phase, true[kind].reason or "", true[kind].message or "")
    return JobState("running")


def pod_index(pod: Any) -> str:
    labels = pod.metadata.labels or {}
    return labels.get(mf.LABEL_COMPLETION_INDEX, "")


def status_line(stage: str, job: Any, pods: list[Any], state: JobState, elapsed_s: float) -> str:
    """One line: the stage, its state, pods by phase, completions, elapsed time."""
    phases: dict[str, int] = {}
    for pod in pods:
        phase = pod.status.phase if pod.status and pod.status.phase else "Pending"
        phases[phase] = phases.get(phase, 0) + 1
    completions = job.spec.completions if job.spec and job.spec.completions else 1
    succeeded = (job.status.succeeded or 0) if job.status else 0
    counts = ", ".join(f"{count} {phase.lower()}" for phase, count in sorted(phases.items())) or "no pods yet"
    text = f"[{stage}] {state.phase}: {succeeded}/{completions} done; pods: {counts}"
    if state.reason:
        text += f" ({state.reason})"
    return f"{text}  {_duration(elapsed_s)}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def explain_pending(pod: Any, events: list[Any]) -> str | None:
    """Why a pod is not running yet, in words, from its conditions, container states and events."""
    if pod.status is None or pod.status.phase not in (None, "Pending"):
        return None
    name = pod.metadata.name
    messages = []
    for condition in pod.status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.message:
            messages.append(condition.message)
    for event in events:
        if event.reason in ("FailedScheduling", "NotTriggerScaleUp") and event.message:
            messages.append(event.message)
    if messages:
        hints = _scheduling_hints(" ".join(messages))
        scaling = [e.message for e in events if e.reason == "TriggeredScaleUp" and e.message]
        if scaling:
            hints.append(f"the cluster autoscaler is adding a node ({scaling[-1]}); this takes minutes")
        return f"{name} cannot be scheduled: {'; '.join(hints)}. Scheduler: {messages[0]}"
    statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
    for status in statuses:
        waiting = status.state.waiting if status.state else None
        if waiting is None or waiting.reason in (None, "ContainerCreating", "PodInitializing"):
            continue
        if waiting.reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
            return (f"{name} cannot pull image {status.image}: {waiting.message or waiting.reason}. Check the "
                    "tag exists and that the nodes' service account can read the registry")
        return f"{name} is waiting: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
    for event in events:
        if event.type == "Warning" and event.message:
            return f"{name} is pending: {event.reason}: {event.message}"
    return None


def _scheduling_hints(message: str) -> list[str]:
    hints = []
    if f"Insufficient {mf.GPU_RESOURCE}" in message:
        hints.append(f"not enough free {mf.GPU_RESOURCE}: the GPU node pool is full, at its maximum size, "
                     "out of regional GPU quota, or still scaling up")
    if "untolerated taint" in message:
        hints.append("nodes carry a taint the pod does not tolerate (see the taints the scheduler lists)")
    if "node affinity/selector" in message or "node(s) didn't match" in message:
        hints.append(f"no node has the pod's node labels: is there a node pool with the GPU type "
                     f"({mf.GPU_NODE_LABEL}) the run asks for? (--gpu-type)")
    for resource in ("cpu", "memory", "ephemeral-storage"):
        if f"Insufficient {resource}" in message:
            hints.append(f"no node has enough free {resource} for the pod's requests")
    if "max node group size reached" in message or "max cluster" in message:
        hints.append("the autoscaler reached the node pool's maximum size")
    return hints or ["the scheduler found no node (message below)"]


def failed_container(pod: Any) -> tuple[str, int, str, str] | None:
    """(container, exit code, reason, message) of the pod's first container that exited non-zero."""
    for status in (pod.status.container_statuses or []) if pod.status else []:
        terminated = status.state.terminated if status.state else None
        if terminated is not None and terminated.exit_code:
            return status.name, terminated.exit_code, terminated.reason or "", (terminated.message or "").strip()
    return None


def matching_rule(policy: Any, pod: Any) -> tuple[int, Any] | None:
    """The podFailurePolicy rule (1-based number, rule) the Job controller applies to a failed pod: first match."""
    if policy is None:
        return None
    conditions = {c.type for c in (pod.status.conditions or []) if c.status == "True"} if pod.status else set()
    exits = [(s.name, s.state.terminated.exit_code) for s in (pod.status.container_statuses or [])
             if s.state and s.state.terminated and s.state.terminated.exit_code] if pod.status else []
    for number, rule in enumerate(policy.rules or [], start=1):
        if rule.on_pod_conditions and any(c.type in conditions for c in rule.on_pod_conditions):
            return number, rule
        requirement = rule.on_exit_codes
        if requirement is not None:
            for container, code in exits:
                if requirement.container_name and requirement.container_name != container:
                    continue
                if (code in requirement.values) == (requirement.operator == "In"):
                    return number, rule
    return None


def describe_rule(number: int, rule: Any) -> str:
    if rule.on_exit_codes is not None:
        when = f"exit code {rule.on_exit_codes.operator} {list(rule.on_exit_codes.values)}"
    else:
        when = "pod condition " + ", ".join(c.type for c in rule.on_pod_conditions or [])
    return f"podFailurePolicy rule #{number}: {rule.action} on {when}"


_EXIT_HINTS = {
    EXIT_BAD_INPUT: "bad input or config: fix what the log says; retrying cannot help",
    EXIT_PREEMPTED: "stopped after saving a backup (preemption); replaced without counting",
    137: "killed (SIGKILL), usually out of memory: raise the memory limit or lower the batch size",
    EXIT_FAILURE: "an unexpected error (see the log); retried up to the backoff limit",
}
_JOB_REASON_HINTS = {
    "PodFailurePolicy": "a podFailurePolicy rule failed the Job at once",
    "BackoffLimitExceeded": "the pods failed more often than backoffLimit allows",
    "FailedIndexes": "an index ran out of its retries (backoffLimitPerIndex)",
    "MaxFailedIndexesExceeded": "more indexes failed than maxFailedIndexes allows",
    "DeadlineExceeded": "the Job ran longer than activeDeadlineSeconds (a stage waiting for its upstream counts)",
}


def failure_report(stage: str, job: Any, pods: list[Any], state: JobState) -> list[str]:
    """What failed and why: the Job's condition, then each failed pod with its exit code and matching rule."""
    lines = [f"[{stage}] Job {job.metadata.name} failed: {state.reason or 'Failed'}"
             + (f" ({_JOB_REASON_HINTS[state.reason]})" if state.reason in _JOB_REASON_HINTS else "")]
    if state.message:
        lines.append(f"  {state.message}")
    failed = [pod for pod in pods if pod.status and pod.status.phase == "Failed"]
    for pod in failed[-5:]:
        exited = failed_container(pod)
        index = pod_index(pod)
        where = f"pod {pod.metadata.name}" + (f" (index {index})" if index else "")
        if exited is None:
            reason = pod.status.reason or "no container exit code"
            lines.append(f"  {where}: {reason}: {pod.status.message or ''}".rstrip(": "))
        else:
            container, code, reason, message = exited
            hint = _EXIT_HINTS.get(code, "")
            lines.append(f"  {where}: container {container} exited {code}"
                         + (f" ({reason})" if reason else "") + (f": {hint}" if hint else ""))
            if message:
                lines.append(f"    termination message: {message}")
        rule = matching_rule(job.spec.pod_failure_policy if job.spec else None, pod)
        if rule is not None:
            lines.append(f"    {describe_rule(*rule)}")
    return lines


class LogCursor:
    """Remembers how far a pod's log was printed, so polling `tail` reads prints each line once.

    Lines carry the kubelet's timestamps (timestamps=True); a line is new when its timestamp is
    later than the last one printed, or equal but beyond the lines already printed with it.
    """

    def __init__(self) -> None:
        self.pod = ""
        self.last_stamp = ""
        self.count_at_last = 0

    def new_lines(self, pod: str, text: str) -> list[str]:
        if pod != self.pod:
            self.pod, self.last_stamp, self.count_at_last = pod, "", 0
        fresh = []
        seen_at_last = 0
        for line in text.splitlines():
            stamp, _, body = line.partition(" ")
            if stamp < self.last_stamp:
                continue
            if stamp == self.last_stamp:
                seen_at_last += 1
                if seen_at_last <= self.count_at_last:
                    continue
            fresh.append((stamp, body))
        for stamp, _ in fresh:
            if stamp == self.last_stamp:
                self.count_at_last += 1
            else:
                self.last_stamp, self.count_at_last = stamp, 1
        return [body for _, body in fresh]


# --- the launcher -------------------------------------------------------------------------------

@dataclasses.dataclass
class Launcher:
    """One run: its objects (already patched), its config, where to print, how to wait and ask."""

    client: KubeClient
    objects: list[dict[str, Any]]
    config: PipelineConfig
    options: FollowOptions = dataclasses.field(default_factory=FollowOptions)
    out: TextIO = sys.stdout
    confirm: Callable[[str], bool] = lambda question: _ask(question)

    @property
    def run_id(self) -> str:
        return self.config.train.run_id

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, *, setup: bool = False, archive: str | None = None,
            upload: Callable[[str, str], Any] | None = None) -> int:
        """Preflight, upload, apply, then each stage in order; returns the CLI exit status."""
        jobs = mf.stage_jobs(self.objects)
        try:
            self.preflight(jobs, setup)
            attached = self.clear_old_jobs(jobs)
            if any(not state.done for state in attached.values()):
                self.check_same_config()
            if archive and upload is not None:
                self.say(f"uploading {archive} -> {self.config.data.archive}")
                upload(archive, self.config.data.archive)
            for obj in self.objects:
                if obj["kind"] == "Job" or (obj["kind"] in mf.SETUP_KINDS and not setup):
                    continue
                action = self.client.apply(obj)
                self.say(f"{action} {obj['kind']} {obj['metadata']['name']}")
            for stage, job in jobs.items():
                name = job["metadata"]["name"]
                if name in attached:
                    self.say(f"[{stage}] following the existing Job {name} of run {self.run_id}")
                else:
                    self.client.create_job(job)
                    self.say(f"[{stage}] created Job {name}")
                state = self.follow(stage, job)
                if state.phase != "complete":
                    return EXIT_FAILURE
        except KeyboardInterrupt:
            self.say("")
            if self.confirm(f"Delete the Jobs of run {self.run_id} (and their pods)? [y/N] "):
                for name in delete_run(self.client, self.run_id, self.say):
                    log.info("deleted job", job=name)
            else:
                self.say(f"left running; follow with: python -m pneumonia.k8s status --run-id {self.run_id}")
            return EXIT_INTERRUPTED
        except LaunchError as error:
            self.say(f"error: {error}")
            return error.exit_code
        except ApiException as error:
            self.say(f"error: {api_error(error)}")
            return EXIT_BAD_INPUT if error.status in (400, 403, 404, 409, 422) else EXIT_FAILURE
        self.print_report()
        return EXIT_OK

    def preflight(self, jobs: dict[str, dict[str, Any]], setup: bool) -> None:
        needed = REQUIRED_ACCESS + (SETUP_ACCESS if setup else ())
        denied = self.client.denied(needed)
        if denied:
            raise LaunchError(f"your Kubernetes user may not {', '.join(map(str, denied))} in namespace "
                              f"{self.client.namespace}: bind the Role in manifests/02-role.yaml to it "
                              "(manifests/03-rolebinding.yaml) or use an account with roles/container.developer")
        exists = self.client.namespace_exists()
        if exists is False and not setup:
            raise LaunchError(f"namespace {self.client.namespace} does not exist: run once with --setup, or "
                              "kubectl apply -f manifests/00-namespace.yaml -f manifests/01-serviceaccount.yaml")
        if not setup:
            for account in sorted({mf.pod_spec(job).get("serviceAccountName", "default") for job in jobs.values()}):
                if not self.client.service_account_exists(account):
                    raise LaunchError(f"ServiceAccount {account} is missing in namespace {self.client.namespace}: "
                                      "run once with --setup, or kubectl apply -f manifests/01-serviceaccount.yaml")

    def clear_old_jobs(self, jobs: dict[str, dict[str, Any]]) -> dict[str, JobState]:
        """Job names are fixed, so another run's Jobs must go first: finished ones are deleted, running
        ones stop the launch (the ConfigMap they read would change under them). This run's failed
        Jobs are deleted too, to be created again: that is what resuming a run means (training goes on
        from the run's backup in the bucket). Returns this run's other existing Jobs (name -> state),
        which the launcher follows instead of creating."""
        attached: dict[str, JobState] = {}
        doomed: list[tuple[str, str]] = []  # (Job name, why it goes)
        for stage, job in jobs.items():
            name = job["metadata"]["name"]
            existing = self.client.read_job(name)
            if existing is None:
                continue
            owner = (existing.metadata.labels or {}).get(mf.LABEL_INSTANCE, "")
            state = job_state(existing)
            if owner == self.run_id and state.phase == "failed":
                doomed.append((name, f"[{stage}] the Job {name} of run {owner} failed earlier "
                                     f"({state.reason or 'no reason'}); deleting it to run it again"))
            elif owner == self.run_id:
                attached[name] = state
            elif not state.done:
                raise LaunchError(f"Job {name} of run {owner or '(unlabelled)'} is still running; wait for it or "
                                  f"delete it: python -m pneumonia.k8s delete --run-id {owner}")
            else:
                doomed.append((name, f"deleting the finished Job {name} of run {owner} (its outputs stay in the "
                                     "bucket)"))
        for name, why in doomed:
            self.say(why)
            self.client.delete_job(name)
        for name, _ in doomed:
            self._wait_gone(name)
        return attached

    def check_same_config(self) -> None:
        """Attaching to this run's active Jobs: their pods (and every retry) read the live ConfigMap, so
        it must not change under them (e.g. --workers 3 under 2 running workers makes retries exit 2)."""
        configmap = next((obj for obj in self.objects if obj["kind"] == "ConfigMap"), None)
        if configmap is None:
            return
        live = self.client.read_config_map(configmap["metadata"]["name"])
        if live is None:
            return
        # What no pod reads (config.py: resume=RECORDED, e.g. cluster.image, fixed in the Jobs) may
        # differ, so following a run from a newer checkout (a new image tag) works.
        differences = config_differences((live.data or {}).get(mf.CONFIG_MAP_KEY, ""),
                                         configmap["data"][mf.CONFIG_MAP_KEY], ignore=declared_keys(resume=(RECORDED,)))
        if differences:
            raise LaunchError(
                f"run {self.run_id} is already running with a different config; its pods read ConfigMap "
                f"{configmap['metadata']['name']}, which these flags would change: {'; '.join(differences)}. "
                f"Re-run with the same flags to follow it, or start a new run (another --run-id, or none) "
                f"once it is done or deleted: python -m pneumonia.k8s delete --run-id {self.run_id}")

    def _wait_gone(self, name: str) -> None:
        deadline = self.options.clock() + self.options.delete_timeout_s
        while self.client.read_job(name) is not None:
            if self.options.clock() >= deadline:
                raise LaunchError(f"Job {name} is still being deleted after {self.options.delete_timeout_s:.0f} s; "
                                  "try again in a minute", EXIT_FAILURE)
            self.options.sleep(self.options.poll_s)

    def follow(self, stage: str, job_obj: dict[str, Any]) -> JobState:
        """Polls the Job and its pods until it finishes (bounded); prints status, Pending reasons, chief logs."""
        name = job_obj["metadata"]["name"]
        options = self.options
        limit = options.timeout_s
        if limit is None:
            limit = job_obj["spec"].get("activeDeadlineSeconds", 86400) + options.grace_s
        start = options.clock()
        cursor = LogCursor()
        last_line, last_printed, explained = "", float("-inf"), {}
        while True:
            job = self.client.read_job(name)
            if job is None:
                raise LaunchError(f"Job {name} disappeared (deleted, or removed by ttlSecondsAfterFinished)",
                                  EXIT_FAILURE)
            pods = self.client.list_pods(f"{mf.LABEL_JOB_NAME}={name}")
            state = job_state(job)
            now = options.clock()
            line = status_line(stage, job, pods, state, now - start)
            if line.rsplit("  ", 1)[0] != last_line or now - last_printed >= options.heartbeat_s:
                self.say(line)
                last_line, last_printed = line.rsplit("  ", 1)[0], now
            for pod in pods:
                if pod.status and pod.status.phase not in (None, "Pending"):
                    explained.pop(pod.metadata.name, None)
                    continue
                reason = explain_pending(pod, self.client.pod_events(pod.metadata.name))
                if reason and explained.get(pod.metadata.name) != reason:
                    self.say(f"[{stage}] {reason}")
                    explained[pod.metadata.name] = reason
            if stage == "train":
                self._stream_chief_log(pods, cursor)
            if state.done:
                if state.phase == "failed":
                    for text in failure_report(stage, job, pods, state):
                        self.say(text)
                    self._print_failed_log(stage, pods)
                else:
                    self.say(f"[{stage}] complete")
                return state
            if now - start >= limit:
                raise LaunchError(f"[{stage}] still not finished after {_duration(limit)}; it keeps running: "
                                  f"python -m pneumonia.k8s status --run-id {self.run_id}", EXIT_FAILURE)
            options.sleep(options.poll_s)

    def _stream_chief_log(self, pods: list[Any], cursor: LogCursor) -> None:
        chief = newest_started([pod for pod in pods if pod_index(pod) == "0"])
        if chief is None:
            return
        try:
            text = self.client.read_log(chief.metadata.name, container="train",
                                        tail_lines=self.options.log_tail_lines, timestamps=True)
        except ApiException as error:
            log.debug("chief log not readable yet", pod=chief.metadata.name, status=error.status)
            return
        for body in cursor.new_lines(chief.metadata.name, text):
            self.say(f"[train-0] {body}")

    def _print_failed_log(self, stage: str, pods: list[Any]) -> None:
        failed = [pod for pod in pods if pod.status and pod.status.phase == "Failed"]
        if not failed:
            return
        pod = failed[-1]
        try:
            text = self.client.read_log(pod.metadata.name, tail_lines=20)
        except ApiException:
            return
        self.say(f"  last log lines of {pod.metadata.name}:")
        for line in text.splitlines():
            self.say(f"    {line}")

    def print_report(self, read_json: Callable[[str], Any] | None = None) -> None:
        """The report's bucket paths and its headline metrics (read through pneumonia.storage)."""
        from pneumonia import storage  # TensorFlow comes with it: imported only when a run finished
        from pneumonia.layout import Layout

        report = Layout.of(self.config).report(self.run_id)
        metrics_path = storage.join(report, "metrics.json")
        self.say(f"run {self.run_id} finished; report: {storage.join(report, 'report.md')}")
        self.say(f"metrics: {metrics_path}")
        try:
            metrics = (read_json or storage.read_json)(metrics_path)
        except Exception as error:  # noqa: BLE001 - the run is done; a missing report is a remark, not a failure
            self.say(f"could not read the metrics ({type(error).__name__}: {error})")
            return
        headline = {key: metrics[key] for key in ("accuracy", "cohen_kappa", "macro_f1") if key in metrics}
        if not headline:
            self.say(f"metrics.json has none of accuracy, cohen_kappa, macro_f1; keys: {', '.join(sorted(metrics))}")
        for key, value in headline.items():
            self.say(f"  {key}: {value:.4f}" if isinstance(value, (int, float)) else f"  {key}: {value}")


def config_differences(live_text: str, new_text: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """The config keys (section.key), less `ignore`, whose values differ between two rendered config.yaml texts."""
    def flat(text: str) -> dict[str, Any]:
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            return {"(config.yaml)": "unreadable"}
        if not isinstance(tree, dict):
            return {"(config.yaml)": tree}
        items: dict[str, Any] = {}
        for section, values in tree.items():
            if isinstance(values, dict):
                items.update({f"{section}.{key}": value for key, value in values.items()})
            else:
                items[str(section)] = values
        return items

    live, new = flat(live_text), flat(new_text)
    return [f"{key}: {live.get(key, '(unset)')} running, {new.get(key, '(unset)')} requested"
            for key in sorted(set(live) | set(new)) if live.get(key) != new.get(key) and key not in ignore]


def newest_started(pods: list[Any]) -> Any | None:
    """The most recently created pod that has started (has a log), or None."""
    started = [pod for pod in pods if pod.status and pod.status.phase in ("Running", "Succeeded", "Failed")]
    return max(started, key=_created, default=None)


def _created(pod: Any) -> float:
    stamp = pod.metadata.creation_timestamp
    return stamp.timestamp() if stamp is not None else 0.0


def run_selector(run_id: str | None = None) -> str:
    selector = f"{mf.LABEL_NAME}={mf.APP_NAME}"
    return selector + (f",{mf.LABEL_INSTANCE}={run_id}" if run_id else "")


def _stage_order(job: Any) -> int:
    stage = (job.metadata.labels or {}).get(mf.LABEL_COMPONENT, "")
    return mf.STAGES.index(stage) if stage in mf.STAGES else len(mf.STAGES)


def delete_run(client: KubeClient, run_id: str, say: Callable[[str], None]) -> list[str]:
    """Deletes the run's Jobs (foreground: their pods go first); returns the names deleted."""
    deleted = []
    for job in sorted(client.list_jobs(run_selector(run_id)), key=_stage_order):
        if client.delete_job(job.metadata.name):
            say(f"deleted Job {job.metadata.name}")
            deleted.append(job.metadata.name)
    if not deleted:
        say(f"no Jobs of run {run_id} in namespace {client.namespace}")
    return deleted


def show_status(client: KubeClient, run_id: str | None, out: TextIO = sys.stdout) -> int:
    """Every stage of a run (or a line per run when no run id is given), with reasons for what is stuck."""
    jobs = client.list_jobs(run_selector(run_id))
    if not jobs:
        print(f"no pipeline Jobs{f' of run {run_id}' if run_id else ''} in namespace {client.namespace}", file=out)
        return EXIT_FAILURE if run_id else EXIT_OK
    if run_id is None:
        runs: dict[str, list[str]] = {}
        for job in sorted(jobs, key=_stage_order):
            owner = (job.metadata.labels or {}).get(mf.LABEL_INSTANCE, "?")
            stage = (job.metadata.labels or {}).get(mf.LABEL_COMPONENT, job.metadata.name)
            runs.setdefault(owner, []).append(f"{stage} {job_state(job).phase}")
        for owner, stages in runs.items():
            print(f"{owner}: {', '.join(stages)}", file=out)
        return EXIT_OK
    worst = EXIT_OK
    for job in sorted(jobs, key=_stage_order):
        stage = (job.metadata.labels or {}).get(mf.LABEL_COMPONENT, job.metadata.name)
        pods = client.list_pods(f"{mf.LABEL_JOB_NAME}={job.metadata.name}")
        state = job_state(job)
        print(status_line(stage, job, pods, state, _age(job)), file=out)
        for pod in pods:
            reason = explain_pending(pod, client.pod_events(pod.metadata.name))
            if reason:
                print(f"  {reason}", file=out)
        if state.phase == "failed":
            worst = EXIT_FAILURE
            for text in failure_report(stage, job, pods, state):
                print(text, file=out)
    return worst


def _age(job: Any) -> float:
    started = job.status.start_time if job.status else None
    return time.time() - started.timestamp() if started is not None else 0.0


def show_logs(client: KubeClient, run_id: str, stage: str = "train", index: int = 0, tail_lines: int | None = 200,
              follow: bool = False, options: FollowOptions | None = None, out: TextIO = sys.stdout) -> int:
    """Prints the log of a stage's pod (for Indexed Jobs, the given index; train index 0 is the chief)."""
    options = options or FollowOptions()
    jobs = [job for job in client.list_jobs(run_selector(run_id))
            if (job.metadata.labels or {}).get(mf.LABEL_COMPONENT) == stage]
    if not jobs:
        print(f"no {stage} Job of run {run_id} in namespace {client.namespace}", file=out)
        return EXIT_FAILURE
    name = jobs[0].metadata.name
    cursor = LogCursor()
    deadline = options.clock() + (options.timeout_s or 86400)
    while True:
        pods = client.list_pods(f"{mf.LABEL_JOB_NAME}={name}")
        indexed = [pod for pod in pods if pod_index(pod) in ("", str(index))]
        pod = newest_started(indexed)
        if pod is None:
            waiting = [explain_pending(p, client.pod_events(p.metadata.name)) for p in indexed]
            print(next((w for w in waiting if w), f"no started pod of {name} yet"), file=out)
        else:
            text = client.read_log(pod.metadata.name, tail_lines=tail_lines, timestamps=True)
            for body in cursor.new_lines(pod.metadata.name, text):
                print(body, file=out)
            if not follow or pod.status.phase in ("Succeeded", "Failed"):
                return EXIT_OK
        if not follow or options.clock() >= deadline:
            return EXIT_OK if pod is not None else EXIT_FAILURE
        options.sleep(options.poll_s)


def _ask(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False
