"""Ensemble calibration before / after on labelled cases, with the ECE noise floor.

    python docs/scripts/calibration_confirm.py OLD_BUNDLE NEW_BUNDLE CASES [--csv RAW.csv]

Used for docs/results.md "Ensemble calibration (2026-11-30)" and "Ensemble calibration on
cases the pretraining never saw (2026-12-01)". ``OLD_BUNDLE`` and
``NEW_BUNDLE`` hold the same trained folds; they differ only in their calibration files. The
raw fold P(PD) of every labelled case under ``CASES`` are predicted once (``MRNPredictor``;
cached in ``--csv``; an existing cache is read instead, so the caches of several folders,
concatenated, score them together). Both bundles' ``fold_k/calibration.json`` are then applied to them, and
``NEW_BUNDLE``'s ``ensemble_calibration.json`` too. Prints one Markdown row per variant: ECE,
its noise floor (mean / 95th percentile), Brier, accuracy, AUC and the P(PD) range.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mrn_engine.inference.predictor import MRNPredictor
from mrn_engine.training.calibration import (
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    read_calibration,
)
from mrn_engine.training.ensemble_calibration import read_ensemble_calibration
from mrn_engine.workflows import score_folder


def raw_folds(bundle: Path, cases: Path, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and raw fold P(PD) (cases x folds), from ``cache`` when it exists."""
    if cache is not None and cache.is_file():
        with cache.open() as f:
            rows = list(csv.DictReader(f))
        folds = sorted(c for c in rows[0] if c.startswith("raw"))
        return np.array([int(r["label"]) for r in rows]), np.array(
            [[float(r[c]) for c in folds] for r in rows]
        )
    s = score_folder(MRNPredictor.from_bundle(bundle, device="cpu"), cases)
    y = np.array([r["label"] for r in s["rows"]])
    p = np.array([r["p_pd_folds_raw"] for r in s["rows"]])
    if cache is not None:
        with cache.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", *[f"raw{k}" for k in range(p.shape[1])]])
            w.writerows([[int(a), *b] for a, b in zip(y, p, strict=True)])
    return y, p


def ensemble(bundle: Path, raw: np.ndarray, sharpen: bool) -> np.ndarray:
    """The bundle's calibrated ensemble P(PD) of the raw fold P(PD)."""
    cals = [read_calibration(bundle / f"fold_{k}") for k in range(raw.shape[1])]
    p = np.column_stack([c.apply(raw[:, k]) for k, c in enumerate(cals)])
    ens = read_ensemble_calibration(bundle) if sharpen else None
    return np.array([ens.combine(r) for r in p]) if ens is not None else p.mean(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("cases", type=Path)
    ap.add_argument("--csv", type=Path, help="cache of the raw fold P(PD)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    y, raw = raw_folds(args.new, args.cases, args.csv)
    variants = (
        ("raw mean", raw.mean(axis=1)),
        ("old calibration, mean of folds", ensemble(args.old, raw, False)),
        ("old calibration + its ensemble calibration", ensemble(args.old, raw, True)),
        ("new fit, mean of folds", ensemble(args.new, raw, False)),
        ("new fit + ensemble calibration", ensemble(args.new, raw, True)),
    )
    print("| P(PD) | ECE | floor mean / p95 | Brier | accuracy | AUC | range |")
    print("|---|---|---|---|---|---|---|")
    for name, p in variants:
        floor, floor95 = ece_noise_floor(p, draws=400)
        print(
            f"| {name} | {expected_calibration_error(y, p):.3f} | {floor:.3f} / {floor95:.3f} | "
            f"{brier_score(y, p):.3f} | {100 * np.mean((p >= 0.5) == y):.1f} % | "
            f"{roc_auc_score(y, p):.3f} | {p.min():.2f}-{p.max():.2f} |"
        )


if __name__ == "__main__":
    main()
