"""The image test's pure part (tests/image/pods.py): pod settings read from manifests/ into podman flags.

No podman needed: `make image-test` runs these flags for real.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest

from pneumonia import cluster
from pneumonia.config import load_config
from pneumonia.k8s import manifests as mf

sys.path.insert(0, str(Path(__file__).parent / "image"))
import pods  # noqa: E402

DATA_ROOT = ("/host/bucket", "/bucket/pneumonia")


def demo_objects(**train: object) -> list[dict]:
    config = pods.image_test_config(mf.CLUSTER_CONFIG.read_text(), (mf.REPO_ROOT / "jobs/configs/demo.yaml").read_text(),
                                    data_root=DATA_ROOT[1], run_id="image-test", **train)
    return mf.build_manifests(mf.load_manifests(), config)


def pod_of(job: dict, **options: object) -> pods.Pod:
    index = 0 if job["spec"].get("completionMode") == "Indexed" else None
    return pods.stage_pod(job, config_dir="/host/configmap", data_root=DATA_ROOT, index=index, **options)


def writable_mounts(flags: tuple[str, ...]) -> set[str]:
    paths = set()
    for flag, value in zip(flags, flags[1:], strict=False):
        if flag == "--tmpfs":
            paths.add(value.split(":")[0])
        elif flag == "--volume" and not value.endswith(":ro"):
            paths.add(value.split(":")[1])
    return paths


@pytest.mark.parametrize("stage", mf.STAGES)
def test_every_stage_pod_runs_as_its_manifest_says(stage: str) -> None:
    job = mf.stage_jobs(mf.load_manifests())[stage]
    pod = pod_of(job)
    flags = pod.flags
    assert flags[flags.index("--user") + 1] == "10001:10001"
    assert "--cap-drop=all" in flags and not any(f.startswith("--cap-add") for f in flags)
    assert flags[flags.index("--security-opt") + 1] == "no-new-privileges"
    assert "--read-only" in flags and "--read-only-tmpfs=false" in flags
    assert "/host/configmap:/etc/pneumonia:ro" in flags
    # Only the pod's emptyDir and the stand-in for the bucket are writable.
    assert writable_mounts(flags) == {"/tmp", DATA_ROOT[1]}
    assert flags[flags.index("--network") + 1] == "none"
    assert pod.args == tuple(mf.pod_spec(job)["containers"][0]["args"])
    assert pod.grace_period_s == mf.pod_spec(job)["terminationGracePeriodSeconds"]
    assert pod.command("img")[:4] == ["podman", "run", "--rm", "--name"] and "img" in pod.command("img")


def test_emptydir_sizes_and_shared_memory_come_from_the_manifests() -> None:
    jobs = mf.stage_jobs(mf.load_manifests())
    train = pod_of(jobs["train"]).flags
    assert f"--shm-size={4 * 2**30}" in train
    assert f"/tmp:rw,size={8 * 2**30},mode=1777" in train
    assert f"--shm-size={4 * 2**30}" not in pod_of(jobs["preprocess"]).flags
    assert pods.quantity_bytes("512Mi") == 512 * 2**20
    with pytest.raises(pods.PodSettingError, match="1.5Gi"):
        pods.quantity_bytes("1.5Gi")


def test_settings_are_read_not_copied() -> None:
    job = copy.deepcopy(mf.stage_jobs(mf.load_manifests())["evaluate"])
    spec = mf.pod_spec(job)
    spec["securityContext"].update(runAsUser=4242, runAsGroup=4343, fsGroup=4444)
    spec["containers"][0]["securityContext"].update(runAsUser=4242, readOnlyRootFilesystem=False)
    spec["containers"][0]["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    flags = pod_of(job).flags
    assert flags[flags.index("--user") + 1] == "4242:4343"
    assert flags[flags.index("--group-add") + 1] == "4444"
    assert "--cap-add=net_bind_service" in flags
    assert "--read-only" not in flags


@pytest.mark.parametrize("change, message", [
    (lambda spec: spec["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    (lambda spec: spec["securityContext"].update(seccompProfile={"type": "Unconfined"}), "Unconfined"),
    (lambda spec: spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
     or spec["containers"][0]["volumeMounts"].append({"name": "host", "mountPath": "/host"}), "host"),
    (lambda spec: spec["containers"][0].update(env=[{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]),
     "secretKeyRef"),
    (lambda spec: spec["containers"][0].update(command=["sh"]), "command"),
    (lambda spec: spec["containers"][0]["volumeMounts"][0].update(readOnly=False), "writable"),
    (lambda spec: spec["securityContext"].update(runAsUser=0) or spec["containers"][0]["securityContext"]
     .update(runAsUser=0), "runAsNonRoot"),
])
def test_a_setting_it_cannot_reproduce_is_an_error(change, message: str) -> None:
    job = copy.deepcopy(mf.stage_jobs(mf.load_manifests())["preprocess"])
    change(mf.pod_spec(job))
    with pytest.raises(pods.PodSettingError, match=message):
        pod_of(job)


def test_indexed_pods_get_their_index_and_hostname() -> None:
    shard = mf.stage_jobs(demo_objects())["shard"]
    assert shard["spec"]["completions"] == 2
    flags = pods.stage_pod(shard, config_dir="/c", data_root=DATA_ROOT, index=1).flags
    assert "JOB_COMPLETION_INDEX=1" in flags and flags[flags.index("--hostname") + 1] == "pneumonia-shard-1"
    with pytest.raises(pods.PodSettingError, match="Indexed"):
        pods.stage_pod(shard, config_dir="/c", data_root=DATA_ROOT, index=None)
    with pytest.raises(pods.PodSettingError, match="Indexed"):
        pods.stage_pod(mf.stage_jobs(demo_objects())["evaluate"], config_dir="/c", data_root=DATA_ROOT, index=0)


def test_the_negative_control_drops_only_the_named_mount() -> None:
    job = mf.stage_jobs(mf.load_manifests())["preprocess"]
    flags = pod_of(job, drop_mounts=("/tmp",), name="no-tmp").flags
    assert writable_mounts(flags) == {DATA_ROOT[1]}
    assert "/host/configmap:/etc/pneumonia:ro" in flags and "--read-only" in flags


def test_workers_resolve_by_the_names_tf_config_lists() -> None:
    objects = demo_objects()
    train = mf.stage_jobs(objects)["train"]
    flags = pods.worker_hosts(train, ["10.0.0.10", "10.0.0.11"])
    config = pods.image_test_config(mf.CLUSTER_CONFIG.read_text(), "{}", data_root="/d", run_id="r").cluster
    listed = cluster.build_tf_config(0, config.num_workers, config.train_job_name, config.train_service_name,
                                     config.worker_port)["cluster"]["worker"]
    assert flags[1::2] == [f"{address.rpartition(':')[0]}:{ip}" for address, ip in zip(listed, ["10.0.0.10", "10.0.0.11"],
                                                                                         strict=True)]
    with pytest.raises(pods.PodSettingError, match="3 addresses for 2"):
        pods.worker_hosts(train, ["a", "b", "c"])


def test_the_configmap_is_the_cluster_config_at_demo_size() -> None:
    objects = demo_objects(epochs=60)
    (configmap,) = [obj for obj in objects if obj["kind"] == "ConfigMap"]
    rendered = configmap["data"][mf.CONFIG_MAP_KEY]
    config = pods.image_test_config(mf.CLUSTER_CONFIG.read_text(), (mf.REPO_ROOT / "jobs/configs/demo.yaml").read_text(),
                                    data_root=DATA_ROOT[1], run_id="image-test", epochs=60)
    assert mf.render_config(config) == rendered
    assert config.data.root == DATA_ROOT[1] and config.model.name == "small_cnn" and config.train.epochs == 60
    assert config.shard.num_workers == 2 and config.train.run_id == "image-test"
    # The cluster section as the manifests expect it; only the waits are shorter.
    as_written = load_config(mf.CLUSTER_CONFIG).cluster
    assert dataclasses.replace(config.cluster, peer_wait_timeout_s=as_written.peer_wait_timeout_s,
                               upstream_wait_timeout_s=as_written.upstream_wait_timeout_s) == as_written
    assert config.cluster.train_job_name == mf.stage_jobs(objects)["train"]["metadata"]["name"]


# --- pods from the API server, as the cluster test bed's kubelet stand-in runs them ----------------


def api_pod_object(index: int = 1) -> dict:
    """The train Job's pod as the Job controller creates it: the index as an annotation, the env var a
    downward-API fieldRef to it, the hostname set (an Indexed Job with a subdomain)."""
    job = mf.stage_jobs(mf.load_manifests())["train"]
    spec = copy.deepcopy(mf.pod_spec(job))
    spec["containers"][0]["env"] = [{"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "apiVersion": "v1", "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "COMPONENT", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app.kubernetes.io/component']"}}},
        {"name": "PLAIN", "value": "x"}]
    spec.update(hostname=f"pneumonia-train-{index}", nodeName="gpu-0")
    return {"metadata": {"name": f"pneumonia-train-{index}-abcde", "namespace": "pneumonia", "uid": "u-1",
                         "labels": {"app.kubernetes.io/component": "train"},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": spec, "status": {}}


def test_an_api_pod_gets_its_downward_api_values_hostname_and_volumes() -> None:
    pod = pods.api_pod(api_pod_object(1), name="c", config_dirs={"config": "/host/pod/config"})
    flags = pod.flags
    env = [value for flag, value in zip(flags, flags[1:], strict=False) if flag == "--env"]
    assert env == ["JOB_COMPLETION_INDEX=1", "COMPONENT=train", "PLAIN=x"]
    assert flags[flags.index("--hostname") + 1] == "pneumonia-train-1"
    assert "/host/pod/config:/etc/pneumonia:ro" in flags
    assert flags[flags.index("--memory") + 1] == str(24 * 2**30)
    assert writable_mounts(flags) == {"/tmp"}  # no bucket folder: the pods reach the bucket over the network
    assert pod.args == ("/opt/pneumonia/jobs/train.py", "--config", "/etc/pneumonia/config.yaml")
    assert "--entrypoint" not in flags and pod.grace_period_s == 120


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(command=["sh", "-c"], args=["exit 3"]), None),
    (lambda c: c["env"].append({"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}), "secretKeyRef"),
    (lambda c: c["env"].append({"name": "R", "value": "$(PLAIN)/x"}), "references"),
    (lambda c: c["env"].append({"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "spec.priority"}}}), "spec.priority"),
    (lambda c: c.update(readinessProbe={"exec": {"command": ["true"]}}), "readinessProbe"),
])
def test_an_api_pod_runs_its_command_and_refuses_what_it_cannot_reproduce(change, message: str | None) -> None:
    pod = api_pod_object()
    change(pod["spec"]["containers"][0])
    if message is None:
        flags = pods.api_pod(pod, name="c", config_dirs={"config": "/c"})
        assert flags.flags[flags.flags.index("--entrypoint") + 1] == '["sh", "-c"]' and flags.args == ("exit 3",)
        return
    with pytest.raises(pods.PodSettingError, match=message):
        pods.api_pod(pod, name="c", config_dirs={"config": "/c"})


def test_the_kubelet_stand_in_gives_a_jobs_hostnames_fixed_addresses() -> None:
    """Replacements of a worker get its address again, and every worker knows all its Job's names: the
    image's /etc/hosts is written once, at container start (no DNS plugin on this machine's podman)."""
    sys.path.insert(0, str(Path(__file__).parent / "cluster"))
    import json

    import kubelet

    class Jobs:
        def read_namespaced_job(self, name, namespace, _preload_content):  # noqa: ANN001, ANN202
            return type("Response", (), {"data": json.dumps({"spec": {"completions": 2}})})

    stand_in = object.__new__(kubelet.Kubelet)
    stand_in.batch, stand_in.fixed, stand_in.hosts = Jobs(), {}, ["10.0.0.10", "10.0.0.11", "10.0.0.12"]
    pod = api_pod_object(1)
    pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] = "pneumonia-train"
    flags = stand_in.pod_addresses(pod)
    again = stand_in.pod_addresses(pod)  # the index's next pod
    assert flags == again and flags[:2] == ("--ip", "10.0.0.11")
    hosts = [value for flag, value in zip(flags, flags[1:], strict=False) if flag == "--add-host"]
    assert "pneumonia-train-0.pneumonia-train-workers:10.0.0.10" in hosts
    assert "pneumonia-train-1.pneumonia-train-workers.pneumonia.svc.cluster.local:10.0.0.11" in hosts
    assert kubelet.podman_time("2026-12-06T10:51:02.123456789Z") == "2026-12-06T10:51:02Z"
    assert kubelet.podman_time("2026-12-06T11:51:02.5+01:00") == "2026-12-06T10:51:02Z"


def test_evaluates_api_token_is_mounted_by_the_stand_in_kubelet_and_left_out_without_an_api_server() -> None:
    evaluate = mf.stage_jobs(demo_objects())["evaluate"]
    # The image test has no API server: the pod runs as one without a token.
    assert not any(pods.SERVICE_ACCOUNT_DIR in flag for flag in pod_of(evaluate).flags)
    # The kubelet stand-in writes the projected volume (token, ca.crt, namespace) and mounts it read-only.
    pod = {"metadata": {"name": "pneumonia-evaluate-x", "namespace": "pneumonia", "uid": "u-2", "labels": {}},
           "spec": mf.pod_spec(evaluate), "status": {}}
    flags = pods.api_pod(pod, name="c", config_dirs={"config": "/c", "kube-api-access": "/host/pod/token"}).flags
    assert f"/host/pod/token:{pods.SERVICE_ACCOUNT_DIR}:ro" in flags
