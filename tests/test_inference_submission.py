"""Model bundles, `mrn predict` submission format, `mrn ablate-rois`, with the real cpu-tiny MRN."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrn_engine.cli import cli
from mrn_engine.config import get_preset
from mrn_engine.data import load_case
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.data.roi_subsets import subset_key
from mrn_engine.errors import InputDataError, WeightsError
from mrn_engine.inference import MRNPredictor, open_bundle
from mrn_engine.models import build_model, save_model
from test_inference_predictor import write_case


def make_bundle(root, folds=(0, 1)):
    """A model bundle as `mrn train` writes it, with random cpu-tiny MRN weights per fold."""
    cfg = get_preset("cpu-tiny").replace(
        roi={"image_size": 28, "slices": dict.fromkeys(ROI_NAMES, 4)}
    )
    root.mkdir(parents=True)
    cfg.save(root / "config.json")
    (root / "bundle.json").write_text(
        json.dumps(
            {"folds": [{"fold": k, "train": ["RJPD_001"], "val": ["RJPD_002"]} for k in folds]}
        )
    )
    for k in folds:
        torch.manual_seed(10 + k)
        save_model(
            build_model(cfg, pretrained=False), root / f"fold_{k}" / "model.safetensors", cfg
        )
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("c") / "cases"
    write_case(root / "nested" / "RJPD_001", seed=1, pd=1)
    write_case(root / "nested" / "RJPD_002", seed=2, pd=0)
    bad = write_case(root / "RJPD_003", seed=3)
    (bad / "NM.nii.gz").write_bytes(b"not a nifti")
    (root / "train_cases.csv").write_text("RJPD_001,1\nRJPD_002,0\nRJPD_003,0\n")
    return root


def test_open_bundle_and_errors(bundle, tmp_path):
    b = open_bundle(bundle)
    assert b.folds == [0, 1] and b.splits[1]["val"] == ["RJPD_002"]
    assert b.config.preset == "cpu-tiny"
    with pytest.raises(InputDataError, match="not a model bundle"):
        open_bundle(tmp_path)
    with pytest.raises(InputDataError, match=r"fold\(s\) \[7\] not in the bundle"):
        MRNPredictor.from_bundle(bundle, device="cpu", folds=[7])
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "fold_1" / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(WeightsError, match="fold_1/model.safetensors: cannot read weights"):
        MRNPredictor.from_bundle(broken, device="cpu")


def test_real_mrn_masking_equals_zeroed_input(bundle, cases_dir):
    predictor = MRNPredictor.from_bundle(bundle, device="cpu", folds=[0, 1], tta=True)
    assert predictor.device.type == "cpu" and predictor.folds == [0, 1]
    case = load_case(cases_dir / "nested" / "RJPD_001")
    pred = predictor.predict_case(case)
    assert pred.seg_source == "dpt"
    assert pred.roi_tokens[0]["nm_sn"].shape[0] == 2  # original + mirrored view
    predictor.masking_table(pred)  # warms the per-fold empty-volume tokens
    calls = {"n": 0}
    encode = predictor.model._encode

    def counting(*a, **k):
        calls["n"] += 1
        return encode(*a, **k)

    predictor.model._encode = counting
    masked = {"nm_sn", "qsm_midbrain"}
    m = predictor.masked_prediction(pred, masked)
    table = predictor.masking_table(pred)
    assert calls["n"] == 0  # no backbone pass for masking
    ref = predictor.predict_case(case, zero_rois=masked)
    assert calls["n"] == 2  # one forward per fold (both TTA views in one batch)
    assert m.p_pd_folds == pytest.approx(ref.p_pd_folds, abs=1e-5)
    by = {subset_key(r.masked): r for r in table}
    assert by["NM+QSM2"].p_pd == pytest.approx(ref.p_pd, abs=1e-5)
    assert by["none"].p_pd == pytest.approx(pred.p_pd, abs=1e-6)


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_predict_cli_writes_the_submission_format(bundle, cases_dir, tmp_path):
    out = tmp_path / "out"
    args = [
        "predict",
        str(cases_dir),
        "--model",
        str(bundle),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    ]
    res = CliRunner().invoke(cli, [*args, "--folds", "0,1", "--tta"])
    assert res.exit_code == 3, res.output  # some cases failed: distinct exit status
    assert "FAILED: 1 of 3 case(s): RJPD_003" in res.output
    rows = _read(out / "label_predict.csv")
    assert rows[0] == ["patient_id", "prediction"]
    assert [r[0] for r in rows[1:]] == ["RJPD_001", "RJPD_002"]
    probs = {r["case_id"]: r for r in csv.DictReader(open(out / "probabilities.csv"))}
    assert list(probs["RJPD_001"]) == [
        "case_id",
        "p_pd_fold0",
        "p_pd_fold1",
        "p_pd",
        "p_pd_std",
        "call",
        "p_pd_raw",
        "mask_source",
        "error",
    ]
    assert probs["RJPD_001"]["p_pd_raw"] == probs["RJPD_001"]["p_pd"]  # uncalibrated bundle
    assert probs["RJPD_003"]["p_pd"] == "" and probs["RJPD_003"]["error"].startswith("RJPD_003")
    assert probs["RJPD_001"]["mask_source"] == "case"  # the case folder's own masks
    for cid in ("RJPD_001", "RJPD_002"):
        folder = out / cid
        assert sorted(p.name for p in folder.iterdir()) == [
            "NM_pred.nii.gz",
            "PD_pred.txt",
            "QSM_pred.nii.gz",
        ]
        call = (folder / "PD_pred.txt").read_text()
        assert call in ("0", "1") and call == probs[cid]["call"] == rows[1 + int(cid[-1]) - 1][1]
        p = float(probs[cid]["p_pd"])
        assert p == pytest.approx(
            (float(probs[cid]["p_pd_fold0"]) + float(probs[cid]["p_pd_fold1"])) / 2, abs=1e-5
        )
        assert int(call) == int(p >= 0.5)
        for pred_name, src in (("NM_pred.nii.gz", "NM.nii.gz"), ("QSM_pred.nii.gz", "QSM.nii.gz")):
            img, ref = nib.load(folder / pred_name), nib.load(cases_dir / "nested" / cid / src)
            assert img.get_data_dtype() == np.uint8
            assert img.shape == ref.shape
            np.testing.assert_allclose(img.affine, ref.affine)
            values = set(np.unique(np.asarray(img.dataobj)).tolist())
            assert values <= ({0, 1, 2} if pred_name.startswith("NM") else set(range(17)))
    js = json.loads((out / "probabilities.json").read_text())
    assert js["meta"]["tta"] is True and js["meta"]["folds"] == [0, 1]
    assert [c["case_id"] for c in js["cases"]] == ["RJPD_001", "RJPD_002", "RJPD_003"]
    assert js["cases"][2]["p_pd"] is None and js["cases"][2]["error"]
    errors = json.loads((out / "errors.json").read_text())
    assert [e["case_id"] for e in errors] == ["RJPD_003"]
    assert json.loads((out / "config.json").read_text())["preset"] == "cpu-tiny"
    assert not [p for p in out.rglob(".*")]  # no temporary leftovers
    # a second run (one fold, no TTA) replaces the outputs cleanly
    res = CliRunner().invoke(cli, [*args, "--folds", "1", "--no-tta", "--allow-partial"])
    assert res.exit_code == 0, res.output
    assert _read(out / "probabilities.csv")[0] == [
        "case_id",
        "p_pd_fold1",
        "p_pd",
        "p_pd_std",
        "call",
        "p_pd_raw",
        "mask_source",
        "error",
    ]
    assert not [p for p in out.rglob(".*")]
    # never into the input folder
    res = CliRunner().invoke(
        cli,
        [
            "predict",
            str(cases_dir),
            "--model",
            str(bundle),
            "--out",
            str(cases_dir),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert res.exit_code != 0 and "must differ from the input folder" in str(res.exception)
    res = CliRunner().invoke(
        cli,
        [
            "predict",
            str(cases_dir),
            "--model",
            str(bundle),
            "--out",
            str(cases_dir / "preds"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert res.exit_code != 0 and "must not lie inside the input folder" in str(res.exception)
    assert not (cases_dir / "preds").exists()


def test_ablate_rois_cli_and_report(bundle, cases_dir, tmp_path):
    out = tmp_path / "abl"
    res = CliRunner().invoke(
        cli,
        [
            "ablate-rois",
            str(cases_dir),
            "--model",
            str(bundle),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--folds",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(open(out / "masking_table.csv")))
    assert len(table) == 16 and table[0]["masked"] == "none" and table[0]["n"] == "2"
    assert [r["NM"] for r in table[:2]] == ["", "x"]
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    assert [(r["case_id"], r["label"]) for r in preds] == [("RJPD_001", "1"), ("RJPD_002", "0")]
    per_case = list(csv.DictReader(open(out / "masking_cases.csv")))
    assert len(per_case) == 32
    none = {r["case_id"]: float(r["p_pd"]) for r in per_case if r["masked"] == "none"}
    assert none == pytest.approx({r["case_id"]: float(r["p_pd"]) for r in preds}, abs=1e-6)
    assert "| NM | QSM1 | QSM2 | QSM3 | accuracy |" in (out / "masking_table.md").read_text()
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    assert [m["set"] for m in metrics] == ["fold 0", "ensemble"]
    assert [e["case_id"] for e in json.loads((out / "errors.json").read_text())] == ["RJPD_003"]
    res = CliRunner().invoke(
        cli,
        [
            "report",
            str(bundle),
            "--out",
            str(tmp_path / "r.html"),
            "--eval",
            str(out / "predictions.csv"),
            "--masking",
            str(out / "masking_table.csv"),
        ],
    )
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text()
    assert (
        html.count("data:image/png;base64,") == 4
    )  # ROC, confusion, masking, reliability (no metrics.csv here)


def test_bundle_nnunet_hook_is_lazy_and_reports_per_case(bundle, cases_dir, tmp_path):
    b2 = tmp_path / "b2"
    shutil.copytree(bundle, b2)
    (b2 / "nnunet").mkdir()  # incomplete nnU-Net folder: only matters for cases without masks
    predictor = MRNPredictor.from_bundle(b2, device="cpu", folds=[0])
    assert predictor.segmenter is None and predictor.segmenter_factory is not None
    ok = predictor.predict_case(load_case(cases_dir / "nested" / "RJPD_001"))
    assert ok.mask_source == "case"
    bare = tmp_path / "bare"
    write_case(bare / "RJPD_010", seed=10, masks=False)
    shutil.copytree(cases_dir / "nested" / "RJPD_002", bare / "RJPD_002")
    result = predictor.predict_cases(bare, tmp_path / "out", progress=False)
    assert [e["case_id"] for e in result.errors] == ["RJPD_010"]
    assert "no nnU-Net models found" in result.errors[0]["error"]
    assert (tmp_path / "out" / "RJPD_002" / "PD_pred.txt").is_file()
    assert not (tmp_path / "out" / "RJPD_010").exists()


def test_seres10_baseline_gets_masks_and_supports_masking(tmp_path):
    cfg = get_preset("cpu-tiny").replace(
        roi={"image_size": 28, "slices": dict.fromkeys(ROI_NAMES, 4)}, model={"arch": "seres10"}
    )
    states = {}
    for k in (0, 1):
        torch.manual_seed(k)
        states[k] = build_model(cfg, pretrained=False).state_dict()
    predictor = MRNPredictor(
        build_model(cfg, pretrained=False), states, cfg, device="cpu", tta=True
    )
    assert predictor.model.needs_masks
    case = load_case(write_case(tmp_path / "RJPD_001", seed=1, pd=1))
    pred = predictor.predict_case(case)
    assert pred.seg_source == "input-masks"  # no DPT: the cropping masks are written
    assert set(np.unique(pred.nuclei)) == set(range(17))
    masked = predictor.masked_prediction(pred, {"nm_sn"})
    zeroed = predictor.predict_case(case, zero_rois={"nm_sn"})  # image and mask input zeroed
    assert masked.p_pd_folds == pytest.approx(zeroed.p_pd_folds, abs=1e-5)


def test_predict_cli_no_nuclei_gives_the_same_calls_without_masks(bundle, cases_dir, tmp_path):
    def run(out, *extra):
        args = ["predict", str(cases_dir), "--model", str(bundle), "--out", str(out)]
        res = CliRunner().invoke(cli, [*args, "--device", "cpu", "--quiet", *extra])
        assert res.exit_code == 3, res.output  # RJPD_003 is broken in both runs
        return {r["case_id"]: r for r in csv.DictReader(open(out / "probabilities.csv"))}

    full, fast = run(tmp_path / "full"), run(tmp_path / "fast", "--no-nuclei")
    for cid in ("RJPD_001", "RJPD_002"):
        assert float(fast[cid]["p_pd"]) == pytest.approx(float(full[cid]["p_pd"]), abs=1e-6)
        assert fast[cid]["call"] == full[cid]["call"]
        assert sorted(p.name for p in (tmp_path / "fast" / cid).iterdir()) == ["PD_pred.txt"]
        assert (tmp_path / "full" / cid / "QSM_pred.nii.gz").is_file()
        assert (tmp_path / "fast" / cid / "PD_pred.txt").read_bytes() == (
            tmp_path / "full" / cid / "PD_pred.txt"
        ).read_bytes()
