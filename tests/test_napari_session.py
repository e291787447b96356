"""The panel's Qt-free session: predictor cache, run with typed progress, masking, outputs, saving.

The bundle is a *randomly initialised* two-fold ``cpu-tiny`` MRN (see ``make_tiny_bundle``) and
the case a small synthetic folder: the numbers mean nothing, the plumbing is what is tested.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrn_engine.data import load_case
from mrn_engine.errors import InputDataError
from mrn_engine.results import Probabilities
from napari_mrn._outputs import output_volumes
from napari_mrn._save import probabilities_record
from napari_mrn._session import (
    PredictorKey,
    Progress,
    RunCancelled,
    RunResult,
    Session,
    SessionBusy,
)
from test_napari_gui import make_tiny_bundle
from test_napari_io import write_case


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def case_folder(tmp_path_factory) -> Path:
    return write_case(tmp_path_factory.mktemp("case"))


@pytest.fixture(scope="module")
def ran(bundle, case_folder, one_torch_thread) -> tuple[Session, RunResult, list[Progress]]:
    """One run of the session on the small case (shared by the tests below)."""
    session, reports = Session(), []
    result = session.run(load_case(case_folder), PredictorKey(bundle, "cpu"), reports.append)
    return session, result, reports


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_predictor_cached_by_typed_key(bundle, one_torch_thread):
    session = Session()
    key = PredictorKey(bundle, "cpu")
    first = session.predictor(key)
    assert session.predictor(PredictorKey(Path(str(bundle)), "cpu")) is first  # equal keys
    assert first.folds == [0, 1]
    one = session.predictor(dataclasses.replace(key, folds=(0,)))
    assert one is not first and one.folds == [0]
    assert session.predictor(key) is not one  # back to all folds: a new predictor
    assert len({key, PredictorKey(bundle, "cpu"), dataclasses.replace(key, tta=True)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.device = "cuda"  # type: ignore[misc]


def test_site_file_in_the_key_gives_a_site_adapted_predictor(bundle, tmp_path, one_torch_thread):
    """The panel's site file: its own predictor, the shift folded into each fold's head."""
    import torch

    from mrn_engine.inference.site_adaptation import SiteAdaptation
    from napari_mrn._result import calibration_text

    session = Session()
    plain = session.predictor(PredictorKey(bundle, "cpu"))
    dim = plain.model.head.mlp[0].num_features
    site = SiteAdaptation({k: torch.full((dim,), 0.5) for k in (0, 1)}, {"site": "scanner-B"})
    path = site.save(tmp_path / "b.safetensors")
    adapted = session.predictor(PredictorKey(bundle, "cpu", site=path))
    assert adapted is not plain and adapted.site_adaptation.site == "scanner-B"
    key = "head.mlp.0.running_mean"
    for k in (0, 1):
        before, after = plain.ensemble.fold_states[k][key], adapted.ensemble.fold_states[k][key]
        assert torch.allclose(before - after, torch.full((dim,), 0.5))
    assert "site-adapted to scanner-B" in calibration_text(True, 0.4, "scanner-B")
    with pytest.raises(InputDataError, match="site adaptation file not found"):
        session.predictor(PredictorKey(bundle, "cpu", site=tmp_path / "none.safetensors"))


def test_run_reports_typed_progress_and_leaves_the_shown_result(ran):
    session, result, reports = ran
    assert all(isinstance(r, Progress) for r in reports) and len(reports) >= 5
    fractions = [r.fraction for r in reports]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert [r.message for r in reports if "fold" in r.message][:2] == [
        f"RJPD_900: fold {k} P(PD)={p:.3f}"
        for k, p in zip((0, 1), result.prediction.probabilities.p_pd_folds, strict=True)
    ]
    assert result.key == PredictorKey(result.key.bundle, "cpu") and result.seconds > 0
    assert result.predictor.masking_cache_ready()  # warmed in the run: toggles are head passes
    assert not session.running
    assert session.result is None  # the GUI thread accepts it


def test_masking_reads_typed_records_and_matches_the_table(ran):
    session, result, _ = ran
    full = result.prediction.probabilities
    assert session.accept(result) == full and session.probabilities == full
    assert session.masked == frozenset()
    table = session.masking_table()
    assert len(table) == 16 and all(isinstance(r, Probabilities) for r in table)
    assert len({r.masked for r in table}) == 16 and table[0].masked == frozenset()
    assert table[0].p_pd_folds == pytest.approx(full.p_pd_folds, abs=1e-5)
    by_subset = {r.masked: r for r in table}
    for subset in ({"nm_sn"}, {"qsm_bg", "qsm_dentate"}):
        shown = session.set_masked(subset)
        assert session.masked == shown.masked == frozenset(subset)
        assert shown.p_pd_folds == pytest.approx(by_subset[frozenset(subset)].p_pd_folds)
    # the head on cached tokens = a full forward pass with that ROI's input zeroed
    ref = result.predictor.predict_case(result.case, zero_rois={"qsm_bg", "qsm_dentate"})
    assert session.probabilities.p_pd_folds == pytest.approx(ref.probabilities.p_pd_folds, abs=1e-5)
    assert session.set_masked(()) == full and session.masked == frozenset()


def test_session_refuses_work_without_a_result_or_during_a_run(ran):
    with pytest.raises(SessionBusy, match="run a prediction first"):
        Session().set_masked({"nm_sn"})
    with pytest.raises(SessionBusy, match="run a prediction first"):
        Session().save("anywhere")
    session, result, _ = ran
    session.accept(result)
    session.running = True
    try:
        for call in (lambda: session.set_masked(()), session.masking_table, session.outputs):
            with pytest.raises(SessionBusy, match="in progress"):
                call()
    finally:
        session.running = False


def test_cancel_stops_the_run_at_the_next_report(bundle, case_folder, one_torch_thread):
    session, reports = Session(), []

    def report(item: Progress) -> None:
        reports.append(item)
        if "masks and ROI crops" in item.message:
            raise RunCancelled("cancelled")

    with pytest.raises(RunCancelled):
        session.run(load_case(case_folder), PredictorKey(bundle, "cpu"), report)
    assert not any("P(PD)" in r.message for r in reports)  # no fold finished
    assert not session.running and session.result is None


def test_output_volumes_are_what_the_layers_show_and_the_files_hold(ran, tmp_path):
    session, result, _ = ran
    pred, case = result.prediction, result.case
    outs = output_volumes(case, pred)
    assert [(o.file_stem, o.layer_name, o.modality, o.visible) for o in outs] == [
        ("NM_pred", "MRN NM SN", "NM", False),
        ("QSM_pred", "MRN nuclei", "QSM", True),
    ]
    np.testing.assert_array_equal(outs[1].volume.array, pred.nuclei)
    np.testing.assert_array_equal(outs[0].volume.array, pred.nm_nuclei)
    assert outs[1].volume.array.dtype == np.uint8
    np.testing.assert_allclose(outs[1].volume.affine, case.qsm.affine)
    # masks made by nnU-Net (no mask files) are outputs too, on their modality's grid
    seg = dataclasses.replace(
        pred, mask_source="segmenter", nm_mask=pred.nm_nuclei > 0, qsm_mask=pred.nuclei
    )
    session.accept(dataclasses.replace(result, prediction=seg))
    outs = session.outputs()
    assert [o.file_stem for o in outs] == ["NM_pred", "NM_nnunet", "QSM_nnunet", "QSM_pred"]
    written = session.save(tmp_path)
    for out in outs:
        img = nib.load(tmp_path / "RJPD_900" / f"{out.file_stem}.nii.gz")
        np.testing.assert_array_equal(np.asarray(img.dataobj), out.volume.array)
        np.testing.assert_allclose(img.affine, out.volume.affine, atol=1e-5)
    assert len(written) == len(outs) + 2
    session.accept(result)


def test_save_writes_the_cli_pd_pred_and_a_typed_record(ran, tmp_path):
    from mrn_engine.inference import write_case_outputs

    session, result, _ = ran
    full = session.accept(result)
    session.set_masked({"nm_sn"})
    written = session.save(tmp_path / "out")
    folder = tmp_path / "out" / "RJPD_900"
    assert sorted(p.name for p in written) == [
        "NM_pred.nii.gz",
        "PD_pred.txt",
        "QSM_pred.nii.gz",
        "mrn_result.json",
    ]
    assert all(p.parent == folder and p.is_file() for p in written)
    cli = write_case_outputs(result.prediction, result.case, tmp_path / "cli")
    assert (folder / "PD_pred.txt").read_bytes() == (cli / "PD_pred.txt").read_bytes()
    assert (folder / "PD_pred.txt").read_text() == str(full.call)  # the full model's call
    record = json.loads((folder / "mrn_result.json").read_text())
    assert record["prediction"] == probabilities_record(full)
    assert record["shown"]["masked"] == ["nm_sn"]
    assert record["shown"]["p_pd"] == pytest.approx(session.probabilities.p_pd)
    assert [r["masked"] for r in record["masking_table"]][:2] == [[], ["nm_sn"]]
    assert record["settings"] == {
        "device": "cpu",
        "folds": None,
        "tta": False,
        "site": None,
        "masked": ["nm_sn"],
    }
    assert record["site_adaptation"] is None
    assert record["bundle"]["config"]["preset"] == "cpu-tiny"
    assert set(record["boxes"]) == set(result.prediction.boxes)
    # saving again replaces the folder; no temporary folders are left behind
    session.set_masked(())
    session.save(tmp_path / "out")
    assert json.loads((folder / "mrn_result.json").read_text())["shown"]["masked"] == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["RJPD_900"]


def test_saved_record_holds_the_uncertainty_flag_and_evidence_summary(ran, tmp_path):
    from mrn_engine.inference.uncertainty import MARGIN, assess_prediction

    session, result, _ = ran
    session.accept(result)
    assert result.evidence is not None  # an MRN bundle: slice evidence is computed in the run
    session.set_masked({"qsm_bg"})
    session.save(tmp_path)
    record = json.loads((tmp_path / "RJPD_900" / "mrn_result.json").read_text())
    full, shown = assess_prediction(result.prediction), session.uncertainty
    u = record["uncertainty"]
    assert u["prediction"]["uncertain"] == full.uncertain and u["prediction"]["label"] == full.label
    assert u["prediction"]["reasons"] == list(full.reasons)
    assert u["prediction"]["inputs"]["distance"] == pytest.approx(abs(result.prediction.p_pd - 0.5))
    assert u["prediction"]["rule"]["margin"] == MARGIN
    assert u["shown"]["inputs"]["fold_spread"] == pytest.approx(
        float(np.std(session.probabilities.p_pd_folds))
    )
    assert u["shown"]["uncertain"] == shown.uncertain
    assert record["calibration"]["calibrated"] is result.predictor.calibrated
    ev = record["evidence"]
    assert ev["prediction"]["masked"] == [] and ev["shown"]["masked"] == ["qsm_bg"]
    assert ev["prediction"]["p_pd"] == pytest.approx(result.prediction.p_pd, abs=1e-5)
    for roi, entry in ev["prediction"]["rois"].items():
        deltas = [t["evidence"] for t in entry["top_pd"]]
        z = result.evidence.source_z[roi]
        values = result.evidence.evidence[roi][z >= 0]  # padding slices are not listed
        assert deltas == sorted(deltas, reverse=True) and len(deltas) == min(3, len(values))
        assert deltas[0] == pytest.approx(float(values.max()))
        assert entry["top_pd"][0]["source_z"] == int(z[z >= 0][np.argmax(values)])
        assert entry["top_hc"]["evidence"] == pytest.approx(float(values.min()))
        assert entry["n_slices"] == len(values)
    assert all(t["evidence"] == 0 for t in ev["shown"]["rois"]["qsm_bg"]["top_pd"])  # masked
    shown_ev = session.evidence.evidence["nm_sn"][session.evidence.source_z["nm_sn"] >= 0]
    assert ev["shown"]["rois"]["nm_sn"]["top_pd"][0]["evidence"] == pytest.approx(
        float(shown_ev.max())
    )
    session.set_masked(())


def test_save_refuses_the_input_folder_and_leaves_nothing_partial(
    ran, case_folder, tmp_path, monkeypatch
):
    import napari_mrn._save as save

    session, result, _ = ran
    session.accept(result)
    before = digest(case_folder)
    with pytest.raises(InputDataError, match=f"^{case_folder}: holds the input"):
        session.save(case_folder.parent)
    assert digest(case_folder) == before

    def broken(folder, call):
        raise InputDataError(f"{folder}: disk full")

    monkeypatch.setattr(save, "write_pd_pred", broken)
    with pytest.raises(InputDataError, match="disk full"):
        session.save(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no case folder, no temporary folder


def test_evidence_follows_the_masked_set_with_head_passes_only(ran, monkeypatch):
    from mrn_engine.data.labels import ROI_NAMES
    from mrn_engine.inference.uncertainty import assess, assess_prediction
    from test_napari_gui import count_encoder_calls

    session, result, _ = ran
    pred = result.prediction
    # an MRN: the run kept the slice tokens and computed the full model's evidence
    assert pred.slice_tokens is not None and len(pred.slice_tokens) == 2
    assert result.evidence is not None and result.evidence.masked == frozenset()
    fresh = Session()  # nothing shown yet
    assert fresh.evidence is None and fresh.uncertainty is None and fresh.calibrated is None
    full_probs = session.accept(result)
    full = session.evidence
    assert full is result.evidence
    assert full.p_pd == pytest.approx(full_probs.p_pd, abs=1e-5)
    assert any(np.abs(full.evidence[n]).max() > 0 for n in ROI_NAMES)
    assert session.uncertainty == assess_prediction(pred)
    assert session.calibrated is False  # the tiny bundle has no calibration.json
    assert session.raw_probabilities == full_probs

    calls = count_encoder_calls(monkeypatch, result.predictor)
    shown = session.set_masked({"nm_sn", "qsm_bg"})
    ev = session.evidence
    assert calls["n"] == 0  # SFA + head on the kept slice tokens, cached empty tokens
    assert ev is not None and ev.masked == {"nm_sn", "qsm_bg"}
    assert ev.p_pd == pytest.approx(shown.p_pd, abs=1e-5)
    assert not ev.evidence["nm_sn"].any() and not ev.evidence["qsm_bg"].any()
    assert full.evidence["nm_sn"].any()
    for n in ("qsm_midbrain", "qsm_dentate"):  # the others are recomputed: masking moved them
        assert not np.allclose(ev.evidence[n], full.evidence[n], atol=1e-7), n
    assert session.uncertainty == assess(shown.p_pd, shown.p_pd_folds)
    # the cached empty tokens are the real ones: P(PD) = a forward pass with those ROIs zeroed
    ref = result.predictor.predict_case(result.case, zero_rois={"nm_sn", "qsm_bg"})
    assert ev.p_pd == pytest.approx(ref.p_pd, abs=1e-5)
    assert session.set_masked(()) == full_probs and session.evidence is full


def test_calibrated_bundle_shows_raw_and_calibrated(
    bundle, case_folder, tmp_path, one_torch_thread
):
    import shutil

    from mrn_engine.training.calibration import Calibration, write_calibration

    calibrated = tmp_path / "calibrated"
    shutil.copytree(bundle, calibrated)
    for k in (0, 1):
        cal = Calibration(k, "temperature", 3.0, 10, "test", 0.1, 0.1, 0.2, 0.2)
        write_calibration(calibrated / f"fold_{k}", cal)
    session = Session()
    result = session.run(load_case(case_folder), PredictorKey(calibrated, "cpu"))
    shown = session.accept(result)
    assert session.calibrated is True
    raw = session.raw_probabilities
    assert raw is not None and raw != shown
    assert result.predictor.calibrate(raw) == shown
    assert session.evidence is not None
    assert session.evidence.p_pd == pytest.approx(shown.p_pd, abs=1e-5)  # calibrated too
    masked = session.set_masked({"qsm_dentate"})
    assert result.predictor.calibrate(session.raw_probabilities) == masked
    assert masked == result.predictor.masked_prediction(result.prediction, {"qsm_dentate"})
    assert session.evidence.p_pd == pytest.approx(masked.p_pd, abs=1e-5)


def test_baseline_without_slice_tokens_shows_no_evidence(case_folder, tmp_path, one_torch_thread):
    from mrn_engine.inference.uncertainty import assess

    seres = make_tiny_bundle(tmp_path / "seres", arch="seres10")
    session = Session()
    result = session.run(load_case(case_folder), PredictorKey(seres, "cpu"))
    assert type(result.predictor.model).__name__ == "SERes10"
    assert result.prediction.slice_tokens is None and result.evidence is None
    session.accept(result)
    assert session.evidence is None and session.uncertainty is not None
    shown = session.set_masked({"nm_sn"})  # masking still works; evidence stays None
    assert session.evidence is None and shown.masked == {"nm_sn"}
    assert session.uncertainty == assess(shown.p_pd, shown.p_pd_folds)
