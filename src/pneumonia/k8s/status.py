"""Reading and explaining a run's status: Job state, one status line per stage, why a pod is Pending,
why a Job failed (exit codes, the podFailurePolicy rule), and `python -m pneumonia.k8s status`.

Pure readers of the API's objects, apart from show_status, which asks the client.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED
from pneumonia.k8s import manifests as mf
from pneumonia.k8s.client import KubeClient


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
    return f"{text}  {duration(elapsed_s)}"


def duration(seconds: float) -> str:
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
        hints = _scheduling_hints(messages)
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


# The scheduler's summary of one attempt (kube-scheduler 1.36, as the cluster tests record it):
#   0/7 nodes are available: 3 node(s) didn't match Pod's node affinity/selector, 4 Insufficient
#   nvidia.com/gpu. no new claims to deallocate, preemption: 0/7 nodes are available: 7 Preemption ...
# One count per reason, over every node; the summary ends at the first ". " (reasons hold dots, as in
# nvidia.com/gpu, but never a dot and a space).
_UNSCHEDULABLE = re.compile(r"0/(?P<total>\d+) nodes are available: (?P<reasons>.*?)\.(?:\s|$)")
_REASON = re.compile(r"(?:^|, )(?P<count>\d+) (?P<reason>.+?)(?=, \d+ |$)")


def node_reasons(message: str) -> tuple[int, dict[str, int]] | None:
    """(nodes, {reason: nodes it excluded}) from a scheduler message, or None if it is not one."""
    found = _UNSCHEDULABLE.search(message)
    if found is None:
        return None
    reasons = {match["reason"]: int(match["count"]) for match in _REASON.finditer(found["reasons"])}
    return int(found["total"]), reasons


def _scheduling_hints(messages: list[str]) -> list[str]:
    """Hints from the scheduler's (and autoscaler's) messages, with the number of nodes each reason
    excluded when the scheduler's summary gives it."""
    text = " ".join(messages)
    summary = next(filter(None, map(node_reasons, messages)), None)

    def excluded(*fragments: str) -> int:
        return sum(count for reason, count in summary[1].items()
                   if any(fragment in reason for fragment in fragments)) if summary else 0

    def on(fragment: str) -> str:
        return f" ({excluded(fragment)} of {summary[0]} nodes)" if summary and excluded(fragment) else ""

    hints = []
    if f"Insufficient {mf.GPU_RESOURCE}" in text:
        hints.append(f"not enough free {mf.GPU_RESOURCE}{on(f'Insufficient {mf.GPU_RESOURCE}')}: the GPU node pool "
                     "is full, at its maximum size, out of regional GPU quota, or still scaling up")
    if "untolerated taint" in text:
        # kube-scheduler 1.36 no longer names the taint ("had untolerated taint(s)"): say where to look.
        hints.append(f"nodes carry a taint the pod does not tolerate{on('untolerated taint')}; `kubectl describe "
                     f"nodes` lists them (GKE taints GPU nodes {mf.GPU_RESOURCE}=present:NoSchedule, which only pods "
                     f"requesting {mf.GPU_RESOURCE} tolerate)")
    # The nodes of other pools never match a GPU pod's selector: a cause only when no node matches it.
    selector = ("node affinity/selector", "node(s) didn't match")
    if excluded(*selector) == summary[0] if summary else any(fragment in text for fragment in selector):
        hints.append(f"no node has the pod's node labels: is there a node pool with the GPU type "
                     f"({mf.GPU_NODE_LABEL}) the run asks for? (--gpu-type)")
    for resource in ("cpu", "memory", "ephemeral-storage"):
        if f"Insufficient {resource}" in text:
            hints.append(f"not enough free {resource} for the pod's requests{on(f'Insufficient {resource}')}")
    if "max node group size reached" in text or "max cluster" in text:
        hints.append("the autoscaler reached the node pool's maximum size")
    return hints or ["the scheduler found no node (message below)"]


# Kueue's words when a Job's pods cannot all fit (pkg/scheduler/flavorassigner/flavorassigner.go, v0.19).
_NO_FIT = re.compile(r"insufficient quota for (?P<resource>\S+) in flavor (?P<flavor>\S+), previously considered "
                     r"podsets requests \((?P<before>[^)]*)\) \+ current podset request \((?P<request>[^)]*)\) > "
                     r"maximum capacity \((?P<capacity>[^)]*)\)")
_IN_USE = re.compile(r"insufficient unused quota for (?P<resource>\S+) in flavor (?P<flavor>\S+), (?P<more>\S+) more needed")


def explain_queued(workload: dict[str, Any] | None, cluster_queue: str = "") -> str | None:
    """Why Kueue has not started a Job, in one line, from its Workload's own conditions and admission
    checks; None once it is admitted (or finished). `cluster_queue` names the queue in the message."""
    if workload is None:
        return "waiting for Kueue to create its Workload (is Kueue running, and the LocalQueue there?)"
    status = workload.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    true = {kind for kind, c in conditions.items() if c.get("status") == "True"}
    if "Finished" in true or "Admitted" in true:
        return None
    where = f"ClusterQueue {cluster_queue}" if cluster_queue else "its ClusterQueue"
    evicted = conditions.get("Evicted") if "Evicted" in true else None
    after = (f" (evicted before: {evicted.get('reason')}: {evicted.get('message')})" if evicted else "")
    if "QuotaReserved" in true:
        for check in status.get("admissionChecks") or []:
            if check.get("state") in ("Pending", "Retry"):
                message = f": {check['message']}" if check.get("message") else ""
                return (f"waiting for capacity (flex-start): quota reserved in {where}, admission check "
                        f"{check['name']} {check['state']}{message}; the Job starts once every node is there{after}")
        return None
    quota = conditions.get("QuotaReserved")
    message = (quota or {}).get("message") or ""
    no_fit = list(_NO_FIT.finditer(message))
    if no_fit:
        # Several flavors may have been tried: name the one that came closest, GPUs first.
        gpu = [match for match in no_fit if match["resource"] == mf.GPU_RESOURCE] or no_fit
        best = max(gpu, key=lambda match: mf.quantity_value(match["capacity"]))
        return (f"waiting for quota: {best['request']} {best['resource']} requested, {best['capacity']} available "
                f"in {where} (flavor {best['flavor']}): the Job starts only when all of its pods fit{after}")
    in_use = _IN_USE.search(message)
    if in_use:
        return (f"waiting for quota: {in_use['more']} more {in_use['resource']} needed in {where} (flavor "
                f"{in_use['flavor']}), in use by other Workloads{after}")
    if message:
        return f"waiting for Kueue: {message}{after}"
    return f"waiting for Kueue to admit it in {where}{after}"


def queue_reason(client: KubeClient, job: Any, cluster_queues: dict[str, str]) -> str | None:
    """explain_queued for a Job that Kueue admits (None for other Jobs); `cluster_queues` caches each
    LocalQueue's ClusterQueue name across polls."""
    queue = (job.metadata.labels or {}).get(mf.QUEUE_LABEL)
    if not queue or job_state(job).done:
        return None
    if queue not in cluster_queues:
        local_queue = client.read_local_queue(queue)
        if local_queue is None:
            return (f"LocalQueue {queue} does not exist in namespace {client.namespace}: Kueue will not admit the "
                    "Job (apply manifests/kueue/, see docs/gpus-on-gke.md)")
        cluster_queues[queue] = local_queue.get("spec", {}).get("clusterQueue", "")
    workloads = client.job_workloads(job.metadata.uid)
    newest = max(workloads, key=lambda w: w["metadata"].get("creationTimestamp", ""), default=None)
    return explain_queued(newest, cluster_queues[queue])


def failed_container(pod: Any) -> tuple[str, int, str, str] | None:
    """(container, exit code, reason, message) of the pod's first container that exited non-zero."""
    for status in (pod.status.container_statuses or []) if pod.status else []:
        terminated = status.state.terminated if status.state else None
        if terminated is not None and terminated.exit_code:
            return status.name, terminated.exit_code, terminated.reason or "", (terminated.message or "").strip()
    return None


def matching_rule(policy: Any, pod: Any) -> tuple[int, Any] | None:
    """The podFailurePolicy rule (1-based number, rule) the Job controller applies to a failed pod: the first
    whose pod condition pattern (type and status) or exit-code requirement matches, as the controller does
    (pkg/controller/job/pod_failure_policy.go). For clusters that do not name the rule (fired_rule)."""
    if policy is None:
        return None
    conditions = {(c.type, c.status) for c in (pod.status.conditions or [])} if pod.status else set()
    statuses = [*(pod.status.container_statuses or []), *(pod.status.init_container_statuses or [])] \
        if pod.status else []
    exits = [(s.name, s.state.terminated.exit_code) for s in statuses
             if s.state and s.state.terminated and s.state.terminated.exit_code]
    for number, rule in enumerate(policy.rules or [], start=1):
        if rule.on_pod_conditions and any((c.type, c.status) in conditions for c in rule.on_pod_conditions):
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
        when = "pod condition " + ", ".join(f"{c.type}={c.status}" for c in rule.on_pod_conditions or [])
    return f"podFailurePolicy rule #{number}: {rule.action} on {when}"


# The Job controller's message when a rule fails the Job (its FailureTarget, since 1.31, and Failed
# conditions, reason PodFailurePolicy; pkg/controller/job/pod_failure_policy.go), index 0-based:
#   Container <name> for pod <ns>/<pod> failed with exit code <code> matching <action> rule at index <i>
#   Pod <ns>/<pod> has condition <type> matching <action> rule at index <i>
_RULE_FIRED = re.compile(
    r"(?:Container (?P<container>\S+) for pod (?P<exit_pod>\S+) failed with exit code (?P<exit_code>-?\d+)"
    r"|Pod (?P<condition_pod>\S+) has condition (?P<condition>\S+)) matching (?P<action>\w+) rule at index (?P<index>\d+)")


@dataclasses.dataclass(frozen=True)
class FiredRule:
    """The podFailurePolicy rule the Job controller says failed the Job, and the pod that matched it."""

    pod: str  # the pod's name (the message gives namespace/name)
    number: int  # 1-based, as describe_rule numbers rules
    rule: Any
    container: str = ""
    exit_code: int | None = None
    condition: str = ""


def fired_rule(state: JobState, policy: Any) -> FiredRule | None:
    """The rule named in the Job's failure condition; None on clusters that do not name it, or when the
    named rule is not in `policy` with that action (the Job's policy changed since: no guess)."""
    found = _RULE_FIRED.search(state.message or "") if state.phase == "failed" else None
    if found is None or policy is None:
        return None
    index = int(found["index"])
    rules = list(policy.rules or [])
    if index >= len(rules) or rules[index].action != found["action"]:
        return None
    pod = (found["exit_pod"] or found["condition_pod"]).rpartition("/")[2]
    return FiredRule(pod=pod, number=index + 1, rule=rules[index], container=found["container"] or "",
                     exit_code=int(found["exit_code"]) if found["exit_code"] else None,
                     condition=found["condition"] or "")


_EXIT_HINTS = {
    EXIT_BAD_INPUT: "bad input or config: fix what the log says; retrying cannot help",
    EXIT_PREEMPTED: "stopped after saving a backup (preemption); replaced without counting",
    EXIT_PEER_LOST: "peer lost: another worker failed or stopped answering (see its pod); not counted",
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
    policy = job.spec.pod_failure_policy if job.spec else None
    fired = fired_rule(state, policy)
    failed = [pod for pod in pods if pod.status and pod.status.phase == "Failed"]
    shown = failed[-5:]
    if fired is not None and fired.pod not in {pod.metadata.name for pod in shown}:
        # The pod that failed the Job may be gone already, or older than the last five: the condition says it all.
        what = (f"container {fired.container} exited {fired.exit_code}" if fired.exit_code is not None
                else f"condition {fired.condition}")
        hint = _EXIT_HINTS.get(fired.exit_code, "") if fired.exit_code is not None else ""
        lines.append(f"  pod {fired.pod}: {what}" + (f": {hint}" if hint else ""))
        lines.append(f"    {describe_rule(fired.number, fired.rule)} (named by the Job controller)")
    for pod in shown:
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
        if fired is not None and fired.pod == pod.metadata.name:
            lines.append(f"    {describe_rule(fired.number, fired.rule)} (named by the Job controller)")
            continue
        rule = matching_rule(policy, pod)  # older clusters, and the pods that did not fail the Job
        if rule is not None:
            lines.append(f"    {describe_rule(*rule)}")
    return lines


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


def stage_order(job: Any) -> int:
    stage = (job.metadata.labels or {}).get(mf.LABEL_COMPONENT, "")
    return mf.STAGES.index(stage) if stage in mf.STAGES else len(mf.STAGES)


def show_status(client: KubeClient, run_id: str | None, out: TextIO = sys.stdout) -> int:
    """Every stage of a run (or a line per run when no run id is given), with reasons for what is stuck."""
    jobs = client.list_jobs(run_selector(run_id))
    if not jobs:
        print(f"no pipeline Jobs{f' of run {run_id}' if run_id else ''} in namespace {client.namespace}", file=out)
        return EXIT_FAILURE if run_id else EXIT_OK
    if run_id is None:
        runs: dict[str, list[str]] = {}
        for job in sorted(jobs, key=stage_order):
            owner = (job.metadata.labels or {}).get(mf.LABEL_INSTANCE, "?")
            stage = (job.metadata.labels or {}).get(mf.LABEL_COMPONENT, job.metadata.name)
            runs.setdefault(owner, []).append(f"{stage} {job_state(job).phase}")
        for owner, stages in runs.items():
            print(f"{owner}: {', '.join(stages)}", file=out)
        return EXIT_OK
    worst = EXIT_OK
    cluster_queues: dict[str, str] = {}
    for job in sorted(jobs, key=stage_order):
        stage = (job.metadata.labels or {}).get(mf.LABEL_COMPONENT, job.metadata.name)
        pods = client.list_pods(f"{mf.LABEL_JOB_NAME}={job.metadata.name}")
        state = job_state(job)
        print(status_line(stage, job, pods, state, _age(job)), file=out)
        queued = queue_reason(client, job, cluster_queues)
        if queued:
            print(f"  {queued}", file=out)
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
