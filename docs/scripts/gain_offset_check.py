"""Issue 13's gain/offset experiment on a trained bundle: P(PD) of held-out cases before and
after changing only NM to ``GAIN x NM + OFFSET`` (QSM, masks and anatomy untouched).

    python docs/scripts/gain_offset_check.py BUNDLE CASES_ROOT [--gain 0.6] [--offset 2000]

Prints accuracy, predicted PD share and the largest change of P(PD); writes nothing.
Under the ``"reference"`` mapping the stacks, hence P(PD), should not move; under the legacy
``"percentile"`` mapping the issue measured accuracy 75 % -> 50 % and PD share 0.42 -> 1.00.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("cases", type=Path)
    ap.add_argument("--gain", type=float, default=0.6)
    ap.add_argument("--offset", type=float, default=2000.0)
    ap.add_argument("--folds", default=None, help="comma-separated fold indices (default all)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from mrn_engine.data import discover_cases, find_labels, load_case
    from mrn_engine.errors import MRNWarning
    from mrn_engine.inference import MRNPredictor

    warnings.filterwarnings("ignore", category=MRNWarning)
    folds = [int(k) for k in args.folds.split(",")] if args.folds else None
    pred = MRNPredictor.from_bundle(args.bundle, device="cpu", folds=folds)
    labels = find_labels(args.cases)
    ys, before, after = [], [], []
    for files in discover_cases(args.cases):
        case = load_case(files, labels.get(files.case_id))
        p0 = pred.predict_case(case).p_pd
        nm = case.nm.like(args.gain * case.nm.array + np.float32(args.offset))
        p1 = pred.predict_case(dataclasses.replace(case, nm=nm)).p_pd
        ys.append(labels[files.case_id])
        before.append(p0)
        after.append(p1)
    y, b, a = np.array(ys), np.array(before), np.array(after)
    print(f"bundle {args.bundle} (folds {pred.folds}, intensity {pred.config.roi.intensity})")
    print(f"cases {args.cases}: n = {len(y)}; NM -> {args.gain} x NM + {args.offset}")
    for name, p in (("original", b), ("gain/offset", a)):
        acc = float(np.mean((p >= 0.5) == y))
        print(
            f"  {name:<12} accuracy {acc:.3f}  PD share {np.mean(p >= 0.5):.2f}  "
            f"P(PD) {p.min():.3f}-{p.max():.3f}"
        )
    print(f"  largest |change of P(PD)| = {np.abs(a - b).max():.2e}")


if __name__ == "__main__":
    main()
