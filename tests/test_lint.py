"""The Python code passes the project's ruff rules (pyproject.toml), so `make lint` stays clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "src", "jobs", "tests", "bench"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_imports_keras_3():
    # tf.keras is Keras 3 in TensorFlow 2.21, whose fit breaks under MultiWorkerMirroredStrategy.
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for folder in ("src", "jobs", "bench")
                 for path in (REPO / folder).rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("import keras", "from keras", "from tensorflow import keras"))
                 or "tf.keras" in line]
    assert offenders == []
