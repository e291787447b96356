"""Per-fold temperature scaling of P(PD), fitted on the fold's out-of-fold predictions.

Each fold model's validation cases (``fold_k/oof.csv``, never used to train fold ``k``) give
one temperature ``T_k``: the calibrated probability is ``sigmoid(logit(p) / T_k)`` (for the
two-class softmax, dividing both logits by ``T`` divides their difference, the binary logit,
by ``T``). ``1 / T`` is fitted by scikit-learn's ``LogisticRegression`` on the single feature
``logit(p)`` without intercept; its default L2 penalty (C = 1) keeps a small or separable
out-of-fold set from driving ``T`` to 0 (it shrinks towards *less* confident, never more).

``fold_k/calibration.json`` records the method, ``T``, the number of cases, what it was fitted
on, and ECE (torchmetrics ``BinaryCalibrationError``, 10 equal-width bins, L1) and Brier score
(scikit-learn) before/after on those cases (in-sample for ``T``: the held-out figures in
``mrn report`` are the honest ones). A fold whose cases hold one class only, or where the fit
gives ``T <= 0``, gets the identity (``method = "identity"``) and the reason. A bundle without
calibration files loads uncalibrated (:func:`load_calibrations` returns none).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mrn_engine.config import atomic_write_text
from mrn_engine.errors import InputDataError, MRNWarning

#: file next to a fold's weights
CALIBRATION_FILE = "calibration.json"
#: probabilities are clipped to [EPS, 1 - EPS] before the logit
EPS = 1e-6
#: reliability bins (ECE and the reliability diagram)
N_BINS = 10
#: temperatures are kept in this range
T_RANGE = (0.05, 100.0)


def logit(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[EPS, 1 - EPS]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(q) - np.log1p(-q)


def expected_calibration_error(y: Sequence[int], p: Sequence[float], n_bins: int = N_BINS) -> float:
    """ECE of P(PD) (torchmetrics ``BinaryCalibrationError``, equal-width bins, L1)."""
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    if len(y) == 0:
        return math.nan
    value = binary_calibration_error(
        torch.as_tensor(np.asarray(p, dtype=np.float64)).float(),
        torch.as_tensor(np.asarray(y, dtype=np.int64)),
        n_bins=n_bins,
        norm="l1",
    )
    return float(value)


def brier_score(y: Sequence[int], p: Sequence[float]) -> float:
    """Brier score of P(PD) (scikit-learn ``brier_score_loss``)."""
    from sklearn.metrics import brier_score_loss

    return (
        float(brier_score_loss(np.asarray(y), np.asarray(p, dtype=np.float64)))
        if len(y)
        else math.nan
    )


def fit_temperature(y: Sequence[int], p: Sequence[float]) -> float:
    """Temperature ``T`` of ``sigmoid(logit(p) / T)`` (see the module docstring).

    Raises
    ------
    ValueError: fewer than two cases of each class, or a non-positive fitted slope.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=np.int64)
    if len(y) < 4 or min(int((y == 0).sum()), int((y == 1).sum())) < 2:
        raise ValueError(
            f"needs >= 2 cases of each class, has {int((y == 0).sum())} HC / {int((y == 1).sum())} PD"
        )
    z = logit(p)[:, None]
    slope = float(LogisticRegression(fit_intercept=False, C=1.0).fit(z, y).coef_[0, 0])
    if slope <= 0:
        raise ValueError(f"fitted slope {slope:.3g} <= 0: P(PD) does not increase with the logit")
    return float(np.clip(1.0 / slope, *T_RANGE))


@dataclass(frozen=True)
class Calibration:
    """One fold's calibration and its provenance (``fold_k/calibration.json``)."""

    fold: int
    method: str  #: "temperature" or "identity"
    temperature: float
    n_cases: int
    fitted_on: str
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    note: str = ""
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    def apply(self, p: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated P(PD) of raw P(PD) ``p`` (same shape)."""
        if self.method == "identity":
            return np.asarray(p, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-logit(p) / self.temperature))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def fit_fold_calibration(
    rows: Iterable[Mapping[str, object]], fold: int, fitted_on: str
) -> Calibration:
    """Temperature of fold ``fold`` from its out-of-fold rows ``{label, p_pd}`` (identity + note
    when it cannot be fitted)."""
    rows = list(rows)
    y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    p = np.array([float(r["p_pd"]) for r in rows], dtype=np.float64)
    method, t, note = "temperature", 1.0, ""
    try:
        t = fit_temperature(y, p)
    except ValueError as e:
        method, note = "identity", f"not fitted: {e}"
    cal = Calibration(
        fold, method, t, len(rows), fitted_on, math.nan, math.nan, math.nan, math.nan, note
    )
    after = cal.apply(p)
    return Calibration(
        fold=fold,
        method=method,
        temperature=t,
        n_cases=len(rows),
        fitted_on=fitted_on,
        ece_before=expected_calibration_error(y, p),
        ece_after=expected_calibration_error(y, after),
        brier_before=brier_score(y, p),
        brier_after=brier_score(y, after),
        note=note,
    )


def write_calibration(fold_dir: str | os.PathLike, cal: Calibration) -> Path:
    """Write ``fold_dir/calibration.json`` atomically."""
    path = Path(fold_dir) / CALIBRATION_FILE
    atomic_write_text(path, cal.to_json())
    return path


def read_calibration(fold_dir: str | os.PathLike) -> Calibration | None:
    """The fold's calibration, or None when ``calibration.json`` is absent."""
    path = Path(fold_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        cal = Calibration(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise InputDataError(f"{path}: not a calibration record ({e})") from e
    if cal.method not in ("temperature", "identity") or not cal.temperature > 0:
        raise InputDataError(
            f"{path}: unknown method {cal.method!r} or temperature {cal.temperature}"
        )
    return cal


def load_calibrations(root: str | os.PathLike, folds: Iterable[int]) -> dict[int, Calibration]:
    """Calibrations of ``folds`` of the bundle at ``root``: all of them, or {} (uncalibrated).

    A bundle where only some of the chosen folds are calibrated is used uncalibrated, with a
    warning (mixing calibrated and raw fold probabilities would be neither).
    """
    folds = list(folds)
    found = {k: read_calibration(Path(root) / f"fold_{k}") for k in folds}
    have = {k: c for k, c in found.items() if c is not None}
    if have and len(have) < len(folds):
        warnings.warn(
            f"{root}: calibration.json for fold(s) {sorted(have)} only, not {sorted(set(folds) - set(have))}: "
            "P(PD) is left uncalibrated (run `mrn calibrate`)",
            MRNWarning,
            stacklevel=2,
        )
        return {}
    return have


def calibrate_fold_dir(
    fold_dir: str | os.PathLike, rows: Iterable[Mapping[str, object]], fold: int
) -> Calibration:
    """Fit and write one fold's calibration from its out-of-fold rows (the trainer's hook)."""
    cal = fit_fold_calibration(rows, fold, f"fold_{fold}/oof.csv")
    write_calibration(fold_dir, cal)
    return cal


def read_oof_rows(path: str | os.PathLike) -> list[dict[str, object]]:
    """Rows ``{case_id, label, p_pd}`` of an ``oof.csv`` (clear error on a bad file)."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        return [
            {"case_id": r["case_id"], "label": int(r["label"]), "p_pd": float(r["p_pd"])}
            for r in rows
        ]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise InputDataError(f"{path}: not an out-of-fold table case_id,label,p_pd ({e})") from e


def calibrate_bundle(root: str | os.PathLike) -> dict[int, Calibration]:
    """Fit and write ``calibration.json`` for every fold of the bundle (each needs ``oof.csv``)."""
    root = Path(root)
    folds = {
        int(d.name[5:]): d
        for d in root.glob("fold_*")
        if d.is_dir() and d.name[5:].isdigit() and (d / "model.safetensors").is_file()
    }
    if not folds:
        raise InputDataError(f"{root}: no fold_k/model.safetensors: not a model bundle")
    missing = sorted(k for k, d in folds.items() if not (d / "oof.csv").is_file())
    if missing:
        raise InputDataError(f"{root}: fold(s) {missing} have no oof.csv to calibrate on")
    rows = {k: read_oof_rows(d / "oof.csv") for k, d in folds.items()}  # all read before writing
    return {k: calibrate_fold_dir(folds[k], rows[k], k) for k in sorted(folds)}


def apply_folds(
    calibrations: Mapping[int, Calibration], folds: Sequence[int], p_folds: Sequence[float]
) -> list[float]:
    """Calibrated per-fold P(PD) (unchanged when ``calibrations`` is empty)."""
    if not calibrations:
        return [float(x) for x in p_folds]
    return [float(calibrations[k].apply(p)) for k, p in zip(folds, p_folds, strict=True)]
