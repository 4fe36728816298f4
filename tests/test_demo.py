"""The synthetic archive: Kaggle layout and names, real clutter, class mix, determinism, learnable classes."""

from __future__ import annotations

import collections
import io
import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import cohen_kappa_score

from pneumonia.data import demo
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


def test_images_are_mostly_grayscale_jpegs_of_varied_sizes_in_each_class_s_real_shape(demo_zip):
    modes, widths, aspects = collections.Counter(), set(), collections.defaultdict(list)
    for names in _images(demo_zip).values():
        for name in names:
            with Image.open(io.BytesIO(demo_zip.read(name))) as picture:
                assert picture.format == "JPEG"
                modes[picture.mode] += 1
                width, height = picture.size
            widths.add(width)
            low, high = demo.DEMO_HEIGHT_PX
            assert low - 1 <= height <= high + 1
            base = name.rsplit("/", 1)[1]
            aspects["normal" if "/NORMAL/" in name else base.split("_")[1]].append(width / height)
    assert modes["L"] > 0.9 * 300
    assert modes["RGB"] >= 1
    assert len(widths) > 50
    # The real archive's shapes: normal films squarer than pneumonia ones (median 1.21 against ~1.5);
    # 75-150 films a class pin the median to about +-0.1, many draws of film_size to +-0.02.
    assert np.median(aspects["normal"]) < 1.3 < 1.4 < min(np.median(aspects["bacteria"]), np.median(aspects["virus"]))
    rng = np.random.default_rng(0)
    for class_name, (median, low, high) in demo.ASPECT_RATIO.items():
        sizes = np.array([demo.film_size(class_name, rng) for _ in range(3000)])
        p10, p50, p90 = np.percentile(sizes[:, 1] / sizes[:, 0], [10, 50, 90])
        assert p50 == pytest.approx(median, abs=0.02), class_name
        assert p10 == pytest.approx(low, abs=0.03) and p90 == pytest.approx(high, abs=0.04), class_name


def test_real_sizes_span_the_real_archive_s_range():
    rng = np.random.default_rng(0)
    sizes = np.array([demo.film_size(name, rng, real_sizes=True) for name in demo.CLASS_MIX for _ in range(200)])
    heights, widths = sizes[:, 0], sizes[:, 1]
    assert demo.REAL_HEIGHT_PX[0] <= heights.min() and heights.max() <= demo.REAL_HEIGHT_PX[1]
    assert demo.REAL_WIDTH_PX[0] - 1 <= widths.min() and widths.max() <= demo.REAL_WIDTH_PX[1] + 1
    assert widths.max() > 2000 and widths.min() < 800
    pixels = demo.render_image("virus", rng, size=(1200, 1800))
    assert pixels.shape == (1200, 1800)


def test_classes_are_separable_at_low_resolution():
    """A linear model on 32x32 pixels (centre crop to a square, as the shard stage's default fit) already
    separates plain patients' films, so a small CNN at 64x64 will too; hard patients' fainter films are
    left to the end-to-end run, whose CNN must still reach kappa 0.8 on the default archive."""
    archive = zipfile.ZipFile(io.BytesIO(build_archive(200, seed=3, hard_patient_fraction=0.0)))
    features, labels = collections.defaultdict(list), collections.defaultdict(list)
    for split, names in _images(archive).items():
        for name in names:
            with Image.open(io.BytesIO(archive.read(name))) as picture:
                width, height = picture.size
                side = min(width, height)
                left, top = (width - side) // 2, (height - side) // 2
                small = picture.convert("L").crop((left, top, left + side, top + side)).resize((32, 32), Image.BILINEAR)
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


def _films_by_plan_index(archive: bytes, images: list) -> list[bytes]:
    """Each planned film's bytes, in plan order."""
    opened = zipfile.ZipFile(io.BytesIO(archive))
    return [opened.read(image.entry) for image in images]


def test_label_noise_files_an_exact_share_of_each_class_elsewhere_and_keeps_the_films():
    clean_images = demo.plan_images(300, seed=0)
    noisy_images = demo.plan_images(300, seed=0, label_noise=0.2)
    clean, _ = demo.build_archive_with_truth(300, seed=0)
    noisy, truth = demo.build_archive_with_truth(300, seed=0, label_noise=0.2)
    assert noisy == demo.build_archive(300, seed=0, label_noise=0.2)  # reproducible from the seed
    # The same films, in the same folders, with the same pixels: only where they are filed changed.
    assert _films_by_plan_index(clean, clean_images) == _films_by_plan_index(noisy, noisy_images)
    for before, after in zip(clean_images, noisy_images, strict=True):
        assert (before.true_class, before.true_patient, before.origin_split, before.difficulty) == (
            after.true_class, after.true_patient, after.origin_split, after.difficulty)
    films = truth["films"]
    assert len(films) == 300 and truth["num_moved"] == sum(film["moved"] for film in films)
    for class_name in demo.CLASS_MIX:
        own = [film for film in films if film["true_class"] == class_name]
        moved = [film for film in own if film["moved"]]
        assert len(moved) == round(0.2 * len(own))
        assert {film["filed_class"] for film in moved} == set(demo.CLASS_MIX) - {class_name}
    on_disk = set(_images(zipfile.ZipFile(io.BytesIO(noisy)))["train"]) | set(
        _images(zipfile.ZipFile(io.BytesIO(noisy)))["test"]) | set(_images(zipfile.ZipFile(io.BytesIO(noisy)))["val"])
    assert {film["path"] for film in films} == on_disk
    for film in films:
        base = film["path"].rsplit("/", 1)[1]
        # The film is filed as its filed class (folder and name) and the splitter sees the patient named.
        assert ("/NORMAL/" in film["path"]) == (film["filed_class"] == "normal")
        assert film["filed_class"] == "normal" or f"_{film['filed_class']}_" in base
        assert patient_id(base) == film["patient"]
        assert film["moved"] == (film["filed_class"] != film["true_class"])
    # A patient's films stay in one folder, moved or not: no patient crosses train and test.
    folders = collections.defaultdict(set)
    for film in films:
        folders[film["true_patient"]].add(film["path"].split("/")[1])
        folders[film["patient"]].add(film["path"].split("/")[1])
    assert all(len(found) == 1 for found in folders.values())
    # The known answer: the best accuracy a perfect model can reach, 1 - rate over the archive and,
    # within 3 binomial standard deviations, on the test folder's ~60 films.
    assert np.mean([not film["moved"] for film in films]) == pytest.approx(0.8, abs=0.01)
    test_films = [film for film in films if film["path"].startswith("chest_xray/test/")]
    best = np.mean([not film["moved"] for film in test_films])
    assert best == pytest.approx(0.8, abs=3 * np.sqrt(0.2 * 0.8 / len(test_films)))


def test_patients_share_a_difficulty_and_hard_films_show_a_fainter_pattern():
    truth = demo.build_archive_with_truth(300, seed=1)[1]
    by_patient = collections.defaultdict(set)
    for film in truth["films"]:
        by_patient[film["true_patient"]].add(film["difficulty"])
    assert all(len(found) == 1 for found in by_patient.values())
    difficulties = np.array([found.pop() for found in by_patient.values()])
    hard = difficulties < 1.0
    assert hard.mean() == pytest.approx(demo.HARD_PATIENT_FRACTION, abs=0.1)
    assert ((demo.HARD_STRENGTH[0] <= difficulties[hard]) & (difficulties[hard] <= demo.HARD_STRENGTH[1])).all()
    assert all(film["difficulty"] == 1.0 for film in demo.build_archive_with_truth(
        60, seed=1, hard_patient_fraction=0.0)[1]["films"])
    # The pattern (the film minus the same film drawn without it) scales with the strength.
    for class_name in ("bacteria", "virus"):
        drawn = {strength: demo.render_image(class_name, np.random.default_rng(5), strength=strength).astype(float)
                 for strength in (0.0, 0.5, 1.0)}
        full, half = drawn[1.0] - drawn[0.0], drawn[0.5] - drawn[0.0]
        assert np.abs(full).sum() > 0
        assert np.abs(half).sum() == pytest.approx(0.5 * np.abs(full).sum(), rel=0.1), class_name


def test_the_command_writes_the_truth_beside_the_archive_and_refuses_a_rate_above_half(tmp_path):
    out = tmp_path / "noisy.zip"
    assert demo.main(["--out", str(out), "--num-images", "40", "--seed", "3", "--label-noise", "0.3"]) == 0
    data, truth = demo.build_archive_with_truth(40, seed=3, label_noise=0.3)
    assert out.read_bytes() == data
    written = json.loads((tmp_path / "noisy.zip.truth.json").read_text())
    assert written == json.loads(json.dumps(truth)) and written["label_noise"] == 0.3
    assert demo.truth_path(str(out)) == str(tmp_path / "noisy.zip.truth.json")
    assert demo.main(["--out", str(tmp_path / "bad.zip"), "--num-images", "40", "--label-noise", "0.7"]) == 2
    assert not (tmp_path / "bad.zip").exists() and not (tmp_path / "bad.zip.truth.json").exists()
