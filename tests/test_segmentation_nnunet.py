"""nnU-Net v2 end to end on CPU: tiny NM/QSM models trained on cropped phantoms, in-process
prediction of unseen cases, and the mask-free diagnosis pipeline (``mrn predict`` on a case
folder with only NM.nii.gz and QSM.nii.gz). Slow: a few minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrn_engine.data import NM_LABELS, QSM_LABELS, discover_cases, file_sha256, load_case
from mrn_engine.segmentation import NNUNetSegmenter, SegTrainConfig, train_segmentation
from mrn_engine.segmentation.metrics import dice

pytestmark = pytest.mark.slow

N_TRAIN = 4


def crop_case(src: Path, dst: Path, *, step: int = 2, margin: int = 4, masks: bool = True) -> None:
    """Crop a phantom case to the box of its nuclei and halve the in-plane resolution.

    nibabel's slicer updates the affine, so the small case is a valid case of its own grid.
    """
    union = np.asarray(nib.load(src / "QSM_mask.nii.gz").dataobj) > 0
    union |= np.asarray(nib.load(src / "NM_mask.nii.gz").dataobj) > 0
    idx = np.nonzero(union)
    sl = tuple(
        slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1, s)
        for i, s in zip(idx, (step, step, 1), strict=True)
    )
    dst.mkdir(parents=True)
    for name in ("NM", "QSM", "NM_mask", "QSM_mask") if masks else ("NM", "QSM"):
        img = nib.load(src / f"{name}.nii.gz")
        nib.save(img.slicer[sl], dst / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def small(phantom_root, tmp_path_factory):
    """Cropped phantoms: ``train/`` (4 labelled cases) and ``unseen/`` (the rest, images only)."""
    root = tmp_path_factory.mktemp("seg_small")
    cases = discover_cases(phantom_root)
    for i, cf in enumerate(cases):
        if i < N_TRAIN:
            crop_case(cf.folder, root / "train" / cf.case_id)
        else:
            crop_case(cf.folder, root / "unseen_gt" / cf.case_id)
            crop_case(cf.folder, root / "unseen" / cf.case_id, masks=False)
    return root


@pytest.fixture(scope="module")
def seg_bundle(small):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = SegTrainConfig(
            tiny=True, epochs=1, iters_per_epoch=3, val_iters_per_epoch=1, device="cpu", folds=(0,)
        )
        out = train_segmentation(
            small / "train", small / "ws", cfg=cfg, bundle=small / "bundle", progress=False
        )
    finally:
        torch.set_num_threads(threads)
    return small / "bundle", out


def test_bundle_holds_both_models(seg_bundle, small):
    bundle, out = seg_bundle
    assert out == {"NM": bundle / "nnunet" / "NM", "QSM": bundle / "nnunet" / "QSM"}
    for mod, labels in (("NM", NM_LABELS), ("QSM", QSM_LABELS)):
        d = out[mod]
        for name in (
            "plans.json",
            "dataset.json",
            "dataset_fingerprint.json",
            "fold_0/model.safetensors",
            "fold_0/model.json",
        ):
            assert (d / name).is_file(), name
        assert not list(d.rglob("*.pth"))  # no pickle enters the bundle
        ds = json.loads((d / "dataset.json").read_text())
        assert ds["labels"] == {"background": 0, **{n: v for v, n in labels.items()}}
        prov = json.loads((d / "mrn_nnunet.json").read_text())
        assert prov["trainer"] == "nnUNetTrainerMRN" and prov["folds"] == [0]
        assert sorted(prov["cases"]) == sorted(p.name for p in (small / "train").iterdir())
        for name in ("plans.json", "dataset.json", "fold_0/model.safetensors", "fold_0/model.json"):
            assert prov["sha256"][name] == file_sha256(d / name), name
        # our trainer never mirrors along left-right (NIfTI X = nnU-Net's last axis)
        meta = json.loads((d / "fold_0" / "model.json").read_text())
        assert meta["trainer_name"] == "nnUNetTrainerMRN"
        assert 2 not in (meta["inference_allowed_mirroring_axes"] or ())
    # the user's environment is untouched
    import os

    assert os.environ.get("nnUNet_raw") != str((small / "ws" / "nnUNet_raw").resolve())


def test_predicts_unseen_cases_on_their_grid(seg_bundle, small):
    bundle, _ = seg_bundle
    seg = NNUNetSegmenter.from_bundle(bundle, device="cpu", use_mirroring=False)
    for folder in sorted((small / "unseen").iterdir())[:2]:
        case = load_case(folder)
        for mod, image, labels in (("NM", case.nm, NM_LABELS), ("QSM", case.qsm, QSM_LABELS)):
            mask = seg.predict_volume(image, mod)
            assert mask.shape == image.shape and mask.array.dtype == np.uint8
            np.testing.assert_allclose(mask.affine, image.affine)
            values = set(np.unique(mask.array).tolist())
            assert values <= {0, *labels}
    assert set(seg._predictors) == {"NM", "QSM"}  # one predictor per modality, reused


def test_mask_free_pipeline_gives_a_diagnosis(seg_bundle, small, tmp_path, monkeypatch):
    """``mrn predict`` on image-only case folders uses BUNDLE/nnunet for the cropping masks.

    The real nnU-Net predictor loads the bundle's checkpoints and runs its network on the case;
    a model trained for 3 iterations predicts (near) background, so its output is then replaced
    by the case's true labels, same shape: this test checks the glue (bundle -> segmenter ->
    masks -> ROIs -> diagnosis -> written masks), model quality is measured in
    docs/segmentation.md.
    """

    from mrn_engine.cli import cli
    from mrn_engine.config import get_preset
    from mrn_engine.models import build_model
    from mrn_engine.training.checkpoint import save_state_dict

    nnunet_bundle, _ = seg_bundle
    cfg = get_preset("cpu-tiny")
    bundle = tmp_path / "mrn_bundle"
    (bundle / "fold_0").mkdir(parents=True)
    cfg.save(bundle / "config.json")
    torch.manual_seed(0)
    save_state_dict(
        build_model(cfg.model, cfg.roi).state_dict(), bundle / "fold_0" / "model.safetensors"
    )
    shutil.copytree(nnunet_bundle / "nnunet", bundle / "nnunet")

    cases = tmp_path / "cases"
    src = sorted((small / "unseen").iterdir())[0]
    shutil.copytree(src, cases / src.name)
    assert sorted(p.name for p in (cases / src.name).iterdir()) == ["NM.nii.gz", "QSM.nii.gz"]
    truth_case = load_case(small / "unseen_gt" / src.name)
    real_predict = NNUNetSegmenter.predict_volume
    calls = []

    def predict_then_truth(self, image, modality, **kwargs):
        seg = real_predict(self, image, modality, **kwargs)  # the trained network runs
        truth = truth_case.nm_mask if modality == "NM" else truth_case.qsm_mask
        assert seg.shape == truth.shape and set(np.unique(seg.array)) <= set(range(17))
        calls.append(modality)
        return truth

    monkeypatch.setattr(NNUNetSegmenter, "predict_volume", predict_then_truth)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "predict",
            str(cases),
            "--model",
            str(bundle),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    call = (out / src.name / "PD_pred.txt").read_text().strip()
    assert call in ("0", "1")
    assert sorted(calls) == ["NM", "QSM"]
    nm_pred = nib.load(out / src.name / "NM_pred.nii.gz")
    assert nm_pred.shape == nib.load(src / "NM.nii.gz").shape
    np.testing.assert_allclose(nm_pred.affine, truth_case.nm_mask.affine, atol=1e-5)
    probs = json.loads((out / "probabilities.json").read_text())["cases"]
    assert [(c["case_id"], c["mask_source"]) for c in probs] == [(src.name, "segmenter")]


class PointwiseNet(torch.nn.Module):
    """Logits from the (normalised) intensity alone: background 0, ``label`` = x, others -10.

    Its output does not depend on tiling, mirroring or position, so nnU-Net's whole inference
    path (normalisation, resampling, sliding window, export) must return exactly the voxels whose
    normalised intensity is > 0, on the source grid.
    """

    def __init__(self, n_out: int, label: int) -> None:
        super().__init__()
        self.n_out, self.label = n_out, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full(
            (x.shape[0], self.n_out, *x.shape[2:]), -10.0, dtype=x.dtype, device=x.device
        )
        out[:, 0] = 0.0
        out[:, self.label] = x[:, 0]
        return out


def _volume(array: np.ndarray, zooms: tuple[float, float, float]):
    from mrn_engine.data import Volume

    img = nib.Nifti1Image(array.astype(np.float32), np.diag([-zooms[0], zooms[1], zooms[2], 1.0]))
    return Volume(img.get_fdata().astype(np.float32), img.affine, img.header)


def test_real_nnunet_inference_keeps_alignment(seg_bundle):
    """Real nnUNetPredictor (plans of the trained NM model) with a pointwise network."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    bundle, out = seg_bundle
    plans = json.loads((out["NM"] / "plans.json").read_text())
    ds = json.loads((out["NM"] / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    pred = nnUNetPredictor(
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    pred.manual_initialization(PointwiseNet(3, 2), pm, cm, [{}], ds, "nnUNetTrainerMRN", (0, 1))
    seg = NNUNetSegmenter.from_bundle(bundle, device="cpu")
    seg._predictors["NM"] = pred

    zyx = cm.spacing  # the model's spacing (Z, Y, X)
    zooms = (zyx[2], zyx[1], zyx[0])
    # an asymmetric blob (SN_L = 2) on a grid with three different axis lengths, model spacing
    img = np.ones((40, 50, 14), np.float32)
    img[5:15, 20:32, 3:9] = 10.0
    truth = (img > 5).astype(np.uint8) * 2
    mask = seg.predict_volume(_volume(img, zooms), "NM")
    np.testing.assert_array_equal(mask.array, truth)
    # the same anatomy at twice the in-plane resolution: nnU-Net resamples there and back
    fine = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)
    mask = seg.predict_volume(_volume(fine, (zooms[0] / 2, zooms[1] / 2, zooms[2])), "NM")
    assert mask.shape == fine.shape
    assert dice(mask.array == 2, fine > 5) > 0.9
    assert not (mask.array == 1).any()


#: the easy cases' QSM nuclei: (right label, QSM value), rows from anterior to posterior
EASY_QSM = ((1, 60.0), (11, 140.0), (15, 105.0))  # caudate, SN, dentate


def _easy_case(folder: Path, seed: int, shape=(32, 48, 12)) -> None:
    """A small case laid out like the anatomy: caudate, SN and dentate pairs from anterior to
    posterior, right nuclei at low X (LAS grid, as the challenge), bright on a noisy background;
    the NM SN on the QSM SN (the other 10 QSM labels are absent)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    qsm_mask = np.zeros(shape, np.uint8)
    qsm = np.zeros(shape)
    for row, (label, value) in enumerate(EASY_QSM):
        for side, cx in enumerate((9, 23)):  # side 0 = right (odd label), 1 = left
            cx, cy = cx + rng.integers(-2, 3), 40 - 16 * row + rng.integers(-1, 2)
            cz = 6 + rng.integers(-1, 2)
            blob = ((x - cx) ** 2 + (y - cy) ** 2) / 20 + (z - cz) ** 2 / 4 <= 1
            qsm_mask[blob], qsm[blob] = label + side, value
    nm_mask = np.where(qsm_mask == 11, 1, 0) + np.where(qsm_mask == 12, 2, 0)
    qsm += rng.normal(0, 5, shape)
    nm = (nm_mask > 0) * 400.0 + 200 + rng.normal(0, 20, shape)
    folder.mkdir(parents=True)
    for name, arr in (("NM", nm), ("QSM", qsm), ("NM_mask", nm_mask), ("QSM_mask", qsm_mask)):
        dtype = np.uint8 if "mask" in name else np.float32
        nib.save(nib.Nifti1Image(arr.astype(dtype), affine), folder / f"{name}.nii.gz")


def _train(cases: Path, ws: Path, bundle: Path, modality: str, epochs: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = SegTrainConfig(
            tiny=True, epochs=epochs, iters_per_epoch=20, val_iters_per_epoch=1, device="cpu",
            folds=(0,),
        )  # fmt: skip
        train_segmentation(cases, ws, modality=modality, cfg=cfg, bundle=bundle, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_tiny_nm_model_learns_to_segment_unseen_cases(tmp_path):
    """400 CPU iterations of the tiny NM model (seeded, so the run repeats itself) on 4 easy
    cases: SN right and left found on 2 unseen cases (Dice > 0.8 per label, measured 0.99),
    no other label. The 17-class QSM model does not learn reliably in a CI-sized CPU schedule
    (1500-3000 iterations on the same cases: from Dice 0.99 on 4 of 6 labels to under 0.5 on
    2 of 6, depending on the run; docs/segmentation.md), so it is not asserted here."""
    for i in range(6):
        _easy_case(tmp_path / ("train" if i < 4 else "unseen") / f"RJPD_{i:03d}", seed=i)
    bundle = tmp_path / "bundle"
    _train(tmp_path / "train", tmp_path / "ws", bundle, "nm", epochs=20)
    seg = NNUNetSegmenter({"NM": bundle / "nnunet" / "NM"}, device="cpu", use_mirroring=False)
    for folder in sorted((tmp_path / "unseen").iterdir()):
        case = load_case(folder)
        pred = seg.predict_volume(case.nm, "NM")
        assert pred.shape == case.nm.shape
        np.testing.assert_allclose(pred.affine, case.nm.affine)
        assert set(np.unique(pred.array).tolist()) <= {0, 1, 2}
        for label in (1, 2):
            assert dice(pred.array == label, case.nm_mask.array == label) > 0.8, (folder, label)
