"""Patient ids, the grouped stratified assignment, small subsets, counts and class weights."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from pneumonia.config import CLASS_NAMES, SplitConfig
from pneumonia.data import demo
from pneumonia.data import split as split_lib
from pneumonia.errors import BadInputError


@pytest.mark.parametrize(("name", "patient"), [
    ("person12_bacteria_47.jpeg", "person12"),
    ("person1_virus_6.jpeg", "person1"),
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0927-0001.jpeg", "NORMAL2-IM-0927"),
    ("NORMAL2-IM-1427-0001-0002.jpeg", "NORMAL2-IM-1427"),
    ("scan.jpeg", None),
    ("person_virus.jpeg", None),
])
def test_patient_id_from_real_names(name, patient):
    assert split_lib.patient_id(name) == patient


def _random_groups(num_groups: int, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    groups = {}
    for i in range(num_groups):
        counts = [0, 0, 0]
        counts[int(rng.choice(3, p=[0.27, 0.48, 0.25]))] = int(rng.integers(1, 5))
        if i % 25 == 0:
            counts[2] += 1  # a patient with images of two classes
        groups[f"p{i}"] = counts
    return groups


@pytest.mark.parametrize("fractions", [{"train": 0.9, "val": 0.1}, {"train": 0.75, "val": 0.1, "test": 0.15},
                                       {"keep": 0.2, "unused": 0.8}])
def test_assign_groups_hits_fractions_per_class(fractions):
    groups = _random_groups(600, seed=1)
    assignment = split_lib.assign_groups(groups, fractions, seed=42)
    assert set(assignment) == set(groups)
    totals = np.array(list(groups.values())).sum(axis=0)
    for part, fraction in fractions.items():
        share = np.array([groups[g] for g in groups if assignment[g] == part]).sum(axis=0) / totals
        assert share == pytest.approx([fraction] * 3, abs=0.02)


def test_assign_groups_is_deterministic_and_seeded():
    groups = _random_groups(200, seed=2)
    fractions = {"train": 0.8, "val": 0.2}
    first = split_lib.assign_groups(groups, fractions, seed=1)
    assert first == split_lib.assign_groups(dict(reversed(list(groups.items()))), fractions, seed=1)
    assert first != split_lib.assign_groups(groups, fractions, seed=2)


def _rows(num_patients: int = 120, seed: int = 0, test_share: float = 0.2) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(num_patients):
        origin = "test" if p < num_patients * test_share else ("val" if p % 17 == 0 else "train")
        classes = [CLASS_NAMES[int(rng.choice(3, p=[0.27, 0.48, 0.25]))]] * int(rng.integers(1, 5))
        if p % 13 == 0:
            classes += ["bacteria", "virus"]  # personN with both causes
        for k, class_name in enumerate(classes):
            rows.append({"path": f"interim/{class_name}/{origin}__p{p}_{k}.jpeg", "class": class_name,
                         "label": CLASS_NAMES.index(class_name), "patient": f"p{p}", "split": "",
                         "origin_split": origin, "sha256": "x"})
    return rows


def _patients_by_split(rows):
    table = collections.defaultdict(set)
    for row in rows:
        table[row["split"]].add(row["patient"])
    return table


def test_official_mode_keeps_test_folder_and_never_splits_a_patient():
    rows = _rows()
    stats = split_lib.split_rows(rows, SplitConfig(mode="official", val_fraction=0.2))
    assert stats["num_overlap_unused"] == 0
    assert all((row["split"] == "test") == (row["origin_split"] == "test") for row in rows)
    by_split = _patients_by_split(rows)
    assert not by_split["train"] & by_split["val"]
    assert by_split["val"]
    num_pool = sum(1 for row in rows if row["origin_split"] != "test")
    assert sum(1 for row in rows if row["split"] == "val") / num_pool == pytest.approx(0.2, abs=0.05)


def test_official_mode_leaves_train_images_of_test_patients_unused():
    rows = _rows()
    leak = {"path": "interim/normal/train__p0_99.jpeg", "class": "normal", "label": 0, "patient": "p0",
            "split": "", "origin_split": "train", "sha256": "x"}
    rows.append(leak)
    stats = split_lib.split_rows(rows, SplitConfig(mode="official"))
    assert stats["num_overlap_unused"] == 1
    assert leak["split"] == "unused"


def test_pooled_mode_cuts_three_parts_grouped_by_patient():
    rows = _rows(num_patients=300)
    split_lib.split_rows(rows, SplitConfig(mode="pooled", val_fraction=0.1, test_fraction=0.2))
    by_split = _patients_by_split(rows)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not by_split[a] & by_split[b]
    counts = split_lib.count_table(rows)
    for class_name in CLASS_NAMES:
        total = sum(counts[s][class_name] for s in split_lib.SPLITS)
        assert counts["test"][class_name] / total == pytest.approx(0.2, abs=0.05)
        assert counts["val"][class_name] / total == pytest.approx(0.1, abs=0.05)
    again = _rows(num_patients=300)
    split_lib.split_rows(again, SplitConfig(mode="pooled", val_fraction=0.1, test_fraction=0.2))
    assert [row["split"] for row in again] == [row["split"] for row in rows]


def test_small_subsets_keep_a_stratified_share_and_mark_the_rest_unused():
    full, small = _rows(num_patients=400), _rows(num_patients=400)
    split_lib.split_rows(full, SplitConfig(val_fraction=0.2))
    split_lib.split_rows(small, SplitConfig(val_fraction=0.2, small_train_fraction=0.2, small_val_fraction=0.5))
    full_counts, small_counts = split_lib.count_table(full), split_lib.count_table(small)
    for class_name in CLASS_NAMES:
        assert small_counts["train"][class_name] / full_counts["train"][class_name] == pytest.approx(0.2, abs=0.06)
        assert small_counts["val"][class_name] / full_counts["val"][class_name] == pytest.approx(0.5, abs=0.15)
    assert small_counts["test"] == full_counts["test"]
    # The subset is taken from the same split, patients whole.
    for before, after in zip(full, small, strict=True):
        assert after["split"] in (before["split"], "unused")
    unused = {row["patient"] for row in small if row["split"] == "unused"}
    assert not unused & {row["patient"] for row in small if row["split"] in ("train", "val")}


def test_class_weights_are_balanced_on_train_rows_and_need_every_class():
    rows = [{"split": "train", "label": label} for label in [0] * 10 + [1] * 30 + [2] * 20]
    rows += [{"split": "test", "label": 0}] * 50
    weights = split_lib.class_weights(rows)
    assert weights == pytest.approx({"normal": 60 / 30, "bacteria": 60 / 90, "virus": 60 / 60})
    with pytest.raises(BadInputError, match="virus"):
        split_lib.class_weights([{"split": "train", "label": 0}, {"split": "train", "label": 1}])


def test_manifest_and_table_carry_counts_and_imbalance():
    rows = _rows()
    split_lib.split_rows(rows, SplitConfig())
    manifest = split_lib.build_manifest(rows, SplitConfig())
    assert [row["path"] for row in manifest["rows"]] == sorted(row["path"] for row in rows)
    train = manifest["counts"]["train"]
    assert manifest["imbalance_ratio"] == pytest.approx(max(train.values()) / min(train.values()), rel=1e-3)
    table = split_lib.format_table(manifest["counts"])
    lines = table.splitlines()
    assert lines[0].split() == ["split", *CLASS_NAMES, "total"]
    train_line = next(line for line in lines if line.startswith("train"))
    assert train_line.split()[1:] == [str(train[c]) for c in CLASS_NAMES] + [str(sum(train.values()))]


def _plan_rows(images: list[demo.DemoImage]) -> list[dict]:
    """The rows preprocess would give split_rows for a planned demo archive, with each film's `moved`."""
    return [{"path": image.entry, "class": image.class_name, "label": CLASS_NAMES.index(image.class_name),
             "patient": image.patient, "origin_split": image.origin_split, "split": "", "moved": image.moved}
            for image in images]


def test_val_carries_the_pools_share_of_misfiled_films():
    """On label-noise archives the misfiled films sit in small and mixed-class patient ids; a split
    that places such patients unevenly gives val another share of them than the pool it is cut from,
    and calibration fitted on val then misses test. The greedy pass this split replaced was off by
    +0.026 to +0.035 on these archives (bench/bench_split_bias.py); seed to seed val's share varies
    by about 0.018, so the mean of 20 seeds is known to about 0.004."""
    images = demo.plan_images(4000, seed=1, label_noise=0.2)
    gaps = []
    for seed in range(20):
        rows = _plan_rows(images)
        split_lib.split_rows(rows, SplitConfig(mode="official", seed=seed, val_fraction=0.15))
        pool = [row["moved"] for row in rows if row["split"] in ("train", "val")]
        val = [row["moved"] for row in rows if row["split"] == "val"]
        gaps.append(np.mean(val) - np.mean(pool))
    assert abs(np.mean(gaps)) < 0.012, gaps


@pytest.mark.parametrize("seed", range(6))
def test_small_archives_leave_no_part_without_a_class(seed):
    """A draw alone can leave a small part without a rare class (four val patients of 1-4 films);
    every part owed half an image of a class gets one, where the class has a patient for each part."""
    rng = np.random.default_rng(seed)
    groups = {}
    for i in range(40):
        counts = [0, 0, 0]
        counts[int(rng.choice(3, p=[0.3, 0.55, 0.15]))] = int(rng.integers(1, 5))
        groups[f"p{i}"] = counts
    totals = np.array(list(groups.values())).sum(axis=0)
    patients_per_class = (np.array(list(groups.values())) > 0).sum(axis=0)
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    for split_seed in range(50):
        assignment = split_lib.assign_groups(groups, fractions, seed=split_seed)
        for part, fraction in fractions.items():
            held = np.array([groups[g] for g in groups if assignment[g] == part]).sum(axis=0)
            owed = (fraction * totals >= 0.5) & (patients_per_class >= len(fractions))
            assert np.all(held[owed] > 0), (split_seed, part, held, totals)


def test_small_archives_keep_each_class_share_to_about_one_patient():
    """The demo's 300 films (official mode, val 0.15): val's count of each class is within one and a
    half of the class's largest patient of its quota (1.25 seen over 150 splits of 10 archives; a
    plain random draw of each patient fails this). The greedy pass this split replaced stayed within
    half a film, by saving small patients for the end, which is what biased it."""
    images = demo.plan_images(300, seed=0)
    for seed in range(10):
        rows = _plan_rows(images)
        split_lib.split_rows(rows, SplitConfig(mode="official", seed=seed, val_fraction=0.15))
        pool = [row for row in rows if row["split"] in ("train", "val")]
        for class_name in CLASS_NAMES:
            per_patient = collections.Counter(row["patient"] for row in pool if row["class"] == class_name)
            in_val = sum(row["class"] == class_name and row["split"] == "val" for row in pool)
            off = abs(in_val - 0.15 * sum(per_patient.values()))
            assert off <= 1.5 * max(per_patient.values()), (seed, class_name, in_val, per_patient)
