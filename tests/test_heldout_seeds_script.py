"""``docs/scripts/heldout_seeds.py`` on stored per-case CSVs: accuracy, AUC, the paired
difference against the reference arm and the ``--calibration`` line (nothing is predicted)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from docs_scripts import load_docs_script
from mrn_engine.training.calibration import brier_score, expected_calibration_error


def write_rows(path: Path, y: np.ndarray, p: np.ndarray) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "label", "p_pd"])
        w.writerows(
            [f"C{i:03d}", int(a), float(b)] for i, (a, b) in enumerate(zip(y, p, strict=True))
        )


def test_scores_paired_difference_and_calibration_from_stored_rows(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 50)
    good = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.1, y.size), 0.01, 0.99)
    worse = good.copy()
    worse[:10] = 0.9  # ten controls called PD: 10 points less accurate
    write_rows(tmp_path / "ref_s1_big.csv", y, good)
    write_rows(tmp_path / "alt_s1_big.csv", y, worse)
    args = ["heldout_seeds.py", "UNUSED", str(tmp_path), "ref_s1=X", "alt_s1=Y"]
    monkeypatch.setattr(sys, "argv", [*args, "--reference", "ref", "--calibration"])
    load_docs_script("heldout_seeds").main()
    out = capsys.readouterr().out
    acc_ref = ((good >= 0.5) == y).mean()
    assert f"ref_s1: n 100, accuracy {acc_ref:.3f}" in out
    assert f"alt_s1: n 100, accuracy {acc_ref - 0.1:.3f}" in out
    assert "| alt | 1 |" in out and "-10.0 [" in out
    auc_diff = roc_auc_score(y, worse) - roc_auc_score(y, good)
    assert auc_diff < -0.01 and f"| {auc_diff:+.3f} [" in out  # paired AUC column
    ece_lines = [line for line in out.splitlines() if line.strip().startswith("ECE")]
    assert len(ece_lines) == 2
    assert ece_lines[0].split()[1] == f"{expected_calibration_error(y, good):.3f}"
    assert f"Brier {brier_score(y, worse):.3f}" in ece_lines[1]
    assert "slope" in ece_lines[0] and "floor" in ece_lines[0]


def test_folds_option_reports_each_fold_models_auc_and_agreement(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 40)
    folds = np.clip(0.5 + 0.2 * (2 * y[:, None] - 1) + rng.normal(0, 0.2, (80, 2)), 0.02, 0.98)
    with (tmp_path / "a_s1_big.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "label", "p_pd", "raw0", "raw1", "cal0", "cal1"])
        for i in range(80):
            w.writerow([f"C{i:03d}", y[i], folds[i].mean(), *folds[i], *folds[i]])
    monkeypatch.setattr(
        sys, "argv", ["heldout_seeds.py", "UNUSED", str(tmp_path), "a_s1=X", "--folds"]
    )
    load_docs_script("heldout_seeds").main()
    out = capsys.readouterr().out
    expected = " / ".join(f"{roc_auc_score(y, folds[:, j]):.3f}" for j in range(2))
    assert f"fold AUCs {expected}," in out
    z = np.log(folds / (1 - folds))
    assert f"mean correlation {np.corrcoef(z.T)[0, 1]:.2f}" in out
