"""Site harmonisation from local controls: exact head folding, fitting, files, CLI round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mrn_engine.badinput.cases import write_bundle, write_case
from mrn_engine.cli import cli
from mrn_engine.config import get_preset
from mrn_engine.data import discover_cases, load_case
from mrn_engine.errors import ConfigError, InputDataError, WeightsError
from mrn_engine.inference import MRNPredictor
from mrn_engine.inference.site_adaptation import (
    MIN_CONTROLS,
    SiteAdaptation,
    anchors_from_vectors,
    fit_site_adaptation,
    head_p_pd,
    load_site_adaptation,
    patient_vectors,
)
from mrn_engine.models import build_model
from mrn_engine.workflows.site_adaptation import fit_site

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # the tiny cohorts here have fewer than 10 controls: asserted once below, quiet elsewhere
    pytest.mark.filterwarnings("ignore:.*the site shift is noisy"),
]


@pytest.mark.parametrize("input_norm", [True, False])
def test_the_shift_is_folded_into_the_head_exactly(input_norm):
    """head(v + delta) with the bundle's weights == head(v) with the adapted weights."""
    cfg = get_preset("cpu-tiny").replace(model={"head_input_norm": input_norm})
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    if input_norm:  # non-trivial running statistics, as after training
        bn = model.head.mlp[0]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    dim = model.head.mlp[1 if input_norm else 0].in_features
    v = torch.randn(6, dim)
    delta = torch.randn(dim)
    state = model.state_dict()
    with torch.no_grad():
        expected = model.head(v + delta)
        model.load_state_dict(SiteAdaptation({0: delta}).adapt_state(0, state))
        got = model.head(v)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, model.head(v - delta), atol=1e-3)  # the shift matters
    with pytest.raises(WeightsError, match="shape"):
        SiteAdaptation({0: torch.zeros(dim + 1)}).adapt_state(0, state)
    with pytest.raises(ConfigError, match="classification head"):
        SiteAdaptation({0: delta}).adapt_state(0, {"other.weight": torch.zeros(2, dim)})


def _vectors(ids, mean, rng, folds=(0, 1)):
    return {
        c: {k: torch.tensor(mean + rng.normal(0, 0.01, mean.shape)).float() for k in folds}
        for c in ids
    }


def test_fit_moves_the_site_controls_onto_the_training_controls():
    rng = np.random.default_rng(0)
    hc, pd, offset = np.zeros(8), np.full(8, 3.0), np.linspace(-2, 2, 8)
    train = {**_vectors([f"T{i}" for i in range(10)], hc, rng)}
    train |= _vectors([f"P{i}" for i in range(10)], pd, rng)  # PD cases never enter the shift
    site = _vectors([f"S{i}" for i in range(12)], hc + offset, rng)
    controls = {0: [f"T{i}" for i in range(10)], 1: [f"T{i}" for i in range(5, 10)]}
    anchors = anchors_from_vectors(train, controls)
    fitted = fit_site_adaptation(anchors, site, list(site), {"site": "B"})
    for k in (0, 1):
        assert np.allclose(fitted.shift[k].numpy(), -offset, atol=0.02)
    assert fitted.site == "B" and fitted.info["n_site_controls"] == 12
    assert fitted.info["n_train_controls"] == {"0": 10, "1": 5}
    with pytest.raises(InputDataError, match=f"at least {MIN_CONTROLS} reference controls"):
        fit_site_adaptation(anchors, site, list(site)[: MIN_CONTROLS - 1])
    with pytest.raises(InputDataError, match="fold 1 has 2 anchor controls"):
        anchors_from_vectors(train, {0: controls[0], 1: ["T1", "T2"]})


def test_file_round_trip_and_bad_files(tmp_path):
    a = SiteAdaptation({0: torch.arange(4.0), 2: -torch.ones(4)}, {"site": "S", "n": 3})
    path = a.save(tmp_path / "site.safetensors")
    b = load_site_adaptation(path)
    assert b.folds == [0, 2] and b.site == "S" and b.info["n"] == 3
    assert all(torch.equal(a.shift[k], b.shift[k]) for k in a.folds)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(InputDataError, match="bad.safetensors: not a site adaptation file"):
        load_site_adaptation(bad)
    from safetensors.torch import save_file

    save_file({"fold_0": torch.zeros(4)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputDataError, match="no mrn_site_adaptation metadata"):
        load_site_adaptation(tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match=".safetensors"):
        a.save(tmp_path / "site.pt")
    with pytest.raises(InputDataError, match="not found"):
        load_site_adaptation(tmp_path / "missing.safetensors")


def _labelled(root, n, first, *, pd_every=0, gain=1.0):
    """``n`` cases RJPD_<first...>; every ``pd_every``-th is PD; NM scaled by ``gain``."""
    import nibabel as nib

    rows = []
    for i in range(first, first + n):
        pd = int(pd_every > 0 and i % pd_every == 0)
        folder = write_case(root / f"RJPD_{i:03d}", seed=i, pd=pd)
        if gain != 1.0:  # another scanner: NM gain
            img = nib.load(folder / "NM.nii.gz")
            arr = np.asarray(img.dataobj, dtype=np.float32) * gain + 50.0
            nib.save(nib.Nifti1Image(arr, img.affine), folder / "NM.nii.gz")
        rows.append(f"RJPD_{i:03d},{pd}")
    (root / "train_cases.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def site_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("site")
    train = _labelled(base / "train", 8, 1, pd_every=4)  # 6 controls, 2 PD
    bundle = write_bundle(base / "bundle", folds=(0, 1))
    info = json.loads((bundle / "bundle.json").read_text())
    ids = [f"RJPD_{i:03d}" for i in range(1, 9)]
    info["folds"] = [{"fold": k, "train": ids, "val": []} for k in (0, 1)]
    info["cohort_root"] = str(train)
    (bundle / "bundle.json").write_text(json.dumps(info))
    site = _labelled(base / "siteB", 7, 50, pd_every=0, gain=0.6)  # 7 controls
    return bundle, train, site


def test_fit_site_end_to_end_aligns_the_controls(site_setup, tmp_path):
    bundle, train, site = site_setup
    with pytest.warns(UserWarning, match="only 7 reference controls; the site shift is noisy"):
        adaptation = fit_site(bundle, site, device="cpu")
    assert adaptation.info["n_site_controls"] == 7
    assert adaptation.info["n_train_controls"] == {"0": 6, "1": 6}
    plain = MRNPredictor.from_bundle(bundle, device="cpu")
    adapted = MRNPredictor.from_bundle(bundle, device="cpu", site_adaptation=adaptation)
    site_cases = [load_case(c) for c in discover_cases(site)]
    v_site = patient_vectors(plain, site_cases)
    train_hc = [load_case(c) for c in discover_cases(train) if int(c.case_id[-3:]) % 4]
    v_train = patient_vectors(plain, train_hc)
    assert patient_vectors(adapted, site_cases[:1]).keys() == {site_cases[0].case_id}
    for k in (0, 1):  # after the shift the site's control mean is the training control mean
        site_mean = torch.stack([v[k] for v in v_site.values()]).mean(0)
        train_mean = torch.stack([v[k] for v in v_train.values()]).mean(0)
        assert torch.allclose(site_mean + adaptation.shift[k], train_mean, atol=1e-5)
    # the adapted predictor's P(PD) is the head on the shifted vector, fold by fold
    case = site_cases[0]
    got = adapted.predict_case(case, nuclei=False)
    model = plain.model
    for j, k in enumerate(plain.folds):
        plain.ensemble.load(k)
        with torch.no_grad():
            v = v_site[case.case_id][k][None] + adaptation.shift[k][None]
            p = torch.softmax(model.head(v), -1)[0, 1].item()
        assert got.p_pd_folds_raw[j] == pytest.approx(p, abs=1e-5)
    assert got.site == "siteB" and got.summary()["site_adaptation"] == "siteB"
    # the head-only helper (mrn site-adapt's report, the benchmark) gives the same P(PD)
    (p_head,) = head_p_pd(plain, v_site, [case.case_id], adaptation)
    assert p_head == pytest.approx(got.p_pd, abs=1e-6)
    assert plain.predict_case(case, nuclei=False).p_pd == pytest.approx(
        head_p_pd(plain, v_site, [case.case_id])[0], abs=1e-6
    )  # and the plain predictor is untouched by it
    report = adaptation.info["site_controls_p_pd"]
    site_p = head_p_pd(plain, v_site, list(v_site), adaptation)
    assert report["adapted"] == pytest.approx(sum(site_p) / len(site_p), abs=1e-9)
    # leave-one-out: each control is scored by the shift fitted on the other six
    loo = []
    for c in v_site:
        others = [o for o in v_site if o != c]
        shift = {
            k: adaptation.shift[k]
            + torch.stack([v[k] for v in v_site.values()]).mean(0)
            - torch.stack([v_site[o][k] for o in others]).mean(0)
            for k in (0, 1)
        }
        loo += head_p_pd(plain, v_site, [c], SiteAdaptation(shift))
    assert report["adapted_leave_one_out"] == pytest.approx(sum(loo) / len(loo), abs=1e-6)
    assert report["called_pd_leave_one_out"] == sum(p >= 0.5 for p in loo) / len(loo)
    # a left-out control sits n / (n - 1) times as far from the anchor as in the fit
    assert np.std(loo) > np.std(site_p) * 1.05
    # fitting on the training controls themselves gives (numerically) no shift
    own = fit_site(bundle, train, device="cpu")
    assert max(float(s.abs().max()) for s in own.shift.values()) < 1e-5


def test_site_adapt_cli_and_predict_round_trip(site_setup, tmp_path):
    bundle, train, site = site_setup
    runner = CliRunner()
    out = tmp_path / "siteB.safetensors"
    res = runner.invoke(cli, ["site-adapt", str(bundle), str(site), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "7 reference controls" in res.output and out.is_file()
    assert "the site's controls: mean P(PD)" in res.output and "adapted; called PD" in res.output
    assert "each control left out of the fit and then scored: called PD" in res.output
    pred_dir = tmp_path / "pred"
    res = runner.invoke(
        cli,
        ["predict", str(site), "--model", str(bundle), "--out", str(pred_dir),
         "--site-adaptation", str(out), "--quiet", "--no-nuclei"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((pred_dir / "probabilities.json").read_text())["meta"]
    assert meta["site_adaptation"]["site"] == "siteB"
    assert meta["site_adaptation"]["n_site_controls"] == 7
    # another bundle's weights: refused with the reason
    other = write_bundle(tmp_path / "other", folds=(0, 1))
    info = json.loads((other / "bundle.json").read_text())
    info["weights"] = {"fold_0": "0" * 64, "fold_1": "1" * 64}
    (other / "bundle.json").write_text(json.dumps(info))
    adaptation = load_site_adaptation(out)
    adaptation.info["bundle_weights"] = {"fold_0": "f" * 64}
    with pytest.raises(WeightsError, match="other fold 0 weights"):
        MRNPredictor.from_bundle(other, device="cpu", site_adaptation=adaptation)


def test_reference_without_labels_needs_all_controls(site_setup, tmp_path):
    bundle, train, site = site_setup
    unlabelled = tmp_path / "u"
    for i in range(5):
        write_case(unlabelled / f"RJPD_{i:03d}", seed=i)
    with pytest.raises(InputDataError, match="--all-controls"):
        fit_site(bundle, unlabelled, device="cpu")
    with pytest.warns(UserWarning, match="only 5 reference controls"):
        a = fit_site(bundle, unlabelled, all_controls=True, device="cpu")
    assert a.info["n_site_controls"] == 5
    with pytest.raises(InputDataError, match="call .* PD"):
        fit_site(bundle, train, all_controls=True, device="cpu")
    with pytest.raises(InputDataError, match="training cohort not found"):
        fit_site(bundle, site, train_root=tmp_path / "nowhere", device="cpu")


def test_each_fold_is_anchored_on_the_controls_it_never_trained_on(site_setup, tmp_path):
    import shutil

    from mrn_engine.workflows.site_adaptation import training_controls

    bundle, train, _ = site_setup
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    info = json.loads((copy / "bundle.json").read_text())
    first, second = [f"RJPD_{i:03d}" for i in range(1, 5)], [f"RJPD_{i:03d}" for i in range(5, 9)]
    info["folds"] = [
        {"fold": 0, "train": first, "val": second},
        {"fold": 1, "train": second, "val": first},
    ]
    info["labels"] = {c: int(int(c[-3:]) % 4 == 0) for c in first + second}
    (copy / "bundle.json").write_text(json.dumps(info))
    predictor = MRNPredictor.from_bundle(copy, device="cpu")
    unseen = training_controls(predictor, train)  # default: the fold's out-of-fold controls
    assert unseen == {
        0: ["RJPD_005", "RJPD_006", "RJPD_007"],
        1: ["RJPD_001", "RJPD_002", "RJPD_003"],
    }
    seen = training_controls(predictor, train, "train")
    assert seen == {0: unseen[1], 1: unseen[0]}
    with pytest.raises(InputDataError, match="anchor"):
        training_controls(predictor, train, "all")


def test_training_controls_called_pd_reads_the_out_of_fold_controls(site_setup, tmp_path):
    """The reference the CLI prints beside the left-out site controls."""
    import shutil

    from mrn_engine.workflows.site_adaptation import training_controls_called_pd

    bundle = shutil.copytree(site_setup[0], tmp_path / "bundle")
    assert training_controls_called_pd(MRNPredictor.from_bundle(bundle, device="cpu")) is None
    rows = {0: [("a", 0, 0.7), ("b", 0, 0.2), ("c", 1, 0.9)], 1: [("d", 0, 0.4), ("e", 0, 0.5)]}
    for k, fold_rows in rows.items():
        text = "case_id,label,p_pd\n" + "".join(f"{c},{y},{p}\n" for c, y, p in fold_rows)
        (bundle / f"fold_{k}" / "oof.csv").write_text(text)
    share = training_controls_called_pd(MRNPredictor.from_bundle(bundle, device="cpu"))
    assert share == pytest.approx(2 / 4)  # a (0.7) and e (0.5) of the four controls
