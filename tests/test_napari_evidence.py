"""Evidence overlay layer data (case grid, ROI boxes, ROI toggles) and the per-ROI slice plot."""

from __future__ import annotations

import numpy as np
import pytest

from mrn_engine.data import load_case
from mrn_engine.data.labels import ROI_NAMES
from mrn_engine.inference.evidence import case_evidence
from napari_mrn._compat import guard_triton
from napari_mrn._display import DisplayMapping
from napari_mrn._evidence import SliceEvidencePlot, evidence_data, evidence_layer
from napari_mrn._reader import case_layers
from test_inference_explain import tiny_predictor
from test_inference_predictor import write_case

guard_triton()


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    case = load_case(write_case(tmp_path_factory.mktemp("case") / "RJPD_001", pd=1))
    predictor = tiny_predictor()
    pred = predictor.predict_case(case, keep_slice_tokens=True)
    yield predictor, case, pred
    torch.set_num_threads(n)


def _box_display(pred, roi, volume):
    """Boolean display-order mask of the ROI's box (through the same DisplayMapping)."""
    box = pred.crops[roi].box
    inside = np.zeros(volume.shape, bool)
    inside[box.x0 : box.x1, box.y0 : box.y1, box.z0 : box.z1] = True
    return DisplayMapping(volume.affine, volume.shape).to_display(inside)


def test_layer_lies_on_the_case_grid(predicted):
    predictor, case, pred = predicted
    ev = case_evidence(predictor, pred)
    image = {kw["name"]: (data, kw) for data, kw, _ in case_layers(case)}
    for modality, volume in (("NM", case.nm), ("QSM", case.qsm)):
        data, kwargs, kind = evidence_layer(ev, pred.crops, volume, modality)
        ref_data, ref_kw = image[modality]
        assert kind == "image" and data.shape == ref_data.shape
        assert kwargs["scale"] == ref_kw["scale"]
        assert kwargs["contrast_limits"][0] == -kwargs["contrast_limits"][1] > -np.inf
        cmap = kwargs["colormap"]
        assert cmap.map(np.array([0.5]))[0, 3] == 0  # zero evidence is transparent
        lo, hi = cmap.map(np.array([0.0, 1.0]))
        assert lo[2] > lo[0] and hi[0] > hi[2]  # HC-ward blue, PD-ward red
        assert data.any()
    # values only inside the ROI boxes; each NM slice carries its evidence value
    nm = evidence_data(ev, pred.crops, case.nm, "NM")
    inside = _box_display(pred, "nm_sn", case.nm)
    assert not nm[~inside].any()
    values = set(np.round(nm[inside], 7).tolist()) - {0.0}
    assert values <= set(np.round(ev.evidence["nm_sn"].astype(np.float32), 7).tolist())


def test_layer_follows_roi_toggles(predicted):
    predictor, case, pred = predicted
    full = case_evidence(predictor, pred)
    off = case_evidence(predictor, pred, {"qsm_midbrain"})
    a = evidence_data(full, pred.crops, case.qsm, "QSM")
    b = evidence_data(off, pred.crops, case.qsm, "QSM")
    mid = _box_display(pred, "qsm_midbrain", case.qsm)
    others = _box_display(pred, "qsm_bg", case.qsm) & ~mid
    assert a[mid].any() and not b[mid & ~_box_display(pred, "qsm_bg", case.qsm)].any()
    assert not np.allclose(a[others], b[others])  # recomputed with the midbrain ROI masked
    _, kw, _ = evidence_layer(off, pred.crops, case.qsm, "QSM")
    assert kw["metadata"]["masked"] == ["qsm_midbrain"]


@pytest.mark.gui
def test_slice_plot_and_viewer_layer(predicted, make_napari_viewer):
    from napari.layers import Layer

    predictor, case, pred = predicted
    viewer = make_napari_viewer()
    for data, kw, kind in case_layers(case):
        viewer.add_layer(Layer.create(data, kw, kind))
    ev = case_evidence(predictor, pred)
    layer = viewer.add_layer(Layer.create(*evidence_layer(ev, pred.crops, case.qsm, "QSM")))
    assert layer.data.shape == viewer.layers["QSM"].data.shape
    np.testing.assert_allclose(layer.scale, viewer.layers["QSM"].scale)
    plot = SliceEvidencePlot()
    plot.show_evidence(ev)
    assert [len(plot.bars[n]) for n in ROI_NAMES] == [len(ev.evidence[n]) for n in ROI_NAMES]
    heights = [b.get_height() for b in plot.bars["qsm_bg"]]
    np.testing.assert_allclose(heights, ev.evidence["qsm_bg"])
    masked = case_evidence(predictor, pred, {"nm_sn"})
    layer.data = evidence_data(masked, pred.crops, case.qsm, "QSM")
    plot.show_evidence(masked)
    assert all(b.get_height() == 0 for b in plot.bars["nm_sn"])
    plot.show_evidence(None)
    assert plot.bars == {}
