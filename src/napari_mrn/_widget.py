"""The MRN diagnosis dock widget: inputs, model, Run / Cancel, result - composed over a Session.

Top to bottom: :class:`~napari_mrn._inputs.InputsWidget` (NM, QSM, optional masks),
:class:`~napari_mrn._model.ModelWidget` (bundle, device, folds, TTA), Run / Cancel with a
progress bar and status, :class:`~napari_mrn._result.ResultWidget` (P(PD), ROI masking, table,
Save). The state lives in a Qt-free :class:`~napari_mrn._session.Session`; the run happens in a
:class:`~napari_mrn._worker.PredictionWorker` (Cancel stops it at the predictor's next report).
While a run is in progress the result controls are disabled: the worker is using the predictor.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

from napari.layers import Layer
from qtpy.QtCore import QSettings
from qtpy.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from mrn_engine.errors import MRNError
from mrn_engine.inference import stage_line
from napari_mrn._case import layer_mapping
from napari_mrn._compat import guard_triton
from napari_mrn._display import DisplayMapping
from napari_mrn._evidence import evidence_layer, evidence_limit
from napari_mrn._inputs import InputsWidget
from napari_mrn._layers import labels_layer, roi_boxes_layer, roi_labels_layer
from napari_mrn._model import ModelWidget
from napari_mrn._outputs import NUCLEI_LAYER
from napari_mrn._result import MaskingTableDialog, ResultWidget
from napari_mrn._session import Progress, RunCancelled, RunResult, Session
from napari_mrn._worker import PredictionWorker

guard_triton()

BOXES_LAYER = "MRN ROIs"
BOX_LABELS_LAYER = "MRN ROI labels"
#: per-slice evidence overlays: modality -> layer name (QSM ROIs on the QSM grid, NM-SN on NM's)
EVIDENCE_LAYERS: dict[str, str] = {"QSM": "MRN evidence", "NM": "MRN NM evidence"}
PROGRESS_STEPS = 1000

#: warning categories from dependencies that the panel does not show
IGNORED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class MRNDiagnosisWidget(QWidget):
    """Dock widget: PD/HC diagnosis of the case shown in the viewer with an MRN model bundle.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (injected by napari).
    settings : QSettings, optional
        Where the last bundle is remembered (default: the user's napari-mrn settings).
    """

    def __init__(
        self, napari_viewer: Any, settings: QSettings | None = None, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        settings = settings if settings is not None else QSettings("napari-mrn", "diagnosis")
        self.session = Session()
        self.worker: PredictionWorker | None = None
        self._grids: dict[str, Layer] = {}  # modality -> input layer of the shown result
        self.warnings: list[str] = []

        root = QVBoxLayout(self)
        self.inputs = InputsWidget(napari_viewer, self)
        self.model = ModelWidget(settings, self)
        root.addWidget(self.inputs)
        root.addWidget(self.model)
        run_row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)
        root.addLayout(run_row)
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_STEPS)
        root.addWidget(self.progress)
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet("color: #ffb000")
        self.warning_label.setVisible(False)
        root.addWidget(self.warning_label)
        self.results = ResultWidget(self)
        root.addWidget(self.results)
        root.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.inputs.changed.connect(self._update_run_button)
        self.results.masking_changed.connect(self._masking_changed)
        self.results.table_requested.connect(self.show_masking_table)
        self.results.save_requested.connect(self._save_dialog)
        self._update_run_button()

    # ------------------------------------------------------------------ running
    def _update_run_button(self) -> None:
        self.run_button.setEnabled(self.inputs.is_valid() and self.worker is None)

    def set_bundle(self, path: str | os.PathLike) -> None:
        """Choose a model bundle folder."""
        self.model.set_bundle(path)

    def run(self) -> PredictionWorker | None:
        """Start a prediction on the chosen layers; returns the worker (None if inputs are bad)."""
        if self.worker is not None:
            return None
        problem = self.inputs.problem()
        if problem:
            self._set_status(problem, error=True)
            return None
        if not self.model.bundle_path():
            self._set_status("Choose a model bundle first (Browse...).", error=True)
            return None
        try:
            case = self.inputs.case()
        except MRNError as e:
            self.inputs.message.setText(str(e))
            self._set_status(str(e), error=True)
            return None
        layers = self.inputs.layers()
        grids = {"QSM": layers.qsm, "NM": layers.nm}
        self.model.remember_bundle()
        worker = PredictionWorker(self.session, case, self.model.key())
        worker.progress.connect(self._on_progress)
        worker.returned.connect(lambda result: self._on_returned(result, grids))
        worker.errored.connect(self._on_error)
        worker.warned.connect(self._on_warning)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.results.set_enabled(False)  # the worker uses the predictor until it is done
        self.progress.setValue(0)
        self.warnings.clear()
        self.warning_label.setVisible(False)
        self._set_status(f"Running on {case.case_id}...")
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the running prediction (at the predictor's next progress report)."""
        if self.worker is None:
            return
        self.worker.quit()
        self.cancel_button.setEnabled(False)
        self._set_status("Cancelling...")

    def _on_progress(self, item: Progress) -> None:
        self.progress.setValue(round(PROGRESS_STEPS * item.fraction))
        if self.worker is not None and not self.worker.abort_requested:
            self._set_status(item.message)

    def _on_warning(self, args: tuple) -> None:
        """Warnings raised during the run (e.g. a missing label in a mask) shown under the status.

        ``args`` are ``warnings.showwarning``'s (message, category, filename, lineno, ...).
        Deprecation notices of dependencies (e.g. torch.jit in MONAI) are not the user's business.
        """
        message, category = str(args[0]), args[1]
        if issubclass(category, IGNORED_WARNINGS) or not message or message in self.warnings:
            return
        self.warnings.append(message)
        self.warning_label.setText("\n".join(f"Warning: {m}" for m in self.warnings[-3:]))
        self.warning_label.setVisible(True)

    def _on_error(self, exc: BaseException) -> None:
        if isinstance(exc, RunCancelled):
            self.progress.setValue(0)
            self._set_status("Cancelled.")
        elif isinstance(exc, MRNError):
            self._set_status(str(exc), error=True)
        else:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
            self._set_status(f"Run failed: {type(exc).__name__}: {exc}", error=True)

    def _on_returned(self, result: RunResult, grids: dict[str, Layer]) -> None:
        self._grids = grids
        self.results.reset_masking()
        self.results.show_probabilities(self.session.accept(result))
        self.show_outputs()
        self.show_evidence(replace=True)
        self.viewer.layers.selection.active = self.viewer.layers[NUCLEI_LAYER]
        stages = stage_line(result.prediction.timings)
        done = f"{result.prediction.case_id}: done in {result.seconds:.1f} s"
        self._set_status(f"{done} ({stages})." if stages else f"{done}.")

    def _on_finished(self) -> None:
        """The run ended (result, Cancel or error): the shown result is usable again."""
        self.worker = None
        self.cancel_button.setEnabled(False)
        self.results.set_enabled(self.session.result is not None)
        if self.session.result is not None:  # show what the (unchanged) checkboxes say
            self._masking_changed()
        self._update_run_button()

    # ------------------------------------------------------------------ outputs
    def _put_layer(self, data: Any, kwargs: dict[str, Any], layer_type: str) -> Layer:
        """Add a layer, replacing an existing one of that name."""
        if kwargs["name"] in self.viewer.layers:
            self.viewer.layers.remove(kwargs["name"])
        return self.viewer.add_layer(Layer.create(data, kwargs, layer_type))

    def show_outputs(self) -> None:
        """Add the shown result's output masks and ROI boxes to the viewer."""
        result = self.session.result
        if result is None:
            return
        case_id = result.prediction.case_id
        for out in self.session.outputs():
            grid = self._grids[out.modality]
            mapping = DisplayMapping(out.volume.affine, out.volume.shape)
            meta = {"case_id": case_id, "header": (grid.metadata or {}).get("header")}
            data, kwargs, kind = labels_layer(
                out.volume.array, mapping, out.layer_name, kind=out.modality, metadata=meta
            )
            kwargs.update(translate=tuple(grid.translate), visible=out.visible)
            self._put_layer(data, kwargs, kind)
        qsm = self._grids["QSM"]
        qmap, meta = layer_mapping(qsm), {"case_id": case_id}
        boxes = result.prediction.boxes
        data, kwargs, kind = roi_boxes_layer(boxes, qmap, BOXES_LAYER, meta)
        box_layer = self._put_layer(data, {**kwargs, "translate": tuple(qsm.translate)}, kind)
        data, kwargs, kind = roi_labels_layer(boxes, qmap, BOX_LABELS_LAYER, meta)
        label_layer = self._put_layer(data, {**kwargs, "translate": tuple(qsm.translate)}, kind)
        # hiding the boxes hides their names too
        box_layer.events.visible.connect(
            lambda _e: setattr(label_layer, "visible", box_layer.visible)
        )
        self.viewer.layers.selection.active = self.viewer.layers[NUCLEI_LAYER]

    # ------------------------------------------------------------------ masking
    def _masking_changed(self) -> None:
        """P(PD) with the unticked ROIs masked: the predictor's head on cached tokens."""
        if self.session.result is None or self.worker is not None:
            return  # during a run the worker owns the predictor (the boxes are disabled too)
        self.results.show_probabilities(self.session.set_masked(self.results.masked()))
        self.show_evidence()

    # ------------------------------------------------------------------ evidence
    def show_evidence(self, *, replace: bool = False) -> None:
        """The shown result's uncertainty flag, calibration line, slice plot and evidence layers.

        The layers (``_evidence.evidence_layer``) are added after a run (``replace``) and updated
        in place on each ROI toggle (their visibility, opacity etc. stay as the user set them,
        and a deleted one comes back); both share
        one contrast limit so that a colour means the same on the NM and the QSM layer.
        """
        result, flag, raw = (
            self.session.result,
            self.session.uncertainty,
            self.session.raw_probabilities,
        )
        if result is None or flag is None or raw is None:
            return
        calibrated = result.predictor.calibrated
        self.results.show_assessment(
            flag, calibrated, raw.p_pd if calibrated else None, result.prediction.site
        )
        ev = self.session.evidence
        self.results.show_evidence(ev)
        crops = result.prediction.crops
        if ev is None or crops is None:
            for name in EVIDENCE_LAYERS.values():
                if name in self.viewer.layers:
                    self.viewer.layers.remove(name)
            return
        limit = evidence_limit(ev)
        volumes = {"QSM": result.case.qsm, "NM": result.case.nm}
        for modality, name in EVIDENCE_LAYERS.items():
            data, kwargs, kind = evidence_layer(
                ev, crops, volumes[modality], modality, name=name, limit=limit
            )
            if not replace and name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.data = data
                layer.contrast_limits = kwargs["contrast_limits"]
                layer.metadata = kwargs["metadata"]
                continue
            grid = self._grids[modality]
            kwargs.update(translate=tuple(grid.translate), visible=modality == "QSM")
            self._put_layer(data, kwargs, kind)

    def show_masking_table(self) -> MaskingTableDialog | None:
        """Open the 16-subset table of the shown result (None while there is none / a run)."""
        if self.session.result is None or self.worker is not None:
            return None
        dialog = MaskingTableDialog(self.session.masking_table(), self)
        dialog.show()
        self._table_dialog = dialog
        return dialog

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Save the shown result into ``folder/<case_id>/`` (see :meth:`Session.save`)."""
        written = self.session.save(folder)
        self._set_status(f"Saved {len(written)} files to {written[0].parent}")
        return written

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save MRN results into", str(Path.cwd()))
        if folder:
            try:
                self.save(folder)
            except MRNError as e:
                self._set_status(str(e), error=True)

    def _set_status(self, text: str, *, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6060" if error else "")
