"""Saving a panel result: output masks as NIfTI, ``PD_pred.txt`` and ``mrn_result.json``.

The case folder is written under a temporary name and renamed into place, so a failed save
leaves no partial folder; a folder that holds one of the inputs is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mrn_engine.config import atomic_write_text
from mrn_engine.data import save_volume
from mrn_engine.errors import InputDataError
from mrn_engine.inference import CaseEvidence, write_pd_pred
from mrn_engine.inference.uncertainty import Uncertainty, assess_prediction
from mrn_engine.results import Probabilities
from napari_mrn._outputs import OutputVolume

if TYPE_CHECKING:
    from napari_mrn._session import RunResult

RESULT_JSON = "mrn_result.json"


def probabilities_record(probs: Probabilities) -> dict[str, Any]:
    """JSON form of a :class:`Probabilities` (masked ROIs in ROI order)."""
    return {
        "folds": list(probs.folds),
        "p_pd_folds": list(probs.p_pd_folds),
        "p_pd": probs.p_pd,
        "p_pd_std": probs.p_pd_std,
        "call": probs.call,
        "label": probs.call_name,
        "masked": probs.masked_names,
    }


def calibration_record(predictor: Any) -> dict[str, Any]:
    """Whether P(PD) is calibrated, and with which map (``fold_k/calibration.json``)."""
    cals = getattr(predictor, "calibration", None) or {}
    first = next(iter(cals.values()), None)
    return {
        "calibrated": bool(cals),
        "method": first.method if first is not None else None,
        "scope": first.scope if first is not None else None,
        "fitted_on": first.fitted_on if first is not None else None,
    }


def _result_record(
    result: RunResult,
    shown: Probabilities,
    table: Sequence[Probabilities],
    files: list[str],
    uncertainty: Uncertainty | None,
    evidence: CaseEvidence | None,
) -> dict[str, Any]:
    pred, key, bundle = result.prediction, result.key, result.predictor.bundle
    return {
        "case_id": pred.case_id,
        "prediction": probabilities_record(pred.probabilities),
        "shown": probabilities_record(shown),
        "calibration": calibration_record(result.predictor),
        "site_adaptation": site.record() if (site := result.predictor.site_adaptation) else None,
        "uncertainty": {
            "prediction": assess_prediction(pred).record(),
            "shown": uncertainty.record() if uncertainty is not None else None,
        },
        "evidence": {
            "prediction": result.evidence.summary() if result.evidence is not None else None,
            "shown": evidence.summary() if evidence is not None else None,
        },
        "masking_table": [probabilities_record(p) for p in table],
        "boxes": {name: asdict(box) for name, box in pred.boxes.items()},
        "mask_source": pred.mask_source,
        "bundle": {
            "path": str(Path(key.bundle).resolve()),
            "config": bundle.config.to_dict() if bundle is not None else None,
            "info": bundle.info if bundle is not None else None,
        },
        "settings": {
            "device": key.device,
            "folds": list(key.folds) if key.folds is not None else None,
            "tta": key.tta,
            "site": str(key.site) if key.site is not None else None,
            "masked": shown.masked_names,
        },
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_not_input(target: Path, result: RunResult) -> None:
    """Refuse a case folder that holds one of the inputs (it would be replaced)."""
    case = result.case
    for vol in (case.nm, case.qsm, case.nm_mask, case.qsm_mask):
        if vol is not None and vol.path is not None and vol.path.is_file():
            if vol.path.resolve().parent == target.resolve():
                raise InputDataError(
                    f"{target}: holds the input {vol.path.name}; save into another folder"
                )


def save_result(
    folder: str | os.PathLike,
    result: RunResult,
    *,
    shown: Probabilities,
    table: Sequence[Probabilities],
    outputs: Sequence[OutputVolume],
    uncertainty: Uncertainty | None = None,
    evidence: CaseEvidence | None = None,
) -> list[Path]:
    """Write ``folder/<case_id>/`` and return the files written (in their final place).

    ``PD_pred.txt`` is the full model's call, written by the engine's own writer (the same
    bytes as ``mrn predict``); ``mrn_result.json`` also records the shown (masked) P(PD),
    the 16-subset table, the calibration, the "uncertain" flag with the rule's inputs and the
    per-slice evidence summary (full model and shown: ``uncertainty`` / ``evidence``), the ROI
    boxes, the bundle and the run settings.
    """
    root = Path(folder)
    target = root / result.prediction.case_id
    _check_not_input(target, result)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        names = [save_volume(o.volume, tmp / f"{o.file_stem}.nii.gz").name for o in outputs]
        names.append(write_pd_pred(tmp, result.prediction.probabilities.call).name)
        files = [*names, RESULT_JSON]
        record = _result_record(result, shown, table, files, uncertainty, evidence)
        atomic_write_text(tmp / RESULT_JSON, json.dumps(record, indent=2))
        names.append(RESULT_JSON)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old / "prev")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return [target / n for n in names]
