"""Scores of a trained bundle: out-of-fold (``bundle.read_oof``) and on held-out cases."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mrn_engine.analysis import binary_metrics
from mrn_engine.bundle import read_oof
from mrn_engine.errors import InputDataError
from mrn_engine.inference import MRNPredictor
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
