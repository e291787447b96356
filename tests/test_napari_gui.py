"""GUI tests of the napari plugin (pytest-qt + ``make_napari_viewer``, under Xvfb).

The model bundle used here is made in the test: a *randomly initialised* ``cpu-tiny`` MRN with
two folds saved in the bundle layout of docs/architecture.md. Its probabilities mean nothing;
it is enough to drive the panel end to end (run, layers, masking, saving) on a CPU.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from napari_mrn._compat import guard_triton
from test_napari_io import challenge_affine, write_case

pytestmark = pytest.mark.gui

guard_triton()  # before any torch import under Xvfb's software OpenGL (see napari_mrn._compat)

RUN_TIMEOUT_MS = 120_000


def make_tiny_bundle(root: Path, folds: int = 2, arch: str = "mrn") -> Path:
    """A randomly initialised cpu-tiny bundle (config.json, bundle.json, fold_k weights) of an
    MRN, or with ``arch="seres10"`` of the SE-ResNet baseline."""
    import torch

    from mrn_engine import get_preset
    from mrn_engine.models import build_model, save_model

    cfg = get_preset("cpu-tiny")
    if arch != "mrn":
        cfg = cfg.replace(model={"arch": arch})
    for k in range(folds):
        torch.manual_seed(100 + k)
        save_model(build_model(cfg), root / f"fold_{k}" / "model.safetensors", cfg)
    cfg.save(root / "config.json")
    info = {
        "folds": [{"fold": k, "train": [], "val": []} for k in range(folds)],
        "note": "randomly initialised cpu-tiny model for GUI tests",
    }
    (root / "bundle.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def panel(make_napari_viewer, tmp_path, monkeypatch):
    """A viewer with the MRN dock widget (settings in a temporary ini file)."""
    from qtpy.QtCore import QSettings

    from napari_mrn._widget import MRNDiagnosisWidget

    monkeypatch.delenv("MRN_BUNDLE", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./mrn_demo/bundle here
    viewer = make_napari_viewer()
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    widget = MRNDiagnosisWidget(viewer, settings=settings)
    viewer.window.add_dock_widget(widget, name="MRN diagnosis")
    return viewer, widget


def wait_done(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: widget.worker is None, timeout=RUN_TIMEOUT_MS)


def result_controls(widget) -> list:
    """The widgets that use the shown result's predictor: ROI checkboxes, table, Save."""
    controls = widget.results.controls()
    assert len(controls) == len(ROI_NAMES) + 2
    return controls


def count_encoder_calls(monkeypatch, predictor) -> dict[str, int]:
    """Spy on the model's ROI encoder (``_encode``: the backbone pass of ``forward`` and of
    ``empty_token``); the classification head (``classify_tokens``) does not go through it."""
    calls = {"n": 0}
    encode = predictor.model._encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(predictor.model, "_encode", counting)
    return calls


# ----------------------------------------------------------------------------- reading / writing
def test_open_case_folder_and_save_mask_through_napari(make_napari_viewer, tmp_path):
    folder = write_case(tmp_path)
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="napari-mrn")
    assert [ly.name for ly in viewer.layers] == ["NM", "QSM", "NM_mask", "QSM_mask"]
    qsm, mask = viewer.layers["QSM"], viewer.layers["QSM_mask"]
    assert type(mask).__name__ == "Labels" and type(qsm).__name__ == "Image"
    np.testing.assert_allclose(qsm.scale, (2.0, 0.6667, 0.6667), atol=1e-4)
    np.testing.assert_allclose(mask.scale, qsm.scale)
    # hovering a voxel names the structure (features table)
    assert mask.features.set_index("index").loc[15, "name"] == "dentate_R"
    # napari's "Save Selected Layer" path goes through our writer and restores the geometry
    out = tmp_path / "saved_mask.nii.gz"
    viewer.layers.selection.active = mask
    mask.data[0, 0, 0] = 7
    written = viewer.layers.save(str(out), selected=True, plugin="napari-mrn")
    assert written == [str(out)]
    img, src = nib.load(out), nib.load(folder / "QSM_mask.nii.gz")
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    expected = np.asarray(src.dataobj).copy()
    expected[0, expected.shape[1] - 1, 0] = 7
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected)


def test_sample_data_pd_and_hc(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mrn", "mrn_pd_case")
    names = [ly.name for ly in viewer.layers]
    assert names == ["T1", "NM", "QSM", "NM_mask", "QSM_mask"]
    qsm = viewer.layers["QSM"]
    assert qsm.data.shape == (70, 300, 300)  # challenge grid (300, 300, 70) shown axially
    np.testing.assert_allclose(qsm.scale, (2.0, 2 / 3, 2 / 3), atol=1e-3)
    assert qsm.metadata["case_id"] == "PD_sample"
    labels = set(np.unique(viewer.layers["QSM_mask"].data)) - {0}
    assert labels == set(range(1, 17))
    assert set(np.unique(viewer.layers["NM_mask"].data)) == {0, 1, 2}
    # right SN (label 11) lies on the screen's left half (radiological convention)
    cols_r = np.nonzero(viewer.layers["QSM_mask"].data == 11)[2]
    cols_l = np.nonzero(viewer.layers["QSM_mask"].data == 12)[2]
    assert cols_r.mean() < 150 < cols_l.mean()
    viewer.open_sample("napari-mrn", "mrn_hc_case")
    hc = viewer.layers["QSM [1]"] if "QSM [1]" in viewer.layers else viewer.layers[-3]
    assert hc.metadata["case_id"] == "HC_sample"
    assert not np.array_equal(hc.data, qsm.data)
    # opening a sample docks the MRN panel once, with the sample's layers chosen
    from napari_mrn._widget import MRNDiagnosisWidget

    panels = [w for w in viewer.window.dock_widgets.values() if isinstance(w, MRNDiagnosisWidget)]
    assert len(panels) == 1
    assert panels[0].inputs.nm_combo.currentText() in ("NM", "NM [1]")


# ----------------------------------------------------------------------------- the panel
def test_mismatched_grids_are_a_message_not_a_traceback(panel, tmp_path, tiny_bundle):
    viewer, widget = panel
    folder = write_case(tmp_path)
    viewer.open(str(folder), plugin="napari-mrn")
    other = write_case(tmp_path / "other", "RJPD_901", shape=(40, 36, 10))
    viewer.open(str(other / "QSM.nii.gz"), plugin="napari-mrn")  # layer "QSM [1]": 10 slices
    widget.set_bundle(tiny_bundle)
    widget.inputs.qsm_combo.set_layer(viewer.layers[-1])
    msg = widget.inputs.message.text()
    assert "not on the grid of layer" in msg and "40x36x10" in msg and "40x36x12" in msg
    assert not widget.run_button.isEnabled()
    assert widget.run() is None
    assert "not on the grid" in widget.status.text()
    # choosing the matching QSM again clears the message
    widget.inputs.qsm_combo.set_layer(viewer.layers["QSM"])
    assert widget.inputs.message.text() == "" and widget.run_button.isEnabled()


def test_cancel_stops_the_run_inside_the_predictor(panel, qtbot, tmp_path, tiny_bundle):
    viewer, widget = panel
    viewer.open(str(write_case(tmp_path)), plugin="napari-mrn")
    widget.set_bundle(tiny_bundle)
    widget.model.device_combo.setCurrentText("cpu")
    worker = widget.run()
    assert worker is not None, widget.status.text()
    assert widget.cancel_button.isEnabled() and not widget.run_button.isEnabled()
    reports = []

    def on_report(item):  # press Cancel once predict_case has reported its first step
        reports.append(item)
        if "masks and ROI crops" in item.message:
            widget.cancel()

    worker.progress.connect(on_report)
    wait_done(qtbot, widget)
    assert widget.status.text() == "Cancelled."
    assert any("masks and ROI crops" in r.message for r in reports)
    # stopped at the predictor's next report: no fold finished after the cancel, no result
    assert not any("P(PD)" in r.message for r in reports)
    assert widget.session.result is None and "MRN nuclei" not in viewer.layers
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert not any(w.isEnabled() for w in result_controls(widget))  # nothing to mask or save


def test_engine_error_is_shown_in_the_panel(panel, qtbot, tmp_path, tiny_bundle):
    viewer, widget = panel
    # no left caudate in the QSM mask: the engine refuses to place the ROI from this mask
    folder = write_case(tmp_path, drop_labels=(2,))
    viewer.open(str(folder), plugin="napari-mrn")
    widget.set_bundle(tiny_bundle)
    widget.model.device_combo.setCurrentText("cpu")
    assert widget.run() is not None
    wait_done(qtbot, widget)
    text = widget.status.text()
    assert text.startswith(str(folder / "QSM_mask.nii.gz")), text  # names the file
    assert "missing label(s) 2 (caudate_L)" in text and "Traceback" not in text
    assert widget.session.result is None and "MRN nuclei" not in viewer.layers
    assert widget.run_button.isEnabled()
    assert not any(w.isEnabled() for w in result_controls(widget))


def test_full_run_on_sample_case(panel, qtbot, tmp_path, tiny_bundle, monkeypatch):
    from qtpy.QtCore import Qt, QTimer

    from mrn_engine.inference import MRNPredictor, write_case_outputs
    from napari_mrn._layers import ROI_COLOURS
    from napari_mrn._session import Progress

    viewer, widget = panel
    viewer.open_sample("napari-mrn", "mrn_pd_case")
    assert (
        widget.inputs.nm_combo.currentText() == "NM"
        and widget.inputs.qsm_combo.currentText() == "QSM"
    )
    assert widget.inputs.qsm_mask_combo.currentText() == "QSM_mask"
    widget.set_bundle(tiny_bundle)
    assert widget.model.folds_spin.maximum() == 2
    widget.model.device_combo.setCurrentText("cpu")
    assert (
        widget.model.device_warning.isVisibleTo(widget)
        and "CPU" in widget.model.device_warning.text()
    )
    reports = []
    ticks: list[float] = []  # GUI event-loop heartbeats during the run (responsiveness)
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    model_threads: list[threading.Thread] = []  # where the model really runs
    real_predict_case = MRNPredictor.predict_case

    def spy_predict_case(self, *args, **kwargs):
        model_threads.append(threading.current_thread())
        return real_predict_case(self, *args, **kwargs)

    monkeypatch.setattr(MRNPredictor, "predict_case", spy_predict_case)
    worker = widget.run()
    worker.progress.connect(reports.append)
    wait_done(qtbot, widget)
    timer.stop()
    monkeypatch.setattr(MRNPredictor, "predict_case", real_predict_case)
    # the viewer stays responsive: the model runs off the GUI thread while the event loop ticks
    # (structural checks, not a timing bound; the tick gaps are printed for information)
    max_gap = max(np.diff(ticks)) if len(ticks) > 1 else float("inf")
    print(f"run: {len(ticks)} GUI ticks, longest event-loop gap {max_gap:.2f} s")
    assert model_threads and all(t is not threading.main_thread() for t in model_threads)
    assert len(ticks) >= 3
    assert widget.session.result is not None, widget.status.text()
    # the status line gives the time per stage (issue 16)
    assert "done in" in widget.status.text() and "model" in widget.status.text()
    assert widget.progress.value() == 1000 and len(reports) >= 3
    # typed progress signals: Progress records, fractions rising to 1 (the first report may
    # come before this test connected its slot)
    assert all(isinstance(r, Progress) for r in reports)
    fractions = [r.fraction for r in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("fold 1 P(PD)" in r.message for r in reports)
    # the last bundle is remembered
    assert widget.model.settings.value("bundle/last") == str(tiny_bundle)

    pred = widget.session.result.prediction
    full = pred.probabilities
    qsm = viewer.layers["QSM"]
    nuclei = viewer.layers["MRN nuclei"]
    assert nuclei.data.shape == qsm.data.shape
    np.testing.assert_allclose(nuclei.scale, qsm.scale)
    np.testing.assert_allclose(nuclei.metadata["affine"], qsm.metadata["affine"])
    np.testing.assert_array_equal(nuclei.data, np.asarray(pred.nuclei).transpose(2, 1, 0)[:, ::-1])
    assert set(np.unique(nuclei.data)) <= set(range(17))
    assert "MRN NM SN" in viewer.layers

    boxes = viewer.layers["MRN ROIs"]
    spans = {n: b.z1 - b.z0 for n, b in pred.boxes.items()}
    assert len(boxes.data) == sum(spans.values())
    assert set(boxes.features["roi"]) == set(ROI_NAMES)
    # each ROI's rectangles sit on the slices the box spans, around the box's rows/cols
    for name, box in pred.boxes.items():
        rects = [d for d, r in zip(boxes.data, boxes.features["roi"], strict=True) if r == name]
        assert sorted(int(d[0, 0]) for d in rects) == list(range(box.z0, box.z1))
        assert rects[0][:, 2].min() == pytest.approx(box.x0 - 0.5)
        assert rects[0][:, 1].max() == pytest.approx(300 - box.y0 - 0.5)
    # the names: one per box and slice, large, in the ROI's colour; NM-SN's inside its box
    # (lower left) so that it does not sit on the midbrain box's edge and label
    names = viewer.layers["MRN ROI labels"]
    assert len(names.data) == len(boxes.data) and list(names.features["roi"]) == list(
        boxes.features["roi"]
    )
    np.testing.assert_allclose(names.scale, qsm.scale)
    assert names.text.size >= 12 and names.text.visible
    for roi, colour in zip(names.features["roi"], names.text.color.array, strict=True):
        np.testing.assert_allclose(colour, (*ROI_COLOURS[roi], 1.0))
    sn = names.data[list(names.features["roi"]).index("nm_sn")]
    sn_rect = next(
        d for d, r in zip(boxes.data, boxes.features["roi"], strict=True) if r == "nm_sn"
    )
    assert sn_rect[:, 1].min() < sn[1] < sn_rect[:, 1].max()
    boxes.visible = False  # hiding the boxes hides their names
    assert not names.visible
    boxes.visible = True
    assert names.visible

    # the panel shows the predictor's numbers
    probs = widget.session.probabilities
    assert probs == full
    assert f"{full.p_pd:.3f}" in widget.results.label.text()
    assert len(widget.results.chart.bars) == 3  # two folds + ensemble

    # the uncertainty flag with the rule's reason and the calibration line (tiny bundle: none)
    from mrn_engine.inference.uncertainty import assess_prediction
    from napari_mrn._result import UNCALIBRATED, uncertainty_text

    flag = widget.session.uncertainty
    assert flag == assess_prediction(pred)
    word = "uncertain" if flag.uncertain else "confident"
    assert word in widget.results.flag_label.text()
    assert widget.results.flag_label.text() == uncertainty_text(flag)
    from qtpy.QtGui import QTextDocument

    def plain(html: str) -> str:
        doc = QTextDocument()
        doc.setHtml(html)
        return doc.toPlainText()

    shown_flag = plain(widget.results.flag_label.text())
    assert shown_flag.startswith(word)
    if not flag.uncertain:  # every check, passed
        assert f"|P(PD) - 0.5| = {flag.distance:.3f} ≥ 0.10" in shown_flag
        assert f"fold std {flag.fold_spread:.3f} ≤ 0.15" in shown_flag
    if "near-threshold" in flag.reasons:  # the failed checks only, with the limit
        assert f"|P(PD) - 0.5| = {flag.distance:.3f} < 0.10" in shown_flag
    if "fold-spread" in flag.reasons:
        assert f"fold std {flag.fold_spread:.3f} > 0.15" in shown_flag
    assert widget.results.calibration_label.text() == UNCALIBRATED
    assert "mrn calibrate" in UNCALIBRATED
    from napari_mrn._result import calibration_text

    assert calibration_text(True, 0.41234) == "P(PD) calibrated (raw model output 0.412)"

    # per-slice evidence: an overlay on each modality's grid and the slice plot
    ev = widget.session.evidence
    assert ev is not None and ev.masked == frozenset() and set(ev.evidence) == set(ROI_NAMES)
    evidence_layers = {"QSM": viewer.layers["MRN evidence"], "NM": viewer.layers["MRN NM evidence"]}
    for modality, layer in evidence_layers.items():
        grid = viewer.layers[modality]
        assert type(layer).__name__ == "Image"
        assert layer.data.shape == grid.data.shape
        np.testing.assert_allclose(layer.scale, grid.scale)
        assert np.abs(layer.data).max() > 0
        lim = layer.contrast_limits[1]
        assert layer.contrast_limits[0] == -lim and lim >= np.abs(layer.data).max() - 1e-7
    assert evidence_layers["QSM"].visible
    assert set(widget.results.evidence_plot.bars) == set(ROI_NAMES)
    from napari_mrn._result import LEAVE_OUT_EVIDENCE  # this bundle has no healthy reference

    assert ev.method == "leave-out" and widget.results.evidence_note.text() == LEAVE_OUT_EVIDENCE
    assert viewer.layers.selection.active is nuclei

    def box_region(name: str) -> np.ndarray:
        """Display-order voxels of ``name``'s box outside other boxes of its modality."""
        modality = ROI_BY_NAME[name].modality
        result = widget.session.result
        grid_shape = (result.case.qsm if modality == "QSM" else result.case.nm).shape
        inside, others = np.zeros(grid_shape, bool), np.zeros(grid_shape, bool)
        for other, b in pred.boxes.items():
            if ROI_BY_NAME[other].modality == modality:
                box = inside if other == name else others
                box[b.x0 : b.x1, b.y0 : b.y1, b.z0 : b.z1] = True
        inside &= ~others
        return inside.transpose(2, 1, 0)[:, ::-1]

    full_ev = {m: layer.data.copy() for m, layer in evidence_layers.items()}

    # ROI masking: the run cached every fold's empty-ROI tokens in the worker, so toggling an
    # ROI runs only the classification head: no backbone / ROI-encoder pass on the GUI thread
    predictor: MRNPredictor = widget.session.result.predictor
    assert predictor.masking_cache_ready()
    encoder_calls = count_encoder_calls(monkeypatch, predictor)
    shown = {}
    for name, box in widget.results.roi_checks.items():
        box.setChecked(False)
        assert encoder_calls["n"] == 0, name  # the evidence too: SFA + head passes only
        assert widget.session.probabilities.masked == {name}
        shown[frozenset({name})] = widget.session.probabilities
        # the evidence follows the toggle: that ROI's box holds none, the overlay changed
        layer = evidence_layers[ROI_BY_NAME[name].modality]
        region = box_region(name)
        assert region.any() and np.abs(full_ev[ROI_BY_NAME[name].modality][region]).max() > 0
        assert not layer.data[region].any(), name
        assert not np.array_equal(layer.data, full_ev[ROI_BY_NAME[name].modality]), name
        assert layer.metadata["masked"] == [name]
        assert widget.session.evidence.masked == {name}
        assert widget.results.evidence_plot.axes[name].get_title().endswith("(off)")
        assert widget.results.flag_label.text() == uncertainty_text(widget.session.uncertainty)
        box.setChecked(True)
        assert widget.session.probabilities == full
        np.testing.assert_array_equal(layer.data, full_ev[ROI_BY_NAME[name].modality])
    widget.results.roi_checks["nm_sn"].setChecked(False)
    widget.results.roi_checks["qsm_dentate"].setChecked(False)
    pair = frozenset({"nm_sn", "qsm_dentate"})
    shown[pair] = widget.session.probabilities
    assert widget.session.probabilities.masked == pair
    assert "masked: NM-SN, QSM dentate" in widget.results.label.text()

    # the 16-subset table: head passes only too
    dialog = widget.show_masking_table()
    assert dialog.table.rowCount() == 16
    rows = widget.session.masking_table()
    assert encoder_calls["n"] == 0
    dialog.close()

    # what the panel shows = the engine's prediction with those ROIs' input volumes replaced
    # by zeros, recomputed here with full forward passes (independent of the token cache)
    case = widget.session.result.case
    for masked, probs in shown.items():
        ref = predictor.predict_case(case, zero_rois=masked)
        assert probs.p_pd_folds == pytest.approx(ref.probabilities.p_pd_folds, abs=1e-5), masked
        assert probs.p_pd == pytest.approx(ref.probabilities.p_pd, abs=1e-5), masked
    assert encoder_calls["n"] == len(shown) * len(predictor.folds)  # the check's own passes
    row = next(r for r in rows if r.masked == pair)
    assert row.p_pd == pytest.approx(shown[pair].p_pd, abs=1e-6)
    assert rows[0].masked == frozenset() and rows[0].p_pd == pytest.approx(full.p_pd, abs=1e-5)
    assert [dialog.table.item(i, 1).text() for i in range(16)] == [f"{r.p_pd:.3f}" for r in rows]

    # during a run the result controls are disabled (the worker swaps the predictor's fold
    # weights): a click on an ROI box does nothing; Cancel gives them back, result unchanged
    first = widget.session.result
    assert all(w.isEnabled() for w in result_controls(widget))
    during = []

    def on_report(item):
        during.append([w.isEnabled() for w in result_controls(widget)])
        if "fold 0 P(PD)" in item.message:  # mid-run: one fold done, the next one loading
            qtbot.mouseClick(widget.results.roi_checks["qsm_bg"], Qt.MouseButton.LeftButton)
            during.append(widget.results.roi_checks["qsm_bg"].isChecked())
            widget.cancel()

    worker = widget.run()
    assert not any(w.isEnabled() for w in result_controls(widget))
    worker.progress.connect(on_report)
    wait_done(qtbot, widget)
    assert widget.status.text() == "Cancelled."
    assert during and during[-1] is True  # the click did not untick QSM basal ganglia
    assert all(not any(states) for states in during[:-1])
    assert all(w.isEnabled() for w in result_controls(widget))
    assert widget.session.result is first and widget.session.probabilities.masked == pair
    assert widget.session.probabilities.p_pd == pytest.approx(shown[pair].p_pd)
    widget.results.roi_checks["nm_sn"].setChecked(True)
    widget.results.roi_checks["qsm_dentate"].setChecked(True)
    assert widget.session.probabilities == full

    # saving: masks in the source geometry + JSON with probabilities, table and bundle
    written = widget.save(tmp_path / "results")
    names = sorted(p.name for p in written)
    assert names == ["NM_pred.nii.gz", "PD_pred.txt", "QSM_pred.nii.gz", "mrn_result.json"]
    out = tmp_path / "results" / "PD_sample"
    img = nib.load(out / "QSM_pred.nii.gz")
    np.testing.assert_allclose(img.affine, qsm.metadata["affine"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), pred.nuclei)
    record = json.loads((out / "mrn_result.json").read_text())
    assert record["prediction"]["p_pd"] == pytest.approx(full.p_pd)
    assert record["shown"]["masked"] == [] and record["masking_table"][0]["masked"] == []
    assert len(record["masking_table"]) == 16
    assert record["bundle"]["config"]["preset"] == "cpu-tiny"
    assert record["settings"]["device"] == "cpu"

    # masks made by nnU-Net (case without mask files) are shown and saved beside the DPT output
    import dataclasses

    seg_pred = dataclasses.replace(
        pred,
        mask_source="segmenter",
        nm_mask=(np.asarray(pred.nm_nuclei) > 0).astype(np.uint8),
        qsm_mask=np.asarray(pred.nuclei),
    )
    widget.session.accept(dataclasses.replace(widget.session.result, prediction=seg_pred))
    widget.show_outputs()
    for name in ("nnU-Net NM mask", "nnU-Net QSM mask"):
        assert viewer.layers[name].data.shape == qsm.data.shape
    np.testing.assert_array_equal(
        viewer.layers["nnU-Net QSM mask"].data, np.asarray(pred.nuclei).transpose(2, 1, 0)[:, ::-1]
    )
    names = sorted(p.name for p in widget.save(tmp_path / "results2"))
    assert "NM_nnunet.nii.gz" in names and "QSM_nnunet.nii.gz" in names
    # PD_pred.txt: the engine's writer, byte for byte what `mrn predict` writes for this case
    cli = write_case_outputs(pred, widget.session.result.case, tmp_path / "cli")
    assert (out / "PD_pred.txt").read_bytes() == (cli / "PD_pred.txt").read_bytes()
    assert (out / "PD_pred.txt").read_text() == str(full.call)


def test_bundle_candidates_env_and_demo_location(tmp_path, monkeypatch, tiny_bundle):
    from napari_mrn._bundles import candidate_bundles, is_bundle

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MRN_CACHE_DIR", str(tmp_path / "cache"))  # no recorded demo bundle
    monkeypatch.delenv("MRN_BUNDLE", raising=False)
    assert candidate_bundles() == [] or all(p != tmp_path for p in candidate_bundles())
    demo = make_tiny_bundle(tmp_path / "mrn_demo" / "bundle", folds=1)
    assert is_bundle(demo) and not is_bundle(tmp_path)
    assert candidate_bundles()[0] == demo.resolve()
    monkeypatch.setenv("MRN_BUNDLE", str(tiny_bundle))
    assert candidate_bundles()[:2] == [tiny_bundle.resolve(), demo.resolve()]


def test_panel_offers_the_recorded_demo_bundle_first(
    make_napari_viewer, tmp_path, monkeypatch, tiny_bundle
):
    """`mrn demo` records its bundle in $MRN_CACHE_DIR; the panel offers it before the
    ./mrn_demo and ~/mrn_demo fallbacks, and ignores a record whose folder is gone."""
    from qtpy.QtCore import QSettings

    from mrn_engine.bundle import demo_record_path, last_demo_bundle, record_demo_bundle
    from napari_mrn._bundles import candidate_bundles
    from napari_mrn._widget import MRNDiagnosisWidget

    monkeypatch.setenv("MRN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MRN_BUNDLE", raising=False)
    monkeypatch.chdir(tmp_path)
    fallback = make_tiny_bundle(tmp_path / "mrn_demo" / "bundle", folds=1).resolve()
    viewer = make_napari_viewer()

    def new_panel(name: str) -> MRNDiagnosisWidget:
        settings = QSettings(str(tmp_path / f"{name}.ini"), QSettings.Format.IniFormat)
        return MRNDiagnosisWidget(viewer, settings=settings)

    def offered(widget) -> list[str]:
        return [
            widget.model.bundle_combo.itemText(i) for i in range(widget.model.bundle_combo.count())
        ]

    assert last_demo_bundle() is None  # no record yet: the ./mrn_demo fallback
    assert new_panel("a").model.bundle_path() == str(fallback)
    record = record_demo_bundle(tiny_bundle)
    assert record == demo_record_path() == tmp_path / "cache" / "last_demo_bundle.json"
    assert json.loads(record.read_text())["bundle"] == str(tiny_bundle.resolve())
    assert last_demo_bundle() == tiny_bundle.resolve()
    panel = new_panel("b")
    assert panel.model.bundle_path() == str(tiny_bundle.resolve())  # preselected
    assert offered(panel) == [str(tiny_bundle.resolve()), str(fallback)]
    assert panel.model.folds_spin.maximum() == 2  # the recorded bundle's folds
    # a stale record (its folder deleted) is ignored
    gone = make_tiny_bundle(tmp_path / "old" / "bundle", folds=1)
    record_demo_bundle(gone)
    shutil.rmtree(gone)
    assert last_demo_bundle() is None
    assert offered(new_panel("c")) == [str(fallback)]
    # so is a damaged one
    record.write_text("{not json")
    assert last_demo_bundle() is None and candidate_bundles() == [fallback]


def test_affine_helper_matches_reader(tmp_path):
    # the helper used by these tests writes the challenge's LAS orientation
    assert nib.aff2axcodes(challenge_affine()) == ("L", "A", "S")


def test_panel_shows_engine_warnings_not_dependency_deprecations(panel):
    from mrn_engine.errors import MRNWarning

    viewer, widget = panel
    widget._on_warning(("`torch.jit.interface` is deprecated", FutureWarning, "x.py", 1))
    widget._on_warning(("old API", DeprecationWarning, "y.py", 2))
    assert widget.warnings == [] and widget.warning_label.text() == ""
    widget._on_warning(("RJPD_001: NM mask has no label 2", MRNWarning, "z.py", 3))
    assert widget.warnings == ["RJPD_001: NM mask has no label 2"]
    assert "no label 2" in widget.warning_label.text()


def test_device_warning_names_the_slow_or_missing_device():
    from napari_mrn._model import device_warning

    assert device_warning("cuda", cuda_available=False).startswith("CUDA is not available")
    for device in ("cpu", "auto"):
        assert "Running on CPU" in device_warning(device, cuda_available=False)
    assert "Running on CPU" in device_warning("cpu", cuda_available=True)
    assert device_warning("auto", cuda_available=True) == ""
    assert device_warning("cuda", cuda_available=True) == ""


def test_unusable_bundle_is_a_message_naming_the_folder(panel, qtbot, tmp_path):
    viewer, widget = panel
    viewer.open(str(write_case(tmp_path)), plugin="napari-mrn")
    not_a_bundle = tmp_path / "not_a_bundle"
    not_a_bundle.mkdir()
    widget.set_bundle(not_a_bundle)
    assert widget.model.folds_spin.maximum() == 20  # no folds known
    assert widget.run() is not None
    wait_done(qtbot, widget)
    text = widget.status.text()
    assert text.startswith(str(not_a_bundle)) and "not a model bundle" in text, text
    assert widget.session.result is None and widget.run_button.isEnabled()
    assert not any(w.isEnabled() for w in result_controls(widget))


def test_bad_site_file_is_a_message_naming_the_file(panel, qtbot, tmp_path, tiny_bundle):
    viewer, widget = panel
    viewer.open(str(write_case(tmp_path)), plugin="napari-mrn")
    widget.set_bundle(tiny_bundle)
    widget.model.device_combo.setCurrentText("cpu")
    bad = tmp_path / "site.safetensors"
    bad.write_bytes(b"not a site file")
    widget.model.site_edit.setText(str(bad))
    assert widget.model.key().site == bad
    assert widget.run() is not None
    wait_done(qtbot, widget)
    text = widget.status.text()
    assert text.startswith(str(bad)) and "not a site adaptation file" in text, text
    assert widget.session.result is None and widget.run_button.isEnabled()
    widget.model.site_edit.setText("")
    assert widget.model.key().site is None


def test_bundle_with_healthy_reference_shows_evidence_against_it(panel, qtbot, tmp_path):
    import torch

    from mrn_engine import get_preset
    from mrn_engine.training.reference_slices import write_reference_slices

    viewer, widget = panel
    viewer.open(str(write_case(tmp_path)), plugin="napari-mrn")
    bundle = make_tiny_bundle(tmp_path / "ref")
    cfg = get_preset("cpu-tiny")
    for k in range(2):  # a reference far from this case: evidence everywhere
        refs = {n: torch.full((s, cfg.model.embed_dim), 3.0) for n, s in cfg.roi.slices.items()}
        write_reference_slices(bundle / f"fold_{k}", refs, ["HC_1"])
    widget.set_bundle(bundle)
    widget.model.device_combo.setCurrentText("cpu")
    assert widget.run() is not None
    wait_done(qtbot, widget)
    ev = widget.session.evidence
    assert ev is not None and ev.method == "reference", widget.status.text()
    assert not widget.results.evidence_note.isVisibleTo(widget)
    assert "healthy reference" in widget.results.evidence_plot.toolTip()
    assert max(np.abs(ev.evidence[n]).max() for n in ROI_NAMES) > 0


def test_baseline_bundle_runs_without_evidence(panel, qtbot, tmp_path):
    from napari_mrn._result import NO_EVIDENCE, UNCALIBRATED

    viewer, widget = panel
    viewer.open(str(write_case(tmp_path)), plugin="napari-mrn")
    widget.set_bundle(make_tiny_bundle(tmp_path / "seres", arch="seres10"))
    widget.model.device_combo.setCurrentText("cpu")
    assert widget.run() is not None
    wait_done(qtbot, widget)
    assert widget.session.result is not None, widget.status.text()
    assert widget.session.evidence is None
    assert "MRN evidence" not in viewer.layers and "MRN NM evidence" not in viewer.layers
    assert widget.results.evidence_note.text() == NO_EVIDENCE
    assert widget.results.evidence_note.isVisibleTo(widget)
    assert widget.results.evidence_plot.bars == {}
    assert widget.results.calibration_label.text() == UNCALIBRATED
    flag = widget.session.uncertainty
    assert ("uncertain" if flag.uncertain else "confident") in widget.results.flag_label.text()
    widget.results.roi_checks["nm_sn"].setChecked(False)  # masking works, still no evidence
    assert widget.session.probabilities.masked == {"nm_sn"} and widget.session.evidence is None


def test_uncertainty_text_names_the_failed_checks_with_their_limits():
    from qtpy.QtGui import QTextDocument

    from mrn_engine.inference.uncertainty import assess
    from napari_mrn._result import calibration_text, uncertainty_text

    def plain(html: str) -> str:
        doc = QTextDocument()
        doc.setHtml(html)
        return doc.toPlainText()

    sure = assess(0.9, [0.88, 0.92], [0.02, 0.01])
    assert plain(uncertainty_text(sure)) == (
        "confident: |P(PD) - 0.5| = 0.400 \u2265 0.10; fold std 0.020 \u2264 0.15;"
        " mirror spread 0.020 \u2264 0.10"
    )
    unsure = assess(0.55, [0.2, 0.9], [0.3, 0.01])
    assert plain(uncertainty_text(unsure)) == (
        "uncertain (near-threshold, fold-spread, tta-spread): |P(PD) - 0.5| = 0.050 < 0.10;"
        " fold std 0.350 > 0.15; mirror spread 0.300 > 0.10"
    )
    spread_only = assess(0.9, [0.6, 1.0])
    assert plain(uncertainty_text(spread_only)) == (
        "uncertain (fold-spread): fold std 0.200 > 0.15"
    )
    assert calibration_text(True, None) == "P(PD) calibrated"
    assert "run `mrn calibrate BUNDLE`" in calibration_text(False, 0.3)
