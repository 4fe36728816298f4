"""The synthetic archive: Kaggle layout and names, real clutter, class mix, determinism, learnable classes."""

from __future__ import annotations

import collections
import io
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import cohen_kappa_score

from pneumonia.data.demo import build_archive
from pneumonia.data.split import patient_id

NAME = re.compile(r"^(?:(?:NORMAL2-)?IM-\d{4}-\d{4}(?:-\d{4})?|person\d+_(?:bacteria|virus)_\d+)\.jpeg$")


@pytest.fixture(scope="module")
def demo_zip() -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(build_archive(300, seed=0)))


def _images(archive: zipfile.ZipFile) -> dict[str, list[str]]:
    """Top-level image entries by origin split."""
    found = collections.defaultdict(list)
    for name in archive.namelist():
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == "chest_xray" and parts[3]:
            found[parts[1]].append(name)
    return found


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    first, again, other = build_archive(40, seed=7), build_archive(40, seed=7), build_archive(40, seed=8)
    assert first == again
    assert first != other


def test_layout_names_and_class_mix_follow_the_real_archive(demo_zip):
    images = _images(demo_zip)
    assert set(images) == {"train", "test", "val"}
    all_images = [name for names in images.values() for name in names]
    assert len(all_images) == 300
    classes = collections.Counter()
    for name in all_images:
        _, _, folder, base = name.split("/")
        assert NAME.match(base), base
        assert folder == ("NORMAL" if base.startswith(("IM-", "NORMAL2-")) else "PNEUMONIA")
        classes["normal" if folder == "NORMAL" else ("bacteria" if "bacteria" in base else "virus")] += 1
    assert classes["normal"] / 300 == pytest.approx(0.27, abs=0.02)
    assert classes["bacteria"] / 300 == pytest.approx(0.48, abs=0.02)
    assert classes["virus"] / 300 == pytest.approx(0.25, abs=0.02)
    assert 0 < len(images["val"]) <= 0.1 * 300  # tiny, as in the real archive
    assert any(re.search(r"NORMAL2-IM-\d+-\d+-\d+\.jpeg$", name) for name in all_images)


def test_patients_have_several_images_and_never_cross_folders(demo_zip):
    images = _images(demo_zip)
    patients = {split: {patient_id(name.rsplit("/", 1)[1]) for name in names} for split, names in images.items()}
    assert None not in set().union(*patients.values())
    assert not patients["train"] & patients["test"]
    assert not patients["train"] & patients["val"]
    assert not patients["test"] & patients["val"]
    per_patient = collections.Counter(patient_id(n.rsplit("/", 1)[1]) for names in images.values() for n in names)
    assert max(per_patient.values()) >= 3
    assert sum(1 for count in per_patient.values() if count >= 2) >= len(per_patient) // 3
    # The real archive has personN ids with both bacteria and virus images.
    causes = collections.defaultdict(set)
    for names in images.values():
        for name in names:
            base = name.rsplit("/", 1)[1]
            if base.startswith("person"):
                causes[patient_id(base)].add(base.split("_")[1])
    assert any(len(kinds) == 2 for kinds in causes.values())


def test_clutter_and_nested_duplicate_are_present(demo_zip):
    names = demo_zip.namelist()
    assert any(name.startswith("__MACOSX/") and name.rsplit("/", 1)[1].startswith("._") for name in names)
    assert any(name.endswith(".DS_Store") for name in names)
    nested = [name for name in names if name.startswith("chest_xray/chest_xray/") and not name.endswith("/")]
    assert nested
    for name in nested:
        assert demo_zip.read(name) == demo_zip.read(name[len("chest_xray/"):])


def test_images_are_mostly_grayscale_jpegs_of_varied_sizes(demo_zip):
    modes, widths = collections.Counter(), set()
    for names in _images(demo_zip).values():
        for name in names:
            with Image.open(io.BytesIO(demo_zip.read(name))) as picture:
                assert picture.format == "JPEG"
                modes[picture.mode] += 1
                widths.add(picture.size[0])
                assert 160 <= min(picture.size) and max(picture.size) <= 400
    assert modes["L"] > 0.9 * 300
    assert modes["RGB"] >= 1
    assert len(widths) > 50


def test_classes_are_separable_at_low_resolution():
    """A linear model on 32x32 pixels already separates them, so a small CNN at 64x64 will too."""
    archive = zipfile.ZipFile(io.BytesIO(build_archive(200, seed=3)))
    features, labels = collections.defaultdict(list), collections.defaultdict(list)
    for split, names in _images(archive).items():
        for name in names:
            with Image.open(io.BytesIO(archive.read(name))) as picture:
                small = picture.convert("L").resize((32, 32), Image.BILINEAR)
            features[split].append(np.asarray(small, np.float32).ravel() / 255.0)
            base = name.rsplit("/", 1)[1]
            labels[split].append(0 if "/NORMAL/" in name else (1 if "bacteria" in base else 2))
    model = LogisticRegression(max_iter=300).fit(features["train"], labels["train"])
    assert len(labels["test"]) >= 30
    assert cohen_kappa_score(labels["test"], model.predict(features["test"])) >= 0.8


def test_cli_writes_the_archive_and_rejects_too_few_images(tmp_path):
    out = tmp_path / "nested" / "demo.zip"
    done = subprocess.run([sys.executable, "-m", "pneumonia.data.demo", "--out", str(out), "--num-images", "30",
                           "--seed", "5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == build_archive(30, seed=5)
    refused = subprocess.run([sys.executable, "-m", "pneumonia.data.demo", "--out", str(tmp_path / "x.zip"),
                              "--num-images", "3"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "num_images=3" in refused.stderr
    assert not (tmp_path / "x.zip").exists()
