"""``docs/scripts/calibration_slope_noise.py`` on a synthetic bundle: per-fold and pooled slopes,
the bootstrap interval, and the ratio a pooled temperature would leave on the held-out set."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from docs_scripts import load_docs_script
from mrn_engine.training.calibration import fit_logistic


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _write_bundle(root: Path, rng: np.random.Generator, oof_stretch: float) -> Path:
    """Two folds whose out-of-fold logits are ``oof_stretch`` times wider than on held-out."""
    bundle = root / "bundle"
    y_big = np.repeat([0, 1], 200)
    big_rows = {i: {"case_id": f"H{i:03d}", "label": int(y_big[i])} for i in range(400)}
    for k in range(2):
        fold = bundle / f"fold_{k}"
        fold.mkdir(parents=True)
        y = np.repeat([0, 1], 60)
        z = 1.5 * (2 * y - 1) / 2 + rng.normal(0, 1, y.size)  # true slope 1.5 on this logit
        with (fold / "oof.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case_id", "label", "p_pd", "fold"])
            for i in range(y.size):
                w.writerow([f"F{k}_{i:03d}", y[i], _sigmoid(oof_stretch * z[i]), k])
        zb = 1.5 * (2 * y_big - 1) / 2 + rng.normal(0, 1, y_big.size)
        for i in range(400):
            big_rows[i][f"raw{k}"] = _sigmoid(zb[i])
    big = root / "big.csv"
    with big.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(big_rows[0]))
        w.writeheader()
        w.writerows(big_rows.values())
    return bundle


def _run(bundle: Path, big: Path, monkeypatch, capsys) -> str:
    argv = ["calibration_slope_noise.py", f"{bundle}={big}", "--resamples", "300"]
    monkeypatch.setattr(sys, "argv", argv)
    load_docs_script("calibration_slope_noise").main()
    return capsys.readouterr().out


def test_pooled_slope_interval_and_ratio(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(11)
    bundle = _write_bundle(tmp_path / "same", rng, oof_stretch=1.0)
    out = _run(bundle, tmp_path / "same" / "big.csv", monkeypatch, capsys)
    # the pooled slope is the Firth slope of all out-of-fold rows
    z, y = [], []
    for k in range(2):
        with (bundle / f"fold_{k}" / "oof.csv").open() as fh:
            for r in csv.DictReader(fh):
                p = float(r["p_pd"])
                z.append(np.log(p / (1 - p)))
                y.append(int(r["label"]))
    expected = fit_logistic(np.array(z), np.array(y), intercept=False)[0]
    m = re.search(r"pooled out-of-fold slope ([\d.]+) \[95 %: ([\d.]+), ([\d.]+)\]", out)
    assert m and abs(float(m.group(1)) - expected) <= 0.006
    assert float(m.group(2)) < expected < float(m.group(3))
    assert len(re.findall(r"fold \d: out-of-fold n 120", out)) == 2
    ratio = float(re.search(r"ratio ([\d.]+)", out).group(1))
    assert 0.75 < ratio < 1.33  # same logit scale out of fold and held out


def test_cohort_adds_the_oracle_auc_of_each_folds_cases(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(4)
    bundle = _write_bundle(tmp_path, rng, oof_stretch=1.0)
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    ids, labels = [], []
    for k in range(2):
        with (bundle / f"fold_{k}" / "oof.csv").open() as fh:
            for r in csv.DictReader(fh):
                ids.append(r["case_id"])
                labels.append(int(r["label"]))
    oracle = np.clip(np.array(labels) * 0.6 + rng.uniform(0, 0.4, len(ids)), 0, 1)
    with (cohort / "phantom_latents.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "oracle_p_pd"])
        w.writerows(zip(ids, oracle, strict=True))
    argv = ["calibration_slope_noise.py", f"{bundle}={tmp_path / 'big.csv'}={cohort}"]
    monkeypatch.setattr(sys, "argv", [*argv, "--resamples", "50"])
    load_docs_script("calibration_slope_noise").main()
    out = capsys.readouterr().out
    fold0 = roc_auc_score(labels[:120], oracle[:120])
    assert f"oracle AUC on its out-of-fold cases {fold0:.3f}" in out
    assert f"oracle AUC: all out-of-fold cases {roc_auc_score(labels, oracle):.3f}" in out


def test_ratio_shows_an_out_of_fold_scale_that_held_out_cases_do_not_share(
    tmp_path, monkeypatch, capsys
):
    rng = np.random.default_rng(11)
    bundle = _write_bundle(tmp_path / "wide", rng, oof_stretch=2.0)
    out = _run(bundle, tmp_path / "wide" / "big.csv", monkeypatch, capsys)
    ratio = float(re.search(r"ratio ([\d.]+)", out).group(1))
    assert 1.6 < ratio < 2.5  # out-of-fold logits twice as wide -> held-out wants 2x the slope
