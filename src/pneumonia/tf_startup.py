"""TensorFlow's import and device discovery, without the start-up chatter that reads like a failure.

Importing TensorFlow 2.21 and finding its devices writes, per process and straight to file
descriptor 2 from C++ (absl logging before `absl::InitializeLog()`, which TF_CPP_MIN_LOG_LEVEL does
not hold back): "All log messages before absl::InitializeLog() ...", oneDNN and CPU-instruction
notices, "Could not find cuda drivers", and on a machine without a GPU
"E... failed call to cuInit: ... UNKNOWN ERROR (303)". None of it is news to a person reading a
stage's log, and the last looks like an error. `import_tensorflow` catches fd 2 for the import and
the device discovery only, drops those known lines, passes every other line on unchanged (a real
error still shows, in order), and keeps why no GPU was found for the one line the trainer logs
(`cluster.make_strategy`: "no GPU found: training on the CPU").

Called by the stage entrypoints' shared start-up (`pneumonia.cli.exit_on_sigterm_while_loading`,
which jobs/*.py call before they import their stage), after the SIGTERM handler is in place; a no-op
once TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Start-up lines dropped as they are: notices, not problems.
_NOISE = tuple(re.compile(pattern) for pattern in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    r"^[IW]\d{4} \S+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\.",
    r"^[IW]\d{4} \S+ +\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$",
))
# Lines that say why there is no GPU: dropped here, told once as a reason by the trainer.
_NO_DRIVER = re.compile(r"^[IW]\d{4} \S+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine")
_CUINIT_FAILED = re.compile(r"^E\d{4} \S+ +\d+ cuda_platform\.cc:\d+\] (failed call to cuInit: .*)$")

NO_DRIVER_REASON = "no CUDA driver on this machine"
_state: dict[str, str | None] = {"no_gpu_reason": None}


def import_tensorflow() -> None:
    """Imports TensorFlow and lists its GPUs with the known start-up lines filtered out of fd 2."""
    if "tensorflow" in sys.modules:
        return
    # TensorFlow's own INFO and WARNING lines after start-up (e.g. each TFRecordDataset's buffer
    # size) stay out too; its errors do not. An operator's setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with startup_lines_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe: its lines come now, not at the first op


@contextlib.contextmanager
def startup_lines_filtered() -> Iterator[None]:
    """Catches fd 2 while the block runs (C++ and Python writes alike), then writes it back to fd 2
    without the known start-up lines; also when the block raises, so its error shows."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = filter_startup_lines(caught.read().decode("utf-8", errors="replace"))
            if kept:
                os.write(2, kept.encode("utf-8"))


def filter_startup_lines(text: str) -> str:
    """`text` without the known start-up lines; records why no GPU was found when it says so."""
    kept = []
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\n")
        if any(pattern.search(bare) for pattern in _NOISE):
            continue
        if _NO_DRIVER.search(bare):
            _state["no_gpu_reason"] = NO_DRIVER_REASON
            continue
        failed = _CUINIT_FAILED.search(bare)
        if failed:
            # Without a driver this only repeats that; with one, the CUDA error is the reason.
            if _state["no_gpu_reason"] != NO_DRIVER_REASON:
                _state["no_gpu_reason"] = failed.group(1)
            continue
        kept.append(line)
    return "".join(kept)


def no_gpu_reason() -> str | None:
    """Why TensorFlow found no GPU, as its start-up said (None when it said nothing or was not caught)."""
    return _state["no_gpu_reason"]
