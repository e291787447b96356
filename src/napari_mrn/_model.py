"""The panel's model settings: bundle folder, device (with a CPU/CUDA warning), folds, TTA and
an optional site harmonisation file (``mrn site-adapt``)."""

from __future__ import annotations

import os
from pathlib import Path

from qtpy.QtCore import QSettings
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_mrn._bundles import bundle_folds, candidate_bundles
from napari_mrn._session import PredictorKey

SETTINGS_LAST_BUNDLE = "bundle/last"
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def device_warning(device: str, cuda_available: bool) -> str:
    """What the panel says about ``device`` on this machine ("" = nothing to say)."""
    if device == "cuda" and not cuda_available:
        return "CUDA is not available on this machine: choose auto or cpu."
    if device == "cpu" or (device == "auto" and not cuda_available):
        return (
            "Running on CPU: a ViT-B model takes minutes per case; fewer folds and no TTA "
            "are faster."
        )
    return ""


class ModelWidget(QGroupBox):
    """Bundle / device / folds / TTA; :meth:`key` is the predictor they ask for."""

    def __init__(self, settings: QSettings, parent: QWidget | None = None) -> None:
        super().__init__("Model", parent)
        self.settings = settings
        form = QFormLayout(self)
        self.bundle_combo = QComboBox()
        self.bundle_combo.setEditable(True)
        self.bundle_combo.setToolTip("Model bundle folder (made by `mrn train` or `mrn demo`)")
        self.browse_button = QPushButton("Browse...")
        self.browse_button.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.bundle_combo, 1)
        row.addWidget(self.browse_button)
        form.addRow("Bundle", row)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.currentTextChanged.connect(self._update_device_warning)
        form.addRow("Device", self.device_combo)
        self.device_warning = QLabel("")
        self.device_warning.setWordWrap(True)
        self.device_warning.setStyleSheet("color: #ffb000")
        form.addRow(self.device_warning)
        self.folds_spin = QSpinBox()
        self.folds_spin.setRange(0, 20)
        self.folds_spin.setSpecialValueText("all")
        form.addRow("Folds", self.folds_spin)
        self.tta_check = QCheckBox("test-time augmentation (mirror; 2x slower)")
        form.addRow(self.tta_check)
        self.site_edit = QLineEdit()
        self.site_edit.setPlaceholderText("none: the bundle as trained")
        self.site_edit.setToolTip(
            "Site harmonisation file made by `mrn site-adapt` from this scanner's healthy "
            "controls (cases from another scanner than the training ones)"
        )
        self.site_button = QPushButton("Browse...")
        self.site_button.clicked.connect(self._browse_site)
        site_row = QHBoxLayout()
        site_row.addWidget(self.site_edit, 1)
        site_row.addWidget(self.site_button)
        form.addRow("Site file", site_row)
        self._fill_bundles()
        self.bundle_combo.currentTextChanged.connect(self._bundle_changed)
        self._bundle_changed(self.bundle_combo.currentText())
        self._update_device_warning()

    # ------------------------------------------------------------------ bundle
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

    def _browse(self) -> None:
        start = self.bundle_path() or str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Choose an MRN model bundle", start)
        if path:
            self.set_bundle(path)

    def _browse_site(self) -> None:
        start = self.site_edit.text().strip() or self.bundle_path() or str(Path.home())
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a site adaptation file", start, "Site adaptation (*.safetensors)"
        )
        if path:
            self.site_edit.setText(path)

    def site_path(self) -> Path | None:
        """The chosen site harmonisation file (None: the bundle as trained)."""
        text = self.site_edit.text().strip()
        return Path(text) if text else None

    def set_bundle(self, path: str | os.PathLike) -> None:
        """Choose a model bundle folder."""
        text = str(path)
        if self.bundle_combo.findText(text) < 0:
            self.bundle_combo.insertItem(0, text)
        self.bundle_combo.setCurrentText(text)
        self._bundle_changed(text)

    def bundle_path(self) -> str:
        return self.bundle_combo.currentText().strip()

    def remember_bundle(self) -> None:
        """Offer the current bundle first next time."""
        self.settings.setValue(SETTINGS_LAST_BUNDLE, self.bundle_path())

    def _bundle_changed(self, text: str) -> None:
        n = bundle_folds(text) if text else 0
        self.folds_spin.setMaximum(n if n else 20)
        self.folds_spin.setToolTip(
            f"Use the first N of the bundle's {n} folds (all = {n})"
            if n
            else "Use the first N folds of the bundle (fewer = faster)"
        )

    # ------------------------------------------------------------------ device
    def device(self) -> str:
        return self.device_combo.currentText()

    def _update_device_warning(self, *_: object) -> None:
        import torch

        text = device_warning(self.device(), torch.cuda.is_available())
        self.device_warning.setText(text)
        self.device_warning.setVisible(bool(text))

    # ------------------------------------------------------------------ the key
    def folds(self) -> tuple[int, ...] | None:
        """The first N folds (``None`` = all)."""
        n = self.folds_spin.value()
        return None if n == 0 else tuple(range(n))

    def key(self) -> PredictorKey:
        """The predictor these settings ask for (read on the GUI thread)."""
        return PredictorKey(
            bundle=Path(self.bundle_path()),
            device=self.device(),
            folds=self.folds(),
            tta=self.tta_check.isChecked(),
            site=self.site_path(),
        )
