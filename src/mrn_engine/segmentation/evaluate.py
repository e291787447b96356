"""Score predicted NM/QSM masks against ground truth folders (``mrn seg evaluate``).

Predictions: ``PRED_DIR/<case>/{NM,QSM}_pred.nii.gz`` (the challenge's Docker output; ``*_mask``
is accepted too). Ground truth: case folders with ``NM_mask`` / ``QSM_mask`` anywhere under
``GT_DIR``. One CSV row per case: Dice and HD95 (mm) of every label, each scored structure's
score, the QSM and NM scores and the composite; a final ``mean`` row.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mrn_engine.config import atomic_write_text
from mrn_engine.data import check_same_grid, discover_cases, load_volume
from mrn_engine.data.labels import NM_LABELS, QSM_LABELS
from mrn_engine.data.nifti import nifti_path
from mrn_engine.errors import InputDataError
from mrn_engine.segmentation.metrics import case_summary, label_scores

PRED_STEMS = ("{m}_pred", "{m}_mask", "{m}_seg")


def find_prediction(pred_dir: Path, case_id: str, modality: str) -> Path | None:
    """``PRED_DIR/<case>/<modality>_pred.nii.gz`` (or ``_mask`` / ``_seg``) if present."""
    folder = pred_dir / case_id
    for stem in PRED_STEMS:
        p = nifti_path(folder, stem.format(m=modality))
        if p is not None:
            return p
    return None


def evaluate_case(pred_dir: Path, gt_case) -> dict[str, float | str]:
    """One CSV row for a ground-truth case (its prediction must exist)."""
    row: dict[str, float | str] = {"case_id": gt_case.case_id}
    scores = []
    for modality, gt_path, labels in (
        ("QSM", gt_case.qsm_mask, QSM_LABELS),
        ("NM", gt_case.nm_mask, NM_LABELS),
    ):
        if gt_path is None:
            raise InputDataError(
                f"{gt_case.case_id}: {modality}_mask.nii.gz missing in {gt_case.folder}"
            )
        pred_path = find_prediction(pred_dir, gt_case.case_id, modality)
        if pred_path is None:
            raise InputDataError(
                f"{gt_case.case_id}: no {modality}_pred.nii.gz in {pred_dir / gt_case.case_id}"
            )
        gt = load_volume(gt_path, kind="mask")
        pred = load_volume(pred_path, kind="mask")
        check_same_grid(gt, pred, "prediction must lie on the ground-truth grid")
        s = label_scores(pred.array, gt.array, gt.spacing, modality, labels)
        for ls in s:
            row[f"{modality}_{ls.name}_dice"] = ls.dice
            row[f"{modality}_{ls.name}_hd95_mm"] = ls.hd95_mm
        scores.extend(s)
    row.update(case_summary(scores))
    return row


def mean_row(rows: list[dict]) -> dict[str, float | str]:
    """Column means over cases (finite values only; HD of missing structures is inf)."""
    out: dict[str, float | str] = {"case_id": "mean"}
    for key in rows[0]:
        if key == "case_id":
            continue
        vals = [float(r[key]) for r in rows if math.isfinite(float(r[key]))]
        out[key] = float(np.mean(vals)) if vals else math.nan
    return out


def rows_to_csv(rows: list[dict]) -> str:
    """CSV text with a header (floats with 4 decimals)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    *,
    out_csv: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """Score every ground-truth case that has a prediction; rows per case plus a ``mean`` row.

    Raises
    ------
    InputDataError
        No ground-truth case with masks, or no prediction for any of them.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise InputDataError(f"{pred_dir}: prediction folder not found")
    gt_cases = [
        c for c in discover_cases(gt_dir) if c.nm_mask is not None or c.qsm_mask is not None
    ]
    if not gt_cases:
        raise InputDataError(f"{gt_dir}: no case folder with NM_mask/QSM_mask found")
    todo = [c for c in gt_cases if (pred_dir / c.case_id).is_dir()]
    if not todo:
        raise InputDataError(
            f"{pred_dir}: holds no prediction folder for any of the {len(gt_cases)} ground-truth cases"
        )
    rows = [evaluate_case(pred_dir, c) for c in tqdm(todo, desc="evaluate", disable=not progress)]
    rows.append(mean_row(rows))
    if out_csv is not None:
        atomic_write_text(Path(out_csv), rows_to_csv(rows))
    return rows
