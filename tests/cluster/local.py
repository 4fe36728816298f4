"""`make cluster-local`: the whole pipeline on the demo archive through the local control plane, as a user
runs it on GKE with `kubectl apply -f manifests/`.

1. The image: `localhost/pneumonia:image-test`, built as `make image-test` builds it (no registry, no push).
2. The bucket: the GCS stand-in (fake-gcs-server behind the TLS-intercepting proxy, tests/gcs_emulator.py)
   listening on the pods' podman network's gateway; the demo archive uploaded to where the ConfigMap
   points (`gs://BUCKET/pneumonia/raw/...`), as `gcloud storage cp` would.
3. manifests/ copied and edited as README's "Without the launcher" says (the sed lines: bucket, image),
   plus the ConfigMap's config at the demo's size (small CNN, 64x64, as jobs/configs/demo.yaml: a CPU
   machine), then `kubectl apply -f` that folder with the v1.36.4 kubectl.
4. The real Job controller and scheduler run it; tests/cluster/kubelet.py runs the pods as containers.
   All four Jobs must reach Complete; the report's headline is printed (test kappa >= --min-kappa).

    python tests/cluster/local.py --kubeconfig FILE [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bed  # noqa: E402
import kube  # noqa: E402
import pods  # noqa: E402 - tests/image, on the path through bed
import testbed as testbed_module  # noqa: E402

from pneumonia.k8s import manifests as mf  # noqa: E402

REPO = bed.REPO
WORK = REPO / "build" / "cluster-local"
NETWORK = "pneumonia-cluster-local"
BUCKET = "pneumonia-local"
PLACEHOLDER_IMAGE = "REGION-docker.pkg.dev/PROJECT/pneumonia/pneumonia:0.1.0"
NAMESPACE = "pneumonia"
JOBS = ("pneumonia-preprocess", "pneumonia-shard", "pneumonia-train", "pneumonia-evaluate")
RUN_TIMEOUT_S = 2400
DEMO_IMAGES = 300
# Who runs the launcher after an admin's one-time setup (a CI identity, say): bound to the Role of
# manifests/02-role.yaml and nothing else.
LAUNCHER_ACCOUNT = "pneumonia-ci"


def kubectl_binary() -> str:
    built = Path.home() / ".cache" / "pneumonia-k8s" / "v1.36.4" / "bin" / "kubectl"
    return str(built) if built.exists() else "kubectl"


def kubectl(kubeconfig: str, *args: str, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run([kubectl_binary(), "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def demo_config_text(run_id: str) -> str:
    """The ConfigMap's config.yaml at the demo's size: jobs/configs/cluster.yaml's cluster section (names,
    port, workers as the manifests have them), demo.yaml's model and images, the bucket's root."""
    manifest_config = yaml.safe_load(yaml.safe_load((REPO / "manifests" / "04-configmap.yaml").read_text())
                                     ["data"][mf.CONFIG_MAP_KEY])
    root = "gs://BUCKET/pneumonia"
    config = pods.image_test_config((REPO / "jobs/configs/cluster.yaml").read_text(),
                                    (REPO / "jobs/configs/demo.yaml").read_text(), data_root=root, run_id=run_id,
                                    archive=manifest_config["data"]["archive"],
                                    shard_workers=manifest_config["shard"]["num_workers"],
                                    upstream_wait_timeout_s=RUN_TIMEOUT_S)
    return mf.render_config(config)


def edited_manifests(folder: Path, image: str, run_id: str) -> Path:
    """manifests/ as README tells a user to edit it: the bucket and the image (its two sed lines), and
    the demo-sized config in the ConfigMap."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(REPO / "manifests", folder, ignore=shutil.ignore_patterns("serving"))
    configmap_path = folder / "04-configmap.yaml"
    configmap = yaml.safe_load(configmap_path.read_text())
    configmap["data"][mf.CONFIG_MAP_KEY] = demo_config_text(run_id)
    configmap["metadata"]["labels"]["app.kubernetes.io/instance"] = run_id
    configmap_path.write_text(yaml.safe_dump(configmap, sort_keys=False))
    for path in folder.glob("*.yaml"):
        text = path.read_text().replace("gs://BUCKET", f"gs://{BUCKET}").replace(PLACEHOLDER_IMAGE, image)
        path.write_text(text)
    return folder


def job_states(kubeconfig: str) -> dict[str, str]:
    """Each pipeline Job's ending condition (Complete / Failed) or its live counts."""
    listing = json.loads(kubectl(kubeconfig, "-n", NAMESPACE, "get", "jobs", "-o", "json"))
    states = {}
    for job in listing["items"]:
        status = job.get("status", {})
        ended = [c["type"] for c in status.get("conditions", []) if c["type"] in ("Complete", "Failed")
                 and c["status"] == "True"]
        states[job["metadata"]["name"]] = ended[0] if ended else (
            f"active={status.get('active', 0)} succeeded={status.get('succeeded', 0)} failed={status.get('failed', 0)}")
    return states


def wait_for_jobs(kubeconfig: str, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        states = job_states(kubeconfig)
        if states != last:
            print(f"cluster-local: {time.strftime('%H:%M:%S')} " + "  ".join(f"{n.removeprefix('pneumonia-')}: {s}"
                  for n, s in sorted(states.items())), flush=True)
            last = states
        if any(state == "Failed" for state in states.values()) or all(states.get(name) == "Complete" for name in JOBS):
            return states
        if time.monotonic() > deadline:
            return states
        time.sleep(5)


def setup_as_admin(kubeconfig: str, run_id: str) -> Path:
    """What an admin applies once: the namespace-wide objects of manifests/ (namespace, the pods'
    ServiceAccount, the launcher's and evaluate's Roles and bindings), the launcher's RoleBinding naming
    ServiceAccount LAUNCHER_ACCOUNT (the manifest names a Google service account, which this cluster
    lacks). Returns a kubeconfig of that ServiceAccount, its token from the TokenRequest API."""
    folder = edited_manifests(WORK / "setup-manifests", bed.IMAGE, run_id)
    objects = [obj for obj in mf.load_manifests(folder) if obj["kind"] in mf.SETUP_KINDS]
    for obj in objects:
        if obj["kind"] == "RoleBinding" and obj["metadata"]["name"] == "pneumonia-launcher":
            obj["subjects"] = [{"kind": "ServiceAccount", "name": LAUNCHER_ACCOUNT, "namespace": NAMESPACE}]
    objects.append({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": LAUNCHER_ACCOUNT, "namespace": NAMESPACE}})
    setup_file = WORK / "setup.yaml"
    setup_file.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    print(kubectl(kubeconfig, "apply", "-f", str(setup_file)), flush=True)
    return kube.service_account_kubeconfig(kube.api_client(kubeconfig), Path(kubeconfig), NAMESPACE, LAUNCHER_ACCOUNT,
                                           WORK / "launcher.kubeconfig", expiration_s=RUN_TIMEOUT_S + 1200)


def with_the_launcher(args: argparse.Namespace, testbed: bed.PodNetworkBed, run_id: str) -> int:
    """`make train-cluster` with the built image (PUSH=0), run as ServiceAccount LAUNCHER_ACCOUNT after the
    admin's setup: the launcher uploads the archive, creates and follows each Job, prints the report;
    then its `status` and `logs` commands on the finished run, as the same identity."""
    audit_log = testbed_module.Cluster(args.cluster_name).audit_log
    audit_start = audit_log.stat().st_size if audit_log.exists() else 0
    launcher_kubeconfig = setup_as_admin(args.kubeconfig, run_id)
    print(f"cluster-local: the launcher runs as system:serviceaccount:{NAMESPACE}:{LAUNCHER_ACCOUNT} "
          "(manifests/02-role.yaml's Role only)", flush=True)
    config_file = WORK / "launcher-config.yaml"
    config_file.write_text(demo_config_text(run_id).replace("gs://BUCKET", f"gs://{BUCKET}"))
    archive = WORK / "demo-chest-xray.zip"
    if not archive.exists():
        subprocess.run([sys.executable, "-m", "pneumonia.data.demo", "--out", str(archive), "--num-images",
                        str(DEMO_IMAGES)], check=True, timeout=600)
    env = {**testbed.host_env(), "KUBECONFIG": str(launcher_kubeconfig)}
    flags = f"--config {config_file} --poll-s 5 --timeout-s {RUN_TIMEOUT_S}"
    make = ["make", "-C", str(REPO), "train-cluster", "PUSH=0", f"IMAGE={bed.IMAGE}", f"BUCKET=gs://{BUCKET}/pneumonia",
            f"ARCHIVE={archive}", f"RUN_ID={run_id}", f"K8S_FLAGS={flags}"]
    print("cluster-local: " + " ".join(make), flush=True)
    code = subprocess.run(make, env=env, timeout=RUN_TIMEOUT_S + 600, check=False).returncode
    for command in (["status", "--run-id", run_id], ["logs", "--run-id", run_id, "--stage", "train", "--tail", "5"]):
        print(f"cluster-local: python -m pneumonia.k8s {' '.join(command)}", flush=True)
        code = code or subprocess.run([sys.executable, "-m", "pneumonia.k8s", *command], env=env, timeout=300,
                                      check=False).returncode
    # What the API server's authorizer said to the launcher's identity, from its audit log. The one
    # refusal by design: `get namespaces`, which the launcher reads as "may not tell".
    requests = kube.audited(audit_log, NAMESPACE, LAUNCHER_ACCOUNT, start=audit_start)
    refused = sorted({(verb, resource) for verb, resource, status in requests
                      if status == 403 and (verb, resource) != ("get", "namespaces")})
    print(f"cluster-local: the launcher's identity made {len(requests)} requests, "
          f"{sum(status == 403 for _, _, status in requests)} refused (get namespaces by design)"
          + (f"; also refused: {refused}" if refused else ""), flush=True)
    return code or (1 if refused or not requests else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--cluster-name", default=testbed_module.DEFAULT_NAME,
                        help="the local control plane's name (make cluster-up's CLUSTER_NAME): its audit log is read")
    parser.add_argument("--min-kappa", type=float, default=0.8)
    parser.add_argument("--launcher", action="store_true",
                        help="run the pipeline with `make train-cluster` (the launcher) instead of kubectl apply")
    parser.add_argument("--keep", action="store_true", help="leave the namespace, network and bucket up at the end")
    args = parser.parse_args(argv)
    started = time.monotonic()
    run_id = "local-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    print("cluster-local: building the image (cached layers when nothing changed)", flush=True)
    bed.build_image()
    print(f"cluster-local: image {bed.IMAGE} ready after {time.monotonic() - started:.0f}s", flush=True)
    # A namespace left from an earlier run: its Jobs would be reused or collide.
    kubectl(args.kubeconfig, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", timeout=300)
    testbed = bed.PodNetworkBed(args.kubeconfig, WORK, NETWORK, BUCKET, namespace_prefix=NAMESPACE)
    testbed.start()
    try:
        print(f"cluster-local: bucket gs://{BUCKET} on {testbed.emulator.proxy_url} (pods reach {testbed.gateway}); "
              "kubelet stand-in running", flush=True)
        if args.launcher:
            return with_the_launcher(args, testbed, run_id)
        archive = yaml.safe_load(demo_config_text(run_id))["data"]["archive"].replace("gs://BUCKET", f"gs://{BUCKET}")
        subprocess.run([sys.executable, "-m", "pneumonia.data.demo", "--out", archive, "--num-images", str(DEMO_IMAGES)],
                       env=testbed.host_env(), check=True, timeout=600)
        folder = edited_manifests(WORK / "manifests", bed.IMAGE, run_id)
        print(kubectl(args.kubeconfig, "apply", "-f", str(folder)), flush=True)
        states = wait_for_jobs(args.kubeconfig, RUN_TIMEOUT_S)
        if not all(states.get(name) == "Complete" for name in JOBS):
            print(kubectl(args.kubeconfig, "-n", NAMESPACE, "get", "pods", "-o", "wide", check=False))
            print(f"cluster-local: FAILED: {states}; pod logs under {WORK / 'pods'}", file=sys.stderr)
            return 1
        metrics = testbed.read_json(f"pneumonia/runs/{run_id}/report/metrics.json")
        headline = {key: metrics[key] for key in ("accuracy", "cohen_kappa", "macro_f1") if key in metrics}
        print("cluster-local: report headline (test split): "
              + ", ".join(f"{key} {value:.3f}" for key, value in headline.items()), flush=True)
        print(f"cluster-local: all four Jobs Complete in {time.monotonic() - started:.0f}s (run {run_id})", flush=True)
        kappa = headline.get("cohen_kappa", 0.0)
        if kappa < args.min_kappa:
            print(f"cluster-local: test kappa {kappa:.3f} is below {args.min_kappa}", file=sys.stderr)
            return 1
        return 0
    finally:
        if not args.keep:
            # With the kubelet still up: it stops the containers and finalizes the pods' deletion.
            kubectl(args.kubeconfig, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true",
                    check=False, timeout=300)
            testbed.stop()


if __name__ == "__main__":
    sys.exit(main())
