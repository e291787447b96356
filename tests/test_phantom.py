"""The atlas-driven phantom cohort: geometry, labels, sides, intensities, determinism, layout."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mrn_engine.errors import InputDataError
from mrn_engine.phantom import case as phantom_case
from mrn_engine.phantom import (
    generate_cohort,
    make_phantom_case,
    oracle_accuracy,
    write_phantom_case,
)
from mrn_engine.phantom.cohort import plan_cohort
from mrn_engine.phantom.geometry import GRID_SHAPE, VOXEL_MM
from mrn_engine.phantom.model import oracle_monte_carlo

FILES = ("NM", "QSM", "T1", "NM_mask", "QSM_mask")
N_FIXTURE, SEED_FIXTURE = 8, 123  # the shared conftest cohort


def _read_csv(path: Path) -> dict[str, int]:
    with open(path, newline="") as fh:
        return {row[0]: int(row[1]) for row in csv.reader(fh)}


def _load(folder: Path, name: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(folder / f"{name}.nii.gz")
    return np.asanyarray(img.dataobj), img


def _centroid_x(mask: np.ndarray, label: int) -> float:
    return float(np.argwhere(mask == label)[:, 0].mean())


@pytest.fixture(scope="module")
def pair():
    """An HC and a PD case with the same seed (same anatomy, different latents)."""
    return make_phantom_case(0, 11, "RJPD_900"), make_phantom_case(1, 11, "RJPD_901")


def test_geometry_shape_spacing_las_shared_affine(phantom_root):
    folders = sorted(p for p in phantom_root.glob("RJPD_*") if p.is_dir())
    assert len(folders) == N_FIXTURE
    for folder in folders[:2]:
        affines = []
        for name in FILES:
            data, img = _load(folder, name)
            assert data.shape == GRID_SHAPE
            assert np.allclose(img.header.get_zooms()[:3], VOXEL_MM, atol=1e-4)
            assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
            expected = np.uint8 if name.endswith("mask") else np.float32
            assert data.dtype == expected, (folder.name, name, data.dtype)
            affines.append(img.affine)
        for aff in affines[1:]:
            np.testing.assert_array_equal(aff, affines[0])


def test_all_labels_present_and_left_right(phantom_root):
    for folder in sorted(p for p in phantom_root.glob("RJPD_*") if p.is_dir()):
        qsm_mask, _ = _load(folder, "QSM_mask")
        nm_mask, _ = _load(folder, "NM_mask")
        assert set(np.unique(qsm_mask)) == set(range(17)), folder.name
        assert set(np.unique(nm_mask)) == {0, 1, 2}, folder.name
        # lower X index = subject right: odd (right) labels lie at lower X than even (left) ones
        for right in range(1, 17, 2):
            assert _centroid_x(qsm_mask, right) < _centroid_x(qsm_mask, right + 1), (
                folder.name,
                right,
            )
        assert _centroid_x(nm_mask, 1) < _centroid_x(nm_mask, 2)
        # NM SN sits inside the QSM SN of the same side and is smaller
        assert np.all(qsm_mask[nm_mask == 1] == 11) and np.all(qsm_mask[nm_mask == 2] == 12)
        assert (nm_mask == 1).sum() < (qsm_mask == 11).sum()


def test_challenge_size_nuclei_option(pair):
    """``nuclei="challenge"``: only the QSM nuclei change, to cores of the atlas's nuclei."""
    big = pair[0]
    small = make_phantom_case(0, 11, "RJPD_900", nuclei="challenge")
    np.testing.assert_array_equal(big.nm, small.nm)
    np.testing.assert_array_equal(big.nm_mask, small.nm_mask)
    assert np.all(big.qsm_mask[small.qsm_mask > 0] == small.qsm_mask[small.qsm_mask > 0])
    assert set(np.unique(small.qsm_mask)) == set(range(17))
    # the NM SN now overlaps the QSM SN of its own side only in part (32-75 % in real masks)
    for side, sn in ((1, 11), (2, 12)):
        on = small.qsm_mask[small.nm_mask == side]
        assert 0.25 <= np.mean(on == sn) <= 0.95, (side, np.mean(on == sn))
        assert not np.any(on == 23 - sn)
    with pytest.raises(ValueError, match="nuclei must be one of"):
        make_phantom_case(0, 11, nuclei="mni")


def test_all_nuclei_inside_the_slab(pair):
    for case in pair:
        zs = np.argwhere(case.qsm_mask > 0)[:, 2]
        assert zs.min() > 0 and zs.max() < GRID_SHAPE[2] - 1  # caudate top .. dentate bottom fit


def test_intensity_ranges(pair):
    ranges = {  # QSM nucleus means (ppb) around the real ones (challenge-data.md)
        1: (15, 80),
        3: (15, 85),
        5: (85, 170),
        7: (-40, 20),
        9: (55, 150),
        11: (95, 200),
        13: (75, 170),
        15: (65, 150),
    }
    for case in pair:
        for right, (lo, hi) in ranges.items():
            for lab in (right, right + 1):
                mean = float(case.qsm[case.qsm_mask == lab].mean())
                assert lo < mean < hi, (case.case_id, lab, mean)
        nm_sn = float(case.nm[case.nm_mask > 0].mean())
        assert 12000 < nm_sn < 32000, nm_sn
        brain = case.qsm != 0
        floor = float(np.median(case.nm[brain & (case.qsm_mask == 0)]))
        assert 5000 < floor < 8500, floor
        assert case.nm.min() >= 0 and 30000 < case.nm.max() < 100000
        assert 120000 < case.t1.max() < 240000
        # QSM: exactly 0 outside the brain, signed inside, rare outliers
        assert np.all(case.qsm[case.t1 == 0] == 0)
        assert np.all(case.qsm[:5, :5, :] == 0)
        assert (case.qsm[brain] < 0).mean() > 0.2
        p10, p90 = np.percentile(case.qsm[brain], [10, 90])
        assert -45 < p10 < -15 and 15 < p90 < 45
        assert (case.qsm[case.qsm_mask > 0] == 0).mean() < 0.01  # only noise hits 0.0


def test_pd_effects_within_a_pair(pair):
    hc, pd = pair  # same seed: only the latent severity/age differ
    assert pd.latents["severity"] > hc.latents["severity"]
    assert pd.latents["nm_sn_volume_mm3"] < hc.latents["nm_sn_volume_mm3"]
    assert pd.nm[pd.nm_mask > 0].mean() < hc.nm[hc.nm_mask > 0].mean()
    for lab in (11, 12):
        assert pd.qsm[pd.qsm_mask == lab].mean() > hc.qsm[hc.qsm_mask == lab].mean()


def test_pd_has_lower_nm_contrast_on_average(phantom_root):
    labels = {
        **_read_csv(phantom_root / "train_cases.csv"),
        **_read_csv(phantom_root / "val_cases.csv"),
    }
    contrast = {0: [], 1: []}
    for case_id, label in labels.items():
        nm, _ = _load(phantom_root / case_id, "NM")
        nm_mask, _ = _load(phantom_root / case_id, "NM_mask")
        qsm, _ = _load(phantom_root / case_id, "QSM")
        floor = np.median(nm[(qsm != 0) & (nm_mask == 0)])
        contrast[label].append(nm[nm_mask > 0].mean() / floor)
    assert np.mean(contrast[1]) < np.mean(contrast[0])


def test_deterministic_and_independent_of_workers(phantom_root):
    plan = plan_cohort(N_FIXTURE, SEED_FIXTURE, 1 / 3)
    item = plan[0]  # the cohort was written by 2 spawned workers; regenerate in-process
    case = make_phantom_case(item["label"], item["seed"], item["case_id"])
    folder = phantom_root / item["case_id"]
    for name, arr in (
        ("NM", case.nm),
        ("QSM", case.qsm),
        ("T1", case.t1),
        ("NM_mask", case.nm_mask),
        ("QSM_mask", case.qsm_mask),
    ):
        on_disk, _ = _load(folder, name)
        assert on_disk.tobytes() == arr.tobytes(), name
    assert plan_cohort(N_FIXTURE, SEED_FIXTURE, 1 / 3) == plan
    assert plan_cohort(N_FIXTURE, SEED_FIXTURE + 1, 1 / 3) != plan


@pytest.mark.parametrize("n", [2, 7, 8, 9, 300])
def test_plan_is_balanced_per_split(n):
    plan = plan_cohort(n, 5, 1 / 3)
    assert [p["case_id"] for p in plan][:2] == ["RJPD_000", "RJPD_001"]
    for split in ("train", "val"):
        labels = [p["label"] for p in plan if p["split"] == split]
        assert abs(2 * sum(labels) - len(labels)) <= 1, (n, split)
    assert abs(2 * sum(p["label"] for p in plan) - n) <= n % 2
    assert sum(p["split"] == "val" for p in plan) == round(n / 3)


def test_csvs_and_side_files(phantom_root):
    train = _read_csv(phantom_root / "train_cases.csv")
    val = _read_csv(phantom_root / "val_cases.csv")
    assert not set(train) & set(val)
    folders = {p.name for p in phantom_root.glob("RJPD_*") if p.is_dir()}
    assert set(train) | set(val) == folders
    first = (phantom_root / "train_cases.csv").read_text().splitlines()[0]
    assert first.startswith("RJPD_") and first.count(",") == 1  # headerless case_id,label
    for split in (train, val):
        assert abs(2 * sum(split.values()) - len(split)) <= 1
    assert sum(train.values()) + sum(val.values()) == N_FIXTURE // 2
    oracle = json.loads((phantom_root / "oracle.json").read_text())
    assert 0.0 <= oracle["accuracy_empirical"] <= 1.0
    assert oracle["accuracy_analytic"] == pytest.approx(oracle_accuracy(1.0))
    with open(phantom_root / "phantom_latents.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == sorted(folders)
    assert {"severity", "age", "oracle_p_pd", "nm_sn_volume_mm3"} <= set(rows[0])


def test_oracle_near_090_and_monte_carlo_agrees():
    acc = oracle_accuracy(1.0)
    assert 0.87 < acc < 0.93
    assert oracle_monte_carlo(1.0, n=100_000, seed=3) == pytest.approx(acc, abs=0.01)
    assert oracle_accuracy(0.0) == pytest.approx(0.5)
    assert oracle_accuracy(2.0) > acc


def test_write_is_atomic(monkeypatch, tmp_path, pair):
    real_write = phantom_case.write_nifti
    calls = []

    def failing_write(img, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(img, path)

    monkeypatch.setattr(phantom_case, "write_nifti", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_phantom_case(pair[0], tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written case, no temp folder left
    monkeypatch.setattr(phantom_case, "write_nifti", real_write)
    folder = write_phantom_case(pair[0], tmp_path)
    assert folder == tmp_path / "RJPD_900"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{f}.nii.gz" for f in FILES)


def test_rerun_regenerates_only_incomplete_cases(phantom_root, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(phantom_root, root)
    (root / "RJPD_003" / "QSM.nii.gz").unlink()  # as if killed mid-case (incomplete)
    (root / ".tmp-RJPD_005-dead").mkdir()  # a killed run's temp folder
    kept = (root / "RJPD_000" / "NM.nii.gz").stat().st_mtime_ns
    summary = generate_cohort(root, n=N_FIXTURE, seed=SEED_FIXTURE, workers=1, progress=False)
    assert summary["generated"] == 1 and summary["skipped"] == N_FIXTURE - 1
    assert (root / "RJPD_000" / "NM.nii.gz").stat().st_mtime_ns == kept
    assert not list(root.glob(".tmp-*"))
    new, _ = _load(root / "RJPD_003", "QSM")
    old, _ = _load(phantom_root / "RJPD_003", "QSM")
    np.testing.assert_array_equal(new, old)
    with pytest.raises(InputDataError, match="other settings"):
        generate_cohort(root, n=N_FIXTURE, seed=SEED_FIXTURE + 1, workers=1, progress=False)
    assert "nuclei" not in json.loads((root / "phantom.json").read_text())  # atlas: as before
    with pytest.raises(InputDataError, match="other settings"):  # challenge-size nuclei differ
        generate_cohort(root, n=N_FIXTURE, seed=SEED_FIXTURE, nuclei="challenge", progress=False)
    with pytest.raises(InputDataError, match="nuclei must be one of"):
        generate_cohort(tmp_path / "x", n=4, nuclei="big", progress=False)


def test_cli_summary_on_finished_cohort(phantom_root, tmp_path):
    from mrn_engine.cli import cli

    root = tmp_path / "cohort"
    shutil.copytree(phantom_root, root)
    result = CliRunner().invoke(
        cli,
        [
            "phantom",
            "--n",
            str(N_FIXTURE),
            "--out",
            str(root),
            "--seed",
            str(SEED_FIXTURE),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"cases: {N_FIXTURE} (0 generated, {N_FIXTURE} already complete)" in result.output
    assert "oracle ceiling: 0.900 analytic" in result.output
    assert "4 PD / 4 HC" in result.output


def test_bad_arguments():
    with pytest.raises(InputDataError, match="at least 2"):
        generate_cohort("/nonexistent/never", n=1)
    with pytest.raises(ValueError, match="label"):
        make_phantom_case(2, 0)


def test_value_table(phantom_root):
    from mrn_engine.phantom.stats import value_table

    table = value_table(phantom_root, max_cases=3).splitlines()
    counts = [int(c.split("n=")[1].rstrip(") ")) for c in table[0].split("|")[2:4]]
    assert sum(counts) == 3
    sn = next(line for line in table if line.startswith("| QSM SN |")).split("|")[2:4]
    for count, cell in zip(counts, sn, strict=True):
        if count:
            assert 90 < float(cell.split("+-")[0]) < 200, cell


@pytest.mark.slow
def test_figure(tmp_path):
    from mrn_engine.phantom import plot_pd_hc

    path = plot_pd_hc(tmp_path / "fig.png")
    assert path.stat().st_size > 20_000
