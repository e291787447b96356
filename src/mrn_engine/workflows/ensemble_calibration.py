"""Measure a bundle's fold agreement on unseen, unlabelled cases (``mrn calibrate --unlabeled``).

See :mod:`mrn_engine.training.ensemble_calibration` for why and what is stored. Cases whose NM
file is byte-identical to one the bundle trained on are left out (the fold models have seen
them); labels, where present, are not read. A pooled per-fold calibration is then refitted on
the common logit scale these cases measure (``calibration_pooled``).
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
from mrn_engine.training.calibration_pooled import calibrate_bundle
from mrn_engine.training.ensemble_calibration import (
    EnsembleCalibration,
    fit_ensemble_calibration,
    write_ensemble_calibration,
)


def _nm_hashes(root: str | os.PathLike, ids: set[str] | None = None) -> set[str]:
    """sha256 of the NM file of every case under ``root`` (only ``ids`` when given)."""
    return {
        file_sha256(f.nm)
        for f in discover_cases(root)
        if f.nm is not None and (ids is None or f.case_id in ids)
    }


def _training_nm_hashes(bundle: Path) -> set[str] | None:
    """sha256 of the NM file of every case the bundle trained on (None: cohort not found)."""
    info = json.loads((bundle / "bundle.json").read_text())
    root = Path(info.get("cohort_root") or "")
    if not root.is_dir():
        return None
    return _nm_hashes(root, set(info.get("labels", {})))


def _pretraining_nm_hashes(bundle: Path) -> set[str]:
    """sha256 of the NM file of every case the bundle's backbone was pretrained on (``mrn
    pretrain``'s card, ``data.roots``); empty when the backbone has no such card or its
    folders are gone."""
    info = json.loads((bundle / "bundle.json").read_text())
    card_file = ((info.get("weights_provenance") or {}).get("card") or {}).get("file")
    if not card_file or not Path(card_file).is_file():
        return set()
    try:
        roots = json.loads(Path(card_file).read_text())["data"]["roots"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return set().union(*(_nm_hashes(r) for r in roots if Path(r).is_dir()))


def calibrate_ensemble(
    bundle: str | os.PathLike,
    cases_root: str | os.PathLike,
    *,
    device: str = "auto",
    method: str | None = None,
    on_case: Callable[[str], None] | None = None,
) -> EnsembleCalibration:
    """Predict the cases under ``cases_root`` with every fold, measure the agreement of their
    raw P(PD) and write ``BUNDLE/ensemble_calibration.json``; then, when the bundle's fold
    calibration is a pooled map, refit it (``method``; None: the default map) on the common logit scale measured here.

    The raw logits are used: a temperature or Platt map does not change their correlation,
    and an isotonic map's steps would tie cases that the fold models tell apart.

    Raises
    ------
    InputDataError: the bundle is not calibrated per fold, or fewer than
        ``training.ensemble_calibration.MIN_CASES`` unseen cases (neither trained on nor in
        the backbone's AnatCL pretraining pool), or a degenerate fold.
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
    # cases the shared pretrained backbone has seen: every fold agrees more on them than on
    # new cases (docs/results.md, 2026-12-01), which would make the sharpening too weak
    pretrained_on = _pretraining_nm_hashes(bundle)
    rows, skipped, skipped_pre = [], 0, 0
    for files in discover_cases(cases_root):
        digest = file_sha256(files.nm) if files.nm is not None else None
        if seen is not None and digest in seen:
            skipped += 1
            continue
        if digest in pretrained_on:
            skipped_pre += 1
            continue
        case = load_case(files, with_t1=False)  # prediction never reads T1
        rows.append(predictor.predict_case(case, nuclei=False).raw.p_pd_folds)
        if on_case is not None:
            on_case(files.case_id)
    left_out = [f"{skipped} training case(s)"] if skipped else []
    left_out += [f"{skipped_pre} case(s) the backbone was pretrained on"] if skipped_pre else []
    note = f" ({' and '.join(left_out)} left out)" if left_out else ""
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
    if all(c.scope == "pooled" for c in predictor.calibration.values()):
        calibrate_bundle(bundle, method)
    return cal
