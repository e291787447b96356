"""Per-fold temperature scaling: fit, provenance file, predictor use, old bundles, CLI."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from mrn_engine.errors import InputDataError, MRNWarning
from mrn_engine.training.calibration import (
    CALIBRATION_FILE,
    Calibration,
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    fit_fold_calibration,
    fit_logistic,
    load_calibrations,
    read_calibration,
)
from mrn_engine.training.calibration_pooled import calibrate_bundle


def cohort(n: int, sharpness: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the true P(PD) = sigmoid(z); the 'model' reports sigmoid(sharpness z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return y, 1 / (1 + np.exp(-sharpness * z))


@pytest.mark.parametrize("sharpness", [4.0, 0.3])
def test_temperature_lowers_held_out_ece_of_a_miscalibrated_model(sharpness):
    y_test, p_test = cohort(4000, sharpness, seed=99)  # held-out cases
    raw_ece = expected_calibration_error(y_test, p_test)
    assert raw_ece > 0.08  # genuinely miscalibrated
    for fold in range(3):  # each fold: its own out-of-fold cases
        y, p = cohort(120, sharpness, seed=fold)
        cal = fit_fold_calibration(
            [{"label": a, "p_pd": b} for a, b in zip(y, p, strict=True)], fold, "oof"
        )
        assert cal.method == "temperature" and cal.n_cases == 120
        # overconfident -> T > 1, underconfident -> T < 1, near the true factor
        assert cal.temperature == pytest.approx(sharpness, rel=0.45)
        after = cal.apply(p_test)
        assert expected_calibration_error(y_test, after) < raw_ece / 2
        assert brier_score(y_test, after) < brier_score(y_test, p_test)
        assert cal.ece_after < cal.ece_before
        assert np.all(np.diff(after[np.argsort(p_test)]) >= 0)  # monotone: ranking (AUC) kept


def test_ece_matches_definition():
    y = [0, 0, 1, 1]
    p = [0.05, 0.35, 0.65, 0.95]  # bins 0, 3, 6, 9: |0-0.05|,|0-0.35|,|1-0.65|,|1-0.95|
    assert expected_calibration_error(y, p) == pytest.approx((0.05 + 0.35 + 0.35 + 0.05) / 4)
    assert brier_score(y, p) == pytest.approx((0.05**2 + 0.35**2 + 0.35**2 + 0.05**2) / 4)


def test_unfittable_fold_gets_identity_with_reason(tmp_path):
    rows = [{"label": 1, "p_pd": 0.9}] * 5
    cal = fit_fold_calibration(rows, 2, "fold_2/oof.csv")
    assert cal.method == "identity" and "each class" in cal.note
    np.testing.assert_allclose(cal.apply([0.2, 0.9]), [0.2, 0.9])
    # anti-correlated probabilities: no positive temperature
    rows = [{"label": i % 2, "p_pd": 0.8 if i % 2 == 0 else 0.2} for i in range(12)]
    assert fit_fold_calibration(rows, 0, "x").method == "identity"


def write_bundle(root, n_folds=2, sharp=4.0):
    for k in range(n_folds):
        d = root / f"fold_{k}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
        y, p = cohort(60, sharp, seed=10 + k)
        lines = ["case_id,label,p_pd,fold"] + [
            f"c{k}_{i},{a},{b},{k}" for i, (a, b) in enumerate(zip(y, p, strict=True))
        ]
        (d / "oof.csv").write_text("\n".join(lines) + "\n")
    return root


def test_calibrate_bundle_writes_provenance_and_loads(tmp_path):
    root = write_bundle(tmp_path / "bundle")
    assert load_calibrations(root, [0, 1]) == {}  # old bundle: uncalibrated
    cals = calibrate_bundle(root, "fold-temperature")
    assert sorted(cals) == [0, 1]
    data = json.loads((root / "fold_1" / CALIBRATION_FILE).read_text())
    assert data["method"] == "temperature" and data["n_cases"] == 60
    assert data["fitted_on"] == "fold_1/oof.csv" and data["temperature"] > 1
    assert {"ece_before", "ece_after", "brier_before", "brier_after", "created"} <= set(data)
    assert read_calibration(root / "fold_1") == cals[1]
    assert load_calibrations(root, [0, 1]) == cals
    (root / "fold_0" / CALIBRATION_FILE).unlink()
    with pytest.warns(MRNWarning, match="uncalibrated"):
        assert load_calibrations(root, [0, 1]) == {}
    (root / "fold_0" / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(InputDataError, match="fold_0/calibration.json"):
        read_calibration(root / "fold_0")


def test_calibrate_bundle_errors_before_writing(tmp_path):
    root = write_bundle(tmp_path / "b")
    (root / "fold_1" / "oof.csv").write_text("case_id,label,p_pd\nx,1,notanumber\n")
    with pytest.raises(InputDataError, match="fold_1/oof.csv"):
        calibrate_bundle(root)
    assert not (root / "fold_0" / CALIBRATION_FILE).exists()  # no partial output
    with pytest.raises(InputDataError, match="not a model bundle"):
        calibrate_bundle(tmp_path)


def test_predictor_returns_calibrated_and_keeps_raw(tmp_path):
    from mrn_engine.data import load_case
    from test_inference_predictor import fake_predictor, write_case

    case = load_case(write_case(tmp_path / "case"))
    cals = {
        0: Calibration(0, "temperature", 3.0, 10, "x", 0, 0, 0, 0),
        1: Calibration(1, "temperature", 0.5, 10, "x", 0, 0, 0, 0),
    }
    raw = fake_predictor(tta=True)
    calibrated = fake_predictor(tta=True, calibration=cals)
    assert not raw.calibrated and calibrated.calibrated
    a, b = raw.predict_case(case), calibrated.predict_case(case)
    assert not a.calibrated and a.p_pd_folds == a.p_pd_folds_raw
    assert b.calibrated and b.p_pd_folds_raw == pytest.approx(a.p_pd_folds)
    expected = [float(cals[k].apply(p)) for k, p in zip(b.folds, b.p_pd_folds_raw, strict=True)]
    assert b.p_pd_folds == pytest.approx(expected)
    assert b.p_pd == pytest.approx(np.mean(expected)) and b.p_pd_raw == pytest.approx(a.p_pd)
    assert b.p_pd != pytest.approx(b.p_pd_raw)
    assert len(b.tta_spread) == 2 and all(s >= 0 for s in b.tta_spread)
    row = b.summary()
    assert row["calibrated"] is True and row["p_pd_raw"] == pytest.approx(a.p_pd)
    m_raw = raw.masked_prediction(a, ["qsm_bg"])
    m_cal = calibrated.masked_prediction(b, ["qsm_bg"])
    assert m_cal.p_pd_folds == pytest.approx(
        [float(cals[k].apply(p)) for k, p in zip(b.folds, m_raw.p_pd_folds, strict=True)]
    )


def test_cli_calibrate(tmp_path):
    from mrn_engine.cli import cli

    root = write_bundle(tmp_path / "bundle")
    res = CliRunner().invoke(cli, ["calibrate", str(root), "--method", "fold-temperature"])
    assert res.exit_code == 0, res.output
    assert "fold 0" in res.output and "fold 1" in res.output and "T =" in res.output
    res = CliRunner().invoke(cli, ["calibrate", str(root)])
    assert res.exit_code == 0, res.output
    assert "pooled cases" in res.output and "cross-fitted" in res.output and "15 bins" in res.output
    assert "folds [0, 1]:" in res.output
    assert (root / "fold_0" / CALIBRATION_FILE).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(load_calibrations(root, [0, 1])) == [0, 1]


def shifted_rows(n_folds: int, n: int, shift: float, seed: int) -> dict[int, list[dict]]:
    """Out-of-fold rows of a model whose logit is the true one plus ``shift`` (a moved threshold)."""
    rows = {}
    for k in range(n_folds):
        rng = np.random.default_rng(seed + k)
        z = rng.normal(0.0, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        p = 1 / (1 + np.exp(-(z + shift)))
        rows[k] = [{"label": int(a), "p_pd": float(b)} for a, b in zip(y, p, strict=True)]
    return rows


def test_pooled_platt_removes_a_shifted_threshold_temperature_cannot():
    from mrn_engine.training.calibration_pooled import fit_pooled

    rows = shifted_rows(3, 80, shift=1.5, seed=3)
    rng = np.random.default_rng(77)  # held-out cases of the same model
    z = rng.normal(0.0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    p = 1 / (1 + np.exp(-(z + 1.5)))
    raw = expected_calibration_error(y, p)
    platt = fit_pooled(rows, "platt")
    temp = fit_pooled(rows, "temperature")
    assert sorted(platt) == [0, 1, 2] and platt[0] == replace(platt[2], fold=0)  # one map
    assert platt[1].scope == "pooled" and platt[1].n_cases == 240
    assert platt[1].intercept == pytest.approx(-1.5, abs=0.5)
    assert expected_calibration_error(y, platt[0].apply(p)) < raw / 3
    assert expected_calibration_error(y, platt[0].apply(p)) < expected_calibration_error(
        y, temp[0].apply(p)
    )
    auto = fit_pooled(rows, "auto")[0]
    assert auto.method in ("platt", "isotonic") and "cross-fitted" in auto.note
    sel = auto.selection
    assert sel["platt"]["ece_crossfit"] < sel["identity"]["ece_crossfit"]
    assert sel["platt"]["logloss_crossfit"] < sel["identity"]["logloss_crossfit"]


def test_pooled_isotonic_round_trip_matches_sklearn(tmp_path):
    from sklearn.isotonic import IsotonicRegression

    from mrn_engine.training.calibration import write_calibration
    from mrn_engine.training.calibration_pooled import fit_pooled

    rows = shifted_rows(2, 50, shift=-1.0, seed=5)
    cal = fit_pooled(rows, "isotonic")[1]
    write_calibration(tmp_path, cal)
    back = read_calibration(tmp_path)
    assert back == cal and back.method == "isotonic" and len(back.knots_x) >= 2
    y = [r["label"] for k in (0, 1) for r in rows[k]]
    p = [r["p_pd"] for k in (0, 1) for r in rows[k]]
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y)
    q = np.linspace(0, 1, 101)
    np.testing.assert_allclose(back.apply(q), iso.predict(q), atol=1e-12)
    bad = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    bad["knots_y"] = bad["knots_y"][::-1]  # decreasing: not a calibration map
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(bad))
    with pytest.raises(InputDataError, match="increasing"):
        read_calibration(tmp_path)


def test_legacy_calibration_file_loads(tmp_path):
    legacy = {  # a file written before the pooled maps (no intercept / knots / scope)
        "fold": 0, "method": "temperature", "temperature": 2.0, "n_cases": 24,
        "fitted_on": "fold_0/oof.csv", "ece_before": 0.1, "ece_after": 0.05,
        "brier_before": 0.2, "brier_after": 0.19, "note": "", "created": "2026-11-30T07:07:54+00:00",
    }  # fmt: skip
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(legacy))
    cal = read_calibration(tmp_path)
    assert cal.scope == "fold" and cal.intercept == 0.0
    assert float(cal.apply(0.8)) == pytest.approx(1 / (1 + np.exp(-np.log(4) / 2)))


def test_pooled_errors_are_clear(tmp_path):
    from mrn_engine.training.calibration_pooled import fit_pooled

    with pytest.raises(InputDataError, match="no out-of-fold rows"):
        fit_pooled({0: []})
    one_class = {0: [{"label": 1, "p_pd": 0.7}] * 6}
    with pytest.raises(InputDataError, match="cannot fit platt"):
        fit_pooled(one_class, "platt")
    fallback = fit_pooled(one_class)[0]  # the default falls back to the identity, with why
    assert fallback.method == "identity" and "not fitted" in fallback.note
    assert fit_pooled(one_class, "auto")[0].method == "identity"
    with pytest.raises(InputDataError, match="cannot fit temperature"):
        fit_pooled(one_class, "temperature")
    root = write_bundle(tmp_path / "b")
    (root / "fold_1" / "oof.csv").write_text("case_id,label,p_pd\nx,1,1.5\n")
    with pytest.raises(InputDataError, match="not a probability"):
        calibrate_bundle(root)


def test_ece_noise_floor_shrinks_with_cases_and_bounds_a_calibrated_model() -> None:
    """A perfectly calibrated model's ECE is large on 60 cases and small on 5000: the floor
    says so, and a calibrated sample's ECE falls under its 95th percentile."""
    rng = np.random.default_rng(3)
    small = rng.uniform(0.2, 0.8, 60)
    large = rng.uniform(0.2, 0.8, 5000)
    mean_small, p95_small = ece_noise_floor(small, draws=200)
    mean_large, _ = ece_noise_floor(large, draws=50)
    assert 0.08 < mean_small < 0.25 and p95_small > mean_small
    assert mean_large < 0.03
    inside = 0
    for seed in range(20):
        y = np.random.default_rng(100 + seed).binomial(1, small)
        inside += expected_calibration_error(y, small) <= p95_small
    assert inside >= 16  # about 95 % of calibrated samples
    # a badly overconfident model on many cases is far above its floor
    y = rng.binomial(1, large)
    sharp = 1 / (1 + np.exp(-4 * np.log(large / (1 - large))))
    assert expected_calibration_error(y, sharp) > 5 * ece_noise_floor(sharp, draws=50)[1]
    assert all(np.isnan(ece_noise_floor([])))


def test_fit_logistic_is_scale_free_and_finite_on_separable_cases() -> None:
    """Firth fit: small logits get a proportionally larger slope (an L2 penalty shrank it),
    the true slope is recovered on many cases, and a separable set stays finite."""
    rng = np.random.default_rng(5)
    z = rng.normal(0, 1.0, 4000)
    y = rng.binomial(1, 1 / (1 + np.exp(-(2.0 * z - 0.5))))
    a, b = fit_logistic(z, y, intercept=True)
    assert a == pytest.approx(2.0, rel=0.1) and b == pytest.approx(-0.5, abs=0.15)
    a_small, b_small = fit_logistic(0.1 * z[:72], y[:72], intercept=True)
    a_unit, b_unit = fit_logistic(z[:72], y[:72], intercept=True)
    assert a_small == pytest.approx(10 * a_unit, rel=1e-3) and b_small == pytest.approx(
        b_unit, abs=1e-3
    )
    sep = np.array([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
    a_sep, _ = fit_logistic(sep, np.array([0, 0, 0, 1, 1, 1]), intercept=False)
    assert 0.3 < a_sep < 10.0  # Firth: finite


def test_fit_logistic_slope_is_unbiased_on_a_few_dozen_cases() -> None:
    """On 72 cases of a calibrated model the fitted slope is right on average (Platt's smoothed
    targets, used before, gave a median of about 0.92: an underconfident temperature)."""
    rng = np.random.default_rng(11)
    slopes = []
    for _ in range(200):
        z = rng.normal(0.0, 1.5, 72)
        y = rng.binomial(1, 1 / (1 + np.exp(-z)))
        slopes.append(fit_logistic(z, y, intercept=False)[0])
    assert 0.96 <= float(np.median(slopes)) <= 1.05
    assert 0.96 <= float(np.mean(slopes)) <= 1.05
