"""Measure a bundle's fold agreement on unseen, unlabelled cases (``mrn calibrate --unlabeled``).

See :mod:`mrn_engine.training.ensemble_calibration` for why and what is stored. Cases whose NM
file is byte-identical to one the bundle trained on are left out (the fold models have seen
them); labels, where present, are not read.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mrn_engine.data import discover_cases, file_sha256, load_case
from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.inference import MRNPredictor
from mrn_engine.training.ensemble_calibration import (
    EnsembleCalibration,
    fit_ensemble_calibration,
    write_ensemble_calibration,
)


def _training_nm_hashes(bundle: Path) -> set[str] | None:
    """sha256 of the NM file of every case the bundle trained on (None: cohort not found)."""
    info = json.loads((bundle / "bundle.json").read_text())
    root = Path(info.get("cohort_root") or "")
    if not root.is_dir():
        return None
    trained = set(info.get("labels", {}))
    return {file_sha256(f.nm) for f in discover_cases(root) if f.case_id in trained and f.nm}


def calibrate_ensemble(
    bundle: str | os.PathLike,
    cases_root: str | os.PathLike,
    *,
    device: str = "auto",
    on_case: Callable[[str], None] | None = None,
) -> EnsembleCalibration:
    """Predict the cases under ``cases_root`` with every fold, measure the agreement of their
    raw P(PD) and write ``BUNDLE/ensemble_calibration.json``.

    The raw logits are used: a temperature or Platt map does not change their correlation,
    and an isotonic map's steps would tie cases that the fold models tell apart.

    Raises
    ------
    InputDataError: the bundle is not calibrated per fold, or fewer than
        ``training.ensemble_calibration.MIN_CASES`` unseen cases, or a degenerate fold.
    """
    bundle = Path(bundle)
    predictor = MRNPredictor.from_bundle(bundle, device=device)
    if not predictor.calibrated:
        raise InputDataError(f"{bundle}: not calibrated per fold; run `mrn calibrate {bundle}`")
    seen = _training_nm_hashes(bundle)
    if seen is None:
        warnings.warn(
            f"{bundle}: its training cohort is not at the recorded path, so {cases_root} "
            "cannot be checked for training cases; use cases the bundle never trained on",
            MRNWarning,
            stacklevel=2,
        )
    rows, skipped = [], 0
    for files in discover_cases(cases_root):
        if seen is not None and files.nm is not None and file_sha256(files.nm) in seen:
            skipped += 1
            continue
        rows.append(predictor.predict_case(load_case(files), nuclei=False).raw.p_pd_folds)
        if on_case is not None:
            on_case(files.case_id)
    note = f" ({skipped} training case(s) left out)" if skipped else ""
    try:
        cal = fit_ensemble_calibration(
            np.asarray(rows).reshape(len(rows), len(predictor.folds)),
            predictor.folds,
            f"{Path(cases_root).resolve()}{note}",
            (predictor.bundle.info.get("weights") or {}) if predictor.bundle else {},
        )
    except ValueError as e:
        raise InputDataError(f"{cases_root}: {len(rows)} unseen case(s){note}: {e}") from e
    write_ensemble_calibration(bundle, cal)
    return cal
