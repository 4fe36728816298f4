"""Kueue mode without a cluster: cluster.queue_name patches every Job the same way, and manifests/kueue/
validates against Kueue's own CRD schemas (from the Go module, v0.19.2) and fits the pipeline's Jobs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pneumonia.config import load_config
from pneumonia.errors import ConfigError
from pneumonia.k8s import manifests as mf

sys.path.insert(0, str(Path(__file__).parent))
from cluster import kueue as kueue_env  # noqa: E402

KUEUE_DIR = mf.MANIFEST_DIR / "kueue"
GPU_TAINT = {"key": mf.GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}


def cluster_config(**options: Any):
    options = {"bucket": "gs://my-bucket/pneumonia", "image": "europe-docker.pkg.dev/p/r/pneumonia:0.1.0", **options}
    return mf.with_launch_options(load_config(mf.CLUSTER_CONFIG), **options)


def kueue_objects() -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"] + "/" + obj["kind"]: obj for obj in mf.load_manifests(KUEUE_DIR)}


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in mf.load_manifests(KUEUE_DIR) if obj["kind"] == kind]


# --- the one setting --------------------------------------------------------------------------------

def test_without_a_queue_nothing_changes() -> None:
    plain = mf.build_manifests(mf.load_manifests(), cluster_config())
    for job in mf.stage_jobs(plain).values():
        assert mf.QUEUE_LABEL not in job["metadata"]["labels"]
        assert "suspend" not in job["spec"]


def test_a_queue_labels_and_suspends_every_job_and_nothing_else() -> None:
    plain = mf.build_manifests(mf.load_manifests(), cluster_config())
    queued = mf.build_manifests(mf.load_manifests(), cluster_config(queue_name="pneumonia"))
    for before, after in zip(plain, queued, strict=True):
        if after["kind"] != "Job":
            if after["kind"] == "ConfigMap":  # the config records the queue; nothing else differs
                assert yaml.safe_load(after["data"][mf.CONFIG_MAP_KEY])["cluster"]["queue_name"] == "pneumonia"
                continue
            assert before == after
            continue
        assert after["metadata"]["labels"][mf.QUEUE_LABEL] == "pneumonia"
        assert after["spec"]["suspend"] is True
        # The pods are not labelled: Kueue admits the Job, and the label on pods would hand them to
        # Kueue's pod integration instead.
        assert mf.QUEUE_LABEL not in after["spec"]["template"]["metadata"]["labels"]
        stripped = copy.deepcopy(after)
        del stripped["metadata"]["labels"][mf.QUEUE_LABEL]
        del stripped["spec"]["suspend"]
        assert stripped == before


def test_the_launcher_path_carries_the_queue_too() -> None:
    objects = mf.without_upstream_waits(mf.build_manifests(mf.load_manifests(), cluster_config(queue_name="gpus")))
    assert {job["metadata"]["labels"][mf.QUEUE_LABEL] for job in mf.stage_jobs(objects).values()} == {"gpus"}


def test_turning_the_queue_off_again_removes_label_and_suspend() -> None:
    queued = mf.build_manifests(mf.load_manifests(), cluster_config(queue_name="pneumonia"))
    back = mf.build_manifests(queued, cluster_config())
    assert back == mf.build_manifests(mf.load_manifests(), cluster_config())


def test_the_plain_manifests_name_the_example_localqueue_in_their_commented_label() -> None:
    (local_queue,) = of_kind("LocalQueue")
    for path in sorted(mf.MANIFEST_DIR.glob("*-job.yaml")):
        assert f"# {mf.QUEUE_LABEL}: {local_queue['metadata']['name']}" in path.read_text(), path.name
    assert local_queue["metadata"]["namespace"] == load_config(mf.CLUSTER_CONFIG).cluster.namespace


@pytest.mark.parametrize("name", ["Pneumonia", "-gpus", "a" * 64, "gpu queue"])
def test_a_bad_queue_name_is_refused_naming_the_key(name: str) -> None:
    with pytest.raises(ConfigError, match="cluster.queue_name"):
        load_config(mf.CLUSTER_CONFIG, [f"cluster.queue_name={name}"])


def test_the_cli_flag_reaches_the_jobs() -> None:
    from pneumonia.k8s.__main__ import main

    out = _Capture()
    code = main(["run", "--dry-run", "--bucket", "gs://b-1/p", "--image", "europe-docker.pkg.dev/p/r/pneumonia:1",
                 "--run-id", "q1", "--queue", "pneumonia"], out=out)
    assert code == 0
    jobs = [obj for obj in yaml.safe_load_all(out.text) if obj and obj["kind"] == "Job"]
    assert len(jobs) == 4 and all(job["spec"]["suspend"] is True for job in jobs)


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


# --- manifests/kueue against Kueue's own schemas -------------------------------------------------------

@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    # The module's config/ comes with `go mod download` (what build-kueue.sh runs): the same files
    # the cluster tests install into the API server.
    # A proxy hiccup is retried (three tries, 5 s apart); the last failure shows go's own words.
    command = ["go", "mod", "download", f"sigs.k8s.io/kueue@{kueue_env.KUEUE_VERSION}"]
    for attempt in range(3):
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "GOFLAGS": "-mod=mod"},
                              timeout=300, check=False)
        if done.returncode == 0:
            break
        if attempt < 2:
            time.sleep(5)
    else:
        pytest.fail(f"{' '.join(command)} failed 3 times (exit {done.returncode}); this check needs Go and the "
                    f"Go module proxy:\n{done.stderr[-2000:]}")
    return {key: strict(schema) for key, schema in kueue_env.crd_schemas().items()}


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused: the API server prunes them silently, so a misspelt field
    (`nominalquota`) would vanish without a word."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if isinstance(schema.get("pattern"), str) and schema["pattern"].startswith("^(?i)"):
        # Go's regexp takes a flag group anywhere; Python only at the very start.
        schema["pattern"] = "(?i)^" + schema["pattern"][len("^(?i)"):]
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


def validate(obj: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    schema = schemas[(obj["apiVersion"], obj["kind"])]
    jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)


def test_every_kueue_manifest_is_one_resource_that_validates(schemas: dict) -> None:
    paths = sorted(KUEUE_DIR.glob("*.yaml"))
    assert len(paths) == len(mf.load_manifests(KUEUE_DIR)) >= 7
    kinds = set()
    for obj in mf.load_manifests(KUEUE_DIR):
        assert obj["apiVersion"] == "kueue.x-k8s.io/v1beta2"  # the version Kueue 0.19 stores
        validate(obj, schemas)
        kinds.add(obj["kind"])
    assert kinds == {"ResourceFlavor", "ClusterQueue", "LocalQueue", "AdmissionCheck", "ProvisioningRequestConfig"}


def test_the_schema_check_bites(schemas: dict) -> None:
    (queue,) = of_kind("ClusterQueue")
    misspelt = copy.deepcopy(queue)
    quota = misspelt["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]
    quota["nominalquota"] = quota.pop("nominalQuota")
    with pytest.raises(jsonschema.ValidationError):
        validate(misspelt, schemas)
    wrong_policy = copy.deepcopy(queue)
    wrong_policy["spec"]["preemption"]["withinClusterQueue"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong_policy, schemas)


def test_kubectl_apply_of_manifests_leaves_the_kueue_folder_alone() -> None:
    kinds = {obj["kind"] for obj in mf.load_manifests()}
    assert not kinds & {"ClusterQueue", "LocalQueue", "ResourceFlavor"}


def test_the_clusterqueue_tries_on_demand_then_spot_then_flex_start_for_gpus() -> None:
    (queue,) = of_kind("ClusterQueue")
    flavors = {obj["metadata"]["name"]: obj for obj in of_kind("ResourceFlavor")}
    (group,) = queue["spec"]["resourceGroups"]
    order = [flavor["name"] for flavor in group["flavors"]]
    gpu_flavors = [name for name in order if GPU_TAINT in flavors[name]["spec"].get("nodeTaints", [])]
    labels = [flavors[name]["spec"]["nodeLabels"] for name in gpu_flavors]
    assert [label.get("cloud.google.com/gke-spot") for label in labels] == [None, "true", None]
    assert all(label[mf.GPU_NODE_LABEL] == "nvidia-l4" for label in labels)
    flex = gpu_flavors[2]
    assert [toleration["key"] for toleration in flavors[flex]["spec"]["tolerations"]] == ["cloud.google.com/gke-queued"]
    (rule,) = queue["spec"]["admissionChecksStrategy"]["admissionChecks"]
    assert rule["onFlavors"] == [flex]
    (check,) = of_kind("AdmissionCheck")
    (request_config,) = of_kind("ProvisioningRequestConfig")
    assert rule["name"] == check["metadata"]["name"]
    assert check["spec"]["controllerName"] == "kueue.x-k8s.io/provisioning-request"
    assert check["spec"]["parameters"]["name"] == request_config["metadata"]["name"]
    assert request_config["spec"]["provisioningClassName"] == "queued-provisioning.gke.io"


def test_every_stage_fits_a_flavor_its_pods_tolerate_and_only_train_fits_gpu_flavors() -> None:
    """Kueue's own rule: a flavor whose nodeTaints a pod does not tolerate is skipped; a resource the
    ClusterQueue does not cover makes the Workload inadmissible. Checked on the patched Jobs."""
    (queue,) = of_kind("ClusterQueue")
    flavors = {obj["metadata"]["name"]: obj for obj in of_kind("ResourceFlavor")}
    (group,) = queue["spec"]["resourceGroups"]
    jobs = mf.stage_jobs(mf.build_manifests(mf.load_manifests(), cluster_config(queue_name="pneumonia")))
    for stage, job in jobs.items():
        (container,) = mf.pod_spec(job)["containers"]
        asked = {**container["resources"].get("limits", {}), **container["resources"].get("requests", {})}
        assert set(asked) <= set(group["coveredResources"]), stage
        tolerations = mf.pod_spec(job).get("tolerations", [])
        usable = [flavor["name"] for flavor in group["flavors"]
                  if all(any(t["key"] == taint["key"] and t.get("operator") == "Exists" for t in tolerations)
                         for taint in flavors[flavor["name"]]["spec"].get("nodeTaints", []))
                  # every pod of the Job at once (Kueue admits the whole Job or nothing)
                  and all(mf.quantity_value(quota["nominalQuota"])
                          >= mf.quantity_value(asked.get(quota["name"], "0")) * job["spec"].get("parallelism", 1)
                          for quota in flavor["resources"])]
        if stage == "train":
            assert usable[:3] == ["pneumonia-l4-on-demand", "pneumonia-l4-spot", "pneumonia-l4-flex-start"], usable
        else:
            assert usable == ["pneumonia-cpu"], (stage, usable)


# --- the launcher's line from a Workload's conditions (messages as Kueue v0.19.2 words them) ----------

def workload(*conditions: dict[str, str], checks: tuple[dict[str, str], ...] = ()) -> dict[str, Any]:
    return {"metadata": {"name": "job-pneumonia-train-1a2b3"},
            "status": {"conditions": list(conditions), "admissionChecks": list(checks)}}


NO_FIT = ("couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor pneumonia-cpu, "
          "previously considered podsets requests (0) + current podset request (4) > maximum capacity (0), "
          "insufficient quota for nvidia.com/gpu in flavor pneumonia-l4-on-demand, previously considered podsets "
          "requests (0) + current podset request (4) > maximum capacity (3)")


def test_too_little_quota_names_requested_and_available_gpus() -> None:
    from pneumonia.k8s.status import explain_queued

    line = explain_queued(workload({"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                    "message": NO_FIT}), "pneumonia")
    assert line.startswith("waiting for quota: 4 nvidia.com/gpu requested, 3 available in ClusterQueue pneumonia "
                           "(flavor pneumonia-l4-on-demand)")


def test_quota_in_use_pending_capacity_and_admitted() -> None:
    from pneumonia.k8s.status import explain_queued

    in_use = "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor f, 2 more needed"
    assert explain_queued(workload({"type": "QuotaReserved", "status": "False", "message": in_use}), "q") == \
        "waiting for quota: 2 more cpu needed in ClusterQueue q (flavor f), in use by other Workloads"
    flex = workload({"type": "QuotaReserved", "status": "True"}, {"type": "Admitted", "status": "False"},
                    checks=({"name": "pneumonia-flex-start", "state": "Pending", "message": ""},))
    assert explain_queued(flex, "q").startswith(
        "waiting for capacity (flex-start): quota reserved in ClusterQueue q, admission check pneumonia-flex-start Pending")
    assert explain_queued(workload({"type": "QuotaReserved", "status": "True"},
                                   {"type": "Admitted", "status": "True"}), "q") is None
    assert explain_queued(None, "q").startswith("waiting for Kueue to create its Workload")
