"""Ensemble calibration: the sharpening factor, its fit on unseen cases, the record file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from mrn_engine.errors import InputDataError
from mrn_engine.training.calibration import expected_calibration_error, logit
from mrn_engine.training.ensemble_calibration import (
    ENSEMBLE_FILE,
    RHO_MIN,
    fit_ensemble_calibration,
    read_ensemble_calibration,
    sharpening_factor,
    usable_for,
    write_ensemble_calibration,
)


def test_sharpening_factor_limits() -> None:
    assert sharpening_factor(0.3, 1) == 1.0  # one model: nothing to sharpen
    assert sharpening_factor(1.0, 5) == pytest.approx(1.0)  # identical models
    assert sharpening_factor(0.0, 5) == pytest.approx(1 / (RHO_MIN + (1 - RHO_MIN) / 5))
    assert sharpening_factor(0.3, 3) == pytest.approx(1 / (0.3 + 0.7 / 3))
    assert sharpening_factor(0.3, 5) > sharpening_factor(0.3, 3) > 1
    with pytest.raises(ValueError):
        sharpening_factor(0.3, 0)


def simulated_folds(n: int, k: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels from a shared signal; each fold model sees it through its own noise, and is
    calibrated (its own Platt fit on 20 000 cases, as out-of-fold calibration would be)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, 1.5, n)
    y = rng.binomial(1, 1 / (1 + np.exp(-s)))
    z = s[:, None] + rng.normal(0, noise, (n, k))
    big_s = rng.normal(0, 1.5, 20_000)
    big_y = rng.binomial(1, 1 / (1 + np.exp(-big_s)))
    p = np.empty_like(z)
    for j in range(k):
        zj = big_s + rng.normal(0, noise, big_s.size)
        lr = LogisticRegression(C=1e6).fit(zj[:, None], big_y)
        p[:, j] = lr.predict_proba(z[:, [j]])[:, 1]
    return y, p


def test_sharpening_makes_the_mean_of_calibrated_folds_calibrated() -> None:
    """Mean of calibrated fold probabilities: underconfident (slope > 1.3, high ECE); the
    ensemble calibration measured on 60 *unlabelled* cases brings the slope near 1."""
    _, p_unseen = simulated_folds(60, 5, noise=2.0, seed=1)
    cal = fit_ensemble_calibration(p_unseen, [0, 1, 2, 3, 4], "simulated")
    assert 0.15 < cal.rho_measured < 0.55  # Var(s) / (Var(s) + Var(e)) = 2.25 / 6.25 = 0.36
    y, p = simulated_folds(20_000, 5, noise=2.0, seed=2)

    def slope(q: np.ndarray) -> float:
        return float(LogisticRegression(C=1e6).fit(logit(q)[:, None], y).coef_[0, 0])

    plain = p.mean(axis=1)
    sharp = np.array([cal.combine(row) for row in p])
    assert slope(plain) > 1.3
    assert 0.85 < slope(sharp) < 1.15
    assert expected_calibration_error(y, sharp) < 0.5 * expected_calibration_error(y, plain)
    assert np.array_equal(sharp >= 0.5, logit(p).mean(axis=1) >= 0)  # calls of the mean logit
    assert cal.combine(p[0, :1]) == pytest.approx(p[0, 0])  # one fold: unchanged


def test_fit_refuses_too_few_cases_or_a_constant_fold() -> None:
    _, p = simulated_folds(30, 3, noise=1.0, seed=3)
    with pytest.raises(ValueError, match=">= 10 unseen"):
        fit_ensemble_calibration(p[:5], [0, 1, 2], "x")
    with pytest.raises(ValueError, match="2 folds"):
        fit_ensemble_calibration(p[:, :1], [0], "x")
    p[:, 1] = 0.4
    with pytest.raises(ValueError, match="same P\\(PD\\)"):
        fit_ensemble_calibration(p, [0, 1, 2], "x")


def test_record_round_trip_and_when_it_applies(tmp_path) -> None:
    _, p = simulated_folds(30, 3, noise=1.0, seed=4)
    weights = {"fold_0": "a", "fold_1": "b", "fold_2": "c"}
    cal = fit_ensemble_calibration(p, [0, 1, 2], "somewhere", weights)
    assert read_ensemble_calibration(tmp_path) is None
    write_ensemble_calibration(tmp_path, cal)
    assert read_ensemble_calibration(tmp_path) == cal
    assert usable_for(cal, [0, 2], weights) == (cal, "")
    assert usable_for(cal, [0, 3], weights)[0] is None
    none, why = usable_for(cal, [0, 1, 2], {**weights, "fold_1": "retrained"})
    assert none is None and "fold(s) [1] retrained" in why
    data = json.loads((tmp_path / ENSEMBLE_FILE).read_text())
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps({**data, "rho": 3.0}))
    with pytest.raises(InputDataError, match="rho 3.0"):
        read_ensemble_calibration(tmp_path)
    (tmp_path / ENSEMBLE_FILE).write_text("{not json")
    with pytest.raises(InputDataError, match=ENSEMBLE_FILE):
        read_ensemble_calibration(tmp_path)
