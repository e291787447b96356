"""k-fold training into a model bundle on the shared phantom cohort (``phantom_root``)."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrn_engine.config import RunConfig, get_preset
from mrn_engine.data import file_sha256, find_labels
from mrn_engine.errors import ConfigError, InputDataError
from mrn_engine.models import build_model
from mrn_engine.training.cv import train_bundle
from mrn_engine.workflows.compare import comparison_markdown, variant_config
from mrn_engine.workflows.evaluate import oof_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**train) -> RunConfig:
    base = {"folds": 2, "pretrain_epochs": 1, "epochs": 1, "batch_size": 4, "device": "cpu"}
    return get_preset("cpu-tiny").replace(train={**base, **train})


@pytest.fixture(scope="module")
def bundle(phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle_run") / "bundle"
    results = train_bundle(phantom_root, out, small_cfg(), progress=False)
    return out, results


def test_bundle_layout(bundle, phantom_root):
    out, results = bundle
    labels = find_labels(phantom_root)
    assert [r.fold for r in results] == [0, 1] and all(r.finished for r in results)
    cfg = RunConfig.load(out / "config.json")
    assert cfg == small_cfg()
    info = json.loads((out / "bundle.json").read_text())
    assert info["cohort_root"] == str(phantom_root.resolve())
    assert info["labels"] == labels
    vals = [c for f in info["folds"] for c in f["val"]]
    assert sorted(vals) == sorted(labels)
    for f in info["folds"]:
        assert set(f["train"]).isdisjoint(f["val"])
        assert sorted(f["train"] + f["val"]) == sorted(labels)
        assert sum(labels[c] for c in f["val"]) == len(f["val"]) // 2  # balanced cohort, stratified
    assert info["weights_provenance"]["format"] == "random-init"
    assert info["code_version"].startswith("0.")
    for k in (0, 1):
        d = out / f"fold_{k}"
        assert info["weights"][f"fold_{k}"] == file_sha256(d / "model.safetensors")
        # the student only, loadable by build_model + load_state_dict (strict)
        from safetensors.torch import load_file

        model = build_model(RunConfig.load(d / "config.json"), pretrained=False)
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        with open(d / "oof.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(r["case_id"] for r in rows) == sorted(info["folds"][k]["val"])
        assert all(
            0.0 <= float(r["p_pd"]) <= 1.0 and int(r["label"]) == labels[r["case_id"]] for r in rows
        )
        with open(d / "metrics.csv", newline="") as fh:
            metrics = list(csv.DictReader(fh))
        assert [m["stage"] for m in metrics] == ["pretrain", "train"]
        assert float(metrics[0]["loss_seg"]) > 0 and float(metrics[1]["loss_cls"]) > 0
        opt = torch.load(d / "optimizer.pt", weights_only=True)
        assert {g["name"] for g in opt["param_groups"]} >= {"backbone", "head"}
        assert (d / "checkpoints" / "last.json").is_file()
    # the last fold refits one calibration map on the pooled out-of-fold cases (issue 15)
    cals = [json.loads((out / f"fold_{k}" / "calibration.json").read_text()) for k in (0, 1)]
    assert all(c["scope"] == "pooled" and c["n_cases"] == len(labels) for c in cals)
    assert {c["method"] for c in cals} <= {"identity", "temperature", "platt", "isotonic"}
    assert cals[0]["temperature"] == cals[1]["temperature"] and set(cals[0]["selection"]) == {
        "identity",
        "temperature",
        "platt",
        "isotonic",
    }


def test_bundle_opens_in_the_predictor(bundle):
    from mrn_engine.inference import open_bundle

    out, _ = bundle
    b = open_bundle(out)
    assert b.folds == [0, 1] and set(b.splits) == {0, 1}
    m = oof_metrics(out)
    assert m["n"] == 8 and 0.0 <= m["accuracy"] <= 1.0


def test_oof_equals_the_predictor_of_each_fold(bundle, phantom_root):
    """The trainer's out-of-fold P(PD) and MRNPredictor share one inference step."""
    from mrn_engine.bundle import read_oof
    from mrn_engine.data import discover_cases, load_case
    from mrn_engine.inference import MRNPredictor

    out, _ = bundle
    files = {f.case_id: f for f in discover_cases(phantom_root)}
    for k, rows in read_oof(out).items():
        predictor = MRNPredictor.from_bundle(out, device="cpu", folds=[k])
        for r in rows[:2]:
            pred = predictor.predict_case(load_case(files[r["case_id"]]))
            assert pred.p_pd_raw == pytest.approx(r["p_pd"], abs=1e-5), (k, r["case_id"])


def test_score_folder_matches_the_oof_of_each_fold_and_binary_metrics(bundle, phantom_root):
    """score_folder: every labelled case once, fold k's raw P(PD) on its own validation cases
    equals the trainer's out-of-fold value, and the ensemble row is binary_metrics of P(PD)."""
    from mrn_engine.analysis import binary_metrics
    from mrn_engine.bundle import read_oof
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.workflows import score_folder

    out, _ = bundle
    seen: list[str] = []
    s = score_folder(MRNPredictor.from_bundle(out, device="cpu"), phantom_root, on_case=seen.append)
    rows = {r["case_id"]: r for r in s["rows"]}
    assert s["n"] == 8 and sorted(seen) == sorted(rows) == sorted(find_labels(phantom_root))
    for k, oof in read_oof(out).items():
        for r in oof:
            assert rows[r["case_id"]]["p_pd_folds_raw"][k] == pytest.approx(r["p_pd"], abs=1e-5)
    y = [r["label"] for r in s["rows"]]
    p = [r["p_pd"] for r in s["rows"]]
    m = binary_metrics(y, p)
    assert (s["accuracy"], s["auc"]) == (m.accuracy, m.auc) or np.isnan(s["auc"])
    assert s["pd_share"] == np.mean(np.asarray(p) >= 0.5) and len(s["fold_auc"]) == 2
    assert 0 < s["ece_floor"] <= s["ece_floor_p95"] <= 1
    with pytest.raises(InputDataError, match="no labelled case"):
        score_folder(MRNPredictor.from_bundle(out, device="cpu"), out)


def test_rerun_refuses_then_resume_keeps_finished_folds(bundle, phantom_root):
    out, _ = bundle
    before = file_sha256(out / "fold_0" / "model.safetensors")
    with pytest.raises(ConfigError, match="already trained"):
        train_bundle(phantom_root, out, small_cfg(), folds=[0], progress=False)
    with pytest.raises(ConfigError, match="another configuration"):
        train_bundle(phantom_root, out, small_cfg(lr_head=0.5), folds=[0], progress=False)
    train_bundle(phantom_root, out, small_cfg(), folds=[0], resume=True, progress=False)
    assert file_sha256(out / "fold_0" / "model.safetensors") == before


def test_single_fold_cli_stop_and_resume(phantom_root, tmp_path):
    from mrn_engine.cli import cli

    out = tmp_path / "b"
    args = [
        "train",
        str(phantom_root),
        "--out",
        str(out),
        "--preset",
        "cpu-tiny",
        "--folds",
        "2",
        "--pretrain-epochs",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--fold",
        "1",
        "--cache",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    r = CliRunner().invoke(cli, [*args, "--stop-after", "1"])
    assert r.exit_code == 0, r.output
    assert "stopped after epoch 1" in r.output
    assert not (out / "fold_0").exists() and not (out / "fold_1" / "model.safetensors").exists()
    r = CliRunner().invoke(cli, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert "fold 1: done" in r.output
    assert (out / "fold_1" / "model.safetensors").is_file()
    rows = (out / "fold_1" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + epochs 1 (before the stop) and 2 (after resume)


def test_loss_decreases_on_phantoms(phantom_root, tmp_path):
    cfg = small_cfg(folds=2, pretrain_epochs=0, epochs=5, lr_head=2e-3)
    (res,) = train_bundle(phantom_root, tmp_path / "b", cfg, folds=[0], progress=False)
    # the supervised losses; the total also holds lambda_con x the contrastive loss, which
    # rises while the MoCo bank fills with negatives (0.9 -> 2.5 in 5 epochs on 8 cases), so
    # the total went up and down on small phantom sets under either intensity mapping
    losses = [m["loss_cls"] + m["loss_seg"] for m in res.metrics]
    assert len(losses) == 5
    assert losses[-1] < losses[0], losses
    assert res.metrics[-1]["loss_seg"] < res.metrics[0]["loss_seg"]


def test_backbone_weights_sha256_in_bundle_checkpoints_and_model(bundle, phantom_root, tmp_path):
    """Training from a real .safetensors backbone file records that file (path, sha256) in
    bundle.json, in the epoch checkpoint's state.json and in the fold's model.safetensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from test_models_weights import source_state

    weights = tmp_path / "dinov2_tiny.safetensors"
    save_file(source_state(), str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = small_cfg(pretrain_epochs=0, epochs=1).replace(model={"backbone_weights": str(weights)})
    out = tmp_path / "b"
    cache = bundle[0].parent / "roi_cache"  # the ROIs the bundle fixture cached (same ROI config)
    assert cache.is_dir()
    (res,) = train_bundle(phantom_root, out, cfg, folds=[0], cache_dir=cache, progress=False)
    assert res.finished
    expected = {
        "backbone": "tiny",
        "path": str(weights.resolve()),
        "sha256": digest,
        "format": "timm",
    }
    assert json.loads((out / "bundle.json").read_text())["weights_provenance"] == expected
    state = json.loads((out / "fold_0" / "checkpoints" / "epoch_0001" / "state.json").read_text())
    assert state["epoch"] == 1 and state["weights_provenance"] == expected
    with safe_open(str(out / "fold_0" / "model.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["weights_provenance"]) == expected


def test_variants_and_table():
    base = get_preset("cpu-tiny")
    assert variant_config(base, "seres10").model.arch == "seres10"
    assert variant_config(base, "seres10-moco").model.use_moco
    d = variant_config(base, "dinov2-only").model
    assert d.dinov2_only and not (d.use_ffa or d.use_sfa or d.use_dpt or d.use_moco)
    with pytest.raises(ConfigError, match="unknown variant"):
        variant_config(base, "resnet")
    md = comparison_markdown(
        [
            {
                "variant": "mrn",
                "oof_accuracy": 0.8,
                "oof_auc": 0.9,
                "oof_f1": 0.75,
                "heldout_accuracy": float("nan"),
                "heldout_auc": 0.5,
                "heldout_f1": 0.5,
            }
        ]
    )
    assert "| MRN | 80.0% | 90.0% | 75.0% | N/A | 50.0% | 50.0% |" in md


def test_random_init_layerscale_reset():
    from mrn_engine.training.objective import MRNObjective

    cfg = get_preset("cpu-tiny")
    gammas = {n: p for n, p in MRNObjective(cfg).student.named_parameters() if n.endswith(".gamma")}
    assert len(gammas) >= 8 and all(torch.all(p == 1.0) for p in gammas.values())
    kept = MRNObjective(cfg.replace(train={"random_init_layerscale": 0.0})).student
    vit_gamma = dict(kept.named_parameters())["res.patchnizer.vit.blocks.0.ls1.gamma"]
    assert float(vit_gamma.detach().abs().max()) < 1e-3  # the model's own DINOv2 init (1e-5)


@pytest.mark.filterwarnings("ignore:.*the site shift is noisy")  # 4 controls in this cohort
def test_each_fold_stores_its_out_of_fold_controls_for_site_adaptation(
    bundle, phantom_root, monkeypatch
):
    """fold_k/anchor_controls.safetensors = mean patient vector of the fold's val HC cases,
    equal to what the predictor computes; mrn site-adapt then needs no training case."""
    from mrn_engine.data import discover_cases, load_case
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.inference import site_adaptation as sa
    from mrn_engine.training.anchor import read_anchor
    from mrn_engine.workflows.site_adaptation import fit_site

    out, _ = bundle
    info = json.loads((out / "bundle.json").read_text())
    labels = find_labels(phantom_root)
    files = {f.case_id: f for f in discover_cases(phantom_root)}
    predictor = MRNPredictor.from_bundle(out, device="cpu")
    for k in (0, 1):
        mean, ids = read_anchor(out / f"fold_{k}")
        assert sorted(ids) == sorted(c for c in info["folds"][k]["val"] if labels[c] == 0)
        vectors = sa.patient_vectors(predictor, [load_case(files[c]) for c in ids])
        expected = torch.stack([vectors[c][k] for c in ids]).mean(0)
        assert torch.allclose(mean, expected, atol=1e-4), (k, (mean - expected).abs().max())
    with pytest.raises(InputDataError, match="at least 5 reference controls, got 4"):
        fit_site(out, phantom_root, device="cpu")
    monkeypatch.setattr(sa, "MIN_CONTROLS", 3)  # the 4 cohort controls pass, 2 per fold do not
    with pytest.raises(InputDataError, match="fold 0 has 2 anchor controls"):
        fit_site(out, phantom_root, device="cpu")
    monkeypatch.setattr(sa, "MIN_CONTROLS", 2)
    adaptation = fit_site(out, phantom_root, device="cpu")
    assert adaptation.info["train_root"].startswith("stored in the bundle")
    site_hc = [c for c in labels if labels[c] == 0]
    site = sa.patient_vectors(predictor, [load_case(files[c]) for c in site_hc])
    for k in (0, 1):
        mean, _ = read_anchor(out / f"fold_{k}")
        site_mean = torch.stack([site[c][k] for c in site_hc]).mean(0)
        assert torch.allclose(adaptation.shift[k], mean - site_mean, atol=1e-6)


def test_ensemble_calibration_from_unseen_cases_end_to_end(bundle, phantom_root, tmp_path):
    """`mrn calibrate --unlabeled` on unseen phantoms writes the record and refits the pooled
    map on the common logit scale; the predictor then combines the calibrated folds by it
    (full and masked predictions); training cases are refused; a retrained fold voids it with a
    warning."""
    import shutil

    from mrn_engine.cli import cli
    from mrn_engine.data import discover_cases, load_case
    from mrn_engine.errors import MRNWarning
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.phantom import generate_cohort
    from mrn_engine.training.calibration import load_calibrations
    from mrn_engine.training.calibration_pooled import fold_scales
    from mrn_engine.training.ensemble_calibration import ENSEMBLE_FILE, read_ensemble_calibration

    out = tmp_path / "bundle"
    shutil.copytree(bundle[0], out)
    res = CliRunner().invoke(cli, ["calibrate", str(out), "--unlabeled", str(phantom_root)])
    assert isinstance(res.exception, InputDataError)
    assert "8 training case(s) left out" in str(res.exception)
    assert not (out / ENSEMBLE_FILE).exists()

    unseen = tmp_path / "unseen"
    generate_cohort(unseen, n=10, seed=4242, workers=2, progress=False)
    res = CliRunner().invoke(
        cli, ["calibrate", str(out), "--unlabeled", str(unseen), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    ens = read_ensemble_calibration(out)
    assert ens is not None and ens.n_cases == 10 and ens.folds == (0, 1)
    assert f"multiplied by {ens.factor(2):.2f}" in res.output

    case = load_case(next(iter(discover_cases(phantom_root))))
    predictor = MRNPredictor.from_bundle(out, device="cpu")
    pred = predictor.predict_case(case, nuclei=False)
    assert pred.p_pd == pytest.approx(ens.combine(pred.probabilities.p_pd_folds), abs=1e-12)
    plain = MRNPredictor.from_bundle(bundle[0], device="cpu").predict_case(case, nuclei=False)
    assert pred.p_pd_folds_raw == plain.p_pd_folds_raw and pred.p_pd_raw == plain.p_pd_raw
    # the pooled map was refitted with each fold's logits on the scale of the unseen cases
    scales = fold_scales({k: ens.fold_logit_sd[str(k)] for k in (0, 1)})
    cals = load_calibrations(out, [0, 1])
    assert [cals[k].scale for k in (0, 1)] == pytest.approx([scales[0], scales[1]])
    assert "common scale" in cals[0].note and "common scale" in res.output
    assert pred.p_pd_folds == pytest.approx(
        [cals[k].apply(pred.p_pd_folds_raw[i]) for i, k in enumerate((0, 1))], abs=1e-12
    )
    masked = predictor.masked_prediction(pred, ["nm_sn"])
    assert masked.p_pd == pytest.approx(ens.combine(masked.p_pd_folds), abs=1e-12)

    info = json.loads((out / "bundle.json").read_text())
    info["weights"]["fold_1"] = "0" * 64
    (out / "bundle.json").write_text(json.dumps(info))
    with pytest.warns(MRNWarning, match=r"fold\(s\) \[1\] retrained"):
        stale = MRNPredictor.from_bundle(out, device="cpu")
    assert stale.ensemble_calibration is None


def test_each_fold_stores_the_healthy_reference_of_per_slice_evidence(
    bundle, phantom_root, tmp_path
):
    """fold_k/reference_slices.safetensors = the mean slice token of the fold's training
    controls (as is and mirrored), equal to what the predictor's TTA forward gives; evidence
    uses it; `mrn calibrate --reference-cases` writes the same files into an older bundle."""
    import shutil

    from mrn_engine.cli import cli
    from mrn_engine.data import discover_cases, load_case
    from mrn_engine.inference import MRNPredictor
    from mrn_engine.inference.evidence import case_evidence
    from mrn_engine.training.reference_slices import REFERENCE_FILE, read_reference_slices

    out, _ = bundle
    info = json.loads((out / "bundle.json").read_text())
    labels = find_labels(phantom_root)
    files = {f.case_id: f for f in discover_cases(phantom_root)}
    predictor = MRNPredictor.from_bundle(out, device="cpu", tta=True)
    assert set(predictor.reference_slices) == {0, 1}
    kept = {}
    for c in files:
        pred = predictor.predict_case(load_case(files[c]), keep_slice_tokens=True, nuclei=False)
        kept[c] = pred.slice_tokens
    stored = {}
    for j, k in enumerate((0, 1)):
        means, ids = read_reference_slices(out / f"fold_{k}")
        stored[k] = means
        assert sorted(ids) == sorted(c for c in info["folds"][k]["train"] if labels[c] == 0)
        for n, m in means.items():
            expected = torch.stack([kept[c][j][n].mean(0) for c in ids]).mean(0)
            assert m.shape == expected.shape
            assert torch.allclose(m, expected, atol=1e-4), (k, n, (m - expected).abs().max())
    ev = case_evidence(predictor, pred)
    assert ev.method == "reference" and "healthy reference" in ev.summary()["definition"]
    loo = case_evidence(predictor, pred, method="leave-out")
    assert loo.method == "leave-out" and not np.allclose(
        loo.evidence["nm_sn"], ev.evidence["nm_sn"]
    )

    old = tmp_path / "bundle"  # a bundle from before the reference: leave-out, then backfilled
    shutil.copytree(out, old)
    for k in (0, 1):
        (old / f"fold_{k}" / REFERENCE_FILE).unlink()
    older = MRNPredictor.from_bundle(old, device="cpu", tta=True)
    pred = older.predict_case(load_case(files[c]), keep_slice_tokens=True, nuclei=False)
    assert case_evidence(older, pred).method == "leave-out"
    with pytest.raises(InputDataError, match="--reference-cases"):
        case_evidence(older, pred, method="reference")
    res = CliRunner().invoke(
        cli, ["calibrate", str(old), "--reference-cases", str(phantom_root), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "healthy reference slice tokens written" in res.output
    for k in (0, 1):
        means, _ = read_reference_slices(old / f"fold_{k}")
        for n, m in means.items():
            assert torch.allclose(m, stored[k][n], atol=1e-5)
