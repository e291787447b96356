"""ECE of the calibrated ensemble against the size and draw of the unlabelled calibration set.

    python docs/scripts/calibration_draws.py BUNDLE RAW.csv [--sizes 40,120] [--draws 100]
        [--no-scale] [--method auto|temperature|platt|...]

Used for docs/results.md "A common logit scale for the folds (2026-12-01)". ``RAW.csv`` is the
raw fold P(PD) cache of labelled held-out cases that ``calibration_confirm.py --csv`` writes.
Each draw takes ``m`` of those cases as the "unlabelled" set: the fold agreement ``rho`` and
the fold logit sds are measured on them, as ``mrn calibrate --unlabeled`` does, and the pooled
map is refitted on the bundle's out-of-fold rows (with the common logit scale, or without it
for ``--no-scale``). The ECE and Brier score are then taken on the *other* cases. Prints the
median [10 %, 90 %] ECE, the share of draws with ECE <= 0.05, and the median Brier.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from mrn_engine.training.calibration import (
    brier_score,
    expected_calibration_error,
    read_oof_rows,
)
from mrn_engine.training.calibration_pooled import fit_pooled, fold_scales
from mrn_engine.training.ensemble_calibration import fit_ensemble_calibration


def read_raw(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and raw fold P(PD) (cases x folds) of a ``calibration_confirm.py`` cache."""
    with path.open() as f:
        rows = list(csv.DictReader(f))
    folds = sorted(c for c in rows[0] if c.startswith("raw"))
    y = np.array([int(r["label"]) for r in rows])
    return y, np.array([[float(r[c]) for c in folds] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("raw", type=Path)
    ap.add_argument("--sizes", default="40,120", help="calibration set sizes, comma-separated")
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--no-scale", action="store_true", help="every fold's scale 1")
    ap.add_argument("--method", default="auto", help="the pooled map (mrn calibrate --method)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    y, p = read_raw(args.raw)
    folds = list(range(p.shape[1]))
    oof = {k: read_oof_rows(args.bundle / f"fold_{k}" / "oof.csv") for k in folds}
    rng = np.random.default_rng(args.seed)
    for m in (int(v) for v in args.sizes.split(",")):
        ece, brier = [], []
        for _ in range(args.draws):
            order = rng.permutation(len(y))
            cal, test = order[:m], order[m:]
            ens = fit_ensemble_calibration(p[cal], folds, "draw")
            sd = {k: ens.fold_logit_sd[str(k)] for k in folds}
            scales = None if args.no_scale else fold_scales(sd)
            maps = fit_pooled(oof, args.method, scales, "draw")
            q = np.column_stack([maps[k].apply(p[test, k]) for k in folds])
            pe = np.array([ens.combine(row) for row in q])
            ece.append(expected_calibration_error(y[test], pe))
            brier.append(brier_score(y[test], pe))
        e = np.array(ece)
        print(
            f"m = {m}: ECE median {np.median(e):.3f} [{np.quantile(e, 0.1):.3f}, "
            f"{np.quantile(e, 0.9):.3f}], share <= 0.05: {np.mean(e <= 0.05):.2f}; "
            f"Brier median {np.median(brier):.4f} ({args.draws} draws)"
        )


if __name__ == "__main__":
    main()
