"""The real Kueue controller (v0.19.2, built by tests/cluster/build-kueue.sh) beside a local control plane.

Kueue runs as a process on this machine, not in the cluster: its CRDs and webhook configurations
come from the Go module's own `config/components/` (and the ProvisioningRequest CRD from
`k8s.io/autoscaler/cluster-autoscaler/apis`, the version Kueue's go.mod requires), with every
webhook's and conversion webhook's clientConfig pointed at https://127.0.0.1:<port> and a throwaway
CA. Leader election, internal certificate management and the visibility server are off; only the
batch/job integration is on (the only kind the pipeline creates).
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from gcs_emulator import ManagedProcess, free_port, make_certificates

KUEUE_VERSION = "v0.19.2"
CACHE_ROOT = Path(os.environ.get("PNEUMONIA_K8S_CACHE", Path.home() / ".cache" / "pneumonia-k8s"))
KUEUE_BINARY = CACHE_ROOT / f"kueue-{KUEUE_VERSION}" / "bin" / "kueue"
BUILD_SCRIPT = Path(__file__).parent / "cluster" / "build-kueue.sh"
# Kueue's own webhooks for its objects, and the batch/job integration's; the others (pods,
# deployments, other frameworks) would intercept objects this suite never hands to Kueue.
# `PRIVATE_ETC DIR PROGRAM ARGS...`: PROGRAM sees DIR as /etc (a user and mount namespace of its own;
# no privileges needed where unprivileged user namespaces are allowed, as on Debian and Ubuntu).
PRIVATE_ETC = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount --bind "$0" /etc && exec "$@"']
WEBHOOK_PATH = re.compile(r"^/(mutate|validate)-(kueue-x-k8s-io-.*|batch-v1-job)$")


def module_dir(module: str, version: str) -> Path:
    """Where `go mod download` put a module (the module cache spells capitals as '!' + lower case)."""
    cache = Path(subprocess.run(["go", "env", "GOMODCACHE"], check=True, capture_output=True, text=True).stdout.strip())
    escaped = re.sub(r"[A-Z]", lambda m: "!" + m.group(0).lower(), module)
    return cache / f"{escaped}@{version}"


def kueue_config_dir() -> Path:
    return module_dir("sigs.k8s.io/kueue", KUEUE_VERSION) / "config" / "components"


def provisioning_request_crd() -> Path:
    """The ProvisioningRequest CRD of the autoscaler API version that Kueue itself is built against."""
    go_mod = (module_dir("sigs.k8s.io/kueue", KUEUE_VERSION) / "go.mod").read_text()
    (version,) = re.findall(r"^\s*k8s\.io/autoscaler/cluster-autoscaler/apis (\S+)", go_mod, re.MULTILINE)
    return (module_dir("k8s.io/autoscaler/cluster-autoscaler/apis", version) / "config" / "crd"
            / "autoscaling.x-k8s.io_provisioningrequests.yaml")


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): openAPIV3Schema} of every Kueue CRD version, for validating manifests offline."""
    schemas = {}
    for path in sorted((kueue_config_dir() / "crd" / "bases").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def _conversion_patched(crd: dict[str, Any], url: str, ca_bundle: str) -> dict[str, Any]:
    crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
        "clientConfig": {"url": f"{url}/convert", "caBundle": ca_bundle}, "conversionReviewVersions": ["v1"]}}
    return crd


def install_objects(url: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """Kueue's CRDs (conversion through `url` where its kustomization enables it), the ProvisioningRequest
    CRD, and its webhook configurations (only Kueue's own and batch/job's) with clientConfig.url on `url`."""
    config = kueue_config_dir()
    ca_bundle = base64.b64encode(ca_pem).decode()
    kustomization = (config / "crd" / "kustomization.yaml").read_text()
    converted = {yaml.safe_load((config / "crd" / line.split(":", 1)[1].strip()).read_text())["metadata"]["name"]
                 for line in kustomization.splitlines() if re.match(r"^- path: patches/webhook_in_", line)}
    objects = []
    for path in sorted((config / "crd" / "bases").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        objects.append(_conversion_patched(crd, url, ca_bundle) if crd["metadata"]["name"] in converted else crd)
    objects.append(yaml.safe_load(provisioning_request_crd().read_text()))
    for configuration in yaml.safe_load_all((config / "webhook" / "manifests.yaml").read_text()):
        if not configuration:
            continue
        configuration["metadata"]["name"] = "kueue-" + configuration["metadata"]["name"]
        kept = []
        for webhook in configuration["webhooks"]:
            path = webhook["clientConfig"]["service"]["path"]
            if WEBHOOK_PATH.match(path):
                webhook["clientConfig"] = {"url": url + path, "caBundle": ca_bundle}
                webhook["timeoutSeconds"] = 10
                kept.append(webhook)
        configuration["webhooks"] = kept
        objects.append(configuration)
    return objects


def kueue_configuration(webhook_port: int, health_port: int, cert_dir: Path,
                        pods_ready_timeout_s: int | None) -> dict[str, Any]:
    """Kueue's Configuration for a process outside the cluster: loopback only, nothing it would manage itself."""
    configuration: dict[str, Any] = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
    }
    if pods_ready_timeout_s is not None:
        # All workers Ready within the timeout, or the Workload is evicted (its Job suspended, its pods
        # deleted) and requeued after a short backoff. blockAdmission stays off so that tests sharing
        # the controller do not wait for each other's pods.
        configuration["waitForPodsReady"] = {
            "timeout": f"{pods_ready_timeout_s}s", "blockAdmission": False,
            "requeuingStrategy": {"timestamp": "Eviction", "backoffBaseSeconds": 5, "backoffMaxSeconds": 20}}
    return configuration


class KueueController:
    """Installs Kueue's objects into a cluster and runs the controller against it; `stop()` ends it by PID."""

    def __init__(self, kubeconfig: Path, kubectl: Path, workdir: Path, pods_ready_timeout_s: int | None = None) -> None:
        self.kubeconfig, self.kubectl, self.workdir = Path(kubeconfig), Path(kubectl), Path(workdir)
        self.pods_ready_timeout_s = pods_ready_timeout_s
        self.process: ManagedProcess | None = None
        self.webhook_port = 0

    def kubectl_run(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        result = subprocess.run([str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def start(self, timeout_s: float = 120) -> KueueController:
        if not KUEUE_BINARY.exists():  # built once into the cache, like the control plane's binaries
            subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.DEVNULL, timeout=3600)
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs = make_certificates(self.workdir / "pki")
        cert_dir = self.workdir / "serving-certs"
        cert_dir.mkdir(exist_ok=True)
        # controller-runtime's webhook server reads tls.crt / tls.key from certDir.
        (cert_dir / "tls.crt").write_bytes(certs["leaf_cert"].read_bytes())
        (cert_dir / "tls.key").write_bytes(certs["leaf_key"].read_bytes())
        self.webhook_port, health_port = free_port(), free_port()
        url = f"https://127.0.0.1:{self.webhook_port}"
        objects = install_objects(url, certs["ca_cert"].read_bytes())
        stream = "".join("---\n" + json.dumps(obj) + "\n" for obj in objects)
        self.kubectl_run("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=stream)
        self._wait_established([obj["metadata"]["name"] for obj in objects if obj["kind"] == "CustomResourceDefinition"])
        self._ensure_namespace("kueue-system")
        config_path = self.workdir / "kueue-config.yaml"
        config_path.write_text(yaml.safe_dump(kueue_configuration(
            self.webhook_port, health_port, cert_dir, self.pods_ready_timeout_s)))
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        # With its own certificate management off, Kueue reads its metrics certificate from the fixed path
        # /etc/kueue/metrics/certs and exits without it. Rather than write into this machine's /etc, it
        # runs in a mount namespace of its own where /etc is a folder holding just that (Kueue is a static
        # binary and reaches the API server by IP with the kubeconfig's CA: it needs nothing else there).
        etc = self.workdir / "etc"
        (etc / "kueue" / "metrics").mkdir(parents=True, exist_ok=True)
        if not (etc / "kueue" / "metrics" / "certs").exists():
            (etc / "kueue" / "metrics" / "certs").symlink_to(cert_dir)
        argv = [*PRIVATE_ETC, str(etc), str(KUEUE_BINARY), f"--config={config_path}",
                "--feature-gates=VisibilityOnDemand=false", "--zap-log-level=2"]
        self.process = ManagedProcess("kueue", argv, self.workdir / "kueue.log", env=env)
        self._wait_ready(health_port, certs["ca_cert"], timeout_s)
        return self

    def _wait_established(self, names: list[str], timeout_s: float = 60) -> None:
        """`kubectl wait` fails on a CRD whose status the API server has not written yet: poll instead."""
        deadline = time.monotonic() + timeout_s
        while True:
            crds = json.loads(self.kubectl_run("get", "crd", *names, "-o", "json"))["items"]
            if all(any(c["type"] == "Established" and c["status"] == "True"
                       for c in (crd.get("status") or {}).get("conditions") or []) for crd in crds):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kueue's CRDs not Established after {timeout_s:.0f} s")
            time.sleep(0.5)

    def _ensure_namespace(self, name: str) -> None:
        manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        self.kubectl_run("apply", "-f", "-", stdin=json.dumps(manifest))

    def _wait_ready(self, health_port: int, ca_cert: Path, timeout_s: float) -> None:
        """Ready when its readiness probe answers and its webhook server speaks TLS with our CA."""
        context = ssl.create_default_context(cafile=str(ca_cert))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or not self.process.alive():
                raise RuntimeError(f"kueue exited early:\n{self.process.log_tail() if self.process else ''}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2):
                    pass
                with urllib.request.urlopen(f"https://127.0.0.1:{self.webhook_port}/healthz", timeout=2,
                                            context=context):
                    pass
            except urllib.error.HTTPError as error:
                if error.code == 404 and error.url.startswith("https"):
                    return  # the webhook server answers (it serves no /healthz): TLS and routing work
            except OSError:
                pass
            else:
                return
            time.sleep(1)
        raise RuntimeError(f"kueue not ready after {timeout_s:.0f} s:\n{self.process.log_tail() if self.process else ''}")

    def log_tail(self) -> str:
        return self.process.log_tail() if self.process else ""

    def stop(self) -> None:
        """Ends the controller and removes its webhook configurations: they fail closed, so with Kueue
        gone they would refuse every Job created in the cluster afterwards."""
        if self.process is not None:
            self.process.stop()
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            for prefix in ("mutating", "validating"):
                self.kubectl_run("delete", kind, f"kueue-{prefix}-webhook-configuration", "--ignore-not-found")
