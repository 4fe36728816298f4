"""pneumonia.tf_startup: TensorFlow's start-up lines on fd 2 are dropped, every other line passes on in
order, and why no GPU was found is kept for the trainer's one line about it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pneumonia import tf_startup

# As TensorFlow 2.21 writes them at import and device discovery on a machine without a GPU.
STARTUP = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796552803.580323   11203 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders.\n"
    "I0000 00:00:1796552803.580595   11203 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
    "will not be used.\n"
    "I0000 00:00:1796552803.770435   11203 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.\n"
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    "appropriate compiler flags.\n"
    "E0000 00:00:1796552816.419489   11203 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
REAL_ERROR = "E0000 00:00:1796552816.5   11203 gcs_file_system.cc:1] could not read gs://bucket/x: PERMISSION_DENIED\n"


@pytest.fixture(autouse=True)
def _no_reason_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tf_startup._state, "no_gpu_reason", None)  # noqa: SLF001 - process-wide, put back after


def test_start_up_lines_are_dropped_and_other_lines_pass_on_in_order(capfd: pytest.CaptureFixture[str]) -> None:
    with tf_startup.startup_lines_filtered():
        os.write(2, (STARTUP[:300] + STARTUP[300:]).encode())  # C++ writes straight to fd 2
        os.write(2, REAL_ERROR.encode())
        os.write(2, b"Traceback (most recent call last):\n")
    assert capfd.readouterr().err == REAL_ERROR + "Traceback (most recent call last):\n"
    assert tf_startup.no_gpu_reason() == tf_startup.NO_DRIVER_REASON


def test_a_failing_block_still_shows_what_it_wrote(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ImportError), tf_startup.startup_lines_filtered():
        os.write(2, (STARTUP + "E0000 00:00:1.0  1 loader.cc:9] libtensorflow_framework.so.2: cannot open\n").encode())
        raise ImportError("libtensorflow_framework.so.2")
    assert capfd.readouterr().err == "E0000 00:00:1.0  1 loader.cc:9] libtensorflow_framework.so.2: cannot open\n"


def test_with_a_driver_the_cuda_error_is_the_reason_no_gpu_was_found() -> None:
    failed = "E0000 00:00:1.0   7 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE: no device\n"
    assert tf_startup.filter_startup_lines(failed) == ""
    assert tf_startup.no_gpu_reason() == "failed call to cuInit: CUDA_ERROR_NO_DEVICE: no device"


def test_the_launchers_upload_path_imports_tensorflow_quietly(tmp_path) -> None:  # noqa: ANN001
    """The launcher uploads the archive through pneumonia.storage, which imports TensorFlow: a fresh
    process doing just that prints none of the start-up lines (it printed them twice before)."""
    source = tmp_path / "archive.zip"
    source.write_bytes(b"PK\x05\x06" + bytes(18))
    code = ("import sys; from pneumonia import storage; "
            f"storage.upload_file({str(source)!r}, {str(tmp_path / 'bucket' / 'raw.zip')!r})")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          check=True)
    assert (tmp_path / "bucket" / "raw.zip").read_bytes() == source.read_bytes()
    for line in STARTUP.splitlines():
        assert line.split("]")[-1][:40] not in done.stderr, done.stderr
