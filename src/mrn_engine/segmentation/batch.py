"""Segment every case folder under a root and write challenge-format masks (``mrn seg predict``)."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from mrn_engine.data import discover_cases, save_volume
from mrn_engine.errors import InputDataError, MRNError, MRNWarning
from mrn_engine.fileio import make_temp_dir
from mrn_engine.segmentation.predict import NNUNetSegmenter


@dataclass
class SegBatchResult:
    """Outcome of :func:`segment_cases`."""

    written: list[str] = field(default_factory=list)  #: case ids with both masks written
    errors: list[dict[str, str]] = field(default_factory=list)  #: {"case_id", "error"}
    warnings: list[dict[str, str]] = field(default_factory=list)  #: {"case_id", "warning"}


def write_case_masks(out_dir: Path, case_id: str, nm_mask, qsm_mask) -> Path:
    """Write ``OUT/<case>/{NM,QSM}_pred.nii.gz``: both files are finished before either appears."""
    final = out_dir / case_id
    final.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(out_dir, prefix=f".{case_id}."))
    try:
        save_volume(nm_mask, tmp / "NM_pred.nii.gz")
        save_volume(qsm_mask, tmp / "QSM_pred.nii.gz")
        for name in ("NM_pred.nii.gz", "QSM_pred.nii.gz"):
            os.replace(tmp / name, final / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def segment_cases(
    segmenter: NNUNetSegmenter,
    cases_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
) -> SegBatchResult:
    """Predict masks of all cases under ``cases_dir``.

    Missing nuclei (even a whole ROI) are recorded as warnings and the masks are written as
    predicted; a case that fails (unreadable input, ...) is recorded as an error and skipped.
    """
    cases = discover_cases(cases_dir)
    if not cases:
        raise InputDataError(f"{cases_dir}: no case folders (with NM.nii.gz / QSM.nii.gz) found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = SegBatchResult()
    for cf in tqdm(cases, desc="segment", disable=not progress):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MRNWarning)
                nm_mask, qsm_mask = segmenter.predict(cf, strict=False)
            for w in caught:
                res.warnings.append({"case_id": cf.case_id, "warning": str(w.message)})
            write_case_masks(out, cf.case_id, nm_mask, qsm_mask)
            res.written.append(cf.case_id)
        except MRNError as e:
            res.errors.append({"case_id": cf.case_id, "error": str(e)})
    return res
