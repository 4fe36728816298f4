"""The cluster module: TF_CONFIG parsing, who is chief, TF_CONFIG from an Indexed Job, the peer wait."""

from __future__ import annotations

import json
import time

import pytest
import tensorflow as tf

from pneumonia import cluster
from pneumonia.config import ClusterConfig
from pneumonia.errors import BadInputError, ConfigError


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    return monkeypatch


def test_build_tf_config_names_every_pod_under_the_headless_service():
    built = cluster.build_tf_config(1, 3, "train", "workers", 2222)
    assert built == {"cluster": {"worker": ["train-0.workers:2222", "train-1.workers:2222", "train-2.workers:2222"]},
                     "task": {"type": "worker", "index": 1}}


def test_alone_this_process_is_the_chief_of_one(clean_env: pytest.MonkeyPatch):
    assert cluster.is_chief() and cluster.num_workers() == 1 and cluster.worker_index() == 0
    assert not cluster.cluster_spec().is_multi_worker


def test_worker_zero_is_chief_unless_a_chief_task_exists(clean_env: pytest.MonkeyPatch):
    workers = ["a:1", "b:2"]
    clean_env.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}}))
    assert not cluster.is_chief() and cluster.num_workers() == 2 and cluster.worker_index() == 1
    clean_env.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}))
    assert cluster.is_chief()
    with_chief = {"cluster": {"chief": ["c:0"], "worker": workers}, "task": {"type": "worker", "index": 0}}
    clean_env.setenv("TF_CONFIG", json.dumps(with_chief))
    assert not cluster.is_chief() and cluster.num_workers() == 3
    spec = cluster.ClusterSpec.from_tf_config({**with_chief, "task": {"type": "chief", "index": 0}})
    assert spec.is_chief and spec.hosts == ("a", "b")


def test_malformed_tf_config_is_bad_input(clean_env: pytest.MonkeyPatch):
    clean_env.setenv("TF_CONFIG", "{not json")
    with pytest.raises(BadInputError, match="TF_CONFIG"):
        cluster.cluster_spec()


def test_indexed_job_builds_tf_config_and_waits_until_peers_resolve(clean_env: pytest.MonkeyPatch):
    clean_env.setenv("JOB_COMPLETION_INDEX", "1")
    config = ClusterConfig(num_workers=2, train_job_name="job", train_service_name="svc", worker_port=3000,
                           peer_wait_timeout_s=10)
    attempts: dict[str, int] = {}

    def resolve(host: str) -> None:
        # job-0 appears in DNS only on the third look, as a pod that starts late.
        attempts[host] = attempts.get(host, 0) + 1
        if host == "job-0.svc" and attempts[host] < 3:
            raise OSError("not yet")

    spec = cluster.configure_from_indexed_job(config, resolve=resolve, poll_s=0.01)
    assert spec.workers == ("job-0.svc:3000", "job-1.svc:3000") and spec.task_index == 1 and not spec.is_chief
    assert attempts["job-0.svc"] == 3
    assert json.loads(cluster.os.environ["TF_CONFIG"])["task"] == {"type": "worker", "index": 1}
    assert cluster.worker_index() == 1


def test_peer_wait_is_bounded_and_names_the_missing_peer():
    def never(host: str) -> None:
        raise OSError("NXDOMAIN")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="job-1.svc"):
        cluster.wait_for_peers(["job-0.svc", "job-1.svc"], timeout_s=0.3, resolve=never, poll_s=0.05)
    assert time.monotonic() - started < 5


def test_real_dns_lookup_of_loopback_passes_at_once():
    cluster.wait_for_peers(["localhost", "127.0.0.1"], timeout_s=0)


def test_single_worker_or_outside_a_job_leaves_the_environment_alone(clean_env: pytest.MonkeyPatch):
    clean_env.setenv("JOB_COMPLETION_INDEX", "0")
    spec = cluster.configure_from_indexed_job(ClusterConfig(num_workers=1))
    assert spec.num_workers == 1 and "TF_CONFIG" not in cluster.os.environ
    clean_env.setenv("JOB_COMPLETION_INDEX", "5")
    with pytest.raises(BadInputError, match="cluster.num_workers"):
        cluster.configure_from_indexed_job(ClusterConfig(num_workers=2))


def test_without_tf_config_or_gpus_the_default_strategy_is_used(clean_env: pytest.MonkeyPatch):
    strategy, spec = cluster.make_strategy(ClusterConfig())
    assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
    assert spec.is_chief and spec.num_workers == 1


def test_planned_spec_reads_the_cluster_without_joining_it(clean_env: pytest.MonkeyPatch):
    assert not cluster.planned_spec(ClusterConfig(num_workers=2)).is_multi_worker  # outside a Job: alone
    clean_env.setenv("JOB_COMPLETION_INDEX", "1")
    spec = cluster.planned_spec(ClusterConfig(num_workers=2, train_job_name="job", train_service_name="svc"))
    assert spec.workers == ("job-0.svc:2222", "job-1.svc:2222") and spec.task_index == 1
    assert "TF_CONFIG" not in cluster.os.environ  # nothing set, no peer waited for


@pytest.mark.parametrize(("xla", "num_workers", "gpus", "refused"), [
    (True, 2, 0, True),  # RING: XLA cannot compile it
    (True, 1, 0, False),  # one replica: nothing to all-reduce
    (True, 2, 1, False),  # NCCL: compiled by XLA (not run here), allowed with a warning
    (None, 2, 0, False),  # unset: the default keeps XLA off with several replicas
    (False, 2, 0, False),
])
def test_xla_forced_on_over_ring_collectives_is_refused_naming_the_key(xla, num_workers, gpus, refused):
    workers = tuple(f"127.0.0.1:{2000 + i}" for i in range(num_workers)) if num_workers > 1 else ()
    spec = cluster.ClusterSpec(workers=workers)
    if refused:
        with pytest.raises(ConfigError, match=r"model\.xla = True .* RING"):
            cluster.check_xla(xla, spec, gpus)
    else:
        cluster.check_xla(xla, spec, gpus)
