"""Screenshot of the per-slice evidence overlay and slice plot on the sample PD case.

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/scripts/evidence_screenshot.py BUNDLE OUT_DIR

Writes ``napari_evidence.png`` (QSM + evidence overlay + slice plot, all ROIs) and
``napari_evidence_masked.png`` (NM-SN toggled off: its evidence is gone, the rest recomputed).
The MRN panel shows the same (``python -m napari_mrn.screenshots``: napari_panel_evidence.png);
this puts the engine pieces in a plain viewer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from napari_mrn._compat import guard_triton


def _settle(app, seconds: float = 1.0) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def main(bundle: str, out: str) -> None:
    guard_triton()
    import napari  # noqa: TID251 (a napari script, not the engine)
    from napari.layers import Layer  # noqa: TID251
    from qtpy.QtWidgets import QApplication  # noqa: TID251

    from mrn_engine.inference import MRNPredictor, case_evidence
    from napari_mrn._evidence import SliceEvidencePlot, evidence_data, evidence_layer
    from napari_mrn._reader import case_layers
    from napari_mrn._sample_data import sample_case

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    case = sample_case(1)
    predictor = MRNPredictor.from_bundle(bundle, device="cpu")
    pred = predictor.predict_case(case, keep_slice_tokens=True)
    ev = case_evidence(predictor, pred)
    viewer = napari.Viewer(show=True)
    for data, kw, kind in case_layers(case):
        viewer.add_layer(Layer.create(data, kw, kind))
    viewer.layers["QSM_mask"].visible = False
    layer = viewer.add_layer(Layer.create(*evidence_layer(ev, pred.crops, case.qsm, "QSM")))
    plot = SliceEvidencePlot()
    plot.show_evidence(ev)
    viewer.window.add_dock_widget(plot, name="Per-slice evidence", area="right")
    roi = "qsm_midbrain"
    z = ev.top_slice(roi)
    qsm = viewer.layers["QSM"]
    viewer.dims.set_point(0, z * qsm.scale[0])
    viewer.reset_view()
    viewer.scene.camera.zoom *= 2.0
    app = QApplication.instance()
    _settle(app, 3.0)
    viewer.window.screenshot(str(out_dir / "napari_evidence.png"), canvas_only=False)
    masked = case_evidence(predictor, pred, {"nm_sn"})
    layer.data = evidence_data(masked, pred.crops, case.qsm, "QSM")
    plot.show_evidence(masked)
    _settle(app, 3.0)
    viewer.window.screenshot(str(out_dir / "napari_evidence_masked.png"), canvas_only=False)
    print(
        json.dumps(
            {
                "bundle": str(bundle),
                "case": case.case_id,
                "p_pd": pred.p_pd,
                "p_pd_raw": pred.p_pd_raw,
                "calibrated": pred.calibrated,
                "slice_shown": {"roi": roi, "z": z},
                "p_pd_nm_masked": masked.p_pd,
            },
            indent=2,
        )
    )
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
