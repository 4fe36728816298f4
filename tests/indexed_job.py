"""Plays the Kubernetes Indexed Job controller on loopback, from a Job manifest's own fields.

One process per completion index, each with TF_CONFIG on 127.0.0.1 at ports fixed for the Job's
life (the pods' stable hostnames) and JOB_COMPLETION_INDEX. What is modelled, after the Job
controller (Kubernetes >= 1.31, "Pod failure policy" and "Backoff limit per index"):

- restartPolicy Never, podReplacementPolicy Failed: when a pod has failed, a replacement pod for
  that index, and only that index, starts; the other indexes run on.
- A failed pod is matched against `podFailurePolicy.rules` in order and the first match decides:
  Ignore (replaced, not counted), Count, FailIndex (the index fails at once), FailJob (the Job fails
  at once). No rule matching counts. `onExitCodes` (In/NotIn, optional containerName; exit code 0
  never matches) and `onPodConditions` (type and status) are both evaluated.
- An index whose counted failures exceed `backoffLimitPerIndex` fails; more failed indexes than
  `maxFailedIndexes` fail the Job; so does `activeDeadlineSeconds` (capped by the test's bound).
  A failed Job's remaining pods get SIGTERM, then SIGKILL after the pod's grace period.
- A process killed by signal N exits 128 + N, as a container does.
- Pod conditions: a pod gets `DisruptionTarget=True` exactly where Kubernetes adds it: preemption
  or eviction (`preempt`: SIGTERM, then the kubelet's SIGKILL after the grace period) and node loss
  (`lose_node`: a node that stopped answering is tainted unreachable, the taint manager deletes its
  pods (reason DeletionByTaintManager) or PodGC does once the Node is gone (DeletionByPodGC), both
  adding DisruptionTarget). A crash or an OOM kill (`kill`, `crash_when`) gets no condition.
- Not modelled: the exponential delay before a counted pod is replaced (10 s, 20 s, ...; it only
  slows a test down), scheduling, and the kubelet's own restarts (restartPolicy Never has none).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from test_train import LogTail, events

from pneumonia.training.local_workers import loopback_tf_configs

POLL_S = 0.2


def rule_matches(rule: dict[str, Any], exit_codes: dict[str, int], conditions: dict[str, str]) -> bool:
    """Whether one podFailurePolicy rule matches a failed pod: its containers' exit codes, its conditions."""
    if "onPodConditions" in rule:
        return any(conditions.get(pattern["type"]) == pattern.get("status", "True")
                   for pattern in rule["onPodConditions"])
    requirement = rule["onExitCodes"]
    values = set(requirement["values"])
    for container, code in exit_codes.items():
        if code == 0 or requirement.get("containerName") not in (None, container):
            continue  # containers that succeeded are excluded from the check
        if (code in values) == (requirement["operator"] == "In"):
            return True
    return False


def policy_action(rules: Sequence[dict[str, Any]], exit_codes: dict[str, int],
                  conditions: dict[str, str]) -> tuple[str, int | None]:
    """(action, 1-based rule number) for a failed pod: the first rule that matches, else (Count, None)."""
    for number, rule in enumerate(rules, start=1):
        if rule_matches(rule, exit_codes, conditions):
            return rule["action"], number
    return "Count", None


@dataclass
class Pod:
    """One attempt at one index: its process, its log, and what the controller made of its end."""

    index: int
    attempt: int
    process: subprocess.Popen
    log: LogTail
    conditions: dict[str, str] = field(default_factory=dict)
    stopped: bool = False  # SIGSTOPped: its node no longer answers
    preempted_at: float | None = None  # when SIGTERM came: SIGKILL follows after the grace period
    exit_code: int | None = None
    action: str | None = None
    rule: int | None = None

    def events(self) -> list[dict]:
        return events("".join(self.log.lines))

    def saw(self, predicate: Callable[[dict], bool]) -> bool:
        return any(predicate(event) for event in self.events())


class IndexedJob:
    """A Job's pods on loopback, restarted and counted as its spec says; `run_until` drives it."""

    def __init__(self, job: dict[str, Any], command: Sequence[str], env: dict[str, str], cwd: str,
                 deadline_s: float) -> None:
        spec = job["spec"]
        assert spec.get("completionMode") == "Indexed", "the harness plays an Indexed Job"
        pod_spec = spec["template"]["spec"]
        self.container = pod_spec["containers"][0]["name"]
        self.completions = int(spec["completions"])
        self.rules = spec.get("podFailurePolicy", {}).get("rules", [])
        self.backoff_limit_per_index = int(spec["backoffLimitPerIndex"])
        self.max_failed_indexes = spec.get("maxFailedIndexes")
        self.grace_s = float(pod_spec.get("terminationGracePeriodSeconds", 30))
        self.deadline = time.monotonic() + min(float(spec.get("activeDeadlineSeconds", deadline_s)), deadline_s)
        self.command, self.env, self.cwd = list(command), env, cwd
        self.tf_configs = loopback_tf_configs(self.completions)
        self.pods: list[Pod] = []  # every attempt, in start order
        self.counted = [0] * self.completions  # failures counted against each index
        self.ignored = [0] * self.completions
        self.succeeded: set[int] = set()
        self.failed_indexes: set[int] = set()
        self.status: str | None = None  # "Complete" or "Failed" once the Job has ended
        self.reason = ""
        self._crashers: dict[int, Callable[[dict], bool]] = {}

    # --- the pods ----------------------------------------------------------------------------------

    def start(self) -> IndexedJob:
        for index in range(self.completions):
            self._start(index)
        return self

    def _start(self, index: int) -> None:
        env = {**self.env, "TF_CONFIG": json.dumps(self.tf_configs[index]), "JOB_COMPLETION_INDEX": str(index)}
        process = subprocess.Popen(self.command, env=env, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        attempt = sum(1 for pod in self.pods if pod.index == index)
        self.pods.append(Pod(index, attempt, process, LogTail(process)))

    def current(self, index: int) -> Pod:
        return [pod for pod in self.pods if pod.index == index][-1]

    def attempts(self, index: int) -> list[Pod]:
        return [pod for pod in self.pods if pod.index == index]

    # --- faults, as a cluster produces them --------------------------------------------------------

    def kill(self, index: int) -> None:
        """The container dies of its own (a crash, an OOM kill): no pod condition."""
        self.current(index).process.send_signal(signal.SIGKILL)

    def preempt(self, index: int) -> None:
        """Preemption or eviction: DisruptionTarget, then SIGTERM (SIGKILL after the grace period in `poll`)."""
        pod = self.current(index)
        pod.conditions["DisruptionTarget"] = "True"
        pod.preempted_at = time.monotonic()
        pod.process.send_signal(signal.SIGTERM)

    def stop_node(self, index: int) -> None:
        """The pod's node stops answering: the process freezes, holding its port, sending nothing."""
        pod = self.current(index)
        pod.stopped = True
        pod.process.send_signal(signal.SIGSTOP)

    def lose_node(self, index: int) -> None:
        """The frozen node is declared lost: its pod is deleted with DisruptionTarget (taint manager, PodGC)."""
        pod = self.current(index)
        assert pod.stopped, "lose_node follows stop_node"
        pod.conditions["DisruptionTarget"] = "True"
        pod.process.send_signal(signal.SIGKILL)
        pod.process.send_signal(signal.SIGCONT)

    def crash_when(self, index: int, predicate: Callable[[dict], bool]) -> None:
        """Every attempt of `index` dies (SIGKILL, like an OOM kill) once it logs an event matching `predicate`."""
        self._crashers[index] = predicate

    # --- the controller ----------------------------------------------------------------------------

    def poll(self) -> None:
        """One pass of the controller: injected crashes, ended pods judged by the policy, replacements."""
        if self.status:
            return
        for index, predicate in self._crashers.items():
            pod = self.current(index)
            if pod.process.poll() is None and pod.saw(predicate):
                pod.process.send_signal(signal.SIGKILL)
        for index in range(self.completions):
            pod = self.current(index)
            if pod.exit_code is not None or index in self.succeeded | self.failed_indexes:
                continue
            if pod.preempted_at is not None and time.monotonic() > pod.preempted_at + self.grace_s:
                pod.process.kill()  # the kubelet's SIGKILL after terminationGracePeriodSeconds
            code = pod.process.poll()
            if code is None:
                continue
            pod.exit_code = 128 - code if code < 0 else code
            self._judge(pod)
            if self.status:
                return
        if len(self.succeeded) == self.completions:
            self._end("Complete", "all indexes succeeded")
        elif time.monotonic() > self.deadline:
            self._end("Failed", "DeadlineExceeded")

    def _judge(self, pod: Pod) -> None:
        if pod.exit_code == 0:
            self.succeeded.add(pod.index)
            return
        pod.action, pod.rule = policy_action(self.rules, {self.container: pod.exit_code}, pod.conditions)
        if pod.action == "FailJob":
            self._end("Failed", f"PodFailurePolicy (rule {pod.rule}, index {pod.index}, exit {pod.exit_code})")
            return
        if pod.action == "Ignore":
            self.ignored[pod.index] += 1
        elif pod.action == "FailIndex":
            self.failed_indexes.add(pod.index)
        else:
            self.counted[pod.index] += 1
            if self.counted[pod.index] > self.backoff_limit_per_index:
                self.failed_indexes.add(pod.index)
        if self.max_failed_indexes is not None and len(self.failed_indexes) > self.max_failed_indexes:
            # kube-controller-manager's reason (1.36): "FailedIndexes" is for a Job whose every index ended.
            self._end("Failed", f"MaxFailedIndexesExceeded {sorted(self.failed_indexes)}")
        elif pod.index not in self.failed_indexes:
            self._start(pod.index)
        elif len(self.succeeded | self.failed_indexes) == self.completions:
            self._end("Failed", f"FailedIndexes {sorted(self.failed_indexes)}")

    def _end(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason
        self.terminate()

    def terminate(self) -> None:
        """The Job's remaining pods: SIGTERM, then SIGKILL after the grace period (also the test's clean-up)."""
        running = [pod for pod in self.pods if pod.process.poll() is None]
        for pod in running:
            if pod.stopped:
                pod.process.send_signal(signal.SIGKILL)
                pod.process.send_signal(signal.SIGCONT)
            else:
                pod.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for pod in running:
            try:
                pod.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pod.process.kill()
                pod.process.wait()
        for pod in running:
            code = pod.process.returncode
            pod.exit_code = 128 - code if code < 0 else code

    def run_until(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Drives the controller until `predicate()` holds or the Job ends; fails the test past `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.poll()
            if self.status or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        if not predicate():
            raise AssertionError(f"not reached within {timeout_s:.0f} s (Job {self.status or 'running'}: "
                                 f"{self.reason}); {self.summary()}")

    def run_to_end(self, timeout_s: float) -> str:
        self.run_until(lambda: self.status is not None, timeout_s)
        return self.status or ""

    def summary(self) -> str:
        """Each attempt's end and the policy's verdict, then the last log lines of the live or failed pods."""
        lines = [f"index {p.index} attempt {p.attempt}: exit {p.exit_code} -> {p.action or '-'}"
                 f"{f' (rule {p.rule})' if p.rule else ''}{' ' + str(p.conditions) if p.conditions else ''}"
                 for p in self.pods]
        lines.append(f"counted {self.counted}, ignored {self.ignored}")
        tails = [f"--- index {p.index} attempt {p.attempt}:\n" + "".join(p.log.lines[-6:])
                 for p in self.pods if p.exit_code not in (0, None)][-3:]
        return "\n".join(lines + tails)

