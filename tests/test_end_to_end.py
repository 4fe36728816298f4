"""The whole pipeline as the containers run it: preprocess -> shard -> train -> evaluate, via jobs/.

The synthetic archive (pneumonia.data.demo) and jobs/configs/demo.yaml; each stage is a subprocess
of its entrypoint, so exit codes, markers and contracts between stages are what is tested, and what
each stage prints: its own events, none of TensorFlow's start-up chatter (pneumonia.tf_startup).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import tensorflow as tf
from test_train import PYTHON, REPO, events, subprocess_env

from pneumonia.data.demo import make_demo_archive

DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
MIN_TEST_KAPPA = 0.8
# TensorFlow's start-up lines and tf_keras' export warning, which no stage's output may carry.
CHATTER = ("absl::InitializeLog", "oneDNN custom operations", "cuInit", "Could not find cuda drivers",
           "rebuild TensorFlow", "compiled metrics have yet to be built")


def stage(name: str, args: list[str], timeout_s: int) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # as a container runs the job: the product itself keeps TensorFlow quiet
    result = subprocess.run([PYTHON, str(REPO / "jobs" / f"{name}.py"), "--config", str(DEMO_CONFIG), *args],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-4000:]}"
    printed = (result.stdout + result.stderr).splitlines()
    assert [line for line in printed if any(text in line for text in CHATTER)] == [], name
    return result


@pytest.mark.slow
def test_demo_pipeline_reaches_the_quality_bar(tmp_path: Path):
    root = tmp_path / "demo"
    archive = root / "raw" / "demo-chest-xray.zip"
    make_demo_archive(str(archive), num_images=300, seed=0)
    args = ["--set", f"data.root={root}", "--set", f"data.archive={archive}", "--set", "train.run_id=e2e"]
    logged = {name: [event["event"] for event in events(stage(name, args, timeout_s).stderr)]
              for name, timeout_s in (("preprocess", 120), ("shard", 180), ("train", 420), ("evaluate", 180))}
    assert "marker written" in logged["shard"] and "report written" in logged["evaluate"], logged
    assert {"training plan", "epoch end", "model exported"} <= set(logged["train"]), logged["train"]
    # Said once, instead of TensorFlow's CUDA errors, where the trainer decides the device.
    no_gpu = logged["train"].count("no GPU found: training on the CPU")
    assert no_gpu == (0 if tf.config.list_physical_devices("GPU") else 1), logged["train"]

    run_dir = root / "runs" / "e2e"
    assert (run_dir / "_SUCCESS.json").is_file() and (run_dir / "report" / "_SUCCESS.json").is_file()
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    manifest = json.loads((root / "splits" / "split.json").read_text())
    assert metrics["num_images"] == sum(manifest["counts"]["test"].values())
    assert metrics["cohen_kappa"] >= MIN_TEST_KAPPA, metrics

    # The report's uncertainty, pneumonia-vs-normal view and calibration, and the runs listing.
    assert set(metrics["ci95"]) == {"accuracy", "cohen_kappa", "macro_f1", "auc_macro", "precision", "recall"}
    assert metrics["bootstrap"]["unit"] == "patient" and metrics["bootstrap"]["resamples"] >= 1000
    assert metrics["binary"]["reference"]["same_test_set"] is False  # the demo's test/ is not the published set
    assert set(metrics["calibration"]["ece"]) == {"before", "after"}
    assert (run_dir / "report" / "reliability.png").is_file()
    listing = subprocess.run([PYTHON, "-m", "pneumonia.runs", "--root", str(root)], env=subprocess_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and listing.stdout.splitlines()[1].split()[:4] == ["e2e", "finished",
                                                                                      "small_cnn", "6/6"]
    # The plain demo has no shortcut to find (test_saliency plants one and expects the warning).
    assert metrics["saliency"]["warnings"] == [], metrics["saliency"]
    assert (run_dir / "report" / "gradcam.png").read_bytes().startswith(b"\x89PNG")
