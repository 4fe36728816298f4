"""Is the split's val representative? The share of misfiled films per part, over many split seeds.

    .venv/bin/python bench/bench_quality.py --rates 0.2 --seed 2 --workdir /tmp/q   # an archive and its run
    .venv/bin/python bench/bench_split_bias.py /tmp/q/noise-0.2 --seeds 20

On a label-noise demo archive (its truth sidecar says which films were misfiled), the train and val
patients of the run's split manifest are assigned again with `split.assign_groups` under each seed
(the archive fixed), and each part's share of misfiled films and mean patient size is printed. An
unbiased split gives both parts the pool's share on average; bench/README.md quotes the result.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from pneumonia.data import demo, split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a bench_quality run's folder (noise-RATE), holding raw/ and splits/")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    root = Path(args.root)
    truth = json.loads(Path(demo.truth_path(str(root / "raw" / "demo-chest-xray.zip"))).read_text())
    moved = {(film["path"].split("/")[1], film["path"].rsplit("/", 1)[-1]): film["moved"] for film in truth["films"]}
    manifest = json.loads((root / "splits" / "split.json").read_text())
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0] * len(manifest["class_names"]))
    misfiled: dict[str, list[bool]] = collections.defaultdict(list)
    for row in manifest["rows"]:
        if row["split"] in ("train", "val"):  # the pool val is drawn from (the test folder stays test)
            counts[row["patient"]][row["label"]] += 1
            misfiled[row["patient"]].append(moved[tuple(row["path"].rsplit("/", 1)[-1].split("__", 1))])
    fractions = {"train": 1.0 - manifest["fractions"]["val"], "val": manifest["fractions"]["val"]}
    pool = np.mean([flag for flags in misfiled.values() for flag in flags])
    share = collections.defaultdict(list)
    size = collections.defaultdict(list)
    for seed in range(args.seeds):
        assignment = split.assign_groups(counts, fractions, seed)
        for part in fractions:
            patients = [patient for patient, placed in assignment.items() if placed == part]
            share[part].append(np.mean([flag for patient in patients for flag in misfiled[patient]]))
            size[part].append(np.mean([sum(counts[patient]) for patient in patients]))
    print(f"pool: {pool:.3f} misfiled, {len(counts)} patients; over {args.seeds} split seeds:")
    for part in fractions:
        print(f"  {part}: {np.mean(share[part]):.3f} misfiled (seed to seed {np.std(share[part]):.3f}), "
              f"mean patient size {np.mean(size[part]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
