"""``mrn cases --stats``: per-case ROI statistics after the mapping, and outlier flags."""

from __future__ import annotations

import csv

import numpy as np
from click.testing import CliRunner

from mrn_engine.cli import cli
from mrn_engine.config import get_preset
from mrn_engine.rois.stats import cohort_stats, seen_slices
from test_data import make_cohort, synthetic_arrays, write_case


def _cohort(tmp_path):
    root = make_cohort(tmp_path / "site", n=8)
    folder = {p.name: p for p in root.rglob("RJPD_*") if p.is_dir()}
    a1 = synthetic_arrays(seed=1)
    write_case(folder["RJPD_001"], seed=1, overrides={"QSM": a1["QSM"] / 1000.0})  # ppm
    a2 = synthetic_arrays(seed=2)
    write_case(folder["RJPD_002"], seed=2, overrides={"NM": 0.5 * a2["NM"] + 3000.0})  # gain
    a3 = synthetic_arrays(seed=3)
    qsm = a3["QSM"].copy()
    qsm[np.isin(a3["QSM_mask"], (9, 10, 11, 12, 13, 14))] *= 3.0  # midbrain iron x3
    write_case(folder["RJPD_003"], seed=3, overrides={"QSM": qsm})
    a4 = synthetic_arrays(seed=4)
    mask = a4["QSM_mask"].copy()
    mask[np.isin(mask, (15, 16))] = 0  # no dentate
    write_case(folder["RJPD_004"], seed=4, overrides={"QSM_mask": mask})
    return root


def _flags(rows, case_id, roi=None):
    return [
        f for r in rows if r["case_id"] == case_id and roi in (None, r["roi"]) for f in r["flags"]
    ]


def test_cohort_stats_rows_and_outliers(tmp_path):
    rows = cohort_stats(_cohort(tmp_path), get_preset("cpu-tiny").roi, progress=False)
    assert len(rows) == 8 * 4
    good = [r for r in rows if r["case_id"] == "RJPD_000"]
    for r in good:
        assert r["box_z"] >= r["nucleus_slices"] > 0 and r["dropped"] == 0 and not r["flags"]
        assert 0 <= r["p5"] <= r["p50"] <= r["p95"] <= 255
    nm = next(r for r in good if r["roi"] == "nm_sn")
    assert nm["units"] == "CNR" and nm["p50_units"] > 10  # the SN stands out of its reference
    bg = next(r for r in good if r["roi"] == "qsm_bg")
    assert bg["units"] == "ppm" and bg["qsm_unit"] == "ppb"
    # QSM written in ppm among ppb cases: flagged, and mapped to the same ppm values
    assert any(f.startswith("QSM unit: ppm") for f in _flags(rows, "RJPD_001"))
    ppm = next(r for r in rows if r["case_id"] == "RJPD_001" and r["roi"] == "qsm_bg")
    assert abs(ppm["p50_units"] - bg["p50_units"]) < 0.02
    # a global NM gain/offset is no outlier after the reference mapping
    assert not _flags(rows, "RJPD_002")
    # tripled midbrain iron: far from the cohort in that ROI
    assert any(f.startswith("far from cohort") for f in _flags(rows, "RJPD_003", "qsm_midbrain"))
    # missing dentate labels: an empty ROI
    assert any(f.startswith("empty ROI") for f in _flags(rows, "RJPD_004", "qsm_dentate"))


def test_seen_slices_policies():
    assert seen_slices(0, 20, 8, "pad") == set(range(6, 14))
    assert seen_slices(0, 20, 8, "resample") == set(range(20))
    assert seen_slices(2, 5, 8, "pad") == {2, 3, 4}


def test_cli_cases_stats_writes_table_csv_and_figure(tmp_path):
    root = _cohort(tmp_path)
    out = tmp_path / "stats"
    res = CliRunner().invoke(
        cli, ["cases", str(root), "--stats", "--stats-out", str(out), "--quiet"]
    )
    assert res.exit_code == 2, res.output  # RJPD_004's missing dentate fails validation
    assert "RJPD_003" in res.output and "far from cohort" in res.output
    assert "flagged: RJPD_001, RJPD_003, RJPD_004" in res.output
    with open(out / "case_stats.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 32 and {r["roi"] for r in rows} == {
        "nm_sn",
        "qsm_bg",
        "qsm_midbrain",
        "qsm_dentate",
    }
    assert (out / "case_stats.png").stat().st_size > 10_000
    assert (out / "case_stats.txt").read_text().startswith("case")
