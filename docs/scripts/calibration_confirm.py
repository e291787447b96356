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
    ap.add_argument(
        "--agreement",
        action="store_true",
        help="also: the fold logits' correlation rho on all cases and on 4000 random draws of "
        "as many cases as each bundle's ensemble calibration used, and each calibrated fold's "
        "calibration slope",
    )
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
    if args.agreement:
        agreement(args.old, args.new, y, raw)


def agreement(old: Path, new: Path, y: np.ndarray, raw: np.ndarray) -> None:
    """``rho`` of the calibrated fold logits here vs in each bundle's record; fold slopes."""
    from sklearn.linear_model import LogisticRegression

    cals = [read_calibration(new / f"fold_{k}") for k in range(raw.shape[1])]
    p = np.clip(np.column_stack([c.apply(raw[:, k]) for k, c in enumerate(cals)]), 1e-6, 1 - 1e-6)
    logits = np.log(p / (1 - p))

    def rho(x: np.ndarray) -> float:
        c = np.corrcoef(x.T)
        k = x.shape[1]
        return float((c.sum() - k) / (k * (k - 1)))

    rng = np.random.default_rng(0)
    print(f"\nrho on all {len(y)} cases: {rho(logits):.3f}")
    for name, bundle in (("old", old), ("new", new)):
        ens = read_ensemble_calibration(bundle)
        if ens is None:
            continue
        draws = np.array(
            [rho(logits[rng.choice(len(y), ens.n_cases, replace=False)]) for _ in range(4000)]
        )
        lo, mid, hi = np.percentile(draws, [2.5, 50, 97.5])
        print(
            f"{name}: rho {ens.rho_measured:.3f} on its {ens.n_cases} cases; draws of "
            f"{ens.n_cases} here: median {mid:.3f} [{lo:.3f}, {hi:.3f}], "
            f"share >= it {np.mean(draws >= ens.rho_measured):.4f}"
        )
    slopes = [
        LogisticRegression(C=1e6).fit(logits[:, [k]], y).coef_[0, 0] for k in range(raw.shape[1])
    ]
    print("calibration slope of each calibrated fold:", " / ".join(f"{v:.2f}" for v in slopes))


if __name__ == "__main__":
    main()
