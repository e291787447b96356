"""Make the user guide's screenshots: the viewer + MRN panel after a run on a sample case.

Run (needs a display; on a server wrap it in ``xvfb-run -a -s "-screen 0 1920x1400x24"``)::

    python -m napari_mrn.screenshots --bundle mrn_demo/bundle --out docs/img

Writes ``napari_sample.png`` (the sample case as opened), ``napari_run.png`` (after Run),
``napari_masked.png`` (NM-SN unticked), ``napari_dentate.png`` (the dentate box's slice) and
``napari_masking_table.png`` (the 16-subset table), with a model that gives per-slice evidence
also ``napari_panel_evidence.png`` (the evidence overlay on the midbrain's most PD-ward slice,
segmentation hidden), and prints what was shown (bundle, case,
device, probabilities, run time) as JSON.

With ``--site FILE --site-case DIR`` it writes only ``napari_site.png``: the case folder ``DIR``
(another scanner's case) run with the site harmonisation ``FILE`` (``mrn site-adapt``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from napari_mrn._compat import guard_triton

SAMPLES = {"pd": "mrn_pd_case", "hc": "mrn_hc_case"}


def _wait(app, condition, timeout: float) -> None:
    t0 = time.perf_counter()
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"gave up after {timeout:.0f} s")


def _settle(app, seconds: float = 0.5) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def _show_roi_slice(viewer, widget, roi: str) -> None:
    """Put the slider on the middle slice of ``roi``'s box and zoom on the boxes."""
    pred = widget.session.result.prediction
    box = pred.boxes[roi]
    qsm = viewer.layers["QSM"]
    z = (box.z0 + box.z1 - 1) // 2
    viewer.dims.set_point(0, z * qsm.scale[0])
    viewer.reset_view()
    viewer.scene.camera.zoom *= 1.6
    # centre on the brain's middle (rows/cols of the union of all boxes)
    rows, cols = [], []
    for b in pred.boxes.values():
        rows += [qsm.data.shape[1] - b.y1, qsm.data.shape[1] - b.y0]
        cols += [b.x0, b.x1]
    centre = (
        (min(rows) + max(rows)) / 2 * qsm.scale[1],
        (min(cols) + max(cols)) / 2 * qsm.scale[2],
    )
    viewer.scene.camera.center = (z * qsm.scale[0], *centre)


def make_screenshots(
    bundle: Path,
    out: Path,
    *,
    case: str = "pd",
    device: str = "auto",
    folds: int = 0,
    tta: bool = False,
    size: tuple[int, int] = (1700, 1320),  # the panel with the evidence plot fits unclipped
    timeout: float = 600.0,
) -> dict:
    """Open a sample case, run the panel with ``bundle`` and save the screenshots into ``out``."""
    guard_triton()  # before napari's OpenGL canvas exists (see napari_mrn._compat)
    import imageio.v3 as iio
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mrn._save import probabilities_record

    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-mrn")
    app = QApplication.instance()
    viewer.window._qt_window.resize(*size)
    viewer.open_sample("napari-mrn", SAMPLES[case])
    _, widget = viewer.window.add_plugin_dock_widget("napari-mrn", "MRN diagnosis")
    widget.set_bundle(bundle)
    widget.model.device_combo.setCurrentText(device)
    widget.model.folds_spin.setValue(folds)
    widget.model.tta_check.setChecked(tta)
    viewer.dims.set_point(0, 35 * viewer.layers["QSM"].scale[0])
    _settle(app)
    written = []

    def shot(name: str) -> None:
        _settle(app, 0.3)
        widget.results.chart.draw()
        _settle(app, 0.5)
        path = out / name
        iio.imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
        written.append(str(path))

    shot("napari_sample.png")
    t0 = time.perf_counter()
    if widget.run() is None:
        raise RuntimeError(f"the panel refused to run: {widget.status.text()}")
    _wait(app, lambda: widget.worker is None, timeout)
    seconds = time.perf_counter() - t0
    result = widget.session.result
    if result is None:
        raise RuntimeError(f"run failed: {widget.status.text()}")
    _show_roi_slice(viewer, widget, "qsm_midbrain")
    shown = viewer.layers["MRN nuclei"].data[viewer.dims.current_step[0]]
    if shown.any():  # show the model's segmentation rather than the input mask
        viewer.layers["QSM_mask"].visible = False
    else:  # e.g. an untrained test bundle whose DPT head segments nothing here
        print("note: the bundle segments nothing on this slice; the input QSM_mask stays visible")
    shot("napari_run.png")
    evidence = widget.session.evidence
    if evidence is not None:  # the evidence overlay on the midbrain's most PD-ward slice
        nuclei, mask = viewer.layers["MRN nuclei"], viewer.layers["QSM_mask"]
        was = nuclei.visible, mask.visible
        nuclei.visible = mask.visible = False
        _show_roi_slice(viewer, widget, "qsm_midbrain")
        z = evidence.top_slice("qsm_midbrain")
        if z >= 0:
            viewer.dims.set_point(0, z * viewer.layers["QSM"].scale[0])
        widget.results.evidence_plot.draw()
        shot("napari_panel_evidence.png")
        nuclei.visible, mask.visible = was
        _show_roi_slice(viewer, widget, "qsm_midbrain")
    full = probabilities_record(result.prediction.probabilities)
    widget.results.roi_checks["nm_sn"].setChecked(False)
    shot("napari_masked.png")
    masked = probabilities_record(widget.session.probabilities)
    widget.results.roi_checks["nm_sn"].setChecked(True)
    _show_roi_slice(viewer, widget, "qsm_dentate")  # the posterior fossa: the dentate box
    shot("napari_dentate.png")
    dialog = widget.show_masking_table()
    _settle(app, 0.6)
    table_path = out / "napari_masking_table.png"
    dialog.grab().save(str(table_path))
    written.append(str(table_path))
    record = {
        "command": f"python -m napari_mrn.screenshots --bundle {bundle} --out {out} --case {case}"
        f" --device {device} --folds {folds}" + (" --tta" if tta else ""),
        "bundle": str(bundle),
        "case": result.prediction.case_id,
        "device": str(result.predictor.device),
        "run_seconds": round(seconds, 1),
        "prediction": full,
        "nm_sn_masked": masked,
        "files": written,
    }
    dialog.close()
    viewer.close()
    return record


def make_site_screenshot(
    bundle: Path,
    case_dir: Path,
    site: Path,
    out: Path,
    *,
    device: str = "auto",
    size: tuple[int, int] = (1700, 1320),
    timeout: float = 600.0,
) -> dict:
    """Run the panel on a case folder with a site file and save ``napari_site.png``."""
    guard_triton()
    import imageio.v3 as iio
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mrn._save import probabilities_record

    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-mrn")
    app = QApplication.instance()
    viewer.window._qt_window.resize(*size)
    viewer.open(str(case_dir), plugin="napari-mrn")
    _, widget = viewer.window.add_plugin_dock_widget("napari-mrn", "MRN diagnosis")
    widget.set_bundle(bundle)
    widget.model.device_combo.setCurrentText(device)
    widget.model.site_edit.setText(str(site))
    _settle(app)
    if widget.run() is None:
        raise RuntimeError(f"the panel refused to run: {widget.status.text()}")
    _wait(app, lambda: widget.worker is None, timeout)
    result = widget.session.result
    if result is None:
        raise RuntimeError(f"run failed: {widget.status.text()}")
    _show_roi_slice(viewer, widget, "qsm_midbrain")
    _settle(app, 0.3)
    widget.results.chart.draw()
    _settle(app, 0.5)
    path = out / "napari_site.png"
    iio.imwrite(path, viewer.screenshot(canvas_only=False, flash=False))
    record = {
        "command": f"python -m napari_mrn.screenshots --bundle {bundle} --out {out} "
        f"--site {site} --site-case {case_dir} --device {device}",
        "case": result.prediction.case_id,
        "site": result.prediction.site,
        "prediction": probabilities_record(result.prediction.probabilities),
        "calibration_line": widget.results.calibration_label.text(),
        "files": [str(path)],
    }
    viewer.close()
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--out", type=Path, default=Path("docs/img"), help="output folder")
    parser.add_argument("--case", choices=sorted(SAMPLES), default="pd", help="sample case")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--folds", type=int, default=0, help="first N folds (0 = all)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
    parser.add_argument(
        "--site", type=Path, help="site file (mrn site-adapt): napari_site.png only"
    )
    parser.add_argument("--site-case", type=Path, help="case folder run with --site")
    args = parser.parse_args(argv)
    if args.site is not None or args.site_case is not None:
        if args.site is None or args.site_case is None:
            parser.error("--site and --site-case go together")
        record = make_site_screenshot(
            args.bundle, args.site_case, args.site, args.out, device=args.device
        )
        print(json.dumps(record, indent=2))
        return
    record = make_screenshots(
        args.bundle, args.out, case=args.case, device=args.device, folds=args.folds, tta=args.tta
    )
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
