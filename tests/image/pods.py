"""Pure functions from a stage Job in manifests/ to the `podman run` flags that run its pod the same way.

The image test reads the pod settings from the manifests instead of copying them, so a change there
(a new volume, a capability added, another user) reaches the test or stops it: a setting this
module cannot reproduce is an error, never silently dropped. No podman and no I/O here, so
tests/test_image_pods.py checks it on any machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pneumonia.config import PipelineConfig, from_dict, parse_config_yaml
from pneumonia.k8s import manifests as mf

# Reproduced by a flag below, or true of every podman container already (RuntimeDefault is podman's
# default seccomp profile). Anything else in a securityContext is an error.
_POD_SECURITY_KEYS = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
_CONTAINER_SECURITY_KEYS = {"runAsNonRoot", "runAsUser", "runAsGroup", "allowPrivilegeEscalation",
                            "readOnlyRootFilesystem", "capabilities", "seccompProfile"}
_BINARY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
SHM_PATH = "/dev/shm"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class PodSettingError(ValueError):
    """A pod setting the image test does not know how to reproduce with podman."""


@dataclass(frozen=True)
class Pod:
    """One pod of a stage Job as podman runs it: `podman run <flags> <image> <args>`."""

    name: str
    flags: tuple[str, ...]
    args: tuple[str, ...]
    grace_period_s: int

    def command(self, image: str) -> list[str]:
        return ["podman", "run", "--rm", "--name", self.name, *self.flags, image, *self.args]


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes binary quantity (sizeLimit: 4Gi) in bytes."""
    for suffix, factor in _BINARY_UNITS.items():
        if quantity.endswith(suffix) and quantity[: -len(suffix)].isdigit():
            return int(quantity[: -len(suffix)]) * factor
    if quantity.isdigit():
        return int(quantity)
    raise PodSettingError(f"size {quantity!r}: the image test reads only whole Ki/Mi/Gi/Ti quantities")


def security_flags(pod_spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """User, group, capabilities, privilege escalation and root filesystem, container settings first."""
    pod_security = pod_spec.get("securityContext", {})
    security = container.get("securityContext", {})
    unknown = (set(pod_security) - _POD_SECURITY_KEYS) | (set(security) - _CONTAINER_SECURITY_KEYS)
    if unknown:
        raise PodSettingError(f"securityContext keys {sorted(unknown)} have no podman equivalent in the image test")
    for context in (pod_security, security):
        profile = context.get("seccompProfile", {}).get("type", "RuntimeDefault")
        if profile != "RuntimeDefault":
            raise PodSettingError(f"seccompProfile {profile!r}: only RuntimeDefault (podman's default) is reproduced")
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    group = security.get("runAsGroup", pod_security.get("runAsGroup"))
    if user is None or group is None:
        raise PodSettingError("the pod names no runAsUser/runAsGroup; the test would run as the image's user")
    if (security.get("runAsNonRoot") or pod_security.get("runAsNonRoot")) and user == 0:
        raise PodSettingError("runAsNonRoot with runAsUser 0: Kubernetes would refuse to start this pod")
    flags = ["--user", f"{user}:{group}"]
    if "fsGroup" in pod_security:
        # Kubernetes adds fsGroup to the process's groups (and owns the volumes with it).
        flags += ["--group-add", str(pod_security["fsGroup"])]
    capabilities = security.get("capabilities", {})
    flags += [f"--cap-drop={name.lower()}" for name in capabilities.get("drop", [])]
    flags += [f"--cap-add={name.lower()}" for name in capabilities.get("add", [])]
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if security.get("readOnlyRootFilesystem"):
        # podman would otherwise mount its own writable tmpfs on /tmp, /var/tmp and /run: only the
        # pod's emptyDirs may be writable.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    return flags


def volume_flags(pod_spec: dict[str, Any], container: dict[str, Any], config_dir: str | dict[str, str]) -> list[str]:
    """The container's mounts: emptyDirs as fresh tmpfs (mode 1777, as an emptyDir is world-writable),
    a ConfigMap or projected volume as a host folder mounted read-only (`config_dir`, or
    `config_dir[volume name]`: the kubelet stand-in writes a projected API token there),
    /dev/shm sized by its memory emptyDir."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    flags: list[str] = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        path = mount["mountPath"]
        if set(mount) - {"name", "mountPath", "readOnly"}:
            raise PodSettingError(f"volumeMount {mount['name']}: only name, mountPath and readOnly are reproduced")
        if "configMap" in volume or "projected" in volume:
            if not mount.get("readOnly"):
                raise PodSettingError(f"volume {mount['name']} mounted writable; the image test mounts it read-only")
            folder = config_dir if isinstance(config_dir, str) else config_dir[mount["name"]]
            flags += ["--volume", f"{folder}:{path}:ro"]
        elif "emptyDir" in volume:
            empty_dir = volume["emptyDir"] or {}
            size = quantity_bytes(empty_dir.get("sizeLimit", "1Gi"))
            if path == SHM_PATH:
                if empty_dir.get("medium") != "Memory":
                    raise PodSettingError(f"{SHM_PATH} emptyDir {mount['name']} must be medium: Memory")
                flags += [f"--shm-size={size}"]
            else:
                # A disk-backed emptyDir becomes tmpfs too: the demo data is small, and it starts
                # empty and goes away with the container, as an emptyDir does.
                flags += ["--tmpfs", f"{path}:rw,size={size},mode=1777"]
        else:
            raise PodSettingError(f"volume {mount['name']} is neither an emptyDir, a ConfigMap nor projected; "
                                  "teach tests/image/pods.py how to run it")
    return flags


def stage_pod(job: dict[str, Any], *, config_dir: str, data_root: tuple[str, str], index: int | None = None,
              network: tuple[str, ...] = ("--network", "none"), args: list[str] | None = None,
              drop_mounts: tuple[str, ...] = (), name: str | None = None) -> Pod:
    """Pod `index` of `job` (None: not an Indexed Job's pod) as podman flags.

    `data_root` = (host folder, container path): the stand-in for the bucket the pods reach over the
    network, the only mount the manifests do not have. `args` replaces the container's args (the demo
    archive is made by a pod with the preprocess settings, called `name`); `drop_mounts` leaves mounts
    out (the negative control).
    """
    spec = mf.pod_spec(job)
    (container,) = spec["containers"]
    if container.get("command"):
        raise PodSettingError(f"{job['metadata']['name']}: command is not reproduced by the image test")
    job_name = job["metadata"]["name"]
    indexed = job["spec"].get("completionMode") == "Indexed"
    if indexed != (index is not None):
        raise PodSettingError(f"{job_name}: an index is needed exactly for an Indexed Job's pods")
    # The pod as the Job controller would make it, for the downward-API env (a first attempt: no counts).
    annotations = {"batch.kubernetes.io/job-completion-index": str(index)} if indexed else {}
    pod = {"metadata": {"name": name or job_name, "namespace": job["metadata"].get("namespace", ""),
                        "labels": {**job["spec"]["template"]["metadata"].get("labels", {}),
                                   "batch.kubernetes.io/controller-uid": "image-test"},
                        "annotations": annotations}, "spec": spec}
    # An Indexed Job's pod is called <job>-<index> and has that hostname; Kubernetes sets the index.
    hostname = f"{job_name}-{index}" if indexed else job_name
    flags = [*security_flags(spec, container)]
    # No API server here: the pod runs as one without a token (evaluate then goes by its files alone).
    drop_mounts = (*drop_mounts, SERVICE_ACCOUNT_DIR)
    kept = {**container, "volumeMounts": [m for m in container.get("volumeMounts", []) if m["mountPath"] not in drop_mounts]}
    flags += volume_flags(spec, kept, config_dir)
    flags += ["--volume", f"{data_root[0]}:{data_root[1]}:rw", "--hostname", hostname, *network]
    flags += env_flags(pod, container)
    if indexed:
        flags += ["--env", f"JOB_COMPLETION_INDEX={index}"]
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    flags += ["--stop-timeout", str(grace)]
    return Pod(name=name or hostname, flags=tuple(flags), args=tuple(args or container["args"]),
               grace_period_s=grace)


def worker_hosts(job: dict[str, Any], addresses: list[str]) -> list[str]:
    """`--add-host` flags giving worker i the name `<job>-<i>.<subdomain>` (the headless Service's
    record on the cluster) at addresses[i]."""
    spec = mf.pod_spec(job)
    subdomain = spec.get("subdomain")
    if not subdomain:
        raise PodSettingError(f"{job['metadata']['name']} has no subdomain: its workers could not find each other")
    if len(addresses) != job["spec"]["completions"]:
        raise PodSettingError(f"{len(addresses)} addresses for {job['spec']['completions']} workers")
    name = job["metadata"]["name"]
    return [flag for i, address in enumerate(addresses) for flag in ("--add-host", f"{name}-{i}.{subdomain}:{address}")]


# --- a pod from the API server, as the cluster test bed's kubelet stand-in runs it -----------------

_FIELD_PATHS = {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace"),
                "metadata.uid": ("metadata", "uid"), "spec.nodeName": ("spec", "nodeName"),
                "spec.serviceAccountName": ("spec", "serviceAccountName"), "status.hostIP": ("status", "hostIP"),
                "status.podIP": ("status", "podIP")}


def field_value(pod: dict[str, Any], field_path: str, pod_ip: str = "") -> str:
    """A downward-API fieldRef as the kubelet resolves it: metadata.labels['k'],
    metadata.annotations['k'] (how the Job controller hands a pod JOB_COMPLETION_INDEX) or a plain field."""
    for kind in ("labels", "annotations"):
        prefix = f"metadata.{kind}['"
        if field_path.startswith(prefix) and field_path.endswith("']"):
            return pod["metadata"].get(kind, {}).get(field_path[len(prefix):-2], "")
    if field_path == "status.podIP" and pod_ip:
        return pod_ip
    if field_path not in _FIELD_PATHS:
        raise PodSettingError(f"fieldRef {field_path!r} is not resolved by the test bed's kubelet")
    section, key = _FIELD_PATHS[field_path]
    return str(pod.get(section, {}).get(key, ""))


def env_flags(pod: dict[str, Any], container: dict[str, Any], pod_ip: str = "") -> list[str]:
    """`--env` for each of the container's env entries: plain values and downward-API fieldRefs.
    `$(VAR)` references and secret/configMap keys are not resolved: an error, never dropped."""
    flags: list[str] = []
    if container.get("envFrom"):
        raise PodSettingError(f"container {container['name']}: envFrom is not reproduced")
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            source = entry["valueFrom"]
            if set(source) != {"fieldRef"}:
                raise PodSettingError(f"env {entry['name']}: only fieldRef sources are reproduced, not {sorted(source)}")
            value = field_value(pod, source["fieldRef"]["fieldPath"], pod_ip)
        else:
            value = entry.get("value", "")
            if "$(" in value:
                raise PodSettingError(f"env {entry['name']}: $(VAR) references are not expanded")
        flags += ["--env", f"{entry['name']}={value}"]
    return flags


def api_pod(pod: dict[str, Any], *, name: str, config_dirs: dict[str, str],
            network: tuple[str, ...] = ("--network", "none"), extra: tuple[str, ...] = ()) -> Pod:
    """A pod object as the API server holds it (one container) as podman flags: its command and args,
    env and downward-API values, hostname, volumes (ConfigMaps from `config_dirs`, by volume name),
    securityContext and memory limit. `extra` is what the node adds (labels, log file, the bucket's
    credentials)."""
    spec = pod["spec"]
    if spec.get("initContainers") or len(spec["containers"]) != 1:
        raise PodSettingError(f"pod {pod['metadata']['name']}: only single-container pods are run")
    (container,) = spec["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            raise PodSettingError(f"container {container['name']}: {probe} is not run by the test bed's kubelet")
    flags = [*security_flags(spec, container), *volume_flags(spec, container, config_dirs)]
    flags += ["--hostname", spec.get("hostname") or pod["metadata"]["name"], *network]
    flags += env_flags(pod, container)
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    if memory:
        flags += ["--memory", str(quantity_bytes(memory))]
    if container.get("workingDir"):
        flags += ["--workdir", container["workingDir"]]
    args = list(container.get("args", []))
    if container.get("command"):
        # The pod's command replaces the image's ENTRYPOINT, as on Kubernetes.
        flags += ["--entrypoint", json.dumps(container["command"])]
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    flags += ["--stop-timeout", str(grace), *extra]
    return Pod(name=name, flags=tuple(flags), args=tuple(args), grace_period_s=grace)


def image_test_config(cluster_yaml: str, demo_yaml: str, *, data_root: str, run_id: str, archive: str | None = None,
                      shard_workers: int = 2, upstream_wait_timeout_s: int = 60, **train: Any) -> PipelineConfig:
    """jobs/configs/cluster.yaml at the demo's size: its cluster section (names, port, worker count) as
    the manifests expect it, demo.yaml's small model and images, two shard pods, data under
    `data_root` (a folder standing in for the bucket) and short waits (the stages run one after another)."""
    tree = parse_config_yaml(cluster_yaml, "jobs/configs/cluster.yaml")
    for section, values in parse_config_yaml(demo_yaml, "jobs/configs/demo.yaml").items():
        if section != "data":
            tree.setdefault(section, {}).update(values)
    tree["data"] = {"root": data_root, "archive": archive or f"{data_root}/raw/demo-chest-xray.zip"}
    tree.setdefault("shard", {})["num_workers"] = shard_workers
    tree.setdefault("train", {}).update(run_id=run_id, **train)
    tree["cluster"].update(peer_wait_timeout_s=120, upstream_wait_timeout_s=upstream_wait_timeout_s)
    return from_dict(tree).validate()
