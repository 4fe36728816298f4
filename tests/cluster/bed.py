"""What the pods need around the control plane: the image, the podman network, the bucket stand-in on
that network's gateway, and the kubelet stand-in (tests/cluster/kubelet.py) as a process.

Used by `make cluster-local` (tests/cluster/local.py) and the cluster tests' fixtures. The control plane
itself is the test bed's (`make cluster-up`); this module only needs its kubeconfig.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "image"), str(REPO / "tests" / "cluster"), str(REPO / "src")]
import kubelet as kubelet_module  # noqa: E402
import run as image_run  # noqa: E402
from gcs_emulator import GcsEmulator, ManagedProcess  # noqa: E402

IMAGE = image_run.IMAGE
# Where every container finds the bucket stand-in's CA (what a GKE node's trust store is to Google's).
CA_IN_POD = "/etc/pneumonia-testbed/ca.pem"
KUBELET_READY_S = 60


def build_image() -> None:
    """The project's image on the stand-in base, as `make image-test` builds it (cached layers: quick
    when nothing changed). Raises image_run.ImageTestError when a step fails."""
    image_run.LOGS.mkdir(parents=True, exist_ok=True)
    image_run.ensure_tools()
    if subprocess.run(["podman", "image", "exists", image_run.BASE], timeout=60, check=False).returncode != 0:
        code = image_run.build_base()
        if code:
            raise image_run.ImageTestError(f"the stand-in base failed ({code}); see {image_run.LOGS / 'base.log'}")
    image_run.configure_podman()
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=60, check=False).stdout.strip() or "unknown"
    log = image_run.LOGS / "build.log"
    if image_run.build_image(IMAGE, revision, log):
        raise image_run.ImageTestError(f"podman build failed; see {log}:\n{image_run.log_tail(log)}")


class PodNetworkBed:
    """The podman network, the GCS stand-in listening on its gateway, and the kubelet process.

    `start()` then `stop()` (or a `with` block). `.emulator` is the GcsEmulator (its `.env` reaches it
    from this machine), `.gateway` the address the pods reach this machine on, `.workdir/pods/` the
    pods' folders (ConfigMap files and container logs)."""

    def __init__(self, kubeconfig: str, workdir: Path, network: str, bucket: str, image: str = IMAGE,
                 namespace_prefix: str = "") -> None:
        self.kubeconfig, self.workdir, self.network, self.bucket, self.image = kubeconfig, workdir, network, bucket, image
        self.namespace_prefix = namespace_prefix  # the kubelet serves only these namespaces' pods
        self.gateway = ""
        self.emulator: GcsEmulator | None = None
        self.kubelet: ManagedProcess | None = None

    def __enter__(self) -> PodNetworkBed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> PodNetworkBed:
        self.workdir.mkdir(parents=True, exist_ok=True)
        image_run.configure_podman()  # CONTAINERS_CONF for this machine, inherited by the kubelet
        try:
            self.gateway = kubelet_module.ensure_network(self.network, self.image)
            self.emulator = GcsEmulator(self.workdir / "gcs", bucket=self.bucket, host=self.gateway).start()
            ready = self.workdir / "kubelet.ready"
            ready.unlink(missing_ok=True)
            argv = [sys.executable, str(REPO / "tests" / "cluster" / "kubelet.py"), "--kubeconfig", self.kubeconfig,
                    "--network", self.network, "--workdir", str(self.workdir), "--infra-image", self.image,
                    "--ready-file", str(ready), "--namespace-prefix", self.namespace_prefix, "--node-mount", f"{self.emulator.certs['ca_cert']}:{CA_IN_POD}:ro",
                    *[flag for env in self.pod_env() for flag in ("--node-env", env)]]
            self.kubelet = ManagedProcess("kubelet", argv, self.workdir / "kubelet.log")
            deadline = time.monotonic() + KUBELET_READY_S
            while not ready.exists():
                if not self.kubelet.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the kubelet stand-in did not start:\n{self.kubelet.log_tail()}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def pod_env(self) -> list[str]:
        """What every container gets from its node: the bucket stand-in's endpoints and CA, as the
        pods on GKE get Google's endpoints and credentials from the node (Workload Identity)."""
        env = dict(self.emulator.env)
        env["CURL_CA_BUNDLE"] = CA_IN_POD
        # gRPC (the train workers' channels, TensorFlow's coordination service) would send every
        # connection through https_proxy too; an empty grpc_proxy keeps them direct, as on GKE.
        env["grpc_proxy"] = ""
        env.pop("GCS_RETRY_CONFIG_MAX_RETRIES", None)  # the pods keep TensorFlow's own retries
        return [f"{key}={value}" for key, value in env.items()]

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.process.terminate()  # it removes its containers on the way out
            try:
                self.kubelet.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.kubelet.process.kill()
            self.kubelet.stop()
            self.kubelet = None
        if self.emulator is not None:
            self.emulator.stop()
            self.emulator = None
        kubelet_module.remove_network(self.network)

    def read_object(self, name: str) -> bytes:
        """An object of the bucket, straight from the emulator (no proxy, no TensorFlow)."""
        url = f"{self.emulator.endpoint}/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=30) as response:
            return response.read()

    def read_json(self, name: str) -> dict:
        return json.loads(self.read_object(name))

    def host_env(self) -> dict[str, str]:
        """os.environ plus the emulator's: for processes on this machine that use the bucket."""
        return {**os.environ, **self.emulator.env}
