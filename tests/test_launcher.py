"""The launcher against a Kubernetes API emulator (kmock) on loopback, through the official client.

A scripted controller plays the Job controller and the kubelet: each time the launcher would sleep
between polls, the script moves the Jobs and pods one step (pods Pending, Running, Failed; Job
conditions Complete or Failed through the podFailurePolicy), so every run is instant and bounded.
"""

from __future__ import annotations

import copy
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from pneumonia.config import PipelineConfig, load_config
from pneumonia.k8s import client as kc
from pneumonia.k8s import launcher as ln
from pneumonia.k8s import logs as lg
from pneumonia.k8s import manifests as mf
from pneumonia.k8s import status as st
from pneumonia.k8s.__main__ import main

sys.path.insert(0, str(Path(__file__).parent))
from k8s_helpers import NAMESPACE, ClusterEmulator, EmulatorThread, write_kubeconfig  # noqa: E402

RUN_ID = "20260102-030405-abcd"
UNSCHEDULABLE = ("0/3 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/unreachable: }, "
                 "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found.")


@pytest.fixture
def server() -> Iterator[EmulatorThread]:
    thread = EmulatorThread(ClusterEmulator()).start()
    yield thread
    thread.stop()


@pytest.fixture
def kubeconfig(server: EmulatorThread, tmp_path: Path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", server.url)


@pytest.fixture
def client(kubeconfig: Path, server: EmulatorThread) -> kc.KubeClient:
    """A client of an emulated cluster where an admin already applied the namespace and ServiceAccount."""
    kube = kc.KubeClient(str(kubeconfig), "kmock", NAMESPACE)
    server.emulator.namespaces[NAMESPACE] = {"apiVersion": "v1", "kind": "Namespace",
                                             "metadata": {"name": NAMESPACE}}
    kube.core.create_namespaced_service_account(NAMESPACE, {"metadata": {"name": "pneumonia"}})
    return kube


def run_config(root: Path | str, **options: Any) -> PipelineConfig:
    options = {"run_id": RUN_ID, "image": "r/pneumonia:0.1.0", **options}
    config = mf.with_launch_options(load_config(mf.CLUSTER_CONFIG), **options)
    # A local root lets the test put the report where the launcher reads it back (pneumonia.storage).
    return config.replace(data=config.data.__class__(root=str(root), archive=config.data.archive))


class Controller:
    """Plays the Job controller and kubelet: `sleep` advances a fake clock and runs the next scripted step."""

    def __init__(self, client: kc.KubeClient, server: EmulatorThread,
                 script: dict[str, list[Callable[[Controller], None]]]) -> None:
        self.client, self.server, self.script = client, server, script
        self.now = 0.0
        self.interrupt_when: Callable[[], bool] = lambda: False

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.interrupt_when():
            raise KeyboardInterrupt
        for job_name, steps in self.script.items():
            if steps and self.client.read_job(job_name) is not None:
                steps.pop(0)(self)
                return

    def options(self) -> st.FollowOptions:
        return st.FollowOptions(poll_s=10, timeout_s=3600, heartbeat_s=600, sleep=self.sleep, clock=self.clock)

    # --- what the cluster does -------------------------------------------------------------------

    def pod(self, job: str, index: int | None, phase: str, suffix: str = "a", **status: Any) -> str:
        name = f"{job}-{index}-{suffix}" if index is not None else f"{job}-{suffix}"
        labels = {mf.LABEL_JOB_NAME: job, mf.LABEL_NAME: mf.APP_NAME}
        if index is not None:
            labels[mf.LABEL_COMPLETION_INDEX] = str(index)
        core = self.client.core
        if not any(p.metadata.name == name for p in self.client.list_pods(f"{mf.LABEL_JOB_NAME}={job}")):
            core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
                                                   "spec": {"containers": [{"name": "main", "image": "r/p:1"}]}})
        core.patch_namespaced_pod_status(name, NAMESPACE, {"status": {"phase": phase, **status}})
        return name

    def job_status(self, job: str, **status: Any) -> None:
        self.client.batch.patch_namespaced_job_status(job, NAMESPACE, {"status": status})

    def complete(self, job: str, completions: int = 1) -> None:
        self.job_status(job, succeeded=completions, conditions=[
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"}])

    def event(self, pod: str, reason: str, message: str) -> None:
        self.client.core.create_namespaced_event(NAMESPACE, {
            "metadata": {"name": f"{pod}.{reason.lower()}", "namespace": NAMESPACE},
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": NAMESPACE},
            "reason": reason, "message": message, "type": "Warning"})


def exited(container: str, code: int, reason: str = "Error") -> dict[str, Any]:
    return {"containerStatuses": [{"name": container, "image": "r/p:1", "imageID": "", "ready": False,
                                   "restartCount": 0, "state": {"terminated": {"exitCode": code, "reason": reason}}}]}


def posts(server: EmulatorThread) -> list[str]:
    return [path.rsplit("/", 1)[-1] if data is None else f"{path.rsplit('/', 1)[-1]}:{data['metadata'].get('name')}"
            for method, path, data, _ in server.emulator.calls
            if method == "POST" and "selfsubjectaccessreviews" not in path
            and not path.endswith(("/pods", "/events", "/serviceaccounts"))]


def launch(client: kc.KubeClient, config: PipelineConfig, options: st.FollowOptions) -> tuple[int, str]:
    """Runs the launcher on the config's manifests; returns its exit status and what it printed."""
    out = io.StringIO()
    status = ln.Launcher(client, mf.build_manifests(mf.load_manifests(), config), config, options, out).run()
    return status, out.getvalue()


# --- runs ----------------------------------------------------------------------------------------

def happy_script() -> dict[str, list[Callable[[Controller], None]]]:
    chief_log = {"text": ""}

    def train_pending(c: Controller) -> None:
        for index in (0, 1):
            pod = c.pod("pneumonia-train", index, "Pending", conditions=[
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE}])
        c.event(pod, "NotTriggerScaleUp", "pod didn't trigger scale-up: 1 max node group size reached")

    def train_running(c: Controller) -> None:
        c.server.emulator.logs[(NAMESPACE, "pneumonia-train-0-a")] = lambda: chief_log["text"]
        chief_log["text"] = ("2026-01-02T03:10:00.000000001Z {\"event\": \"peers resolved\"}\n"
                             "2026-01-02T03:10:00.000000001Z {\"event\": \"epoch 1/2\"}\n")
        for index in (0, 1):
            c.pod("pneumonia-train", index, "Running", conditions=[{"type": "PodScheduled", "status": "True"}])

    def train_more_log(c: Controller) -> None:
        chief_log["text"] += "2026-01-02T03:20:00.000000000Z {\"event\": \"epoch 2/2\"}\n"

    def train_done(c: Controller) -> None:
        for index in (0, 1):
            c.pod("pneumonia-train", index, "Succeeded")
        c.complete("pneumonia-train", 2)

    return {
        "pneumonia-preprocess": [lambda c: c.pod("pneumonia-preprocess", None, "Running"),
                                 lambda c: c.complete("pneumonia-preprocess")],
        "pneumonia-shard": [lambda c: c.complete("pneumonia-shard", 4)],
        "pneumonia-train": [train_pending, train_running, train_more_log, train_done],
        "pneumonia-evaluate": [lambda c: c.complete("pneumonia-evaluate")],
    }


def test_a_run_creates_objects_in_order_explains_pending_streams_the_chief_and_reports(
        client: kc.KubeClient, server: EmulatorThread, tmp_path: Path) -> None:
    config = run_config(tmp_path / "data")
    report = tmp_path / "data" / "runs" / RUN_ID / "report"
    report.mkdir(parents=True)
    (report / "metrics.json").write_text(json.dumps({"accuracy": 0.91234, "cohen_kappa": 0.85, "macro_f1": 0.9}))
    # A finished Job of an older run holds the preprocess name: the launcher removes it first.
    old = mf.stage_jobs(mf.load_manifests())["preprocess"]
    client.create_job(old)
    Controller(client, server, {}).complete("pneumonia-preprocess")
    controller = Controller(client, server, happy_script())
    out = io.StringIO()
    objects = mf.build_manifests(mf.load_manifests(), config)

    status = ln.Launcher(client, objects, config, controller.options(), out).run()

    text = out.getvalue()
    assert status == ln.EXIT_OK, text
    assert posts(server) == ["jobs:pneumonia-preprocess",  # the old run's, made by the test
                             "configmaps:pneumonia-config", "services:pneumonia-train-workers",
                             "jobs:pneumonia-preprocess", "jobs:pneumonia-shard", "jobs:pneumonia-train",
                             "jobs:pneumonia-evaluate"]
    deletes = [(path, params) for method, path, _, params in server.emulator.calls if method == "DELETE"]
    assert deletes == [(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/pneumonia-preprocess",
                        {"propagationPolicy": "Foreground"})]
    assert "deleting the finished Job pneumonia-preprocess of run run-001" in text
    assert "not enough free nvidia.com/gpu" in text and "taint the pod does not tolerate" in text
    assert "maximum size" in text  # from the autoscaler's NotTriggerScaleUp event
    assert text.count("[train-0] {\"event\": \"epoch 1/2\"}") == 1
    assert text.count("[train-0] {\"event\": \"peers resolved\"}") == 1
    assert text.count("[train-0] {\"event\": \"epoch 2/2\"}") == 1
    assert "[train] running: 0/2 done; pods: 2 pending" in text
    assert f"report: {report}/report.md" in text
    assert "accuracy: 0.9123" in text and "cohen_kappa: 0.8500" in text and "macro_f1: 0.9000" in text
    created = server.emulator.objects["batch/v1/jobs", NAMESPACE, "pneumonia-train"]
    assert created["metadata"]["labels"][mf.LABEL_INSTANCE] == RUN_ID


def test_a_bad_input_failure_reports_pod_exit_code_and_the_rule_that_fired(
        client: kc.KubeClient, server: EmulatorThread, tmp_path: Path) -> None:
    config = run_config(tmp_path)

    def shard_fails(c: Controller) -> None:
        pod = c.pod("pneumonia-shard", 2, "Failed", **exited("shard", 2))
        c.server.emulator.logs[(NAMESPACE, pod)] = '{"event": "bad input", "error": "split.json has no rows"}\n'
        c.job_status("pneumonia-shard", failed=1, conditions=[{
            "type": "Failed", "status": "True", "reason": "PodFailurePolicy",
            "message": f"Container shard for pod {NAMESPACE}/{pod} failed with exit code 2 matching FailJob "
                       "rule at index 2"}])

    controller = Controller(client, server, {"pneumonia-preprocess": [lambda c: c.complete("pneumonia-preprocess")],
                                             "pneumonia-shard": [lambda c: c.pod("pneumonia-shard", 2, "Running"),
                                                                 shard_fails]})
    status, text = launch(client, config, controller.options())

    assert status == ln.EXIT_FAILURE
    assert "Job pneumonia-shard failed: PodFailurePolicy (a podFailurePolicy rule failed the Job at once)" in text
    assert "matching FailJob rule at index 2" in text
    assert "pod pneumonia-shard-2-a (index 2): container shard exited 2 (Error): bad input or config" in text
    assert "podFailurePolicy rule #3: FailJob on exit code In [2]" in text
    assert "split.json has no rows" in text  # the failed pod's last log lines
    assert "jobs:pneumonia-train" not in posts(server)


def test_a_running_job_of_another_run_blocks_the_launch(client: kc.KubeClient, server: EmulatorThread,
                                                        tmp_path: Path) -> None:
    client.create_job(mf.stage_jobs(mf.load_manifests())["train"])  # run-001, no Complete condition
    config = run_config(tmp_path)
    out = io.StringIO()
    status = ln.Launcher(client, mf.build_manifests(mf.load_manifests(), config), config, out=out).run()
    assert status == 2
    assert "Job pneumonia-train of run run-001 is still running" in out.getvalue()
    assert "delete --run-id run-001" in out.getvalue()
    assert posts(server) == ["jobs:pneumonia-train"]  # only the test's own Job


def start_run_elsewhere(client: kc.KubeClient, config: PipelineConfig) -> dict[str, Any]:
    """What an earlier launcher of the run left: its ConfigMap applied and its preprocess Job running."""
    objects = mf.build_manifests(mf.load_manifests(), config)
    configmap = next(obj for obj in objects if obj["kind"] == "ConfigMap")
    client.apply(configmap)
    client.create_job(mf.stage_jobs(objects)["preprocess"])
    return configmap


def test_attaching_with_other_flags_is_refused_and_leaves_the_live_configmap_alone(
        client: kc.KubeClient, server: EmulatorThread, tmp_path: Path) -> None:
    live = start_run_elsewhere(client, run_config(tmp_path))
    config = run_config(tmp_path, num_workers=3)  # same run id, different --workers
    out = io.StringIO()
    options = Controller(client, server, {}).options()  # bounded even if it wrongly attached
    status = ln.Launcher(client, mf.build_manifests(mf.load_manifests(), config), config, options, out).run()

    text = out.getvalue()
    assert status == 2, text
    assert f"run {RUN_ID} is already running with a different config" in text
    assert "cluster.num_workers: 2 running, 3 requested" in text
    assert "same flags" in text and "--run-id" in text
    assert "shard.num_workers" not in text  # only the keys that differ
    stored = client.read_config_map("pneumonia-config").data[mf.CONFIG_MAP_KEY]
    assert stored == live["data"][mf.CONFIG_MAP_KEY]
    assert [m for m, path, *_ in server.emulator.calls if "/configmaps" in path and m in ("PATCH", "PUT")] == []
    assert posts(server) == ["configmaps:pneumonia-config", "jobs:pneumonia-preprocess"]  # the test's own


@pytest.mark.parametrize("image", ["r/pneumonia:0.1.0", "r/pneumonia:0.1.0-3-gabc1234"])
def test_attaching_with_the_same_flags_follows_the_running_jobs(
        client: kc.KubeClient, server: EmulatorThread, tmp_path: Path, image: str) -> None:
    start_run_elsewhere(client, run_config(tmp_path))
    config = run_config(tmp_path, image=image)  # the same run from a newer commit: another image tag
    controller = Controller(client, server, happy_script())
    status, text = launch(client, config, controller.options())

    assert status == ln.EXIT_OK, text
    assert f"[preprocess] following the existing Job pneumonia-preprocess of run {RUN_ID}" in text
    assert "different config" not in text
    assert posts(server)[:2] == ["configmaps:pneumonia-config", "jobs:pneumonia-preprocess"]  # the test's own
    assert posts(server).count("jobs:pneumonia-preprocess") == 1  # attached, not created again
    assert "jobs:pneumonia-evaluate" in posts(server)


def test_resuming_a_run_whose_train_job_failed_runs_that_job_again(
        client: kc.KubeClient, server: EmulatorThread, tmp_path: Path) -> None:
    config = run_config(tmp_path)
    earlier = mf.stage_jobs(mf.build_manifests(mf.load_manifests(), config))
    setup = Controller(client, server, {})
    for stage in ("preprocess", "shard", "train"):
        client.create_job(earlier[stage])
    setup.complete("pneumonia-preprocess")
    setup.complete("pneumonia-shard", 4)
    setup.job_status("pneumonia-train", failed=3, conditions=[
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    script = happy_script()
    controller = Controller(client, server, {"pneumonia-train": script["pneumonia-train"],
                                             "pneumonia-evaluate": script["pneumonia-evaluate"]})
    status, text = launch(client, config, controller.options())

    assert status == ln.EXIT_OK, text
    assert f"[train] the Job pneumonia-train of run {RUN_ID} failed earlier (BackoffLimitExceeded)" in text
    assert f"[preprocess] following the existing Job pneumonia-preprocess of run {RUN_ID}" in text
    deleted = [path.rsplit("/", 1)[-1] for method, path, *_ in server.emulator.calls if method == "DELETE"]
    assert deleted == ["pneumonia-train"]  # the finished stages stay
    assert posts(server).count("jobs:pneumonia-train") == 2  # the test's failed one, then the launcher's
    assert posts(server).count("jobs:pneumonia-preprocess") == 1
    assert job_phase(client, "pneumonia-train") == "complete"


def job_phase(client: kc.KubeClient, name: str) -> str:
    return st.job_state(client.read_job(name)).phase


def test_ctrl_c_asks_and_deletes_the_runs_jobs_in_the_foreground(client: kc.KubeClient, server: EmulatorThread,
                                                                  tmp_path: Path) -> None:
    config = run_config(tmp_path)
    controller = Controller(client, server, {"pneumonia-preprocess": [lambda c: c.complete("pneumonia-preprocess")]})
    controller.interrupt_when = lambda: client.read_job("pneumonia-shard") is not None
    questions: list[str] = []
    out = io.StringIO()
    launcher = ln.Launcher(client, mf.build_manifests(mf.load_manifests(), config), config, controller.options(),
                           out, confirm=lambda question: questions.append(question) or True)

    assert launcher.run() == ln.EXIT_INTERRUPTED
    assert questions == [f"Delete the Jobs of run {RUN_ID} (and their pods)? [y/N] "]
    deletes = [(path.rsplit("/", 1)[-1], params) for method, path, _, params in server.emulator.calls
               if method == "DELETE"]
    assert deletes == [("pneumonia-preprocess", {"propagationPolicy": "Foreground"}),
                       ("pneumonia-shard", {"propagationPolicy": "Foreground"})]
    assert client.list_jobs(st.run_selector(RUN_ID)) == []


def test_follow_gives_up_after_its_timeout(client: kc.KubeClient, server: EmulatorThread, tmp_path: Path) -> None:
    config = run_config(tmp_path)
    controller = Controller(client, server, {})
    options = controller.options()
    options.timeout_s = 120
    out = io.StringIO()
    status = ln.Launcher(client, mf.build_manifests(mf.load_manifests(), config), config, options, out).run()
    assert status == ln.EXIT_FAILURE
    assert "[preprocess] still not finished after 2m00s" in out.getvalue()
    assert controller.now == 120


# --- the CLI ------------------------------------------------------------------------------------

def test_dry_run_prints_the_exact_yaml_and_calls_nothing(kubeconfig: Path, server: EmulatorThread) -> None:
    out = io.StringIO()
    status = main(["run", "--kubeconfig", str(kubeconfig), "--context", "kmock", "--dry-run", "--run-id", RUN_ID,
                   "--bucket", "gs://bucket-x/p", "--image", "r/pneumonia:0.2.0", "--workers", "4",
                   "--gpus-per-worker", "2", "--gpu-type", "nvidia-tesla-t4"], out=out)
    assert status == 0
    assert server.emulator.calls == []
    printed = [doc for doc in yaml.safe_load_all(out.getvalue()) if doc]
    config = mf.with_launch_options(load_config(mf.CLUSTER_CONFIG), bucket="gs://bucket-x/p", image="r/pneumonia:0.2.0",
                                    num_workers=4, gpus_per_worker=2, gpu_type="nvidia-tesla-t4", run_id=RUN_ID)
    built = mf.without_upstream_waits(mf.build_manifests(mf.load_manifests(), config, managed_by="pneumonia-k8s"))
    expected = [obj for obj in built if obj["kind"] not in mf.SETUP_KINDS]
    assert printed == expected


def test_setup_refuses_the_placeholder_gsa_and_dry_run_shows_the_one_given(
        kubeconfig: Path, server: EmulatorThread, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["run", "--kubeconfig", str(kubeconfig), "--context", "kmock", "--run-id", RUN_ID,
              "--bucket", "gs://bucket-x/p", "--image", "r/pneumonia:0.2.0", "--dry-run"]
    out = io.StringIO()
    assert main([*common, "--setup"], out=out) == 2
    error = capsys.readouterr().err
    assert "--gsa" in error and "manifests/01-serviceaccount.yaml" in error
    assert out.getvalue() == ""

    email = "pneumonia-pipeline@my-project.iam.gserviceaccount.com"
    out = io.StringIO()
    assert main([*common, "--setup", "--gsa", email], out=out) == 0
    printed = [doc for doc in yaml.safe_load_all(out.getvalue()) if doc]
    (account,) = [doc for doc in printed if doc["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"][mf.GSA_ANNOTATION] == email
    assert {doc["kind"] for doc in printed} >= set(mf.SETUP_KINDS)

    assert main([*common, "--gsa", email], out=io.StringIO()) == 2  # without --setup it would do nothing
    assert "add --setup" in capsys.readouterr().err
    assert server.emulator.calls == []


def test_cli_rejects_an_unpinned_image_before_any_call(kubeconfig: Path, server: EmulatorThread,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["run", "--kubeconfig", str(kubeconfig), "--bucket", "gs://b", "--image", "r/p:latest"])
    assert status == 2
    assert ":latest" in capsys.readouterr().err
    assert server.emulator.calls == []


def seed_runs(client: kc.KubeClient, server: EmulatorThread) -> None:
    """An old finished run and a failed current one, as the Job controller would leave them."""
    controller = Controller(client, server, {})
    for run_id, stage in (("old-run", "preprocess"), (RUN_ID, "preprocess"), (RUN_ID, "train")):
        job = mf.stage_jobs(mf.build_manifests(mf.load_manifests(), run_config("gs://b/p", run_id=run_id)))[stage]
        if run_id == "old-run":
            job["metadata"]["name"] = "pneumonia-preprocess-old"
        client.create_job(job)
        if stage == "preprocess":
            controller.complete(job["metadata"]["name"])
    controller.pod("pneumonia-train", 0, "Failed", suffix="x", **exited("train", 137, "OOMKilled"))
    server.emulator.logs[(NAMESPACE, "pneumonia-train-0-x")] = (
        "2026-01-02T03:00:00.000000000Z {\"event\": \"epoch 1/2\"}\n"
        "2026-01-02T03:05:00.000000000Z {\"event\": \"killed\"}\n")
    controller.pod("pneumonia-train", 1, "Pending", suffix="y", containerStatuses=[{
        "name": "train", "image": "r/p:9", "imageID": "", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}}}])
    controller.job_status("pneumonia-train", failed=4, conditions=[
        {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "Job has failed indexes"}])


def test_status_logs_and_delete_subcommands(kubeconfig: Path, client: kc.KubeClient, server: EmulatorThread) -> None:
    seed_runs(client, server)
    common = ["--kubeconfig", str(kubeconfig), "--context", "kmock", "--namespace", NAMESPACE]

    out = io.StringIO()
    assert main(["status", *common], out=out) == 0
    assert out.getvalue().splitlines() == ["old-run: preprocess complete",
                                           f"{RUN_ID}: preprocess complete, train failed"]

    out = io.StringIO()
    assert main(["status", *common, "--run-id", RUN_ID], out=out) == ln.EXIT_FAILURE
    text = out.getvalue()
    assert "[preprocess] complete: 1/1 done" in text
    assert "Job pneumonia-train failed: FailedIndexes (an index ran out of its retries" in text
    assert "container train exited 137 (OOMKilled): killed (SIGKILL), usually out of memory" in text
    assert "cannot pull image r/p:9: manifest unknown" in text

    out = io.StringIO()
    assert main(["logs", *common, "--run-id", RUN_ID], out=out) == 0
    assert out.getvalue() == "{\"event\": \"epoch 1/2\"}\n{\"event\": \"killed\"}\n"

    out = io.StringIO()
    assert main(["delete", *common, "--run-id", RUN_ID, "--yes"], out=out) == 0
    assert out.getvalue().splitlines() == ["deleted Job pneumonia-preprocess", "deleted Job pneumonia-train"]
    assert [job.metadata.name for job in client.list_jobs(st.run_selector())] == ["pneumonia-preprocess-old"]


# --- pure pieces -----------------------------------------------------------------------------------

def model(kind: str, data: dict[str, Any]) -> Any:
    return kubernetes.client.ApiClient().deserialize(json.dumps(data), kind, "application/json")


def test_the_role_grants_exactly_what_the_launcher_checks() -> None:
    role = next(obj for obj in mf.load_manifests() if obj["kind"] == "Role")
    granted = {(verb, group, resource) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {(a.verb, a.group, f"{a.resource}/{a.subresource}" if a.subresource else a.resource)
              for a in (*kc.REQUIRED_ACCESS, *kc.KUEUE_ACCESS)}
    assert granted == needed  # the launcher polls: no watch, nothing beyond its needs


def test_matching_rule_follows_the_controller_order() -> None:
    job = mf.stage_jobs(mf.load_manifests())["train"]
    policy = model("V1Job", job).spec.pod_failure_policy
    disrupted = model("V1Pod", {"metadata": {"name": "p"}, "status": {
        "phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True"}], **exited("train", 143)}})
    assert st.matching_rule(policy, disrupted)[0] == 1  # the condition rule comes first
    preempted = model("V1Pod", {"metadata": {"name": "p"}, "status": {"phase": "Failed", **exited("train", 143)}})
    assert st.describe_rule(*st.matching_rule(policy, preempted)) == \
        "podFailurePolicy rule #2: Ignore on exit code In [143]"
    crashed = model("V1Pod", {"metadata": {"name": "p"}, "status": {"phase": "Failed", **exited("train", 1)}})
    assert st.matching_rule(policy, crashed) is None  # counted against the backoff limit


def test_a_condition_rule_matches_only_the_status_it_names() -> None:
    job = mf.stage_jobs(mf.load_manifests())["train"]
    policy = model("V1Job", job).spec.pod_failure_policy  # rule #1: Ignore on DisruptionTarget=True
    not_disrupted = model("V1Pod", {"metadata": {"name": "p"}, "status": {
        "phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "False"}], **exited("train", 2)}})
    assert st.describe_rule(*st.matching_rule(policy, not_disrupted)) == \
        "podFailurePolicy rule #4: FailJob on exit code In [2]"
    on_false = copy.deepcopy(job)
    on_false["spec"]["podFailurePolicy"]["rules"][0]["onPodConditions"][0]["status"] = "False"
    policy = model("V1Job", on_false).spec.pod_failure_policy
    assert st.describe_rule(*st.matching_rule(policy, not_disrupted)) == \
        "podFailurePolicy rule #1: Ignore on pod condition DisruptionTarget=False"


def failed_train_job(message: str, condition: str = "FailureTarget") -> Any:
    job = copy.deepcopy(mf.stage_jobs(mf.load_manifests())["train"])
    job["status"] = {"failed": 1, "conditions": [
        {"type": condition, "status": "True", "reason": "PodFailurePolicy", "message": message}]}
    return model("V1Job", job)


def test_the_failure_report_reads_the_rule_the_job_controller_named() -> None:
    """Since 1.31 the Job's FailureTarget condition names the rule; the pod it names may be gone already."""
    job = failed_train_job(f"Container train for pod {NAMESPACE}/pneumonia-train-1-x failed with exit code 2 "
                           "matching FailJob rule at index 3")
    state = st.job_state(job)
    fired = st.fired_rule(state, job.spec.pod_failure_policy)
    assert (fired.pod, fired.number, fired.container, fired.exit_code) == ("pneumonia-train-1-x", 4, "train", 2)
    # Another pod, failed earlier with exit 1 (counted): its rule still comes from matching, and there is none.
    crashed = model("V1Pod", {"metadata": {"name": "pneumonia-train-0-a", "labels": {mf.LABEL_COMPLETION_INDEX: "0"}},
                              "status": {"phase": "Failed", **exited("train", 1)}})
    text = "\n".join(st.failure_report("train", job, [crashed], state))
    assert "pod pneumonia-train-1-x: container train exited 2: bad input or config" in text
    assert "podFailurePolicy rule #4: FailJob on exit code In [2] (named by the Job controller)" in text
    assert "pod pneumonia-train-0-a (index 0): container train exited 1" in text
    assert text.count("podFailurePolicy rule #") == 1

    # The named pod is listed but its container statuses are gone: matching could not tell, the condition can.
    reaped = model("V1Pod", {"metadata": {"name": "pneumonia-train-1-x"}, "status": {"phase": "Failed"}})
    assert st.matching_rule(job.spec.pod_failure_policy, reaped) is None
    text = "\n".join(st.failure_report("train", job, [reaped], state))
    assert "podFailurePolicy rule #4: FailJob on exit code In [2] (named by the Job controller)" in text

    on_condition = failed_train_job(f"Pod {NAMESPACE}/pneumonia-train-0-b has condition DisruptionTarget matching "
                                    "FailJob rule at index 0")  # not this policy's action at index 0: no guess
    assert st.fired_rule(st.job_state(on_condition), on_condition.spec.pod_failure_policy) is None


def test_older_clusters_fall_back_to_matching_the_rules() -> None:
    job = failed_train_job("Job has failed because a pod failed", condition="Failed")  # no rule named
    state = st.job_state(job)
    assert st.fired_rule(state, job.spec.pod_failure_policy) is None
    failed = model("V1Pod", {"metadata": {"name": "pneumonia-train-1-x"},
                             "status": {"phase": "Failed", **exited("train", 2)}})
    text = "\n".join(st.failure_report("train", job, [failed], state))
    assert "podFailurePolicy rule #4: FailJob on exit code In [2]" in text and "named by" not in text


# kube-scheduler 1.36's own words, as tests/cluster/test_pending.py saw them on the local control plane
# (3 CPU nodes, 4 L4 nodes): the nodes of the other pool always fail the GPU pod's node selector.
_PREEMPTION = " no new claims to deallocate, preemption: 0/7 nodes are available: 7 Preemption is not helpful for scheduling."


@pytest.mark.parametrize(("message", "hint", "not_said"), [
    ("0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.", "no node has the pod's node", None),
    ("0/1 nodes are available: 1 Insufficient memory.", "enough free memory", None),
    ("0/4 nodes are available: 4 node(s) had untolerated taint {nvidia.com/gpu: present}.", "taint", None),
    ("0/7 nodes are available: 7 node(s) didn't match Pod's node affinity/selector." + _PREEMPTION,
     "no node has the pod's node labels", None),
    ("0/7 nodes are available: 3 node(s) didn't match Pod's node affinity/selector, 4 Insufficient cpu, "
     "4 Insufficient memory, 4 Insufficient nvidia.com/gpu." + _PREEMPTION,
     "not enough free nvidia.com/gpu (4 of 7 nodes)", "node labels"),
    ("0/7 nodes are available: 3 node(s) didn't match Pod's node affinity/selector, 4 node(s) had untolerated "
     "taint(s)." + _PREEMPTION, "taint the pod does not tolerate (4 of 7 nodes)", "node labels"),
])
def test_explain_pending_names_the_cause(message: str, hint: str, not_said: str | None) -> None:
    pod = model("V1Pod", {"metadata": {"name": "w-0"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]}})
    explanation = st.explain_pending(pod, [])
    assert explanation.startswith("w-0 cannot be scheduled: ") and hint in explanation and message in explanation
    if not_said:
        assert not_said not in explanation.split(". Scheduler: ")[0]


def test_log_cursor_prints_each_line_once_across_polls_and_pods() -> None:
    cursor = lg.LogCursor()
    first = "t1 a\nt1 b\nt2 c\n"
    assert cursor.new_lines("p", first) == ["a", "b", "c"]
    assert cursor.new_lines("p", first + "t2 d\nt3 e\n") == ["d", "e"]
    assert cursor.new_lines("p", "t3 e\n") == []  # a tail window that dropped older lines
    assert cursor.new_lines("q", "t1 x\n") == ["x"]  # a replacement pod starts over


@pytest.mark.gcs
def test_archive_upload_shows_progress_and_is_skipped_when_the_bucket_has_it(
        gcs_root: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pneumonia import storage
    from pneumonia.k8s.__main__ import _upload

    archive = tmp_path / "chest-xray.zip"
    archive.write_bytes(bytes(range(256)) * 12_000)  # ~3 MiB: several resumable chunks' worth of progress
    url = f"{gcs_root}/raw/chest-xray.zip"
    _upload(str(archive), url)
    first = capsys.readouterr().err
    assert "100%" in first and storage.read_bytes(url) == archive.read_bytes()
    _upload(str(archive), url)
    assert "already holds the same bytes; not uploaded again" in capsys.readouterr().err
