"""manifests/ as written and as the launcher patches it: schema-valid for Kubernetes 1.30 and the newest
bundled version, plus the rules schemas cannot express (names that must agree, GPUs, pins, security)."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pneumonia import cluster
from pneumonia.config import PipelineConfig, load_config
from pneumonia.errors import EXIT_BAD_INPUT, EXIT_PEER_LOST, EXIT_PREEMPTED, ConfigError
from pneumonia.k8s import manifests as mf
from pneumonia.layout import Layout

sys.path.insert(0, str(Path(__file__).parent))
from k8s_helpers import ClusterEmulator, EmulatorThread, write_kubeconfig  # noqa: E402

KUBECTL = Path(sys.executable).parent / "kubectl"
OLDEST_K8S = "1.30.0"
NEWEST_K8S = kubernetes_validate.latest_version()


def base_config() -> PipelineConfig:
    return load_config(mf.CLUSTER_CONFIG)


def variant(**options: object) -> list[dict]:
    options = {"bucket": "gs://my-bucket/pneumonia", "image": "europe-docker.pkg.dev/p/r/pneumonia:0.1.0", **options}
    config = mf.with_launch_options(base_config(), **options)
    mf.check_launchable(config)
    return mf.build_manifests(mf.load_manifests(), config, managed_by="pneumonia-k8s")


VARIANTS = {
    "as-written": lambda: mf.load_manifests(),
    "4-workers-x-2-gpus": lambda: variant(num_workers=4, gpus_per_worker=2, run_id="20260101-000000-beef"),
    "t4-gpus": lambda: variant(gpu_type="nvidia-tesla-t4", bucket="gs://other-bucket/exp", run_id="t4"),
    "cpu-only": lambda: variant(gpus_per_worker=0, num_workers=3, run_id="cpu.1"),
    "other-namespace-and-image": lambda: variant(
        namespace="ml-team", image="europe-west4-docker.pkg.dev/p/r/pneumonia@sha256:" + "a" * 64, run_id="x_1"),
    "launcher-h100-x-8": lambda: mf.without_upstream_waits(
        variant(gpu_type="nvidia-h100-80gb", gpus_per_worker=8, run_id="h100")),
}


@pytest.fixture(params=sorted(VARIANTS))
def objects(request: pytest.FixtureRequest) -> list[dict]:
    return VARIANTS[request.param]()


def jobs_of(objects: list[dict]) -> dict[str, dict]:
    return mf.stage_jobs(objects)


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def configmap_config(objects: list[dict], tmp_path: Path) -> PipelineConfig:
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap")["data"][mf.CONFIG_MAP_KEY])
    return load_config(path)


# --- files and schemas --------------------------------------------------------------------------

def test_manifest_files_are_numbered_one_resource_each_in_pipeline_order() -> None:
    paths = sorted(mf.MANIFEST_DIR.glob("*.yaml"))
    assert [p.name for p in paths] == [
        "00-namespace.yaml", "01-serviceaccount.yaml", "02-role.yaml", "03-rolebinding.yaml", "04-configmap.yaml",
        "05-evaluate-role.yaml", "06-evaluate-rolebinding.yaml", "10-preprocess-job.yaml", "20-shard-job.yaml", "30-train-service.yaml", "31-train-job.yaml",
        "40-evaluate-job.yaml"]
    for path in paths:
        assert len([doc for doc in yaml.safe_load_all(path.read_text()) if doc]) == 1, path
        assert ":latest" not in path.read_text(), path
    assert list(jobs_of(mf.load_manifests())) == list(mf.STAGES)


@pytest.mark.parametrize("version", [OLDEST_K8S, NEWEST_K8S])
def test_every_object_validates_strictly(objects: list[dict], version: str) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    job = copy.deepcopy(jobs_of(mf.load_manifests())["train"])
    job["spec"]["template"]["spec"]["subDomain"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, OLDEST_K8S, strict=True)


# --- one source of truth -------------------------------------------------------------------------

def test_patching_with_the_cluster_config_gives_the_manifests_back_unchanged() -> None:
    written = mf.load_manifests()
    assert mf.build_manifests(written, base_config()) == written


def test_patching_is_idempotent_and_never_mutates_its_input() -> None:
    written = mf.load_manifests()
    pristine = copy.deepcopy(written)
    config = mf.with_launch_options(base_config(), num_workers=4, gpus_per_worker=2, run_id="r2")
    once = mf.build_manifests(written, config)
    assert mf.build_manifests(once, config) == once
    assert written == pristine


def test_configmap_holds_the_cluster_config(tmp_path: Path) -> None:
    written = mf.load_manifests()
    config = configmap_config(written, tmp_path)
    assert config == base_config()
    assert config.data.root.startswith("gs://")
    assert config.data.archive.startswith(config.data.root + "/raw/")
    assert config.cluster.upstream_wait_timeout_s > 0  # kubectl apply starts every Job at once
    assert one(written, "ConfigMap")["metadata"]["labels"][mf.LABEL_INSTANCE] == config.train.run_id


def test_launch_options_reach_the_configmap_and_the_jobs(tmp_path: Path) -> None:
    objects = variant(bucket="gs://b2-bucket/x/", num_workers=4, gpus_per_worker=2, gpu_type="nvidia-tesla-t4",
                      run_id="abc", image="r/p:2")
    config = configmap_config(objects, tmp_path)
    assert config.data.root == "gs://b2-bucket/x"
    assert config.data.archive == "gs://b2-bucket/x/raw/chest-xray-pneumonia.zip"  # moved with the bucket
    assert (config.cluster.num_workers, config.cluster.gpus_per_worker, config.train.run_id) == (4, 2, "abc")
    train = jobs_of(objects)["train"]
    assert train["spec"]["completions"] == train["spec"]["parallelism"] == 4
    assert mf.pod_spec(train)["nodeSelector"] == {mf.GPU_NODE_LABEL: "nvidia-tesla-t4"}
    resources = mf.pod_spec(train)["containers"][0]["resources"]
    assert resources["limits"][mf.GPU_RESOURCE] == "2"
    assert (resources["requests"]["cpu"], resources["requests"]["memory"]) == ("12", "48Gi")  # per GPU x 2
    for obj in objects:
        if obj["kind"] == "Job":
            assert obj["metadata"]["labels"][mf.LABEL_INSTANCE] == "abc"
            assert obj["spec"]["template"]["metadata"]["labels"][mf.LABEL_INSTANCE] == "abc"
            assert {c["image"] for c in mf.containers(obj)} == {"r/p:2"}


def test_quantities_scale_exactly() -> None:
    assert mf._scale_quantity("6", 3, 4) == "4500m"
    assert mf._scale_quantity("26Gi", 1, 4) == "6656Mi"
    assert mf._scale_quantity("500m", 2, 1) == "1000m"
    assert mf._scale_quantity("1G", 1, 3) == "1G"  # decimal units round up, never under-request


# --- what schemas miss ---------------------------------------------------------------------------

POLICY_ACTIONS = {"FailJob", "FailIndex", "Ignore", "Count"}
EXIT_OPERATORS = {"In", "NotIn"}
POD_CONDITION_STATUSES = {"True", "False", "Unknown"}


def test_job_specs_are_consistent(objects: list[dict]) -> None:
    for stage, job in jobs_of(objects).items():
        spec, pod = job["spec"], mf.pod_spec(job)
        assert spec.get("completionMode", "NonIndexed") in {"NonIndexed", "Indexed"}, stage
        assert pod["restartPolicy"] == "Never", stage  # podFailurePolicy requires it
        assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0, stage
        if spec.get("completionMode") == "Indexed":
            assert spec["completions"] >= 1 and spec["parallelism"] == spec["completions"], stage
            assert "backoffLimitPerIndex" in spec, stage
        else:
            assert "backoffLimit" in spec and "backoffLimitPerIndex" not in spec, stage
        if "maxFailedIndexes" in spec:
            assert "backoffLimitPerIndex" in spec and 0 <= spec["maxFailedIndexes"] <= spec["completions"], stage
        if spec.get("podReplacementPolicy"):
            assert spec["podReplacementPolicy"] == "Failed", stage  # the only value allowed with podFailurePolicy


def test_the_train_pods_read_their_indexs_counts_from_the_job_controller(objects: list[dict]) -> None:
    """pneumonia.cluster.IndexAttempt's inputs: the Job controller's per-index annotations through the
    downward API, and the retry limit, which must be the Job's own."""
    job = mf.stage_jobs(objects)["train"]
    env = {entry["name"]: entry for entry in mf.pod_spec(job)["containers"][0]["env"]}
    paths = {name: entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for name, entry in env.items()}
    assert paths["JOB_INDEX_FAILURE_COUNT"] == "metadata.annotations['batch.kubernetes.io/job-index-failure-count']"
    assert paths["JOB_INDEX_IGNORED_FAILURE_COUNT"] == (
        "metadata.annotations['batch.kubernetes.io/job-index-ignored-failure-count']")
    assert paths["JOB_UID"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert env["JOB_BACKOFF_LIMIT_PER_INDEX"]["value"] == str(job["spec"]["backoffLimitPerIndex"])


def test_pod_failure_policy_ignores_disruptions_and_143_fails_on_2(objects: list[dict]) -> None:
    for stage, job in jobs_of(objects).items():
        rules = job["spec"]["podFailurePolicy"]["rules"]
        for rule in rules:
            assert rule["action"] in POLICY_ACTIONS, stage
            if rule["action"] == "FailIndex":
                assert "backoffLimitPerIndex" in job["spec"], stage
            assert ("onExitCodes" in rule) != ("onPodConditions" in rule), stage
            if "onExitCodes" in rule:
                codes = rule["onExitCodes"]
                assert codes["operator"] in EXIT_OPERATORS, stage
                values = codes["values"]
                assert values == sorted(set(values)) and all(isinstance(v, int) and 0 <= v <= 255 for v in values)
                assert not (codes["operator"] == "In" and 0 in values), stage
            for condition in rule.get("onPodConditions", []):
                assert condition["status"] in POD_CONDITION_STATUSES, stage
        summary = [(r["action"], r.get("onExitCodes", {}).get("values"),
                    [c["type"] for c in r.get("onPodConditions", [])]) for r in rules]
        # Only training workers depend on peers: the train Job alone ignores "peer lost".
        peer_lost = [("Ignore", [EXIT_PEER_LOST], [])] if stage == "train" else []
        assert summary == [("Ignore", None, ["DisruptionTarget"]), ("Ignore", [EXIT_PREEMPTED], []), *peer_lost,
                           ("FailJob", [EXIT_BAD_INPUT], [])], stage


def test_the_train_job_ignores_exactly_the_peer_lost_exit_code_of_its_own_container(objects: list[dict]) -> None:
    """The manifest's number is errors.EXIT_PEER_LOST, on the train container, and no other stage ignores it."""
    for stage, job in jobs_of(objects).items():
        ignored = [rule["onExitCodes"] for rule in job["spec"]["podFailurePolicy"]["rules"]
                   if rule["action"] == "Ignore" and EXIT_PEER_LOST in rule.get("onExitCodes", {}).get("values", [])]
        if stage != "train":
            assert ignored == [], stage
            continue
        container_names = [container["name"] for container in mf.containers(job)]
        assert ignored == [{"containerName": "train", "operator": "In", "values": [EXIT_PEER_LOST]}]
        assert container_names == ["train"]


def test_pods_get_time_to_stop_cleanly_on_sigterm(objects: list[dict]) -> None:
    """SIGTERM (preemption, drain, deletion) -> the stage exits 143; training saves a backup first, so
    the kubelet must wait that long before SIGKILL (the default is 30 s)."""
    for stage, job in jobs_of(objects).items():
        grace = mf.pod_spec(job).get("terminationGracePeriodSeconds")
        assert isinstance(grace, int) and grace >= 30, (stage, grace)
        if stage == "train":
            assert grace >= 60, grace


def test_containers_have_resources_security_and_pinned_images(objects: list[dict]) -> None:
    for stage, job in jobs_of(objects).items():
        pod = mf.pod_spec(job)
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"], stage
        pod_security = pod["securityContext"]
        assert pod_security["runAsNonRoot"] is True and isinstance(pod_security["runAsUser"], int), stage
        assert pod_security["runAsUser"] > 0 and pod_security["seccompProfile"]["type"] == "RuntimeDefault"
        for container in mf.containers(job):
            image = container["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert "@sha256:" in image or (tag and tag != "latest"), image
            resources = container["resources"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[section]), (stage, section)
                for name, quantity in resources[section].items():
                    assert isinstance(quantity, str), (stage, name, quantity)  # "1", not 1
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"] and security["runAsNonRoot"] is True
            assert security["seccompProfile"]["type"] == "RuntimeDefault"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], stage  # scratch on a read-only root


def test_only_the_train_job_asks_for_gpus(objects: list[dict]) -> None:
    for stage, job in jobs_of(objects).items():
        pod = mf.pod_spec(job)
        asks = [c["resources"].get(section, {}).get(mf.GPU_RESOURCE) for c in mf.containers(job)
                for section in ("requests", "limits")]
        gpu_tolerations = [t for t in pod.get("tolerations", []) if t["key"] == mf.GPU_RESOURCE]
        if stage != "train":
            assert asks == [None] * len(asks) and not gpu_tolerations, stage
            assert mf.GPU_NODE_LABEL not in pod.get("nodeSelector", {}), stage
            continue
        (container,) = pod["containers"]
        gpus = container["resources"]["limits"].get(mf.GPU_RESOURCE)
        if gpus is None:  # the CPU-only variant: nothing ties it to GPU nodes
            assert not gpu_tolerations and mf.GPU_NODE_LABEL not in pod.get("nodeSelector", {})
            continue
        assert int(gpus) >= 1 and pod["nodeSelector"][mf.GPU_NODE_LABEL]
        assert gpu_tolerations == [{"key": mf.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
        shm = {v["name"]: v for v in pod["volumes"]}[
            next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")]
        assert shm["emptyDir"]["medium"] == "Memory"


def test_memory_requests_equal_limits_and_the_train_pod_is_guaranteed(objects: list[dict]) -> None:
    """A pod using more memory than it requested is the first the kubelet evicts under node pressure, and
    the train Job ignores evictions: requests == limits keeps that from looping until the deadline."""
    for stage, job in jobs_of(objects).items():
        for container in mf.containers(job):
            resources = container["resources"]
            guaranteed = ("cpu", "memory") if stage == "train" else ("memory",)
            for name in guaranteed:
                assert resources["requests"][name] == resources["limits"][name], (stage, name)
            assert mf.GPU_RESOURCE not in resources.get("requests", {}), stage  # requests default to limits
        memory_limit = sum(mf.quantity_value(c["resources"]["limits"]["memory"]) for c in mf.containers(job))
        for volume in mf.memory_volumes(job):
            # Memory-backed emptyDir pages count against the pod's memory: /dev/shm must fit inside it.
            assert mf.quantity_value(volume["emptyDir"]["sizeLimit"]) < memory_limit, (stage, volume["name"])


def test_the_train_pod_scales_cpu_memory_and_shm_together_with_its_gpus() -> None:
    def shape(job: dict) -> tuple:
        (container,) = mf.pod_spec(job)["containers"]
        (shm,) = mf.memory_volumes(job)
        resources = container["resources"]
        quantities = [resources[section][name] for section in ("requests", "limits") for name in ("cpu", "memory")]
        quantities.append(shm["emptyDir"]["sizeLimit"])
        return tuple(mf.quantity_value(q) for q in quantities)

    one_gpu = jobs_of(variant(run_id="one"))["train"]
    two_gpus = jobs_of(variant(gpus_per_worker=2, gpu_type="nvidia-tesla-t4", run_id="two"))["train"]
    assert shape(two_gpus) == tuple(2 * value for value in shape(one_gpu))


def test_the_launchers_evaluate_does_not_wait_for_training(tmp_path: Path) -> None:
    """The launcher creates evaluate only after train completed; under kubectl apply it waits for it."""
    applied = mf.load_manifests()
    launched = mf.without_upstream_waits(applied)
    assert applied == mf.load_manifests()  # not mutated
    config_file = tmp_path / "config.yaml"
    config_file.write_text(one(launched, "ConfigMap")["data"][mf.CONFIG_MAP_KEY])
    for stage, job in jobs_of(launched).items():
        args = mf.pod_spec(job)["containers"][0]["args"]
        overrides = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
        before = jobs_of(applied)[stage]
        if stage == "evaluate":
            assert load_config(config_file, overrides).cluster.upstream_wait_timeout_s == 0
            waited = load_config(config_file, [a for i, a in enumerate(mf.pod_spec(before)["containers"][0]["args"])
                                               if i and mf.pod_spec(before)["containers"][0]["args"][i - 1] == "--set"])
            assert (job["spec"]["activeDeadlineSeconds"]
                    == before["spec"]["activeDeadlineSeconds"] - waited.cluster.upstream_wait_timeout_s > 0)
        else:
            assert job == before, stage


def test_service_name_subdomain_selector_and_port_agree(objects: list[dict]) -> None:
    service = one(objects, "Service")
    jobs = jobs_of(objects)
    train = jobs["train"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert mf.pod_spec(train)["subdomain"] == service["metadata"]["name"]
    selector = service["spec"]["selector"]
    for stage, job in jobs.items():
        labels = job["spec"]["template"]["metadata"]["labels"]
        selected = all(labels.get(key) == value for key, value in selector.items())
        assert selected == (stage == "train"), stage
    (port,) = service["spec"]["ports"]
    (container_port,) = mf.pod_spec(train)["containers"][0]["ports"]
    assert port["port"] == port["targetPort"] == container_port["containerPort"]


def test_labels_and_namespace(objects: list[dict]) -> None:
    namespace = one(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels[mf.LABEL_NAME] == mf.APP_NAME and labels["app.kubernetes.io/part-of"] == mf.APP_NAME
        assert mf.LABEL_MANAGED_BY in labels
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
    for stage, job in jobs_of(objects).items():
        for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
            assert labels[mf.LABEL_COMPONENT] == stage and labels[mf.LABEL_INSTANCE]
            assert set(labels) == {mf.LABEL_NAME, mf.LABEL_INSTANCE, mf.LABEL_COMPONENT,
                                   "app.kubernetes.io/part-of", mf.LABEL_MANAGED_BY}


def test_jobs_read_the_configmap_and_pass_only_known_keys(objects: list[dict], tmp_path: Path) -> None:
    configmap = one(objects, "ConfigMap")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(configmap["data"][mf.CONFIG_MAP_KEY])
    for stage, job in jobs_of(objects).items():
        pod = mf.pod_spec(job)
        (container,) = pod["containers"]
        args = container["args"]
        assert args[0] == f"/opt/pneumonia/jobs/{stage}.py", stage
        config_path = args[args.index("--config") + 1]
        mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        assert config_path == f"{mount['mountPath']}/{mf.CONFIG_MAP_KEY}" and mount["readOnly"] is True
        overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
        load_config(config_file, overrides)  # unknown keys or bad values raise ConfigError


def test_indexed_jobs_match_the_config(objects: list[dict], tmp_path: Path) -> None:
    config = configmap_config(objects, tmp_path)
    jobs = jobs_of(objects)
    assert jobs["shard"]["spec"]["completions"] == config.shard.num_workers
    train = jobs["train"]
    assert train["metadata"]["name"] == config.cluster.train_job_name
    assert train["spec"]["completions"] == config.cluster.num_workers
    assert one(objects, "Service")["metadata"]["name"] == config.cluster.train_service_name


def test_evaluate_waits_as_long_as_training_may_run(tmp_path: Path) -> None:
    jobs = jobs_of(mf.load_manifests())
    config_file = tmp_path / "config.yaml"
    config_file.write_text(one(mf.load_manifests(), "ConfigMap")["data"][mf.CONFIG_MAP_KEY])
    args = mf.pod_spec(jobs["evaluate"])["containers"][0]["args"]
    wait = load_config(config_file, [a for i, a in enumerate(args) if i and args[i - 1] == "--set"])
    evaluate_wait = wait.cluster.upstream_wait_timeout_s
    assert evaluate_wait >= jobs["train"]["spec"]["activeDeadlineSeconds"]
    assert jobs["evaluate"]["spec"]["activeDeadlineSeconds"] > evaluate_wait
    upstream = load_config(config_file).cluster.upstream_wait_timeout_s
    for stage in ("shard", "train"):
        assert jobs[stage]["spec"]["activeDeadlineSeconds"] > upstream, stage


def test_tf_config_names_the_pods_dns_names(objects: list[dict], tmp_path: Path) -> None:
    """What each train pod builds from JOB_COMPLETION_INDEX and the config lists exactly its peers'
    hostnames (<job name>-<index>, set by Kubernetes) in the subdomain of the headless Service."""
    config = configmap_config(objects, tmp_path)
    train = jobs_of(objects)["train"]
    service = one(objects, "Service")
    subdomain = mf.pod_spec(train)["subdomain"]
    port = mf.pod_spec(train)["containers"][0]["ports"][0]["containerPort"]
    completions = train["spec"]["completions"]
    expected = [f"{train['metadata']['name']}-{i}.{subdomain}:{port}" for i in range(completions)]
    for index in range(completions):
        tf_config = cluster.build_tf_config(index, config.cluster.num_workers, config.cluster.train_job_name,
                                            config.cluster.train_service_name, config.cluster.worker_port)
        assert tf_config["cluster"]["worker"] == expected
        assert tf_config["task"] == {"type": "worker", "index": index}
    assert subdomain == service["metadata"]["name"]


def named(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return found


def test_only_evaluate_may_read_the_train_job_and_the_roles_are_namespaced() -> None:
    written = mf.load_manifests()
    account = one(written, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    launcher = named(written, "RoleBinding", "pneumonia-launcher")
    assert launcher["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pneumonia-launcher"}
    assert all(subject["kind"] != "ServiceAccount" for subject in launcher["subjects"])
    for role in (obj for obj in written if obj["kind"] == "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "secrets" not in rule["resources"]
    # The pods' account may GET the train Job by name, nothing else.
    pods = named(written, "RoleBinding", "pneumonia-evaluate")
    assert pods["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                 "namespace": account["metadata"]["namespace"]}]
    assert named(written, "Role", pods["roleRef"]["name"])["rules"] == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "resourceNames": ["pneumonia-train"], "verbs": ["get"]}]
    # Of the pods, only evaluate holds a token: a short-lived projected one where the in-cluster client looks.
    tokens = {stage: [volume["projected"] for volume in mf.pod_spec(job).get("volumes", []) if "projected" in volume]
              for stage, job in jobs_of(written).items()}
    assert tokens["preprocess"] == tokens["shard"] == tokens["train"] == []
    (projected,) = tokens["evaluate"]
    sources = {next(iter(source)): source[next(iter(source))] for source in projected["sources"]}
    assert sources["serviceAccountToken"] == {"path": "token", "expirationSeconds": 600}
    assert sources["configMap"]["name"] == "kube-root-ca.crt"
    assert sources["downwardAPI"]["items"] == [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
    (mount,) = [m for m in mf.containers(jobs_of(written)["evaluate"])[0]["volumeMounts"]
                if m["mountPath"] == cluster.SERVICE_ACCOUNT_DIR]
    assert mount["readOnly"] is True


def test_the_evaluate_role_follows_the_train_job_name() -> None:
    config = load_config(None, ["cluster.train_job_name=other-train", "cluster.namespace=elsewhere"])
    objects = mf.build_manifests(mf.load_manifests(), config)
    assert named(objects, "Role", "pneumonia-evaluate")["rules"][0]["resourceNames"] == ["other-train"]
    assert named(objects, "RoleBinding", "pneumonia-evaluate")["subjects"][0]["namespace"] == "elsewhere"
    assert named(objects, "Role", "pneumonia-launcher")["rules"] == \
        named(mf.load_manifests(), "Role", "pneumonia-launcher")["rules"]


def test_the_gsa_patch_sets_the_workload_identity_annotation_and_nothing_else() -> None:
    written = mf.load_manifests()
    pristine = copy.deepcopy(written)
    with pytest.raises(ConfigError, match="--gsa") as placeholder:
        mf.check_gcp_service_account(written)  # as written: the @PROJECT. placeholder
    assert "manifests/01-serviceaccount.yaml" in str(placeholder.value)
    email = "pneumonia-pipeline@my-project.iam.gserviceaccount.com"
    patched = mf.with_gcp_service_account(written, email)
    assert written == pristine  # never mutated
    mf.check_gcp_service_account(patched)
    assert one(patched, "ServiceAccount")["metadata"]["annotations"] == {mf.GSA_ANNOTATION: email}
    changed = [(a["kind"], a["metadata"]["name"]) for a, b in zip(written, patched, strict=True) if a != b]
    assert changed == [("ServiceAccount", "pneumonia")]
    for bad in ("pneumonia-pipeline@PROJECT.iam.gserviceaccount.com", "not-an-email", "a@b.example.com"):
        with pytest.raises(ConfigError, match="--gsa"):
            mf.with_gcp_service_account(written, bad)


# --- config checks the launcher applies ------------------------------------------------------------

@pytest.mark.parametrize("image", ["", "repo/pneumonia", "repo/pneumonia:latest", "host:5000/pneumonia",
                                   "REGION-docker.pkg.dev/PROJECT/pneumonia/pneumonia:0.1.0"])
def test_unpinned_or_placeholder_images_are_rejected(image: str) -> None:
    with pytest.raises(ConfigError, match="cluster.image"):
        mf.check_image(image)


@pytest.mark.parametrize("image", ["host:5000/pneumonia:1.2", "r/p@sha256:" + "b" * 64, "r/p:1@sha256:" + "c" * 64])
def test_pinned_images_pass(image: str) -> None:
    mf.check_image(image)


@pytest.mark.parametrize(("options", "key"), [
    ({"run_id": "bad-"}, "train.run_id"),  # a valid run id, but a label value must end alphanumeric
    ({"run_id": "x" * 64}, "train.run_id"),
    ({"namespace": "Upper"}, "cluster.namespace"),
    ({"gpu_type": ""}, "cluster.gpu_type"),
    ({"bucket": "gs://BUCKET/pneumonia"}, "data.root"),
])
def test_launch_checks_name_the_bad_key(options: dict, key: str) -> None:
    options = {"bucket": "gs://my-bucket/p", "image": "r/p:1", "run_id": "ok", **options}
    config = mf.with_launch_options(base_config(), **options)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        mf.check_launchable(config)


def test_a_too_long_train_job_name_is_rejected() -> None:
    config = mf.with_launch_options(base_config(), bucket="gs://my-bucket", image="r/p:1")
    config = config.replace(cluster=dataclasses.replace(config.cluster, train_job_name="t" * 62, num_workers=12))
    with pytest.raises(ConfigError, match="63"):
        mf.check_launchable(config)


# --- kubectl reads the folder as it is -------------------------------------------------------------

def test_kubectl_client_dry_run_applies_the_folder_in_order(tmp_path: Path) -> None:
    server = EmulatorThread(ClusterEmulator()).start()
    try:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
        result = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(kubeconfig), "apply", "--dry-run=client", "--validate=false",
             "-f", str(mf.MANIFEST_DIR), "-o", "yaml"],
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        items = yaml.safe_load(result.stdout)["items"]
        assert [(i["kind"], i["metadata"]["name"]) for i in items] == [
            (o["kind"], o["metadata"]["name"]) for o in mf.load_manifests()]
        assert {method for method, *_ in server.emulator.calls} == {"GET"}  # a dry run writes nothing
    finally:
        server.stop()


# --- serving: an example beside the pipeline, never applied with it ------------------------------

SERVING = mf.MANIFEST_DIR / "serving" / "inferenceservice.yaml"


def test_the_inferenceservice_serves_the_runs_export_and_stays_out_of_the_pipeline(tmp_path: Path) -> None:
    """KServe's CRD is unknown to kubernetes-validate: check the kind, the fields that must match the
    pipeline (namespace, the export's path for the ConfigMap's run), the server's own read-only
    identity, and the predictor's container fields against the core Container schema."""
    documents = [doc for doc in yaml.safe_load_all(SERVING.read_text()) if doc]
    (service,) = [doc for doc in documents if doc["kind"] == "InferenceService"]
    (account,) = [doc for doc in documents if doc["kind"] == "ServiceAccount"]
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    pipeline = mf.load_manifests()
    assert "InferenceService" not in {obj["kind"] for obj in pipeline}  # manifests/ alone is the pipeline
    assert service["metadata"]["namespace"] == one(pipeline, "Namespace")["metadata"]["name"]
    predictor = service["spec"]["predictor"]
    # Not the pipeline's account (it may write the bucket, raw films included): one of its own, in the
    # same namespace, mapped by Workload Identity, with no API token.
    assert predictor["serviceAccountName"] == account["metadata"]["name"] != \
        one(pipeline, "ServiceAccount")["metadata"]["name"]
    assert account["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    assert account["automountServiceAccountToken"] is False

    config = configmap_config(pipeline, tmp_path)
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    assert model["storageUri"] == Layout.of(config).model(config.train.run_id)
    assert service["metadata"]["labels"]["app.kubernetes.io/instance"] == config.train.run_id
    tag = model["runtimeVersion"]
    assert isinstance(tag, str) and tag[0].isdigit()  # pinned, never the runtime's moving default

    container = {key: value for key, value in model.items() if key not in ("modelFormat", "runtimeVersion",
                                                                           "storageUri")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check", "namespace": "pneumonia"},
           "spec": {"serviceAccountName": predictor["serviceAccountName"],
                    "containers": [{"name": "kserve-container", "image": f"tensorflow/serving:{tag}", **container}]}}
    for version in (OLDEST_K8S, NEWEST_K8S):
        kubernetes_validate.validate(pod, version, strict=True)
        kubernetes_validate.validate(account, version, strict=True)
    for section in ("requests", "limits"):
        assert all(isinstance(quantity, str) for quantity in container["resources"][section].values())
    assert container["securityContext"]["runAsNonRoot"] is True
