"""Per-slice evidence of predicted cases (fold ensemble, calibration) and ``mrn explain``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrn_engine.config import get_preset
from mrn_engine.data import load_case
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import InputDataError
from mrn_engine.inference import MRNPredictor
from mrn_engine.inference.evidence import case_evidence, evidence_volume
from mrn_engine.inference.explain import explain_cases
from mrn_engine.models import build_model, save_model
from mrn_engine.training.calibration import Calibration
from test_inference_predictor import write_case

SLICES = {"nm_sn": 3, "qsm_bg": 4, "qsm_midbrain": 3, "qsm_dentate": 3}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg():
    cfg = get_preset("cpu-tiny").replace(roi={"image_size": 28, "slices": dict(SLICES)})
    return cfg.replace(model={"allow_random_init": True})


def fold_model(cfg, seed):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():  # LayerScale 0.01 at init: make the new blocks matter
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(1.0)
    return model


def tiny_predictor(calibration=None, tta=False):
    cfg = tiny_cfg()
    states = {k: fold_model(cfg, k).state_dict() for k in (0, 1)}
    return MRNPredictor(
        build_model(cfg), states, cfg, device="cpu", tta=tta, calibration=calibration
    )


def test_case_evidence_is_the_fold_mean_of_leave_one_out(tmp_path):
    cals = {
        0: Calibration(0, "temperature", 2.0, 10, "x", 0, 0, 0, 0),
        1: Calibration(1, "temperature", 0.7, 10, "x", 0, 0, 0, 0),
    }
    predictor = tiny_predictor(calibration=cals, tta=True)
    case = load_case(write_case(tmp_path / "c", pd=1))
    pred = predictor.predict_case(case, keep_slice_tokens=True)
    assert len(pred.slice_tokens) == 2 and pred.slice_tokens[0]["qsm_bg"].shape[:2] == (2, 4)
    ev = case_evidence(predictor, pred)
    assert ev.p_pd == pytest.approx(pred.p_pd, abs=1e-5)  # same calibrated ensemble
    # reference for one slice: each fold's full forward with the slice deleted from SFA's input
    roi, s = "qsm_bg", 2
    p_ref = []
    for j, k in enumerate(pred.folds):
        predictor.ensemble.load(k)
        model = predictor.model
        x = pred.slice_tokens[j][roi]
        toks = {n: model.res.sfa(t) for n, t in pred.slice_tokens[j].items()}
        toks[roi] = model.res.sfa(torch.cat([x[:, :s], x[:, s + 1 :]], dim=1))
        with torch.no_grad():
            p = torch.softmax(model.head(model.patient(toks)), -1)[:, 1].mean().item()
        p_ref.append(float(cals[k].apply(p)))
    assert ev.p_without[roi][s] == pytest.approx(np.mean(p_ref), abs=1e-5)
    assert ev.evidence[roi][s] == pytest.approx(ev.p_pd - np.mean(p_ref), abs=1e-5)
    assert max(np.abs(ev.evidence[n]).max() for n in ROI_NAMES) > 1e-4
    # slices map to source z of the crop, like paste_back
    for n in ROI_NAMES:
        box = pred.crops[n].box
        z = ev.source_z[n]
        assert ((z == -1) | ((z >= box.z0) & (z < box.z1))).all()
    # an ROI toggle: masked ROI has no evidence, the others are recomputed
    masked = case_evidence(predictor, pred, {"nm_sn"})
    assert not masked.evidence["nm_sn"].any()
    assert masked.p_pd == pytest.approx(predictor.masked_prediction(pred, ["nm_sn"]).p_pd, abs=1e-5)
    assert not np.allclose(masked.evidence["qsm_bg"], ev.evidence["qsm_bg"])


def test_evidence_volume_paints_each_slice_over_its_box(tmp_path):
    predictor = tiny_predictor()
    case = load_case(write_case(tmp_path / "c"))
    pred = predictor.predict_case(case, keep_slice_tokens=True)
    ev = case_evidence(predictor, pred)
    vol = evidence_volume(ev, pred.crops, "NM", case.nm.array.shape)
    assert vol.shape == case.nm.array.shape and vol.dtype == np.float32
    box = pred.crops["nm_sn"].box
    inside = np.zeros(vol.shape, bool)
    inside[box.x0 : box.x1, box.y0 : box.y1, box.z0 : box.z1] = True
    assert not vol[~inside].any()
    for s, z in enumerate(ev.source_z["nm_sn"].tolist()):
        if z >= 0:
            assert np.all(
                vol[box.x0 : box.x1, box.y0 : box.y1, z] == np.float32(ev.evidence["nm_sn"][s])
            )
    att = evidence_volume(ev, pred.crops, "QSM", case.qsm.array.shape, "attention")
    assert att.max() <= 1 and att.min() >= 0 and att.any()
    with pytest.raises(InputDataError, match="keep_slice_tokens"):
        case_evidence(predictor, predictor.predict_case(case))


def test_explain_cases_writes_maps_on_the_source_grid(tmp_path):
    root = tmp_path / "cases"
    write_case(root / "RJPD_001", pd=1)
    write_case(root / "RJPD_002", seed=1, masks=False)  # no masks, no segmenter: fails alone
    out = tmp_path / "out"
    data = explain_cases(tiny_predictor(), root, out, masked={"qsm_dentate"})
    assert [c["case_id"] for c in data["cases"]] == ["RJPD_001"]
    assert data["errors"][0]["case_id"] == "RJPD_002" and "NM_mask" in data["errors"][0]["error"]
    assert not (out / "RJPD_002").exists() and not list(out.glob(".RJPD*"))
    folder = out / "RJPD_001"
    assert sorted(p.name for p in folder.iterdir()) == [
        "attention_NM.nii.gz",
        "attention_QSM.nii.gz",
        "evidence.csv",
        "evidence_NM.nii.gz",
        "evidence_QSM.nii.gz",
        "summary.png",
    ]
    src = nib.load(root / "RJPD_001" / "QSM.nii.gz")
    img = nib.load(folder / "evidence_QSM.nii.gz")
    assert img.shape == src.shape and np.allclose(img.affine, src.affine)
    assert (folder / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "explain.json").read_text())
    assert meta["meta"]["masked"] == ["qsm_dentate"] and meta["meta"]["calibrated"] is False
    case = meta["cases"][0]
    assert set(case["top_slice"]) == set(ROI_NAMES) and isinstance(case["uncertain"], bool)
    rows = (out / "evidence.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(SLICES.values())
    dentate = [r for r in rows[1:] if ",qsm_dentate," in r]
    assert all(float(r.split(",")[4]) == 0.0 for r in dentate)  # masked ROI: no evidence
    assert ROI_BY_NAME["nm_sn"].modality == "NM"


def test_cli_explain(tmp_path):
    from mrn_engine.cli import cli

    cfg = tiny_cfg()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    cfg.save(bundle / "config.json")
    for k in (0, 1):
        save_model(fold_model(cfg, k), bundle / f"fold_{k}" / "model.safetensors", cfg)
    root = tmp_path / "cases"
    write_case(root / "RJPD_007", pd=1)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli, ["explain", str(root), "--model", str(bundle), "--out", str(out), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert "1 case(s) explained" in res.output and "uncalibrated" in res.output
    assert (out / "RJPD_007" / "evidence_NM.nii.gz").is_file()
    res = CliRunner().invoke(
        cli, ["explain", str(root), "--model", str(bundle), "--out", str(root / "x"), "--quiet"]
    )
    assert res.exit_code != 0 and "outside the input" in str(res.exception or res.output)


def test_evidence_summary_ranks_real_slices_and_skips_padding():
    import numpy as np

    from mrn_engine.data.labels import ROI_NAMES
    from mrn_engine.inference.evidence import CaseEvidence

    ev = {n: np.array([0.05, -0.02, 0.30, 0.01, -0.10]) for n in ROI_NAMES}
    z = {n: np.array([7, 8, -1, 9, 10]) for n in ROI_NAMES}  # slice 2 is padding
    case = CaseEvidence(
        case_id="c",
        masked=frozenset({ROI_NAMES[1]}),
        p_pd=0.6,
        p_without={n: 0.6 - e for n, e in ev.items()},
        evidence=ev,
        attention={n: np.full(5, 0.2) for n in ROI_NAMES},
        source_z=z,
    )
    s = case.summary(k=2)
    assert s["masked"] == [ROI_NAMES[1]] and s["p_pd"] == 0.6
    top = s["rois"][ROI_NAMES[0]]["top_pd"]
    assert [t["slice"] for t in top] == [0, 3]  # 0.30 sits on a padding slice: not listed
    assert [t["source_z"] for t in top] == [7, 9]
    assert top[0]["evidence"] == 0.05 and top[0]["p_without"] == 0.6 - 0.05
    assert s["rois"][ROI_NAMES[0]]["top_hc"] == {"slice": 4, "source_z": 10, "evidence": -0.10}
    assert s["rois"][ROI_NAMES[0]]["n_slices"] == 4
