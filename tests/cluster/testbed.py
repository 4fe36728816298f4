"""A real Kubernetes control plane on this machine, for `make cluster-up` and the `cluster` tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler v1.36.4 run as processes on
127.0.0.1, started by `kwokctl create cluster --runtime binary` from binaries that
tests/cluster/build.sh builds once into ~/.cache/pneumonia-k8s/v1.36.4/bin. The nodes are KWOK's:
Node objects modelled on the GKE pools the manifests target (a CPU pool and an L4 GPU pool, each
on-demand and spot) that the KWOK controller keeps Ready. No kubelet: a pod the scheduler binds stays
Pending until something playing the kubelet runs it (tests/cluster/kwok.yaml leaves pods alone).

    python tests/cluster/testbed.py up [--name pneumonia] [--kubeconfig PATH]   # prints the kubeconfig
    python tests/cluster/testbed.py down [--name pneumonia]
    python tests/cluster/testbed.py kubeconfig [--name pneumonia]

Several clusters can run at once (one per name): kwokctl picks free ports for each.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
KUBE_VERSION = "v1.36.4"
CACHE = Path(os.environ.get("PNEUMONIA_K8S_CACHE", "~/.cache/pneumonia-k8s")).expanduser()
BIN = CACHE / KUBE_VERSION / "bin"
KWOK_WORKDIR = Path(os.environ.get("KWOK_WORKDIR", "~/.kwok")).expanduser()
DEFAULT_NAME = "pneumonia"

# Labels GKE puts on its nodes (the ones the manifests and the scheduler look at).
NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
SPOT_LABEL = "cloud.google.com/gke-spot"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclasses.dataclass(frozen=True)
class NodePool:
    """A GKE node pool as the scheduler sees it. Allocatable is what GKE leaves of the machine after its
    reservations (about 0.1 CPU and 3.5 GiB of 32 GiB; README.md, "Sizing the train pod per GPU type")."""

    name: str
    machine_type: str
    nodes: int
    spot: bool = False
    accelerator: str = ""
    gpus: int = 0
    cpu: str = "7910m"
    memory: str = "28960Mi"
    capacity_cpu: str = "8"
    capacity_memory: str = "32Gi"
    ephemeral_storage: str = "47Gi"  # of a 100 GB boot disk, what GKE leaves allocatable


# The README's pools: e2-standard-8 for the CPU stages, g2-standard-8 (one L4) for each train worker.
# Spot nodes carry GKE's label only: GKE adds no taint to spot pools unless asked, and the train Job
# tolerates just the GPU taint. Two of each GPU kind: a 2-worker train Job fits on either.
POOLS: tuple[NodePool, ...] = (
    NodePool("default-pool", "e2-standard-8", nodes=2),
    NodePool("cpu-spot", "e2-standard-8", nodes=1, spot=True),
    NodePool("gpu-l4", "g2-standard-8", nodes=2, accelerator="nvidia-l4", gpus=1),
    NodePool("gpu-l4-spot", "g2-standard-8", nodes=2, spot=True, accelerator="nvidia-l4", gpus=1),
)


def node_objects(pools: tuple[NodePool, ...] = POOLS, zone: str = "europe-west4-a") -> list[dict[str, Any]]:
    """The Node objects of `pools`, status included (a Node may be created with its status; KWOK then
    adds the conditions, addresses and nodeInfo a kubelet reports, keeping allocatable as given)."""
    nodes = []
    for pool in pools:
        for number in range(pool.nodes):
            name = f"gke-local-{pool.name}-{number}"
            labels = {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": pool.machine_type, "topology.kubernetes.io/zone": zone,
                "topology.kubernetes.io/region": zone.rsplit("-", 1)[0], NODEPOOL_LABEL: pool.name,
                "cloud.google.com/machine-family": pool.machine_type.split("-")[0],
                "type": "kwok",
            }
            taints = []
            allocatable = {"cpu": pool.cpu, "memory": pool.memory, "pods": "110",
                           "ephemeral-storage": pool.ephemeral_storage}
            capacity = {"cpu": pool.capacity_cpu, "memory": pool.capacity_memory, "pods": "110",
                        "ephemeral-storage": "95Gi"}
            if pool.spot:
                labels[SPOT_LABEL] = "true"
            if pool.gpus:
                labels[ACCELERATOR_LABEL] = pool.accelerator
                labels["cloud.google.com/gke-gpu"] = "true"
                # GKE taints every GPU node so that only pods asking for GPUs land there.
                taints.append({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"})
                allocatable[GPU_RESOURCE] = capacity[GPU_RESOURCE] = str(pool.gpus)
            nodes.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels,
                             "annotations": {"kwok.x-k8s.io/node": "fake",
                                             "node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {"taints": taints} if taints else {},
                # The API server reaches a node's "kubelet" (KWOK's server: logs) at its InternalIP.
                "status": {"allocatable": allocatable, "capacity": capacity,
                           "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                         {"type": "Hostname", "address": name}],
                           "nodeInfo": {"kubeletVersion": KUBE_VERSION, "operatingSystem": "linux",
                                        "architecture": "amd64", "osImage": "Container-Optimized OS (simulated)"}},
            })
    return nodes


def build(quiet: bool = False) -> Path:
    """Builds what is missing (tests/cluster/build.sh); returns the bin directory."""
    if subprocess.run([str(HERE / "build.sh"), "--check"], capture_output=True).returncode != 0 and not quiet:
        print(f"building the control plane's binaries into {BIN} (cold: about 8 minutes on 2 cores)",
              file=sys.stderr, flush=True)
    done = subprocess.run([str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


class ClusterError(RuntimeError):
    pass


@dataclasses.dataclass
class Cluster:
    """One named local control plane. `kubeconfig` is where `up` writes its kubeconfig (context kwok-<name>)."""

    name: str = DEFAULT_NAME
    kubeconfig: Path | None = None

    def __post_init__(self) -> None:
        if self.kubeconfig is None:
            self.kubeconfig = Path(f"~/.kube/pneumonia-{self.name}.yaml")
        self.kubeconfig = Path(self.kubeconfig).expanduser().resolve()

    @property
    def workdir(self) -> Path:
        return KWOK_WORKDIR / "clusters" / self.name

    @property
    def audit_log(self) -> Path:
        """Metadata of every request made by a ServiceAccount (tests/cluster/audit-policy.yaml)."""
        return self.workdir / "logs" / "audit.log"

    def exists(self) -> bool:
        return (self.workdir / "kwok.yaml").exists()

    # --- commands ---------------------------------------------------------------------------------

    def kwokctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return _run([str(BIN / "kwokctl"), "--name", self.name, *args], timeout=timeout)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess:
        """The v1.36.4 kubectl (the one on PATH may be too old for a 1.36 server) on this cluster."""
        return _run([str(BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                    input=input, check=check, timeout=timeout)

    def ready(self) -> bool:
        return self._answers(self.kubeconfig)

    def _answers(self, kubeconfig: Path | None = None) -> bool:
        """/readyz through `kubeconfig` (default: kwokctl's own admin kubeconfig of the cluster)."""
        kubeconfig = kubeconfig or self.workdir / "kubeconfig.yaml"
        if not kubeconfig.exists():
            return False
        try:
            return _run([str(BIN / "kubectl"), "--kubeconfig", str(kubeconfig), "get", "--raw", "/readyz"],
                        check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # --- lifecycle --------------------------------------------------------------------------------

    def up(self, timeout: float = 180) -> Cluster:
        """Starts the cluster (building what is missing), or reuses it when it already runs; adds the nodes."""
        build()
        if not self.exists():
            self._create(timeout)
        elif not self._answers():
            self.kwokctl("start", "cluster", timeout=timeout)  # stopped (e.g. after a reboot): start it again
        if not self.kubeconfig.exists():  # running already, asked for at another path: write it there too
            self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
            partial = self.kubeconfig.with_name(f".{self.kubeconfig.name}.tmp")
            partial.write_text(self.kwokctl("get", "kubeconfig").stdout)
            partial.replace(self.kubeconfig)
        self._wait(self.ready, timeout, "the API server to answer /readyz")
        self.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(node_objects()))
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={int(timeout)}s",
                     timeout=timeout + 10)
        self._wait(self._nodes_schedulable, timeout, "the nodes' not-ready taints to go")
        return self

    def _create(self, timeout: float) -> None:
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        options = {
            "kubeApiserverBinary": BIN / "kube-apiserver", "kubeControllerManagerBinary": BIN / "kube-controller-manager",
            "kubeSchedulerBinary": BIN / "kube-scheduler", "kwokControllerBinary": BIN / "kwok",
            "etcdBinary": BIN / "etcd", "kubectlBinary": BIN / "kubectl",
            "kubeVersion": KUBE_VERSION, "kubeAuditPolicy": HERE / "audit-policy.yaml",
        }
        documents = list(yaml.safe_load_all((HERE / "kwok.yaml").read_text()))
        documents[0]["options"].update({key: str(value) for key, value in options.items()})
        # kwokctl picks each cluster's ports from those no other cluster's config names yet: two creates at
        # once could pick the same ones, so creates (not the clusters) take turns.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"kwokctl-{self.name}-") as config, \
                open(KWOK_WORKDIR / ".pneumonia-create.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yaml.safe_dump_all(documents, config)
            config.flush()
            self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.kwokctl("create", "cluster", "--config", config.name, "--kubeconfig", str(self.kubeconfig),
                             "--timeout", f"{int(timeout)}s", "--wait", f"{int(timeout)}s", timeout=timeout + 30)
            except subprocess.CalledProcessError:
                print(f"kwokctl could not create cluster {self.name}; its logs: {self.workdir / 'logs'}",
                      file=sys.stderr)
                raise

    def down(self) -> None:
        if self.exists():
            self.kwokctl("delete", "cluster", "--kubeconfig", str(self.kubeconfig), timeout=120)
        shutil.rmtree(self.workdir, ignore_errors=True)
        # kwokctl removed its context from the kubeconfig; a file with none left was only ever ours.
        if self.kubeconfig.exists() and not (yaml.safe_load(self.kubeconfig.read_text()) or {}).get("contexts"):
            self.kubeconfig.unlink()

    def _nodes_schedulable(self) -> bool:
        nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        return bool(nodes) and not any(taint["key"].startswith("node.kubernetes.io/")
                                       for node in nodes for taint in node["spec"].get("taints", []))

    @staticmethod
    def _wait(condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)


def _run(command: list[str], input: str | None = None, check: bool = True,
         timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/cluster/testbed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "kubeconfig", "build"])
    parser.add_argument("--name", default=DEFAULT_NAME, help="cluster name (default: %(default)s)")
    parser.add_argument("--kubeconfig", default=None,
                        help="where `up` writes the kubeconfig (default: ~/.kube/pneumonia-NAME.yaml)")
    args = parser.parse_args(argv)
    cluster = Cluster(args.name, args.kubeconfig)
    try:
        if args.command == "build":
            print(build())
        elif args.command == "up":
            started = time.monotonic()
            cluster.up()
            print(f"cluster {cluster.name} ready in {time.monotonic() - started:.1f} s "
                  f"(logs: {cluster.workdir / 'logs'})", file=sys.stderr)
            print(f"export KUBECONFIG={cluster.kubeconfig}\n"
                  f"# kubectl v1.36.4: {BIN / 'kubectl'}  (the kubectl on PATH may be too old for 1.36)")
        elif args.command == "down":
            cluster.down()
            print(f"cluster {cluster.name} deleted", file=sys.stderr)
        else:
            print(cluster.kubeconfig)
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(error.cmd[:4])} ... exited {error.returncode}:\n{error.stderr or error.stdout}",
              file=sys.stderr)
        return 1
    except (ClusterError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
