"""The one module that knows the cluster: TF_CONFIG, JOB_COMPLETION_INDEX, who is chief, the strategy.

Nothing else in the project reads these environment variables; stages ask this module.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pneumonia import tf_startup
from pneumonia.config import ClusterConfig
from pneumonia.errors import BadInputError, ConfigError
from pneumonia.logs import get_logger

log = get_logger(__name__)

_TF_CONFIG = "TF_CONFIG"
_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"


def completion_index() -> int | None:
    """This pod's index in a Kubernetes Indexed Job, or None outside one."""
    value = os.environ.get(_COMPLETION_INDEX)
    if value in (None, ""):
        return None
    if not value.isdigit():
        raise BadInputError(f"JOB_COMPLETION_INDEX = {value!r} is not a pod index (a whole number >= 0); "
                            "Kubernetes sets it in Indexed Jobs: do not set it by hand")
    return int(value)


# The Job controller's own counts for this pod's index, handed over by the downward API
# (manifests/31-train-job.yaml, env): earlier attempts that failed and counted, and those the
# podFailurePolicy ignored (peer lost, preempted, disrupted). The annotations are absent on an index's
# first pod: empty means 0. The Job's backoffLimitPerIndex comes as a plain value beside them.
_FAILED_BEFORE = "JOB_INDEX_FAILURE_COUNT"
_FORGIVEN_BEFORE = "JOB_INDEX_IGNORED_FAILURE_COUNT"
_RETRY_LIMIT = "JOB_BACKOFF_LIMIT_PER_INDEX"
_JOB_UID = "JOB_UID"


@dataclass(frozen=True)
class IndexAttempt:
    """This pod among its index's attempts, as the Job controller counted them. The one place that
    decides when a lost peer stops being forgiven and when an attempt is the index's last."""

    failed_before: int = 0
    forgiven_before: int = 0
    retry_limit: int | None = None  # None: not in a Job with backoffLimitPerIndex
    job_uid: str = ""

    @classmethod
    def from_env(cls, environ: Any = None) -> IndexAttempt:
        environ = os.environ if environ is None else environ

        def count(name: str) -> int | None:
            value = environ.get(name, "")
            if value == "":
                return None
            if not value.isdigit():
                raise BadInputError(f"{name} = {value!r} is not a count; the train Job sets it from the Job "
                                    "controller's annotations (downward API): do not set it by hand")
            return int(value)

        return cls(failed_before=count(_FAILED_BEFORE) or 0, forgiven_before=count(_FORGIVEN_BEFORE) or 0,
                   retry_limit=count(_RETRY_LIMIT), job_uid=environ.get(_JOB_UID, ""))

    @property
    def is_last(self) -> bool:
        """A counted failure of this attempt fails the index for good (and, maxFailedIndexes 0, the Job)."""
        return self.retry_limit is not None and self.failed_before >= self.retry_limit

    def forgives_peer_loss(self, max_forgiven: int) -> bool:
        """A worker whose peers are gone exits with the code the Job ignores (75) until its index has been
        forgiven `max_forgiven` times; from then on it exits 1, which counts, so a partition that never
        heals spends the index's retries and fails the Job (MaxFailedIndexesExceeded) in bounded time instead of
        looping until activeDeadlineSeconds. The ignored count also holds preemptions: a run preempted
        that often gets counted peer losses, at most backoffLimitPerIndex of them before it fails."""
        return self.retry_limit is None or self.forgiven_before < max_forgiven


def tf_config() -> dict | None:
    """The parsed TF_CONFIG, or None when this process is not part of a multi-worker cluster."""
    raw = os.environ.get(_TF_CONFIG)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as error:
        raise BadInputError(f"TF_CONFIG is not valid JSON ({error}); it must look like "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("cluster"), dict):
        raise BadInputError("TF_CONFIG needs a 'cluster' mapping of task type to host:port lists")
    return parsed


def in_cluster() -> bool:
    """Whether this process is one of several: TF_CONFIG is set or it runs in an Indexed Job."""
    return bool(os.environ.get(_TF_CONFIG)) or completion_index() is not None


def worker_index() -> int:
    """This process's rank: TF_CONFIG's task index, else the Indexed Job's index, else 0."""
    parsed = tf_config()
    if parsed:
        return int(parsed.get("task", {}).get("index", 0))
    index = completion_index()
    return index if index is not None else 0


def worker_dns_name(job_name: str, index: int, service_name: str) -> str:
    """An Indexed Job pod's stable hostname under its headless Service (pod subdomain)."""
    return f"{job_name}-{index}.{service_name}"


def build_tf_config(index: int, num_workers: int, job_name: str, service_name: str, port: int) -> dict:
    """TF_CONFIG for worker `index` of an Indexed Job whose pods resolve as <job>-<i>.<service>."""
    workers = [f"{worker_dns_name(job_name, i, service_name)}:{port}" for i in range(num_workers)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


@dataclass(frozen=True)
class ClusterSpec:
    """Who is in the cluster and who this process is; one worker and no addresses when alone."""

    workers: tuple[str, ...] = ()
    task_type: str = "worker"
    task_index: int = 0
    has_chief_task: bool = False

    @property
    def num_workers(self) -> int:
        return max(1, len(self.workers) + (1 if self.has_chief_task else 0))

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1 or bool(self.workers)

    @property
    def is_chief(self) -> bool:
        # TF's rule: an explicit "chief" task is the chief; without one, worker 0 is.
        if self.has_chief_task:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(address.rpartition(":")[0] for address in self.workers)

    @classmethod
    def from_tf_config(cls, parsed: dict | None) -> ClusterSpec:
        if not parsed:
            return cls()
        cluster = parsed.get("cluster", {})
        task = parsed.get("task", {})
        workers = tuple(cluster.get("worker", ()))
        return cls(workers=workers, task_type=str(task.get("type", "worker")), task_index=int(task.get("index", 0)),
                   has_chief_task=bool(cluster.get("chief")))


def cluster_spec() -> ClusterSpec:
    return ClusterSpec.from_tf_config(tf_config())


def is_chief() -> bool:
    """Whether this process writes the shared outputs (the only worker, or the cluster's chief)."""
    return cluster_spec().is_chief


def num_workers() -> int:
    return cluster_spec().num_workers


def planned_spec(config: ClusterConfig) -> ClusterSpec:
    """The cluster make_strategy will form (TF_CONFIG's, else the Indexed Job's), without joining it.

    Reads only the environment and the config, so a stage can check its settings against the
    cluster before waiting for peers.
    """
    index = completion_index()
    if os.environ.get(_TF_CONFIG) or index is None or config.num_workers <= 1:
        return cluster_spec()
    if index >= config.num_workers:
        raise BadInputError(f"JOB_COMPLETION_INDEX={index} but cluster.num_workers={config.num_workers}; "
                            "the Job's completions must equal cluster.num_workers")
    return ClusterSpec.from_tf_config(build_tf_config(index, config.num_workers, config.train_job_name,
                                                      config.train_service_name, config.worker_port))


def configure_from_indexed_job(config: ClusterConfig, *, resolve: Callable[[str], Any] | None = None,
                               poll_s: float = 2.0) -> ClusterSpec:
    """Inside an Indexed Job with several workers and no TF_CONFIG: builds TF_CONFIG and waits for peers.

    Sets TF_CONFIG in this process's environment (TensorFlow's cluster resolver reads it there) and
    returns the resulting spec. Outside an Indexed Job, or with TF_CONFIG already set, changes nothing.
    """
    if os.environ.get(_TF_CONFIG):
        return cluster_spec()
    spec = planned_spec(config)
    if not spec.is_multi_worker:
        return spec
    built = {"cluster": {"worker": list(spec.workers)}, "task": {"type": "worker", "index": spec.task_index}}
    os.environ[_TF_CONFIG] = json.dumps(built)
    log.info("built TF_CONFIG from the Indexed Job", index=spec.task_index, workers=list(spec.workers))
    wait_for_peers(spec.hosts, config.peer_wait_timeout_s, resolve=resolve, poll_s=poll_s)
    return spec


def wait_for_peers(hosts: Sequence[str], timeout_s: float, *, resolve: Callable[[str], Any] | None = None,
                   poll_s: float = 2.0) -> None:
    """Waits (bounded, logged) until every host name resolves.

    A headless Service only publishes a pod's DNS record once the pod exists; creating the strategy
    earlier makes its first RPCs fail. Past the timeout this raises (exit 1, so the pod is retried).
    """
    resolve = resolve or (lambda host: socket.getaddrinfo(host, None))
    deadline = time.monotonic() + timeout_s
    next_log = 0.0
    pending = list(dict.fromkeys(hosts))
    while True:
        still = []
        for host in pending:
            try:
                resolve(host)
            except OSError:
                still.append(host)
        pending = still
        if not pending:
            log.info("all peers resolve", num_peers=len(hosts))
            return
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"peers did not resolve within cluster.peer_wait_timeout_s={timeout_s:.0f} s: "
                               f"{', '.join(pending)}; check the headless Service and the Job's pods")
        if now >= next_log:
            log.info("waiting for peers to resolve", pending=pending, seconds_left=round(deadline - now))
            next_log = now + 30.0
        time.sleep(min(poll_s, max(0.0, deadline - now)))


def num_gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def communication(gpus: int) -> str:
    """The collective implementation of MultiWorkerMirroredStrategy here: NCCL on GPUs, RING on CPU."""
    return "NCCL" if gpus else "RING"


def check_xla(xla: bool | None, spec: ClusterSpec, gpus: int) -> None:
    """Refuses model.xla=true where XLA cannot compile the train step; call it before make_strategy.

    tf_keras' jit_compile compiles the whole train step, the gradient all-reduce included, and XLA
    compiles only NCCL collectives: several workers on CPU (RING) fail at their first step with
    "Only compiling NCCL/auto collective is supported, got: ring". Refused here, from TF_CONFIG and
    the config alone, so neither worker waits for a peer, joins the cluster or reads an input first.
    NCCL (GPU workers, or several local GPUs) is what XLA compiles, but no test here has run it:
    allowed when forced, with a warning; the default (model.xla unset) keeps XLA to one replica.
    """
    if not xla:
        return
    if spec.is_multi_worker and communication(gpus) == "RING":
        raise ConfigError(f"config key model.xla = True is invalid with {spec.num_workers} workers on CPU: XLA "
                          "compiles the train step with its all-reduce and cannot compile the RING collectives "
                          "CPU workers use (it fails at the first step); set model.xla=false or leave it unset "
                          "(XLA on only for one replica on a GPU)")
    if spec.is_multi_worker or gpus > 1:
        log.warning("model.xla forced on with several replicas: XLA then compiles the NCCL all-reduce too, which "
                    "no test here has run; if the first step fails, set model.xla=false", key="model.xla",
                    num_workers=spec.num_workers, num_gpus=gpus)


def make_strategy(config: ClusterConfig) -> tuple[Any, ClusterSpec]:
    """The strategy for this process, and the cluster it belongs to.

    TF_CONFIG (given, or built from the Indexed Job) -> MultiWorkerMirroredStrategy, NCCL on GPUs
    and RING on CPU; several local GPUs -> MirroredStrategy; else the default strategy. Call it
    before any other TensorFlow op: collectives must be configured at program start.
    """
    import tensorflow as tf

    spec = configure_from_indexed_job(config)
    gpus = num_gpus()
    if not gpus:  # said once, here, instead of TensorFlow's CUDA errors at start-up (tf_startup)
        reason = tf_startup.no_gpu_reason()
        log.info("no GPU found: training on the CPU", **({"reason": reason} if reason else {}))
    if spec.is_multi_worker:
        name = communication(gpus)
        log.info("forming the cluster", num_workers=spec.num_workers, task_index=spec.task_index, communication=name)
        implementation = tf.distribute.experimental.CommunicationImplementation[name]
        options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        log.info("strategy", strategy="MultiWorkerMirroredStrategy", communication=implementation.name,
                 num_workers=spec.num_workers, task_index=spec.task_index, is_chief=spec.is_chief,
                 num_replicas=strategy.num_replicas_in_sync)
    elif gpus > 1:
        strategy = tf.distribute.MirroredStrategy()
        log.info("strategy", strategy="MirroredStrategy", num_replicas=strategy.num_replicas_in_sync)
    else:
        strategy = tf.distribute.get_strategy()
        log.info("strategy", strategy="default", num_gpus=gpus)
    return strategy, spec


# Where Kubernetes mounts a pod's API token, the cluster's CA and the pod's namespace (the evaluate pod
# gets them from a projected volume: manifests/40-evaluate-job.yaml).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class JobFailure:
    """A Job's Failed=True condition, as its controller wrote it."""

    namespace: str
    name: str
    uid: str
    reason: str  # e.g. MaxFailedIndexesExceeded, BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy
    message: str
    failed_at: float  # unix time of the condition


def job_failure(job: dict[str, Any]) -> JobFailure | None:
    """The Job's failure, or None while it has not failed, or while it is being deleted (to be replaced)."""
    metadata = job.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return None
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            changed = condition.get("lastTransitionTime") or ""
            failed_at = datetime.fromisoformat(changed.replace("Z", "+00:00")).timestamp() if changed else 0.0
            return JobFailure(metadata.get("namespace", ""), metadata.get("name", ""), metadata.get("uid", ""),
                              condition.get("reason", ""), condition.get("message", ""), failed_at)
    return None


class JobWatch:
    """Reads one Job of this pod's namespace through the Kubernetes API with the pod's own token, so that
    a stage waiting for another learns that its Job failed where that Job's pods could leave no word (a
    SIGKILL or OOM kill on an index's last attempt, the Job's activeDeadlineSeconds). Outside a cluster,
    or when the API says no (403, 404, unreachable), `failure()` is None and that is logged once: the
    waiting stage then goes by its files alone, as without this (an API fault is never bad input)."""

    def __init__(self, job_name: str, account_dir: str = SERVICE_ACCOUNT_DIR,
                 read_job: Callable[[str, str], dict[str, Any]] | None = None) -> None:
        self.job_name, self.account_dir = job_name, account_dir
        self._read_job, self._namespace, self._said = read_job, "", False

    def failure(self) -> JobFailure | None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config import ConfigException
        from urllib3.exceptions import HTTPError

        try:
            if not self._namespace:
                self._namespace = Path(self.account_dir, "namespace").read_text().strip()
            if self._read_job is None:
                self._read_job = _in_cluster_job_reader(self.account_dir)
            return job_failure(self._read_job(self._namespace, self.job_name))
        except (ApiException, ConfigException, HTTPError, OSError) as error:
            if not self._said:
                why = f"HTTP {error.status} {error.reason}" if isinstance(error, ApiException) else str(error)
                log.info("cannot read the Job through the Kubernetes API; going by the files alone", job=self.job_name,
                         reason=why)
                self._said = True
            return None


def _in_cluster_job_reader(account_dir: str) -> Callable[[str, str], dict[str, Any]]:
    """read(namespace, name) -> the Job as a dict, with the pod's token and CA (ConfigException: none here)."""
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = client.Configuration()
    InClusterConfigLoader(token_filename=str(Path(account_dir, "token")),
                          cert_filename=str(Path(account_dir, "ca.crt"))).load_and_set(configuration)
    configuration.retries = 0  # the caller polls again
    api = client.BatchV1Api(client.ApiClient(configuration))
    return lambda namespace, name: api.api_client.sanitize_for_serialization(
        api.read_namespaced_job(name, namespace, _request_timeout=10))
