"""How many val films each calibration method needs, by simulation (seconds, no training).

    .venv/bin/python bench/bench_calibration.py              # 100 fits per val size
    .venv/bin/python bench/bench_calibration.py --fits 20    # quicker

Two synthetic models with a known best answer, the samplers of tests/test_calibration.py:
- class-weighted: a model trained with a class-weighted loss (its optimum is p_k proportional to
  w_k x P(k | film)) on films misfiled at rate 0.2;
- clear/faint: issue 18's label-noise archive as the model sees it: sure of clear films, less of
  faint ones, each right 80 % of the time.
Each method is fitted on a val sample of the given size and scored on 20,000 films: the 95th
percentile over the fits of |mean top-class confidence - accuracy|, and the median ECE (15 bins).
docs/report-statistics.md quotes the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_calibration import class_weighted_sample, clear_and_faint_sample  # noqa: E402

from pneumonia.evaluation import calibration, uncertainty  # noqa: E402

SAMPLERS = {
    "class-weighted": lambda n, seed: (lambda s: (s[0], s[1], s[3]))(class_weighted_sample(n, seed=seed)),
    "clear/faint": lambda n, seed: (*clear_and_faint_sample(n, seed=seed)[:2], None),
}
TEST_SEED, FIRST_VAL_SEED = 999, 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, default=100, help="val samples per size")
    parser.add_argument("--sizes", default="50,100,174,300,480,1000")
    args = parser.parse_args(argv)
    for name, sample in SAMPLERS.items():
        test_p, test_labels, _ = sample(20000, TEST_SEED)
        print(f"\n{name}: 95th percentile of |confidence - accuracy|; median ECE\n")
        print("| val films | " + " | ".join(calibration.METHODS) + " |")
        print("| ---: |" + " --- |" * len(calibration.METHODS))
        for size in (int(value) for value in args.sizes.split(",")):
            gaps = {method: [] for method in calibration.METHODS}
            eces = {method: [] for method in calibration.METHODS}
            for fit_number in range(args.fits):
                val_p, val_labels, weights = sample(size, FIRST_VAL_SEED + fit_number)
                for method in calibration.METHODS:
                    calibrated = calibration.fit(val_p, val_labels, weights, method)[0].apply(test_p)
                    accuracy = np.mean(calibrated.argmax(axis=1) == test_labels)
                    gaps[method].append(abs(calibrated.max(axis=1).mean() - accuracy))
                    eces[method].append(uncertainty.reliability(test_labels, calibrated).ece)
            print(f"| {size:,} | " + " | ".join(f"{np.percentile(gaps[m], 95):.3f}; {np.median(eces[m]):.3f}"
                                               for m in calibration.METHODS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
