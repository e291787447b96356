"""``docs/scripts/feature_ceiling.py`` and ``token_probe.py`` on the 8-case phantom cohort:
nucleus features that see the lateral-posterior depigmentation, their cache, the crop features,
the end-to-end table, and the probe's per-fold patient vectors of a bundle."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from docs_scripts import load_docs_script
from mrn_engine import get_preset
from mrn_engine.data.cases import discover_cases, find_labels, load_case
from mrn_engine.inference.predictor import MRNPredictor
from mrn_engine.models import build_model, save_model
from mrn_engine.rois.cache import RoiCache


@pytest.fixture(scope="module")
def fc():
    return load_docs_script("feature_ceiling")


@pytest.fixture(scope="module")
def rows(fc, phantom_root, tmp_path_factory, one_torch_thread):
    cache = tmp_path_factory.mktemp("fc_cache")
    roi_cache = RoiCache(tmp_path_factory.mktemp("fc_roi"))
    return fc.root_features(str(phantom_root), cache, get_preset("cpu-tiny"), roi_cache), cache


def test_nm_features_see_the_lateral_posterior_depigmentation(rows, fc):
    rows, _ = rows
    assert len(rows) == 8 and {r["label"] for r in rows} == {0, 1}
    for r in rows:
        for key in fc.NM_FEATURES + fc.QSM_FEATURES + fc.CROP_NM + fc.CROP_QSM:
            assert np.isfinite(r[key]), key
        for key in fc.CROP_NM + fc.CROP_QSM:
            assert 0.0 <= r[key] <= 255.0, key
    # PD loses pigment laterally-posteriorly (docs/phantom.md): that quadrant against the
    # medial-anterior one drops more in PD than in HC, in the volumes and in the crops
    for lat, med in (("nm_lat_post", "nm_med_ant"), ("crop_nm_lat_post", "crop_nm_med_ant")):
        drop = {c: np.mean([r[lat] - r[med] for r in rows if r["label"] == c]) for c in (0, 1)}
        assert drop[1] < drop[0], (lat, drop)
    vol = {c: np.mean([r["nm_mask_mm3"] for r in rows if r["label"] == c]) for c in (0, 1)}
    assert vol[1] < vol[0]  # depigmented voxels leave the NM mask


def test_features_are_cached_and_read_back(rows, fc, phantom_root):
    rows, cache = rows
    again = fc.root_features(str(phantom_root), cache, get_preset("cpu-tiny"), None)
    assert [r["case_id"] for r in again] == [r["case_id"] for r in rows]
    for a, b in zip(again, rows, strict=True):
        for k, v in b.items():
            assert a[k] == pytest.approx(v) if k != "case_id" else a[k] == v


def test_table_end_to_end(rows, fc, phantom_root, monkeypatch, capsys):
    _, cache = rows
    root = str(phantom_root)
    argv = ["feature_ceiling.py", root, root, "--cache", str(cache), "--bootstrap", "50"]
    argv += ["--subsets", "2"]
    monkeypatch.setattr(sys, "argv", argv + ["--crops", "cpu-tiny", "--roi-cache", str(cache)])
    fc.main()
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith(f"| {phantom_root.name} (8)")]
    assert len(table) == len(fc.FEATURE_SETS) + len(fc.CROP_SETS)
    oracle = float(re.search(r"oracle accuracy ([0-9.]+)", out).group(1))
    assert 0.5 <= oracle <= 1.0
    for line in table:
        acc, auc = re.search(r"\| ([0-9.]+) % \[.*?\] \| ([0-9.]+) \[", line).groups()
        assert 0.0 <= float(acc) <= 100.0 and 0.0 <= float(auc) <= 1.0
    subsets = [ln for ln in out.splitlines() if "2 disjoint subsets of 4" in ln]
    assert len(subsets) == len(table)
    for line in subsets:
        acc, sd = re.search(r"\| ([0-9.]+) ± ([0-9.]+) % \|", line).groups()
        assert 0.0 <= float(acc) <= 100.0 and float(sd) >= 0.0


def test_probe_reads_each_fold_models_patient_vector(phantom_root, tmp_path, one_torch_thread):
    import torch

    tp = load_docs_script("token_probe")
    cfg = get_preset("cpu-tiny")
    bundle = tmp_path / "bundle"
    for k in range(2):
        torch.manual_seed(100 + k)
        save_model(build_model(cfg), bundle / f"fold_{k}" / "model.safetensors", cfg)
    cfg.save(bundle / "config.json")
    folds = [{"fold": k, "train": [], "val": []} for k in range(2)]
    (bundle / "bundle.json").write_text(json.dumps({"folds": folds}))
    files, y = tp.labelled(str(phantom_root))
    assert list(y) == [find_labels(phantom_root)[f.case_id] for f in files]
    reps, p = tp.bundle_representations(str(bundle), files[:3])
    assert reps.shape == (2, 3, 4 * cfg.model.embed_dim) and np.isfinite(reps).all()
    assert not np.allclose(reps[0], reps[1])  # two different fold models
    # the patient vector is what the fold model's own head reads
    pred = MRNPredictor.from_bundle(bundle, device="cpu")
    model = pred.model
    pred.ensemble.load(1)
    case = load_case(discover_cases(phantom_root)[0])
    prepared = pred.prepare(case)
    with torch.no_grad():
        out = model({n: t for n, t in prepared.images.items()})
    assert np.allclose(out.patient[0].numpy(), reps[1, 0], atol=1e-5)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    # cached: the second call reads the npz
    spec = f"arm=bundle:{bundle}"
    first = tp.representations(spec, str(phantom_root), tmp_path / "c", RoiCache(tmp_path / "r"))
    again = tp.representations(spec, str(phantom_root), tmp_path / "c", None)
    assert np.array_equal(first["reps"], again["reps"]) and first["reps"].shape[1] == 8
