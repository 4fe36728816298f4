"""The Dockerfile passes hadolint with no findings and has what the manifests rely on (no Docker engine here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pneumonia.k8s import manifests as mf

HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILE = mf.REPO_ROOT / "Dockerfile"
DOCKERIGNORE = mf.REPO_ROOT / ".dockerignore"


def hadolint(text: str) -> list[dict]:
    result = subprocess.run([str(HADOLINT), "--no-fail", "--format", "json", "-"], input=text,
                            capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout or "[]")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_hadolint_finds_nothing() -> None:
    assert hadolint(DOCKERFILE.read_text()) == []


def test_hadolint_does_report_problems() -> None:
    codes = {finding["code"] for finding in hadolint("FROM python:latest\nRUN apt-get install curl\n")}
    assert {"DL3007", "DL3008"} <= codes


def test_base_image_is_a_pinned_tensorflow_build_arg() -> None:
    steps = instructions()
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    base = steps[0][1].split("=", 1)[1]
    assert re.fullmatch(r"tensorflow/tensorflow:2\.21\.\d+-gpu", base)
    assert ("FROM", "${BASE_IMAGE}") in steps


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    steps = instructions()
    order = [i for i, (keyword, _) in enumerate(steps) if keyword in ("COPY", "RUN")]
    copies = {args.split()[0]: i for i, (keyword, args) in enumerate(steps) if keyword == "COPY"}
    install_deps = next(i for i in order if steps[i][0] == "RUN" and "requirements" in steps[i][1])
    install_pkg = next(i for i in order if steps[i][0] == "RUN" and "--no-deps ." in steps[i][1])
    assert copies["pyproject.toml"] < install_deps < copies["src"] < install_pkg
    assert copies["jobs"] < install_pkg


def test_runs_as_the_numeric_user_the_pods_expect_with_an_exec_form_entrypoint() -> None:
    steps = instructions()
    user = [args for keyword, args in steps if keyword == "USER"]
    jobs = mf.stage_jobs(mf.load_manifests())
    uids = {mf.pod_spec(job)["securityContext"]["runAsUser"] for job in jobs.values()}
    assert user == ["10001:10001"] and uids == {10001}
    entrypoint = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["python"]'] and json.loads(entrypoint[0]) == ["python"]
    # The stage scripts the Jobs run are where the image puts jobs/.
    workdir = [args for keyword, args in steps if keyword == "WORKDIR"][-1]
    for stage, job in jobs.items():
        assert mf.pod_spec(job)["containers"][0]["args"][0] == f"{workdir}/jobs/{stage}.py"


def test_writable_paths_point_at_the_tmp_empty_dir() -> None:
    env = " ".join(args for keyword, args in instructions() if keyword == "ENV")
    for variable in ("HOME", "TMPDIR", "MPLCONFIGDIR"):
        assert re.search(rf"\b{variable}=/tmp(\s|/|$)", env), variable


def test_weights_path_matches_the_documented_model_setting() -> None:
    text = DOCKERFILE.read_text()
    assert "cache_dir='/opt/pneumonia', cache_subdir='weights'" in text
    assert "model.weights=/opt/pneumonia/weights/efficientnetv2-b0_notop.h5" in text


def test_oci_labels_and_a_dockerignore_that_keeps_the_context_small() -> None:
    labels = " ".join(args for keyword, args in instructions() if keyword == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    rules = [line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!src/", "!jobs/"} <= set(rules)
    # Nothing the image needs is excluded: every COPY source is re-included.
    for keyword, args in instructions():
        if keyword == "COPY":
            source = args.split()[0]
            assert f"!{source}" in rules or f"!{source}/" in rules, source


def test_dockerfile_image_placeholder_matches_the_manifests() -> None:
    images = {c["image"] for job in mf.stage_jobs(mf.load_manifests()).values() for c in mf.containers(job)}
    config = yaml.safe_load(mf.CLUSTER_CONFIG.read_text())
    assert images == {config["cluster"]["image"]}
    assert images.pop().endswith(":0.1.0")


def test_per_commit_labels_come_after_the_last_run_so_the_dependency_layer_is_reused() -> None:
    # `make image` passes a new REVISION per commit; an ARG or LABEL that changes invalidates every
    # later layer, so they must follow the last RUN (make image-test proves the reuse with podman).
    steps = instructions()
    last_run = max(i for i, (keyword, _) in enumerate(steps) if keyword == "RUN")
    per_commit = [i for i, (keyword, args) in enumerate(steps)
                  if (keyword == "ARG" and args.split("=")[0] in ("VERSION", "REVISION"))
                  or (keyword == "LABEL" and "${REVISION}" in args)]
    assert per_commit and min(per_commit) > last_run


def test_base_image_is_declared_again_after_from_for_the_base_name_label() -> None:
    # An ARG before FROM is out of scope after it: without this the label is always empty.
    steps = instructions()
    from_index = steps.index(("FROM", "${BASE_IMAGE}"))
    label = next(i for i, (keyword, args) in enumerate(steps) if keyword == "LABEL" and "base.name" in args)
    assert any(keyword == "ARG" and args.split("=")[0] == "BASE_IMAGE" for keyword, args in steps[from_index:label])
    assert 'org.opencontainers.image.base.name="${BASE_IMAGE}"' in dict(steps[label:label + 1])["LABEL"]


def test_bake_weights_is_in_scope_only_after_the_dependency_layer() -> None:
    steps = instructions()
    install_deps = next(i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "requirements" in args)
    bake = [i for i, (keyword, args) in enumerate(steps) if keyword == "ARG" and args.startswith("BAKE_WEIGHTS")]
    assert bake and min(bake) > install_deps
