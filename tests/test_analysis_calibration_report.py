"""The report's calibration and uncertainty section (uncalibrated and calibrated bundles)."""

from __future__ import annotations

import json
import re

import numpy as np

from mrn_engine.analysis import write_report
from mrn_engine.analysis.calibration_report import held_out_set
from mrn_engine.training.calibration import (
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    read_calibration,
)
from mrn_engine.training.calibration_pooled import calibrate_bundle
from mrn_engine.training.ensemble_calibration import (
    bundle_ensemble_calibration,
    fit_ensemble_calibration,
    write_ensemble_calibration,
)
from test_analysis_report import held_out_rows, make_run_dir


def _cells(text: str, first: str) -> list[str]:
    row = re.search(rf"<tr><td>{re.escape(first)}</td>(.*?)</tr>", text)
    assert row, first
    return re.findall(r"<td>([^<]*)</td>", row.group(1))


def test_uncalibrated_bundle_says_so(tmp_path):
    run = make_run_dir(tmp_path / "run")
    text = write_report(run, tmp_path / "r.html", eval_predictions=held_out_rows()).read_text()
    assert "This bundle is uncalibrated" in text and "mrn calibrate" in text
    cells = _cells(text, "held-out")
    assert cells[2] == "n/a"  # no calibrated ECE
    assert 'alt="reliability"' in text


def test_calibrated_bundle_before_after_and_uncertainty(tmp_path):
    run = make_run_dir(tmp_path / "run", n_val=12)
    for d in run.glob("fold_*"):
        (d / "model.safetensors").write_bytes(b"")
    calibrate_bundle(run, "fold-temperature")
    rows = held_out_rows(12)
    text = write_report(run, tmp_path / "r.html", eval_predictions=rows).read_text()
    assert "Per-fold temperature scaling" in text and "fold 0: temperature" in text
    cals = {k: read_calibration(run / f"fold_{k}") for k in (0, 1)}
    name, y, raw, after = held_out_set(rows, cals)
    expected = [(r["p_pd_fold0"] + r["p_pd_fold1"]) / 2 for r in rows]
    assert raw.tolist() == expected
    manual = [
        (float(cals[0].apply(r["p_pd_fold0"])) + float(cals[1].apply(r["p_pd_fold1"]))) / 2
        for r in rows
    ]
    assert after.tolist() == manual
    cells = _cells(text, "held-out")
    assert cells[0] == "12"
    assert cells[1] == f"{expected_calibration_error(y, raw):.3f}"
    assert cells[2] == f"{expected_calibration_error(y, after):.3f}"
    floor, floor95 = ece_noise_floor(after)
    assert cells[3] == f"{floor:.3f}" and cells[4] == f"{floor95:.3f}"
    assert float(cells[3]) > 0.05  # 12 cases: ECE is mostly sampling noise
    assert cells[6] == f"{brier_score(y, after):.3f}"
    unc = _cells(text, "held-out (ensemble: all three criteria)")
    assert unc[0] == "12" and int(unc[1]) > 0  # the fabricated fold-1 values sit near 0.5


def test_rows_of_a_calibrated_predictor_are_taken_as_they_are():
    rows = [
        {"label": 1, "p_pd": 0.7, "p_pd_raw": 0.9, "calibrated": True, "p_pd_fold0": 0.7},
        {"label": 0, "p_pd": 0.2, "p_pd_raw": 0.05, "calibrated": True, "p_pd_fold0": 0.2},
    ]
    _, y, raw, after = held_out_set(rows, {})
    assert raw.tolist() == [0.9, 0.05] and after.tolist() == [0.7, 0.2]


def test_pooled_calibration_is_named_with_its_selection(tmp_path):
    run = make_run_dir(tmp_path / "run", n_val=12)
    for d in run.glob("fold_*"):
        (d / "model.safetensors").write_bytes(b"")
    cals = calibrate_bundle(run, "platt")
    text = write_report(run, tmp_path / "r.html", eval_predictions=held_out_rows(12)).read_text()
    assert "One Platt (slope" in text and "pooled oof.csv of folds [0, 1] (24 cases)" in text
    sel = cals[0].selection["identity"]
    assert f"identity {sel['logloss_crossfit']:.3f} / {sel['ece_crossfit']:.3f}" in text
    assert "15 equal-width bins" in text and "Per-fold temperature" not in text


def test_report_names_the_ensemble_calibration(tmp_path):
    """With BUNDLE/ensemble_calibration.json the report says rho, the cases and the factor."""
    import numpy as np

    from mrn_engine.training.ensemble_calibration import (
        fit_ensemble_calibration,
        write_ensemble_calibration,
    )

    run = make_run_dir(tmp_path / "run", n_val=12)
    for d in run.glob("fold_*"):
        (d / "model.safetensors").write_bytes(b"")
    calibrate_bundle(run, "fold-temperature")
    rng = np.random.default_rng(0)
    s = rng.normal(0, 1, 20)
    p = 1 / (1 + np.exp(-(s[:, None] + rng.normal(0, 1, (20, 2)))))
    ens = fit_ensemble_calibration(p, [0, 1], "unseen-cases")
    text = write_report(run, tmp_path / "a.html", eval_predictions=held_out_rows(12)).read_text()
    assert "Ensemble calibration" not in text
    write_ensemble_calibration(run, ens)
    text = write_report(run, tmp_path / "b.html", eval_predictions=held_out_rows(12)).read_text()
    assert f"rho = {ens.rho_measured:.2f} on 20 unseen cases (unseen-cases)" in text
    assert f"x {ens.factor(2):.2f}" in text


def test_raw_rows_are_combined_with_the_bundles_ensemble_calibration(tmp_path):
    run = make_run_dir(tmp_path / "run", n_val=12)
    for d in run.glob("fold_*"):
        (d / "model.safetensors").write_bytes(b"")
    calibrate_bundle(run, "fold-temperature")
    rng = np.random.default_rng(3)
    ens = fit_ensemble_calibration(
        rng.uniform(0.1, 0.9, (12, 2)), [0, 1], "unseen", {"fold_0": "w0", "fold_1": "w1"}
    )
    write_ensemble_calibration(run, ens)
    (run / "bundle.json").write_text(json.dumps({"weights": {"fold_0": "w0", "fold_1": "w1"}}))
    rows = held_out_rows(12)
    cals = {k: read_calibration(run / f"fold_{k}") for k in (0, 1)}
    assert bundle_ensemble_calibration(run, [0, 1]) == (ens, "")
    _, y, _, after = held_out_set(rows, cals, ens)
    fold_p = [[float(cals[k].apply(r[f"p_pd_fold{k}"])) for k in (0, 1)] for r in rows]
    assert after.tolist() == [ens.combine(p) for p in fold_p]
    assert ens.factor(2) > 1.0 and not np.allclose(after, np.mean(fold_p, axis=1))
    text = write_report(run, tmp_path / "r.html", eval_predictions=rows).read_text()
    assert _cells(text, "held-out")[2] == f"{expected_calibration_error(y, after):.3f}"
    assert "Ensemble calibration: the fold logits correlate" in text
    # a retrained fold voids the record: the report falls back to the plain mean and says nothing
    (run / "bundle.json").write_text(json.dumps({"weights": {"fold_0": "w0", "fold_1": "new"}}))
    voided, why = bundle_ensemble_calibration(run, [0, 1])
    assert voided is None and "retrained" in why
    text = write_report(run, tmp_path / "r2.html", eval_predictions=rows).read_text()
    plain = np.mean(fold_p, axis=1)
    assert _cells(text, "held-out")[2] == f"{expected_calibration_error(y, plain):.3f}"
    assert "Ensemble calibration" not in text
