"""The cluster test bed's kubelet stand-in: the pods the real scheduler binds to KWOK nodes run as podman
containers from their own image, and their status is what those containers did.

KWOK gives the cluster nodes (heartbeats, capacity) but, with its pod stages off, nothing runs a pod.
This process plays the kubelet's part for every node, and only that part:

* a pod bound to a node gets a container: its image (never pulled: `--pull never`; a missing image is
  the waiting reason ErrImageNeverPull, as on a node with imagePullPolicy Never), command, args, env with
  downward-API values (JOB_COMPLETION_INDEX is the Job controller's annotation fieldRef), ConfigMap and
  emptyDir volumes, a projected ServiceAccount token (TokenRequest bound to the pod, with the API server
  reached through a relay on the network's gateway), securityContext and memory limit
  (tests/image/pods.py translates the pod spec);
* `<hostname>.<subdomain>` resolves between pods: this machine's podman has CNI without its DNS plugin,
  so a pod with a subdomain gets a fixed address on the test bed's network and `--add-host` entries
  for its Job's hostnames (known ahead: an Indexed Job's pods are `<job>-<index>`);
* status reports the container: Running with Ready conditions and containerStatuses.startedAt once it
  runs, then phase Succeeded/Failed with the exit code, reason (Completed, Error, OOMKilled) and times
  when it exits. Nothing is reported that a container did not do;
* deleting or evicting a pod stops its container with SIGTERM, then SIGKILL after the pod's grace
  period (`podman stop -t`); once it has stopped, its final status is written and the pod is deleted
  with grace 0, as a kubelet finalizes a deletion;
* graceful node shutdown (a spot VM's preemption notice; `request_node_shutdown` asks for it, as the
  VM's shutdown event asks a kubelet): the node is reported NotReady ("node is shutting down"), new
  pods bound to it are rejected (Failed, reason NodeShutdown), and each running container gets
  SIGTERM, then SIGKILL after the pod's grace period capped at the node's shutdown grace (15 s for
  non-system pods on GKE); the pod ends Failed with the container's exit code, reason Terminated and
  the DisruptionTarget condition (TerminationByKubelet), as pkg/kubelet/nodeshutdown writes them. The
  pod is not deleted: the node going away is the test's part, as it is GKE's;
* a pod whose node was deleted (node loss) is left to the controllers (the pod GC marks and deletes
  it); its container is killed, as a lost machine's processes are gone;
* `kubectl logs`: the container logs in CRI format (podman's k8s-file driver) to a file, and a KWOK
  `Logs` object of the pod's name points KWOK's kubelet endpoint at it (needs `--enable-crds=Logs`).

Not played: probes (a pod with one is refused), restartPolicy Always/OnFailure restarts, CPU limits
(2 cores here), image pulls, init and sidecar containers, secrets, automounted service account tokens
(projected tokens are played, renewal included).

Run beside the cluster: `python tests/cluster/kubelet.py --kubeconfig FILE --network NAME --workdir DIR`.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "image"), str(REPO / "src")]
import pods  # noqa: E402

LABEL_OWNER = "pneumonia.testbed.kubelet"  # value: this kubelet's network name; marks its containers
LABEL_UID = "io.kubernetes.pod.uid"
POLL_S = 1.0
PODMAN_TIMEOUT_S = 120
# Fixed addresses (pods with a subdomain) come from the top of the network's range, every other pod's
# from below it, both chosen here: podman's own allocator goes on from its last address and wrapped
# into the fixed ones after ~190 pods on one network (an evaluate pod took a train worker's address
# in the fault matrix's fourth case: CreateContainerError "requested IP address ... is not available").
FIXED_HOSTS = 64
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# Graceful node shutdown, with the words of kubelet 1.36 (pkg/kubelet/nodeshutdown, pkg/kubelet/nodestatus).
SHUTDOWN_DIR = "node-shutdown"  # under --workdir: one file per node to shut down, holding its grace in seconds
GKE_SHUTDOWN_GRACE_S = 15  # what GKE's kubelet gives non-system pods on a spot VM's notice (the VM goes at 30 s)
NODE_SHUTTING_DOWN = "node is shutting down"
NODE_SHUTDOWN_REASON = "Terminated"
NODE_SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
NOT_ADMITTED_REASON = "NodeShutdown"
NOT_ADMITTED_MESSAGE = "Pod was rejected as the node is shutting down."
LOGS_API = ("kwok.x-k8s.io", "v1alpha1", "logs")

log = logging.getLogger("kubelet")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def podman(*args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT_S) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}... exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout.strip()


def podman_time(value: str) -> str:
    """podman inspect's '2026-12-06T10:51:02.123456789Z' (or with an offset) as RFC 3339 seconds, UTC."""
    head = value.split(".")[0]
    if "." in value:
        rest = value.split(".", 1)[1]
        offset = rest.lstrip("0123456789")
        head += offset
    parsed = datetime.datetime.fromisoformat(head.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def request_node_shutdown(workdir: Path, node: str, grace_s: int = GKE_SHUTDOWN_GRACE_S) -> None:
    """Ask the kubelet stand-in serving `workdir` to shut `node` down gracefully (its next sync: ~1 s)."""
    folder = workdir / SHUTDOWN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f".{node}").write_text(f"{grace_s}\n")
    (folder / f".{node}").rename(folder / node)  # whole, or not there


def container_name(network: str, namespace: str, pod: str, uid: str) -> str:
    """The podman name of a pod's container: this kubelet's network first (podman storage is shared)."""
    return f"{network}-{namespace}-{pod}"[:120] + f"-{uid[:8]}"


# --- the network the pods share ---------------------------------------------------------------------


def ensure_network(network: str, image: str) -> str:
    """The test bed's podman network (a bridge: the pods reach each other and the host's gateway address,
    nothing beyond: see fence_rule), with an idle infra container holding it up so the gateway address
    exists before any pod (servers bind to it). Returns the gateway address."""
    if subprocess.run(["podman", "network", "exists", network], timeout=60, check=False).returncode != 0:
        podman("network", "create", network)
    rule = fence_rule(network)
    if subprocess.run(["iptables", "-C", *rule], capture_output=True, timeout=60, check=False).returncode != 0:
        subprocess.run(["iptables", "-I", *rule[:1], "1", *rule[1:]], capture_output=True, timeout=60, check=True)
    infra = f"{network}-infra"
    if subprocess.run(["podman", "container", "exists", infra], timeout=60, check=False).returncode != 0:
        podman("run", "-d", "--name", infra, "--network", network, "--ip", str(network_hosts(network)[1]),
               "--entrypoint", "sleep", "--label", f"{LABEL_OWNER}={network}", image, "infinity")
    return str(network_hosts(network)[0])


def fence_rule(network: str) -> list[str]:
    """The iptables rule that keeps the network's traffic on this machine. An `--internal` podman network
    has no gateway address here (CNI), and the pods need one for the bucket stand-in; a plain bridge
    masquerades, and podman turns IP forwarding on, so anything from the network to an address outside
    it is dropped where it would be forwarded. The gateway (this machine) is input, not forwarded, and
    with bridge netfilter on, pod-to-pod traffic crosses FORWARD with both ends inside the subnet."""
    subnet = network_subnet(network)
    return ["FORWARD", "-s", subnet, "!", "-d", subnet, "-m", "comment", "--comment", f"pneumonia-testbed {network}",
            "-j", "DROP"]


def remove_network(network: str) -> None:
    podman("rm", "--force", "--time", "0", f"{network}-infra", check=False)
    if subprocess.run(["podman", "network", "exists", network], timeout=60, check=False).returncode == 0:
        rule = fence_rule(network)
        for _ in range(10):  # one rule per ensure_network; a crash between two may have left another
            if subprocess.run(["iptables", "-D", *rule], capture_output=True, timeout=60, check=False).returncode:
                break
    podman("network", "rm", "--force", network, check=False)


def network_subnet(network: str) -> str:
    return podman("network", "inspect", network, "--format", "{{range .Subnets}}{{.Subnet}}{{end}}")


def network_hosts(network: str) -> list[ipaddress.IPv4Address]:
    return list(ipaddress.ip_network(network_subnet(network)).hosts())


# --- one pod's container ----------------------------------------------------------------------------


@dataclass
class Tracked:
    """What this kubelet knows of one pod it started (by pod uid)."""

    namespace: str
    name: str
    container: str
    container_name: str
    log_file: Path
    address: str = ""  # the pod's IP on the network, read when the container started (gone once it exits)
    stopping: subprocess.Popen | None = None
    reported: str = ""  # "", "running", "terminated"
    finalized: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Kubelet:
    def __init__(self, core, batch, custom, network: str, workdir: Path, node_env: list[str], node_mounts: list[str],  # noqa: ANN001
                 namespace_prefix: str = "") -> None:
        self.core, self.batch, self.custom = core, batch, custom
        self.namespace_prefix = namespace_prefix
        self.network, self.workdir = network, workdir
        self.node_env, self.node_mounts = node_env, node_mounts
        self.tracked: dict[str, Tracked] = {}
        self.fixed: dict[tuple[str, str, str], str] = {}  # (namespace, subdomain, hostname) -> address
        hosts = [str(host) for host in network_hosts(network)]
        self.hosts = hosts[-FIXED_HOSTS:]
        self.dynamic_hosts = hosts[2:-FIXED_HOSTS]  # after the gateway and the infra container
        self.next_dynamic = 0
        self.logs_crd = True
        self.stop = threading.Event()
        self.start_failed: dict[str, float] = {}  # pod uid -> when its container last failed to start
        self.shutting_down: dict[str, int] = {}  # node -> its shutdown grace (seconds), once asked
        self.extra_hosts: list[str] = []  # name:address every container resolves (the API server's)
        self.tokens: dict[str, tuple[dict, dict, Path, float]] = {}  # pod uid -> (pod, token source, folder, renew at)

    # -- the API ----------------------------------------------------------------------------------

    def list_json(self, call, **kwargs) -> list[dict]:  # noqa: ANN001
        response = call(_preload_content=False, **kwargs)
        return json.loads(response.data)["items"]

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        """A strategic merge patch of the status: conditions merge by type (the eviction API's or the pod
        GC's DisruptionTarget stays), containerStatuses by name; a null removes a key (the state left)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(name, namespace, {"status": status}, _preload_content=False,
                                                  _content_type="application/strategic-merge-patch+json")
        except ApiException as error:
            if error.status != 404:
                raise

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_pod(name, namespace, body=client.V1DeleteOptions(
                grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)))
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sync_once()
            except Exception:  # noqa: BLE001 - one bad round (API restart, podman hiccup) must not end the node
                log.exception("sync failed; retrying")
            self.stop.wait(POLL_S)

    def sync_once(self) -> None:
        pods_bound = self.list_json(self.core.list_pod_for_all_namespaces, field_selector="spec.nodeName!=")
        nodes = {node["metadata"]["name"] for node in self.list_json(self.core.list_node)}
        self.begin_node_shutdowns(nodes)
        containers = self.containers()
        alive = set()
        for pod in pods_bound:
            if not pod["metadata"]["namespace"].startswith(self.namespace_prefix):
                continue  # another stand-in's pods (several test beds may share one control plane)
            uid = pod["metadata"]["uid"]
            alive.add(uid)
            if pod["spec"]["nodeName"] not in nodes:
                # Node lost: its kubelet and processes are gone; the controllers decide about the pod.
                if uid in containers:
                    self.kill(uid, containers[uid])
                continue
            try:
                self.sync_pod(pod, containers.get(uid))
            except pods.PodSettingError as error:
                self.report_waiting(pod, "CreateContainerConfigError", str(error))
        for uid, state in containers.items():
            if uid not in alive:  # the pod object is gone (force-deleted, or finalized by us)
                self.kill(uid, state)
        self.renew_tokens(alive)

    def containers(self) -> dict[str, dict]:
        """This kubelet's containers by pod uid: podman's own view of them."""
        listing = podman("ps", "--all", "--format", "json", "--filter", f"label={LABEL_OWNER}={self.network}")
        found = {}
        for entry in json.loads(listing or "[]"):
            uid = (entry.get("Labels") or {}).get(LABEL_UID)
            if uid:
                found[uid] = entry
        return found

    def sync_pod(self, pod: dict, container: dict | None) -> None:
        meta, status = pod["metadata"], pod.get("status", {})
        uid = meta["uid"]
        deleting = meta.get("deletionTimestamp") is not None
        tracked = self.tracked.get(uid)
        if container is None:
            if tracked is not None:
                return  # we removed it after finalizing; the pod object goes with its finalizers
            if deleting:
                self.delete_pod(meta["namespace"], meta["name"], uid)
            elif status.get("phase", "Pending") == "Pending" and pod["spec"]["nodeName"] in self.shutting_down:
                self.reject_during_shutdown(pod)
            elif status.get("phase", "Pending") == "Pending" and time.monotonic() - self.start_failed.get(uid, -1e9) > 10:
                self.start(pod)
            return
        if tracked is None:  # a container from before a restart of this process
            tracked = self.adopt(pod, container)
        state = container.get("State", "")
        if state in ("exited", "stopped"):
            if tracked.reported != "terminated":
                self.report_terminated(pod, tracked)
            if deleting and not tracked.finalized:
                tracked.finalized = True
                self.delete_pod(meta["namespace"], meta["name"], uid)
            return
        if tracked.reported == "" and state == "running":
            self.report_running(pod, tracked)
        if deleting and tracked.stopping is None:
            grace = meta.get("deletionGracePeriodSeconds", pod["spec"].get("terminationGracePeriodSeconds", 30))
            self.stop_container(pod, tracked, grace)
        elif pod["spec"]["nodeName"] in self.shutting_down and tracked.stopping is None:
            # The pod's own grace period, but no more than the node has left (kubelet's killPods).
            grace = min(pod["spec"].get("terminationGracePeriodSeconds", 30), self.shutting_down[pod["spec"]["nodeName"]])
            tracked.extra["node_shutdown"] = True
            self.stop_container(pod, tracked, grace)

    def stop_container(self, pod: dict, tracked: Tracked, grace: int) -> None:
        meta = pod["metadata"]
        log.info("stopping %s/%s: SIGTERM, SIGKILL after %ss", meta["namespace"], meta["name"], grace)
        tracked.stopping = subprocess.Popen(["podman", "stop", "--time", str(grace), tracked.container_name],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # -- graceful node shutdown -------------------------------------------------------------------

    def begin_node_shutdowns(self, nodes: set[str]) -> None:
        """Nodes newly asked to shut down (files under workdir/node-shutdown/): reported NotReady at once,
        as the kubelet does before it stops any pod (the node lifecycle controller then taints it
        not-ready:NoSchedule and the scheduler places nothing more there)."""
        folder = self.workdir / SHUTDOWN_DIR
        for request in sorted(folder.iterdir()) if folder.is_dir() else ():
            node = request.name
            if node.startswith(".") or node in self.shutting_down or node not in nodes:
                continue
            self.shutting_down[node] = int(request.read_text().strip() or GKE_SHUTDOWN_GRACE_S)
            log.info("node %s: shutting down, grace %ss", node, self.shutting_down[node])
            now = now_rfc3339()
            self.core.patch_node_status(node, {"status": {"conditions": [{
                "type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": NODE_SHUTTING_DOWN,
                "lastHeartbeatTime": now, "lastTransitionTime": now}]}})

    def reject_during_shutdown(self, pod: dict) -> None:
        """A pod bound to a node that is shutting down is not admitted (the kubelet's admit handler)."""
        meta = pod["metadata"]
        log.warning("%s/%s: rejected: %s", meta["namespace"], meta["name"], NOT_ADMITTED_MESSAGE)
        self.patch_status(meta["namespace"], meta["name"], {
            "phase": "Failed", "reason": NOT_ADMITTED_REASON, "message": NOT_ADMITTED_MESSAGE})

    # -- starting ---------------------------------------------------------------------------------

    def start(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        (container,) = spec["containers"]
        image = container["image"]
        if subprocess.run(["podman", "image", "exists", image], timeout=60, check=False).returncode != 0:
            self.report_waiting(pod, "ErrImageNeverPull",
                                f'Container image "{image}" is not present with pull policy of Never')
            self.start_failed[meta["uid"]] = time.monotonic()
            return
        uid = meta["uid"]
        name = container_name(self.network, meta["namespace"], meta["name"], uid)
        pod_dir = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{uid}"
        log_file = pod_dir / f"{container['name']}.log"
        config_dirs = self.config_volumes(pod, pod_dir)
        network = ("--network", self.network, *self.pod_addresses(pod))
        extra = ("--label", f"{LABEL_OWNER}={self.network}", "--label", f"{LABEL_UID}={uid}",
                 "--pull", "never", "--log-driver", "k8s-file", "--log-opt", f"path={log_file}",
                 *[flag for env in self.node_env for flag in ("--env", env)],
                 *[flag for mount in self.node_mounts for flag in ("--volume", mount)],
                 *[flag for host in self.extra_hosts for flag in ("--add-host", host)])
        pod_flags = pods.api_pod(pod, name=name, config_dirs=config_dirs, network=network, extra=extra)
        pod_dir.mkdir(parents=True, exist_ok=True)
        self.tracked[uid] = Tracked(meta["namespace"], meta["name"], container["name"], name, log_file)
        log.info("starting %s/%s on %s as container %s", meta["namespace"], meta["name"], spec["nodeName"], name)
        podman("rm", "--force", "--ignore", name, check=False)
        result = subprocess.run(["podman", "run", "-d", "--name", name, *pod_flags.flags, image, *pod_flags.args],
                                capture_output=True, text=True, timeout=PODMAN_TIMEOUT_S, check=False)
        if result.returncode != 0:
            # The container could not be created or started (a bad flag, a mount): the kubelet's
            # CreateContainerError. It may still exist as created/exited; its exit is then reported.
            del self.tracked[uid]
            self.start_failed[uid] = time.monotonic()  # retried, as a kubelet does, but not every second
            podman("rm", "--force", "--ignore", name, check=False)
            self.report_waiting(pod, "CreateContainerError", result.stderr.strip()[-500:])
            return
        # The address this stand-in chose (--ip); inspect only as a fallback: a container that exits at
        # once has left the network before inspect reads it, and its pod would show no podIP.
        chosen = network[network.index("--ip") + 1] if "--ip" in network else ""
        self.tracked[uid].address = chosen or self.address_of(json.loads(podman("inspect", name))[0])
        self.serve_logs(meta["namespace"], meta["name"], container["name"], log_file)

    def config_volumes(self, pod: dict, pod_dir: Path) -> dict[str, str]:
        """Each ConfigMap volume's keys, and each projected volume's sources, written as files (read from
        the API now, as the kubelet does)."""
        folders = {}
        for volume in pod["spec"].get("volumes", []):
            if "configMap" in volume:
                files = self.config_map_files(pod, volume["configMap"])
            elif "projected" in volume:
                files = {path: text for source in volume["projected"]["sources"]
                         for path, text in self.projected_files(pod, source).items()}
            else:
                continue
            folder = pod_dir / "volumes" / volume["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for path, text in files.items():
                (folder / path).write_text(text)
            folder.chmod(0o755)
            for source in volume.get("projected", {}).get("sources", []):
                if "serviceAccountToken" in source:
                    self.tokens[pod["metadata"]["uid"]] = (pod, source["serviceAccountToken"], folder, self.renew_at(source))
            for path in folder.iterdir():
                path.chmod(0o644)
            folders[volume["name"]] = str(folder)
        return folders

    def request_token(self, pod: dict, token: dict) -> str:
        """A token for the pod's ServiceAccount bound to the pod (TokenRequest, as the kubelet asks for it)."""
        meta = pod["metadata"]
        request = {"spec": {"expirationSeconds": token.get("expirationSeconds", 3600),
                            "audiences": [token["audience"]] if token.get("audience") else None,
                            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                               "uid": meta["uid"]}}}
        answer = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"), meta["namespace"], request)
        return answer.status.token

    @staticmethod
    def renew_at(source: dict) -> float:
        # The kubelet renews a projected token once 80% of its lifetime has passed.
        return time.monotonic() + 0.8 * source["serviceAccountToken"].get("expirationSeconds", 3600)

    def renew_tokens(self, alive: set[str]) -> None:
        for uid, (pod, token, folder, renew_at) in list(self.tokens.items()):
            if uid not in alive:
                del self.tokens[uid]
            elif time.monotonic() >= renew_at:
                (folder / token["path"]).write_text(self.request_token(pod, token))
                self.tokens[uid] = (pod, token, folder, self.renew_at({"serviceAccountToken": token}))

    def config_map_files(self, pod: dict, source: dict) -> dict[str, str]:
        data = self.core.read_namespaced_config_map(source["name"], pod["metadata"]["namespace"]).data or {}
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        return {item["path"]: data[item["key"]] for item in items}

    def projected_files(self, pod: dict, source: dict) -> dict[str, str]:
        """One source of a projected volume: a ServiceAccount token bound to the pod, ConfigMap keys, the
        pod's namespace."""
        meta = pod["metadata"]
        if "serviceAccountToken" in source:
            return {source["serviceAccountToken"]["path"]: self.request_token(pod, source["serviceAccountToken"])}
        if "configMap" in source:
            return self.config_map_files(pod, source["configMap"])
        if "downwardAPI" in source:
            items = source["downwardAPI"]["items"]
            if any(item.get("fieldRef", {}).get("fieldPath") != "metadata.namespace" for item in items):
                raise pods.PodSettingError(f"pod {meta['name']}: only metadata.namespace is projected here")
            return {item["path"]: meta["namespace"] for item in items}
        raise pods.PodSettingError(f"pod {meta['name']}: projected source {sorted(source)} is not reproduced")

    def dynamic_address(self) -> str:
        """The next address below the fixed ones that no running container of this kubelet holds (round
        robin, so an address just released is not handed out again at once)."""
        in_use = {tracked.address for tracked in self.tracked.values() if tracked.reported != "terminated"}
        for _ in range(len(self.dynamic_hosts)):
            address = self.dynamic_hosts[self.next_dynamic % len(self.dynamic_hosts)]
            self.next_dynamic += 1
            if address not in in_use:
                return address
        raise RuntimeError(f"no free address left below the fixed ones on {self.network}")

    def free_fixed_address(self) -> str:
        """A fixed address no hostname holds; when all are taken, those of namespaces where none of this
        kubelet's pods runs any more are given back first (each test's namespace is its own)."""
        if len(self.fixed) == len(self.hosts):
            live = {tracked.namespace for tracked in self.tracked.values() if tracked.reported != "terminated"}
            self.fixed = {key: address for key, address in self.fixed.items() if key[0] in live}
        taken = set(self.fixed.values())
        for address in self.hosts:
            if address not in taken:
                return address
        raise RuntimeError(f"all {len(self.hosts)} fixed addresses on {self.network} are held by running pods' "
                           "hostnames")

    def pod_addresses(self, pod: dict) -> tuple[str, ...]:
        """For a pod in a headless Service's subdomain: its fixed address and its Job's peers' names."""
        spec, meta = pod["spec"], pod["metadata"]
        subdomain = spec.get("subdomain")
        if not subdomain:
            return ("--ip", self.dynamic_address())
        namespace = meta["namespace"]
        own = spec.get("hostname") or meta["name"]
        hostnames = []
        job_name = meta.get("labels", {}).get(JOB_NAME_LABEL)
        if job_name:
            from kubernetes.client.exceptions import ApiException

            try:
                job = self.batch.read_namespaced_job(job_name, namespace, _preload_content=False)
                completions = json.loads(job.data)["spec"].get("completions") or 1
                hostnames += [f"{job_name}-{i}" for i in range(completions)]
            except ApiException:
                pass
        flags: list[str] = []
        for hostname in dict.fromkeys([*hostnames, own]):  # the Job's in index order: predictable addresses
            key = (namespace, subdomain, hostname)
            if key not in self.fixed:
                self.fixed[key] = self.free_fixed_address()
            address = self.fixed[key]
            for alias in (f"{hostname}.{subdomain}", f"{hostname}.{subdomain}.{namespace}.svc.cluster.local"):
                flags += ["--add-host", f"{alias}:{address}"]
        return ("--ip", self.fixed[(namespace, subdomain, own)], *flags)

    def serve_logs(self, namespace: str, name: str, container: str, log_file: Path) -> None:
        """A KWOK Logs object for the pod: `kubectl logs` reads `log_file` through KWOK's kubelet endpoint."""
        if not self.logs_crd:
            return
        from kubernetes.client.exceptions import ApiException

        body = {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"logs": [{"containers": [container], "logsFile": str(log_file), "follow": True}]}}
        group, version, plural = LOGS_API
        try:
            self.custom.create_namespaced_custom_object(group, version, namespace, plural, body)
        except ApiException as error:
            if error.status == 404:
                log.warning("no KWOK Logs API (kwokctl --enable-crds=Logs): `kubectl logs` will not work")
                self.logs_crd = False
            elif error.status != 409:
                raise

    def adopt(self, pod: dict, container: dict) -> Tracked:
        meta = pod["metadata"]
        name = container["Names"][0]
        info = json.loads(podman("inspect", name))[0]
        log_file = Path(info.get("HostConfig", {}).get("LogConfig", {}).get("Path", ""))
        tracked = Tracked(meta["namespace"], meta["name"], pod["spec"]["containers"][0]["name"], name, log_file)
        statuses = pod.get("status", {}).get("containerStatuses") or []
        if statuses and "terminated" in statuses[0].get("state", {}):
            tracked.reported = "terminated"
        elif statuses and "running" in statuses[0].get("state", {}):
            tracked.reported = "running"
        self.tracked[meta["uid"]] = tracked
        return tracked

    # -- reporting --------------------------------------------------------------------------------

    def inspect(self, tracked: Tracked) -> dict:
        return json.loads(podman("inspect", tracked.container_name))[0]

    @staticmethod
    def address_of(info: dict) -> str:
        address = ""
        for settings in (info.get("NetworkSettings", {}).get("Networks") or {}).values():
            address = settings.get("IPAddress") or address
        return address

    def base_status(self, pod: dict, info: dict, tracked: Tracked) -> dict:
        address = self.address_of(info) or tracked.address
        status: dict[str, Any] = {"hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}]}
        if address:
            status.update(podIP=address, podIPs=[{"ip": address}])
        if not pod.get("status", {}).get("startTime"):
            status["startTime"] = podman_time(info["Created"])
        return status

    def report_running(self, pod: dict, tracked: Tracked) -> None:
        info = self.inspect(tracked)
        started = podman_time(info["State"]["StartedAt"])
        container = pod["spec"]["containers"][0]
        status = self.base_status(pod, info, tracked)
        status["phase"] = "Running"
        status["conditions"] = [self.condition(kind, "True", started) for kind in
                                ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")]
        status["containerStatuses"] = [{
            "name": container["name"], "image": container["image"], "imageID": info.get("Image", ""),
            "containerID": f"podman://{info['Id']}", "ready": True, "started": True, "restartCount": 0,
            "state": {"waiting": None, "terminated": None, "running": {"startedAt": started}}}]
        self.patch_status(tracked.namespace, tracked.name, status)
        tracked.reported = "running"

    def report_terminated(self, pod: dict, tracked: Tracked) -> None:
        info = self.inspect(tracked)
        state = info["State"]
        code = int(state["ExitCode"])
        reason = "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
        finished = podman_time(state["FinishedAt"])
        started = podman_time(state["StartedAt"]) if not state["StartedAt"].startswith("0001") else finished
        container = pod["spec"]["containers"][0]
        phase = "Succeeded" if code == 0 else "Failed"
        status = self.base_status(pod, info, tracked)
        status["phase"] = phase
        pod_reason = "PodCompleted" if code == 0 else "PodFailed"
        status["conditions"] = [self.condition("PodReadyToStartContainers", "False", finished),
                                self.condition("Initialized", "True", started),
                                self.condition("ContainersReady", "False", finished, pod_reason),
                                self.condition("Ready", "False", finished, pod_reason)]
        status["containerStatuses"] = [{
            "name": container["name"], "image": container["image"], "imageID": info.get("Image", ""),
            "containerID": f"podman://{info['Id']}", "ready": False, "started": False, "restartCount": 0,
            "state": {"waiting": None, "running": None, "terminated": {
                "exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished,
                "containerID": f"podman://{info['Id']}"}}}]
        if tracked.extra.get("node_shutdown"):
            # The phase the container gave, with the kubelet's words for why it was stopped.
            status["reason"], status["message"] = NODE_SHUTDOWN_REASON, NODE_SHUTDOWN_MESSAGE
            status["conditions"].append(self.condition("DisruptionTarget", "True", finished, "TerminationByKubelet",
                                                       NODE_SHUTDOWN_MESSAGE))
        log.info("%s/%s: container exited %s (%s): phase %s", tracked.namespace, tracked.name, code, reason, phase)
        self.patch_status(tracked.namespace, tracked.name, status)
        tracked.reported = "terminated"

    def report_waiting(self, pod: dict, reason: str, message: str) -> None:
        statuses = pod.get("status", {}).get("containerStatuses") or []
        if statuses and statuses[0].get("state", {}).get("waiting", {}).get("reason") == reason:
            return
        container = pod["spec"]["containers"][0]
        log.warning("%s/%s: %s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], reason, message)
        self.patch_status(pod["metadata"]["namespace"], pod["metadata"]["name"], {
            "conditions": [self.condition("ContainersReady", "False", now_rfc3339(), "ContainersNotReady"),
                           self.condition("Ready", "False", now_rfc3339(), "ContainersNotReady")],
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                   "ready": False, "started": False, "restartCount": 0,
                                   "state": {"waiting": {"reason": reason, "message": message}}}]})

    @staticmethod
    def condition(kind: str, value: str, when: str, reason: str | None = None, message: str | None = None) -> dict:
        condition = {"type": kind, "status": value, "lastTransitionTime": when, "lastProbeTime": None}
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        return condition

    # -- ending -----------------------------------------------------------------------------------

    def kill(self, uid: str, container: dict) -> None:
        """The pod is gone from the API, or its node is: the container goes at once (SIGKILL)."""
        name = container["Names"][0]
        log.info("removing container %s (pod %s gone or its node lost)", name, uid)
        podman("rm", "--force", "--time", "0", name, check=False)
        tracked = self.tracked.get(uid)
        if tracked is not None and self.logs_crd:
            from kubernetes.client.exceptions import ApiException

            group, version, plural = LOGS_API
            try:
                self.custom.delete_namespaced_custom_object(group, version, tracked.namespace, plural, tracked.name)
            except ApiException:
                pass

    def remove_all(self) -> None:
        """Every container of this kubelet, for a clean shutdown of the test bed."""
        for uid, container in self.containers().items():
            self.kill(uid, container)


# How a pod reaches the API server, as the kubelet tells every container (KUBERNETES_SERVICE_HOST/PORT).
# On a cluster that is the `kubernetes` Service's address; here the API server listens on 127.0.0.1
# only, so a relay on the network's gateway forwards to it, under a name its certificate holds.
API_SERVER_NAME = "kubernetes.default.svc"


def relay_api_server(server_url: str, gateway: str) -> int:
    """Forwards TCP from the gateway (a free port, returned) to the API server (TLS passes through)."""
    target = urllib.parse.urlsplit(server_url)
    listener = socket.create_server((gateway, 0))

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with source, sink:
            while data := source.recv(65536):
                sink.sendall(data)

    def serve() -> None:
        while True:
            pod_side, _ = listener.accept()
            try:
                server_side = socket.create_connection((target.hostname, target.port), timeout=10)
            except OSError:
                pod_side.close()
                continue
            server_side.settimeout(None)
            for a, b in ((pod_side, server_side), (server_side, pod_side)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def api_server_env(node_env: list[str], port: int) -> list[str]:
    """KUBERNETES_SERVICE_HOST/PORT, and the API's name added to the node's NO_PROXY (the pods' https_proxy
    leads to the bucket stand-in only)."""
    env = [f"KUBERNETES_SERVICE_HOST={API_SERVER_NAME}", f"KUBERNETES_SERVICE_PORT={port}"]
    for entry in node_env:
        key, _, value = entry.partition("=")
        if key in ("NO_PROXY", "no_proxy"):
            env.append(f"{key}={value},{API_SERVER_NAME}")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--network", required=True, help="the podman network the pods join (made if absent)")
    parser.add_argument("--workdir", required=True, type=Path, help="pod folders: ConfigMap files, container logs")
    parser.add_argument("--infra-image", default="localhost/pneumonia:image-test",
                        help="image for the idle container that keeps the network's gateway address up")
    parser.add_argument("--node-env", action="append", default=[], metavar="KEY=VALUE",
                        help="what the node gives every container (the bucket stand-in's endpoints)")
    parser.add_argument("--node-mount", action="append", default=[], metavar="HOST:CONTAINER:ro",
                        help="a host file every container sees (the bucket stand-in's CA)")
    parser.add_argument("--ready-file", type=Path, help="written with the gateway address once running")
    parser.add_argument("--namespace-prefix", default="",
                        help="serve only pods in namespaces starting with this (a real node's kubelet serves all "
                             "of its pods; here several stand-ins may share one control plane)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kubelet %(levelname)s %(message)s")

    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=args.kubeconfig)
    gateway = ensure_network(args.network, args.infra_image)
    api_port = relay_api_server(api_client.configuration.host, gateway)
    kubelet = Kubelet(client.CoreV1Api(api_client), client.BatchV1Api(api_client), client.CustomObjectsApi(api_client),
                      args.network, args.workdir.resolve(), [*args.node_env, *api_server_env(args.node_env, api_port)],
                      args.node_mount, args.namespace_prefix)
    kubelet.extra_hosts = [f"{API_SERVER_NAME}:{gateway}"]
    signal.signal(signal.SIGTERM, lambda *_: kubelet.stop.set())
    signal.signal(signal.SIGINT, lambda *_: kubelet.stop.set())
    if args.ready_file:
        args.ready_file.write_text(gateway + "\n")
    log.info("serving every node's pods; network %s, gateway %s", args.network, gateway)
    try:
        kubelet.run()
    finally:
        kubelet.remove_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
