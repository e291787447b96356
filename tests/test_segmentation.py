"""Fast tests of mrn_engine.segmentation: metrics, export, environment, axis handling, CLI."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from mrn_engine.data import NM_LABELS, QSM_LABELS, load_case
from mrn_engine.errors import InputDataError, MRNWarning, WeightsError
from mrn_engine.segmentation import (
    NNUNetSegmenter,
    SegmentationError,
    case_summary,
    dataset_json,
    default_specs,
    dice,
    evaluate_folders,
    export_datasets,
    find_nnunet_dir,
    hausdorff95,
    label_scores,
    mask_pair_problems,
    region_score,
)
from mrn_engine.segmentation.env import nnunet_environment

#: LAS grid like the challenge, anisotropic, small and with three different axis lengths
AFFINE = np.diag([-0.75, 0.75, 2.0, 1.0])
SHAPE = (20, 16, 10)


# -- helpers -------------------------------------------------------------------------------
def full_masks(shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """NM and QSM masks holding every challenge label as a small box (right = low X)."""
    nm = np.zeros(shape, np.uint8)
    nm[2:5, 3:6, 2:4] = 1
    nm[12:15, 3:6, 2:4] = 2
    qsm = np.zeros(shape, np.uint8)
    for i, lab in enumerate(sorted(QSM_LABELS)):
        x = 1 + (i % 2) * 10
        y = 1 + (i // 2) * 2 % 14
        z = (i // 2) % 4 * 2 + 1
        qsm[x : x + 3, y : y + 2, z : z + 2] = lab
    return nm, qsm


def write_case(root: Path, case_id: str, *, masks=True, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    nm_mask, qsm_mask = full_masks()
    nm = (rng.normal(100, 5, SHAPE) + 50 * (nm_mask > 0)).astype(np.float32)
    qsm = (rng.normal(0, 5, SHAPE) + 100 * (qsm_mask > 0)).astype(np.float32)
    nib.save(nib.Nifti1Image(nm, AFFINE), folder / "NM.nii.gz")
    nib.save(nib.Nifti1Image(qsm, AFFINE), folder / "QSM.nii.gz")
    if masks:
        nib.save(nib.Nifti1Image(nm_mask, AFFINE), folder / "NM_mask.nii.gz")
        nib.save(nib.Nifti1Image(qsm_mask, AFFINE), folder / "QSM_mask.nii.gz")
    return folder


# -- metrics ---------------------------------------------------------------------------------
def test_dice_known_overlap():
    a = np.zeros((10, 10, 4), bool)
    b = np.zeros_like(a)
    a[0:4, 0:5, 0:2] = True  # 40 voxels
    b[2:6, 0:5, 0:2] = True  # 40 voxels, 20 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


@pytest.mark.parametrize(
    "offset, expected_mm", [((3, 0, 0), 1.5), ((0, 2, 0), 2.0), ((0, 0, 2), 4.0)]
)
def test_hausdorff_is_spacing_aware(offset, expected_mm):
    a = np.zeros((8, 8, 6), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[1 + offset[0], 1 + offset[1], 1 + offset[2]] = True
    assert hausdorff95(a, b, (0.5, 1.0, 2.0)) == pytest.approx(expected_mm, abs=1e-4)


def test_hausdorff_empty_masks():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    b[1, 1, 1] = True
    assert hausdorff95(a, a, (1, 1, 1)) == 0.0
    assert math.isinf(hausdorff95(a, b, (1, 1, 1)))


def test_region_score_formula_and_clip():
    assert region_score(1.0, 0.0) == pytest.approx(1.0)
    assert region_score(0.5, 5.0) == pytest.approx(0.7 * 0.5 + 0.3 * 0.5)
    assert region_score(0.5, 25.0) == pytest.approx(0.35)  # HD term clipped at 0
    assert region_score(0.0, math.inf) == 0.0


def test_case_summary_weights():
    nm, qsm = full_masks()
    sp = (0.75, 0.75, 2.0)
    perfect = label_scores(nm, nm, sp, "NM") + label_scores(qsm, qsm, sp, "QSM")
    s = case_summary(perfect)
    assert s["QSM_score"] == pytest.approx(1.0)
    assert s["NM_score"] == pytest.approx(1.0)
    assert s["composite_score"] == pytest.approx(1.0)
    assert "QSM_thalamus_score" not in s  # thalamus is not scored

    # NM: SN left missing -> SN = (1 + 0) / 2; QSM: STN (weight 1.2 of 7.8) missing
    nm_bad = np.where(nm == 2, 0, nm)
    qsm_bad = np.where(np.isin(qsm, (9, 10)), 0, qsm)
    s = case_summary(label_scores(nm_bad, nm, sp, "NM") + label_scores(qsm_bad, qsm, sp, "QSM"))
    assert s["NM_score"] == pytest.approx(0.5)
    assert s["QSM_STN_score"] == pytest.approx(0.0)
    assert s["QSM_score"] == pytest.approx((7.8 - 1.2) / 7.8)
    assert s["composite_score"] == pytest.approx(0.6 * (6.6 / 7.8) + 0.4 * 0.5)


# -- ROI checks ------------------------------------------------------------------------------
def test_mask_pair_problems():
    nm, qsm = full_masks()
    assert mask_pair_problems(nm, qsm) == []
    no_dn = np.where(np.isin(qsm, (15, 16)), 0, qsm)
    (problem,) = mask_pair_problems(nm, no_dn)
    assert problem.roi == "qsm_dentate" and problem.fatal
    assert "cannot be located" in problem.message
    no_rn = np.where(np.isin(qsm, (13, 14)), 0, qsm)
    (problem,) = mask_pair_problems(nm, no_rn)
    assert problem.roi == "qsm_midbrain" and not problem.fatal and "RN" in str(problem)
    (problem,) = mask_pair_problems(np.zeros_like(nm), qsm)
    assert problem.roi == "nm_sn" and problem.fatal


# -- export ------------------------------------------------------------------------------------
def test_export_layout_and_dataset_json(tmp_path):
    cases = tmp_path / "cases"
    for i in range(3):
        write_case(cases / "nested", f"RJPD_00{i}", seed=i)
    write_case(cases, "RJPD_009", masks=False)  # test case: not exported
    specs = default_specs(nm_id=611, qsm_id=612, nm_name="MyNM", qsm_name="MyQSM")
    out = export_datasets(cases, tmp_path / "raw", specs=specs, progress=False)
    assert out["NM"].name == "Dataset611_MyNM" and out["QSM"].name == "Dataset612_MyQSM"
    for mod, labels in (("NM", NM_LABELS), ("QSM", QSM_LABELS)):
        ds = json.loads((out[mod] / "dataset.json").read_text())
        assert ds["channel_names"] == {"0": mod}
        assert ds["labels"] == {"background": 0, **{name: v for v, name in labels.items()}}
        assert ds["numTraining"] == 3 and ds["file_ending"] == ".nii.gz"
        imgs = sorted(p.name for p in (out[mod] / "imagesTr").iterdir())
        assert imgs == [f"RJPD_00{i}_0000.nii.gz" for i in range(3)]
        src = cases / "nested" / "RJPD_001"
        assert (out[mod] / "imagesTr" / "RJPD_001_0000.nii.gz").read_bytes() == (
            src / f"{mod}.nii.gz"
        ).read_bytes()
        assert (out[mod] / "labelsTr" / "RJPD_001.nii.gz").read_bytes() == (
            src / f"{mod}_mask.nii.gz"
        ).read_bytes()
    # dataset.json matches the helper
    assert (
        json.loads((out["NM"] / "dataset.json").read_text())["labels"]
        == dataset_json(specs["NM"], 3)["labels"]
    )


def test_export_errors(tmp_path):
    write_case(tmp_path / "c", "RJPD_000", masks=False)
    with pytest.raises(InputDataError, match="NM_mask"):
        export_datasets(tmp_path / "c", tmp_path / "raw", progress=False)
    with pytest.raises(InputDataError, match="different ids"):
        default_specs(nm_id=5, qsm_id=5)


def test_environment_is_scoped(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/user/raw")
    monkeypatch.delenv("nnUNet_results", raising=False)
    with pytest.raises(RuntimeError), nnunet_environment(tmp_path / "ws") as paths:
        assert os.environ["nnUNet_raw"] == str(paths["nnUNet_raw"].resolve())
        assert paths["nnUNet_results"].is_dir()
        raise RuntimeError("boom")
    assert os.environ["nnUNet_raw"] == "/user/raw"
    assert "nnUNet_results" not in os.environ


# -- prediction: axis order and failure handling (fake nnU-Net predictors) ------------------
class FakePredictor:
    """Stands in for nnUNetPredictor: derives labels from the input, in nnU-Net's (Z, Y, X) order."""

    def __init__(self, expected_spacing, fn):
        self.expected_spacing = expected_spacing
        self.fn = fn
        self.calls = 0

    def predict_single_npy_array(self, data, props, *args):
        self.calls += 1
        assert data.ndim == 4 and data.shape[0] == 1
        assert props["spacing"] == pytest.approx(self.expected_spacing)
        return self.fn(data[0])


def make_model_dir(root: Path, modality: str) -> Path:
    d = root / "nnunet" / modality
    (d / "fold_0").mkdir(parents=True)
    (d / "fold_0" / "checkpoint_final.pth").write_bytes(b"x")
    (d / "plans.json").write_text(json.dumps({"image_reader_writer": "SimpleITKIO"}))
    labels = NM_LABELS if modality == "NM" else QSM_LABELS
    (d / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, **{n: v for v, n in labels.items()}}})
    )
    return d


@pytest.fixture()
def fake_bundle(tmp_path):
    for m in ("NM", "QSM"):
        make_model_dir(tmp_path / "bundle", m)
    return tmp_path / "bundle"


def test_segmenter_axis_order_round_trip(fake_bundle, tmp_path):
    folder = write_case(tmp_path / "cases", "RJPD_001")
    case = load_case(folder)
    seg = NNUNetSegmenter.from_bundle(fake_bundle, device="cpu")
    assert seg.folds == {"NM": [0], "QSM": [0]}
    zyx = [2.0, 0.75, 0.75]

    # NM: bright voxels, label by side along nnU-Net's last axis (= NIfTI X): low X = right = 1
    def nm_fn(a):
        return np.where(
            a > 125, np.where(np.arange(a.shape[2])[None, None, :] < a.shape[2] // 2, 1, 2), 0
        )

    # QSM: the image encodes the labels (100 * (mask > 0)) -> give back the ground truth in (Z, Y, X)
    gt_zyx = case.qsm_mask.array.transpose(2, 1, 0)

    def qsm_fn(a):
        return np.where(a > 50, gt_zyx, 0)

    seg._predictors = {"NM": FakePredictor(zyx, nm_fn), "QSM": FakePredictor(zyx, qsm_fn)}
    nm, qsm = seg.predict(case)
    np.testing.assert_array_equal(nm.array, case.nm_mask.array)
    np.testing.assert_array_equal(qsm.array, case.qsm_mask.array)
    assert nm.array.dtype == np.uint8 and nm.kind == "mask"
    np.testing.assert_allclose(qsm.affine, case.qsm.affine)
    seg.predict(folder)  # a folder works too, the predictors are reused
    assert seg._predictors["NM"].calls == 2


def test_segmenter_missing_roi_is_a_case_error(fake_bundle, tmp_path):
    case = load_case(write_case(tmp_path / "cases", "RJPD_002"))
    seg = NNUNetSegmenter.from_bundle(fake_bundle / "nnunet", device="cpu")
    gt_zyx = case.qsm_mask.array.transpose(2, 1, 0)
    nm_zyx = case.nm_mask.array.transpose(2, 1, 0)
    no_dn = np.where(np.isin(gt_zyx, (15, 16)), 0, gt_zyx)
    no_rn = np.where(np.isin(gt_zyx, (13, 14)), 0, gt_zyx)
    seg._predictors = {
        "NM": FakePredictor([2.0, 0.75, 0.75], lambda a: nm_zyx),
        "QSM": FakePredictor([2.0, 0.75, 0.75], lambda a: no_dn),
    }
    with pytest.raises(SegmentationError, match=r"RJPD_002: .*qsm_dentate"):
        seg.predict(case)
    with pytest.warns(MRNWarning, match=r"RJPD_002: .*qsm_dentate.*cannot be located"):
        _, qsm = seg.predict(case, strict=False)
    assert not np.isin(qsm.array, (15, 16)).any()
    seg._predictors["QSM"] = FakePredictor([2.0, 0.75, 0.75], lambda a: no_rn)
    with pytest.warns(MRNWarning, match="RJPD_002: .*RN"):
        seg.predict(case)


def test_segment_cases_continues_after_a_failure(fake_bundle, tmp_path):
    from mrn_engine.segmentation.batch import segment_cases

    cases = tmp_path / "cases"
    good = load_case(write_case(cases, "RJPD_003", masks=False))
    write_case(cases, "RJPD_004", masks=False)
    nm_gt, qsm_gt = full_masks()

    class Seg:
        def predict(self, cf, strict=True):
            assert strict is False  # mask export keeps masks with missing nuclei
            if cf.case_id == "RJPD_004":
                raise InputDataError("RJPD_004: NM.nii.gz unreadable")
            return good.nm.like(nm_gt), good.qsm.like(np.where(qsm_gt > 14, 0, qsm_gt))

    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = segment_cases(Seg(), cases, out, progress=False)
    assert res.written == ["RJPD_003"] and res.errors[0]["case_id"] == "RJPD_004"
    assert sorted(p.name for p in out.iterdir()) == ["RJPD_003"]  # nothing of the failed case
    back = nib.load(out / "RJPD_003" / "QSM_pred.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.where(qsm_gt > 14, 0, qsm_gt))
    np.testing.assert_allclose(back.affine, AFFINE)


def test_bundle_errors(tmp_path):
    with pytest.raises(WeightsError, match=str(tmp_path)):
        find_nnunet_dir(tmp_path)
    make_model_dir(tmp_path / "b", "NM")
    make_model_dir(tmp_path / "b", "QSM")
    with pytest.raises(WeightsError, match="fold_3"):
        NNUNetSegmenter.from_bundle(tmp_path / "b", device="cpu", folds=[3])
    (tmp_path / "b" / "nnunet" / "QSM" / "plans.json").write_text(
        json.dumps({"image_reader_writer": "NibabelIOWithReorient"})
    )
    with pytest.raises(WeightsError, match="NibabelIOWithReorient"):
        NNUNetSegmenter.from_bundle(tmp_path / "b", device="cpu")


# -- evaluation + CLI --------------------------------------------------------------------------
def test_evaluate_folders_and_cli(tmp_path):
    from mrn_engine.cli import cli

    gt = tmp_path / "gt"
    pred = tmp_path / "pred"
    for i in range(2):
        write_case(gt, f"RJPD_01{i}", seed=i)
    nm, qsm = full_masks()
    (pred / "RJPD_010").mkdir(parents=True)
    nib.save(nib.Nifti1Image(nm, AFFINE), pred / "RJPD_010" / "NM_pred.nii.gz")
    nib.save(nib.Nifti1Image(qsm, AFFINE), pred / "RJPD_010" / "QSM_pred.nii.gz")
    (pred / "RJPD_011").mkdir()
    nib.save(
        nib.Nifti1Image(np.where(nm == 2, 0, nm).astype(np.uint8), AFFINE),
        pred / "RJPD_011" / "NM_pred.nii.gz",
    )
    nib.save(nib.Nifti1Image(qsm, AFFINE), pred / "RJPD_011" / "QSM_pred.nii.gz")
    rows = evaluate_folders(pred, gt, progress=False)
    assert [r["case_id"] for r in rows] == ["RJPD_010", "RJPD_011", "mean"]
    assert rows[0]["composite_score"] == pytest.approx(1.0)
    assert rows[1]["NM_score"] == pytest.approx(0.5)
    assert rows[2]["NM_score"] == pytest.approx(0.75)
    assert rows[0]["QSM_SN_R_hd95_mm"] == 0.0

    res = CliRunner().invoke(
        cli, ["seg", "evaluate", str(pred), str(gt), "--out", str(tmp_path / "s.csv"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert "composite 0.9000" in res.output  # mean of 1.0 and 0.6 * 1 + 0.4 * 0.5
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("case_id,QSM_caudate_R_dice") and lines[-1].startswith("mean,")

    with pytest.raises(InputDataError, match="no prediction folder"):
        evaluate_folders(tmp_path / "gt" / "RJPD_010", gt, progress=False)


def test_cli_export(tmp_path):
    from mrn_engine.cli import cli

    write_case(tmp_path / "c", "RJPD_000")
    write_case(tmp_path / "c", "RJPD_001", seed=1)
    res = CliRunner().invoke(
        cli,
        [
            "seg",
            "export",
            str(tmp_path / "c"),
            "--out",
            str(tmp_path / "raw"),
            "--nm-id",
            "7",
            "--modality",
            "nm",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "NM: 2 case(s)" in res.output
    assert (tmp_path / "raw" / "Dataset007_PDCADxNM" / "dataset.json").is_file()
    assert not (tmp_path / "raw" / "Dataset505_PDCADxQSM").exists()


def test_splits_follow_the_exported_cases(tmp_path):
    from mrn_engine.segmentation.train import _write_splits

    _write_splits(tmp_path, ["a", "b", "c"], seed=1)  # < 5 cases: k-fold with k = 3
    splits = json.loads((tmp_path / "splits_final.json").read_text())
    assert len(splits) == 3 and sorted(v for s in splits for v in s["val"]) == ["a", "b", "c"]
    _write_splits(tmp_path, ["a", "b", "c", "d", "e", "f"], seed=1)  # stale file removed
    assert not (tmp_path / "splits_final.json").exists()  # nnU-Net makes its 5-fold split
    with pytest.raises(InputDataError, match="at least 2"):
        _write_splits(tmp_path, ["a"], seed=1)


def test_fold_seed_repeats_the_training_rngs():
    """nnU-Net draws its sampling and augmentation from python/numpy/torch's global RNGs."""
    import random

    import torch

    from mrn_engine.runtime import seed_everything
    from mrn_engine.segmentation.train import fold_seed

    def draws(seed, fold):
        seed_everything(fold_seed(seed, fold))
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    assert draws(12345, 0) == draws(12345, 0)
    assert draws(12345, 0) != draws(12345, 1) != draws(12345, "all")
    assert draws(12345, 0) != draws(7, 0)
