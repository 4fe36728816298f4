"""The launcher's orchestration: check access, apply the run's objects, create the stage Jobs one by one
and follow each (status from `status`, logs from `logs`), delete a run's Jobs.

Objects come ready-made from `pneumonia.k8s.manifests` (pure); the API calls are `pneumonia.k8s.client`'s.
Every wait is bounded; the poll interval, sleep and clock are injectable so tests run instantly.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TextIO

import yaml
from kubernetes.client.exceptions import ApiException

from pneumonia.config import RECORDED, PipelineConfig, declared_keys
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from pneumonia.k8s import manifests as mf
from pneumonia.k8s.client import KUEUE_ACCESS, REQUIRED_ACCESS, SETUP_ACCESS, KubeClient, LaunchError, api_error
from pneumonia.k8s.logs import LogCursor, print_failed_log, stream_chief_log
from pneumonia.k8s.status import (
    FollowOptions,
    JobState,
    duration,
    explain_pending,
    failure_report,
    job_state,
    queue_reason,
    run_selector,
    stage_order,
    status_line,
)
from pneumonia.logs import get_logger

log = get_logger(__name__)

EXIT_INTERRUPTED = 130


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
        queue = self.config.cluster.queue_name
        needed = REQUIRED_ACCESS + (SETUP_ACCESS if setup else ()) + (KUEUE_ACCESS if queue else ())
        denied = self.client.denied(needed)
        if denied:
            raise LaunchError(f"your Kubernetes user may not {', '.join(map(str, denied))} in namespace "
                              f"{self.client.namespace}: bind the Role in manifests/02-role.yaml to it "
                              "(manifests/03-rolebinding.yaml) or use an account with roles/container.developer")
        exists = self.client.namespace_exists()
        if exists is False and not setup:
            raise LaunchError(f"namespace {self.client.namespace} does not exist: run once with --setup, or "
                              "kubectl apply -f manifests/00-namespace.yaml -f manifests/01-serviceaccount.yaml")
        if queue and self.client.read_local_queue(queue) is None:
            raise LaunchError(f"Kueue LocalQueue {queue} (cluster.queue_name) does not exist in namespace "
                              f"{self.client.namespace}, or Kueue is not installed: apply manifests/kueue/ (see "
                              "docs/gpus-on-gke.md), or run without --queue")
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
        cluster_queues: dict[str, str] = {}
        last_queued: str | None = None
        # Like the Job's own activeDeadlineSeconds, the default limit counts from admission: a Job may
        # wait in Kueue's queue (quota, flex-start capacity) for as long as that takes. --timeout-s is
        # the caller's own bound, from now.
        deadline_start = start
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
            queued = queue_reason(self.client, job, cluster_queues)
            if queued and queued != last_queued:
                self.say(f"[{stage}] {queued}")
            if queued and options.timeout_s is None:
                deadline_start = now
            last_queued = queued
            for pod in pods:
                if pod.status and pod.status.phase not in (None, "Pending"):
                    explained.pop(pod.metadata.name, None)
                    continue
                reason = explain_pending(pod, self.client.pod_events(pod.metadata.name))
                if reason and explained.get(pod.metadata.name) != reason:
                    self.say(f"[{stage}] {reason}")
                    explained[pod.metadata.name] = reason
            if stage == "train":
                stream_chief_log(self.client, pods, cursor, self.options.log_tail_lines, self.say)
            if state.done:
                if state.phase == "failed":
                    for text in failure_report(stage, job, pods, state):
                        self.say(text)
                    print_failed_log(self.client, pods, self.say)
                else:
                    self.say(f"[{stage}] complete")
                return state
            if now - deadline_start >= limit:
                raise LaunchError(f"[{stage}] still not finished after {duration(limit)}; it keeps running: "
                                  f"python -m pneumonia.k8s status --run-id {self.run_id}", EXIT_FAILURE)
            options.sleep(options.poll_s)

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


def delete_run(client: KubeClient, run_id: str, say: Callable[[str], None]) -> list[str]:
    """Deletes the run's Jobs (foreground: their pods go first); returns the names deleted."""
    deleted = []
    for job in sorted(client.list_jobs(run_selector(run_id)), key=stage_order):
        if client.delete_job(job.metadata.name):
            say(f"deleted Job {job.metadata.name}")
            deleted.append(job.metadata.name)
    if not deleted:
        say(f"no Jobs of run {run_id} in namespace {client.namespace}")
    return deleted


def _ask(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False
