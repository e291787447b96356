"""Calibration of P(PD): one map per fold, fitted on out-of-fold predictions.

``mrn train`` / ``mrn calibrate`` fit **one map on the pooled out-of-fold predictions of all
folds** (:mod:`mrn_engine.training.calibration_pooled`: temperature by default; identity,
Platt, isotonic or ``auto`` on request) and write it to every fold, each fold's logits
first brought to a common scale where unseen cases measured it (``Calibration.scale``).
The per-fold temperature below is the older scheme (still written at the end of each fold,
and loadable):

Each fold model's validation cases (``fold_k/oof.csv``, never used to train fold ``k``) give
one temperature ``T_k``: the calibrated probability is ``sigmoid(logit(p) / T_k)`` (for the
two-class softmax, dividing both logits by ``T`` divides their difference, the binary logit,
by ``T``). ``1 / T`` is fitted by :func:`fit_logistic` on the single feature ``logit(p)``
without intercept: Firth's penalised logistic fit, which keeps a small or separable
out-of-fold set from driving ``T`` to 0, is nearly unbiased on a few dozen cases, and does not
depend on the scale of the logits (an L2 penalty on the slope, used before 2026-11-30, shrank
small-logit models towards *under*confidence: see docs/results.md, "Ensemble calibration";
Platt's smoothed targets, used until 2026-12-01, shrank the slope by about 8 %).

``fold_k/calibration.json`` records the method, ``T``, the number of cases, what it was fitted
on, and ECE (torchmetrics ``BinaryCalibrationError``, 15 equal-width bins, L1) and Brier score
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
#: reliability bins (ECE and the reliability diagram; torchmetrics' default)
N_BINS = 15
#: the maps a calibration file may hold
METHODS = ("identity", "temperature", "platt", "isotonic")
#: temperatures are kept in this range
T_RANGE = (0.05, 100.0)


def logit(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[EPS, 1 - EPS]``."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(q) - np.log1p(-q)


def rescale(p: Sequence[float] | np.ndarray, scale: float) -> np.ndarray:
    """``sigmoid(scale * logit(p))``: P(PD) with its logit multiplied by ``scale``."""
    q = np.asarray(p, dtype=np.float64)
    return q if scale == 1.0 else 1.0 / (1.0 + np.exp(-scale * logit(q)))


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


def ece_noise_floor(
    p: Sequence[float], n_bins: int = N_BINS, draws: int = 400, seed: int = 0
) -> tuple[float, float]:
    """ECE a *perfectly calibrated* model would show on these cases: (mean, 95th percentile).

    Labels are drawn as ``y ~ Bernoulli(p)`` for the given P(PD) ``draws`` times (seeded), and
    the ECE of ``p`` against each draw is taken. On a few dozen cases the binned ECE is mostly
    sampling noise (about 0.14 for 60 cases in 15 bins), so an observed ECE is only evidence
    of miscalibration where it exceeds this floor's 95th percentile.
    """
    q = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    if q.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array(
        [expected_calibration_error(rng.binomial(1, q), q, n_bins) for _ in range(draws)]
    )
    return float(values.mean()), float(np.quantile(values, 0.95))


def brier_score(y: Sequence[int], p: Sequence[float]) -> float:
    """Brier score of P(PD) (scikit-learn ``brier_score_loss``)."""
    from sklearn.metrics import brier_score_loss

    return (
        float(brier_score_loss(np.asarray(y), np.asarray(p, dtype=np.float64)))
        if len(y)
        else math.nan
    )


def fit_logistic(
    z: Sequence[float] | np.ndarray, y: Sequence[int] | np.ndarray, *, intercept: bool
) -> tuple[float, float]:
    """``(a, b)`` of ``P(PD) = sigmoid(a z + b)`` (``b = 0`` without intercept), by Firth's
    (1993) penalised maximum likelihood.

    Firth's penalty ``0.5 log det I(beta)`` (Jeffreys' prior) removes the O(1/n) bias of the
    maximum-likelihood slope, keeps a separable set finite, and, unlike an L2 penalty, does
    not depend on the scale of ``z``. Fitted by Newton steps on Firth's modified score
    ``X' (y - p + h (1/2 - p))`` (``h``: the hat-matrix diagonal), as R's ``logistf`` does.
    Platt's smoothed targets, used until 2026-12-01, shrank the slope by about 8 % on 72 cases
    (docs/explain.md).
    """
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    x = np.stack([z, np.ones_like(z)], axis=1) if intercept else z[:, None]
    beta = np.zeros(x.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        w = p * (1.0 - p)
        info = x.T @ (w[:, None] * x)
        cov = np.linalg.pinv(info)
        h = w * np.einsum("ij,jk,ik->i", x, cov, x)
        step = cov @ (x.T @ (y - p + h * (0.5 - p)))
        step *= min(1.0, 5.0 / max(float(np.abs(step).max()), 1e-12))  # damped, as logistf
        beta = beta + step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(beta[0]), float(beta[1]) if intercept else 0.0


def fit_temperature(y: Sequence[int], p: Sequence[float]) -> float:
    """Temperature ``T`` of ``sigmoid(logit(p) / T)`` (see the module docstring).

    Raises
    ------
    ValueError: fewer than two cases of each class, or a non-positive fitted slope.
    """
    y = np.asarray(y, dtype=np.int64)
    if len(y) < 4 or min(int((y == 0).sum()), int((y == 1).sum())) < 2:
        raise ValueError(
            f"needs >= 2 cases of each class, has {int((y == 0).sum())} HC / {int((y == 1).sum())} PD"
        )
    slope, _ = fit_logistic(logit(p), y, intercept=False)
    if slope <= 0:
        raise ValueError(f"fitted slope {slope:.3g} <= 0: P(PD) does not increase with the logit")
    return float(np.clip(1.0 / slope, *T_RANGE))


@dataclass(frozen=True)
class Calibration:
    """One fold's calibration and its provenance (``fold_k/calibration.json``).

    The raw P(PD) ``p`` is first put on the ensemble's common logit scale,
    ``p <- sigmoid(scale * logit(p))`` (``scale = 1``: unchanged), then mapped:
    ``identity``; ``temperature``: ``sigmoid(logit(p) / T)``; ``platt``:
    ``sigmoid(logit(p) / T + intercept)``; ``isotonic``: piecewise-linear through
    ``(knots_x, knots_y)`` (scikit-learn's ``IsotonicRegression.predict``, clipped at the ends).
    Files written before ``intercept`` / ``knots_*`` / ``scope`` / ``scale`` existed load with
    the defaults.
    """

    fold: int
    method: str  #: one of METHODS
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
    intercept: float = 0.0  #: platt only
    knots_x: tuple[float, ...] = ()  #: isotonic only: raw P(PD), increasing
    knots_y: tuple[float, ...] = ()  #: isotonic only: calibrated P(PD), non-decreasing
    scope: str = "fold"  #: "fold" (this fold's cases) or "pooled" (all folds' cases)
    n_bins: int = N_BINS  #: bins of the ECE figures
    selection: dict[str, dict[str, float]] = field(default_factory=dict)  #: pooled: per method
    #: multiplier of this fold's raw logit before the map (pooled maps: the geometric mean of
    #: the folds' logit sds on unseen cases over this fold's; ``calibration_pooled.fold_scales``)
    scale: float = 1.0

    def apply(self, p: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated P(PD) of raw P(PD) ``p`` (same shape)."""
        p = rescale(p, self.scale)
        if self.method == "identity":
            return np.asarray(p, dtype=np.float64)
        if self.method == "isotonic":
            return np.interp(np.asarray(p, dtype=np.float64), self.knots_x, self.knots_y)
        z = logit(p) / self.temperature + (self.intercept if self.method == "platt" else 0.0)
        return 1.0 / (1.0 + np.exp(-z))

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
        for key in ("knots_x", "knots_y"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        cal = Calibration(**data)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise InputDataError(f"{path}: not a calibration record ({e})") from e
    if cal.method not in METHODS or not cal.temperature > 0 or not cal.scale > 0:
        raise InputDataError(
            f"{path}: unknown method {cal.method!r}, or temperature {cal.temperature} or "
            f"scale {cal.scale} not > 0"
        )
    x, y = np.asarray(cal.knots_x), np.asarray(cal.knots_y)
    if cal.method == "isotonic" and (
        len(x) < 2
        or len(x) != len(y)
        or not (np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0))
        or not (np.all(np.isfinite(y)) and 0 <= y.min() and y.max() <= 1)
    ):
        raise InputDataError(f"{path}: isotonic knots must be increasing, with values in [0, 1]")
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
            {"case_id": r["case_id"], "label": int(r["label"]), "p_pd": _probability(r["p_pd"])}
            for r in rows
        ]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise InputDataError(f"{path}: not an out-of-fold table case_id,label,p_pd ({e})") from e


def bundle_fold_dirs(root: str | os.PathLike) -> dict[int, Path]:
    """Fold index -> ``fold_k`` folder of every fold with weights (clear error if none)."""
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
    return dict(sorted(folds.items()))


def _probability(text: str) -> float:
    p = float(text)
    if not 0.0 <= p <= 1.0:  # also NaN
        raise ValueError(f"p_pd {text!r} is not a probability")
    return p


def apply_folds(
    calibrations: Mapping[int, Calibration], folds: Sequence[int], p_folds: Sequence[float]
) -> list[float]:
    """Calibrated per-fold P(PD) (unchanged when ``calibrations`` is empty)."""
    if not calibrations:
        return [float(x) for x in p_folds]
    return [float(calibrations[k].apply(p)) for k, p in zip(folds, p_folds, strict=True)]
