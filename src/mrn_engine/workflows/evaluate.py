"""Scores of a trained bundle: out-of-fold (``bundle.read_oof``) and on held-out cases."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mrn_engine.analysis import binary_metrics
from mrn_engine.bundle import read_oof
from mrn_engine.data.cases import discover_cases, find_labels, load_case
from mrn_engine.errors import InputDataError
from mrn_engine.inference import MRNPredictor
from mrn_engine.results import THRESHOLD
from mrn_engine.training.calibration import (
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
)
from mrn_engine.workflows.ablation import run_masking_analysis


def pooled_oof(bundle: str | os.PathLike) -> list[dict[str, Any]]:
    """All folds' out-of-fold rows ``{case_id, label, p_pd, fold}`` of a bundle, pooled."""
    rows = [r for fold_rows in read_oof(bundle).values() for r in fold_rows]
    if not rows:
        raise InputDataError(f"{bundle}: no fold_*/oof.csv (is the bundle trained?)")
    return rows


def oof_metrics(bundle: str | os.PathLike) -> dict[str, Any]:
    """Accuracy / ROC AUC / F1 (macro) of the pooled out-of-fold predictions."""
    rows = pooled_oof(bundle)
    m = binary_metrics(
        [r["label"] for r in rows], [r["p_pd"] for r in rows], where=f"{bundle} out-of-fold"
    )
    return m.as_row()


def heldout_metrics(
    bundle: str | os.PathLike,
    cases_root: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Fold-ensemble scores on labelled held-out cases (``MRNPredictor`` + ROI-masking analysis).

    Writes the predictions and the 16-subset masking table to ``out_dir``
    (default ``BUNDLE/ablation``, where ``write_report`` looks). Returns the ensemble row.
    """
    bundle = Path(bundle)
    predictor = MRNPredictor.from_bundle(bundle, device=device)
    result = run_masking_analysis(
        predictor,
        cases_root,
        out_dir if out_dir is not None else bundle / "ablation",
        progress=progress,
    )
    ensemble = next(r for r in result.metrics if r.get("set") == "ensemble")
    return {**ensemble, "errors": len(result.errors), "masking": result.masking}


def score_folder(
    predictor: MRNPredictor,
    cases_root: str | os.PathLike,
    *,
    on_case: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The fold ensemble and each fold model on the labelled cases under ``cases_root``.

    Predicts P(PD) only (no nuclei masks, no masking analysis). Returns ``n``; the ensemble's
    ``accuracy``, ``auc``, ``pd_share`` (share called PD) and ``p_pd_range``; ``fold_auc``
    (each fold model alone: one at or below 0.5 has not learned); ``ece`` / ``brier`` of the
    reported and the raw P(PD) with ``ece_floor`` / ``ece_floor_p95``
    (:func:`~mrn_engine.training.calibration.ece_noise_floor`); and the per-case ``rows``.
    Cases without a label are skipped; labels are used only to score.
    """
    labels = find_labels(cases_root)
    rows: list[dict[str, Any]] = []
    for files in discover_cases(cases_root):
        if files.case_id not in labels:
            continue
        case = load_case(files, with_t1=False)  # prediction never reads T1
        pred = predictor.predict_case(case, nuclei=False)
        rows.append(
            {
                "case_id": files.case_id,
                "label": int(labels[files.case_id]),
                "p_pd": float(pred.p_pd),
                "p_pd_raw": float(pred.p_pd_raw),
                "p_pd_folds_raw": [float(x) for x in pred.p_pd_folds_raw],
            }
        )
        if on_case is not None:
            on_case(files.case_id)
    if not rows:
        raise InputDataError(f"{cases_root}: no labelled case to score")
    y = [r["label"] for r in rows]
    p = np.array([r["p_pd"] for r in rows])
    raw = np.array([r["p_pd_raw"] for r in rows])
    folds = np.array([r["p_pd_folds_raw"] for r in rows])
    ensemble = binary_metrics(y, p, where=str(cases_root))
    floor, floor95 = ece_noise_floor(p)
    return {
        "n": len(rows),
        "accuracy": float(ensemble.accuracy),
        "auc": float(ensemble.auc),
        "pd_share": float(np.mean(p >= THRESHOLD)),
        "p_pd_range": [float(p.min()), float(p.max())],
        "fold_auc": [
            float(binary_metrics(y, folds[:, k], where=str(cases_root)).auc)
            for k in range(folds.shape[1])
        ],
        "ece": expected_calibration_error(y, p),
        "ece_raw": expected_calibration_error(y, raw),
        "ece_floor": floor,
        "ece_floor_p95": floor95,
        "brier": brier_score(y, p),
        "brier_raw": brier_score(y, raw),
        "rows": rows,
    }
