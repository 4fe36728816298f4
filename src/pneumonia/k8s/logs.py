"""Following logs: print each line of a pod's log once while polling, stream the train chief's log,
show a failed pod's last lines, and `python -m pneumonia.k8s logs`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from kubernetes.client.exceptions import ApiException

from pneumonia.errors import EXIT_FAILURE, EXIT_OK
from pneumonia.k8s import manifests as mf
from pneumonia.k8s.client import KubeClient
from pneumonia.k8s.status import FollowOptions, explain_pending, newest_started, pod_index, run_selector
from pneumonia.logs import get_logger

log = get_logger(__name__)


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


def stream_chief_log(client: KubeClient, pods: list[Any], cursor: LogCursor, tail_lines: int,
                     say: Callable[[str], None]) -> None:
    """The new lines of the train chief's (index 0) log, prefixed [train-0]."""
    chief = newest_started([pod for pod in pods if pod_index(pod) == "0"])
    if chief is None:
        return
    try:
        text = client.read_log(chief.metadata.name, container="train", tail_lines=tail_lines, timestamps=True)
    except ApiException as error:
        log.debug("chief log not readable yet", pod=chief.metadata.name, status=error.status)
        return
    for body in cursor.new_lines(chief.metadata.name, text):
        say(f"[train-0] {body}")


def print_failed_log(client: KubeClient, pods: list[Any], say: Callable[[str], None]) -> None:
    """The last log lines of the newest failed pod."""
    failed = [pod for pod in pods if pod.status and pod.status.phase == "Failed"]
    if not failed:
        return
    pod = failed[-1]
    try:
        text = client.read_log(pod.metadata.name, tail_lines=20)
    except ApiException:
        return
    say(f"  last log lines of {pod.metadata.name}:")
    for line in text.splitlines():
        say(f"    {line}")


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
