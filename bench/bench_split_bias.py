"""Is the split's val representative? The share of misfiled films per part, over many split seeds.

    .venv/bin/python bench/bench_split_bias.py                         # 4,000 films, noise 0.2, archives 0-2
    .venv/bin/python bench/bench_split_bias.py --num-images 300 --archive-seeds 0,1,2,3,4

For each label-noise demo archive (planned, not rendered: `demo.plan_images` says which films were
misfiled, which is all a split sees), the project's own `split.split_rows` cuts the films under
each split seed, as preprocess does with the demo config (official mode, val 0.15), and each part's
share of misfiled films and mean patient size is printed beside the pool's. An unbiased split
gives val and train the pool's share on average; bench/README.md quotes the result. It also counts
the parts left without a film of some class.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from pneumonia.config import CLASS_NAMES, SplitConfig
from pneumonia.data import demo, split


def rows_of(images: list[demo.DemoImage]) -> list[dict]:
    """The rows preprocess would give split_rows, with the plan's `moved` flag beside them."""
    return [{"path": image.entry, "class": image.class_name, "label": CLASS_NAMES.index(image.class_name),
             "patient": image.patient, "origin_split": image.origin_split, "split": "", "moved": image.moved}
            for image in images]


def measure(num_images: int, rate: float, archive_seed: int, split_seeds: range, val_fraction: float) -> dict:
    images = demo.plan_images(num_images, archive_seed, label_noise=rate)
    share = collections.defaultdict(list)
    size = collections.defaultdict(list)
    pool_share = []
    parts_missing_a_class = 0
    for seed in split_seeds:
        rows = rows_of(images)
        split.split_rows(rows, SplitConfig(mode="official", seed=seed, val_fraction=val_fraction))
        pool = [row for row in rows if row["split"] in ("train", "val")]  # val is drawn from this pool
        pool_share.append(np.mean([row["moved"] for row in pool]))
        for part in ("train", "val"):
            members = [row for row in pool if row["split"] == part]
            share[part].append(np.mean([row["moved"] for row in members]))
            size[part].append(len(members) / len({row["patient"] for row in members}))
            parts_missing_a_class += len(set(CLASS_NAMES) - {row["class"] for row in members})
    return {"pool": float(np.mean(pool_share)),
            "share": {part: (float(np.mean(values)), float(np.std(values))) for part, values in share.items()},
            "size": {part: float(np.mean(values)) for part, values in size.items()},
            "missing": parts_missing_a_class}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=0.2, help="label noise of the archives")
    parser.add_argument("--archive-seeds", default="0,1,2", help="demo archive seeds, comma-separated")
    parser.add_argument("--split-seeds", type=int, default=20, help="split seeds per archive")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="split.val_fraction (the demo config's)")
    args = parser.parse_args(argv)
    print(f"{args.num_images} films, label noise {args.rate}, {args.split_seeds} split seeds per archive")
    print("archive | pool misfiled | val misfiled (seed to seed) | val - pool | train misfiled | "
          "mean patient size val / train | parts without a class")
    gaps = []
    for archive_seed in (int(seed) for seed in args.archive_seeds.split(",")):
        result = measure(args.num_images, args.rate, archive_seed, range(args.split_seeds), args.val_fraction)
        (val, spread), (train, _) = result["share"]["val"], result["share"]["train"]
        gaps.append(val - result["pool"])
        print(f"{archive_seed} | {result['pool']:.3f} | {val:.3f} ({spread:.3f}) | {val - result['pool']:+.3f} | "
              f"{train:.3f} | {result['size']['val']:.2f} / {result['size']['train']:.2f} | {result['missing']}")
    print(f"mean val - pool over archives: {np.mean(gaps):+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
