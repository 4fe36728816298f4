"""Shared fixtures: the GCS emulator (session), fresh gs:// roots, and roots on both backends.

When the environment is set matters. TensorFlow builds its GCS file system, and reads its GCS_*
settings (retries, caches), when `tensorflow` is imported, which happens while test modules are
collected (pneumonia.storage imports it). So the settings TF reads only once are set here, at
conftest import, before any test module is imported; they change nothing for tests that never
touch gs://. What depends on the emulator's ports (HTTPS_PROXY, STORAGE_EMULATOR_HOST,
CURL_CA_BUNDLE) is read per request, so the `gcs_emulator` fixture sets it when it starts, and
restores os.environ when the session ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cluster.testbed import Cluster

# Read by TensorFlow once, at import (see the module docstring). setdefault: a developer may
# still raise them by hand when debugging against a real bucket.
for _key, _value in {
    "GCS_RETRY_CONFIG_MAX_RETRIES": "2",  # else a failing gs:// request retries for minutes
    "NO_GCE_CHECK": "true",  # never probe the GCE metadata server for credentials
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
}.items():
    os.environ.setdefault(_key, _value)

from gcs_emulator import GcsEmulator  # noqa: E402 - after the environment above, by design


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """fake-gcs-server + the TLS-intercepting proxy, on loopback, for the whole session.

    `.env` goes to subprocesses (`env={**os.environ, **gcs_emulator.env}`); `.bucket` exists;
    `.endpoint` is the emulator's http URL. os.environ holds `.env` until the session ends.
    `with gcs_emulator.faults(seed, rate) as counts:` fails a seeded fraction of both clients'
    requests (503, 429, connection reset) and counts them; off by default (tests/gcs_faults.py).
    """
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs-emulator")).start()
    saved = {key: os.environ.get(key) for key in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield emulator
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        emulator.stop()


@pytest.fixture
def gcs_root(gcs_emulator: GcsEmulator) -> str:
    """A fresh gs://bucket/prefix per test: tests share the bucket, never their objects."""
    return f"gs://{gcs_emulator.bucket}/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.gcs)])
def any_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage root on each backend in turn: a local tmp folder, then a gs:// prefix."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_root")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches the emulator is marked `gcs`, and every test on the local control plane
    `cluster`, whether or not its author said so, so `-m "not gcs"` / `-m "not cluster"` reliably
    run without them."""
    for item in items:
        if "gcs_emulator" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gcs)
        if "kube_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[Cluster]:
    """A real Kubernetes control plane on 127.0.0.1 (tests/cluster/testbed.py): etcd, kube-apiserver,
    kube-controller-manager and kube-scheduler v1.36.4 with simulated GKE nodes and no kubelet.

    Started for the session under a name of its own (building the binaries if missing) and deleted at
    the end; PNEUMONIA_TEST_CLUSTER=NAME reuses a cluster that `make cluster-up CLUSTER_NAME=NAME`
    started, and leaves it running. `.kubeconfig` is an admin kubeconfig; `.kubectl(...)` runs v1.36.4.
    Tests make their own namespaces (tests/cluster/kube.py), so they can share one cluster.
    """
    from cluster.testbed import Cluster

    reuse = os.environ.get("PNEUMONIA_TEST_CLUSTER")
    if reuse:
        # kwokctl's own admin kubeconfig of that cluster: found whatever CLUSTER_KUBECONFIG it was started with.
        cluster = Cluster(reuse, Cluster(reuse).workdir / "kubeconfig.yaml")
        if not cluster.ready():
            pytest.fail(f"PNEUMONIA_TEST_CLUSTER={reuse}: no such cluster answers; start it with "
                        f"make cluster-up CLUSTER_NAME={reuse}")
        yield cluster
        return
    cluster = Cluster(f"pneumonia-test-{os.getpid()}", Path.home() / ".kube" / f"pneumonia-test-{os.getpid()}.yaml")
    try:
        yield cluster.up()
    finally:
        cluster.down()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A stage run in-process configures structlog onto pytest's captured stderr; undo it after the
    test, or a later test logs into a closed file."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


@pytest.fixture(autouse=True)
def _restore_cluster_env() -> Iterator[None]:
    """Code under test may set TF_CONFIG in os.environ (as it does in a pod); it must not leak into
    the next test, where an in-process strategy would then try to join a cluster."""
    saved = {key: os.environ.get(key) for key in ("TF_CONFIG", "JOB_COMPLETION_INDEX")}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
