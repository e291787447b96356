"""Outputs: a disk-full run leaves nothing that looks complete, a NaN probability is an error,
an odd geometry never crashes the writer, and outputs follow the umask."""

from __future__ import annotations

import errno
import os
import stat

import nibabel as nib
import numpy as np
import pytest

import mrn_engine.inference.submission as sub
from mrn_engine.config import atomic_write_text, get_preset
from mrn_engine.data import load_case
from mrn_engine.data.nifti import Volume, save_volume
from mrn_engine.errors import InputDataError
from mrn_engine.inference import MRNPredictor
from mrn_engine.inference.sanity import NonFiniteOutputError
from mrn_engine.inference.submission import OutputWriteError, predict_cases
from test_inference_predictor import write_case
from test_inference_submission import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", folds=(0,))


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("c") / "cases"
    for i in range(1, 5):
        write_case(root / f"RJPD_00{i}", seed=i, pd=i % 2)
    return root


def test_disk_full_leaves_no_half_submission(bundle, cases_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = sub.write_pd_pred
    calls = []

    def full_after_one(folder, call):
        calls.append(folder)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / sub.PD_PRED))
        return real(folder, call)

    monkeypatch.setattr(sub, "write_pd_pred", full_after_one)
    predictor = MRNPredictor.from_bundle(bundle, device="cpu")
    with pytest.raises(
        OutputWriteError, match=r"PD_pred\.txt: cannot write.*No space left.*disk full"
    ):
        predict_cases(predictor, cases_dir, out, progress=False)
    assert list(out.iterdir()) == []  # no case folder, no CSV, no staging leftovers


def test_non_finite_probability_is_a_case_error(bundle, cases_dir):
    predictor = MRNPredictor.from_bundle(bundle, device="cpu")
    for v in predictor.ensemble.fold_states[0].values():  # corrupt after the load-time check
        if v.is_floating_point():
            v.fill_(float("nan"))
    predictor.ensemble._loaded = None  # the next forward swaps the corrupted weights in
    with pytest.raises(NonFiniteOutputError, match=r"RJPD_001: .*non-finite logit/probability"):
        predictor.predict_case(load_case(cases_dir / "RJPD_001"))


def test_singular_affine_never_crashes_the_writer(tmp_path):
    affine = np.diag([1.0, 0.0, 1.0, 1.0])
    vol = Volume(np.ones((4, 4, 4), np.float32), affine)
    with pytest.raises(InputDataError, match=r"out\.nii\.gz: singular affine"):
        save_volume(vol, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_singular_affine_is_caught_when_loading(tmp_path):
    img = nib.Nifti1Image(np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32), None)
    bad = np.eye(4)
    bad[1, :3] = 0
    img.set_sform(bad, code=1)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "QSM.nii.gz")
    from mrn_engine.data import load_volume

    with pytest.raises(InputDataError, match=r"QSM\.nii\.gz: singular affine \(row y is zero\)"):
        load_volume(tmp_path / "QSM.nii.gz")


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode, bundle, cases_dir):
    from mrn_engine.models import build_model, save_model

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_volume(
            Volume(np.eye(4, dtype=np.float32)[:, :, None].repeat(2, 2), np.eye(4)),
            tmp_path / "v.nii.gz",
        )
        cfg = get_preset("cpu-tiny")
        save_model(build_model(cfg, pretrained=False), tmp_path / "m" / "model.safetensors", cfg)
        predictor = MRNPredictor.from_bundle(bundle, device="cpu")
        predict_cases(predictor, cases_dir, tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    files = [tmp_path / "a.txt", tmp_path / "v.nii.gz", tmp_path / "m" / "model.safetensors"]
    files += [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p
    for p in [p for p in (tmp_path / "out").rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(p.stat().st_mode) == dir_mode, p
