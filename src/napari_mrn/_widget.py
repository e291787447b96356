"""The MRN diagnosis dock widget: pick NM/QSM layers and a model bundle, run, read the result.

Layout, top to bottom: inputs (NM, QSM, optional masks), model (bundle, device, folds, TTA),
Run / Cancel with a progress bar, the result (P(PD) per fold and ensemble, the call, a bar
chart), ROI masking (one checkbox per ROI, masking table) and Save.

The run happens in a ``napari.qt.threading`` generator worker (:func:`_run.prediction_steps`);
the viewer stays responsive and Cancel stops the run at the predictor's next progress report.
While a run is in progress the result controls (ROI checkboxes, masking table, Save) are
disabled: the worker is using the predictor (it swaps fold weights), so nothing else may.
The run also caches every fold's empty-ROI tokens, so an ROI toggle afterwards runs only the
classification head.
"""

from __future__ import annotations

import os
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.qt.threading import thread_worker
from qtpy.QtCore import QSettings, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import GeneratorWorker

from mrn_engine.data import Volume
from mrn_engine.data.labels import ROI_BY_NAME, ROI_NAMES
from mrn_engine.errors import MRNError
from napari_mrn._bundles import bundle_folds, candidate_bundles
from napari_mrn._chart import ProbabilityChart
from napari_mrn._compat import guard_triton
from napari_mrn._layers import ROI_COLOURS, labels_layer, roi_boxes_layer, roi_labels_layer
from napari_mrn._run import (
    Probabilities,
    Progress,
    RunCancelled,
    RunResult,
    as_probabilities,
    case_from_layers,
    layer_mapping,
    masking_rows,
    prediction_steps,
    save_results,
)

guard_triton()

NONE_CHOICE = "(none)"
SETTINGS_LAST_BUNDLE = "bundle/last"

#: output layer names
NUCLEI_LAYER = "MRN nuclei"
NM_NUCLEI_LAYER = "MRN NM SN"
BOXES_LAYER = "MRN ROIs"
BOX_LABELS_LAYER = "MRN ROI labels"


#: warning categories from dependencies that the panel does not show
IGNORED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of some types (optionally with a "(none)" entry)."""

    def __init__(
        self,
        viewer: Any,
        types: tuple[type, ...],
        *,
        optional: bool = False,
        prefer: tuple[str, ...] = (),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer, self.types, self.optional, self.prefer = viewer, types, optional, prefer
        self._user_chose = False
        self.activated.connect(self._on_user_choice)
        self.refresh()

    def _on_user_choice(self, *_: Any) -> None:
        self._user_chose = True

    def layers(self) -> list[Layer]:
        return [ly for ly in self.viewer.layers if isinstance(ly, self.types)]

    def refresh(self) -> None:
        """Re-list the layers. A choice the user made is kept while its layer exists; otherwise
        the preferred layer (by napari-mrn kind or name, e.g. ``QSM``) is chosen."""
        current = self.layer()
        self.blockSignals(True)
        self.clear()
        if self.optional:
            self.addItem(NONE_CHOICE, None)
        for ly in self.layers():
            self.addItem(ly.name, ly)
        self.blockSignals(False)
        keep = current is not None and current in self.layers()
        preferred = self._preferred()
        if keep and (self._user_chose or preferred is None or self._matches(current)):
            self.set_layer(current)
        elif preferred is not None:
            self.set_layer(preferred)
        elif self.optional:
            self.setCurrentIndex(0)
        self.currentIndexChanged.emit(self.currentIndex())

    def _matches(self, layer: Layer) -> bool:
        kind = (layer.metadata or {}).get("mrn_kind")
        return any(kind == w or layer.name == w for w in self.prefer)

    def _preferred(self) -> Layer | None:
        for want in self.prefer:
            for ly in self.layers():
                if (ly.metadata or {}).get("mrn_kind") == want or ly.name == want:
                    return ly
        return None

    def layer(self) -> Layer | None:
        return self.currentData() if self.count() else None

    def set_layer(self, layer: Layer | None) -> None:
        for i in range(self.count()):
            if self.itemData(i) is layer:
                self.setCurrentIndex(i)
                return


class MaskingTableDialog(QDialog):
    """All 16 ROI subsets: masked ROIs, ensemble P(PD) +- std, the call and each fold's P(PD)."""

    def __init__(self, rows: list[dict[str, Any]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("MRN ROI masking table")
        n_folds = max((len(r["p_pd_folds"]) for r in rows), default=0)
        headers = ["masked ROIs", "P(PD)", "std", "call"] + [f"fold {i}" for i in range(n_folds)]
        self.table = QTableWidget(len(rows), len(headers), self)
        self.table.setHorizontalHeaderLabels(headers)
        for i, row in enumerate(rows):
            masked = ", ".join(ROI_BY_NAME[m].title for m in row["masked"]) or "none (full model)"
            cells = [
                masked,
                f"{row['p_pd']:.3f}",
                f"{row['p_pd_std']:.3f}",
                "PD" if row["call"] == 1 else "HC",
            ]
            cells += [f"{p:.3f}" for p in row["p_pd_folds"]]
            for j, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                self.table.setItem(i, j, item)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("P(PD) with each subset of ROIs replaced by an empty volume"))
        layout.addWidget(self.table)
        self.resize(760, 640)


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
        self.settings = settings if settings is not None else QSettings("napari-mrn", "diagnosis")
        self.worker: Any = None
        self._cancel = threading.Event()
        self._predictor: Any = None
        self._predictor_made_for: tuple | None = None
        self.result: RunResult | None = None
        self.probabilities: Probabilities | None = None
        self._grids: dict[str, Any] = {}
        self._build()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.viewer.layers.events.inserted.connect(self._watch_name)
        for ly in self.viewer.layers:
            ly.events.name.connect(self._refresh_layers)
        self._refresh_layers()
        self._update_device_warning()

    # ------------------------------------------------------------------ building the panel
    def _build(self) -> None:
        root = QVBoxLayout(self)

        inputs = QGroupBox("Inputs", self)
        form = QFormLayout(inputs)
        self.nm_combo = LayerCombo(self.viewer, (Image,), prefer=("NM",))
        self.qsm_combo = LayerCombo(self.viewer, (Image,), prefer=("QSM",))
        self.nm_mask_combo = LayerCombo(self.viewer, (Labels,), optional=True, prefer=("NM_mask",))
        self.qsm_mask_combo = LayerCombo(
            self.viewer, (Labels,), optional=True, prefer=("QSM_mask",)
        )
        form.addRow("NM image", self.nm_combo)
        form.addRow("QSM image", self.qsm_combo)
        form.addRow("NM mask", self.nm_mask_combo)
        form.addRow("QSM mask", self.qsm_mask_combo)
        self.input_message = QLabel("")
        self.input_message.setWordWrap(True)
        self.input_message.setStyleSheet("color: #ff6060")
        form.addRow(self.input_message)
        for combo in (self.nm_combo, self.qsm_combo, self.nm_mask_combo, self.qsm_mask_combo):
            combo.currentIndexChanged.connect(self._validate_inputs)
        root.addWidget(inputs)

        model = QGroupBox("Model", self)
        mform = QFormLayout(model)
        self.bundle_combo = QComboBox()
        self.bundle_combo.setEditable(True)
        self.bundle_combo.setToolTip("Model bundle folder (made by `mrn train` or `mrn demo`)")
        self.browse_button = QPushButton("Browse...")
        self.browse_button.clicked.connect(self._browse_bundle)
        row = QHBoxLayout()
        row.addWidget(self.bundle_combo, 1)
        row.addWidget(self.browse_button)
        mform.addRow("Bundle", row)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.currentTextChanged.connect(self._update_device_warning)
        mform.addRow("Device", self.device_combo)
        self.device_warning = QLabel("")
        self.device_warning.setWordWrap(True)
        self.device_warning.setStyleSheet("color: #ffb000")
        mform.addRow(self.device_warning)
        self.folds_spin = QSpinBox()
        self.folds_spin.setRange(0, 20)
        self.folds_spin.setSpecialValueText("all")
        self.folds_spin.setToolTip("Use the first N folds of the bundle (fewer = faster)")
        mform.addRow("Folds", self.folds_spin)
        self.tta_check = QCheckBox("test-time augmentation (mirror; 2x slower)")
        mform.addRow(self.tta_check)
        root.addWidget(model)
        self._fill_bundles()
        self.bundle_combo.currentTextChanged.connect(self._bundle_changed)
        self._bundle_changed(self.bundle_combo.currentText())

        run_row = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)
        root.addLayout(run_row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        root.addWidget(self.progress)
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        self.warnings: list[str] = []
        self.warning_label = QLabel("")
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet("color: #ffb000")
        self.warning_label.setVisible(False)
        root.addWidget(self.warning_label)

        result = QGroupBox("Result", self)
        rlay = QVBoxLayout(result)
        self.result_label = QLabel("No result yet.")
        self.result_label.setWordWrap(True)
        self.result_label.setTextFormat(Qt.TextFormat.RichText)
        rlay.addWidget(self.result_label)
        self.chart = ProbabilityChart(result)
        rlay.addWidget(self.chart)
        root.addWidget(result)

        masking = QGroupBox("ROI masking (untick to hide an ROI)", self)
        mlay = QVBoxLayout(masking)
        self.roi_checks: dict[str, QCheckBox] = {}
        for name in ROI_NAMES:
            box = QCheckBox(ROI_BY_NAME[name].title)
            box.setChecked(True)
            r, g, b = (int(255 * c) for c in ROI_COLOURS[name])
            box.setStyleSheet(f"QCheckBox {{ color: rgb({r},{g},{b}); }}")
            box.toggled.connect(self._masking_changed)
            self.roi_checks[name] = box
            mlay.addWidget(box)
        self.table_button = QPushButton("Masking table (all 16 subsets)...")
        self.table_button.clicked.connect(self.show_masking_table)
        mlay.addWidget(self.table_button)
        root.addWidget(masking)

        self.save_button = QPushButton("Save results...")
        self.save_button.clicked.connect(self._save_dialog)
        root.addWidget(self.save_button)
        root.addStretch(1)
        self._set_result_enabled(False)

    # ------------------------------------------------------------------ inputs
    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _refresh_layers(self, event: Any = None) -> None:
        for combo in (self.nm_combo, self.qsm_combo, self.nm_mask_combo, self.qsm_mask_combo):
            combo.refresh()
        self._validate_inputs()

    def input_layers(self) -> dict[str, Layer | None]:
        return {
            "nm": self.nm_combo.layer(),
            "qsm": self.qsm_combo.layer(),
            "nm_mask": self.nm_mask_combo.layer(),
            "qsm_mask": self.qsm_mask_combo.layer(),
        }

    def _validate_inputs(self, *_: Any) -> bool:
        """Check the chosen layers share one grid; show the problem in the panel."""
        from napari_mrn._run import check_layers_grid

        layers = self.input_layers()
        message = ""
        if layers["nm"] is None or layers["qsm"] is None:
            message = "Open a case (File > Open, or File > Open Sample > MRN PD case)."
        elif layers["nm"] is layers["qsm"]:
            message = f"Layer '{layers['nm'].name}' is chosen as both NM and QSM."
        else:
            try:
                check_layers_grid(
                    layers["qsm"], [layers["nm"], layers["nm_mask"], layers["qsm_mask"]]
                )
            except MRNError as e:
                message = str(e)
        self.input_message.setText(message)
        ok = not message
        if hasattr(self, "run_button"):
            self.run_button.setEnabled(ok and self.worker is None)
        return ok

    # ------------------------------------------------------------------ model choice
    def _fill_bundles(self) -> None:
        last = self.settings.value(SETTINGS_LAST_BUNDLE, "", type=str) or None
        self.bundle_combo.clear()
        for path in candidate_bundles(last):
            self.bundle_combo.addItem(str(path))
        if self.bundle_combo.count() == 0:
            self.bundle_combo.setEditText("")
            self.bundle_combo.lineEdit().setPlaceholderText(
                "choose a model bundle folder (mrn demo / mrn train)"
            )

    def _browse_bundle(self) -> None:
        start = self.bundle_path() or str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose an MRN model bundle", start)
        if path:
            self.set_bundle(path)

    def set_bundle(self, path: str | os.PathLike) -> None:
        """Choose a model bundle folder (also remembered for next time)."""
        text = str(path)
        if self.bundle_combo.findText(text) < 0:
            self.bundle_combo.insertItem(0, text)
        self.bundle_combo.setCurrentText(text)
        self._bundle_changed(text)

    def bundle_path(self) -> str:
        return self.bundle_combo.currentText().strip()

    def _bundle_changed(self, text: str) -> None:
        n = bundle_folds(text) if text else 0
        self.folds_spin.setMaximum(max(n, 1) if n else 20)
        self.folds_spin.setToolTip(
            f"Use the first N of the bundle's {n} folds (all = {n})"
            if n
            else "Use the first N folds of the bundle (fewer = faster)"
        )

    def device(self) -> str:
        return self.device_combo.currentText()

    def _update_device_warning(self, *_: Any) -> None:
        import torch

        name = self.device()
        on_cpu = name == "cpu" or (name == "auto" and not torch.cuda.is_available())
        if name == "cuda" and not torch.cuda.is_available():
            self.device_warning.setText(
                "CUDA is not available on this machine: choose auto or cpu."
            )
        elif on_cpu:
            self.device_warning.setText(
                "Running on CPU: a ViT-B model takes minutes per case; fewer folds and no TTA "
                "are faster."
            )
        else:
            self.device_warning.setText("")
        self.device_warning.setVisible(bool(self.device_warning.text()))

    def _folds(self) -> list[int] | None:
        n = self.folds_spin.value()
        return None if n == 0 else list(range(n))

    def _predictor_key(self) -> tuple:
        """The model settings of the panel (read on the GUI thread when Run is pressed)."""
        return (
            self.bundle_path(),
            self.device(),
            tuple(self._folds() or ()),
            self.tta_check.isChecked(),
        )

    def _predictor_factory(self, key: tuple) -> Any:
        """A callable for the worker thread: create (or reuse) the predictor for ``key``.

        It touches no widget: the settings were read on the GUI thread by :meth:`run`.
        """

        def get() -> Any:
            from mrn_engine.inference import MRNPredictor

            if self._predictor is None or self._predictor_made_for != key:
                bundle, device, folds, tta = key
                self._predictor = MRNPredictor.from_bundle(
                    bundle, device=device, folds=list(folds) or None, tta=tta
                )
                self._predictor_made_for = key
            return self._predictor

        return get

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Start a prediction on the chosen layers; returns the worker (None if inputs are bad)."""
        if self.worker is not None:
            return None
        if not self._validate_inputs():
            self._set_status(self.input_message.text(), error=True)
            return None
        if not self.bundle_path():
            self._set_status("Choose a model bundle first (Browse...).", error=True)
            return None
        layers = self.input_layers()
        try:
            case = case_from_layers(**layers)
        except MRNError as e:
            self.input_message.setText(str(e))
            self._set_status(str(e), error=True)
            return None
        self._grids = {"qsm": layers["qsm"], "nm": layers["nm"]}
        self.settings.setValue(SETTINGS_LAST_BUNDLE, self.bundle_path())
        self._cancel = threading.Event()
        # superqt's plain GeneratorWorker: errors (incl. Cancel) are shown in the panel by
        # _on_error instead of being relayed as napari error notifications
        connect = {
            "yielded": self._on_progress,
            "returned": self._on_returned,
            "errored": self._on_error,
            "finished": self._on_finished,
            "warned": self._on_warning,
        }
        worker = thread_worker(
            prediction_steps, start_thread=False, connect=connect, worker_class=GeneratorWorker
        )(self._predictor_factory(self._predictor_key()), case, self._cancel)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        # the worker uses (and may replace) the predictor of the shown result: no masking
        # toggle, table or save until it is done (see _on_finished)
        self._set_result_enabled(False)
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
        self._cancel.set()
        self.cancel_button.setEnabled(False)
        self._set_status("Cancelling...")

    def _on_progress(self, item: Progress) -> None:
        if item.fraction is not None:
            self.progress.setValue(int(round(1000 * item.fraction)))
        if item.message and not self._cancel.is_set():
            self._set_status(item.message)

    def _on_warning(self, args: tuple) -> None:
        """Warnings raised during the run (e.g. a missing label in a mask) shown under the status.

        Deprecation notices of dependencies (e.g. torch.jit in MONAI) are not the user's business.
        """
        category = args[1] if len(args) > 1 else None
        if isinstance(category, type) and issubclass(category, IGNORED_WARNINGS):
            return
        message = str(args[0]) if args else ""
        if message and message not in self.warnings:
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

    def _on_finished(self) -> None:
        """The run ended (result, Cancel or error): the result shown, if any, is usable again."""
        self.worker = None
        self.cancel_button.setEnabled(False)
        self._set_result_enabled(self.result is not None)
        if self.result is not None:  # show what the (unchanged) checkboxes say
            self._masking_changed()
        self._validate_inputs()

    def _on_returned(self, result: RunResult) -> None:
        self.result = result
        self._predictor = result.predictor
        pred = result.prediction
        self.show_outputs(pred)
        for box in self.roi_checks.values():
            box.blockSignals(True)
            box.setChecked(True)
            box.blockSignals(False)
        self._show_probabilities(as_probabilities(pred))
        self._set_status(f"{pred.case_id}: done in {result.seconds:.1f} s.")

    # ------------------------------------------------------------------ outputs
    def _put_layer(self, data: Any, kwargs: dict[str, Any], layer_type: str) -> Layer:
        """Add a layer, or update the data/geometry of the existing one with that name."""
        name = kwargs["name"]
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        add = getattr(self.viewer, f"add_{layer_type}")
        return add(data, **kwargs)

    def show_outputs(self, pred: Any) -> None:
        """Add the nuclei segmentations and the ROI boxes of ``pred`` to the viewer."""
        qsm_layer, nm_layer = self._grids["qsm"], self._grids["nm"]
        qmap, nmap = layer_mapping(qsm_layer), layer_mapping(nm_layer)
        meta = {"case_id": pred.case_id, "header": (qsm_layer.metadata or {}).get("header")}
        for extra_name, array, mapping, kind, layer in self._mask_outputs(pred, qmap, nmap):
            m = {**meta, "header": (layer.metadata or {}).get("header")}
            data, kwargs, _ = labels_layer(array, mapping, extra_name, kind=kind, metadata=m)
            kwargs["translate"] = tuple(layer.translate)
            kwargs["visible"] = extra_name == NUCLEI_LAYER
            self._put_layer(data, kwargs, "labels")
        boxes = getattr(pred, "boxes", None) or {}
        if boxes:
            meta = {"case_id": pred.case_id}
            data, kwargs, _ = roi_boxes_layer(boxes, qmap, BOXES_LAYER, meta)
            kwargs["translate"] = tuple(qsm_layer.translate)
            box_layer = self._put_layer(data, kwargs, "shapes")
            data, kwargs, _ = roi_labels_layer(boxes, qmap, BOX_LABELS_LAYER, meta)
            kwargs["translate"] = tuple(qsm_layer.translate)
            label_layer = self._put_layer(data, kwargs, "points")
            # hiding the boxes hides their names too
            box_layer.events.visible.connect(
                lambda _e: setattr(label_layer, "visible", box_layer.visible)
            )
        self.viewer.layers.selection.active = self.viewer.layers[NUCLEI_LAYER]

    def _mask_outputs(self, pred: Any, qmap: Any, nmap: Any) -> list[tuple]:
        outs = []
        nm_nuclei = getattr(pred, "nm_nuclei", None)
        if nm_nuclei is not None:
            outs.append((NM_NUCLEI_LAYER, np.asarray(nm_nuclei), nmap, "NM", self._grids["nm"]))
        if getattr(pred, "mask_source", "") == "segmenter":  # masks came from nnU-Net
            for attr, name, kind, mapping, key in (
                ("nm_mask", "nnU-Net NM mask", "NM", nmap, "nm"),
                ("qsm_mask", "nnU-Net QSM mask", "QSM", qmap, "qsm"),
            ):
                arr = getattr(pred, attr, None)
                if arr is not None:
                    arr = getattr(arr, "array", arr)  # a Volume or an array
                    outs.append((name, np.asarray(arr), mapping, kind, self._grids[key]))
        outs.append((NUCLEI_LAYER, np.asarray(pred.nuclei), qmap, "QSM", self._grids["qsm"]))
        return outs

    def output_volumes(self) -> dict[str, Volume]:
        """The run's masks as engine volumes in the source geometry (for saving)."""
        if self.result is None:
            return {}
        pred = self.result.prediction
        case = self.result.case
        vols = {"QSM_pred": case.qsm.like(np.asarray(pred.nuclei).astype(np.uint8), kind="mask")}
        if getattr(pred, "nm_nuclei", None) is not None:
            vols["NM_pred"] = case.nm.like(np.asarray(pred.nm_nuclei).astype(np.uint8), kind="mask")
        if getattr(pred, "mask_source", "") == "segmenter":  # nnU-Net masks used for cropping
            for attr, name, ref in (
                ("nm_mask", "NM_nnunet", case.nm),
                ("qsm_mask", "QSM_nnunet", case.qsm),
            ):
                arr = getattr(pred, attr, None)
                if arr is not None:
                    arr = np.asarray(getattr(arr, "array", arr)).astype(np.uint8)
                    vols[name] = ref.like(arr, kind="mask")
        return vols

    # ------------------------------------------------------------------ probabilities / masking
    def masked_rois(self) -> set[str]:
        return {n for n, box in self.roi_checks.items() if not box.isChecked()}

    def _masking_changed(self, *_: Any) -> None:
        """Probabilities with the unticked ROIs masked: the predictor's head on cached tokens."""
        if self.result is None or self.worker is not None:
            return  # during a run the worker owns the predictor (the boxes are disabled too)
        masked = self.masked_rois()
        pred = self.result.prediction
        if masked:
            probs = as_probabilities(self.result.predictor.masked_prediction(pred, masked), masked)
        else:
            probs = as_probabilities(pred)
        self._show_probabilities(probs)

    def _show_probabilities(self, probs: Probabilities) -> None:
        self.probabilities = probs
        colour = "#ff6b6b" if probs.call == 1 else "#6bb5ff"
        folds = ", ".join(f"{p:.2f}" for p in probs.p_pd_folds)
        masked = ", ".join(ROI_BY_NAME[m].title for m in ROI_NAMES if m in probs.masked)
        text = (
            f"<b style='font-size:14pt; color:{colour}'>{probs.label}</b> &nbsp; "
            f"P(PD) = <b>{probs.p_pd:.3f}</b> &plusmn; {probs.p_pd_std:.3f} "
            f"(spread across {len(probs.p_pd_folds)} folds)<br>"
            f"folds: {folds}"
        )
        if masked:
            text += f"<br><i>masked: {masked}</i>"
        self.result_label.setText(text)
        self.chart.show_probabilities(probs)

    def masking_table(self) -> list[dict[str, Any]]:
        """Display rows of the predictor's 16-subset masking table for the last run."""
        if self.result is None or self.worker is not None:
            return []
        return masking_rows(self.result.predictor.masking_table(self.result.prediction))

    def show_masking_table(self) -> MaskingTableDialog | None:
        rows = self.masking_table()
        if not rows:
            return None
        dialog = MaskingTableDialog(rows, self)
        dialog.show()
        self._table_dialog = dialog
        return dialog

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Save masks (NIfTI, source geometry), ``PD_pred.txt`` and ``mrn_result.json``."""
        if self.result is None or self.probabilities is None:
            raise RuntimeError("nothing to save: run a prediction first")
        if self.worker is not None:
            raise RuntimeError("a run is in progress: save when it is done")
        settings = {
            "device": self.device(),
            "folds": self._folds(),
            "tta": self.tta_check.isChecked(),
            "masked": sorted(self.masked_rois()),
        }
        written = save_results(
            folder,
            prediction=self.result.prediction,
            probabilities=self.probabilities,
            masking_table=self.masking_table(),
            bundle=self.bundle_path() or None,
            volumes=self.output_volumes(),
            settings=settings,
        )
        self._set_status(f"Saved {len(written)} files to {written[0].parent}")
        return written

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save MRN results into", str(Path.cwd()))
        if folder:
            try:
                self.save(folder)
            except MRNError as e:
                self._set_status(str(e), error=True)

    # ------------------------------------------------------------------ helpers
    def _set_result_enabled(self, enabled: bool) -> None:
        for w in (*self.roi_checks.values(), self.table_button, self.save_button):
            w.setEnabled(enabled)

    def _set_status(self, text: str, *, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setStyleSheet("color: #ff6060" if error else "")
