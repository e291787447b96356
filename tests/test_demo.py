"""``mrn demo --quick`` end to end: phantoms -> AnatCL pretraining -> k-fold bundle -> held-out
scores -> report.

Slow: it generates 12 phantom cases and trains 2 folds (about 1.5-2 min of CPU on the 2-core
VM; several minutes when the machine is shared).
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    """``$MRN_CACHE_DIR`` in ``tmp_path`` (for the demo-bundle record), with the user's phantom
    atlas cache linked in so that the phantom generator does not rebuild it."""
    from mrn_engine.config import cache_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    for atlas in cache_dir().glob("phantom_atlas_*.npz"):
        (cache / atlas.name).symlink_to(atlas)
    monkeypatch.setenv("MRN_CACHE_DIR", str(cache))
    return cache


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, demo_cache, monkeypatch):
    from mrn_engine.bundle import last_demo_bundle
    from mrn_engine.cli import cli
    from mrn_engine.errors import InputDataError
    from mrn_engine.inference import open_bundle
    from mrn_engine.training.calibration import read_calibration
    from mrn_engine.training.calibration_pooled import fold_scales
    from mrn_engine.training.ensemble_calibration import read_ensemble_calibration
    from mrn_engine.workflows.ensemble_calibration import calibrate_ensemble

    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quick", "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "held-out accuracy" in r.output and "oracle ceiling" in r.output
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["sizes"]["folds"] == 2
    assert summary["compute"]["torch_threads"] == 1  # --threads 1, said before it starts
    assert "compute: 1 torch thread(s)" in r.output
    assert summary["compute"]["cores"] >= 1 and summary["compute"]["load_1min"] >= 0
    assert summary["heldout"]["n"] == summary["sizes"]["heldout"] == 4
    assert summary["oof"]["n"] == summary["sizes"]["cases"] == 8
    # the fold agreement measured on 10 unlabelled cases (their label files removed) that the
    # AnatCL pretraining never saw: on its own pool the folds agree more than on new cases
    assert summary["ensemble_calibration"]["n_cases"] == 10
    assert summary["ensemble_calibration"]["cases"] == str(out / "calibration")
    assert not list((out / "calibration").glob("*.csv"))
    assert (out / "bundle" / "ensemble_calibration.json").is_file()
    # the pooled fold map was refitted on the common logit scale those cases measured
    ens = read_ensemble_calibration(out / "bundle")
    scales = fold_scales({k: ens.fold_logit_sd[str(k)] for k in (0, 1)})
    for k in (0, 1):
        cal = read_calibration(out / "bundle" / f"fold_{k}")
        assert cal.scope == "pooled" and cal.scale == pytest.approx(scales[k])
    # every fold carries the healthy reference of per-slice evidence
    assert all(
        (out / "bundle" / f"fold_{k}" / "reference_slices.safetensors").is_file() for k in (0, 1)
    )
    assert not list((out / "unlabeled").glob("*.csv"))
    assert 0.5 <= summary["oracle"]["population"] <= 1.0
    # the ViT was AnatCL-pretrained on the 8 labelled (labels unread) + 10 unlabelled images.
    # One epoch is one optimiser step: the loss cannot get below the collapsed value, so the
    # demo says so and trains from random initialisation rather than from weights that did
    # not learn (the path from learned weights: test_pretraining_run, test_pretraining_collapse)
    pre = summary["anatcl_pretraining"]
    assert pre["n_cases"] == 18 and pre["epochs"] == 1
    card = json.loads((out / "anatcl" / "anatcl_roi.card.json").read_text())
    assert card["collapsed"] is True and pre["collapsed"] is True and pre["used"] is False
    assert pre["loss_last"] > pre["loss_collapsed"] - 0.05
    assert "training from random initialisation instead" in r.output
    info = json.loads((out / "bundle" / "bundle.json").read_text())
    assert info["weights_provenance"]["format"] == "random-init"
    assert card["data"]["labels_read"] is False
    assert str(out / "calibration") not in card["data"]["roots"]
    # a bundle whose backbone was pretrained on that pool (its provenance names the card)
    # refuses the pool for the ensemble calibration: its folds agree more there
    pre_bundle = tmp_path / "pre_bundle"
    shutil.copytree(out / "bundle", pre_bundle)
    card_ref = {"file": str(out / "anatcl" / "anatcl_roi.card.json")}
    prov = dict(info["weights_provenance"], card=card_ref)
    (pre_bundle / "bundle.json").write_text(json.dumps(dict(info, weights_provenance=prov)))
    with pytest.raises(InputDataError, match="10 case.s. the backbone was pretrained on left out"):
        calibrate_ensemble(pre_bundle, out / "unlabeled", device="cpu")  # its pool: refused
    bundle = open_bundle(out / "bundle")
    assert bundle.folds == [0, 1]
    # the bundle's place is recorded for napari-mrn (which offers it first)
    record = demo_cache / "last_demo_bundle.json"
    assert json.loads(record.read_text())["bundle"] == str((out / "bundle").resolve())
    assert summary["bundle_record"] == str(record)
    assert last_demo_bundle() == (out / "bundle").resolve()
    assert "offered first by napari-mrn" in r.output
    assert (out / "report.html").stat().st_size > 1000
    assert (out / "bundle" / "ablation" / "masking_table.csv").is_file()
    assert len((out / "bundle" / "ablation" / "masking_table.csv").read_text().splitlines()) == 17
    # re-running resumes: nothing is regenerated or retrained
    before = (out / "bundle" / "fold_0" / "model.safetensors").read_bytes()
    stamp = (out / "anatcl" / "anatcl_roi.safetensors").stat().st_mtime_ns
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quick", "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "bundle" / "fold_0" / "model.safetensors").read_bytes() == before
    assert (out / "anatcl" / "anatcl_roi.safetensors").stat().st_mtime_ns == stamp
    # a folder made with another AnatCL kernel: a run of its own, never the other's weights
    import dataclasses

    import mrn_engine.workflows.demo as demo_module

    base = demo_module.demo_anatcl
    monkeypatch.setattr(
        demo_module,
        "demo_anatcl",
        lambda *a: dataclasses.replace(base(*a), variant="global"),
    )
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quick", "--threads", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "anatcl" / "anatcl_global.safetensors").is_file()
    assert (out / "anatcl" / "anatcl_roi.safetensors").stat().st_mtime_ns == stamp
