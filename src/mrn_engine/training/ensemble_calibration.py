"""Ensemble calibration: the fold ensemble is sharper than any one fold model.

The per-fold calibration (``calibration.py``) is fitted on out-of-fold predictions, i.e. on
*one* fold model per case. The ensemble averages K fold models whose errors are only partly
shared, so its P(PD) is better than any one model's and the mean of calibrated fold
probabilities is **underconfident**. Measured on 400 held-out phantoms (docs/results.md,
"Ensemble calibration"): the fold models' logits correlated at about 0.3, and the calibrated
ensemble needed its logit multiplied by about 2 to be calibrated.

The correction follows the signal-plus-noise reading of the fold logits: model ``k``'s
calibrated logit is ``s + e_k`` with a shared signal ``s`` and errors ``e_k`` of equal
variance and correlation ``rho_e``. A fold model's calibration absorbs its attenuation
``Var(s) / Var(s + e)``; the mean of K of them has the error variance shrunk by
``(1 + (K - 1) rho_e) / K``, so its calibrated logit is the mean calibrated logit times

    factor(K) = 1 / (rho + (1 - rho) / K),   rho = mean pairwise correlation of the fold logits

(the correlation ``rho`` of the whole logits, ``Var(s) / Var(s + e)`` when errors are
independent; measured on the raw logits, whose correlation a temperature or Platt map does not
change). ``rho`` is measured on cases **none of the fold models trained on**; their
labels are not needed (``mrn calibrate BUNDLE --unlabeled DIR``; ``mrn demo`` makes such
cases). The ensemble P(PD) is then ``sigmoid(factor(K) * mean_k logit(p_k))``, with ``p_k``
the calibrated fold probabilities: scaling about logit 0 keeps the PD/HC call of the mean
logit and moves only the confidence. Using a subset of the folds applies ``factor`` of that
subset's size (one fold: 1). The record is ``BUNDLE/ensemble_calibration.json``; a bundle
without it combines folds by the plain mean of probabilities, as before. It also keeps each
fold's raw logit sd on those cases: the pooled calibration map is refitted with every fold's
logits brought to a common scale (``calibration_pooled.fold_scales``), so that one map suits
folds whose logits spread differently.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mrn_engine.bundle import read_info
from mrn_engine.config import atomic_write_text
from mrn_engine.errors import InputDataError
from mrn_engine.training.calibration import logit

#: file at the bundle root
ENSEMBLE_FILE = "ensemble_calibration.json"
#: rho is kept in [RHO_MIN, 1]: factor(K) never exceeds 1 / (RHO_MIN + (1 - RHO_MIN) / K)
RHO_MIN = 0.05
#: fewest unseen cases to measure rho on
MIN_CASES = 10


def sharpening_factor(rho: float, k: int) -> float:
    """``1 / (rho + (1 - rho) / k)``: 1 for one fold or rho = 1, up to ``k`` for rho = 0."""
    if k < 1:
        raise ValueError(f"an ensemble needs >= 1 fold, got {k}")
    r = float(np.clip(rho, RHO_MIN, 1.0))
    return 1.0 / (r + (1.0 - r) / k)


@dataclass(frozen=True)
class EnsembleCalibration:
    """The fold models' agreement on unseen cases and its provenance."""

    rho: float  #: mean pairwise Pearson correlation of the fold logits (clipped)
    rho_measured: float  #: before clipping to [RHO_MIN, 1]
    folds: tuple[int, ...]  #: the folds it was measured on
    n_cases: int
    fitted_on: str  #: the folder of unseen cases
    #: ``bundle.json``'s weight hashes of those folds when measured (a retrained fold voids it)
    weights: dict[str, str] = field(default_factory=dict)
    #: per fold (``"k"``): sd of its raw logits on the same cases, the common logit scale of
    #: the pooled calibration map (``calibration_pooled.fold_scales``); empty in older records
    fold_logit_sd: dict[str, float] = field(default_factory=dict)
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    def factor(self, k: int) -> float:
        """Logit multiplier for an ensemble of ``k`` of these folds."""
        return sharpening_factor(self.rho, k)

    def combine(self, p_folds: Sequence[float] | np.ndarray) -> float:
        """Ensemble P(PD) from the calibrated fold probabilities ``p_folds``."""
        p = np.asarray(p_folds, dtype=np.float64).reshape(-1)
        z = self.factor(p.size) * float(logit(p).mean())
        return float(1.0 / (1.0 + math.exp(-z)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def fit_ensemble_calibration(
    p_folds: np.ndarray,
    folds: Sequence[int],
    fitted_on: str,
    weights: Mapping[str, str] | None = None,
) -> EnsembleCalibration:
    """``rho`` from the fold probabilities ``p_folds`` (cases x folds) of unseen cases (raw:
    a temperature or Platt map leaves the correlation of the logits unchanged).

    Raises
    ------
    ValueError: fewer than 2 folds or MIN_CASES cases, or a fold whose P(PD) is constant.
    """
    p = np.asarray(p_folds, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(folds) or p.shape[1] < 2:
        raise ValueError(f"needs cases x folds (>= 2 folds), got shape {p.shape} for {folds}")
    if p.shape[0] < MIN_CASES:
        raise ValueError(f"needs >= {MIN_CASES} unseen cases to measure the fold agreement")
    z = logit(p)
    if np.any(z.std(axis=0) < 1e-9):
        raise ValueError("a fold model gives the same P(PD) to every case")
    c = np.corrcoef(z.T)
    measured = float(c[np.triu_indices(len(folds), 1)].mean())
    return EnsembleCalibration(
        rho=float(np.clip(measured, RHO_MIN, 1.0)),
        rho_measured=measured,
        folds=tuple(int(k) for k in folds),
        n_cases=int(p.shape[0]),
        fitted_on=fitted_on,
        weights=dict(weights or {}),
        fold_logit_sd={str(k): float(v) for k, v in zip(folds, z.std(axis=0), strict=True)},
    )


def write_ensemble_calibration(root: str | os.PathLike, cal: EnsembleCalibration) -> Path:
    """Write ``root/ensemble_calibration.json`` atomically."""
    path = Path(root) / ENSEMBLE_FILE
    atomic_write_text(path, cal.to_json())
    return path


def read_ensemble_calibration(root: str | os.PathLike) -> EnsembleCalibration | None:
    """The bundle's ensemble calibration, or None when the file is absent."""
    path = Path(root) / ENSEMBLE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        data["folds"] = tuple(int(k) for k in data["folds"])
        data["fold_logit_sd"] = {str(k): float(v) for k, v in data.get("fold_logit_sd", {}).items()}
        cal = EnsembleCalibration(**data)
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise InputDataError(f"{path}: not an ensemble calibration record ({e})") from e
    if not (RHO_MIN <= cal.rho <= 1.0) or len(cal.folds) < 2:
        raise InputDataError(f"{path}: rho {cal.rho} outside [{RHO_MIN}, 1] or < 2 folds")
    if not all(math.isfinite(v) and v > 0 for v in cal.fold_logit_sd.values()):
        raise InputDataError(f"{path}: fold logit sds must be positive: {cal.fold_logit_sd}")
    return cal


def usable_for(
    cal: EnsembleCalibration | None, folds: Sequence[int], weights: Mapping[str, str]
) -> tuple[EnsembleCalibration | None, str]:
    """``cal`` if it was measured on these folds' current weights, else None and the reason."""
    if cal is None:
        return None, ""
    if not set(folds) <= set(cal.folds):
        return None, f"measured on folds {list(cal.folds)}, not {list(folds)}"
    changed = [k for k in cal.folds if cal.weights.get(f"fold_{k}") != weights.get(f"fold_{k}")]
    if cal.weights and changed:
        return None, f"fold(s) {changed} retrained since it was measured"
    return cal, ""


def bundle_ensemble_calibration(
    root: str | os.PathLike, folds: Sequence[int]
) -> tuple[EnsembleCalibration | None, str]:
    """The record of the bundle at ``root`` if it fits ``folds``' current weights
    (``bundle.json``), else None and the reason (empty when there is no record)."""
    weights = read_info(root).get("weights") or {}
    return usable_for(read_ensemble_calibration(root), folds, weights)
