"""One calibration map for the whole ensemble, fitted on the pooled out-of-fold predictions.

Each fold's ``oof.csv`` holds the cases that fold never trained on; pooled over the folds they
cover the labelled cohort once. Candidate maps of raw P(PD):

- ``identity``: no change;
- ``temperature``: ``sigmoid(logit(p) / T)`` (``calibration.fit_logistic`` on ``logit(p)``, no
  intercept: Firth's penalised likelihood);
- ``platt``: ``sigmoid(a logit(p) + b)`` (``fit_logistic`` with intercept): also moves the
  threshold;
- ``isotonic``: ``IsotonicRegression`` (monotone, piecewise linear, clipped to [0, 1]).

The **default is ``temperature``**: one parameter, fitted on all out-of-fold rows, that keeps
the ranking and the 0.5 threshold (Guo et al. 2017 found it the most robust post-hoc map).
``auto`` picks the candidate with the lowest **cross-fitted log loss** over the folds (the map
for fold ``k``'s rows is fitted on the other folds' rows; ties: Brier). With three folds of
24 cases that choice is noisy, and it breaks down when the folds differ in quality: for the
seed-2 demo bundle the cross-fitted temperature looked worst (one fold's 24 cases were
separable), ``auto`` chose the identity, and the held-out ECE was 0.062 against 0.040 with the
temperature (docs/results.md, 2026-12-01). The cross-fitted table of every candidate is kept
in ``selection`` for information. Only out-of-fold predictions are used: held-out cases never
choose or fit anything. Where the default map cannot be fitted (one class, too few cases) the
identity is written with the reason; an explicitly requested map raises instead.

**Common logit scale.** Fold models can differ in how far they spread their logits (in the
`mrn demo` bundles one fold's logit sd was half the others'), and one map cannot fit them all.
Where the bundle's ensemble calibration measured each fold's logit sd on the same unseen,
unlabelled cases (``ensemble_calibration.json``, ``fold_logit_sd``), each fold's logits are
multiplied by ``scale_k = geometric mean of the sds / sd_k`` before the map is fitted and
applied (:func:`fold_scales`; labels are not needed, and the same cases for every fold make
the sds comparable). The same map is written to every fold with its own ``scale`` and applied
to that fold model's P(PD); the ensemble P(PD) combines those: their mean, or the sharpened
mean of ``ensemble_calibration.py`` when the bundle has that record. ``calibrate_bundle`` fits
and writes it (or the older per-fold temperatures) for a bundle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mrn_engine.errors import InputDataError
from mrn_engine.training.calibration import (
    EPS,
    N_BINS,
    T_RANGE,
    Calibration,
    brier_score,
    bundle_fold_dirs,
    calibrate_fold_dir,
    expected_calibration_error,
    fit_logistic,
    fit_temperature,
    logit,
    read_oof_rows,
    rescale,
    write_calibration,
)
from mrn_engine.training.ensemble_calibration import bundle_ensemble_calibration

#: the maps ``auto`` chooses from, in the order used to break exact ties
CANDIDATES = ("identity", "temperature", "platt", "isotonic")
#: the map fitted when none is asked for (``mrn train``, ``mrn calibrate``, ``mrn demo``)
DEFAULT_METHOD = "temperature"

Rows = Sequence[Mapping[str, object]]


def _check_classes(y: np.ndarray) -> None:
    n_hc, n_pd = int((y == 0).sum()), int((y == 1).sum())
    if len(y) < 4 or min(n_hc, n_pd) < 2:
        raise ValueError(f"needs >= 2 cases of each class, has {n_hc} HC / {n_pd} PD")


def fit_map(method: str, y: Sequence[int], p: Sequence[float]) -> Calibration:
    """The map ``method`` fitted on ``(y, p)`` (provenance fields left empty).

    Raises
    ------
    ValueError: too few cases of a class, or a fit that is not increasing in ``p``.
    """
    from sklearn.isotonic import IsotonicRegression

    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    blank = dict(fold=-1, n_cases=len(y), fitted_on="", ece_before=math.nan)
    blank.update(ece_after=math.nan, brier_before=math.nan, brier_after=math.nan)
    if method == "identity":
        return Calibration(method="identity", temperature=1.0, **blank)
    _check_classes(y)
    if method == "temperature":
        return Calibration(method="temperature", temperature=fit_temperature(y, p), **blank)
    if method == "platt":
        slope, intercept = fit_logistic(logit(p), y, intercept=True)
        if slope <= 0:
            raise ValueError(f"fitted slope {slope:.3g} <= 0: P(PD) does not increase with p")
        t = float(np.clip(1.0 / slope, *T_RANGE))
        return Calibration(method="platt", temperature=t, intercept=intercept, **blank)
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        kx, ky = np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_)
        if len(kx) < 2:
            raise ValueError("isotonic fit is a single point")
        return Calibration(
            method="isotonic",
            temperature=1.0,
            knots_x=tuple(float(v) for v in kx),
            knots_y=tuple(float(v) for v in ky),
            **blank,
        )
    raise ValueError(f"unknown calibration method {method!r}; choose from {CANDIDATES}")


def fit_or_identity(method: str, y: Sequence[int], p: Sequence[float]) -> Calibration:
    """:func:`fit_map`, or the identity where the map cannot be fitted (what ``auto`` does)."""
    try:
        return fit_map(method, y, p)
    except ValueError:
        return fit_map("identity", y, p)


def cross_fitted(method: str, y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """P(PD) of each row through ``method`` fitted on the rows of the *other* groups (folds);
    a split where the map cannot be fitted keeps the raw P(PD), as the final fit would."""
    out = np.empty_like(p, dtype=np.float64)
    for g in np.unique(groups):
        sel = groups == g
        out[sel] = fit_or_identity(method, y[~sel], p[~sel]).apply(p[sel])
    return out


def _pooled_arrays(
    rows: Mapping[int, Rows], scales: Mapping[int, float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, p, g = [], [], []
    for k, fold_rows in sorted(rows.items()):
        s = 1.0 if scales is None else float(scales[k])
        y.extend(int(r["label"]) for r in fold_rows)  # type: ignore[call-overload]
        p.extend(rescale([float(r["p_pd"]) for r in fold_rows], s))  # type: ignore[arg-type]
        g.extend([k] * len(fold_rows))
    return np.asarray(y, np.int64), np.asarray(p, np.float64), np.asarray(g, np.int64)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood of labels ``y`` under P(PD) ``p`` (scikit-learn)."""
    from sklearn.metrics import log_loss as sk_log_loss

    return float(sk_log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]))


def selection_table(
    rows: Mapping[int, Rows], scales: Mapping[int, float] | None = None
) -> dict[str, dict[str, float | None]]:
    """Per candidate: cross-fitted log loss, ECE and Brier on the pooled rows."""
    y, p, g = _pooled_arrays(rows, scales)
    table: dict[str, dict[str, float | None]] = {}
    for method in CANDIDATES:
        q = cross_fitted(method, y, p, g)
        table[method] = {
            "logloss_crossfit": log_loss(y, q),
            "ece_crossfit": expected_calibration_error(y, q),
            "brier_crossfit": brier_score(y, q),
        }
    return table


def choose(table: Mapping[str, Mapping[str, float | None]]) -> str:
    """The candidate with the lowest cross-fitted log loss (then Brier, then CANDIDATES
    order)."""
    ok = [m for m in CANDIDATES if table.get(m, {}).get("logloss_crossfit") is not None]
    key: Callable[[str], tuple[float, float, int]] = lambda m: (  # noqa: E731
        round(float(table[m]["logloss_crossfit"]), 12),  # type: ignore[arg-type]
        float(table[m]["brier_crossfit"]),  # type: ignore[arg-type]
        CANDIDATES.index(m),
    )
    return min(ok, key=key) if ok else "identity"


def fold_scales(logit_sd: Mapping[int, float]) -> dict[int, float]:
    """Per fold: the geometric mean of the folds' logit sds over this fold's (product 1).

    Raises
    ------
    ValueError: an sd that is not a positive finite number.
    """
    sd = np.array([float(v) for v in logit_sd.values()])
    if sd.size == 0 or not np.all(np.isfinite(sd) & (sd > 0)):
        raise ValueError(f"fold logit sds must be positive, got {dict(logit_sd)}")
    centre = float(np.exp(np.log(sd).mean()))
    return {int(k): centre / float(v) for k, v in logit_sd.items()}


def fit_pooled(
    rows: Mapping[int, Rows],
    method: str | None = None,
    scales: Mapping[int, float] | None = None,
    scales_from: str = "",
) -> dict[int, Calibration]:
    """One map fitted on the out-of-fold rows of all folds, as each fold's :class:`Calibration`.

    ``method``: one of CANDIDATES, ``auto``, or None for DEFAULT_METHOD (the identity, with the
    reason, where it cannot be fitted). ``scales``: per-fold multipliers of the raw logit
    applied first (:func:`fold_scales`; all 1 when None), measured on ``scales_from`` (recorded
    in the note).

    Raises
    ------
    InputDataError: no rows, or an explicit ``method`` that cannot be fitted on them.
    """
    lenient = method in (None, "auto")
    method = DEFAULT_METHOD if method is None else method
    if scales is not None and set(scales) != set(rows):
        raise InputDataError(f"logit scales for folds {sorted(scales)}, rows of {sorted(rows)}")
    y, p, _ = _pooled_arrays(rows, scales)
    if len(y) == 0:
        raise InputDataError("no out-of-fold rows to calibrate on")
    if method != "auto" and method not in CANDIDATES:
        raise InputDataError(f"unknown calibration method {method!r}; choose from {CANDIDATES}")
    table = selection_table(rows, scales)
    chosen = choose(table) if method == "auto" else method
    note = f"chosen by cross-fitted log loss over {len(rows)} folds" if method == "auto" else ""
    try:
        fitted = fit_map(chosen, y, p)
    except ValueError as e:
        if not lenient:
            raise InputDataError(f"cannot fit {method} calibration: {e}") from e
        fitted, note = fit_map("identity", y, p), f"not fitted: {e}"
    after = fitted.apply(p)
    p = _pooled_arrays(rows)[1]  # "before": the raw P(PD), not yet on the common scale
    if scales is not None:
        sc = ", ".join(f"fold {k}: x{scales[k]:.3f}" for k in sorted(scales))
        note = "; ".join(
            filter(None, [note, f"logits on a common scale ({sc}) from {scales_from}"])
        )
    folds = sorted(rows)
    provenance = dict(
        n_cases=len(y),
        fitted_on=f"pooled oof.csv of folds {folds} ({len(y)} cases)",
        ece_before=expected_calibration_error(y, p),
        ece_after=expected_calibration_error(y, after),
        brier_before=brier_score(y, p),
        brier_after=brier_score(y, after),
        note=note,
        scope="pooled",
        n_bins=N_BINS,
        selection=table,
    )
    return {
        k: Calibration(
            fold=k,
            method=fitted.method,
            temperature=fitted.temperature,
            intercept=fitted.intercept,
            knots_x=fitted.knots_x,
            knots_y=fitted.knots_y,
            scale=1.0 if scales is None else float(scales[k]),
            **provenance,  # type: ignore[arg-type]
        )
        for k in folds
    }


def bundle_scales(
    root: str | os.PathLike, folds: Sequence[int]
) -> tuple[dict[int, float] | None, str]:
    """Per-fold logit scales from the bundle's ensemble calibration record, and where they
    were measured; ``(None, "")`` when the record is absent, stale, or has no fold sds."""
    ens, _ = bundle_ensemble_calibration(root, folds)
    if ens is None or not all(str(k) in ens.fold_logit_sd for k in folds):
        return None, ""
    where = f"their logit sd on {ens.n_cases} unseen cases ({ens.fitted_on})"
    return fold_scales({k: ens.fold_logit_sd[str(k)] for k in folds}), where


def calibrate_bundle(root: str | os.PathLike, method: str | None = None) -> dict[int, Calibration]:
    """Fit and write ``calibration.json`` for every fold of the bundle (each needs ``oof.csv``).

    ``method``: None (DEFAULT_METHOD) / ``auto`` / ``identity`` / ``temperature`` / ``platt`` /
    ``isotonic`` fit one map on the pooled out-of-fold rows, on the common logit scale when
    the bundle's ensemble calibration measured it (:func:`bundle_scales`);
    ``fold-temperature`` fits one temperature per fold on that fold's rows (the older scheme).
    """
    folds = bundle_fold_dirs(root)
    rows = {k: read_oof_rows(d / "oof.csv") for k, d in folds.items()}  # all read before writing
    if method == "fold-temperature":
        return {k: calibrate_fold_dir(folds[k], rows[k], k) for k in sorted(folds)}
    scales, where = bundle_scales(root, sorted(folds))
    cals = fit_pooled(rows, method, scales, where)
    for k, cal in cals.items():
        write_calibration(folds[k], cal)
    return cals
