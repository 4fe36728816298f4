"""The split manifest: patient ids, a deterministic split stratified by class and grouped by patient, counts.

Why an own assignment rather than scikit-learn's StratifiedGroupKFold: folds only cut 1/k fractions
(0.15 is not 1/k), and the pooled mode needs three parts of unequal sizes in one pass. Patients with
the same per-class counts are dealt out together, each part taking its fraction of them and which
ones by a seeded draw: that reaches any fractions, keeps every patient whole (including personN ids
with both bacteria and virus images), is deterministic from the seed, and leans no part towards a
kind of patient. A greedy pass (largest patients first, each to the part with the most room) did
lean: on label-noise archives its val held 0.026-0.035 more misfiled films than the pool it was cut
from, because misfiled films sit in small and mixed-class patient ids that it placed unevenly at
the end of its pass (bench/bench_split_bias.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from pneumonia.config import CLASS_NAMES, SplitConfig
from pneumonia.errors import BadInputError

SPLITS = ("train", "val", "test", "unused")
MANIFEST_VERSION = 1

_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE)
# IM-0115-0001, NORMAL2-IM-0927-0001, NORMAL2-IM-1427-0001-0002: the patient is the part before the view numbers.
_NORMAL = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)


def patient_id(base_name: str) -> str | None:
    """The patient a file name belongs to, or None when the name follows neither known pattern."""
    stem = base_name.rsplit(".", 1)[0] if "." in base_name else base_name
    match = _PERSON.match(stem) or _NORMAL.match(stem)
    return match.group(1) if match else None


def assign_groups(group_counts: Mapping[str, Sequence[int]], fractions: Mapping[str, float],
                  seed: int) -> dict[str, str]:
    """Maps each group (patient) to a part so that every part holds about its fraction of each class.

    `group_counts[g][c]` is how many images of class c group g has. Deterministic for a given seed,
    whatever the order of `group_counts`. Groups with the same counts form a stratum; the strata are
    dealt out in a fixed order, each shuffled by the seed, by a weighted round robin kept per class
    with a random start, so every part gets its fraction of each class's images to within a group
    or two. Which groups of a stratum a part gets is a random draw, so nothing the counts do not show
    (how a patient's films were labelled, say) leans towards one part. Before that, every part, the
    smallest first, receives one group of each class it is owed at least half an image of, among the
    groups that fit its room, so that a small archive leaves no part without a class it can give it.
    """
    parts = [part for part, fraction in fractions.items() if fraction > 0]
    if not parts:
        raise ValueError("at least one fraction must be positive")
    groups = sorted(group_counts)
    counts = np.array([group_counts[g] for g in groups], dtype=np.float64).reshape(len(groups), -1)
    totals = counts.sum(axis=0)
    shares = np.array([fractions[p] for p in parts]) / sum(fractions[p] for p in parts)
    quota = shares[:, None] * totals[None, :]
    filled = np.zeros_like(quota)
    rng = np.random.default_rng(seed)
    placed = np.full(len(groups), -1)

    # One group of each class per part, the smallest part first (a large one could take the only group
    # that fits a small one's room) and the rarest class first. Drawn uniformly among the groups that
    # fit the part's room (to half an image); where none fits, the fractions win and the part may go
    # without that class.
    for part in np.argsort(shares, kind="stable"):
        for cls in np.argsort(totals, kind="stable"):
            if quota[part, cls] < 0.5 or filled[part, cls] > 0:
                continue
            room = np.maximum(quota[part] - filled[part], 0.0) + 0.5
            fitting = np.flatnonzero((placed < 0) & (counts[:, cls] > 0) & np.all(counts <= room, axis=1))
            if fitting.size:
                chosen = int(rng.choice(fitting))
                placed[chosen] = part
                filled[part] += counts[chosen]

    # Then the strata, a class's one after another (ordered by the class a group has most images of,
    # then by counts), each shuffled by the seed, dealt by a weighted round robin kept per class and
    # counted in images: each part's credit in each class grows by its share of the group's images,
    # the group goes to the part with the most credit in the group's classes, which pays its images.
    # A seeded group comes first in its stratum and pays there, so its part gets that much less of
    # the same class. The start is random, up to a mean group's images, so which part a stratum's
    # remainder goes to varies with the seed.
    position = rng.permutation(len(groups))
    order = sorted(range(len(groups)),
                   key=lambda i: (int(np.argmax(counts[i])), tuple(counts[i]), placed[i] < 0, position[i]))
    groups_with = np.maximum((counts > 0).sum(axis=0), 1)
    credit = rng.random((len(parts), counts.shape[1])) * (totals / groups_with)
    for index in order:
        row = counts[index]
        credit += shares[:, None] * row
        part = int(placed[index]) if placed[index] >= 0 else int(np.argmax(credit @ row))
        credit[part] -= row
        placed[index] = part
    return {group: parts[part] for group, part in zip(groups, placed, strict=True)}


def split_rows(rows: list[dict[str, Any]], config: SplitConfig) -> dict[str, Any]:
    """Fills each row's `split` and returns the stats: {num_overlap_unused}.

    Rows need `class`, `patient` and `origin_split`. In official mode the archive's test/ is the test
    set; train/ + val/ images of a patient who is also in test/ become `unused` so that no patient
    spans two splits while the published test set stays as published.
    """
    index = {name: i for i, name in enumerate(CLASS_NAMES)}

    def counts_by_patient(subset: list[dict[str, Any]]) -> dict[str, list[int]]:
        table: dict[str, list[int]] = {}
        for row in subset:
            table.setdefault(row["patient"], [0] * len(CLASS_NAMES))[index[row["class"]]] += 1
        return table

    num_overlap = 0
    if config.mode == "official":
        test_patients = {row["patient"] for row in rows if row["origin_split"] == "test"}
        pool = []
        for row in rows:
            if row["origin_split"] == "test":
                row["split"] = "test"
            elif row["patient"] in test_patients:
                row["split"] = "unused"
                num_overlap += 1
            else:
                pool.append(row)
        fractions = {"train": 1.0 - config.val_fraction, "val": config.val_fraction}
    else:
        pool = list(rows)
        fractions = {"train": 1.0 - config.val_fraction - config.test_fraction, "val": config.val_fraction,
                     "test": config.test_fraction}
    if pool:
        assignment = assign_groups(counts_by_patient(pool), fractions, config.seed)
        for row in pool:
            row["split"] = assignment[row["patient"]]
    # Small subsets for quick experiments: keep a stratified share of patients, the rest is unused.
    for split, fraction, salt in (("train", config.small_train_fraction, 1), ("val", config.small_val_fraction, 2)):
        if fraction >= 1.0:
            continue
        members = [row for row in rows if row["split"] == split]
        if not members:
            continue
        keep = assign_groups(counts_by_patient(members), {"keep": fraction, "unused": 1.0 - fraction},
                             config.seed + salt)
        for row in members:
            if keep[row["patient"]] == "unused":
                row["split"] = "unused"
    return {"num_overlap_unused": num_overlap}


def count_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    table = {split: {name: 0 for name in CLASS_NAMES} for split in SPLITS}
    for row in rows:
        table[row["split"]][row["class"]] += 1
    return table


def class_weights(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Balanced weights (scikit-learn) on the train rows, for the trainer's class_weight."""
    labels = np.array([row["label"] for row in rows if row["split"] == "train"])
    missing = [name for i, name in enumerate(CLASS_NAMES) if not np.any(labels == i)]
    if missing:
        raise BadInputError(f"no training images of class {', '.join(missing)} after the split; the archive "
                            "needs more images of it (or lower split.val_fraction / raise small_train_fraction)")
    weights = compute_class_weight("balanced", classes=np.arange(len(CLASS_NAMES)), y=labels)
    return {name: round(float(weight), 6) for name, weight in zip(CLASS_NAMES, weights, strict=True)}


def imbalance_ratio(counts: Mapping[str, Mapping[str, int]]) -> float:
    train = [counts["train"][name] for name in CLASS_NAMES]
    return round(max(train) / max(min(train), 1), 4)


def format_table(counts: Mapping[str, Mapping[str, int]]) -> str:
    """Counts per split and class as an aligned text table, for people reading the job's output."""
    header = ["split", *CLASS_NAMES, "total"]
    lines = [header]
    for split in SPLITS:
        values = [counts[split][name] for name in CLASS_NAMES]
        lines.append([split, *map(str, values), str(sum(values))])
    totals = [sum(counts[split][name] for split in SPLITS) for name in CLASS_NAMES]
    lines.append(["all", *map(str, totals), str(sum(totals))])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
                for line in lines]
    rendered.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(rendered)


def build_manifest(rows: list[dict[str, Any]], config: SplitConfig) -> dict[str, Any]:
    """The split manifest (docs/contracts.md): rows sorted by path, counts, class weights, imbalance."""
    counts = count_table(rows)
    return {
        "version": MANIFEST_VERSION,
        "mode": config.mode,
        "seed": config.seed,
        "fractions": {"val": config.val_fraction, "test": config.test_fraction,
                      "small_train": config.small_train_fraction, "small_val": config.small_val_fraction},
        "class_names": list(CLASS_NAMES),
        "counts": counts,
        "class_weights": class_weights(rows),
        "imbalance_ratio": imbalance_ratio(counts),
        "rows": sorted(rows, key=lambda row: row["path"]),
    }
