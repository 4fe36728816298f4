"""Pure functions from (manifests/, config) to the objects a run applies: no API calls, no I/O but reading YAML.

`manifests/` is the one source of truth: patching it with jobs/configs/cluster.yaml gives it back
unchanged (a test checks this), so `kubectl apply -f manifests/` and the launcher run the same objects.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from pneumonia.config import PipelineConfig
from pneumonia.errors import ConfigError

# src/pneumonia/k8s/manifests.py -> the repository root holds manifests/ and jobs/configs/.
REPO_ROOT = Path(__file__).resolve().parents[3]
MANIFEST_DIR = REPO_ROOT / "manifests"
CLUSTER_CONFIG = REPO_ROOT / "jobs" / "configs" / "cluster.yaml"

STAGES: tuple[str, ...] = ("preprocess", "shard", "train", "evaluate")
CONFIG_MAP_KEY = "config.yaml"
CONFIG_PATH = "/etc/pneumonia/config.yaml"

APP_NAME = "pneumonia"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
# Set by the Job controller on every pod it creates.
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"
LABEL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# Workload Identity: the Google service account the pods' Kubernetes ServiceAccount acts as.
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"
GSA_PLACEHOLDER = "@PROJECT."
SERVICE_ACCOUNT_MANIFEST = "manifests/01-serviceaccount.yaml"

UPSTREAM_WAIT_KEY = "cluster.upstream_wait_timeout_s"

# Kueue admits a Job through the LocalQueue this label names (cluster.queue_name).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = "cloud.google.com/gke-accelerator"

# Objects made once per namespace by someone allowed to create RBAC (`--setup` or kubectl apply);
# the rest (ConfigMap, Service, Jobs) are per run.
SETUP_KINDS = ("Namespace", "ServiceAccount", "Role", "RoleBinding")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")
_BINARY_SMALLER = {"Ti": "Gi", "Gi": "Mi", "Mi": "Ki"}
_GSA_EMAIL = re.compile(r"^[a-z0-9][-a-z0-9._]*@[a-z0-9][-a-z0-9.]*\.gserviceaccount\.com$")


def load_manifests(folder: str | Path = MANIFEST_DIR) -> list[dict[str, Any]]:
    """Every manifests/*.yaml in file-name order (the apply order); one resource per file."""
    objects = []
    for path in sorted(Path(folder).glob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        if len(documents) != 1:
            raise ConfigError(f"{path} must hold exactly one resource, found {len(documents)}")
        objects.append(documents[0])
    if not objects:
        raise ConfigError(f"no manifests (*.yaml) in {folder}")
    return objects


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (the ConfigMap's config.yaml) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """The objects as one multi-document YAML stream, in order (what --dry-run prints)."""
    return "".join("---\n" + yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False) for obj in objects)


def render_config(config: PipelineConfig) -> str:
    """The ConfigMap's config.yaml: the `cluster` section in full (the manifests depend on it), other
    sections only where they differ from the defaults in code."""
    defaults = PipelineConfig().to_dict()
    tree: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        if section == "cluster":
            tree[section] = values
            continue
        changed = {key: value for key, value in values.items() if value != defaults[section][key]}
        if changed:
            tree[section] = changed
    return yaml.safe_dump(tree, sort_keys=False)


def with_launch_options(config: PipelineConfig, *, bucket: str | None = None, image: str | None = None,
                        namespace: str | None = None, num_workers: int | None = None,
                        gpus_per_worker: int | None = None, gpu_type: str | None = None,
                        run_id: str | None = None, archive: str | None = None,
                        queue_name: str | None = None) -> PipelineConfig:
    """The config with the launcher's flags applied; `bucket` moves data.root (and an archive under it)."""
    data, cluster, train = config.data, config.cluster, config.train
    if bucket is not None:
        bucket = bucket.rstrip("/")
        old_root = data.root.rstrip("/")
        moved_archive = data.archive
        if data.archive.startswith(old_root + "/"):
            moved_archive = bucket + data.archive[len(old_root):]
        data = dataclasses.replace(data, root=bucket, archive=moved_archive)
    if archive is not None:
        data = dataclasses.replace(data, archive=archive)
    updates = {"image": image, "namespace": namespace, "num_workers": num_workers,
               "gpus_per_worker": gpus_per_worker, "gpu_type": gpu_type, "queue_name": queue_name}
    cluster = dataclasses.replace(cluster, **{key: value for key, value in updates.items() if value is not None})
    if run_id is not None:
        train = dataclasses.replace(train, run_id=run_id)
    return config.replace(data=data, cluster=cluster, train=train).validate()


def check_launchable(config: PipelineConfig) -> None:
    """What Kubernetes would reject later (names, label values, image pins), named by config key."""
    cluster = config.cluster
    check_image(cluster.image)
    for key, value in (("cluster.namespace", cluster.namespace), ("cluster.train_job_name", cluster.train_job_name),
                       ("cluster.train_service_name", cluster.train_service_name)):
        if not _DNS_LABEL.match(value) or len(value) > 63:
            raise ConfigError(f"config key {key} = {value!r} is invalid: expected a DNS label "
                              "(lower-case letters, digits and '-', starting with a letter, at most 63)")
    # Indexed Job pods are named <job>-<index>, which must itself be a DNS label (the pod's hostname).
    longest = f"{cluster.train_job_name}-{cluster.num_workers - 1}"
    if len(longest) > 63:
        raise ConfigError(f"config key cluster.train_job_name = {cluster.train_job_name!r} is too long: "
                          f"pod hostname {longest!r} exceeds 63 characters")
    run_id = config.train.run_id
    if not run_id or len(run_id) > 63 or not _LABEL_VALUE.match(run_id):
        raise ConfigError(f"config key train.run_id = {run_id!r} is invalid: expected a Kubernetes label value "
                          "(at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric)")
    if cluster.gpus_per_worker > 0 and not cluster.gpu_type:
        raise ConfigError("config key cluster.gpu_type is empty: expected a GKE accelerator such as nvidia-l4")
    if not config.data.root.startswith("gs://"):
        raise ConfigError(f"config key data.root = {config.data.root!r} is invalid: pods need a gs:// bucket")
    bucket_name = config.data.root[len("gs://"):].split("/", 1)[0]
    if not _BUCKET_NAME.match(bucket_name):
        raise ConfigError(f"config key data.root = {config.data.root!r} does not name a real bucket "
                          "(still the gs://BUCKET placeholder?): pass --bucket gs://your-bucket/prefix")


def check_image(image: str) -> None:
    """Images are pinned (a tag other than `latest`, or a digest) and not the placeholder."""
    if not image:
        raise ConfigError("config key cluster.image is empty: expected a pinned image such as "
                          "europe-west4-docker.pkg.dev/my-project/pneumonia/pneumonia:0.1.0")
    reference, _, digest = image.partition("@")
    # A tag follows the last ':' after the last '/' (an earlier ':' is a registry port).
    repository, tag = reference, ""
    if ":" in reference.rsplit("/", 1)[-1]:
        repository, _, tag = reference.rpartition(":")
    if repository != repository.lower():
        raise ConfigError(f"config key cluster.image = {image!r} is invalid: image repositories are lower-case "
                          "(still the REGION-docker.pkg.dev/PROJECT/... placeholder?): pass --image")
    if digest:
        return
    if not tag:
        raise ConfigError(f"config key cluster.image = {image!r} has no tag: pin a version (or a digest)")
    if tag == "latest":
        raise ConfigError(f"config key cluster.image = {image!r} uses :latest: pin a version (or a digest)")


def with_gcp_service_account(objects: list[dict[str, Any]], email: str) -> list[dict[str, Any]]:
    """The objects (never mutated) with the ServiceAccounts' Workload Identity annotation set to `email`."""
    if not _GSA_EMAIL.match(email) or GSA_PLACEHOLDER in email:
        raise ConfigError(f"--gsa {email!r} is not a Google service account email "
                          "(NAME@PROJECT_ID.iam.gserviceaccount.com)")
    objects = copy.deepcopy(objects)
    for obj in objects:
        if obj["kind"] == "ServiceAccount":
            obj["metadata"].setdefault("annotations", {})[GSA_ANNOTATION] = email
    return objects


def check_gcp_service_account(objects: list[dict[str, Any]]) -> None:
    """The ServiceAccounts name a real Google service account, not the manifest's @PROJECT. placeholder
    (pods would then fail every bucket access with exit 1 and never say why)."""
    for obj in objects:
        if obj["kind"] != "ServiceAccount":
            continue
        email = (obj["metadata"].get("annotations") or {}).get(GSA_ANNOTATION, "")
        if not email or GSA_PLACEHOLDER in email:
            raise ConfigError(
                f"ServiceAccount {obj['metadata']['name']} has annotation {GSA_ANNOTATION}={email or '(none)'}, "
                f"the placeholder of {SERVICE_ACCOUNT_MANIFEST}: pass --gsa NAME@PROJECT_ID.iam.gserviceaccount.com "
                "(the Google service account that can read and write the bucket; "
                "see docs/cluster.md, \"Prerequisites\") or edit the manifest")


def build_manifests(manifests: list[dict[str, Any]], config: PipelineConfig,
                    managed_by: str | None = None) -> list[dict[str, Any]]:
    """The manifests patched from the config (never mutated): namespace, run id, image, bucket, sizes, GPUs,
    Kueue queue."""
    objects = copy.deepcopy(manifests)
    for obj in objects:
        _patch_common(obj, config, managed_by)
        kind = obj["kind"]
        if kind == "ConfigMap":
            obj["data"][CONFIG_MAP_KEY] = render_config(config)
        elif kind == "Service":
            _patch_service(obj, config)
        elif kind == "Role":
            _patch_job_names(obj, config)
        elif kind == "Job":
            _patch_queue(obj, config)
            stage = job_stage(obj)
            if stage == "shard":
                obj["spec"]["completions"] = obj["spec"]["parallelism"] = config.shard.num_workers
            elif stage == "train":
                _patch_train_job(obj, config)
    return objects


def job_stage(obj: dict[str, Any]) -> str | None:
    """The pipeline stage of a Job (its component label), or None for other objects."""
    if obj.get("kind") != "Job":
        return None
    return obj["metadata"].get("labels", {}).get(LABEL_COMPONENT)


def stage_jobs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Jobs by stage, in pipeline order."""
    jobs = {job_stage(obj): obj for obj in objects if obj.get("kind") == "Job"}
    return {stage: jobs[stage] for stage in STAGES if stage in jobs}


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container of a Job's pod template (init containers too)."""
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def memory_volumes(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's memory-backed emptyDir volumes (/dev/shm): their pages count against the memory limit."""
    return [volume for volume in pod_spec(job).get("volumes", [])
            if (volume.get("emptyDir") or {}).get("medium") == "Memory"]


def without_upstream_waits(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects (never mutated) for the launcher, which creates each Job only once the one before it
    completed: a Job's own `--set cluster.upstream_wait_timeout_s=N` (evaluate waits for the whole
    training under `kubectl apply`) becomes 0, and its activeDeadlineSeconds loses those N seconds, so a
    run that ended without its marker fails evaluate at once instead of holding its pod for hours."""
    objects = copy.deepcopy(objects)
    for obj in objects:
        if obj.get("kind") != "Job":
            continue
        for container in containers(obj):
            args = container.get("args", [])
            for position, arg in enumerate(args):
                key, _, value = arg.partition("=")
                if position and args[position - 1] == "--set" and key == UPSTREAM_WAIT_KEY:
                    args[position] = f"{UPSTREAM_WAIT_KEY}=0"
                    obj["spec"]["activeDeadlineSeconds"] -= int(value)
    return objects


def _patch_common(obj: dict[str, Any], config: PipelineConfig, managed_by: str | None) -> None:
    namespace = config.cluster.namespace
    metadata = obj["metadata"]
    if obj["kind"] == "Namespace":
        metadata["name"] = namespace
    else:
        metadata["namespace"] = namespace
    for subject in obj.get("subjects", []):
        if subject.get("kind") == "ServiceAccount":
            subject["namespace"] = namespace
    label_sets = [metadata.setdefault("labels", {})]
    if obj["kind"] == "Job":
        label_sets.append(obj["spec"]["template"]["metadata"].setdefault("labels", {}))
        for container in containers(obj):
            container["image"] = config.cluster.image
    for labels in label_sets:
        # Only per-run objects carry the run id; the namespace-wide ones outlive runs.
        if LABEL_INSTANCE in labels:
            labels[LABEL_INSTANCE] = config.train.run_id
        if managed_by and LABEL_MANAGED_BY in labels:
            labels[LABEL_MANAGED_BY] = managed_by


def _patch_queue(job: dict[str, Any], config: PipelineConfig) -> None:
    """cluster.queue_name decides, for every Job alike: set, the Job carries Kueue's queue label and is
    created suspended (Kueue unsuspends it once the quota for all of its pods is admitted); empty, neither."""
    labels = job["metadata"].setdefault("labels", {})
    queue = config.cluster.queue_name
    if queue:
        labels[QUEUE_LABEL] = queue
        job["spec"]["suspend"] = True
    elif labels.pop(QUEUE_LABEL, None) is not None:
        job["spec"].pop("suspend", None)


def _patch_service(obj: dict[str, Any], config: PipelineConfig) -> None:
    obj["metadata"]["name"] = config.cluster.train_service_name
    for port in obj["spec"]["ports"]:
        port["port"] = port["targetPort"] = config.cluster.worker_port


def _patch_job_names(role: dict[str, Any], config: PipelineConfig) -> None:
    """A rule naming Jobs (the evaluate pod's `get` on the train Job) names the train Job of this config."""
    for rule in role.get("rules", []):
        if "jobs" in rule.get("resources", []) and rule.get("resourceNames"):
            rule["resourceNames"] = [config.cluster.train_job_name]


def _patch_train_job(job: dict[str, Any], config: PipelineConfig) -> None:
    cluster = config.cluster
    job["metadata"]["name"] = cluster.train_job_name
    job["spec"]["completions"] = job["spec"]["parallelism"] = cluster.num_workers
    spec = pod_spec(job)
    spec["subdomain"] = cluster.train_service_name
    (container,) = spec["containers"]
    for port in container.get("ports", []):
        port["containerPort"] = cluster.worker_port
    resources = container["resources"]
    current_gpus = int(resources.get("limits", {}).get(GPU_RESOURCE, "0"))
    # CPU, memory and /dev/shm are sized per GPU; a CPU-only worker keeps the one-GPU size. Requests and
    # limits scale by the same exact fraction, so equal ones (Guaranteed QoS) stay equal, and /dev/shm
    # stays the same share of the memory limit it counts against.
    old_share, new_share = max(current_gpus, 1), max(cluster.gpus_per_worker, 1)
    for section in ("requests", "limits"):
        for name in ("cpu", "memory"):
            if name in resources.get(section, {}):
                resources[section][name] = _scale_quantity(resources[section][name], new_share, old_share)
    for volume in memory_volumes(job):
        volume["emptyDir"]["sizeLimit"] = _scale_quantity(volume["emptyDir"]["sizeLimit"], new_share, old_share)
    tolerations = [t for t in spec.get("tolerations", []) if t.get("key") != GPU_RESOURCE]
    node_selector = {k: v for k, v in spec.get("nodeSelector", {}).items() if k != GPU_NODE_LABEL}
    resources.get("requests", {}).pop(GPU_RESOURCE, None)
    resources.get("limits", {}).pop(GPU_RESOURCE, None)
    if cluster.gpus_per_worker > 0:
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(cluster.gpus_per_worker)
        node_selector[GPU_NODE_LABEL] = cluster.gpu_type
        # GKE taints GPU nodes so that only pods asking for GPUs land there.
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    for key, value in (("tolerations", tolerations), ("nodeSelector", node_selector)):
        if value:
            spec[key] = value
        else:
            spec.pop(key, None)


_UNIT_FACTORS = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_value(quantity: str) -> Fraction:
    """A Kubernetes quantity as an exact number ("4Gi" -> 4294967296, "500m" -> 1/2)."""
    match = _QUANTITY.match(str(quantity))
    if match is None or match.group(2) not in _UNIT_FACTORS:
        raise ConfigError(f"cannot read resource quantity {quantity!r}")
    return Fraction(match.group(1)) * _UNIT_FACTORS[match.group(2)]


def _scale_quantity(quantity: str, numerator: int, denominator: int) -> str:
    """A Kubernetes quantity times numerator/denominator, kept exact ("6" x 3/4 -> "4500m")."""
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ConfigError(f"cannot scale resource quantity {quantity!r}")
    value, unit = Fraction(match.group(1)) * numerator / denominator, match.group(2)
    while value.denominator != 1:
        if unit == "":
            value, unit = value * 1000, "m"
        elif unit in _BINARY_SMALLER:
            value, unit = value * 1024, _BINARY_SMALLER[unit]
        else:
            value = Fraction(-(-value.numerator // value.denominator))  # round up: never under-request
    return f"{value.numerator}{unit}"
