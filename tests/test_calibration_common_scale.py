"""Pooled calibration on a common logit scale: fold models that spread their logits differently
get one map after each fold's logits are rescaled by its sd on the same unseen cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from mrn_engine.errors import InputDataError
from mrn_engine.training.calibration import (
    CALIBRATION_FILE,
    logit,
    read_calibration,
    read_oof_rows,
    write_calibration,
)
from mrn_engine.training.calibration_pooled import (
    bundle_scales,
    calibrate_bundle,
    fit_pooled,
    fold_scales,
    log_loss,
)
from mrn_engine.training.ensemble_calibration import (
    ENSEMBLE_FILE,
    fit_ensemble_calibration,
    read_ensemble_calibration,
    write_ensemble_calibration,
)

#: fold k reports its logit as SPREAD[k] x the true logit: fold 2 is compressed, as in the
#: 2026-12-01 demo bundles (one fold's logit sd about half the others')
SPREAD = (1.0, 1.0, 0.4)


def true_cases(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    return (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int), z


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def oof_rows(n: int, seed: int) -> dict[int, list[dict]]:
    rows = {}
    for k, c in enumerate(SPREAD):
        y, z = true_cases(n, seed + k)
        rows[k] = [
            {"label": int(a), "p_pd": float(b)} for a, b in zip(y, sigmoid(c * z), strict=True)
        ]
    return rows


def unseen_fold_p(n: int, seed: int) -> np.ndarray:
    """Raw fold P(PD) (cases x folds) of unlabelled cases: every fold sees the same cases."""
    _, z = true_cases(n, seed)
    return np.column_stack([sigmoid(c * z) for c in SPREAD])


def slope(y: np.ndarray, p: np.ndarray) -> float:
    return float(LogisticRegression(C=1e6).fit(logit(p)[:, None], y).coef_[0, 0])


def test_fold_scales_are_relative_to_the_geometric_mean() -> None:
    s = fold_scales({0: 1.0, 1: 1.0, 2: 0.5})
    assert np.prod(list(s.values())) == pytest.approx(1.0)
    assert s[2] == pytest.approx(2 * s[0]) and s[0] == pytest.approx(0.5 ** (1 / 3))
    for bad in ({0: 1.0, 1: 0.0}, {0: 1.0, 1: float("nan")}, {}):
        with pytest.raises(ValueError, match="positive"):
            fold_scales(bad)


def test_one_map_fits_every_fold_only_on_the_common_scale() -> None:
    """Without the scales the pooled temperature leaves the compressed fold underconfident
    (slope > 1.5 on its held-out cases) and the others overconfident; with the sds of 40
    unlabelled cases every fold's calibrated slope is near 1 and the log loss drops."""
    rows = oof_rows(200, seed=10)
    ens = fit_ensemble_calibration(unseen_fold_p(40, seed=20), [0, 1, 2], "unlabelled")
    scales = fold_scales({k: ens.fold_logit_sd[str(k)] for k in range(3)})
    assert scales[2] == pytest.approx(scales[0] / 0.4, rel=1e-6)  # the same cases: exact ratio
    plain = fit_pooled(rows, "temperature")
    common = fit_pooled(rows, "temperature", scales, "40 unlabelled cases")
    assert all(plain[k].scale == 1.0 for k in range(3))
    assert [common[k].scale for k in range(3)] == pytest.approx([scales[k] for k in range(3)])
    assert "common scale" in common[0].note and "40 unlabelled cases" in common[0].note
    y, z = true_cases(20_000, seed=30)  # held-out cases of each fold model
    for k, c in enumerate(SPREAD):
        p = sigmoid(c * z)
        assert 0.85 < slope(y, common[k].apply(p)) < 1.15
        assert log_loss(y, common[k].apply(p)) <= log_loss(y, plain[k].apply(p)) + 1e-4
    assert slope(y, plain[2].apply(sigmoid(SPREAD[2] * z))) > 1.5
    assert slope(y, plain[0].apply(sigmoid(SPREAD[0] * z))) < 0.92


def test_the_default_is_temperature_and_auto_chooses_by_cross_fitted_log_loss() -> None:
    rows = oof_rows(60, seed=40)
    default = fit_pooled(rows)[0]
    assert default.method == "temperature" and default.temperature != 1.0
    assert default.selection  # the cross-fitted table, for information
    cal = fit_pooled(rows, "auto")[0]
    table = cal.selection
    best = min(table, key=lambda m: table[m]["logloss_crossfit"])
    assert cal.method == best and "log loss" in cal.note
    assert all(
        {"logloss_crossfit", "ece_crossfit", "brier_crossfit"} <= set(r) for r in table.values()
    )


def test_scale_round_trips_and_a_bad_scale_is_refused(tmp_path) -> None:
    cal = fit_pooled(oof_rows(40, seed=50), "platt", {0: 0.8, 1: 0.8, 2: 1.5625}, "x")[2]
    write_calibration(tmp_path, cal)
    assert read_calibration(tmp_path) == cal
    q = np.linspace(0.01, 0.99, 9)
    np.testing.assert_allclose(
        cal.apply(q), sigmoid(1.5625 * logit(q) / cal.temperature + cal.intercept), atol=1e-12
    )
    data = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({**data, "scale": -1.0}))
    with pytest.raises(InputDataError, match="scale -1.0"):
        read_calibration(tmp_path)
    del data["scale"]  # a file from before the field: scale 1
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(data))
    assert read_calibration(tmp_path).scale == 1.0


def fake_bundle(root, rows) -> None:
    weights = {f"fold_{k}": f"hash{k}" for k in rows}
    (root / "bundle.json").write_text(json.dumps({"weights": weights}))
    for k, fold_rows in rows.items():
        d = root / f"fold_{k}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"")
        lines = ["case_id,label,p_pd,fold"]
        lines += [f"c{k}_{i},{r['label']},{r['p_pd']},{k}" for i, r in enumerate(fold_rows)]
        (d / "oof.csv").write_text("\n".join(lines) + "\n")


def test_calibrate_bundle_uses_the_scales_of_a_current_ensemble_record(tmp_path) -> None:
    rows = oof_rows(60, seed=60)
    fake_bundle(tmp_path, rows)
    assert bundle_scales(tmp_path, [0, 1, 2]) == (None, "")
    assert all(c.scale == 1.0 for c in calibrate_bundle(tmp_path, "temperature").values())
    weights = json.loads((tmp_path / "bundle.json").read_text())["weights"]
    ens = fit_ensemble_calibration(unseen_fold_p(30, seed=70), [0, 1, 2], "CAL", weights)
    write_ensemble_calibration(tmp_path, ens)
    assert read_ensemble_calibration(tmp_path) == ens
    scales, where = bundle_scales(tmp_path, [0, 1, 2])
    assert scales is not None and "30 unseen cases (CAL)" in where
    cals = calibrate_bundle(tmp_path, "temperature")
    assert [cals[k].scale for k in range(3)] == pytest.approx([scales[k] for k in range(3)])
    assert read_calibration(tmp_path / "fold_2") == cals[2]
    assert read_oof_rows(tmp_path / "fold_0" / "oof.csv")  # inputs untouched
    # a retrained fold voids the record, and with it the scales
    info = {"weights": {**weights, "fold_1": "retrained"}}
    (tmp_path / "bundle.json").write_text(json.dumps(info))
    assert bundle_scales(tmp_path, [0, 1, 2]) == (None, "")
    # a record from before the field has no sds: no scales
    data = json.loads((tmp_path / ENSEMBLE_FILE).read_text())
    del data["fold_logit_sd"]
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps(data))
    (tmp_path / "bundle.json").write_text(json.dumps({"weights": weights}))
    assert read_ensemble_calibration(tmp_path).fold_logit_sd == {}
    assert bundle_scales(tmp_path, [0, 1, 2]) == (None, "")
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps({**data, "fold_logit_sd": {"0": 0.0}}))
    with pytest.raises(InputDataError, match="sds must be positive"):
        read_ensemble_calibration(tmp_path)
