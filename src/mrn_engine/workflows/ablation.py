"""``mrn ablate-rois``: held-out evaluation plus the ROI masking table (paper Table 4).

Each labelled case gets one backbone pass per fold (``predict_case``); the 16 masked variants
come from the cached ROI tokens (``masking_table``). Outputs in ``out_dir``:

- ``predictions.csv``: case_id, label, P(PD) per fold, mean, std, call, raw mean, calibrated,
  TTA spread (held-out evaluation)
- ``metrics.csv`` / ``metrics.md``: accuracy / AUC / F1 of every fold model and the ensemble
- ``masking_table.csv`` / ``masking_table.md``: Table 4 (ensemble metrics per masked subset)
- ``masking_cases.csv``: P(PD) per case and subset
- ``errors.json`` (cases that failed) and the model's ``config.json``
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mrn_engine.analysis.masking import TABLE_COLUMNS, masking_metrics
from mrn_engine.analysis.metrics import ensemble_metrics
from mrn_engine.config import atomic_write_text
from mrn_engine.data import find_labels
from mrn_engine.data.roi_subsets import subset_key
from mrn_engine.data.tables import to_markdown, write_csv, write_json
from mrn_engine.errors import InputDataError
from mrn_engine.inference import MRNPredictor, iter_predictions
from mrn_engine.results import Probabilities

METRIC_COLUMNS = ("set", "n", "accuracy", "auc", "f1", "f1_pd", "tn", "fp", "fn", "tp", "note")


@dataclass
class AblationResult:
    """Tables computed by :func:`run_masking_analysis` (also written to ``out_dir``)."""

    out_dir: Path
    predictions: list[dict[str, object]] = field(default_factory=list)
    metrics: list[dict[str, object]] = field(default_factory=list)
    masking: list[dict[str, object]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def run_masking_analysis(
    predictor: MRNPredictor,
    cases_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    labels: dict[str, int] | None = None,
    progress: bool = True,
) -> AblationResult:
    """Evaluate the fold ensemble on labelled cases and compute the 16-subset masking table.

    Parameters
    ----------
    predictor: an ``MRNPredictor`` (MRN model with ``classify_tokens``).
    cases_dir: case folders (labels from ``train_cases.csv`` / ``val_cases.csv`` below it).
    out_dir: where the tables go.
    labels: case id -> 0/1, overriding the label CSVs.
    """
    cases_dir, out_dir = Path(cases_dir), Path(out_dir)
    if labels is None:
        labels = find_labels(cases_dir, check_cases=False)
    if not labels:
        raise InputDataError(
            f"{cases_dir}: no labels found (train_cases.csv / val_cases.csv); "
            "the masking analysis needs labelled cases"
        )
    result = AblationResult(out_dir)
    case_tables: dict[str, list[Probabilities]] = {}
    folds = list(predictor.folds)
    p_folds: list[list[float]] = []
    y: list[int] = []
    for case, pred, error in iter_predictions(
        predictor, cases_dir, labels=labels, only=set(labels), progress=progress
    ):
        if error is not None:
            result.errors.append({"case_id": case.case_id, "error": error})
            continue
        case_tables[pred.case_id] = predictor.masking_table(pred)
        row: dict[str, object] = {"case_id": pred.case_id, "label": labels[pred.case_id]}
        row.update(pred.summary())
        result.predictions.append(row)
        p_folds.append(list(pred.p_pd_folds))
        y.append(labels[pred.case_id])
    if not case_tables:
        raise InputDataError(
            f"{cases_dir}: no labelled case could be predicted ({len(result.errors)} failed)"
        )
    result.metrics = ensemble_metrics(y, p_folds, fold_names=[f"fold {k}" for k in folds])
    result.masking = masking_metrics(case_tables, labels)
    _write(result, case_tables, predictor, folds)
    return result


def _write(
    result: AblationResult,
    case_tables: dict[str, list[Probabilities]],
    predictor: MRNPredictor,
    folds: list[int],
) -> None:
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    pred_cols = ["case_id", "label", *[f"p_pd_fold{k}" for k in folds], "p_pd", "p_pd_std", "call"]
    pred_cols += ["p_pd_raw", "calibrated", "tta_spread"]  # calibration / uncertainty (issue 15)
    write_csv(result.predictions, out / "predictions.csv", columns=pred_cols)
    write_csv(result.metrics, out / "metrics.csv", columns=METRIC_COLUMNS)
    atomic_write_text(
        out / "metrics.md",
        to_markdown(result.metrics, METRIC_COLUMNS[:5], percent=("accuracy", "auc", "f1")),
    )
    write_csv(result.masking, out / "masking_table.csv", columns=TABLE_COLUMNS)
    atomic_write_text(out / "masking_table.md", masking_markdown(result.masking))
    per_case = [
        {
            "case_id": cid,
            "masked": subset_key(r.masked),
            **{f"p_pd_fold{k}": p for k, p in zip(r.folds, r.p_pd_folds, strict=True)},
            "p_pd": r.p_pd,
        }
        for cid, rows in case_tables.items()
        for r in rows
    ]
    write_csv(per_case, out / "masking_cases.csv")
    write_json(result.errors, out / "errors.json")
    if getattr(predictor, "config", None) is not None:
        predictor.config.save(out / "config.json")


def masking_markdown(rows: list[dict[str, object]]) -> str:
    """Table 4 as markdown (``x`` = ROI masked)."""
    cols = ("NM", "QSM1", "QSM2", "QSM3", "accuracy", "auc", "f1", "delta_accuracy")
    shown = [{**r, "NM": r["NM"] or " "} for r in rows]
    header = "ROI masking (x = ROI input replaced by an empty volume; fold-ensemble metrics)\n\n"
    return header + to_markdown(shown, cols, percent=("accuracy", "auc", "f1", "delta_accuracy"))
