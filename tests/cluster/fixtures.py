"""pytest fixtures for tests that run pods on the local control plane (import them into a test module)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import bed
import pytest


@pytest.fixture(scope="module")
def pod_bed(kube_cluster, tmp_path_factory: pytest.TempPathFactory,  # noqa: ANN001
            request: pytest.FixtureRequest) -> Iterator[bed.PodNetworkBed]:
    """The kubelet stand-in and the GCS stand-in on the pods' network, for one test module. The image is
    built from this checkout every time (cached layers: seconds when `make image-test` just built it),
    so a test never runs an older tree's code. While it lives, os.environ reaches the bucket stand-in
    (tests copy data in through TensorFlow's gs:// client)."""
    bed.build_image()
    testbed = bed.PodNetworkBed(str(kube_cluster.kubeconfig), tmp_path_factory.mktemp("pod-bed"),
                                network=f"pneumonia-pods-{os.getpid()}", bucket="pneumonia-pods",
                                # the module's own namespaces: other stand-ins may share the control plane
                                namespace_prefix=request.module.POD_NAMESPACE_PREFIX)
    with testbed, pytest.MonkeyPatch.context() as patch:
        for key, value in testbed.emulator.env.items():
            patch.setenv(key, value)
        yield testbed
