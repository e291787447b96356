"""Calibration maps fitted on a bundle's out-of-fold predictions, tested on held-out cases.

    python docs/scripts/calibration_heldout.py BUNDLE HELDOUT OUT.json [--cache RAW.json]

Nothing is fitted or chosen on the held-out cases: every map is fitted on the bundle's pooled
``fold_k/oof.csv`` (``training/calibration_pooled.py``; ``fold-temperature`` = the older one
temperature per fold on that fold's rows), ``auto`` is the one ``mrn calibrate`` picks (lowest
cross-fitted ECE on the out-of-fold rows). The held-out P(PD) is the mean over the fold models
of each fold's raw P(PD) through the map (what the predictor does). ECE: 15 equal-width bins
(torchmetrics); 95 % intervals: 2000 bootstrap resamples of the held-out cases. ``reference``:
the ECE a perfectly calibrated model with the same held-out P(PD) would show on this many
cases (labels drawn from P(PD) itself) -- the floor of what the sample size can show.
The bundle is only read (the predictor's raw per-fold P(PD) are used; ``--cache`` keeps them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def heldout_raw(bundle: str, heldout: str, cache: Path | None) -> dict[str, dict]:
    """case_id -> {label, folds, p_raw} for every labelled held-out case (raw per-fold P(PD))."""
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    import torch

    from mrn_engine.data import discover_cases, find_labels, load_case
    from mrn_engine.inference import MRNPredictor

    torch.set_num_threads(1)
    predictor = MRNPredictor.from_bundle(bundle, device="cpu")
    labels = find_labels(heldout)
    out = {}
    for cf in discover_cases(heldout):
        if cf.case_id not in labels:
            continue
        pred = predictor.predict_case(load_case(cf, label=labels[cf.case_id]), nuclei=False)
        out[cf.case_id] = {
            "label": int(labels[cf.case_id]),
            "folds": pred.folds,
            "p_raw": pred.p_pd_folds_raw,
        }
    if cache is not None:
        cache.write_text(json.dumps(out, indent=1))
    return out


def bootstrap_ece(y: np.ndarray, p: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    from mrn_engine.training.calibration import expected_calibration_error as ece

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), (n, len(y)))
    vals = [ece(y[i], p[i]) for i in idx]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def reference_ece(p: np.ndarray, n: int = 2000, seed: int = 1) -> dict[str, float]:
    from mrn_engine.training.calibration import expected_calibration_error as ece

    rng = np.random.default_rng(seed)
    vals = [ece((rng.random(len(p)) < p).astype(int), p) for _ in range(n)]
    return {
        "median": float(np.median(vals)),
        "p2.5": float(np.percentile(vals, 2.5)),
        "p97.5": float(np.percentile(vals, 97.5)),
        "share_le_0.05": float(np.mean(np.asarray(vals) <= 0.05)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("heldout")
    ap.add_argument("out")
    ap.add_argument("--cache", type=Path, default=None)
    a = ap.parse_args()

    from sklearn.metrics import roc_auc_score

    from mrn_engine.training.calibration import (
        N_BINS,
        brier_score,
        expected_calibration_error,
        fit_fold_calibration,
        read_oof_rows,
    )
    from mrn_engine.training.calibration_pooled import (
        CANDIDATES,
        choose,
        cross_fitted,
        fit_or_identity,
        selection_table,
    )

    folds = sorted(int(d.name[5:]) for d in Path(a.bundle).glob("fold_*") if d.name[5:].isdigit())
    rows = {k: read_oof_rows(Path(a.bundle) / f"fold_{k}" / "oof.csv") for k in folds}
    yo = np.array([int(r["label"]) for k in folds for r in rows[k]])
    po = np.array([float(r["p_pd"]) for k in folds for r in rows[k]])
    go = np.array([k for k in folds for _ in rows[k]])
    table = selection_table(rows)
    auto = choose(table)

    raw = heldout_raw(a.bundle, a.heldout, a.cache)
    ids = sorted(raw)
    yh = np.array([raw[c]["label"] for c in ids])
    ph = np.array([raw[c]["p_raw"] for c in ids])  # (n, folds)
    hfolds = raw[ids[0]]["folds"]

    maps = {m: {k: fit_or_identity(m, yo, po) for k in folds} for m in CANDIDATES}
    maps["fold-temperature"] = {k: fit_fold_calibration(rows[k], k, "oof") for k in folds}
    results = {}
    for name, per_fold in maps.items():
        ins = np.concatenate([per_fold[k].apply(po[go == k]) for k in folds])
        held = np.mean([per_fold[k].apply(ph[:, j]) for j, k in enumerate(hfolds)], axis=0)
        if name == "fold-temperature":
            cf = None  # no pooled cross-fit for per-fold maps
        else:
            q = cross_fitted(name, yo, po, go)
            cf = {"ece": expected_calibration_error(yo, q), "brier": brier_score(yo, q)}
        results[name] = {
            "map": {
                k: {
                    "method": c.method,
                    "temperature": c.temperature,
                    "intercept": c.intercept,
                    "knots": len(c.knots_x),
                }
                for k, c in per_fold.items()
            },
            "oof_insample": {
                "ece": expected_calibration_error(yo, ins),
                "brier": brier_score(yo, ins),
            },
            "oof_crossfit": cf,
            "heldout": {
                "ece": expected_calibration_error(yh, held),
                "ece_ci95": bootstrap_ece(yh, held),
                "brier": brier_score(yh, held),
                "auc": float(roc_auc_score(yh, held)),
                "accuracy": float(np.mean((held >= 0.5) == yh)),
                "reference_ece_if_calibrated": reference_ece(held),
            },
        }
    out = {
        "bundle": a.bundle,
        "heldout": a.heldout,
        "n_oof": int(len(yo)),
        "n_heldout": int(len(yh)),
        "heldout_pd": int(yh.sum()),
        "n_bins": N_BINS,
        "auto_choice": auto,
        "selection": table,
        "results": results,
    }
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"auto -> {auto};  ECE: {N_BINS} equal-width bins")
    print(
        "| map | OOF ECE in-sample | OOF ECE cross-fit | OOF Brier | held-out ECE [95% CI] | "
        "held-out Brier | held-out AUC | calibrated-model ECE at n (median [95%]) |"
    )
    for name, r in results.items():
        h, ref = r["heldout"], r["heldout"]["reference_ece_if_calibrated"]
        cf = f"{r['oof_crossfit']['ece']:.3f}" if r["oof_crossfit"] else "-"
        print(
            f"| {name} | {r['oof_insample']['ece']:.3f} | {cf} | {r['oof_insample']['brier']:.3f} | "
            f"{h['ece']:.3f} [{h['ece_ci95'][0]:.3f}, {h['ece_ci95'][1]:.3f}] | {h['brier']:.3f} | "
            f"{h['auc']:.3f} | {ref['median']:.3f} [{ref['p2.5']:.3f}, {ref['p97.5']:.3f}] |"
        )


if __name__ == "__main__":
    main()
